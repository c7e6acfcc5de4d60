"""What both training stages share: settings, optimiser and schedule, the step plan, precision, export.

Stage 1 (``stmed.train.sft``) and stage 2 (``stmed.train.dpo``) run the same outer machinery around
different losses. Optimisation (:class:`TrainConfig`) follows the paper's §C.1; the learning rate warms
up linearly and decays on a cosine, per parameter group (LLM LoRA, ViT LoRA, projector). The order of
samples is a seeded permutation per epoch, cut into rank shards (:class:`StepPlan`): the samples of step
``s`` are a pure function of ``s``, so resuming needs only the step number. The plan is drawn lazily, one
permutation per epoch, so starting at any step costs the same. Stage 1 orders each step's samples by
length before cutting micro-batches (``train.group_by_length``), which pads less and leaves the step's
samples, and so its loss, as they were.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import nn
from torch.optim import AdamW
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedModel

from stmed.config import ConfigError, LoRAConfig
from stmed.model.build import DTYPES
from stmed.model.lora import (
    attach_lora,
    enable_gradient_checkpointing,
    merge_and_export,
    param_groups,
    save_trainable,
)

METRICS_FILE = "metrics.jsonl"
DATA_REPORT_FILE = "data_report.json"
ATTEMPTS_FILE = "attempts.jsonl"


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation of one training stage (paper §C.1 defaults)."""

    lr_llm: float = 2e-4
    """Peak learning rate of the LLM LoRA."""
    lr_projector: float = 2e-5
    """Peak learning rate of the (fully trained) projector."""
    lr_vit: float = 5e-5
    """Peak learning rate of the ViT LoRA."""
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    """Fraction of the steps spent warming up linearly; cosine decay to 0 afterwards."""
    epochs: int = 1
    max_steps: int = -1
    """Optimiser steps to run; -1 runs ``epochs`` full passes."""
    micro_batch_size: int = 1
    """Samples per forward/backward on one worker."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimiser step."""
    global_batch_size: int | None = None
    """Samples per optimiser step over all workers; when set, must equal micro × accum × workers."""
    max_length: int = 2048
    """Tokens per sequence (image tokens included); longer conversations are cut from the right."""
    sq_ratio: float = 0.5
    """Probability that a later user turn becomes a questioner (VUSER) turn, re-drawn at each load."""
    gradient_checkpointing: bool = False
    bf16: bool = False
    """bf16 autocast on CUDA (ignored on CPU)."""
    seed: int = 0
    log_every: int = 1
    """Steps between log lines and Ray reports (metrics.jsonl gets every step)."""
    checkpoint_every: int = 100
    """Steps between checkpoints; the last step is always checkpointed."""
    max_grad_norm: float = 1.0
    loader_workers: int = 0
    """DataLoader worker processes per training worker (0: load in the training process)."""
    group_by_length: bool = True
    """Stage 1: cut each step's micro-batches from its samples sorted by token length (longest first), so a
    micro-batch pads to a near length. The step's samples, and its loss (a mean over the step's target
    tokens), do not change; it pays off with ``grad_accum_steps`` > 1. DPO ignores it."""
    fail_at_step: int | None = None
    """Testing only: raise once on rank 0 before this (1-based) step; a marker file makes it once."""

    def __post_init__(self) -> None:
        positive = ("micro_batch_size", "grad_accum_steps", "epochs", "max_length", "log_every",
                    "checkpoint_every")  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr_llm", "lr_projector", "lr_vit", "weight_decay", "max_grad_norm", "loader_workers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"train.max_steps must be -1 (use epochs) or >= 1, got {self.max_steps}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0.0 <= self.sq_ratio <= 1.0:
            raise ConfigError(f"train.sq_ratio must be in [0, 1], got {self.sq_ratio}")


def check_global_batch(train: TrainConfig, num_workers: int) -> None:
    """Raise ``ConfigError`` unless global = micro × accum × workers (when a global size is given)."""
    actual = train.micro_batch_size * train.grad_accum_steps * num_workers
    if train.global_batch_size is not None and train.global_batch_size != actual:
        raise ConfigError(
            f"train.global_batch_size={train.global_batch_size} but train.micro_batch_size "
            f"({train.micro_batch_size}) x train.grad_accum_steps ({train.grad_accum_steps}) x "
            f"ray.num_workers ({num_workers}) = {actual}; change one of them"
        )


