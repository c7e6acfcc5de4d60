"""Stage-1 training (METHOD §2): LoRA SFT on answers *and* questions, one loop for every launcher.

The loop a Ray Train worker runs is :func:`train_sft`; it knows nothing of Ray. What differs between
launchers is behind a small :class:`TrainSession` (rank, device, DDP wrapping, reporting, the checkpoint
to resume from): ``actors.training.RayTrainSession`` under Ray, :class:`LocalSession` in a plain process
(profiling on one GPU box, unit tests).

What one optimiser step computes. Each rank takes ``grad_accum_steps`` micro-batches of its shard; the
loss is next-token cross-entropy summed over every target token of the *global* step and divided by the
global target count, so the gradient is the same whatever the split into ranks and micro-batches. L_qa
and L_vq are the same mean over answer tokens and question tokens alone (``loss_kind``), reported beside
the total: they are the only way to see that the model learns to ask (METHOD §2; ``stmed.losses``).
Stage 2 (``stmed.dpo``) reuses the config, schedule, step plan, sessions and export defined here.

Data (``stmed.sft_data``) is checked once, skips counted with reasons. Order: a seeded permutation per
epoch, cut into rank shards (:class:`StepPlan`); the samples of step ``s`` are a pure function of ``s``,
and so are their questioner relabellings, so resuming needs only the step number.

A checkpoint (``stmed.checkpoints``) holds the trainable weights, the optimiser and scheduler state, the
step, and each rank's RNG state (dropout): a resumed run continues at the saved step.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch
from peft import PeftModel
from torch import nn
from torch.optim import AdamW
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedModel

from stmed.checkpoints import report_step, resume, store_checkpoint, stored_checkpoints
from stmed.config import ConfigError, LoRAConfig, ModelConfig, build_config
from stmed.conversation import IGNORE_INDEX
from stmed.distributed import all_reduce_sum
from stmed.log import get_logger
from stmed.losses import loss_means, loss_stats, token_losses
from stmed.model import (
    DTYPES,
    attach_lora,
    enable_gradient_checkpointing,
    load_model,
    merge_and_export,
    param_groups,
    save_trainable,
)
from stmed.runs import MetricsLog, write_json
from stmed.sft_data import SFTDataset, collate_sft, load_sft_data

log = get_logger(__name__)

METRICS_FILE = "metrics.jsonl"
DATA_REPORT_FILE = "data_report.json"
ATTEMPTS_FILE = "attempts.jsonl"


# ----------------------------------------------------------------------------- configuration


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


@dataclass(frozen=True)
class SFTLoopConfig:
    """Everything one worker of :func:`train_sft` needs (passed to it as a plain dict)."""

    model: ModelConfig
    lora: LoRAConfig
    train: TrainConfig
    instruct_path: str
    image_root: str
    output_dir: str
    """metrics.jsonl, data_report.json, adapter/ and merged/ are written here (rank 0)."""
    export_merged: bool = True


# ----------------------------------------------------------------------------- schedule


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


# ----------------------------------------------------------------------------- step plan


@dataclass(frozen=True)
class StepPlan:
    """Which samples every rank sees at every step: a seeded permutation per epoch, cut into shards."""

    num_samples: int
    rank: int
    world_size: int
    micro_batch_size: int
    grad_accum_steps: int
    seed: int

    @property
    def steps_per_epoch(self) -> int:
        per_rank = self.num_samples // self.world_size
        return per_rank // self.micro_batch_size // self.grad_accum_steps

    def micro_batches(self, start_step: int, total_steps: int) -> Iterator[list[tuple[int, int]]]:
        """Keys of this rank's micro-batches for steps ``start_step .. total_steps - 1``, in order."""
        per_step = self.micro_batch_size * self.grad_accum_steps
        for step in range(start_step, total_steps):
            epoch, within = divmod(step, self.steps_per_epoch)
            order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + epoch))
            shard = order[self.rank :: self.world_size].tolist()
            mine = shard[within * per_step : (within + 1) * per_step]
            for i in range(0, per_step, self.micro_batch_size):
                yield [(epoch, index) for index in mine[i : i + self.micro_batch_size]]

    def batches(self, dataset: Dataset, start_step: int, total_steps: int, collate_fn: Callable[[list], Any],
                num_workers: int = 0) -> Iterator[Any]:  # fmt: skip
        """This rank's collated micro-batches for the steps after ``start_step``, in order."""
        loader = DataLoader(dataset, batch_sampler=list(self.micro_batches(start_step, total_steps)),
                            collate_fn=collate_fn, num_workers=num_workers)  # fmt: skip
        with torch.random.fork_rng(devices=[]):  # iter() draws a base seed; keep dropout's stream untouched
            return iter(loader)


def plan_steps(num_samples: int, train: TrainConfig, rank: int, world_size: int) -> tuple[StepPlan, int]:
    """The step plan and the total number of optimiser steps; ValueError if one step cannot be filled."""
    plan = StepPlan(num_samples, rank, world_size, train.micro_batch_size, train.grad_accum_steps, train.seed)
    if plan.steps_per_epoch == 0:
        need = train.micro_batch_size * train.grad_accum_steps * world_size
        raise ValueError(f"{num_samples} usable samples cannot fill one step of {need} "
                         "(micro_batch_size x grad_accum_steps x workers); use more data or a smaller batch")
    total = train.max_steps if train.max_steps > 0 else train.epochs * plan.steps_per_epoch
    return plan, total


# ----------------------------------------------------------------------------- sessions


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


# ----------------------------------------------------------------------------- the loop


