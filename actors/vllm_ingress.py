"""The vLLM endpoint's front door: Ray Serve LLM's OpenAI router with stmed's ``/v1/vqa`` and bearer key.

Ray's ``build_openai_app`` binds an ``OpenAiIngress`` (FastAPI: ``/v1/chat/completions``, ``/v1/models``…)
to an ``LLMServer`` deployment that holds the vLLM engine. :func:`build_ingress` binds the same two, with
:class:`VQAIngress` (``OpenAiIngress`` plus one route) in front:

- ``POST /v1/vqa`` takes what the HF endpoint takes (multipart ``image`` file — JPEG/PNG/TIFF/BMP/DICOM —
  and ``question``, or JSON ``image_base64``), parsed and checked by the same ``stmed.serve.contract``
  code: body size and deadline, question, ``max_tokens``, image size and aspect before decoding. The
  decoded pixels, re-encoded as a PNG data URL (no DICOM tag, no EXIF survives), go to the LLM
  deployment as a greedy chat request, which vLLM renders with the served chat template: the prompt
  training and the HF endpoint use. The answer body is the HF endpoint's, but ``usage.batch_size`` is
  null (vLLM batches continuously; no batch belongs to one request).
- every ``/v1`` route checks ``Authorization: Bearer <key>`` against the key's sha256 when one is set
  (:class:`BearerKey`, before a body is read), and refusals, unknown routes and validation errors leave
  in stmed's error shape (``stmed.serve.errors``); the chat route's own engine errors keep Ray's shape
  (the same ``{"error": {"message", "type", "param", "code"}}`` keys).

Logs carry statuses, sizes and timings, never images, questions or keys; vLLM's request logging stays
off (``enable_log_requests``, Ray's default). Imported only when a vLLM app is built: it imports vLLM.
"""

# No `from __future__ import annotations`: FastAPI reads `request: Request` from the route's signature.
import asyncio
import time
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.llm._internal.serve.constants import DEFAULT_LLM_ROUTER_HTTP_TIMEOUT
from ray.llm._internal.serve.core.configs.openai_api_models import ErrorResponse, to_model_metadata
from ray.llm._internal.serve.core.ingress.ingress import DEFAULT_ENDPOINTS, init
from ray.serve.llm import LLMConfig, build_llm_deployment
from ray.serve.llm.ingress import OpenAiIngress, make_fastapi_ingress
from ray.serve.llm.openai_api_models import ChatCompletionRequest
from starlette.types import ASGIApp, Receive, Scope, Send

from stmed.config import ModelConfig
from stmed.data.images import image_to_data_url
from stmed.log import get_logger
from stmed.model.build import load_processor
from stmed.model.generate import clean_output
from stmed.serve.contract import LimitsConfig, VQAItem, authorize, read_body, vqa_item, vqa_response
from stmed.serve.errors import APIError, error_response, install_error_handlers

log = get_logger("stmed.serve")


