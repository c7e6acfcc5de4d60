"""The whole self-training run, one Ray job per stage: SFT, then rounds of preferences → DPO → gate, then
evaluation and the endpoint.

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
from stmed.eval.gate import GateConfig, decide
from stmed.eval.report import ENDPOINT_REQUEST, PIPELINE_RECORD, overhead_table, write_report
from stmed.log import get_logger
from stmed.runs import (
    SUBMITTED_AT_ENV,
    TIMINGS,
    MetricsLog,
    read_summary,
    submitted_timings,
    write_json,
    write_summary,
)
from stmed.serve.client import Request, ask, first_benchmark_request, snippets

log = get_logger("stmed.jobs.pipeline")

REPO = Path(__file__).resolve().parents[1]
STAGES = ("warmup", "sft", "generate", "dpo", "gate", "evaluate", "serve")
"""The kinds of stage; a run's stages are ``stage_plan``: rounds number theirs (generate1, dpo1, gate1…)."""
ROUND_KINDS = ("generate", "dpo", "gate")
GATE_BENCHMARK = "gate"
GATE_SEED_OFFSET = 7919
"""The gate slice's phantoms come from seed ``data.synthetic_seed + 7919``: other images than any split."""
DECISION = "decision.json"


class StageFailed(RuntimeError):
    """A stage's job ended FAILED or STOPPED; the message names its log."""


@dataclass(frozen=True)
class StageFiles:
    """Each stage's config file, relative to the repository root (it travels with the working dir)."""

    warmup: str = "jobs/configs/local/warmup.yaml"
    sft: str = "jobs/configs/local/sft.yaml"
    generate: str = "jobs/configs/local/generate.yaml"
    dpo: str = "jobs/configs/local/dpo.yaml"
    gate: str = "jobs/configs/local/gate.yaml"
    evaluate: str = "jobs/configs/local/evaluate.yaml"
    serve: str = "jobs/configs/local/serve.yaml"


@dataclass(frozen=True)
class PipelineData:
    synthetic: bool = True
    """Make the synthetic dataset once in output_dir/data and point every stage at it. False: the stage
    config files (or ``overrides``) name the real data."""
    synthetic_images: int = 120
    synthetic_seed: int = 0
    test_images: int | None = None
    """Held-out benchmark images of the synthetic dataset (5 questions each); None: a fifth of them."""
    pool_images: int = 0
    """Unlabelled phantoms for self-play alone (no conversation, not in the benchmark); 0: self-play on
    stage 1's training images."""
    overlay_share: float = 0.0
    """Share of the training and pool phantoms with fake identifiers burned in (never a benchmark image;
    ground truth in ``data/overlays.json``), so the privacy gate has text to mask."""
    laterality_share: float = 0.0
    """Share of them with a harmless "L"/"R" marker."""


@dataclass(frozen=True)
class WarmupGroup:
    enabled: bool = False
    """Start stage 1 from the general-alignment warm-up of the tiny preset (jobs.warmup) instead of
    ``model``: what the paper's LLaVA base brings. Evaluation calls the warmed model ``base``. Only
    for ``model.preset=tiny``: any other model starts stage 1 from its own weights."""
    dir: str | None = None
    """Where it is built once and reused; default ``<output_dir>/../warmup``, shared by the runs beside."""


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
class ReviewStage:
    """Clinicians review round 1's judged pairs (``jobs.review``); on synthetic data a simulated clinician
    does, through the app's HTTP API, so the report shows the judge's κ against it."""

    enabled: bool = False
    items: int = 40
    """Pairs of round 1 to queue (stratified over margin and question kind)."""
    reviewers_per_item: int = 1
    kappa_threshold: float = 0.6


