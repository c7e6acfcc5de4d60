"""The VQA endpoint: a Ray Serve deployment around the HF engine, with dynamic batching.

Routes (all JSON; errors are ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status for bad
input):

- ``POST /v1/vqa`` — multipart (``image`` file: JPEG/PNG/TIFF/BMP/DICOM, ``question``, optional
  ``max_tokens``) or JSON ``{"image_base64", "question", "max_tokens"}``; answers
  ``{id, answer, model, usage: {prompt_tokens, completion_tokens, total_tokens, batch_size}, latency_ms,
  disclaimer}``;
- ``POST /v1/chat/completions`` — the OpenAI shape, so the ``openai`` SDK is a client: one image as a
  ``data:image/...;base64,`` URL in the user content, the question as its text; ``model`` must be the
  served name (else 404 ``model_not_found``); decoding is always greedy, though ``temperature`` and
  ``top_p`` must still be in range;
- ``GET /v1/models``, ``GET /v1/stats`` (batch sizes this replica ran), ``GET /healthz`` (no key needed).

Concurrent requests meet in ``@serve.batch`` and run as one ``generate`` call per distinct ``max_tokens``,
off the event loop so requests keep arriving (and queueing for the next batch) while one runs.
A request the model cannot take fails alone (422), its batch-mates are answered, and only an engine
that answers nothing counts towards the health check. A body is read within ``limits.body_timeout_s``
(408), outside the ``max_ongoing_requests`` that may be parsed and answered at once: Serve hands a
request to the replica as soon as its headers arrive, so a stalled upload holds one of Serve's slots
until then, and ``replica.upload_slots`` extra slots keep ``/healthz`` and answers reachable meanwhile.
When a replica dies mid-request, Serve's proxy (not this code) answers; ``PROXY_ENV`` makes that answer
the same JSON error shape (``stmed.serve.errors.JSONErrors``): pass ``controller_options()`` to
``serve.start``. The API key never enters Serve: the replica holds only its sha256 and compares digests.
Logs carry ids, sizes and timings, never images, questions or keys. ``build_vllm_app`` serves the same
merged checkpoint on vLLM instead, through Ray's OpenAI app with these routes' ``/v1/vqa`` and key check
added (``actors.vllm_ingress``; no ``/v1/stats`` or ``/healthz`` there). What a request
may carry, how it is parsed and answered, and the error shapes are Ray-free, in ``stmed.serve.contract``
and ``stmed.serve.errors``; this module is the Serve shell around them.
"""

# No `from __future__ import annotations` here, and everything the deployment uses is defined above it:
# `@serve.deployment` pickles the class by value while this module is still half-imported, so the replica
# sees only the globals its methods name in code. String annotations would not resolve there, and FastAPI
# would take `request: Request` for a required query parameter.
import asyncio
import ipaddress
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from stmed.config import ConfigError, ModelConfig
from stmed.log import get_logger
from stmed.model import prompts
from stmed.model.build import checkpoint_chat, load_model
from stmed.model.generate import HFEngine
from stmed.serve.contract import (
    LimitsConfig,
    VQAItem,
    answer_isolated,
    authorize,
    chat_item,
    chat_response,
    read_body,
    vqa_item,
    vqa_response,
)
from stmed.serve.errors import APIError, install_error_handlers

log = get_logger("stmed.serve")

_FAILURES_BEFORE_UNHEALTHY = 3

# Ray Serve's proxy reads this at start-up and wraps its ASGI app in what the callback returns; the
# proxy inherits the Serve controller's environment (``controller_options``).
PROXY_ENV = {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "stmed.serve.errors:proxy_middlewares"}


def controller_options() -> dict[str, Any]:
    """``serve.start(controller_options=...)``: the proxy answers a dead replica's requests in JSON."""
    return {"runtime_env": {"env_vars": dict(PROXY_ENV)}}


@dataclass(frozen=True)
class BatchingConfig:
    """Dynamic batching: a batch runs when full or when the oldest request has waited this long."""

    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.02

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.batch_wait_timeout_s < 0:
            raise ConfigError("batching.max_batch_size must be >= 1 and batching.batch_wait_timeout_s >= 0")


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
    """Requests parsed and answered at once. Must be >= batching.max_batch_size, or a batch never fills."""
    upload_slots: int = 128
    """Serve slots beyond max_ongoing_requests for requests still sending their body: a stalled upload
    holds one until limits.body_timeout_s (then 408) without starving /healthz or answers."""

    def __post_init__(self) -> None:
        if self.max_ongoing_requests < 1 or self.upload_slots < 0:
            raise ConfigError("replica: need max_ongoing_requests >= 1 and upload_slots >= 0")


