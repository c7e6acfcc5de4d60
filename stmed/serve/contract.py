"""The VQA endpoint's HTTP contract, without Ray: request limits, parsing, answers and error shapes.

``actors.serve.VQADeployment`` is a thin Ray Serve shell around these functions. A request is checked
cheapest first (size, question, ``max_tokens``) and only then is its image decoded, so bad input costs
little and always ends as a 4xx ``{"error": {"message", "type", "param", "code"}}`` (:class:`APIError`,
shapes in ``stmed.serve.errors``), never a 500. Every read from the client has a deadline and a size
limit (408, 413); an image's size and aspect ratio are checked from its header before decoding.
Images arrive as a multipart file (JPEG/PNG/TIFF/BMP/DICOM), bare base64, or a ``data:image/...;base64,``
URL (the OpenAI ``image_url`` part); this server fetches nothing, so http(s) URLs are refused. Error
messages quote at most a short prefix of a value (``errors.echo``), and nothing here logs images,
questions or keys. One request the model cannot take fails alone, not its whole batch
(:func:`answer_isolated`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from PIL import Image

from stmed.config import ConfigError
from stmed.data.images import DICOM_SUFFIXES, ImageLoadError, ImageSizeError, decode_image
from stmed.log import get_logger
from stmed.model import prompts
from stmed.model.build import image_tokens as count_image_tokens
from stmed.model.generate import HFEngine, Sampling, answer, chat_format
from stmed.serve.errors import APIError, echo

log = get_logger("stmed.serve")

DISCLAIMER = ("Research model output for evaluation only; it is not medical advice and must not be used "
              "for diagnosis or treatment.")


@dataclass(frozen=True)
class LimitsConfig:
    """What one request may carry; anything beyond is refused with a 4xx, never a 500."""

    max_upload_bytes: int = 10 * 2**20
    """Largest image file (decoded bytes) -> 413."""
    max_image_pixels: int = 4096 * 4096
    """Largest width x height -> 413 (checked before the pixels are decoded)."""
    max_image_side: int = 8192
    """Longest width or height -> 413 (before decoding): a 2 KB PNG can declare 1,600,000 x 1."""
    max_aspect_ratio: float = 20.0
    """Largest long side / short side -> 422 (before decoding); the processor would scale such an image
    to gigapixels."""
    body_timeout_s: float = 60.0
    """Longest a client may take to send its whole body -> 408: a stalled upload holds a replica slot."""
    max_question_chars: int = 2000
    """Longest question -> 422."""
    max_tokens: int = 512
    """Largest ``max_tokens`` a request may ask for -> 422."""
    default_max_tokens: int = 128
    allow_remote_images: bool = False
    """http(s) image URLs are refused either way (this server fetches nothing); the flag only changes why."""

    def __post_init__(self) -> None:
        for name in ("max_upload_bytes", "max_image_pixels", "max_image_side", "max_question_chars", "max_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"limits.{name} must be >= 1, got {getattr(self, name)}")
        if not self.max_aspect_ratio >= 1:
            raise ConfigError(f"limits.max_aspect_ratio must be >= 1 (1 = square only), got {self.max_aspect_ratio}")
        if not self.body_timeout_s > 0:
            raise ConfigError(f"limits.body_timeout_s must be > 0 seconds, got {self.body_timeout_s}")
        if not 1 <= self.default_max_tokens <= self.max_tokens:
            raise ConfigError(f"limits.default_max_tokens must be in [1, limits.max_tokens={self.max_tokens}]")

    @property
    def max_body_bytes(self) -> int:
        # base64 grows the image by 4/3; the rest is form fields and JSON keys.
        return self.max_upload_bytes * 4 // 3 + 64 * 1024


# ----------------------------------------------------------------------------- auth


def api_key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def authorize(request: Request, key_digest: str | None) -> None:
    """401 unless the request carries ``Authorization: Bearer <key>`` of that sha256 (no key: all pass)."""
    if key_digest is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", "authentication_error")
    if not hmac.compare_digest(api_key_digest(token.strip()), key_digest):
        raise APIError(401, "invalid API key", "authentication_error")


# ----------------------------------------------------------------------------- field checks


@dataclass(frozen=True)
class VQAItem:
    """One question about one decoded image: what the batch handler receives."""

    image: Image.Image
    question: str
    max_tokens: int


async def read_body(request: Request, limits: LimitsConfig) -> bytes:
    """The request body, within a size limit (413, Content-Length or streamed) and a deadline (408).

    Without the deadline a client that sends its headers and then stalls holds a replica slot for as
    long as it likes: in Ray Serve the replica pulls each body chunk from the proxy, so this read is
    where the wait happens, and where it has to end.
    """
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise APIError(413, f"request body over {limits.max_body_bytes} bytes", "request_too_large")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(limits.body_timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limits.max_body_bytes:
                    raise APIError(413, f"request body over {limits.max_body_bytes} bytes", "request_too_large")
                chunks.append(chunk)
    except TimeoutError:
        raise APIError(408, f"request body not received within limits.body_timeout_s={limits.body_timeout_s:g}s",
                       "request_timeout") from None
    return b"".join(chunks)


def check_question(value: Any, limits: LimitsConfig, specials: list[str]) -> str:
    if not isinstance(value, str):
        raise APIError(422, "'question' must be a string", param="question")
    for token in specials:  # '<image>' or '</s>' in user text would break the prompt's structure
        value = value.replace(token, " ")
    value = " ".join(value.split())
    if not value:
        raise APIError(422, "'question' is empty", param="question")
    if len(value) > limits.max_question_chars:
        raise APIError(422, f"'question' is longer than {limits.max_question_chars} characters", param="question")
    try:  # JSON's "\ud800" escape gives a lone surrogate, which the tokenizer (and UTF-8) cannot take
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(422, "'question' is not valid Unicode text (it holds a lone surrogate code point)",
                       param="question") from None
    return value


def check_max_tokens(value: Any, limits: LimitsConfig) -> int:
    if value is None:
        return limits.default_max_tokens
    if isinstance(value, str) and value.strip().isdigit() and len(value) < 32:  # form fields arrive as text
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limits.max_tokens:
        raise APIError(422, f"'max_tokens' must be an integer in [1, {limits.max_tokens}], got {echo(value)}",
                       param="max_tokens")
    return value


def check_number(data: dict[str, Any], field: str, low: float, high: float, low_open: bool = False) -> None:
    """A sampling field (unused: decoding is greedy) must still be a finite number in range, or 400.

    The comparisons refuse NaN and infinities by themselves, and work on integers of any length.
    """
    value = data.get(field)
    if value is None:
        return
    in_range = (isinstance(value, (int, float)) and not isinstance(value, bool)
                and (value > low if low_open else value >= low) and value <= high)
    if not in_range:
        bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise APIError(400, f"'{field}' must be a finite number in {bounds}, got {echo(value)}", param=field)


def check_model(value: Any, model_name: str) -> None:
    """The OpenAI ``model`` field: this endpoint's one model, or absent (as vLLM's server allows)."""
    if value is None:
        return
    if not isinstance(value, str):
        raise APIError(400, "'model' must be a string", param="model")
    if value != model_name:
        raise APIError(404, f"model {echo(value)} is not served here; this endpoint serves {model_name!r} "
                       "(GET /v1/models)", param="model", code="model_not_found")


# The loader's size limits, by the LimitsConfig field that sets each one.
_SIZE_LIMIT_KEYS = {"max_pixels": "max_image_pixels", "max_side": "max_image_side", "max_aspect": "max_aspect_ratio"}


def decode_upload(data: bytes, name: str, limits: LimitsConfig) -> Image.Image:
    """Bytes -> RGB image; too big is 413, an extreme aspect ratio 422, corrupt or unsupported 400."""
    if len(data) > limits.max_upload_bytes:
        raise APIError(413, f"image over {limits.max_upload_bytes} bytes", "image_too_large")
    try:
        return decode_image(data, name, max_pixels=limits.max_image_pixels, max_side=limits.max_image_side,
                            max_aspect=limits.max_aspect_ratio)
    except ImageSizeError as err:
        key = f"limits.{_SIZE_LIMIT_KEYS[err.limit]}"
        if err.limit == "max_aspect":
            raise APIError(422, f"image has an {err.reason} ({key}); crop or pad it", "invalid_image") from None
        raise APIError(413, f"image has {err.reason} ({key}); downscale it", "image_too_large") from None
    except ImageLoadError as err:
        raise APIError(400, f"image cannot be used: {err.reason}", "invalid_image") from None


def image_from_base64(text: Any, limits: LimitsConfig) -> Image.Image:
    """A ``data:image/...;base64,`` URL or bare base64 -> image; remote URLs are refused (no fetching here)."""
    if not isinstance(text, str) or not text:
        raise APIError(422, "the image must be a non-empty base64 string or data URL")
    if text.startswith(("http://", "https://")):
        why = ("fetching remote images is not implemented by this server" if limits.allow_remote_images
               else "remote image URLs are refused (limits.allow_remote_images is off)")
        raise APIError(400, f"{why}; send the image as a data:image/...;base64 URL", "remote_image_refused")
    header, _, payload = text.partition(",") if text.startswith("data:") else ("", "", text)
    if header and not (header.startswith("data:image/") and header.endswith(";base64")):
        raise APIError(400, "not a base64 image data URL (data:image/...;base64,...)", "invalid_image")
    payload = "".join(payload.split())  # `base64` on the command line wraps its output
    if len(payload) * 3 // 4 > limits.max_upload_bytes:
        raise APIError(413, f"image over {limits.max_upload_bytes} bytes", "image_too_large")
    try:
        data = base64.b64decode(payload, validate=True)
    except binascii.Error:
        raise APIError(400, "the image is not valid base64", "invalid_image") from None
    return decode_upload(data, "<upload>", limits)


def parse_json(body: bytes) -> dict[str, Any]:
    """A JSON object, or 400: malformed, not UTF-8, nested past Python's recursion limit, or holding an
    integer over Python's 4300-digit conversion limit (the last two raise RecursionError / ValueError)."""
    try:
        data = json.loads(body)
    except json.JSONDecodeError as err:  # its message is a position, not the content
        raise APIError(400, f"body is not valid JSON: {err.msg} (line {err.lineno}, column {err.colno})",
                       "invalid_json") from None
    except UnicodeDecodeError:
        raise APIError(400, "body is not valid JSON: not UTF-8 text", "invalid_json") from None
    except RecursionError:
        raise APIError(400, "body is not usable JSON: nested too deeply", "invalid_json") from None
    except ValueError:
        raise APIError(400, "body is not usable JSON: a number has too many digits", "invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(422, "body must be a JSON object")
    return data


def chat_parts(messages: Any) -> tuple[str, str]:
    """(question, image URL) from OpenAI chat messages: the last user turn's text, its one image."""
    if not isinstance(messages, list) or not messages:
        raise APIError(422, "'messages' must be a non-empty list")
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise APIError(422, "'messages' holds no user message")
    content = users[-1].get("content")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(parts, list) or not all(isinstance(p, dict) for p in parts):
        raise APIError(422, "user 'content' must be a string or a list of content parts")
    texts = [p.get("text") for p in parts if p.get("type") == "text"]
    # {"image_url": {"url": ...}} per the API; a bare string is accepted too
    urls = [p["image_url"].get("url") if isinstance(p.get("image_url"), dict) else p.get("image_url")
            for p in parts if p.get("type") == "image_url"]
    if len(urls) != 1:
        raise APIError(400, f"the last user message must carry exactly one image_url, got {len(urls)}")
    if not all(isinstance(t, str) for t in texts):
        raise APIError(422, "text content parts must hold a string 'text'")
    return " ".join(texts), urls[0]


def _replay(request: Request, body: bytes) -> Request:
    """A request whose body is ``body`` again (already read under the size limit), for the form parser."""
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return Request(request.scope, receive)


# ----------------------------------------------------------------------------- requests


async def vqa_item(request: Request, body: bytes, limits: LimitsConfig, specials: list[str]) -> VQAItem:
    """Parse a /v1/vqa body (read by ``read_body``); the cheap checks run before the image is decoded."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        data = parse_json(body)
        unknown = set(data) - {"image_base64", "question", "max_tokens"}
        if unknown:
            raise APIError(422, f"unknown field(s) {', '.join(echo(k) for k in sorted(unknown)[:3])}; "
                           "expected image_base64, question, max_tokens")
        question = check_question(data.get("question"), limits, specials)
        max_tokens = check_max_tokens(data.get("max_tokens"), limits)
        image = await asyncio.to_thread(image_from_base64, data.get("image_base64"), limits)
    elif content_type == "multipart/form-data":
        form = await _replay(request, body).form(max_files=1, max_fields=4)
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise APIError(422, "multipart field 'image' must be a file")
        question = check_question(form.get("question"), limits, specials)
        max_tokens = check_max_tokens(form.get("max_tokens"), limits)
        # The suffix only matters for preamble-less DICOM; the client's file name goes nowhere else.
        name = "upload.dcm" if (upload.filename or "").lower().endswith(DICOM_SUFFIXES) else "<upload>"
        image = await asyncio.to_thread(decode_upload, await upload.read(), name, limits)
    else:
        raise APIError(415, "send multipart/form-data (image file + question) or application/json")
    return VQAItem(image, question, max_tokens)


async def chat_item(body: bytes, limits: LimitsConfig, specials: list[str], model_name: str) -> VQAItem:
    """Parse an OpenAI /v1/chat/completions body: one image and its question, greedy, no streaming."""
    data = parse_json(body)
    check_model(data.get("model"), model_name)
    if data.get("stream"):
        raise APIError(400, "streaming is not supported; send stream=false", param="stream")
    n = data.get("n")
    if n is not None and (type(n) is not int or n != 1):  # true and 1.0 equal 1 in Python; not on the wire
        raise APIError(400, f"only n=1 (an integer) is supported, got {json.dumps(n)[:20]}", param="n")
    check_number(data, "temperature", 0.0, 2.0)
    check_number(data, "top_p", 0.0, 1.0, low_open=True)
    text, url = chat_parts(data.get("messages"))
    question = check_question(text, limits, specials)
    max_tokens = check_max_tokens(data.get("max_completion_tokens", data.get("max_tokens")), limits)
    image = await asyncio.to_thread(image_from_base64, url, limits)
    return VQAItem(image, question, max_tokens)


# ----------------------------------------------------------------------------- answers


def answer_items(engine: HFEngine, image_tokens: int | None, items: list[VQAItem]) -> list[dict[str, Any]]:
    """Greedy answers, one ``generate`` call per distinct ``max_tokens`` (usually one), with token counts.

    ``image_tokens`` is what one image costs in the prompt; None counts it per image with the engine's
    processor (a Qwen2.5-VL image costs what its size makes it).

    Call it from one thread only: a Rust tokenizer shared across threads fails with "Already borrowed"
    while the processor is padding.
    """
    tokenizer = engine.tokenizer
    texts: dict[int, str] = {}
    for max_tokens in sorted({it.max_tokens for it in items}):
        idx = [i for i, it in enumerate(items) if it.max_tokens == max_tokens]
        answers = answer(engine, [items[i].image for i in idx], [items[i].question for i in idx],
                         Sampling(max_new_tokens=max_tokens))
        texts.update(zip(idx, answers))
    results = []
    for i, item in enumerate(items):
        # The prompt's one image token stands for the image's embeddings.
        n_image = count_image_tokens(engine.processor, item.image) if image_tokens is None else image_tokens
        text = prompts.answer_prompt(item.question, chat=chat_format(engine))
        prompt = len(tokenizer(text)["input_ids"]) - 1 + n_image
        # HFEngine returns cleaned text, not ids: re-tokenising it is close; capped at what was allowed.
        completion = min(len(tokenizer(texts[i], add_special_tokens=False)["input_ids"]), item.max_tokens)
        results.append({"text": texts[i], "batch_size": len(items), "prompt_tokens": prompt,
                        "completion_tokens": completion, "total_tokens": prompt + completion,
                        "truncated": completion >= item.max_tokens})
    return results


def answer_isolated(engine: HFEngine, image_tokens: int | None, items: list[VQAItem]) -> list[dict[str, Any] | APIError]:
    """``answer_items``, where a request the model cannot take fails alone instead of with its batch.

    A batch that fails is answered again one request at a time. A request that still fails, while the
    engine answers its batch-mates or a known-good probe, is that request's 422 (an ``APIError`` in its
    place in the list). Only an engine that answers nothing raises: that is the replica's failure, the
    one its health check should count. Same single-thread rule as ``answer_items``.
    """
    try:
        return answer_items(engine, image_tokens, items)
    except Exception as exc:  # noqa: BLE001 - which request (or the engine) is at fault is found below
        log.warning("a batch of %d failed (%s); answering its requests one at a time", len(items),
                    type(exc).__name__)
        results = [exc] if len(items) == 1 else [_answer_alone(engine, image_tokens, item) for item in items]
    if all(isinstance(r, Exception) for r in results):
        _probe(engine, image_tokens)
    failed = [type(r).__name__ for r in results if isinstance(r, Exception)]
    log.warning("%d of %d requests could not be answered (%s)", len(failed), len(items), ", ".join(failed))
    return [APIError(422, "the model could not process this request's input", "unprocessable_input")
            if isinstance(r, Exception) else r for r in results]


def _answer_alone(engine: HFEngine, image_tokens: int | None, item: VQAItem) -> dict[str, Any] | Exception:
    try:
        return answer_items(engine, image_tokens, [item])[0]
    except Exception as exc:  # noqa: BLE001 - this request's result; answer_isolated decides what it means
        return exc


def _probe(engine: HFEngine, image_tokens: int | None) -> None:
    """One known-good request; raises when the engine fails on it too (lost GPU, broken weights)."""
    probe = VQAItem(Image.new("RGB", (32, 32), (128, 128, 128)), "Is this image blank?", 1)
    try:
        answer_items(engine, image_tokens, [probe])
    except Exception as exc:
        raise RuntimeError(f"the engine fails on a known-good request too ({type(exc).__name__})") from exc


def _usage(result: dict[str, Any]) -> dict[str, int]:
    return {k: result[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens", "batch_size")}


def vqa_response(result: dict[str, Any], model_name: str, latency_ms: float) -> dict[str, Any]:
    """The /v1/vqa answer body."""
    return {"id": f"vqa-{uuid.uuid4().hex}", "answer": result["text"], "model": model_name,
            "usage": _usage(result), "latency_ms": latency_ms, "disclaimer": DISCLAIMER}


def chat_response(result: dict[str, Any], model_name: str) -> dict[str, Any]:
    """The OpenAI ``chat.completion`` body."""
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model_name, "usage": _usage(result),
            "choices": [{"index": 0, "finish_reason": "length" if result["truncated"] else "stop",
                         "message": {"role": "assistant", "content": result["text"]}}]}