@dataclass(frozen=True)
class PipelineConfig:
    """Self-training end to end: every stage as its own Ray job, then a report and a served endpoint."""

    output_dir: str
    model: ModelConfig
    """The base model: stage 1 starts from it (or from its warm-up), evaluation names it ``base``."""
    rounds: int = 1
    """Self-training rounds: round r asks and answers with round r-1's model (stage 1's for r = 1), the
    judge ranks its pairs, and DPO trains against that model as the frozen reference."""
    gate: GateConfig = field(default_factory=GateConfig)
    warmup: WarmupGroup = field(default_factory=WarmupGroup)
    data: PipelineData = field(default_factory=PipelineData)
    configs: StageFiles = field(default_factory=StageFiles)
    overrides: dict[str, list[str]] = field(default_factory=dict)
    """Extra ``key=value`` overrides per kind of stage, e.g. ``overrides.sft=[train.max_steps=10]``;
    ``overrides.dpo`` applies to every round's DPO."""
    ray: JobsConfig = field(default_factory=JobsConfig)
    serve: EndpointConfig = field(default_factory=EndpointConfig)
    review: ReviewStage = field(default_factory=ReviewStage)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.overrides) - set(STAGES))
        if unknown:
            raise ConfigError(f"overrides: unknown stage(s) {unknown}; stages are {list(STAGES)}")
        if self.rounds < 1:
            raise ConfigError(f"rounds must be >= 1, got {self.rounds}")
        if self.gate.enabled and self.rounds and not self.data.synthetic and not self.gate.test_file:
            raise ConfigError("gate.enabled with real data needs gate.test_file: a held-out slice no training or "
                              "self-play sees (or gate.enabled=false)")


# ----------------------------------------------------------------------------- wiring


def _model_args(prefix: str, model: ModelConfig) -> list[str]:
    # Both of preset / name_or_path always: a stage file's preset must not survive next to a path.
    bounds = [f"{prefix}.{k}={getattr(model, k)}" for k in ("min_pixels", "max_pixels") if getattr(model, k)]
    return [f"{prefix}.preset={model.preset or 'null'}", f"{prefix}.name_or_path={model.name_or_path or 'null'}",
            f"{prefix}.dtype={model.dtype}", f"{prefix}.seed={model.seed}", *bounds]


def kind_of(stage: str) -> str:
    """``dpo2`` -> ``dpo``."""
    return stage.rstrip("0123456789")


def round_of(stage: str) -> int:
    """``dpo2`` -> 2; 0 for a stage outside the rounds."""
    digits = stage[len(kind_of(stage)):]
    return int(digits) if digits else 0


def warmup_dir(cfg: PipelineConfig, run_dir: Path) -> Path:
    return Path(cfg.warmup.dir).resolve() if cfg.warmup.dir else run_dir.parent / "warmup"


def stage_dir(cfg: PipelineConfig, run_dir: Path, stage: str) -> Path:
    return warmup_dir(cfg, run_dir) if stage == "warmup" else run_dir / stage


def decisions(run_dir: Path) -> dict[int, dict[str, Any]]:
    """The gate decisions on disk, by round."""
    found = {}
    for path in sorted(run_dir.glob(f"gate*/{DECISION}")):
        found[round_of(path.parent.name)] = json.loads(path.read_text())
    return found


def trained_rounds(cfg: PipelineConfig, run_dir: Path) -> int:
    """Rounds to train: ``cfg.rounds``, or up to the first one the gate refused (it is kept, not served)."""
    refused = [r for r, d in decisions(run_dir).items() if not d["promoted"] and r <= cfg.rounds]
    return min(refused) if refused else cfg.rounds


def promoted_round(cfg: PipelineConfig, run_dir: Path) -> int:
    """The last round whose model is promoted (0: stage 1's)."""
    if not cfg.gate.enabled:
        return cfg.rounds
    refused = [r for r, d in decisions(run_dir).items() if not d["promoted"] and r <= cfg.rounds]
    return min(refused) - 1 if refused else cfg.rounds


def stage_plan(cfg: PipelineConfig, run_dir: Path) -> list[str]:
    """This run's stages in order: warm-up, stage 1, each round's generate / dpo / gate, evaluate, serve."""
    rounds = [f"{kind}{r}" for r in range(1, trained_rounds(cfg, run_dir) + 1) for kind in ROUND_KINDS
              if kind != "gate" or cfg.gate.enabled]  # fmt: skip
    return [*(["warmup"] if warming_up(cfg) else []), "sft", *rounds, "evaluate", "serve"]


def warming_up(cfg: PipelineConfig) -> bool:
    """The warm-up stands in for a LLaVA base: it is built for the tiny LLaVA preset only; a real
    checkpoint is aligned already, and another family's preset starts stage 1 from its own weights."""
    return cfg.warmup.enabled and cfg.model.preset == "tiny"


def round_model(cfg: PipelineConfig, run_dir: Path, r: int) -> tuple[str, ModelConfig]:
    """Round ``r``'s model (``sft`` for r = 0): its evaluation name and where its merged export is."""
    name = "sft" if r == 0 else f"dpo{r}"
    return name, _exported(cfg, run_dir / name / "merged")