app = FastAPI(title="stmed VQA", docs_url=None, redoc_url=None, openapi_url=None)
install_error_handlers(app)


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


@serve.deployment(name="VQA")
@serve.ingress(app)
class VQADeployment:
    """One replica: a model, an HF engine, and the routes above."""

    def __init__(self, model: ModelConfig, model_name: str, limits: LimitsConfig, batching: BatchingConfig,
                 api_key_sha256: str | None = None, device: str = "cpu", max_answering: int = 32):
        _keep_replica_grpc_on_loopback()
        hf_model, processor = load_model(model)
        self.engine = HFEngine(hf_model, processor, device=device, batch_size=batching.max_batch_size)
        self.model_name, self.limits, self.key_digest = model_name, limits, api_key_sha256
        self.specials = list(processor.tokenizer.all_special_tokens)
        self.image_tokens = None  # counted per image by the processor (Qwen2.5-VL: it depends on the size)
        self.batch_sizes: Counter[int] = Counter()
        self.failures = 0  # consecutive failed batches; a broken engine (lost GPU) makes the replica unhealthy
        # Requests past their body read: bounds the decoded images in memory, as max_ongoing_requests did.
        self.answering = asyncio.Semaphore(max_answering)
        self._answer_batch.set_max_batch_size(batching.max_batch_size)
        self._answer_batch.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)
        log.info("serving %s on %s (max batch %d, auth %s)", model_name, device, batching.max_batch_size,
                 "on" if api_key_sha256 else "off")

    def check_health(self) -> None:
        if self.failures >= _FAILURES_BEFORE_UNHEALTHY:
            raise APIError(503, f"the last {self.failures} batches failed; the engine looks broken", "unavailable")

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)
    async def _answer_batch(self, items: list[VQAItem]) -> list[dict[str, Any] | APIError]:
        """One result (or one request's own APIError) per item; the limits here are replaced in ``__init__``."""
        self.batch_sizes[len(items)] += 1
        try:
            # Off the event loop: requests keep arriving (and queue for the next batch) while this runs.
            results = await asyncio.to_thread(answer_isolated, self.engine, self.image_tokens, items)
        except Exception:  # the engine answered nothing, not even a probe: that is this replica failing
            self.failures += 1
            raise
        self.failures = 0
        return results

    async def _answer(self, parse: Callable[[], Awaitable[VQAItem]]) -> dict[str, Any]:
        """Parse (``parse()`` -> VQAItem) and answer within the answering slots; a request's own error raises."""
        async with self.answering:
            result = await self._answer_batch(await parse())
        if isinstance(result, APIError):
            raise result
        return result

    @app.post("/v1/vqa")
    async def vqa(self, request: Request) -> JSONResponse:
        start = time.perf_counter()
        authorize(request, self.key_digest)
        body = await read_body(request, self.limits)  # before the slots: a slow upload holds none of them
        result = await self._answer(lambda: vqa_item(request, body, self.limits, self.specials))
        latency_ms = round((time.perf_counter() - start) * 1000, 1)
        log.debug("vqa: batch %d, %d new tokens, %.0f ms", result["batch_size"], result["completion_tokens"],
                  latency_ms)
        return JSONResponse(vqa_response(result, self.model_name, latency_ms),
                            headers={"x-stmed-batch-size": str(result["batch_size"])})

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> JSONResponse:
        authorize(request, self.key_digest)
        body = await read_body(request, self.limits)
        result = await self._answer(lambda: chat_item(body, self.limits, self.specials, self.model_name))
        return JSONResponse(chat_response(result, self.model_name),
                            headers={"x-stmed-batch-size": str(result["batch_size"])})

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        authorize(request, self.key_digest)
        return {"object": "list",
                "data": [{"id": self.model_name, "object": "model", "created": 0, "owned_by": "stmed"}]}

    @app.get("/v1/stats")
    async def stats(self, request: Request) -> dict[str, Any]:
        """This replica's batches so far: ``{size: count}``."""
        authorize(request, self.key_digest)
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
        max_ongoing_requests=replica.max_ongoing_requests + replica.upload_slots,
        ray_actor_options={"num_cpus": replica.num_cpus, "num_gpus": replica.num_gpus},
    ).bind(model, model_name, limits, batching, api_key_sha256, "cuda" if replica.num_gpus > 0 else "cpu",
           replica.max_ongoing_requests)