class Diverged(FloatingPointError):
    """The loss became NaN or infinite: the weights are spent, and a restart from the last checkpoint
    would replay the same steps, so the run ends without exporting and is not retried."""


def check_finite(row: dict[str, Any], key: str = "loss") -> None:
    """Raise ``Diverged`` when ``row[key]`` (a step's loss, the same on every rank) is not finite."""
    if not math.isfinite(row[key]):
        raise Diverged(
            f"step {row['step']}: {key} is {row[key]}; the run stops before saving it. Lower "
            "train.lr_* (or raise train.warmup_ratio) and start again"
        )


MIN_TEXT_TOKENS = 64
"""Room a sequence needs beside its image: the system prompt, a question and the start of an answer."""


def check_length_budget(train: TrainConfig, image_tokens: int) -> None:
    """``ConfigError`` unless ``train.max_length`` holds one image and some text.

    The image alone is ``image_tokens`` long (576 on a 336-px CLIP model); with less room every sample
    would be skipped and every pair rejected, so the driver checks once the processor is loaded, before
    any worker starts."""
    need = image_tokens + MIN_TEXT_TOKENS
    if train.max_length < need:
        fits = -(-(image_tokens + 4 * MIN_TEXT_TOKENS) // 256) * 256  # image + a conversation, in 256s
        raise ConfigError(
            f"train.max_length={train.max_length} leaves no room for text: one image is {image_tokens} tokens "
            f"for this model and a sample needs at least {need}; set train.max_length={fits} (or more)"
        )


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up from 0 over ``warmup_steps``, then cosine decay to 0 at ``total_steps``."""
    if step < warmup_steps:
        return step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(model: nn.Module, train: TrainConfig, total_steps: int) -> tuple[AdamW, LambdaLR]:
    """AdamW over the three parameter groups, each on the same warm-up + cosine shape of its own peak."""
    groups = param_groups(model, lr_llm=train.lr_llm, lr_vit=train.lr_vit, lr_projector=train.lr_projector,
                          weight_decay=train.weight_decay)  # fmt: skip
    optimizer = AdamW(groups, lr=train.lr_llm, weight_decay=train.weight_decay)
    warmup = math.ceil(train.warmup_ratio * total_steps)
    return optimizer, LambdaLR(optimizer, partial(lr_factor, warmup_steps=warmup, total_steps=total_steps))


@dataclass(frozen=True)
class StepPlan:
    """Which samples every rank sees at every step: a seeded permutation per epoch, cut into shards.

    With ``lengths`` (each sample's token count), a step's samples on a rank are sorted longest first
    before they are cut into micro-batches: each micro-batch then pads to a near length, and the longest
    one comes first, so a step that runs out of memory does so at once. The step's set of samples is the
    same with or without them.
    """

    num_samples: int
    rank: int
    world_size: int
    micro_batch_size: int
    grad_accum_steps: int
    seed: int
    lengths: tuple[int, ...] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        assert self.lengths is None or len(self.lengths) == self.num_samples, "one length per sample"

    @property
    def steps_per_epoch(self) -> int:
        per_rank = self.num_samples // self.world_size
        return per_rank // self.micro_batch_size // self.grad_accum_steps

    def shard(self, epoch: int) -> list[int]:
        """This rank's sample indices in ``epoch``, in order; O(num_samples), so drawn once per epoch."""
        order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + epoch))
        return order[self.rank :: self.world_size].tolist()

    def micro_batches(self, start_step: int, total_steps: int) -> Iterator[list[tuple[int, int]]]:
        """Keys of this rank's micro-batches for steps ``start_step .. total_steps - 1``, in order, lazily.

        The shard is drawn when its epoch is entered and kept until the next one, so each step costs
        O(its samples) and the cost of a start does not depend on ``start_step`` or ``total_steps``.
        """
        per_step = self.micro_batch_size * self.grad_accum_steps
        shard_epoch, order = -1, []
        for step in range(start_step, total_steps):
            epoch, within = divmod(step, self.steps_per_epoch)
            if epoch != shard_epoch:
                shard_epoch, order = epoch, self.shard(epoch)
            mine = order[within * per_step : (within + 1) * per_step]
            if self.lengths is not None:
                mine.sort(key=self.lengths.__getitem__, reverse=True)  # stable: ties keep the shard's order
            for i in range(0, per_step, self.micro_batch_size):
                yield [(epoch, index) for index in mine[i : i + self.micro_batch_size]]

    def batches(self, dataset: Dataset, start_step: int, total_steps: int, collate_fn: Callable[[list], Any],
                num_workers: int = 0) -> Iterator[Any]:  # fmt: skip
        """This rank's collated micro-batches for the steps after ``start_step``, in order.

        The keys go to the loader as a generator: a map-style dataset's loader only iterates its batch
        sampler (``len`` is asked only of ``len(loader)``, which nothing calls). The shards' permutations
        use their own generator, so drawing them mid-run leaves the global RNG (dropout) alone.
        """
        loader = DataLoader(dataset, batch_sampler=self.micro_batches(start_step, total_steps),
                            collate_fn=collate_fn, num_workers=num_workers)  # fmt: skip
        with torch.random.fork_rng(devices=[]):  # iter() draws a base seed; keep dropout's stream untouched
            return iter(loader)


