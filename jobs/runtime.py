"""How every job connects to Ray: an existing cluster from config, or a local one on loopback."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from stmed.config import ConfigError, RayConfig, load_config
from stmed.data.records import DataError
from stmed.log import get_logger
from stmed.runs import MetricsLog, OutputDirError, StageClock, pool_start_s, training_phases

if TYPE_CHECKING:
    from actors.training import TrainingRun

log = get_logger(__name__)

LOOPBACK = "127.0.0.1"
EXIT_USER_ERROR = 2
T = TypeVar("T")
_in_job = False
"""True once ``run_job`` runs: this process is a stage's job, so its clock covers start-up too."""


class NothingProduced(RuntimeError):
    """A job ran to its end with nothing usable to hand on (no preference pairs, say): a failure, with
    the counts that say why, and no ``summary.json``, so a pipeline rerun runs the stage again."""

# The environment of a local, loopback-only Ray. This machine has an external interface that Ray
# would otherwise advertise; pinning the node IP keeps the head, the workers and Ray Train's
# process group on 127.0.0.1. Token auth (on by default for a new local cluster since Ray 2.5x)
# is turned off here because nothing binds beyond loopback; a real cluster sets RAY_AUTH_MODE itself.
LOCAL_RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_NODE_IP_ADDRESS": LOOPBACK,
}


def use_local_ray_env() -> None:
    """Set the loopback-only environment for this process and its children (unless already set)."""
    for key, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(key, value)


def _pin_loopback() -> None:
    """Make an already-imported Ray honour RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0.

    Ray reads that variable once, at import; with it on (the Linux default) ``ray.init`` rewrites
    127.0.0.1 into this machine's external address. A process that imported Ray before calling
    ``init_ray`` would otherwise advertise that address.
    """
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def init_ray(cfg: RayConfig) -> None:
    """Connect to ``cfg.address`` or, when it is None, start a local Ray bound to loopback.

    Inside a submitted job Ray exports RAY_ADDRESS, and ``ray.init()`` joins that cluster whatever
    ``cfg.address`` says, which is what ``ray job submit`` expects.
    """
    local = cfg.address is None and not os.environ.get("RAY_ADDRESS")
    if local:
        use_local_ray_env()
    import ray

    if ray.is_initialized():
        return
    if local:
        _pin_loopback()
        log.info("starting a local Ray on %s with %s CPUs", LOOPBACK, cfg.num_cpus or "all")
        ray.init(
            num_cpus=cfg.num_cpus,
            include_dashboard=False,
            _node_ip_address=LOOPBACK,
            runtime_env={"env_vars": dict(LOCAL_RAY_ENV)},
        )
    else:
        log.info("joining the Ray cluster at %s", cfg.address or os.environ["RAY_ADDRESS"])
        ray.init(address=cfg.address)


def run_job(main: Callable[[T], Any], cls: type[T], argv: list[str] | None = None) -> None:
    """A job's ``__main__``: parse its config, run ``main``, and end a user mistake with one line.

    A mistake in the config or the inputs (``ConfigError``: a key, a missing file; ``DataError``: a file
    that is not what it claims, or gives nothing usable) is the user's to fix, not a bug: one line on
    stderr naming it, exit code 2, no traceback, and nothing retried. A run that diverged or produced
    nothing is one line too, with exit code 1. A job that finished exits at once (``exit_now``).
    """
    global _in_job
    _in_job = True
    cfg = load_config(cls, argv)
    try:
        main(cfg)
    except (ConfigError, OutputDirError, DataError) as err:
        kind = "input error" if isinstance(err, DataError) else "config error"
        sys.stderr.write(f"{kind}: {' '.join(str(err).split())}\n")
        raise SystemExit(EXIT_USER_ERROR) from None
    except _failures_with_a_reason() as err:  # the job ran and failed for a reason it can name
        sys.stderr.write(f"failed: {' '.join(str(err).split())}\n")
        raise SystemExit(1) from None
    exit_now()


def _failures_with_a_reason() -> tuple[type[Exception], ...]:
    """``NothingProduced``, and ``Diverged`` where this job imported the training code. Looked up when an
    error is being handled, so that a job that trains nothing never imports it (torch and peft, seconds)."""
    stage = sys.modules.get("stmed.train.stage")
    return (NothingProduced, stage.Diverged) if stage is not None else (NothingProduced,)


def exit_now() -> None:
    """End a finished job: disconnect from Ray, flush, and leave without the interpreter's teardown.

    Everything the job hands on is written by now. A normal exit of a process that imported torch,
    transformers and Ray Data takes ~3 s more (measured: 3.2-3.5 s from its last line until the job
    server saw it end, 0.5 s this way), time the pipeline waits out once per stage.
    """
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def stage_clock() -> StageClock:
    """The clock a job's ``main`` starts first: from the job's submission (or its process's start) when the
    process runs the job (``run_job``), else from now (a test calling ``main``)."""
    return StageClock(job=_in_job)


def training_timings(run: TrainingRun, out: Path) -> dict[str, float]:
    """The phases of a Ray Train run whose loop wrote ``attempts.jsonl`` and ``metrics.jsonl`` in ``out``."""
    from stmed.train.stage import ATTEMPTS_FILE, METRICS_FILE  # a training job has imported it already

    if not {"loop_start", "loop_end", "last_report"} <= run.worker.keys():
        return {}  # rank 0 left no stamps: fit()'s time stays unsplit, in the block's other_s
    attempt = MetricsLog(out / ATTEMPTS_FILE).read()[-1]
    rows = MetricsLog(out / METRICS_FILE).read_steps()
    step_s = sum(row["step_time_s"] for row in rows if row["step"] > attempt["start_step"])  # this attempt's
    return training_phases(run.fit_start, run.fit_end, run.worker, attempt["time"], step_s,
                           attempt.get("reference_precompute_s") or 0.0)


def actor_build_times(class_name: str) -> list[tuple[float, float]]:
    """``(created, built)`` wall-clock times of this job's Ray Data actors that run ``class_name``, from Ray's
    task events (the state API): creation to the constructor's end (process start, imports, model load).
    Empty where the state API is not served (a local Ray without a dashboard, as in the tests)."""
    import ray
    from ray.util.state import list_tasks
    from ray.util.state.exception import RayStateApiException

    context = ray.get_runtime_context()
    try:  # the GCS address names this cluster's dashboard; without it the API guesses a local one
        tasks = list_tasks(address=context.gcs_address, filters=[("type", "=", "ACTOR_CREATION_TASK"),
                           ("job_id", "=", context.get_job_id())], detail=True, limit=10_000,
                           raise_on_missing_output=False)  # fmt: skip
    except RayStateApiException as err:
        log.info("actor start times unavailable (%s)", str(err).split(".")[0])
        return []
    return [(task.creation_time_ms / 1000, task.end_time_ms / 1000) for task in tasks
            if f"({class_name})" in task.name and task.creation_time_ms and task.end_time_ms]


def pass_timings(passes: list[tuple[float, float]], class_name: str) -> dict[str, float]:
    """Ray Data passes (``(start, end)`` each) split into their pool start and the rest (work); nothing
    where the actors' build times are unknown (the passes' time then stays in the block's other_s)."""
    actors = actor_build_times(class_name)
    if not actors:
        return {}
    pool = pool_start_s(passes, actors)
    return {"pool_start": pool, "work": sum(end - start for start, end in passes) - pool}
