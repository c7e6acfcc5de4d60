"""The whole self-training run, one Ray job per stage: SFT → preferences → DPO → evaluation → endpoint.

    python -m jobs.pipeline --config jobs/configs/local/pipeline.yaml output_dir=runs/demo    # `make demo`
    python -m jobs.pipeline --config jobs/configs/pipeline.yaml ray.address=http://127.0.0.1:8265

Each stage is submitted as ``python -m jobs.<stage> --config FILE key=value …`` to a Ray head (one the
pipeline starts on 127.0.0.1, or ``ray.address``) with the repository as ``--working-dir``, so stage
config files are paths inside it. Stages hand over files only: every override names a path under
``output_dir``, absolute because a job runs in its own copy of the repository; ``output_dir`` must be
on storage that both this process and the cluster see. Outputs land in ``output_dir/<stage>/``. A stage
whose ``summary.json`` exists is skipped on a rerun; once a stage runs, every later one runs again (its
old folder is kept as ``<stage>.stale-<time>``); the first stage to run resumes from what its folder
holds. At the end: ``report.md`` (``stmed.eval.report``), one real request to the served model, and how
to query it.
"""

from __future__ import annotations

import json
import shlex
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs.submit import LocalHead, free_port, start_local_head, submit_job
from stmed.config import ConfigError, ModelConfig, load_config, write_config
from stmed.data.synthetic import SyntheticPaths, dataset_stats, make_dataset
from stmed.eval.report import ENDPOINT_REQUEST, PIPELINE_RECORD, write_report
from stmed.log import get_logger
from stmed.runs import MetricsLog, read_summary, write_json, write_summary
from stmed.serve.client import Request, ask, first_benchmark_request, snippets

log = get_logger("stmed.jobs.pipeline")

REPO = Path(__file__).resolve().parents[1]
STAGES = ("sft", "generate", "dpo", "evaluate", "serve")


class StageFailed(RuntimeError):
    """A stage's job ended FAILED or STOPPED; the message names its log."""


@dataclass(frozen=True)
class StageFiles:
    """Each stage's config file, relative to the repository root (it travels with the working dir)."""

    sft: str = "jobs/configs/local/sft.yaml"
    generate: str = "jobs/configs/local/generate.yaml"
    dpo: str = "jobs/configs/local/dpo.yaml"
    evaluate: str = "jobs/configs/local/evaluate.yaml"
    serve: str = "jobs/configs/local/serve.yaml"


@dataclass(frozen=True)
class PipelineData:
    synthetic: bool = True
    """Make the synthetic dataset once in output_dir/data and point every stage at it. False: the stage
    config files (or ``overrides``) name the real data."""
    synthetic_images: int = 120
    synthetic_seed: int = 0


@dataclass(frozen=True)
class JobsConfig:
    address: str | None = None
    """Job-submission address of a running cluster (http://HEAD:8265); None starts a head on 127.0.0.1."""
    num_cpus: int = 2
    """CPUs of the head started here."""
    stage_timeout_s: float = 3600.0
    progress_every_s: float = 30.0
    """How often a running stage logs its elapsed time and latest metrics row."""
    log_tail_lines: int = 8
    """Lines of a finished stage's log shown here (all of it is in output_dir/<stage>/job.log)."""


@dataclass(frozen=True)
class EndpointConfig:
    keep_running: bool = False
    """Leave the endpoint (and a head started here) up; otherwise it answers one request and stops."""
    port: int = 8000
    """Serve's HTTP port on the head; 0, or busy on this machine (local head): a free one."""
    image: str | None = None
    """The request's image; default: the first question of the synthetic benchmark."""
    question: str = "Is there a lesion in this image?"
    """The request's question when ``image`` is set."""


@dataclass(frozen=True)
class PipelineConfig:
    """Self-training end to end: every stage as its own Ray job, then a report and a served endpoint."""

    output_dir: str
    model: ModelConfig
    """The base model: stage 1 starts from it, evaluation names it ``base``."""
    data: PipelineData = field(default_factory=PipelineData)
    configs: StageFiles = field(default_factory=StageFiles)
    overrides: dict[str, list[str]] = field(default_factory=dict)
    """Extra ``key=value`` overrides per stage, e.g. ``overrides.sft=[train.max_steps=10]``."""
    ray: JobsConfig = field(default_factory=JobsConfig)
    serve: EndpointConfig = field(default_factory=EndpointConfig)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.overrides) - set(STAGES))
        if unknown:
            raise ConfigError(f"overrides: unknown stage(s) {unknown}; stages are {list(STAGES)}")


# ----------------------------------------------------------------------------- wiring


def _model_args(prefix: str, model: ModelConfig) -> list[str]:
    # Both of preset / name_or_path always: a stage file's preset must not survive next to a path.
    return [f"{prefix}.preset={model.preset or 'null'}", f"{prefix}.name_or_path={model.name_or_path or 'null'}",
            f"{prefix}.dtype={model.dtype}", f"{prefix}.seed={model.seed}"]


