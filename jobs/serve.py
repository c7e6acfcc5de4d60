"""Serve the final model as a VQA endpoint on Ray Serve.

    ray job submit --working-dir . -- python -m jobs.serve --config jobs/configs/serve.yaml \
        model.name_or_path=/shared/runs/dpo/merged
    python -m jobs.serve --config jobs/configs/local/serve.yaml                 # tiny model, 127.0.0.1

With ``blocking: true`` (the YAML default) the job holds the endpoint up until it is stopped (Ctrl-C,
``ray job stop``), then shuts Serve down, like ``serve run``. With ``blocking: false`` ``main`` returns a
``ServeResult`` (url, routes) and leaves Serve running: tests and the pipeline send requests, then call
``result.stop()``. The API key is read here from the variable ``api_key_env`` names; only its sha256
reaches the replicas, and it is never written to ``config.yaml`` or ``summary.json``.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from actors.serve import (
    AutoscalingConfig,
    BatchingConfig,
    ReplicaConfig,
    build_app,
    build_vllm_app,
    controller_options,
)
from jobs.runtime import init_ray, run_job, stage_clock
from stmed.config import (
    ConfigError,
    ModelConfig,
    RayConfig,
    build_config,
    read_yaml,
    write_config,
)
from stmed.log import get_logger
from stmed.privacy.hosts import is_loopback_host
from stmed.runs import TIMINGS, write_summary
from stmed.serve.contract import LimitsConfig, api_key_digest

log = get_logger("stmed.jobs.serve")

HF_ROUTES = ["POST /v1/vqa", "POST /v1/chat/completions", "GET /v1/models", "GET /v1/stats", "GET /healthz"]
VLLM_ROUTES = ["POST /v1/vqa", "POST /v1/chat/completions", "POST /v1/completions", "GET /v1/models"]


@dataclass(frozen=True)
class HTTPConfig:
    host: str = "127.0.0.1"
    """Where Serve's proxy listens. Anything but loopback needs an API key (api_key_env)."""
    port: int = 8000


@dataclass(frozen=True)
class ServeConfig:
    """Serve a merged checkpoint (or the tiny preset) as a VQA endpoint."""

    output_dir: str
    model: ModelConfig
    model_name: str | None = None
    """The id clients see (``model`` in replies, ``/v1/models``); default: the preset or the folder name."""
    engine: Literal["hf", "vllm"] = "hf"
    """hf: our deployment (batched HF generate). vllm: Ray Serve LLM's OpenAI app with stmed's /v1/vqa and
    key check (``actors.vllm_ingress``); GPU, or vLLM's CPU backend with ``vllm_bundle``."""
    accelerator_type: str | None = None
    """vllm only: e.g. 'A100' to pin replicas to that GPU type."""
    vllm_engine_kwargs: dict[str, Any] = field(default_factory=dict)
    """vllm only: extra engine arguments (max_model_len, gpu_memory_utilization…), over stmed's defaults."""
    vllm_bundle: dict[str, float] | None = None
    """vllm only: one replica's placement bundle; None: one GPU. vLLM's CPU backend: ``{"CPU": 1}``."""
    http: HTTPConfig = field(default_factory=HTTPConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    autoscaling: AutoscalingConfig = field(default_factory=AutoscalingConfig)
    replica: ReplicaConfig = field(default_factory=ReplicaConfig)
    api_key_env: str | None = None
    """Environment variable holding the bearer key; when set, every /v1 request must carry it."""
    blocking: bool = True
    ray: RayConfig = field(default_factory=lambda: RayConfig(num_workers=1))

    def __post_init__(self) -> None:
        if self.engine == "vllm" and self.model.name_or_path is None:
            raise ConfigError("engine=vllm serves a merged checkpoint: set model.name_or_path")
        if not self.api_key_env and not is_loopback_host(self.http.host):
            raise ConfigError(f"http.host={self.http.host} is beyond loopback: set api_key_env to require a key")

    @property
    def served_name(self) -> str:
        if self.model_name:
            return self.model_name
        return f"stmed-{self.model.preset}" if self.model.preset else Path(self.model.name_or_path).name


def read_api_key(cfg: ServeConfig) -> str | None:
    """The key's sha256 (the key itself stays in this process), or None when auth is off."""
    if not cfg.api_key_env:
        return None
    key = os.environ.get(cfg.api_key_env, "").strip()
    if not key:
        raise ConfigError(f"api_key_env={cfg.api_key_env}, but that environment variable is empty or unset")
    return api_key_digest(key)


@dataclass(frozen=True)
class ServeResult:
    url: str
    model_name: str
    routes: list[str]
    output_dir: Path

    def stop(self) -> None:
        """Shut the endpoint down (Serve's controller, proxies and replicas); Ray keeps running."""
        from ray import serve

        serve.shutdown()


def _build(cfg: ServeConfig, key_digest: str | None):
    if cfg.engine == "vllm":
        return build_vllm_app(cfg.model, cfg.served_name, cfg.limits, cfg.autoscaling, cfg.replica, key_digest,
                              cfg.accelerator_type, cfg.vllm_engine_kwargs, cfg.vllm_bundle)
    return build_app(cfg.model, cfg.served_name, cfg.limits, cfg.batching, cfg.autoscaling, cfg.replica,
                     key_digest)


def app_builder(args: dict[str, Any]):
    """Serve's application builder, for a RayService or ``serve run jobs.serve:app_builder``.

    ``args`` = ``{"config": FILE, "overrides": ["key=value", ...]}``, read like the command line.
    """
    cfg = build_config(ServeConfig, read_yaml(args["config"]), list(args.get("overrides", [])))
    return _build(cfg, read_api_key(cfg))


def main(cfg: ServeConfig) -> ServeResult:
    clock = stage_clock()
    key_digest = read_api_key(cfg)  # before anything starts: a missing key is a config mistake
    with clock.phase("ray_init"):
        init_ray(cfg.ray)
    from ray import serve

    with clock.phase("serve_start"):
        # controller_options: the proxies answer a dead replica's in-flight requests in the JSON error shape.
        serve.start(http_options={"host": cfg.http.host, "port": cfg.http.port},
                    controller_options=controller_options())
    with clock.phase("deploy"):
        serve.run(_build(cfg, key_digest), name="vqa", route_prefix="/")
    url = f"http://{cfg.http.host}:{cfg.http.port}"
    out = Path(cfg.output_dir)
    write_config(cfg, out)
    routes = HF_ROUTES if cfg.engine == "hf" else VLLM_ROUTES
    write_summary(out, {"url": url, "routes": routes, "model": cfg.served_name, "engine": cfg.engine,
                        "model_source": cfg.model.name_or_path or f"preset:{cfg.model.preset}",
                        "auth": bool(key_digest), "max_batch_size": cfg.batching.max_batch_size,
                        "started_at": time.time(), TIMINGS: clock.block()})
    log.info("VQA endpoint for %s at %s (%s)", cfg.served_name, url, ", ".join(routes))
    result = ServeResult(url, cfg.served_name, routes, out)
    if cfg.blocking:
        _wait_then_stop(result)
    return result


def _wait_then_stop(result: ServeResult) -> None:
    # `ray job stop` sends SIGTERM: turn it into SystemExit so the finally below still shuts Serve down.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log.info("interrupted")
    finally:
        result.stop()


if __name__ == "__main__":
    run_job(main, ServeConfig)