def _exported(cfg: PipelineConfig, path: Path) -> ModelConfig:
    """A merged export of this run's model: its dtype and image pixel bounds carry over."""
    return ModelConfig(name_or_path=str(path), dtype=cfg.model.dtype, min_pixels=cfg.model.min_pixels,
                       max_pixels=cfg.model.max_pixels)


def base_model(cfg: PipelineConfig, run_dir: Path) -> ModelConfig:
    if warming_up(cfg):
        return _exported(cfg, warmup_dir(cfg, run_dir) / "merged")
    return cfg.model


def stage_args(cfg: PipelineConfig, run_dir: Path, port: int) -> dict[str, list[str]]:
    """Every planned stage's overrides: its output folder first, then the files of the stages before it,
    then the user's ``overrides`` of its kind (last, so they win)."""
    data = SyntheticPaths.under(run_dir / "data")
    gate_data = SyntheticPaths.under(run_dir / "data" / GATE_BENCHMARK)
    args: dict[str, list[str]] = {"warmup": [], "sft": _model_args("model", base_model(cfg, run_dir))}
    trained = trained_rounds(cfg, run_dir)
    for r in range(1, trained + 1):
        start_name, start = round_model(cfg, run_dir, r - 1)
        name = f"dpo{r}"
        args[f"generate{r}"] = _model_args("model", start)
        args[name] = [*_model_args("model", start), f"preferences={run_dir / f'generate{r}' / 'preferences.parquet'}"]
        args[f"gate{r}"] = [*_model_args(f"models.{start_name}", start),
                            *_model_args(f"models.{name}", round_model(cfg, run_dir, r)[1]),
                            f"compare.{name}={start_name}", "synthetic=false",
                            f"benchmarks.{GATE_BENCHMARK}.test_file={cfg.gate.test_file or gate_data.test_w_options}"]  # fmt: skip
        if cfg.data.synthetic:
            args[f"generate{r}"] += [f"images={data.unlabelled}", f"judge.reference_findings={data.findings}"]
    evaluated = [round_model(cfg, run_dir, r) for r in range(trained + 1)]
    args["evaluate"] = [*_model_args("models.base", base_model(cfg, run_dir)),
                        *(a for name, model in evaluated for a in _model_args(f"models.{name}", model)),
                        *(f"compare.{evaluated[r][0]}={evaluated[r - 1][0]}" for r in range(1, len(evaluated)))]
    served = round_model(cfg, run_dir, promoted_round(cfg, run_dir))
    args["serve"] = [*_model_args("model", served[1]), f"model_name=stmed-{served[0]}", "blocking=false",
                     f"http.port={port}"]  # fmt: skip
    if cfg.data.synthetic:
        args["sft"] += ["data.synthetic=false", f"data.instruct={data.instruct}", f"data.image_root={data.images}"]
        args["evaluate"] += ["synthetic=true", f"data_dir={data.root}"]
    return {s: [f"output_dir={stage_dir(cfg, run_dir, s)}", *args[s], *cfg.overrides.get(kind_of(s), [])]
            for s in stage_plan(cfg, run_dir)}


def pending(cfg: PipelineConfig, run_dir: Path) -> list[str]:
    """Stages to run: from the first unfinished one on (every later stage reads its outputs)."""
    plan = stage_plan(cfg, run_dir)
    done = [_finished(cfg, run_dir, s) for s in plan]
    first = next((i for i, finished in enumerate(done) if not finished), len(plan))
    return plan[first:]


def _finished(cfg: PipelineConfig, run_dir: Path, stage: str) -> bool:
    out = stage_dir(cfg, run_dir, stage)
    if stage == "serve":  # answered once, and not to be kept up now
        return (out / ENDPOINT_REQUEST).is_file() and not cfg.serve.keep_running
    if kind_of(stage) == "gate":
        return (out / DECISION).is_file()
    return (out / "summary.json").is_file()


def gate_decision(cfg: PipelineConfig, run_dir: Path, stage: str) -> dict[str, Any]:
    """Decide a finished gate stage, and record why in its folder."""
    r = round_of(stage)
    summary = read_summary(run_dir / stage) or {}
    decision = decide(summary, round_model(cfg, run_dir, r - 1)[0], f"dpo{r}", GATE_BENCHMARK, cfg.gate)
    write_json(run_dir / stage / DECISION, decision)
    verdict = "promoted" if decision["promoted"] else "NOT promoted: the rounds stop here"
    log.info("%s: dpo%d %s (%s)", stage, r, verdict, decision["reason"])
    return decision