def stage_args(cfg: PipelineConfig, run_dir: Path, port: int) -> dict[str, list[str]]:
    """Every stage's overrides: its output folder first, then the files of the stages before it."""
    data = SyntheticPaths.under(run_dir / "data")
    sft = ModelConfig(name_or_path=str(run_dir / "sft" / "merged"), dtype=cfg.model.dtype)
    dpo = ModelConfig(name_or_path=str(run_dir / "dpo" / "merged"), dtype=cfg.model.dtype)
    args = {
        "sft": _model_args("model", cfg.model),
        "generate": _model_args("model", sft),
        "dpo": [*_model_args("model", sft), f"preferences={run_dir / 'generate' / 'preferences.parquet'}"],
        "evaluate": [*_model_args("models.base", cfg.model), *_model_args("models.sft", sft),
                     *_model_args("models.dpo", dpo)],
        "serve": [*_model_args("model", dpo), "model_name=stmed-dpo", "blocking=false", f"http.port={port}"],
    }
    if cfg.data.synthetic:
        args["sft"] += ["data.synthetic=false", f"data.instruct={data.instruct}", f"data.image_root={data.images}"]
        args["generate"] += [f"images={data.unlabelled}", f"judge.reference_findings={data.findings}"]
        args["evaluate"] += ["synthetic=true", f"data_dir={data.root}"]
    return {s: [f"output_dir={run_dir / s}", *args[s], *cfg.overrides.get(s, [])] for s in STAGES}


def pending(run_dir: Path, keep_running: bool = False) -> list[str]:
    """Stages to run: from the first unfinished one on (every later stage reads its outputs)."""
    done = [(run_dir / s / "summary.json").is_file() for s in STAGES[:-1]]
    done.append((run_dir / "serve" / ENDPOINT_REQUEST).is_file() and not keep_running)  # answered once
    first = next((i for i, finished in enumerate(done) if not finished), len(STAGES))
    return list(STAGES[first:])


def make_data(cfg: PipelineConfig, run_dir: Path) -> None:
    """The synthetic dataset, made once; every stage reads this copy."""
    out = run_dir / "data"
    if read_summary(out) is None:
        start = time.monotonic()
        paths = make_dataset(out, num_images=cfg.data.synthetic_images, seed=cfg.data.synthetic_seed)
        write_summary(out, {"stage": "data", **dataset_stats(paths), "wall_time_s": time.monotonic() - start})


# ----------------------------------------------------------------------------- running


def _heartbeat(stage: str, out: Path, every_s: float, stop: threading.Event) -> None:
    start = time.monotonic()
    while not stop.wait(every_s):
        rows = MetricsLog(out / "metrics.jsonl").read()
        last = rows[-1] if rows else {}
        latest = f", step {last['step']} loss {last['loss']:.4f}" if "step" in last and "loss" in last else ""
        log.info("%s: running for %.0fs%s", stage, time.monotonic() - start, latest)


def run_stage(cfg: PipelineConfig, stage: str, args: list[str], out: Path, address: str, python: str,
              fresh: bool = False) -> float:
    """Submit one stage as a Ray job and wait for it; its whole log goes to ``out/job.log``.

    ``fresh``: an earlier stage ran in this pipeline, so whatever ``out`` holds (finished outputs, or a
    half-done run that the stage would resume) was made from old inputs and is moved aside.
    """
    if fresh and out.exists():
        out.rename(out.with_name(f"{stage}.stale-{time.strftime('%Y%m%d-%H%M%S')}"))
    entrypoint = shlex.join([python, "-m", f"jobs.{stage}", "--config", getattr(cfg.configs, stage), *args])
    log.info("%s: started", stage)
    start, stop = time.monotonic(), threading.Event()
    threading.Thread(target=_heartbeat, args=(stage, out, cfg.ray.progress_every_s, stop), daemon=True).start()
    try:
        status, logs = submit_job(address, entrypoint, working_dir=REPO, timeout=cfg.ray.stage_timeout_s)
    finally:
        stop.set()
    out.mkdir(parents=True, exist_ok=True)
    (out / "job.log").write_text(logs)
    wall = time.monotonic() - start
    tail = logs.rstrip().splitlines()[-(cfg.ray.log_tail_lines if status == "SUCCEEDED" else 60):]
    log.info("%s log, last lines (all in %s):\n    %s", stage, out / "job.log", "\n    ".join(tail))
    if status != "SUCCEEDED":
        raise StageFailed(f"stage {stage}: job {status} after {wall:.0f}s; see {out / 'job.log'}")
    log.info("%s: done in %.1fs", stage, wall)
    return wall


