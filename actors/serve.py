"""The VQA endpoint: a Ray Serve deployment around the HF engine, with dynamic batching.

Routes (all JSON; errors are ``{"error": {"message", "type"}}`` with a 4xx status for bad input):

- ``POST /v1/vqa`` — multipart (``image`` file: JPEG/PNG/TIFF/BMP/DICOM, ``question``, optional
  ``max_tokens``) or JSON ``{"image_base64", "question", "max_tokens"}``; answers
  ``{id, answer, model, usage: {prompt_tokens, completion_tokens, total_tokens, batch_size}, latency_ms,
  disclaimer}``;
- ``POST /v1/chat/completions`` — the OpenAI shape, so the ``openai`` SDK is a client: one image as a
  ``data:image/...;base64,`` URL in the user content, the question as its text; decoding is always greedy;
- ``GET /v1/models``, ``GET /v1/stats`` (batch sizes this replica ran), ``GET /healthz`` (no key needed).

Concurrent requests meet in ``@serve.batch`` and run as one ``generate`` call per distinct ``max_tokens``,
off the event loop so requests keep arriving (and queueing for the next batch) while one runs.
The API key never enters Serve: the replica holds only its sha256 and compares digests. Logs carry ids,
sizes and timings, never images, questions or keys. On GPU, ``build_vllm_app`` serves the same merged
checkpoint through Ray's OpenAI app instead (vLLM; see its docstring).
"""

# No `from __future__ import annotations` here, and everything the deployment uses is defined above it:
# `@serve.deployment` pickles the class by value while this module is still half-imported, so the replica
# sees only the globals its methods name in code. String annotations would not resolve there, and FastAPI
# would take `request: Request` for a required query parameter.
import asyncio
import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from stmed import prompts
from stmed.config import ConfigError, ModelConfig
from stmed.generation import HFEngine, Sampling, answer
from stmed.images import DICOM_SUFFIXES, ImageLoadError, decode_image
from stmed.log import get_logger
from stmed.model import image_seq_len, load_model

log = get_logger("stmed.serve")

DISCLAIMER = ("Research model output for evaluation only; it is not medical advice and must not be used "
              "for diagnosis or treatment.")
_FAILURES_BEFORE_UNHEALTHY = 3


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


@dataclass(frozen=True)
class BatchingConfig:
    """Dynamic batching: a batch runs when full or when the oldest request has waited this long."""

    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.02

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.batch_wait_timeout_s < 0:
            raise ConfigError("batching.max_batch_size must be >= 1 and batching.batch_wait_timeout_s >= 0")


class APIError(Exception):
    """A request we refuse: becomes ``{"error": {...}}`` with ``status``."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type_


def _error(status: int, message: str, type_: str) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"error": {"message": message, "type": type_}}, status_code=status, headers=headers)


app = FastAPI(title="stmed VQA", docs_url=None, redoc_url=None, openapi_url=None)


@app.exception_handler(APIError)
async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return _error(exc.status, exc.message, exc.type)


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return _error(exc.status_code, str(exc.detail), "invalid_request_error")


@app.exception_handler(Exception)
async def _server_error(_: Request, exc: Exception) -> JSONResponse:
    # A bug or a broken engine, never bad input. The type only: messages may quote request content.
    log.error("request failed: %s", type(exc).__name__)
    return _error(500, "internal error", "server_error")


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    where = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:3])  # no inputs echoed
    return _error(422, f"invalid request: {where}", "invalid_request_error")


# ----------------------------------------------------------------------------- request parsing


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


def api_key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _keep_replica_grpc_on_loopback() -> None:
    """On a loopback-only node, make this replica's internal gRPC server listen on 127.0.0.1 too.

    Ray Serve 2.60 replicas open an inter-deployment gRPC server on ``[::]:0`` — every interface —
    right after the user ``__init__`` returns (``replica.py``, ``_on_initialized``), whatever the
    node's IP. Peers dial it at the node IP, which is 127.0.0.1 here, so loopback loses nothing.
    Left alone on a real cluster node, where peers on other hosts need it.
    """
    import ray
    from ray.serve._private import replica as replica_module

    if not ipaddress.ip_address(ray.util.get_node_ip_address()).is_loopback:
        return
    original = replica_module.add_port_to_grpc_server
    if getattr(original, "loopback_only", False):
        return

    def add_port_on_loopback(server: Any, address: str) -> int:
        return original(server, address.replace("[::]", "127.0.0.1"))

    add_port_on_loopback.loopback_only = True
    replica_module.add_port_to_grpc_server = add_port_on_loopback


# ----------------------------------------------------------------------------- the deployment


@dataclass(frozen=True)
class AutoscalingConfig:
    """Serve's replica autoscaling: replicas grow when each has more than the target in flight."""

    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 16.0

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ConfigError("autoscaling: need 0 <= min_replicas <= max_replicas and max_replicas >= 1")


