"""Stage 2 (METHOD §4): DPO of the stage-1 model on its own judged answer pairs, one loop for every launcher.

The loss (``stmed.train.losses.dpo_loss``) is sigmoid DPO on sequence log-probabilities summed over the answer
tokens only: ``L = -log σ(β·[(log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))])``, and the
implicit rewards are ``β·(log π − log π_ref)``. Each pair is rendered with the plain Vicuna v1 prompt
(``preference_prompt``, no questioner) and encoded by ``encode_prompt_answer``, whose label mask marks
the answer and its ``</s>`` — the same mask convention as stage 1 (``stmed.data.pairs``).

The reference policy is the frozen stage-1 model *entirely*, vision tower and projector included (the
reference code's quirk embedded images with the drifting policy tower; we do not). The policy is a fresh
LoRA on the merged stage-1 weights, and ``attach_lora`` makes the projector a PEFT ``modules_to_save``
module: PEFT trains a copy and keeps the original projector frozen beside it. So
``with peft_model.disable_adapter():`` switches off both LoRAs *and* routes images through that frozen
original projector — the stage-1 model exactly, with no second model in memory. The tests check this
against an independently loaded stage-1 model. With ``dpo.precompute_reference`` the reference
log-probabilities are computed once before training (ranks split the work and share the table, which is
cached in ``output_dir`` for resumes) instead of a second forward pass every step.

Why a hand loop and not TRL's ``DPOTrainer``: the trainer tokenises prompts with its own processor and
chat template, which would bypass our Vicuna rendering and offset-based label masks, and it brings a
second checkpoint/resume/reporting mechanism (HF ``Trainer`` + ``RayTrainReportCallback``, which reports
only when HF saves). The loop below reuses stage 1's schedule, optimiser groups, step plan, sessions
(``stmed.train.sft``) and checkpoints (``stmed.train.checkpoints``); it only swaps the data
(``stmed.data.pairs``), the loss and the reference pass. Chosen and rejected go through the model
together — by default packed, each pair one row with its image and prompt once and both answers on top
(``dpo.shared_prefix``, ``stmed.model.packing``), else as one concatenated batch of 2B rows — so DDP
sees one forward per backward in which every trainable parameter takes part; the reference pass runs on
the unwrapped model without a graph. That is why Ray's default
``find_unused_parameters=False`` works here (the trap ARCHITECTURE.md records for TRL under DDP does not
arise).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from stmed.config import ConfigError, LoRAConfig, ModelConfig, build_config, config_to_dict
from stmed.data.pairs import PreferenceDataset, collate_pairs, collate_shared_pairs, load_preference_data
from stmed.data.records import PreferencePair
from stmed.log import get_logger
from stmed.model.build import load_model
from stmed.model.families import family_of, forward_inputs, hf_model, image_kwargs
from stmed.model.packing import (
    CHOSEN,
    MASKABLE_ATTENTION,
    SHARED,
    attention_mask_as,
    block_attention_mask,
    branch_positions,
)
from stmed.model.prompts import SYSTEM_PLAIN, SYSTEM_SQ
from stmed.runs import MetricsLog, write_json
from stmed.train.checkpoints import report_step, resume
from stmed.train.distributed import all_reduce_sum, gather_dicts
from stmed.train.losses import (
    answer_token_counts,
    dpo_loss,
    dpo_metrics,
    dpo_stats,
    first_scored_position,
    sequence_logps,
    with_sft_term,
)
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

REFERENCE_CACHE_FILE = "reference_logps.pt"


# ----------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class DPOSettings:
    """The preference objective."""

    beta: float = 0.1
    """Strength of the KL anchor to the reference (reference code default; the paper does not print it)."""
    precompute_reference: bool = False
    """Compute the reference log-probs once before training instead of a second forward pass per step."""
    sft_weight: float = 0.0
    """Weight of the chosen answer's mean token NLL added to the DPO loss (RPO-style; 0 = plain DPO)."""
    system: str = "plain"
    """System prompt the pairs are rendered with: ``plain`` (METHOD §4's plain Vicuna) or ``sq`` (stage 1's
    and the default evaluation's, under which the pairs' answers were sampled)."""
    shared_prefix: bool = True
    """Run each pair's image and prompt once, with both answers packed on top (``stmed.model.packing``),
    for the policy and the reference pass; the same log-probs as two separate sequences. Falls back to
    separate sequences (with a warning) for a family or attention kernel that cannot take the mask."""

    @property
    def system_prompt(self) -> str:
        return SYSTEM_PLAIN if self.system == "plain" else SYSTEM_SQ

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ConfigError(f"dpo.beta must be > 0, got {self.beta}")
        if self.sft_weight < 0:
            raise ConfigError(f"dpo.sft_weight must be >= 0, got {self.sft_weight}")
        if self.system not in ("plain", "sq"):
            raise ConfigError(f"dpo.system must be 'plain' or 'sq', got {self.system!r}")