def build_vllm_app(model: ModelConfig, model_name: str, limits: LimitsConfig, autoscaling: AutoscalingConfig,
                   replica: ReplicaConfig, api_key_sha256: str | None = None, accelerator_type: str | None = None,
                   engine_kwargs: dict[str, Any] | None = None, bundle: dict[str, float] | None = None):
    """The merged checkpoint ``model.name_or_path`` on vLLM: Ray Serve LLM's OpenAI app (``/v1/chat/completions``,
    ``/v1/models``…) with stmed's ``/v1/vqa`` and bearer-key check in its router (``actors.vllm_ingress``).

    Run on vLLM's CPU backend in the tests (``bundle={"CPU": 1}`` places a replica on CPUs instead of a
    GPU); nothing GPU-specific is verified. Merged weights only: vLLM applies LoRA to the language model
    alone, and Ray's builder rejects local LoRA paths. ``engine_kwargs`` extend or override
    :func:`vllm_engine_kwargs`. ``replica.max_ongoing_requests`` bounds both the engine's sequences and the
    ``/v1/vqa`` requests decoded at once; the router takes ``replica.num_cpus``.
    """
    from ray.serve.llm import LLMConfig  # imports vLLM

    from actors.vllm_ingress import build_ingress

    model_path = model.name_or_path
    llm_config = LLMConfig(
        model_loading_config={"model_id": model_name, "model_source": model_path},
        accelerator_type=accelerator_type,
        **({"placement_group_config": {"bundles": [bundle]}} if bundle else {}),
        deployment_config={
            "autoscaling_config": {"min_replicas": autoscaling.min_replicas,
                                   "max_replicas": autoscaling.max_replicas,
                                   "target_ongoing_requests": autoscaling.target_ongoing_requests},
            "max_ongoing_requests": replica.max_ongoing_requests,
        },
        engine_kwargs={**vllm_engine_kwargs(model.dtype, replica, checkpoint_chat(model_path), model_path),
                       **(engine_kwargs or {})},
    )  # fmt: skip
    return build_ingress(llm_config, model, limits, replica.max_ongoing_requests, replica.num_cpus, api_key_sha256)


# The one domain vLLM may fetch images from when serving: a reserved name (RFC 2606) that never resolves.
REMOTE_IMAGES_REFUSED = "remote-images-refused.invalid"


def vllm_engine_kwargs(dtype: str, replica: ReplicaConfig, chat: prompts.ChatFormat = prompts.VICUNA,
                       model_path: str | None = None) -> dict[str, Any]:  # fmt: skip
    """vLLM's engine and frontend arguments for the endpoint, the prompt renderer among them.

    vLLM renders chat messages with a chat template; the checkpoint's own would drop the system prompt
    the model was tuned with. ``prompts.serving_chat_template`` renders a request exactly as the HF
    endpoint's ``prompts.answer_prompt`` does (the tokenizer's BOS included: vLLM's chat endpoint adds no
    special tokens), and the "openai" content format hands it the message parts as they came (vLLM's own
    detection could flatten them and add a second ``<image>``). ``chat`` is the checkpoint family's format
    (``stmed.model.build.checkpoint_chat``). With ``model_path``: the engine defaults every stmed vLLM
    engine takes (``actors.vllm_generator.engine_defaults``: the family's one image and no video, a
    ``max_model_len`` instead of Qwen2.5-VL's 128k, no generation_config.json defaults). vLLM's request
    log stays off: it would print prompts and image data. Remote image URLs are refused, as on the HF
    endpoint: vLLM would fetch any http(s) URL a chat request names (its empty allow-list allows every
    domain), so the list holds one name that cannot exist.
    """
    defaults = {"limit_mm_per_prompt": {"image": 1}}
    if model_path is not None:
        from actors.vllm_generator import engine_defaults

        defaults = engine_defaults(model_path)
    return {"dtype": dtype, "trust_remote_code": False, **defaults, "max_num_seqs": replica.max_ongoing_requests,
            "chat_template": prompts.serving_chat_template(chat=chat), "chat_template_content_format": "openai",
            "enable_log_requests": False, "allowed_media_domains": [REMOTE_IMAGES_REFUSED]}