@dataclass(frozen=True)
class ReplicaConfig:
    """What one replica reserves, and how many requests it accepts at once."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    """> 0 puts the model on CUDA."""
    max_ongoing_requests: int = 32
    """Must be >= batching.max_batch_size, or a batch can never fill."""


@serve.deployment(name="VQA")
@serve.ingress(app)
class VQADeployment:
    """One replica: a model, an HF engine, and the routes above."""

    def __init__(self, model: ModelConfig, model_name: str, limits: LimitsConfig, batching: BatchingConfig,
                 api_key_sha256: str | None = None, device: str = "cpu"):
        _keep_replica_grpc_on_loopback()
        hf_model, processor = load_model(model)
        self.engine = HFEngine(hf_model, processor, device=device, batch_size=batching.max_batch_size)
        self.model_name, self.limits, self.key_digest = model_name, limits, api_key_sha256
        self.tokenizer = processor.tokenizer
        self.specials = list(self.tokenizer.all_special_tokens)
        self.image_tokens = image_seq_len(processor)
        self.batch_sizes: Counter[int] = Counter()
        self.failures = 0  # consecutive failed batches; a broken engine (lost GPU) makes the replica unhealthy
        self._answer_batch.set_max_batch_size(batching.max_batch_size)
        self._answer_batch.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)
        log.info("serving %s on %s (max batch %d, auth %s)", model_name, device, batching.max_batch_size,
                 "on" if api_key_sha256 else "off")

    def check_health(self) -> None:
        if self.failures >= _FAILURES_BEFORE_UNHEALTHY:
            raise APIError(503, f"the last {self.failures} batches failed; the engine looks broken", "unavailable")

    # -- batching

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)
    async def _answer_batch(self, items: list[VQAItem]) -> list[dict[str, Any]]:
        """One result per item; the batch limits set here are replaced from config in ``__init__``."""
        self.batch_sizes[len(items)] += 1
        try:
            # Off the event loop: requests keep arriving (and queue for the next batch) while this runs.
            results = await asyncio.to_thread(self._generate, items)
        except Exception:
            self.failures += 1
            raise
        self.failures = 0
        return results

    def _generate(self, items: list[VQAItem]) -> list[dict[str, Any]]:
        """Greedy answers, one ``generate`` call per distinct ``max_tokens`` (usually one), with token counts.

        All tokenizer use stays on this one thread: a Rust tokenizer shared across threads fails with
        "Already borrowed" while the processor is padding.
        """
        texts: dict[int, str] = {}
        for max_tokens in sorted({it.max_tokens for it in items}):
            idx = [i for i, it in enumerate(items) if it.max_tokens == max_tokens]
            answers = answer(self.engine, [items[i].image for i in idx], [items[i].question for i in idx],
                             Sampling(max_new_tokens=max_tokens))
            texts.update(zip(idx, answers))
        results = []
        for i, item in enumerate(items):
            # The prompt's one <image> token stands for image_tokens embeddings.
            prompt = len(self.tokenizer(prompts.answer_prompt(item.question))["input_ids"]) - 1 + self.image_tokens
            # HFEngine returns cleaned text, not ids: re-tokenising it is close; capped at what was allowed.
            completion = min(len(self.tokenizer(texts[i], add_special_tokens=False)["input_ids"]), item.max_tokens)
            results.append({"text": texts[i], "batch_size": len(items), "prompt_tokens": prompt,
                            "completion_tokens": completion, "total_tokens": prompt + completion,
                            "truncated": completion >= item.max_tokens})
        return results

    # -- routes

    def _authorize(self, request: Request) -> None:
        if self.key_digest is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", "authentication_error")
        if not hmac.compare_digest(api_key_digest(token.strip()), self.key_digest):
            raise APIError(401, "invalid API key", "authentication_error")

    async def _vqa_item(self, request: Request) -> VQAItem:
        """Parse a /v1/vqa body; the cheap checks (question, max_tokens) run before the image is decoded."""
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        body = await read_body(request, self.limits)
        if content_type == "application/json":
            data = parse_json(body)
            unknown = set(data) - {"image_base64", "question", "max_tokens"}
            if unknown:
                raise APIError(422, f"unknown field(s) {sorted(unknown)}")
            question, max_tokens = self._checked(data.get("question"), data.get("max_tokens"))
            image = await asyncio.to_thread(image_from_base64, data.get("image_base64"), self.limits)
        elif content_type == "multipart/form-data":
            form = await _replay(request, body).form(max_files=1, max_fields=4)
            upload = form.get("image")
            if upload is None or isinstance(upload, str):
                raise APIError(422, "multipart field 'image' must be a file")
            question, max_tokens = self._checked(form.get("question"), form.get("max_tokens"))
            # The suffix only matters for preamble-less DICOM; the client's file name goes nowhere else.
            name = "upload.dcm" if (upload.filename or "").lower().endswith(DICOM_SUFFIXES) else "<upload>"
            image = await asyncio.to_thread(decode_upload, await upload.read(), name, self.limits)
        else:
            raise APIError(415, "send multipart/form-data (image file + question) or application/json")
        return VQAItem(image, question, max_tokens)

    def _checked(self, question: Any, max_tokens: Any) -> tuple[str, int]:
        return check_question(question, self.limits, self.specials), check_max_tokens(max_tokens, self.limits)

    @staticmethod
    def _usage(result: dict[str, Any]) -> dict[str, int]:
        return {k: result[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens", "batch_size")}

    @app.post("/v1/vqa")
    async def vqa(self, request: Request) -> JSONResponse:
        start = time.perf_counter()
        self._authorize(request)
        result = await self._answer_batch(await self._vqa_item(request))
        latency_ms = round((time.perf_counter() - start) * 1000, 1)
        log.debug("vqa: batch %d, %d new tokens, %.0f ms", result["batch_size"], result["completion_tokens"],
                  latency_ms)
        body = {"id": f"vqa-{uuid.uuid4().hex}", "answer": result["text"], "model": self.model_name,
                "usage": self._usage(result), "latency_ms": latency_ms, "disclaimer": DISCLAIMER}
        return JSONResponse(body, headers={"x-stmed-batch-size": str(result["batch_size"])})

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> JSONResponse:
        self._authorize(request)
        data = parse_json(await read_body(request, self.limits))
        if data.get("stream"):
            raise APIError(400, "streaming is not supported; send stream=false")
        if data.get("n") not in (None, 1):
            raise APIError(400, "only n=1 is supported")
        text, url = chat_parts(data.get("messages"))
        question, max_tokens = self._checked(text, data.get("max_completion_tokens", data.get("max_tokens")))
        image = await asyncio.to_thread(image_from_base64, url, self.limits)
        result = await self._answer_batch(VQAItem(image, question, max_tokens))
        body = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model_name, "usage": self._usage(result),
                "choices": [{"index": 0, "finish_reason": "length" if result["truncated"] else "stop",
                             "message": {"role": "assistant", "content": result["text"]}}]}
        return JSONResponse(body, headers={"x-stmed-batch-size": str(result["batch_size"])})

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        return {"object": "list",
                "data": [{"id": self.model_name, "object": "model", "created": 0, "owned_by": "stmed"}]}

    @app.get("/v1/stats")
    async def stats(self, request: Request) -> dict[str, Any]:
        """This replica's batches so far: ``{size: count}``."""
        self._authorize(request)
        sizes = dict(sorted(self.batch_sizes.items()))
        return {"batches": sum(sizes.values()), "requests": sum(k * v for k, v in sizes.items()),
                "batch_sizes": {str(k): v for k, v in sizes.items()}, "largest_batch": max(sizes, default=0)}

    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        self.check_health()
        return {"status": "ok", "model": self.model_name}