def endpoint_request(cfg: EndpointConfig, run_dir: Path) -> Request:
    """What the endpoint check asks: ``serve.image``, or the synthetic benchmark's first question."""
    if cfg.image:
        return Request(Path(cfg.image).resolve(), cfg.question)
    data = SyntheticPaths.under(run_dir / "data")
    if not data.test_w_options.is_file():
        raise ConfigError("serve.image: no synthetic benchmark to take a request from; set serve.image=FILE")
    return first_benchmark_request(data.test_w_options, data.images)


def _port(port: int, local: bool) -> int:
    """Serve's port: ``port``, or a free one when it is 0 or, for a head on this machine, already taken."""
    import socket

    with socket.socket() as sock:
        busy = local and port != 0 and sock.connect_ex(("127.0.0.1", port)) == 0
    return free_port() if port == 0 or busy else port


def usage(cfg: PipelineConfig, run_dir: Path, report: Path, endpoint: dict[str, Any] | None,
          head: LocalHead | None) -> str:
    """What the pipeline prints last: where the report is and how to query the model."""
    lines = ["", f"Report: {report}"]
    up = endpoint is not None and cfg.serve.keep_running
    if not up:
        lines += ["The endpoint is shut down. Serve the DPO model on http://127.0.0.1:8000 (it runs until Ctrl-C):",
                  (f"  python -m jobs.serve --config {cfg.configs.serve} model.preset=null "
                  f"model.name_or_path={run_dir / 'dpo' / 'merged'} model_name=stmed-dpo")]
    url, model = (endpoint["url"], endpoint["model"]) if up else ("http://127.0.0.1:8000", "stmed-dpo")
    try:
        request = endpoint_request(cfg.serve, run_dir)
    except ConfigError:  # no synthetic data and no serve.image: any image will do for the example
        request = Request(Path("scan.png"), cfg.serve.question)
    lines += [f"Query it (from another shell) at {url}:", snippets(url, model, request)]
    if up and head is not None:
        stop = (f"from pathlib import Path; from jobs.submit import LocalHead; "
                f"LocalHead(Path({str(head.temp_dir)!r}), {head.gcs_port}, {head.dashboard_port}, {head.pgid}).stop()")
        lines += ["It runs on a Ray head started for it; stop both (from the repository root) with:",
                  f"  {shlex.quote(sys.executable)} -c {shlex.quote(stop)}"]
    return "\n".join(lines)


def main(cfg: PipelineConfig) -> dict[str, Any]:
    run_dir = Path(cfg.output_dir).resolve()
    write_config(cfg, run_dir)
    if cfg.data.synthetic:
        make_data(cfg, run_dir)
    todo = pending(run_dir, cfg.serve.keep_running)
    log.info("pipeline in %s: %s", run_dir, f"to run: {', '.join(todo)}" if todo else "every stage finished")
    if "serve" in todo:
        endpoint_request(cfg.serve, run_dir)  # a request the endpoint check cannot make is a config mistake: say so now
    record_path = run_dir / PIPELINE_RECORD
    record = json.loads(record_path.read_text()) if record_path.is_file() else {"stages": {}}
    head, endpoint = None, None
    try:
        if todo and cfg.ray.address is None:
            head = start_local_head(num_cpus=cfg.ray.num_cpus)
        # A head started here runs this interpreter; a cluster's nodes run their own `python`.
        python, address = (sys.executable, head.address) if head else ("python", cfg.ray.address)
        args = stage_args(cfg, run_dir, _port(cfg.serve.port, head is not None))
        for stage in todo:
            wall = run_stage(cfg, stage, args[stage], run_dir / stage, address, python, fresh=stage != todo[0])
            record["stages"][stage] = {"wall_s": wall}
            write_json(record_path, record)
        if "serve" in todo:
            served = read_summary(run_dir / "serve") or {}
            endpoint = ask(served["url"], served["model"], endpoint_request(cfg.serve, run_dir))
            write_json(run_dir / "serve" / ENDPOINT_REQUEST, endpoint)
    finally:
        if head is not None and not (endpoint and cfg.serve.keep_running):
            head.stop()  # takes Serve with it
    if endpoint and cfg.ray.address and not cfg.serve.keep_running:
        shutdown = "import ray; from ray import serve; ray.init(); serve.shutdown()"
        submit_job(cfg.ray.address, shlex.join(["python", "-c", shutdown]), REPO, cfg.ray.stage_timeout_s)
    report = write_report(run_dir)
    print(usage(cfg, run_dir, report, endpoint, head), flush=True)
    return {"report": str(report), "ran": todo, "endpoint": endpoint}


if __name__ == "__main__":
    try:
        main(load_config(PipelineConfig))
    except StageFailed as err:  # the stage's own traceback is in its log; this one would only add noise
        log.error("%s. Fix it and rerun the same command: finished stages are skipped.", err)
        raise SystemExit(1) from None
