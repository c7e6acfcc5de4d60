"""Where a training loop runs: the small interface it needs from its launcher, and a plain-process one.

What differs between launchers is behind :class:`TrainSession` (rank, device, DDP wrapping, reporting,
the checkpoint to resume from): ``actors.training.RayTrainSession`` under Ray, :class:`LocalSession` in
a plain process (profiling on one GPU box, unit tests), which keeps its checkpoints in a local folder.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn


class TrainSession(Protocol):
    """What the loop needs from its launcher (Ray Train, or a plain process)."""

    world_rank: int
    world_size: int
    device: torch.device

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Move to the device and wrap for data parallelism (identity for one process)."""

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None) -> None:
        """Record metrics (and persist ``checkpoint_dir``); every rank calls it the same number of times."""

    def latest_checkpoint(self) -> Path | None:
        """The checkpoint to resume from, or None for a fresh start."""


class LocalSession:
    """A single-process session: no Ray, no process group; checkpoints kept under ``checkpoint_root``."""

    world_rank = 0
    world_size = 1

    def __init__(self, checkpoint_root: str | Path, device: str = "cpu", num_to_keep: int = 2):
        self.checkpoint_root = Path(checkpoint_root)
        self.device = torch.device(device)
        self.num_to_keep = num_to_keep
        self.reports: list[dict[str, Any]] = []
        self.model: nn.Module | None = None
        """The model the loop trained (kept for profiling and tests)."""

    def prepare_model(self, model: nn.Module) -> nn.Module:
        self.model = model.to(self.device)
        return self.model

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir is not None:
            store_checkpoint(checkpoint_dir, self.checkpoint_root, int(metrics["step"]), self.num_to_keep)

    def latest_checkpoint(self) -> Path | None:
        found = stored_checkpoints(self.checkpoint_root)
        return found[-1] if found else None


def store_checkpoint(checkpoint_dir: Path, root: Path, step: int, num_to_keep: int) -> Path:
    """Copy a checkpoint to ``root/checkpoint_{step:06d}``, keeping only the newest ``num_to_keep``."""
    target = root / f"checkpoint_{step:06d}"
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(checkpoint_dir, tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)  # a crash mid-copy never leaves a half checkpoint that looks complete
    for old in stored_checkpoints(root)[:-num_to_keep]:
        shutil.rmtree(old)
    return target


def stored_checkpoints(root: Path) -> list[Path]:
    """The complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("checkpoint_*") if not p.name.endswith(".tmp"))
