"""Training checkpoints: what one holds, when a loop writes one, and how a run resumes from it.

A checkpoint directory holds the trainable weights (``adapter/``, ``stmed.model.lora.save_trainable``), the
optimiser and scheduler state with the step (``trainer_state.pt``), and each rank's RNG state
(``rng_rank{r}.pt``: dropout), so a resumed run continues at the saved step with the same random streams.
The loop writes it to a temporary directory and hands it to its session
(``stmed.train.session.TrainSession``), which persists it: Ray Train's storage, or ``stmed.train.session.store_checkpoint`` under a local folder.
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from stmed.log import get_logger
from stmed.model.lora import load_trainable, save_trainable
from stmed.train.session import TrainSession
from stmed.train.stage import TrainConfig

log = get_logger(__name__)


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out_dir: Path, model, optimizer: Optimizer, scheduler: LRScheduler, step: int,
                    rank: int) -> None:  # fmt: skip
    """Rank 0 writes weights + optimiser + scheduler + step; every rank writes its own RNG state."""
    if rank == 0:
        save_trainable(model, out_dir / "adapter")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step},
                   out_dir / "trainer_state.pt")  # fmt: skip
    torch.save(_rng_state(), out_dir / f"rng_rank{rank}.pt")


def load_checkpoint(ckpt: Path, model, optimizer: Optimizer, scheduler: LRScheduler, rank: int) -> int:
    """Restore a :func:`save_checkpoint` directory into a prepared model/optimiser; returns its step."""
    load_trainable(model, ckpt / "adapter")
    # weights_only=False: the state holds plain Python RNG tuples; the file is our own checkpoint.
    state = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng_file = ckpt / f"rng_rank{rank}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))
    else:  # resumed with more workers than were saved: a fresh, still rank-distinct stream
        log.warning("no RNG state for rank %d in %s; reseeding", rank, ckpt)
        torch.manual_seed(state["step"] * 1000 + rank)
    return int(state["step"])


def resume(session: TrainSession, model, optimizer: Optimizer, scheduler: LRScheduler, seed: int) -> int:
    """The step to continue from: the session's latest checkpoint restored, or 0 for a fresh start."""
    ckpt = session.latest_checkpoint()
    if ckpt is None:
        torch.manual_seed(seed + 1 + session.world_rank)  # dropout differs across ranks
        return 0
    # Every rank loads the same weights, so the DDP replicas stay identical after a resume.
    return load_checkpoint(ckpt, model, optimizer, scheduler, session.world_rank)


def report_step(session: TrainSession, row: dict[str, Any], model, optimizer: Optimizer,
                scheduler: LRScheduler, train: TrainConfig, total_steps: int) -> None:  # fmt: skip
    """Report ``row`` to the session, with a checkpoint every ``checkpoint_every`` steps and at the end.

    Every rank calls this at every step, so every rank reports (and saves its RNG state) the same times.
    """
    step = row["step"]
    if step % train.checkpoint_every == 0 or step == total_steps:
        with tempfile.TemporaryDirectory(prefix="stmed-ckpt-") as tmp:
            save_checkpoint(Path(tmp), model, optimizer, scheduler, step, session.world_rank)
            session.report(row, Path(tmp))
    elif step % train.log_every == 0:
        session.report(row, None)
