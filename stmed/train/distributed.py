"""The few collectives the training loops and data checks use, each a no-op in a single process.

Ray Train sets up the process group (gloo on CPU, NCCL on GPU) before a loop starts; a ``LocalSession``
run, a unit test or the profiler has none, and then every function here returns its input unchanged.
Every rank must call a collective the same number of times, so callers take the same branch on all ranks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def _group_up() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (and return it); a no-op in a single process."""
    if _group_up() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def gather_dicts(part: dict[Any, Any], world_size: int) -> dict[Any, Any]:
    """Every rank's ``part`` merged into one dict on every rank (keys disjoint across ranks).

    How ranks share work split by index — data checks, reference log-probs: each computes its slice,
    then all see the whole table.
    """
    if world_size <= 1 or not _group_up():
        return part
    gathered: list[dict] = [{} for _ in range(world_size)]
    dist.all_gather_object(gathered, part)
    return {key: value for each in gathered for key, value in each.items()}