def build_app(model: ModelConfig, model_name: str, limits: LimitsConfig, batching: BatchingConfig,
              autoscaling: AutoscalingConfig, replica: ReplicaConfig, api_key_sha256: str | None):
    """The bound Serve application for the HF engine, sized and scaled from config."""
    if replica.max_ongoing_requests < batching.max_batch_size:
        raise ConfigError(f"replica.max_ongoing_requests ({replica.max_ongoing_requests}) must be >= "
                          f"batching.max_batch_size ({batching.max_batch_size}), or batches never fill")
    return VQADeployment.options(
        autoscaling_config={"min_replicas": autoscaling.min_replicas, "max_replicas": autoscaling.max_replicas,
                            "target_ongoing_requests": autoscaling.target_ongoing_requests},
        max_ongoing_requests=replica.max_ongoing_requests,
        ray_actor_options={"num_cpus": replica.num_cpus, "num_gpus": replica.num_gpus},
    ).bind(model, model_name, limits, batching, api_key_sha256, "cuda" if replica.num_gpus > 0 else "cpu")


def build_vllm_app(model_path: str, model_name: str, dtype: str, autoscaling: AutoscalingConfig,
                   replica: ReplicaConfig, accelerator_type: str | None = None):
    """The merged checkpoint behind Ray Serve LLM's OpenAI app (``/v1/chat/completions``, ``/v1/models``).

    UNVERIFIED: written from Ray 2.60's ``ray.serve.llm`` source; vLLM (0.29, pinned by ray[llm] 2.60)
    cannot run on the CPU machines this was built on. Merged weights only: vLLM applies LoRA to the
    language model alone, and Ray's builder rejects local LoRA paths. That app has no ``/v1/vqa`` route
    and no API-key check of its own, which is why the job refuses an API key with this engine.
    """
    from ray.serve.llm import LLMConfig, build_openai_app  # imports vLLM

    llm_config = LLMConfig(
        model_loading_config={"model_id": model_name, "model_source": model_path},
        accelerator_type=accelerator_type,
        deployment_config={
            "autoscaling_config": {"min_replicas": autoscaling.min_replicas,
                                   "max_replicas": autoscaling.max_replicas,
                                   "target_ongoing_requests": autoscaling.target_ongoing_requests},
            "max_ongoing_requests": replica.max_ongoing_requests,
        },
        engine_kwargs={"dtype": dtype, "trust_remote_code": False, "limit_mm_per_prompt": {"image": 1},
                       "max_num_seqs": replica.max_ongoing_requests},
    )
    return build_openai_app({"llm_configs": [llm_config]})