@dataclass(frozen=True)
class DPOTrainConfig(TrainConfig):
    """Optimisation of stage 2: as ``TrainConfig``, with the DPO learning rates of METHOD §4 as defaults."""

    lr_llm: float = 5e-6
    lr_projector: float = 2e-5
    lr_vit: float = 2e-5


@dataclass(frozen=True)
class DPOLoRAConfig(LoRAConfig):
    """Stage-2 LoRA: the stage-1 ranks, with ViT LoRA dropout 0.1 (METHOD §2 table)."""

    vit_dropout: float = 0.1


@dataclass(frozen=True)
class DPOLoopConfig:
    """Everything one worker of :func:`train_dpo` needs (passed to it as a plain dict)."""

    model: ModelConfig
    """The merged stage-1 checkpoint: the policy's start and the reference."""
    preferences_path: str
    image_root: str
    output_dir: str
    """metrics.jsonl, data_report.json, adapter/, merged/ (and the reference cache) are written here."""
    lora: DPOLoRAConfig = field(default_factory=DPOLoRAConfig)
    train: DPOTrainConfig = field(default_factory=DPOTrainConfig)
    dpo: DPOSettings = field(default_factory=DPOSettings)
    export_merged: bool = True


# ----------------------------------------------------------------------------- the reference policy


def _attention(hf) -> str | None:
    """The language model's attention implementation (where the packed mask goes)."""
    return getattr(getattr(hf.config, "text_config", hf.config), "_attn_implementation", None)


def can_share_prefix(model: torch.nn.Module) -> str | None:
    """Why ``model`` cannot run packed pairs (``dpo.shared_prefix``), or None when it can."""
    hf = hf_model(model)
    family, attention = family_of(hf), _attention(hf)
    if not family.shares_prefix:
        return f"the {family.name} family does not support packed pairs"
    if attention not in MASKABLE_ATTENTION:
        return (f"attention {attention!r} takes no custom mask "
                f"(packing needs one of {list(MASKABLE_ATTENTION)})")
    return None


def forward_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed answer log-probs of a pair batch, shape ``(2B,)``: the B chosen answers, then the B rejected.

    Takes both layouts: :func:`collate_pairs` (2B separate rows) and :func:`collate_shared_pairs` (B packed
    rows with ``segments``). Positions are the family's own (M-RoPE for Qwen2.5-VL), passed explicitly;
    logits are computed only from the batch's first answer position on (``logits_to_keep``), which leaves
    out the image and prompt rows of the vocabulary projection.
    """
    label_rows = [batch["labels"]] + ([batch["rejected_labels"]] if "segments" in batch else [])
    start = min(first_scored_position(labels) for labels in label_rows)
    if "segments" in batch:
        hf, segments = hf_model(model), batch["segments"]
        images, ids = image_kwargs(batch), batch["input_ids"]
        family, chosen_branch = family_of(hf), ((segments == SHARED) | (segments == CHOSEN)).long()
        positions = branch_positions(family.text_positions(hf, ids, chosen_branch, images), segments,
                                     batch["branch_start"])  # fmt: skip
        allowed = family.packed_mask(hf, block_attention_mask(segments), ids, positions)
        mask = attention_mask_as(allowed, None if _attention(hf) == "sdpa" else hf.dtype)
        inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, **images}
    else:
        inputs = forward_inputs(model, batch)
    logits = model(**inputs, logits_to_keep=batch["input_ids"].shape[1] - start).logits
    return torch.cat([sequence_logps(logits, labels[:, start:]) for labels in label_rows])


def chosen_labels(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The chosen answers' label rows of a pair batch, in either layout."""
    return batch["labels"] if "segments" in batch else batch["labels"].chunk(2)[0]