def make_data(cfg: PipelineConfig, run_dir: Path) -> None:
    """The synthetic dataset and the gate's held-out slice, made once; every stage reads these copies."""
    out = run_dir / "data"
    if read_summary(out) is None:
        start = time.monotonic()
        paths = make_dataset(out, num_images=cfg.data.synthetic_images, seed=cfg.data.synthetic_seed,
                             test_images=cfg.data.test_images, pool_images=cfg.data.pool_images,
                             overlay_share=cfg.data.overlay_share, laterality_share=cfg.data.laterality_share)
        write_summary(out, {"stage": "data", **dataset_stats(paths), "wall_time_s": time.monotonic() - start})
    gate = SyntheticPaths.under(out / GATE_BENCHMARK)
    if cfg.gate.enabled and not gate.test_w_options.is_file():
        make_dataset(gate.root, num_images=cfg.gate.images + 1, test_images=cfg.gate.images,
                     seed=cfg.data.synthetic_seed + GATE_SEED_OFFSET)  # fmt: skip


# ----------------------------------------------------------------------------- running


def _heartbeat(stage: str, out: Path, every_s: float, stop: threading.Event) -> None:
    start = time.monotonic()
    while not stop.wait(every_s):
        rows = MetricsLog(out / "metrics.jsonl").read()
        last = rows[-1] if rows else {}
        latest = f", step {last['step']} loss {last['loss']:.4f}" if "step" in last and "loss" in last else ""
        log.info("%s: running for %.0fs%s", stage, time.monotonic() - start, latest)


def run_stage(cfg: PipelineConfig, stage: str, args: list[str], out: Path, address: str, python: str,
              fresh: bool = False) -> dict[str, Any]:
    """Submit one stage as a Ray job and wait for it; its whole log goes to ``out/job.log``. Returns its
    record: ``wall_s`` and ``timings`` (the job's own, from submission to the pipeline seeing it end).

    ``fresh``: an earlier stage ran in this pipeline, so whatever ``out`` holds (finished outputs, or a
    half-done run that the stage would resume) was made from old inputs and is moved aside.
    """
    if fresh and out.exists():
        out.rename(out.with_name(f"{stage}.stale-{time.strftime('%Y%m%d-%H%M%S')}"))
    kind = kind_of(stage)
    module = "evaluate" if kind == "gate" else kind  # the gate is an evaluation on its held-out slice
    entrypoint = shlex.join([python, "-m", f"jobs.{module}", "--config", getattr(cfg.configs, kind), *args])
    log.info("%s: started", stage)
    start, stop = time.monotonic(), threading.Event()
    threading.Thread(target=_heartbeat, args=(stage, out, cfg.ray.progress_every_s, stop), daemon=True).start()
    submitted = time.time()  # the job measures its start-up from this (wall clock: another process reads it)
    try:
        status, logs = submit_job(address, entrypoint, working_dir=REPO, timeout=cfg.ray.stage_timeout_s,
                                  env_vars={SUBMITTED_AT_ENV: repr(submitted)})
    finally:
        stop.set()
    seen = time.time()
    out.mkdir(parents=True, exist_ok=True)
    (out / "job.log").write_text(logs)
    wall = time.monotonic() - start
    tail = logs.rstrip().splitlines()[-(cfg.ray.log_tail_lines if status == "SUCCEEDED" else 60):]
    log.info("%s log, last lines (all in %s):\n    %s", stage, out / "job.log", "\n    ".join(tail))
    if status != "SUCCEEDED":
        raise StageFailed(f"stage {stage}: job {status} after {wall:.0f}s; see {out / 'job.log'}")
    timings = submitted_timings((read_summary(out) or {}).get(TIMINGS), submitted, seen)
    log.info("%s: done in %.1fs (fixed overhead %.1fs, work %.1fs)", stage, wall, timings["overhead_s"],
             timings["work_s"])  # fmt: skip
    return {"wall_s": wall, TIMINGS: timings}


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
        name, model_cfg = round_model(cfg, run_dir, promoted_round(cfg, run_dir))
        shut = (f"The endpoint is shut down. Serve the {name} model on http://127.0.0.1:8000 (it runs "
                "until Ctrl-C):")
        serve = (f"  python -m jobs.serve --config {cfg.configs.serve} model.preset=null "
                 f"model.name_or_path={model_cfg.name_or_path} model_name=stmed-{name}")
        lines += [shut, serve]
    url, model = (endpoint["url"], endpoint["model"]) if up else ("http://127.0.0.1:8000",
                                                                  f"stmed-{round_model(cfg, run_dir, promoted_round(cfg, run_dir))[0]}")
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


