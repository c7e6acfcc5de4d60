"""Stage-1 training (METHOD §2): LoRA SFT on answers *and* questions, one loop for every launcher.

The loop a Ray Train worker runs is :func:`train_sft`; it knows nothing of Ray: its launcher is a
``stmed.train.session.TrainSession`` (``actors.training.RayTrainSession`` under Ray, ``LocalSession`` in
a plain process for profiling on one GPU box and unit tests).

What one optimiser step computes. Each rank takes ``grad_accum_steps`` micro-batches of its shard; the
loss is next-token cross-entropy summed over every target token of the *global* step and divided by the
global target count, so the gradient is the same whatever the split into ranks and micro-batches. That
is what lets the step plan order a step's samples by length before cutting micro-batches
(``train.group_by_length``): each micro-batch pads less, and the step's loss is unchanged. L_qa
and L_vq are the same mean over answer tokens and question tokens alone (``loss_kind``), reported beside
the total: they are the only way to see that the model learns to ask (METHOD §2; ``stmed.train.losses``).
Stage 2 (``stmed.train.dpo``) shares the config, schedule, step plan and export (``stmed.train.stage``).

Data (``stmed.data.sft``) is checked once, skips counted with reasons. Order: a seeded permutation per
epoch, cut into rank shards (``StepPlan``); the samples of step ``s`` are a pure function of ``s``,
and so are their questioner relabellings, so resuming needs only the step number.

A checkpoint (``stmed.train.checkpoints``) holds the trainable weights, the optimiser and scheduler
state, the step, and each rank's RNG state (dropout): a resumed run continues at the saved step.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim import AdamW
from torch.optim.lr_scheduler import LambdaLR

from stmed.config import LoRAConfig, ModelConfig, build_config
from stmed.data.sft import SFTDataset, collate_sft, load_sft_data
from stmed.log import get_logger
from stmed.model.build import load_model
from stmed.model.conversation import IGNORE_INDEX
from stmed.model.families import forward_inputs
from stmed.runs import MetricsLog, write_json
from stmed.train.checkpoints import report_step, resume
from stmed.train.distributed import all_reduce_sum, gather_dicts
from stmed.train.losses import first_scored_position, loss_means, loss_stats, token_losses
from stmed.train.session import TrainSession
from stmed.train.stage import (
    ATTEMPTS_FILE,
    DATA_REPORT_FILE,
    METRICS_FILE,
    TrainConfig,
    autocast_context,
    build_optimizer,
    check_finite,
    export_final,
    make_trainable,
    maybe_inject_failure,
    plan_steps,
    uses_autocast,
)

log = get_logger(__name__)


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


def _prepare(cfg: SFTLoopConfig, session: TrainSession):
    """The LoRA model, its processor, and the checked data."""
    torch.manual_seed(cfg.train.seed)  # same LoRA init on every rank
    model, processor = load_model(cfg.model)
    peft_model = make_trainable(model, cfg.lora, cfg.train.gradient_checkpointing,
                                upcast=uses_autocast(cfg.train, session.device))  # fmt: skip
    data = load_sft_data(cfg.instruct_path, cfg.image_root, processor, cfg.train.max_length,
                         session.world_rank, session.world_size,
                         gather=partial(gather_dicts, world_size=session.world_size))  # fmt: skip
    return peft_model, processor, data


def sft_step(model: nn.Module, micro: list[dict[str, torch.Tensor]], optimizer: AdamW, scheduler: LambdaLR,
             train: TrainConfig, world_size: int, device: torch.device) -> tuple[torch.Tensor, float]:  # fmt: skip
    """One optimiser step over this rank's micro-batches; what the profiler and the benchmark time.

    Returns the step's statistics summed over ranks — ``[ce_sum, n, ce_sum_qa, n_qa, ce_sum_vq, n_vq,
    tokens, samples, positions]`` (float64, CPU; ``positions`` counts padding too) — and the gradient norm
    before clipping.
    """
    # The global target count first, so every micro-batch's loss is scaled to the global token mean.
    n_local = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
    n_global = all_reduce_sum(torch.tensor([float(n_local)], device=device)).item()
    autocast = autocast_context(train, device)
    stats = torch.zeros(9, dtype=torch.float64, device=device)
    for i, batch in enumerate(micro):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        last = i == len(micro) - 1
        # DDP all-reduces gradients on every backward unless told not to; once per step is enough.
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast():
                # Logits from the first target on: the image and first question need none.
                start = first_scored_position(batch["labels"])
                keep = batch["input_ids"].shape[1] - start
                logits = model(**forward_inputs(model, batch), logits_to_keep=keep).logits
                ce, kinds = token_losses(logits, batch["labels"][:, start:], batch["loss_kind"][:, start:])
            # DDP averages over ranks, hence x world_size: the result is sum(CE) / global target count.
            (ce.sum() * world_size / n_global).backward()
        stats[:6] += loss_stats(ce, kinds)
        stats[6] += batch["attention_mask"].sum()
        stats[7] += batch["input_ids"].shape[0]
        stats[8] += batch["input_ids"].numel()
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
    plan, total_steps = plan_steps(len(data.samples), train, rank, world, lengths=data.lengths)

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

    dataset = SFTDataset(
        data.samples, cfg.image_root, processor, train.max_length, train.sq_ratio, train.seed
    )
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
               "pad_tokens": int(stats[8] - stats[6]), "n_qa_tokens": int(stats[3]), "n_vq_tokens": int(stats[5]),
               **lrs}  # fmt: skip
        if rank == 0:
            metrics_log.write(row)
            if step % train.log_every == 0 or step == total_steps:
                log.info("step %d/%d loss %.4f (qa %.4f, vq %.4f) %.0f tok/s", step, total_steps, row["loss"],
                         row["loss_qa"], row["loss_vq"], row["tokens_per_s"])  # fmt: skip
        check_finite(row)  # before a checkpoint or an export can keep NaN weights
        report_step(session, row, peft_model, optimizer, scheduler, train, total_steps)
    if rank == 0:
        export_final(peft_model, processor, cfg.output_dir, cfg.model.dtype, cfg.export_merged)
