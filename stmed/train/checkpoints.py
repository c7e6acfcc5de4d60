"""Training checkpoints: what one holds, when a loop writes one, and how a run resumes from it.

A checkpoint directory holds the trainable weights (``adapter/``, ``stmed.model.lora.save_trainable``), the
optimiser and scheduler state with the step (``trainer_state.pt``), and each rank's RNG state
(``rng_rank{r}.json``: dropout), so a resumed run continues at the saved step with the same random streams.

Nothing in a checkpoint folder can run code: ``trainer_state.pt`` is read with ``weights_only=True``
(tensors and plain containers only; anything else is refused with a ``DataError``), the RNG states are
JSON, the adapter is safetensors, and every other file (an ``rng_rank0.pt`` of an older stmed, a planted
pickle) is never opened. Checkpoint folders live on shared storage that other people can write to.
The loop writes it to a temporary directory and hands it to its session
(``stmed.train.session.TrainSession``), which persists it: Ray Train's storage, or ``stmed.train.session.store_checkpoint`` under a local folder.
"""

from __future__ import annotations

import json
import pickle
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from stmed.data.records import DataError
from stmed.log import get_logger
from stmed.model.lora import load_trainable, save_trainable
from stmed.train.session import TrainSession
from stmed.train.stage import TrainConfig

log = get_logger(__name__)


TRAINER_STATE = "trainer_state.pt"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def rng_file(ckpt: Path, rank: int) -> Path:
    return ckpt / f"rng_rank{rank}.json"


def _rng_state() -> dict[str, Any]:
    """Every RNG stream as JSON-able lists: Python's Mersenne state, numpy's, torch's (and CUDA's) bytes."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((str(kind), np.array(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def save_checkpoint(out_dir: Path, model, optimizer: Optimizer, scheduler: LRScheduler, step: int,
                    rank: int) -> None:  # fmt: skip
    """Rank 0 writes weights + optimiser + scheduler + step; every rank writes its own RNG state."""
    if rank == 0:
        save_trainable(model, out_dir / "adapter")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step},
                   out_dir / TRAINER_STATE)  # fmt: skip
    rng_file(out_dir, rank).write_text(json.dumps(_rng_state()))


def read_trainer_state(ckpt: Path) -> dict[str, Any]:
    """``trainer_state.pt`` read as tensors and plain containers only: a pickled object is refused."""
    path = ckpt / TRAINER_STATE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = " ".join(str(err).split("\n", 1)[0].split())[:160]
        raise DataError(f"{path}: not a checkpoint stmed wrote, it holds objects other than tensors "
                        f"(refused, nothing was run: {reason}); delete {ckpt} to resume from an earlier "
                        "checkpoint, or start a new run") from None
    except (OSError, RuntimeError, EOFError) as err:
        raise DataError(f"{path}: unreadable ({type(err).__name__}); delete {ckpt} to resume from an "
                        "earlier checkpoint") from None
    if not isinstance(state, dict) or not {"optimizer", "scheduler", "step"} <= set(state):
        raise DataError(f"{path}: not a trainer state (expected optimizer, scheduler and step); "
                        f"delete {ckpt}")
    return state


def _read_rng(ckpt: Path, rank: int) -> dict[str, Any] | None:
    path = rng_file(ckpt, rank)
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
        _set_rng_state(state)
    except (ValueError, TypeError, KeyError, RuntimeError) as err:
        log.warning("unreadable RNG state %s (%s); reseeding", path, type(err).__name__)
        return None
    return state


def load_checkpoint(ckpt: Path, model, optimizer: Optimizer, scheduler: LRScheduler, rank: int) -> int:
    """Restore a :func:`save_checkpoint` directory into a prepared model/optimiser; returns its step."""
    if not (ckpt / "adapter" / ADAPTER_WEIGHTS).is_file():
        raise DataError(f"{ckpt}: no adapter/{ADAPTER_WEIGHTS} (stmed reads safetensors weights only); "
                        "delete this checkpoint folder to resume from an earlier one")
    state = read_trainer_state(ckpt)
    load_trainable(model, ckpt / "adapter")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if _read_rng(ckpt, rank) is None:  # more workers than were saved: a fresh, rank-distinct stream
        log.warning("no RNG state for rank %d in %s; reseeding", rank, ckpt)
        torch.manual_seed(int(state["step"]) * 1000 + rank)
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