def review_round(cfg: PipelineConfig, run_dir: Path, fresh: bool) -> None:
    """Round 1's pairs reviewed by a simulated clinician (synthetic data only; a lab runs jobs.review with
    people instead), in this process: a few dozen items take seconds."""
    from jobs.review import ReviewConfig, simulated_round
    from stmed.review.queue import QueueConfig

    out, preferences = run_dir / "review", stage_dir(cfg, run_dir, "generate1") / "preferences.parquet"
    if not cfg.data.synthetic or not preferences.is_file() or ((out / "summary.json").is_file() and not fresh):
        return
    if out.exists():
        out.rename(out.with_name(f"review.stale-{int(time.time())}"))
    queue = QueueConfig(preferences=str(preferences), items=cfg.review.items,
                        reviewers_per_item=cfg.review.reviewers_per_item)
    summary = simulated_round(ReviewConfig(output_dir=str(out), queue=queue,
                                           kappa_threshold=cfg.review.kappa_threshold),
                              SyntheticPaths.under(run_dir / "data").findings)
    log.info("review: %d decisions by a simulated clinician; %s", summary["labels"], summary["verdict"])


def main(cfg: PipelineConfig) -> dict[str, Any]:
    run_dir = Path(cfg.output_dir).resolve()
    write_config(cfg, run_dir)
    if cfg.data.synthetic:
        make_data(cfg, run_dir)
    todo = pending(cfg, run_dir)
    log.info("pipeline in %s: %s", run_dir, f"to run: {', '.join(todo)}" if todo else "every stage finished")
    if "serve" in todo:
        endpoint_request(cfg.serve, run_dir)  # a request the endpoint check cannot make is a config mistake: say so now
    record_path = run_dir / PIPELINE_RECORD
    record = json.loads(record_path.read_text()) if record_path.is_file() else {"stages": {}}
    head, endpoint, ran = None, None, []
    try:
        if todo and cfg.ray.address is None:
            head = start_local_head(num_cpus=cfg.ray.num_cpus)
        # A head started here runs this interpreter; a cluster's nodes run their own `python`.
        python, address = (sys.executable, head.address) if head else ("python", cfg.ray.address)
        port = _port(cfg.serve.port, head is not None)
        while todo:  # the plan can shrink as it runs: a gate that refuses a round ends the rounds
            stage = todo[0]
            args = stage_args(cfg, run_dir, port)[stage]
            out = stage_dir(cfg, run_dir, stage)
            record["stages"][stage] = run_stage(cfg, stage, args, out, address, python, fresh=bool(ran))
            write_json(record_path, record)
            ran.append(stage)
            if kind_of(stage) == "gate":
                gate_decision(cfg, run_dir, stage)
            plan = stage_plan(cfg, run_dir)
            todo = plan[plan.index(stage) + 1:]
        if "serve" in ran:
            served = read_summary(run_dir / "serve") or {}
            endpoint = ask(served["url"], served["model"], endpoint_request(cfg.serve, run_dir))
            write_json(run_dir / "serve" / ENDPOINT_REQUEST, endpoint)
    finally:
        if head is not None and not (endpoint and cfg.serve.keep_running):
            head.stop()  # takes Serve with it
    if endpoint and cfg.ray.address and not cfg.serve.keep_running:
        shutdown = "import ray; from ray import serve; ray.init(); serve.shutdown()"
        submit_job(cfg.ray.address, shlex.join(["python", "-c", shutdown]), REPO, cfg.ray.stage_timeout_s)
    if cfg.review.enabled:
        review_round(cfg, run_dir, fresh="generate1" in ran)
    report = write_report(run_dir)
    if ran:
        log.info("where each stage's time went (also in %s):\n%s", report, overhead_table(run_dir))
    print(usage(cfg, run_dir, report, endpoint, head), flush=True)
    return {"report": str(report), "ran": ran, "endpoint": endpoint}


if __name__ == "__main__":
    try:
        main(load_config(PipelineConfig))
    except StageFailed as err:  # the stage's own traceback is in its log; this one would only add noise
        log.error("%s. Fix it and rerun the same command: finished stages are skipped.", err)
        raise SystemExit(1) from None