@contextlib.contextmanager
def reference_mode(peft_model: PeftModel) -> Iterator[None]:
    """Run ``peft_model`` as the frozen stage-1 model: adapters off, original projector, eval, no grad."""
    if not isinstance(peft_model, PeftModel):
        raise TypeError(f"reference_mode needs the PeftModel from attach_lora, got {type(peft_model).__name__}")
    was_training = peft_model.training
    peft_model.eval()  # no dropout, and no activation checkpointing for a pass that keeps no graph
    try:
        with torch.no_grad(), peft_model.disable_adapter():
            yield
    finally:
        peft_model.train(was_training)


def reference_logps(peft_model: PeftModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The frozen stage-1 model's summed answer log-probs for a batch, shape ``(2B,)``."""
    with reference_mode(peft_model):
        return forward_logps(peft_model, batch)


def _cache_key(cfg: DPOLoopConfig, pairs: list[PreferencePair]) -> dict[str, Any]:
    """What the reference table depends on: the model (and its weight files), the pairs' text, the encoding.

    A rerun into the same ``output_dir`` after the stage-1 model or the pairs changed must not reuse it.
    """
    digest = hashlib.sha256()
    for p in pairs:
        digest.update(json.dumps([p.pair_id, p.image, p.question, p.chosen, p.rejected]).encode())
    model_dir = Path(cfg.model.name_or_path or "")
    weights = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in model_dir.glob("*.safetensors")) \
        if cfg.model.name_or_path and model_dir.is_dir() else []  # fmt: skip
    return {"model": config_to_dict(cfg.model), "weights": [list(w) for w in weights],
            "max_length": cfg.train.max_length, "bf16": cfg.train.bf16, "pairs": len(pairs), "system": cfg.dpo.system,
            "pairs_sha256": digest.hexdigest()}  # fmt: skip


def _load_cache(path: Path, key: dict[str, Any]) -> torch.Tensor | None:
    if not path.is_file():
        return None
    cached = torch.load(path, map_location="cpu", weights_only=True)
    return cached["logps"] if cached.get("key") == key else None