def plan_steps(num_samples: int, train: TrainConfig, rank: int, world_size: int,
               lengths: Sequence[int] | None = None) -> tuple[StepPlan, int]:  # fmt: skip
    """The step plan and the total number of optimiser steps; ValueError if one step cannot be filled.

    ``lengths`` (each sample's token count; stage 1 passes them) group each step's micro-batches by
    length when ``train.group_by_length`` is on.
    """
    grouped = tuple(lengths) if lengths is not None and train.group_by_length else None
    plan = StepPlan(num_samples, rank, world_size, train.micro_batch_size, train.grad_accum_steps, train.seed,
                    grouped)  # fmt: skip
    if plan.steps_per_epoch == 0:
        need = train.micro_batch_size * train.grad_accum_steps * world_size
        raise ValueError(
            f"{num_samples} usable samples cannot fill one step of {need} "
            "(micro_batch_size x grad_accum_steps x workers); use more data or a smaller batch"
        )
    total = train.max_steps if train.max_steps > 0 else train.epochs * plan.steps_per_epoch
    return plan, total


def uses_autocast(train: TrainConfig, device: torch.device) -> bool:
    """bf16 autocast runs on CUDA only: on CPU it is slower than fp32 and the tiny model does not need it."""
    return train.bf16 and device.type == "cuda"


def autocast_context(
    train: TrainConfig, device: torch.device
) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the forward pass's context: bf16 autocast (see :func:`uses_autocast`) or nothing."""
    if uses_autocast(train, device):
        return partial(torch.autocast, "cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def make_trainable(model: PreTrainedModel, lora: LoRAConfig, gradient_checkpointing: bool,
                   upcast: bool) -> PeftModel:  # fmt: skip
    """``attach_lora`` plus what training needs: fp32 trainable weights (``upcast``), checkpointing.

    Upcast only when the step runs under autocast: bf16 cannot hold a 2e-5 update to an O(1e-2)
    weight, and autocast still runs the matmuls in bf16; without autocast an fp32 projector would meet
    bf16 activations and fail.
    """
    peft_model = attach_lora(model, lora)
    for param in peft_model.parameters():
        if upcast and param.requires_grad:
            param.data = param.data.float()
    if gradient_checkpointing:
        enable_gradient_checkpointing(peft_model)
    return peft_model


def maybe_inject_failure(train: TrainConfig, step: int, rank: int, output_dir: Path) -> None:
    """Fault injection for tests: raise once (marker file) on rank 0 before step ``fail_at_step``."""
    if train.fail_at_step != step or rank != 0:
        return
    marker = output_dir / f".fault_injected_step{step}"
    if not marker.exists():
        marker.touch()
        raise RuntimeError(f"injected failure before step {step} (train.fail_at_step)")


def export_final(peft_model: PeftModel, processor, output_dir: str | Path, dtype: str, merged: bool) -> None:
    """Rank 0, after the last step: adapter/ (trainable weights) and, if ``merged``, merged/ (a plain HF
    checkpoint in the model's ``dtype``)."""
    out = Path(output_dir)
    peft_model.eval()
    save_trainable(peft_model, out / "adapter")
    if merged:
        peft_model.to(dtype=DTYPES[dtype])  # the upcast trainable weights back to the model's dtype
        hf_config = peft_model.get_base_model().config
        hf_config.use_cache = hf_config.text_config.use_cache = True  # undo the training-time setting
        merge_and_export(peft_model, processor, out / "merged", inplace=True)