def maybe_inject_failure(train: TrainConfig, step: int, rank: int, output_dir: Path) -> None:
    """Fault injection for tests: raise once (marker file) on rank 0 before step ``fail_at_step``."""
    if train.fail_at_step != step or rank != 0:
        return
    marker = output_dir / f".fault_injected_step{step}"
    if not marker.exists():
        marker.touch()
        raise RuntimeError(f"injected failure before step {step} (train.fail_at_step)")


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


def _prepare(cfg: SFTLoopConfig, session: TrainSession):
    """The LoRA model, its processor, and the checked data."""
    torch.manual_seed(cfg.train.seed)  # same LoRA init on every rank
    model, processor = load_model(cfg.model)
    peft_model = make_trainable(model, cfg.lora, cfg.train.gradient_checkpointing,
                                upcast=uses_autocast(cfg.train, session.device))  # fmt: skip
    data = load_sft_data(cfg.instruct_path, cfg.image_root, processor, cfg.train.max_length,
                         session.world_rank, session.world_size)  # fmt: skip
    return peft_model, processor, data


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


def sft_step(model: nn.Module, micro: list[dict[str, torch.Tensor]], optimizer: AdamW, scheduler: LambdaLR,
             train: TrainConfig, world_size: int, device: torch.device) -> tuple[torch.Tensor, float]:  # fmt: skip
    """One optimiser step over this rank's micro-batches; what the profiler and the benchmark time.

    Returns the step's statistics summed over ranks — ``[ce_sum, n, ce_sum_qa, n_qa, ce_sum_vq, n_vq,
    tokens, samples]`` (float64, CPU) — and the gradient norm before clipping.
    """
    # The global target count first, so every micro-batch's loss is scaled to the global token mean.
    n_local = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
    n_global = all_reduce_sum(torch.tensor([float(n_local)], device=device)).item()
    autocast = autocast_context(train, device)
    stats = torch.zeros(8, dtype=torch.float64, device=device)
    for i, batch in enumerate(micro):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        last = i == len(micro) - 1
        # DDP all-reduces gradients on every backward unless told not to; once per step is enough.
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast():
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               pixel_values=batch["pixel_values"]).logits  # fmt: skip
                ce, kinds = token_losses(logits, batch["labels"], batch["loss_kind"])
            # DDP averages over ranks, hence x world_size: the result is sum(CE) / global target count.
            (ce.sum() * world_size / n_global).backward()
        stats[:6] += loss_stats(ce, kinds)
        stats[6] += batch["attention_mask"].sum()
        stats[7] += batch["input_ids"].shape[0]
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, train.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return all_reduce_sum(stats).cpu(), float(grad_norm)


def train_sft(config: dict[str, Any], session: TrainSession) -> None:
    """Stage-1 LoRA SFT on one worker; resumes from ``session.latest_checkpoint()`` when there is one."""
    cfg = build_config(SFTLoopConfig, config)
    train, out = cfg.train, Path(cfg.output_dir)
    rank, world, device = session.world_rank, session.world_size, session.device
    peft_model, processor, data = _prepare(cfg, session)
    plan, total_steps = plan_steps(len(data.samples), train, rank, world)

    model = session.prepare_model(peft_model)
    optimizer, scheduler = build_optimizer(peft_model, train, total_steps)
    start_step = resume(session, peft_model, optimizer, scheduler, train.seed)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / DATA_REPORT_FILE, data.report())
        MetricsLog(out / ATTEMPTS_FILE).write({"start_step": start_step, "total_steps": total_steps,
                                               "world_size": world, "time": time.time()})  # fmt: skip
        log.info("training %d steps from step %d: %d samples, %d steps/epoch, %d workers",
                 total_steps, start_step, len(data.samples), plan.steps_per_epoch, world)  # fmt: skip

    dataset = SFTDataset(data.samples, cfg.image_root, processor, train.max_length, train.sq_ratio, train.seed)
    collate_fn = partial(collate_sft, pad_id=processor.tokenizer.pad_token_id)
    batches = plan.batches(dataset, start_step, total_steps, collate_fn, train.loader_workers)
    metrics_log = MetricsLog(out / METRICS_FILE)
    model.train()
    for step in range(start_step + 1, total_steps + 1):
        maybe_inject_failure(train, step, rank, out)
        started = time.perf_counter()
        micro = [next(batches) for _ in range(train.grad_accum_steps)]
        lrs = {f"lr_{group['name']}": group["lr"] for group in optimizer.param_groups}  # this step's lr
        stats, grad_norm = sft_step(model, micro, optimizer, scheduler, train, world, device)
        elapsed = time.perf_counter() - started
        row = {"step": step, "epoch": (step - 1) // plan.steps_per_epoch, **loss_means(stats[:6]),
               "grad_norm": grad_norm, "tokens": int(stats[6]), "samples": int(stats[7]),
               "tokens_per_s": float(stats[6]) / elapsed,
               "samples_per_s": float(stats[7]) / elapsed, "step_time_s": elapsed,
               "n_qa_tokens": int(stats[3]), "n_vq_tokens": int(stats[5]), **lrs}  # fmt: skip
        if rank == 0:
            metrics_log.write(row)
            if step % train.log_every == 0 or step == total_steps:
                log.info("step %d/%d loss %.4f (qa %.4f, vq %.4f) %.0f tok/s", step, total_steps, row["loss"],
                         row["loss_qa"], row["loss_vq"], row["tokens_per_s"])  # fmt: skip
        report_step(session, row, peft_model, optimizer, scheduler, train, total_steps)
    if rank == 0:
        export_final(peft_model, processor, cfg.output_dir, cfg.model.dtype, cfg.export_merged)