def precompute_reference(cfg: DPOLoopConfig, peft_model: PeftModel, dataset: PreferenceDataset,
                         session: TrainSession, autocast=contextlib.nullcontext,
                         collate_fn=None) -> torch.Tensor:  # fmt: skip
    """``(pairs, 2)`` reference log-probs (chosen, rejected) of every pair, on ``session.device``.

    Ranks split the pairs and share the results; rank 0 caches the table in ``output_dir`` so a resumed
    run skips this pass. Every rank takes the same branch (cached or not), so the collectives match.
    """
    rank, world, device = session.world_rank, session.world_size, session.device
    cache, key = Path(cfg.output_dir) / REFERENCE_CACHE_FILE, _cache_key(cfg, dataset.pairs)
    table = _load_cache(cache, key)
    have = all_reduce_sum(torch.tensor([float(table is not None)], device=device)).item()
    if have == world:
        log.info("reference log-probs read from %s", cache)
        return table.to(device)
    size = cfg.train.micro_batch_size
    collate_fn = collate_fn or partial(collate_pairs, pad_id=dataset.processor.tokenizer.pad_token_id)
    mine = list(range(rank, len(dataset), world))
    rows: dict[int, tuple[float, float]] = {}
    log.info("computing reference log-probs of %d pairs on %d workers", len(dataset), world)
    every = max(size, len(mine) // 10 // size * size)  # about ten progress lines
    for start in range(0, len(mine), size):
        if start and start % every == 0:
            log.info("reference log-probs: %d/%d pairs of this worker", start, len(mine))
        batch = collate_fn([dataset[(0, i)] for i in mine[start : start + size]])
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            logps = reference_logps(peft_model, batch).float().cpu()
        half = len(batch["index"])
        rows.update({int(i): (float(logps[j]), float(logps[half + j])) for j, i in enumerate(batch["index"])})
    rows = gather_dicts(rows, world)
    table = torch.tensor([rows[i] for i in range(len(dataset))], dtype=torch.float32)
    if rank == 0:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        torch.save({"key": key, "logps": table}, tmp)
        os.replace(tmp, cache)
    return table.to(device)


# ----------------------------------------------------------------------------- the loop


def _prepare(cfg: DPOLoopConfig, session: TrainSession):
    """Fresh LoRA on the merged stage-1 model, its processor, and the checked pairs."""
    torch.manual_seed(cfg.train.seed)  # same LoRA init on every rank
    model, processor = load_model(cfg.model)
    # Trainable weights in fp32 under autocast, as in stage 1 (bf16 cannot hold a 5e-6 update); without
    # autocast an fp32 weight would meet the checkpoint's bf16 activations and fail, so half-precision
    # weights stay as they are. The frozen original projector keeps the checkpoint's dtype either way:
    # the reference is stage 1 bit for bit.
    autocast = uses_autocast(cfg.train, session.device)
    if not autocast and cfg.model.dtype != "float32":
        log.warning("model.dtype=%s without autocast: the LoRA weights train in %s, where small updates "
                    "round away; use train.bf16=true on CUDA, or model.dtype=float32", cfg.model.dtype,
                    cfg.model.dtype)  # fmt: skip
    peft_model = make_trainable(model, cfg.lora, cfg.train.gradient_checkpointing, upcast=autocast)
    data = load_preference_data(cfg.preferences_path, cfg.image_root, processor, cfg.train.max_length,
                                session.world_rank, session.world_size, cfg.dpo.system_prompt,
                                gather=partial(gather_dicts, world_size=session.world_size))  # fmt: skip
    return peft_model, processor, data


def _collate_for(cfg: DPOLoopConfig, peft_model: PeftModel, pad_id: int, rank: int) -> partial:
    """The batch layout of this run: packed pairs (``dpo.shared_prefix``) where the model allows it."""
    if cfg.dpo.shared_prefix:
        why_not = can_share_prefix(peft_model)
        if why_not is None:
            return partial(collate_shared_pairs, pad_id=pad_id)
        if rank == 0:
            log.warning("dpo.shared_prefix: %s; running chosen and rejected as separate sequences", why_not)
    return partial(collate_pairs, pad_id=pad_id)


def _reference_for(batch, peft_model, table: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) reference log-probs of a batch: looked up when precomputed, else a forward pass."""
    if table is not None:
        rows = table[batch["index"]]
        return rows[:, 0], rows[:, 1]
    logps = reference_logps(peft_model, batch)
    return logps.chunk(2)


def train_dpo(config: dict[str, Any], session: TrainSession) -> None:
    """Stage-2 DPO on one worker; resumes from ``session.latest_checkpoint()`` when there is one."""
    cfg = build_config(DPOLoopConfig, config)
    train, out = cfg.train, Path(cfg.output_dir)
    rank, world, device = session.world_rank, session.world_size, session.device
    peft_model, processor, data = _prepare(cfg, session)
    plan, total_steps = plan_steps(len(data.pairs), train, rank, world)

    model = session.prepare_model(peft_model)
    optimizer, scheduler = build_optimizer(peft_model, train, total_steps)
    start_step = resume(session, peft_model, optimizer, scheduler, train.seed)
    autocast = autocast_context(train, device)
    dataset = PreferenceDataset(data.pairs, cfg.image_root, processor, train.max_length, cfg.dpo.system_prompt)
    started = time.perf_counter()
    collate_fn = _collate_for(cfg, peft_model, processor.tokenizer.pad_token_id, rank)
    table = precompute_reference(cfg, peft_model, dataset, session, autocast, collate_fn) \
        if cfg.dpo.precompute_reference else None  # fmt: skip
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / DATA_REPORT_FILE, data.report())
        MetricsLog(out / ATTEMPTS_FILE).write({
            "start_step": start_step, "total_steps": total_steps, "world_size": world, "time": time.time(),
            "reference_precompute_s": time.perf_counter() - started if table is not None else None})
        log.info("DPO %d steps from step %d: %d pairs (%d rejected), %d workers, reference %s, %s",
                 total_steps, start_step, len(data.pairs), len(data.skips), world,
                 "precomputed" if table is not None else "per step",
                 "shared prefix" if collate_fn.func is collate_shared_pairs else "separate sequences")  # fmt: skip

    batches = plan.batches(dataset, start_step, total_steps, collate_fn, train.loader_workers)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    pairs_per_rank = train.micro_batch_size * train.grad_accum_steps  # every step is full (StepPlan)
    metrics_log = MetricsLog(out / METRICS_FILE)
    model.train()
    for step in range(start_step + 1, total_steps + 1):
        maybe_inject_failure(train, step, rank, out)
        started = time.perf_counter()
        stats = torch.zeros(9, dtype=torch.float64, device=device)
        for i in range(train.grad_accum_steps):
            batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
            last = i == train.grad_accum_steps - 1
            # DDP all-reduces gradients on every backward unless told not to; once per step is enough.
            sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
            with sync:
                with autocast():
                    ref_chosen, ref_rejected = _reference_for(batch, peft_model, table)
                    policy_chosen, policy_rejected = forward_logps(model, batch).chunk(2)
                    result = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, cfg.dpo.beta)
                    chosen_tokens = answer_token_counts(chosen_labels(batch))
                    result = with_sft_term(result, policy_chosen, chosen_tokens, cfg.dpo.sft_weight)
                # DDP averages over ranks, so this is the mean loss over the step's global pairs.
                (result.losses.sum() / pairs_per_rank).backward()
            stats[:8] += dpo_stats(result, policy_chosen, policy_rejected)
            stats[8] += batch["attention_mask"].sum()
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, train.max_grad_norm)
        lrs = {f"lr_{group['name']}": group["lr"] for group in optimizer.param_groups}  # this step's lr
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        stats = all_reduce_sum(stats).cpu()
        elapsed = time.perf_counter() - started
        row = {"step": step, "epoch": (step - 1) // plan.steps_per_epoch, **dpo_metrics(stats),
               "grad_norm": float(grad_norm), "pairs": int(stats[5]), "tokens": int(stats[8]),
               "pairs_per_s": float(stats[5]) / elapsed, "tokens_per_s": float(stats[8]) / elapsed,
               "step_time_s": elapsed, **lrs}  # fmt: skip
        if rank == 0:
            metrics_log.write(row)
            if step % train.log_every == 0 or step == total_steps:
                log.info("step %d/%d loss %.4f margin %.4f acc %.2f %.1f pairs/s", step, total_steps, row["loss"],
                         row["rewards/margins"], row["rewards/accuracies"], row["pairs_per_s"])  # fmt: skip
        check_finite(row)  # before a checkpoint or an export can keep NaN weights
        report_step(session, row, peft_model, optimizer, scheduler, train, total_steps)
    if rank == 0:
        export_final(peft_model, processor, cfg.output_dir, cfg.model.dtype, cfg.export_merged)
