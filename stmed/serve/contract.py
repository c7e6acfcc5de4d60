"""The VQA endpoint's HTTP contract, without Ray: request limits, parsing, answers and error shapes.

``actors.serve.VQADeployment`` is a thin Ray Serve shell around these functions. A request is checked
cheapest first (size, question, ``max_tokens``) and only then is its image decoded, so bad input costs
little and always ends as a 4xx ``{"error": {"message", "type"}}`` (:class:`APIError`), never a 500.
Images arrive as a multipart file (JPEG/PNG/TIFF/BMP/DICOM), bare base64, or a ``data:image/...;base64,``
URL (the OpenAI ``image_url`` part); this server fetches nothing, so http(s) URLs are refused. Error
messages never quote request content, and nothing here logs images, questions or keys.
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

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from stmed.config import ConfigError
from stmed.data.images import DICOM_SUFFIXES, ImageLoadError, decode_image
from stmed.log import get_logger
from stmed.model import prompts
from stmed.model.generate import HFEngine, Sampling, answer

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
    max_question_chars: int = 2000
    """Longest question -> 422."""
    max_tokens: int = 512
    """Largest ``max_tokens`` a request may ask for -> 422."""
    default_max_tokens: int = 128
    allow_remote_images: bool = False
    """http(s) image URLs are refused either way (this server fetches nothing); the flag only changes why."""

    def __post_init__(self) -> None:
        for name in ("max_upload_bytes", "max_image_pixels", "max_question_chars", "max_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"limits.{name} must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.default_max_tokens <= self.max_tokens:
            raise ConfigError(f"limits.default_max_tokens must be in [1, limits.max_tokens={self.max_tokens}]")

    @property
    def max_body_bytes(self) -> int:
        # base64 grows the image by 4/3; the rest is form fields and JSON keys.
        return self.max_upload_bytes * 4 // 3 + 64 * 1024


# ----------------------------------------------------------------------------- errors


class APIError(Exception):
    """A request we refuse: becomes ``{"error": {...}}`` with ``status``."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type_


def error_response(status: int, message: str, type_: str) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"error": {"message": message, "type": type_}}, status_code=status, headers=headers)


async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.type)


async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error_response(exc.status_code, str(exc.detail), "invalid_request_error")


async def _server_error(_: Request, exc: Exception) -> JSONResponse:
    # A bug or a broken engine, never bad input. The type only: messages may quote request content.
    log.error("request failed: %s", type(exc).__name__)
    return error_response(500, "internal error", "server_error")


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    where = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:3])  # no inputs echoed
    return error_response(422, f"invalid request: {where}", "invalid_request_error")


def install_error_handlers(app: FastAPI) -> None:
    """Every failure as ``{"error": {"message", "type"}}``: refusals, HTTP errors, validation, bugs (500)."""
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _server_error)
    app.add_exception_handler(RequestValidationError, _validation_error)


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
    """The request body, refused with 413 as soon as it outgrows the limit (Content-Length or streamed)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise APIError(413, f"request body over {limits.max_body_bytes} bytes", "request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limits.max_body_bytes:
            raise APIError(413, f"request body over {limits.max_body_bytes} bytes", "request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def check_question(value: Any, limits: LimitsConfig, specials: list[str]) -> str:
    if not isinstance(value, str):
        raise APIError(422, "'question' must be a string")
    for token in specials:  # '<image>' or '</s>' in user text would break the prompt's structure
        value = value.replace(token, " ")
    value = " ".join(value.split())
    if not value:
        raise APIError(422, "'question' is empty")
    if len(value) > limits.max_question_chars:
        raise APIError(422, f"'question' is longer than {limits.max_question_chars} characters")
    return value


def check_max_tokens(value: Any, limits: LimitsConfig) -> int:
    if value is None:
        return limits.default_max_tokens
    if isinstance(value, str) and value.strip().isdigit():  # form fields arrive as text
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limits.max_tokens:
        raise APIError(422, f"'max_tokens' must be an integer in [1, {limits.max_tokens}], got {value!r}")
    return value


def decode_upload(data: bytes, name: str, limits: LimitsConfig) -> Image.Image:
    """Bytes -> RGB image; ImageLoadError becomes 413 (too big) or 400 (corrupt, unsupported)."""
    if len(data) > limits.max_upload_bytes:
        raise APIError(413, f"image over {limits.max_upload_bytes} bytes", "image_too_large")
    try:
        return decode_image(data, name, max_pixels=limits.max_image_pixels)
    except ImageLoadError as err:
        if err.reason.startswith("too many pixels"):
            raise APIError(413, f"image has {err.reason}", "image_too_large") from None
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
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise APIError(400, f"body is not valid JSON: {err}", "invalid_json") from None
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


async def vqa_item(request: Request, limits: LimitsConfig, specials: list[str]) -> VQAItem:
    """Parse a /v1/vqa body; the cheap checks (question, max_tokens) run before the image is decoded."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await read_body(request, limits)
    if content_type == "application/json":
        data = parse_json(body)
        unknown = set(data) - {"image_base64", "question", "max_tokens"}
        if unknown:
            raise APIError(422, f"unknown field(s) {sorted(unknown)}")
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


async def chat_item(request: Request, limits: LimitsConfig, specials: list[str]) -> VQAItem:
    """Parse an OpenAI /v1/chat/completions body: one image and its question, greedy, no streaming."""
    data = parse_json(await read_body(request, limits))
    if data.get("stream"):
        raise APIError(400, "streaming is not supported; send stream=false")
    if data.get("n") not in (None, 1):
        raise APIError(400, "only n=1 is supported")
    text, url = chat_parts(data.get("messages"))
    question = check_question(text, limits, specials)
    max_tokens = check_max_tokens(data.get("max_completion_tokens", data.get("max_tokens")), limits)
    image = await asyncio.to_thread(image_from_base64, url, limits)
    return VQAItem(image, question, max_tokens)


# ----------------------------------------------------------------------------- answers


def answer_items(engine: HFEngine, image_tokens: int, items: list[VQAItem]) -> list[dict[str, Any]]:
    """Greedy answers, one ``generate`` call per distinct ``max_tokens`` (usually one), with token counts.

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
        # The prompt's one <image> token stands for image_tokens embeddings.
        prompt = len(tokenizer(prompts.answer_prompt(item.question))["input_ids"]) - 1 + image_tokens
        # HFEngine returns cleaned text, not ids: re-tokenising it is close; capped at what was allowed.
        completion = min(len(tokenizer(texts[i], add_special_tokens=False)["input_ids"]), item.max_tokens)
        results.append({"text": texts[i], "batch_size": len(items), "prompt_tokens": prompt,
                        "completion_tokens": completion, "total_tokens": prompt + completion,
                        "truncated": completion >= item.max_tokens})
    return results


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