class BearerKey:
    """Pure ASGI middleware: every ``/v1`` request carries the bearer key whose sha256 is ``key_digest``,
    or is answered 401 here, before the router reads its body or validates it."""

    def __init__(self, app: ASGIApp, key_digest: str):
        self.app, self.key_digest = app, key_digest

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            try:
                authorize(Request(scope), self.key_digest)
            except APIError as err:
                await error_response(err.status, err.message, err.type)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class VQAIngress(OpenAiIngress):
    """Ray's OpenAI router, plus ``/v1/vqa`` answered through the same LLM deployment handle."""

    def __init__(self, llm_deployments: dict, model_cards: dict, *, model: ModelConfig, model_name: str,
                 limits: LimitsConfig, max_answering: int, lora_paths: dict | None = None):
        from actors.serve import _keep_replica_grpc_on_loopback

        _keep_replica_grpc_on_loopback()
        super().__init__(llm_deployments, model_cards, lora_paths=lora_paths)
        # The tokenizer only: its special tokens are stripped from questions and answers, as on HF.
        self.tokenizer = load_processor(model).tokenizer
        self.specials = list(self.tokenizer.all_special_tokens)
        self.model_name, self.limits = model_name, limits
        # Requests past their body read: bounds the decoded images in memory, as on the HF endpoint.
        self.answering = asyncio.Semaphore(max_answering)

    async def vqa(self, request: Request) -> JSONResponse:
        start = time.perf_counter()
        body = await read_body(request, self.limits)  # before the slots: a slow upload holds none of them
        async with self.answering:
            item = await vqa_item(request, body, self.limits, self.specials)
            result = await self._ask(item)
        latency_ms = round((time.perf_counter() - start) * 1000, 1)
        log.debug("vqa: %d new tokens, %.0f ms", result["completion_tokens"], latency_ms)
        return JSONResponse(vqa_response(result, self.model_name, latency_ms))

    async def _ask(self, item: VQAItem) -> dict[str, Any]:
        """One greedy chat request to the LLM deployment; its answer decoded and cleaned as on HF."""
        url = await asyncio.to_thread(image_to_data_url, item.image)
        # return_token_ids: the answer is decoded from the ids as the HF engine decodes its own (vLLM's
        # incremental detokenizer holds back an incomplete UTF-8 sequence at the end, where HF prints U+FFFD).
        chat = ChatCompletionRequest(model=self.model_name, max_tokens=item.max_tokens, temperature=0.0,
                                     stream=False, return_token_ids=True, messages=[{"role": "user", "content": [
                                         {"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": item.question}]}])  # fmt: skip
        responses = self._get_response(body=chat, call_method="chat")
        try:
            async with asyncio.timeout(DEFAULT_LLM_ROUTER_HTTP_TIMEOUT):
                response = await anext(responses)
        except TimeoutError:
            raise APIError(408, "the model did not answer in time", "request_timeout") from None
        except Exception as exc:  # noqa: BLE001 - a dead or failing LLM replica; its message may quote input
            log.error("vqa: the LLM deployment failed (%s)", type(exc).__name__)
            raise APIError(500, "internal error: the model failed on this request; retry", "server_error") from None
        finally:
            await responses.aclose()
        if isinstance(response, list):  # Ray's batched stream output; one element for a non-streamed request
            response = response[0]
        if isinstance(response, ErrorResponse):
            log.warning("vqa: the engine refused a request (%s %s)", response.error.code, response.error.type)
            if response.error.code >= 500:
                raise APIError(500, "internal error: the model failed on this request; retry", "server_error")
            raise APIError(422, "the model could not process this request's input", "unprocessable_input")
        choice, usage = response.choices[0], response.usage
        text = (self.tokenizer.decode(choice.token_ids, skip_special_tokens=False) if choice.token_ids is not None
                else choice.message.content or "")
        return {"text": clean_output(text, self.tokenizer), "batch_size": None,
                "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                "total_tokens": usage.total_tokens, "truncated": choice.finish_reason == "length"}


def build_ingress(llm_config: LLMConfig, model: ModelConfig, limits: LimitsConfig, max_answering: int,
                  num_cpus: float, api_key_sha256: str | None):
    """The LLM deployment of ``llm_config`` behind :class:`VQAIngress`: ``build_openai_app``'s graph with
    ``/v1/vqa`` and the key check added (the router takes ``num_cpus``; Ray's default is a whole CPU)."""
    app = init()  # Ray's router app: its middlewares (request ids, metrics, exception handling)
    install_error_handlers(app)
    if api_key_sha256:
        app.add_middleware(BearerKey, key_digest=api_key_sha256)  # outermost: runs before Ray's
    ingress_cls = make_fastapi_ingress(VQAIngress, app=app,
                                       endpoint_map={**DEFAULT_ENDPOINTS, "vqa": lambda a: a.post("/v1/vqa")})
    options = VQAIngress.get_deployment_options([llm_config])
    options["ray_actor_options"] = {"num_cpus": num_cpus}
    name = llm_config.model_id
    return serve.deployment(ingress_cls, **options).bind(
        llm_deployments={name: build_llm_deployment(llm_config)},
        model_cards={name: to_model_metadata(name, llm_config)},
        model=model, model_name=name, limits=limits, max_answering=max_answering)
