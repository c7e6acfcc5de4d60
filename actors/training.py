"""Ray Train glue: the session a worker's loop talks to, and the trainer that runs the loop on N workers.

The loops themselves (``stmed.train.sft.train_sft``, later DPO) are Ray-free and take a ``TrainSession``;
``RayTrainSession`` is that session backed by Ray Train's worker context, and ``run_training`` builds
the ``TorchTrainer`` around a loop.

Train V2 (the default in Ray 2.60) quirks that bite here:
- ``TorchTrainer(resume_from_checkpoint=...)`` raises; a run resumes from the checkpoints found under
  ``RunConfig(storage_path, name)``. The same name therefore silently *continues* an earlier run:
  callers pass a unique name unless resuming is what they want.
- ``ray.train.report`` is a barrier; every worker calls it the same number of times (the loop does).
- Each worker may report its own checkpoint directory; Ray merges them into one directory in storage,
  which is how every rank's RNG state ends up beside rank 0's weights.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from torch import nn

from stmed.config import RayConfig
from stmed.data.records import DataError
from stmed.log import get_logger
from stmed.train.session import TrainSession
from stmed.train.stage import Diverged

log = get_logger(__name__)

HEALTH_CHECK_INTERVAL_S = "0.5"
"""How often Ray Train's controller polls its workers (Ray's default: 2 s); a poll is one small call per
worker. Two waits hang on it: the controller notices the end of a run at a poll (the loop's end until
``fit()`` returned: 4.1-4.5 s at 2 s, 1.2-1.7 s at 0.5 s, an empty loop on 1 and 2 workers here), and a
worker's result queue holds one report, emptied at a poll, so a report blocks until the previous one was
polled (DPO in the demo reports every 5 steps of 0.1-0.2 s: 11.6 s of such waits at 2 s, 0.2-0.3 s at
0.5 s). Ray Train hands the driver's ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` to the controller; a value set
in the environment wins."""

LoopFn = Callable[[dict[str, Any], TrainSession], None]


class RayTrainSession:
    """``stmed.train.session.TrainSession`` inside a Ray Train worker."""

    def __init__(self) -> None:
        context = ray.train.get_context()
        self.world_rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device: torch.device = ray.train.torch.get_device()
        self._restored: Path | None = None
        self.last_report: float | None = None
        """When the last ``report`` returned (``time.time()``): where the driver's timings split the loop's
        end into checkpoints and export."""

    def prepare_model(self, model: nn.Module) -> nn.Module:
        # DDP (gloo on CPU, NCCL on GPU) when there is more than one worker; plain .to(device) otherwise.
        return ray.train.torch.prepare_model(model)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        name = f"checkpoint_{int(metrics['step']):06d}" if checkpoint_dir else None
        # The default SYNC upload copies the directory into storage before returning; the caller may
        # delete it afterwards.
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
        self.last_report = time.time()

    def latest_checkpoint(self) -> Path | None:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        if checkpoint.filesystem.type_name == "local":
            return Path(checkpoint.path)
        # Remote storage (S3, GCS): download once for this attempt.
        self._restored = Path(tempfile.mkdtemp(prefix="stmed-restore-"))
        return Path(checkpoint.to_directory(str(self._restored)))

    def close(self) -> None:
        if self._restored is not None:
            shutil.rmtree(self._restored, ignore_errors=True)


@ray.remote(num_cpus=0)
class _WorkerNotes:
    """Where the workers leave, for the driver: the data error one met, and rank 0's time stamps."""

    def __init__(self) -> None:
        self.error: tuple[str, str] | None = None
        self.stamps: dict[str, float] = {}

    def put(self, kind: str, message: str) -> None:
        self.error = self.error or (kind, message)

    def stamp(self, **stamps: float) -> None:
        self.stamps.update(stamps)  # a restarted attempt's stamps replace the failed one's

    def get(self) -> tuple[tuple[str, str] | None, dict[str, float]]:
        return self.error, self.stamps


def _worker(config: dict[str, Any], loop_fn: LoopFn, notes: ray.actor.ActorHandle) -> None:
    session = RayTrainSession()
    if session.world_rank == 0:
        notes.stamp.remote(loop_start=time.time())
    try:
        loop_fn(config, session)
    except (DataError, Diverged) as err:
        # Deterministic: every rank checked the same data (or reduced the same loss) and meets the same
        # error, and a restart would only meet it again. Hand it to the driver and end normally, so
        # FailureConfig (meant for lost workers) spends no retry on it; ``run_training`` raises it there.
        ray.get(notes.put.remote(type(err).__name__, str(err)))
    else:
        if session.world_rank == 0:
            ray.get(notes.stamp.remote(loop_end=time.time(), last_report=session.last_report or time.time()))
    finally:
        session.close()


@dataclass(frozen=True)
class TrainingRun:
    """A finished Ray Train run: its result, and wall-clock stamps (``time.time()``) of where time went."""

    result: ray.train.Result
    fit_start: float
    fit_end: float
    worker: dict[str, float] = field(default_factory=dict)
    """Rank 0's ``loop_start``, ``last_report`` and ``loop_end`` in the last attempt."""

    @property
    def checkpoint(self) -> ray.train.Checkpoint | None:
        return self.result.checkpoint


def _storage_uri(storage_path: str | Path) -> str:
    """Ray wants an absolute local path (or a URI such as ``s3://bucket/dir``, passed through)."""
    text = str(storage_path)
    return text if "://" in text else str(Path(text).resolve())


def run_training(
    loop_fn: LoopFn, loop_config: dict[str, Any], ray_cfg: RayConfig, name: str, storage_path: str | Path
) -> TrainingRun:
    """Run ``loop_fn(loop_config, session)`` on ``ray_cfg.num_workers`` Ray Train workers.

    A worker failure restarts the whole group from the latest reported checkpoint, up to
    ``ray_cfg.max_failures`` times. Raises ``ray.train.TrainingFailedError`` when the run fails for good,
    and ``DataError`` / ``Diverged`` (after one attempt) when the loop found its data unusable or its
    loss not finite. Returns the result with the time stamps ``jobs.runtime.training_timings`` splits the
    run's wall time by. Call ``jobs.runtime.init_ray`` first so a local Ray stays on loopback.
    """
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", HEALTH_CHECK_INTERVAL_S)
    notes = _WorkerNotes.remote()
    trainer = TorchTrainer(
        partial(_worker, loop_fn=loop_fn, notes=notes),
        train_loop_config=loop_config,
        # Explicit, although it is Ray's default too: gloo has no GPU support, NCCL no CPU support.
        torch_config=TorchConfig(backend="nccl" if ray_cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=ray_cfg.num_workers,
            use_gpu=ray_cfg.use_gpu,
            resources_per_worker={"CPU": ray_cfg.cpus_per_worker, **({"GPU": 1} if ray_cfg.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=name,
            storage_path=_storage_uri(storage_path),
            failure_config=FailureConfig(max_failures=ray_cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    log.info("Ray Train run %s: %d workers (%s)", name, ray_cfg.num_workers, "GPU" if ray_cfg.use_gpu else "CPU")
    try:
        fit_start = time.time()
        result = trainer.fit()
        fit_end = time.time()
        error, stamps = ray.get(notes.get.remote())
    finally:
        ray.kill(notes)
    if error:
        kind, message = error
        raise (Diverged if kind == Diverged.__name__ else DataError)(message)
    return TrainingRun(result, fit_start, fit_end, stamps)
