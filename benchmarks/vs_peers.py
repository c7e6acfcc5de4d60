"""stmed beside its peers in one process: DPO vs TRL, stage 1 vs HF Trainer, the judge vs its ideal.

    .venv/bin/python benchmarks/vs_peers.py --quick --out runs/vs_peers.json     # 2 rounds, a few minutes
    .venv/bin/python benchmarks/vs_peers.py                                       # 5 rounds x 8 timed steps
    .venv/bin/python benchmarks/vs_peers.py --shape tiny --stmed-set dpo.shared_prefix=false

Three figures, each a median over rounds with its range (min, max). A round runs every side once, the
stmed side first in even rounds and the peer first in odd ones, so a busy spell on a shared machine
falls on both; each figure's ratio is taken within a round.

``dpo_vs_trl`` (per ``--shape``): pairs/s of ``stmed.train.dpo.train_dpo`` ÷ pairs/s of TRL's
``DPOTrainer``. Both start from the same checkpoint folder (loaded by ``stmed.model.build.load_model``),
train the same pairs in the same order (stmed's step plan; TRL reads them sequentially), the same
batch size, learning rate and step count, with no gradient checkpointing, fp32 on the CPU, and a
reference forward pass every step (stmed ``dpo.precompute_reference=false``, TRL
``precompute_ref_log_probs=False``: the adapters switched off on both). The trainable parameters are
stmed's LoRA groups: TRL gets the very ``LoraConfig`` that ``stmed.model.lora.attach_lora`` builds
(LLM and ViT LoRA by full module name, the projector as ``modules_to_save``), and the counts are
asserted equal. Both LoRAs use one dropout (0.05), so the two models hold the same modules;
TRL's ``disable_dropout`` is off. stmed runs its real loop (``--stmed-set`` overrides any key of its
``DPOLoopConfig``, e.g. a new ``dpo.*`` option; whatever ``train_dpo`` does is what is measured); TRL
runs ``trainer.train()`` on a ``datasets.Dataset`` of ``prompt`` (stmed's rendered Vicuna prompt with
``<image>``), ``chosen`` / ``rejected`` (the answer + ``</s>``) and ``images``, collated by its own
``DataCollatorForVisionPreference`` with the same processor. Tokens per pair (real tokens through the
policy forward) are reported for both sides: with ``dpo.shared_prefix=false`` they are the same
sequences (on ``llava-1.5`` TRL's are one token longer each: it tokenizes the answer apart from its
prompt, and SentencePiece gives the leading space a token of its own); with stmed's default shared
prefix, the image and prompt run once per pair under both answers, so stmed sends fewer. TRL
computes log-probs at every position through its chunked LM-head kernel; stmed computes logits from
the batch's first answer position on (``logits_to_keep``). On the shrunk ``llava-1.5`` shape (a
64-wide, 2-layer LLM under a 32064-token vocabulary, 576 image tokens) that vocabulary projection is
most of a step, so its ratio says more about logits work than a full-width 7B model's would.

Shapes: ``tiny`` is the tiny preset (64 image tokens); ``llava-1.5`` is llava-1.5-7b-hf's layout
shrunk in width and depth only: 336-px CLIP in 14-px patches (576 image tokens), the 32064-token
vocabulary, answers of about 30 tokens. It is built by ``tests/checkpoints.py::build_llava_hf`` from
``../shared/fixtures/llava-1.5-7b-hf`` (the published tokenizer and processor) when that folder
exists (that helper needs pytest, a dev dependency), and otherwise from the same config in code with
the tiny tokenizer (said in the output and in the JSON's ``model``).

``sft_vs_hf_trainer`` (the tiny preset): target tokens/s of ``stmed.train.sft.train_sft`` ÷
``transformers.Trainer`` on the synthetic instruct conversations cut to 1-5 question-answer rounds
(``train_throughput.varied_lengths``: ~100 to ~260 tokens), ``--batch`` conversations a micro-batch and
4 micro-batches a step on both sides (stmed orders a step's samples by length before cutting its
micro-batches, ``train.group_by_length``; the Trainer takes them as they come). The
Trainer is given the PeftModel of ``stmed.train.stage.make_trainable`` and the very items stmed's loop
trains on: ``SFTDataset`` items (questioner relabelling included) in stmed's step-plan order,
collated by ``collate_sft``, so both compute next-token cross-entropy over the same target tokens
(asserted equal); the Trainer uses the model's own loss.

Timing, both trainers alike: a clock notes wall and CPU time (``time.process_time``) at the end of
every step (stmed: each ``session.report``; peers: ``TrainerCallback.on_step_end``). A DPO run makes
``--steps`` + 2 steps, a stage-1 run ``--sft-steps`` + 2 (a tiny stage-1 step takes tens of
milliseconds, so five times ``--steps`` by default), and counts the steps between the end of step 1
and the end of the one before last: the first step (allocations) and the last (stmed saves its
checkpoint there) are left out, and a step's data loading and collation are inside it on both
sides. Torch runs on ``--threads`` threads (1 by default) on both sides.

``judge_fraction_of_ideal_256``: ``benchmarks/judge_throughput.py``'s own measurement (imported, not
copied): one ``Judge`` called directly with 256 requests in flight against the offline reference
judge answering after 200 ms, the faster of two passes of 30 round trips (``JUDGE_WAVES``) per round,
÷ the ideal 256 / 0.2 s. Its server
stays up through all rounds.

Everything runs on the CPU. The JSON (``--out``) holds per figure ``median``, ``min``, ``max`` (wall
clock), ``cpu_median`` / ``cpu_min`` / ``cpu_max`` (the ratios of units per CPU second: steadier on a
busy machine), both sides' rates, and ``machine`` (CPUs, threads, load, versions, stmed's DPO settings).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable as a plain script from anywhere
sys.path.insert(0, str(REPO / "benchmarks"))

import torch
from train_throughput import varied_lengths

from stmed.config import ConfigError, ModelConfig, build_config, config_to_dict
from stmed.data.images import load_image
from stmed.data.records import PreferencePair, read_preferences, write_preferences
from stmed.data.sft import SFTDataset, collate_sft, load_sft_data
from stmed.data.synthetic import make_dataset
from stmed.model.build import build_tiny, family_of, load_model
from stmed.model.conversation import IGNORE_INDEX
from stmed.model.prompts import SYSTEM_PLAIN, answer_prompt
from stmed.runs import MetricsLog
from stmed.train.dpo import DPOLoopConfig, DPOLoRAConfig, DPOSettings, DPOTrainConfig, train_dpo
from stmed.train.session import LocalSession
from stmed.train.sft import SFTLoopConfig, train_sft
from stmed.train.stage import StepPlan, TrainConfig, make_trainable

SHAPES = ("tiny", "llava-1.5")
DPO_LORA = DPOLoRAConfig(llm_r=8, llm_alpha=16, vit_r=4, vit_alpha=8, llm_dropout=0.05, vit_dropout=0.05)
JUDGE_WAVES = 30
"""Judge pass length in round trips: a self-play run judges thousands of pairs (10k images x 5 questions
is 200 round trips at 256 in flight), so the figure is the client's sustained rate; a pass of a few
round trips mostly measures the first burst of 256 queueing at the 2-core server."""
SFT_ACCUM = 4  # stage-1 micro-batches per optimiser step (the paper's global batch is reached this way)
SFT_LORA = DPO_LORA  # a LoRAConfig all the same (DPOLoRAConfig only changes a default)
DPO_LR, SFT_LR = 5e-6, 2e-4  # the LLM LoRA's rate (stmed's projector and ViT groups keep their own)
MAX_LENGTH = {"tiny": 256, "llava-1.5": 1024}
CHOSEN = ("Yes, there is a round lesion in the {side} lung, about {size} cm across, with smooth margins "
          "and no surrounding effusion.")  # fmt: skip
REJECTED = "No, the scan looks normal, with no visible abnormality in either {side} lung."
QUESTIONS = ("Is there a lesion?", "Is there a lesion in the lung?", "Do you see any abnormality?",
             "Is the scan normal?")  # fmt: skip


# ----------------------------------------------------------------------------- aggregation (pure)


def steady_rate(ticks: list[tuple[float, float]], units: list[float]) -> tuple[float, float]:
    """(units per wall second, units per CPU second) from the end of step 1 to the end of step N-1.

    ``ticks[k]`` is (wall, CPU) at the end of step k+1, ``units[k]`` what step k+1 processed (pairs,
    target tokens). The first step pays first-call allocations and the last one a checkpoint.
    """
    if len(ticks) < 3 or len(ticks) != len(units):
        raise ValueError(
            f"need >= 3 steps with one unit count each, got {len(ticks)} ticks, {len(units)} units"
        )
    done = sum(units[1:-1])
    return done / (ticks[-2][0] - ticks[0][0]), done / (ticks[-2][1] - ticks[0][1])


def spread(values: list[float]) -> dict[str, float]:
    """Median and range of one figure's values over rounds."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


@dataclass
class Run:
    """One side's throughput in one round, and what it trained (for the fairness checks)."""

    wall: float
    """Units per wall-clock second."""
    cpu: float
    """Units per second of this process's CPU time."""
    info: dict[str, float] = field(default_factory=dict)


def figure(ours: list[Run], peer: list[Run], unit: str, peer_name: str) -> dict[str, Any]:
    """Ratios ours ÷ peer, each within a round: median and range over rounds, wall and CPU time."""
    if len(ours) != len(peer) or not ours:
        raise ValueError(f"need one run of each side per round, got {len(ours)} and {len(peer)}")
    wall = spread([a.wall / b.wall for a, b in zip(ours, peer)])
    cpu = spread([a.cpu / b.cpu for a, b in zip(ours, peer)])
    result = {**wall, **{f"cpu_{k}": v for k, v in cpu.items()}, "rounds": len(ours),
              f"stmed_{unit}_per_s": statistics.median(r.wall for r in ours),
              f"{peer_name}_{unit}_per_s": statistics.median(r.wall for r in peer)}  # fmt: skip
    for key in ours[0].info:
        result[f"stmed_{key}"] = statistics.median(r.info[key] for r in ours)
    for key in peer[0].info:
        result[f"{peer_name}_{key}"] = statistics.median(r.info[key] for r in peer)
    return result


# ----------------------------------------------------------------------------- clocks


class Clock:
    """(wall, CPU) at the end of every training step."""

    def __init__(self) -> None:
        self.ticks: list[tuple[float, float]] = []

    def tick(self) -> None:
        self.ticks.append((time.perf_counter(), time.process_time()))


class ClockedSession(LocalSession):
    """A LocalSession whose ``report`` (once per step with ``log_every=1``) ticks a clock."""

    def __init__(self, checkpoint_root: Path):
        super().__init__(checkpoint_root)
        self.clock = Clock()

    def report(self, metrics: dict, checkpoint_dir: Path | None = None) -> None:
        super().report(metrics, checkpoint_dir)  # a checkpoint's save is before this, on the last step
        self.clock.tick()


def clock_callback(clock: Clock):
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.tick()

    return StepClock()


def trainable_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def plan_order(num: int, batch: int, steps: int, seed: int = 0, accum: int = 1) -> list[tuple[int, int]]:
    """The ``(epoch, index)`` keys of stmed's step plan, in order (one worker, ungrouped): the same samples
    in every step as stmed's loop, which only reorders a step's samples among its micro-batches."""
    plan = StepPlan(num, rank=0, world_size=1, micro_batch_size=batch, grad_accum_steps=accum, seed=seed)
    return [key for micro in plan.micro_batches(0, steps) for key in micro]


# ----------------------------------------------------------------------------- models and data


@dataclass(frozen=True)
class Setup:
    """Everything the rounds share: checkpoints, data, settings."""

    root: Path
    images: Path
    instruct: Path
    models: dict[str, Path]
    notes: dict[str, str]
    batch: int
    steps: int
    """Steps per DPO run, the untimed first and last included."""
    sft_steps: int
    """Steps per stage-1 run, likewise."""
    overrides: list[str]
    sft_accum: int = SFT_ACCUM
    """Stage-1 micro-batches per step (of ``batch`` conversations each), on both sides."""


def build_llava15(dst: Path) -> str:
    """A llava-1.5-7b-hf-shaped checkpoint (shrunk width and depth, 576 image tokens) at ``dst``."""
    from tests.checkpoints import LLAVA_HF, SHRUNK_TEXT, SHRUNK_VISION, build_llava_hf

    if (LLAVA_HF / "config.json").is_file():
        build_llava_hf(dst)
        return f"published llava-1.5-7b-hf tokenizer and processor ({LLAVA_HF})"
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from stmed.model.build import CLIP_MEAN, CLIP_STD
    from stmed.model.tokenizer import IMAGE, TINY_TOKENIZER, load_tokenizer

    tokenizer = load_tokenizer(TINY_TOKENIZER)
    vision = CLIPVisionConfig(image_size=336, patch_size=14, hidden_act="quick_gelu", **SHRUNK_VISION)
    text = LlamaConfig(vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       tie_word_embeddings=False,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, **SHRUNK_TEXT)  # fmt: skip
    config = LlavaConfig(vision_config=vision, text_config=text, image_seq_length=576,
                         image_token_index=tokenizer.convert_tokens_to_ids(IMAGE), vision_feature_layer=-2,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu")  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LlavaForConditionalGeneration(config).save_pretrained(dst)
    crop = {"height": 336, "width": 336}
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size=crop, image_mean=CLIP_MEAN,
                                            image_std=CLIP_STD)  # fmt: skip
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                               image_token=IMAGE, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1)  # fmt: skip
    processor.save_pretrained(dst)
    return f"{LLAVA_HF} absent: the same config built in code, with the tiny tokenizer"


def preference_pairs(images: list[str], n: int) -> list[PreferencePair]:
    """``n`` judged pairs over ``images``; answers of about 30 tokens (the llava-1.5 tokenizer)."""
    pairs = []
    for i in range(n):
        side = ("left", "right")[i % 2]
        chosen, rejected = CHOSEN.format(side=side, size=1 + i % 4), REJECTED.format(side=side)
        question = QUESTIONS[i % len(QUESTIONS)]
        pairs.append(PreferencePair(pair_id=f"p{i}", image=images[i % len(images)], question=question,
                                    chosen=chosen, rejected=rejected, chosen_score=8.0, rejected_score=3.0,
                                    judge_model="bench"))  # fmt: skip
    return pairs


# ----------------------------------------------------------------------------- DPO: stmed and TRL


def dpo_config(setup: Setup, shape: str, out: Path) -> DPOLoopConfig:
    """stmed's DPO run: its defaults, the shared settings, then ``--stmed-set`` (checked like a job's)."""
    train = DPOTrainConfig(micro_batch_size=setup.batch, max_steps=setup.steps, max_length=MAX_LENGTH[shape],
                           log_every=1, checkpoint_every=10**6, lr_llm=DPO_LR)  # fmt: skip
    cfg = DPOLoopConfig(model=ModelConfig(name_or_path=str(setup.models[shape])), output_dir=str(out),
                        preferences_path=str(setup.root / "prefs.parquet"), image_root=str(setup.images),
                        train=train, lora=DPO_LORA, dpo=DPOSettings(precompute_reference=False),
                        export_merged=False)  # fmt: skip
    return build_config(DPOLoopConfig, config_to_dict(cfg, redact=False), setup.overrides)


def stmed_dpo(setup: Setup, shape: str, out: Path) -> Run:
    cfg = dpo_config(setup, shape, out)
    session = ClockedSession(out / "ckpt")
    train_dpo(config_to_dict(cfg, redact=False), session)
    rows = MetricsLog(out / "metrics.jsonl").read()
    report = json.loads((out / "data_report.json").read_text())
    if report["pairs_used"] != report["pairs_read"]:
        raise AssertionError(f"stmed rejected pairs: {report['rejected_by_reason']}")
    wall, cpu = steady_rate(session.clock.ticks, [r["pairs"] for r in rows])
    tokens = sum(r["tokens"] for r in rows) / sum(r["pairs"] for r in rows)
    return Run(wall, cpu, {"tokens_per_pair": tokens, "trainable_params": trainable_count(session.model)})


def trl_rows(setup: Setup, processor, pairs: list[PreferencePair]) -> list[dict[str, Any]]:
    """TRL's vision preference format, in the order stmed's loop takes the pairs."""
    chat, bos = family_of(processor).chat, processor.tokenizer.bos_token or ""
    rows = []
    for _, i in plan_order(len(pairs), setup.batch, setup.steps):
        p = pairs[i]
        prompt = bos + answer_prompt(p.question, system=SYSTEM_PLAIN, chat=chat)  # stmed's tokenizer adds <s>
        rows.append({"prompt": prompt, "chosen": chat.lead + p.chosen + chat.eos,
                     "rejected": chat.lead + p.rejected + chat.eos,
                     "images": [load_image(setup.images / p.image)]})  # fmt: skip
    return rows


class CountingCollator:
    """Wraps a collator: notes each batch's real tokens (and target tokens, when it has labels)."""

    def __init__(self, collate, drop: tuple[str, ...] = ()):
        self.collate, self.drop = collate, drop
        self.tokens: list[int] = []
        self.targets: list[int] = []

    def __call__(self, items):
        batch = self.collate(items)
        self.tokens.append(int(batch["attention_mask"].sum()))
        if "labels" in batch:
            self.targets.append(int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()))
        return {k: v for k, v in batch.items() if k not in self.drop}


def trl_dpo(setup: Setup, shape: str, out: Path, pairs: list[PreferencePair]) -> Run:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    cfg = ModelConfig(name_or_path=str(setup.models[shape]))
    # stmed's LoRA groups as one PEFT config: what train_dpo's make_trainable builds on this checkpoint.
    probe = make_trainable(load_model(cfg)[0], DPO_LORA, gradient_checkpointing=False, upcast=False)
    peft_config, stmed_trainable = copy.deepcopy(probe.peft_config["default"]), trainable_count(probe)
    del probe
    model, processor = load_model(cfg)
    model.train()
    args = DPOConfig(output_dir=str(out), max_steps=setup.steps, per_device_train_batch_size=setup.batch,
                     learning_rate=DPO_LR, beta=0.1, lr_scheduler_type="cosine",
                     warmup_steps=math.ceil(0.03 * setup.steps), weight_decay=0.0, max_grad_norm=1.0,
                     optim="adamw_torch", gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True,
                     disable_dropout=False, precompute_ref_log_probs=False, max_length=MAX_LENGTH[shape],
                     train_sampling_strategy="sequential", dataloader_num_workers=0, report_to=[],
                     save_strategy="no", logging_steps=10**6, disable_tqdm=True, seed=0)  # fmt: skip
    clock = Clock()
    dataset = Dataset.from_list(trl_rows(setup, processor, pairs))
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor,
                         peft_config=peft_config, callbacks=[clock_callback(clock)])  # fmt: skip
    if trainable_count(trainer.model) != stmed_trainable:
        raise AssertionError(
            f"TRL trains {trainable_count(trainer.model)} parameters, stmed {stmed_trainable}"
        )
    counter = CountingCollator(trainer.data_collator)
    trainer.data_collator = counter  # the dataloader is built in train(), from this attribute
    trainer.train()
    wall, cpu = steady_rate(clock.ticks, [setup.batch] * len(clock.ticks))
    tokens = sum(counter.tokens) / (setup.batch * len(counter.tokens))
    return Run(wall, cpu, {"tokens_per_pair": tokens, "trainable_params": trainable_count(trainer.model)})


# ----------------------------------------------------------------------------- stage 1: stmed and HF Trainer


def sft_train_config(setup: Setup) -> TrainConfig:
    return TrainConfig(micro_batch_size=setup.batch, grad_accum_steps=setup.sft_accum, max_steps=setup.sft_steps,
                       max_length=512, log_every=1,
                       checkpoint_every=10**6, lr_llm=SFT_LR)  # fmt: skip


def stmed_sft(setup: Setup, out: Path) -> Run:
    cfg = SFTLoopConfig(model=ModelConfig(preset="tiny"), lora=SFT_LORA, train=sft_train_config(setup),
                        instruct_path=str(setup.instruct), image_root=str(setup.images), output_dir=str(out),
                        export_merged=False)  # fmt: skip
    session = ClockedSession(out / "ckpt")
    train_sft(config_to_dict(cfg, redact=False), session)
    targets = [r["n_qa_tokens"] + r["n_vq_tokens"] for r in MetricsLog(out / "metrics.jsonl").read()]
    wall, cpu = steady_rate(session.clock.ticks, targets)
    return Run(wall, cpu, {"target_tokens": sum(targets), "trainable_params": trainable_count(session.model)})


class OrderedItems(torch.utils.data.Dataset):
    """``SFTDataset`` items in the order of a list of ``(epoch, index)`` keys."""

    def __init__(self, dataset: SFTDataset, keys: list[tuple[int, int]]):
        self.dataset, self.keys = dataset, keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int):
        return self.dataset[self.keys[i]]


def hf_sft(setup: Setup, out: Path) -> Run:
    from transformers import Trainer, TrainingArguments

    train = sft_train_config(setup)
    torch.manual_seed(train.seed)  # as stmed's loop does before building its LoRA
    model, processor = load_model(ModelConfig(preset="tiny"))
    model = make_trainable(model, SFT_LORA, False, upcast=False)
    data = load_sft_data(setup.instruct, setup.images, processor, train.max_length)
    dataset = SFTDataset(data.samples, setup.images, processor, train.max_length, train.sq_ratio, train.seed)
    counter = CountingCollator(
        partial(collate_sft, pad_id=processor.tokenizer.pad_token_id), drop=("loss_kind",)
    )
    args = TrainingArguments(output_dir=str(out), max_steps=setup.sft_steps, learning_rate=SFT_LR,
                             per_device_train_batch_size=setup.batch, lr_scheduler_type="cosine",
                             gradient_accumulation_steps=setup.sft_accum,
                             warmup_steps=math.ceil(train.warmup_ratio * setup.sft_steps), weight_decay=0.0,
                             max_grad_norm=1.0, optim="adamw_torch", use_cpu=True, bf16=False, fp16=False,
                             train_sampling_strategy="sequential", dataloader_num_workers=0,
                             remove_unused_columns=False, label_names=["labels"], report_to=[],
                             save_strategy="no", logging_steps=10**6, disable_tqdm=True, seed=0)  # fmt: skip
    clock = Clock()
    keys = plan_order(len(data.samples), setup.batch, setup.sft_steps, train.seed, setup.sft_accum)
    items = OrderedItems(dataset, keys)
    trainer = Trainer(model=model, args=args, train_dataset=items, data_collator=counter,
                      callbacks=[clock_callback(clock)])  # fmt: skip
    trainer.train()
    per_step = [sum(counter.targets[i : i + setup.sft_accum]) for i in range(0, len(counter.targets), setup.sft_accum)]
    wall, cpu = steady_rate(clock.ticks, per_step)
    return Run(wall, cpu, {"target_tokens": sum(counter.targets), "trainable_params": trainable_count(model)})


# ----------------------------------------------------------------------------- the judge


class JudgeBench:
    """``benchmarks/judge_throughput.py``'s server and measurement, kept up over all rounds."""

    IN_FLIGHT, LATENCY_MS = 256, 200.0

    def __init__(self, root: Path, waves: int):
        import judge_throughput as jt

        self.jt = jt
        self.args = argparse.Namespace(
            ray=False, actors=1, waves=waves, repeats=2, latency_ms=self.LATENCY_MS
        )
        data = make_dataset(root / "judge-data", num_images=40, seed=0)
        self.proc, self.url = jt.start_judge(data.findings, self.LATENCY_MS)
        self.rows = jt.pair_rows(data.root, waves * self.IN_FLIGHT)

    def settings(self) -> dict[str, float]:
        ideal = self.IN_FLIGHT / (self.LATENCY_MS / 1000)
        return {"in_flight": self.IN_FLIGHT, "latency_ms": self.LATENCY_MS, "ideal_pairs_per_s": ideal}

    def run(self) -> dict[str, float]:
        return self.jt.measure(self.rows, self.url, self.IN_FLIGHT, "direct", self.args, self.proc.pid)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


# ----------------------------------------------------------------------------- rounds


def prepare(root: Path, shapes: list[str], args: argparse.Namespace) -> Setup:
    """The synthetic data, a checkpoint folder per shape, and the preference pairs (one epoch of DPO)."""
    data = make_dataset(root / "data", num_images=60, seed=0)
    models, notes = {}, {}
    for shape in shapes:
        models[shape] = root / f"model-{shape}"
        if shape == "tiny":
            model, processor = build_tiny(seed=0)
            model.save_pretrained(models[shape])
            processor.save_pretrained(models[shape])
            notes[shape] = "the tiny preset (64 image tokens)"
        else:
            notes[shape] = build_llava15(models[shape])
    images = sorted(p.name for p in data.images.glob("*.png"))[:8]
    steps, sft_steps = args.steps + 2, args.sft_steps + 2  # + the untimed first and last
    write_preferences(root / "prefs.parquet", preference_pairs(images, args.batch * steps))
    instruct = varied_lengths(data.instruct, root / "varied.json")
    return Setup(root, data.images, instruct, models, notes, args.batch, steps, sft_steps, args.stmed_set)


def in_turn(r: int, ours, peer) -> tuple[Run, Run]:
    """Both sides of round ``r``: stmed first in even rounds, the peer first in odd ones."""
    if r % 2 == 0:
        first = ours()
        return first, peer()
    second = peer()
    return ours(), second


def run_rounds(setup: Setup, shapes: list[str], rounds: int, judge: JudgeBench) -> dict[str, Any]:
    pairs = read_preferences(setup.root / "prefs.parquet")
    dpo: dict[str, tuple[list[Run], list[Run]]] = {s: ([], []) for s in shapes}
    sft: tuple[list[Run], list[Run]] = ([], [])
    fractions: list[float] = []
    for r in range(rounds):
        out = setup.root / f"round{r}"
        for shape in shapes:
            ours, peer = in_turn(r, partial(stmed_dpo, setup, shape, out / f"stmed-dpo-{shape}"),
                                 partial(trl_dpo, setup, shape, out / f"trl-dpo-{shape}", pairs))  # fmt: skip
            if ours.info["trainable_params"] != peer.info["trainable_params"]:
                raise AssertionError(f"DPO {shape}: trainable parameters differ: {ours.info} vs {peer.info}")
            dpo[shape][0].append(ours)
            dpo[shape][1].append(peer)
            log_run(r, f"dpo {shape}", ours, peer, "pairs")
        ours, peer = in_turn(
            r, partial(stmed_sft, setup, out / "stmed-sft"), partial(hf_sft, setup, out / "hf-sft")
        )
        if ours.info["target_tokens"] != peer.info["target_tokens"]:
            raise AssertionError(
                f"SFT: the sides trained different target tokens: {ours.info} vs {peer.info}"
            )
        if ours.info["trainable_params"] != peer.info["trainable_params"]:
            raise AssertionError(f"SFT: trainable parameters differ: {ours.info} vs {peer.info}")
        sft[0].append(ours)
        sft[1].append(peer)
        log_run(r, "sft tiny", ours, peer, "target tokens")
        measured = judge.run()
        fractions.append(measured["rate"] / measured["ideal"])
        print(f"round {r}: judge at 256 in flight {measured['rate']:.0f} pairs/s = {fractions[-1]:.1%} of "
              f"{measured['ideal']:.0f}", flush=True)  # fmt: skip
    return {
        "dpo_vs_trl": {s: {**figure(*dpo[s], "pairs", "trl"), "model": setup.notes[s]} for s in shapes},
        "sft_vs_hf_trainer": {**figure(*sft, "target_tokens", "hf"), "shape": "tiny"},
        "judge_fraction_of_ideal_256": {**spread(fractions), "rounds": rounds, **judge.settings()},
    }


def log_run(r: int, what: str, ours: Run, peer: Run, unit: str) -> None:
    print(f"round {r}: {what}: stmed {ours.wall:.2f} vs peer {peer.wall:.2f} {unit}/s "
          f"(ratio {ours.wall / peer.wall:.2f}; CPU time {ours.cpu / peer.cpu:.2f})", flush=True)  # fmt: skip


def machine(args: argparse.Namespace, load_before: float) -> dict[str, Any]:
    import peft
    import transformers
    import trl

    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "load_avg_1m_before": load_before, "load_avg_1m_after": os.getloadavg()[0],
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl.__version__, "peft": peft.__version__,
            "rounds": args.rounds, "timed_steps": args.steps, "sft_timed_steps": args.sft_steps,
            "batch": args.batch, "quick": args.quick,
            "stmed_overrides": args.stmed_set, "stmed_dpo": config_to_dict(args.stmed_dpo)}  # fmt: skip


def table_row(name: str, shape: str, f: dict[str, Any], cpu: str, sides: str) -> str:
    span = f"[{f['min']:.2f}, {f['max']:.2f}]"
    return f"{name:<28} {shape:<10} {f['median']:>7.2f} {span:>14} {cpu:>9}  {sides}"


def print_table(result: dict[str, Any]) -> None:
    print(f"\n{'figure':<28} {'shape':<10} {'median':>7} {'[min, max]':>14} {'CPU-time':>9}  stmed vs peer")
    for shape, f in result["dpo_vs_trl"].items():
        sides = (
            f"{f['stmed_pairs_per_s']:.2f} vs {f['trl_pairs_per_s']:.2f} pairs/s "
            f"({f['stmed_tokens_per_pair']:.0f} vs {f['trl_tokens_per_pair']:.0f} tok/pair)"
        )
        print(table_row("dpo_vs_trl", shape, f, f"{f['cpu_median']:.2f}", sides))
    f = result["sft_vs_hf_trainer"]
    sides = f"{f['stmed_target_tokens_per_s']:.0f} vs {f['hf_target_tokens_per_s']:.0f} target tokens/s"
    print(table_row("sft_vs_hf_trainer", "tiny", f, f"{f['cpu_median']:.2f}", sides))
    f = result["judge_fraction_of_ideal_256"]
    print(
        table_row(
            "judge_fraction_of_ideal_256", "-", f, "-", f"of {f['ideal_pairs_per_s']:.0f} pairs/s ideal"
        )
    )
    m = result["machine"]
    print(
        f"{m['cpus']} CPUs, {m['torch_threads']} torch thread(s), load {m['load_avg_1m_before']:.1f} -> "
        f"{m['load_avg_1m_after']:.1f}; {m['rounds']} rounds; {m['timed_steps']} DPO / "
        f"{m['sft_timed_steps']} SFT timed steps of {m['batch']}"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds x 3 timed steps")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5; --quick 2)")
    parser.add_argument(
        "--steps", type=int, default=None, help="timed DPO steps per run (default 8; --quick 3)"
    )
    parser.add_argument(
        "--sft-steps", type=int, default=None, help="timed stage-1 steps (default 5 x --steps)"
    )
    parser.add_argument("--batch", type=int, default=2, help="pairs (DPO) or conversations (SFT) per step")
    parser.add_argument("--shape", choices=[*SHAPES, "both"], default="both", help="DPO model shape(s)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads, both sides")
    parser.add_argument("--stmed-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a key of stmed's DPOLoopConfig, e.g. dpo.shared_prefix=false")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="write the figures here as JSON")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (2 if args.quick else 5)
    args.steps = args.steps or (3 if args.quick else 8)
    args.sft_steps = args.sft_steps or 5 * args.steps
    if min(args.rounds, args.steps, args.sft_steps, args.batch) < 1:
        parser.error("--rounds, --steps, --sft-steps and --batch must be >= 1")
    try:  # the overrides checked before anything is built; the DPO settings stmed will run with
        probe = DPOLoopConfig(model=ModelConfig(preset="tiny"), preferences_path="-", image_root="-",
                              output_dir="-", dpo=DPOSettings(precompute_reference=False))  # fmt: skip
        args.stmed_dpo = build_config(DPOLoopConfig, config_to_dict(probe, redact=False), args.stmed_set).dpo
    except ConfigError as err:
        parser.error(f"--stmed-set: {err}")
    if args.stmed_dpo.precompute_reference:
        parser.error(
            "--stmed-set dpo.precompute_reference: TRL runs its reference pass every step, so must stmed"
        )
    shapes = list(SHAPES) if args.shape == "both" else [args.shape]
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="stmed-vs-peers-") as tmp:
        setup = prepare(Path(tmp), shapes, args)
        for shape, note in setup.notes.items():
            print(f"{shape}: {note}", flush=True)
        judge = JudgeBench(Path(tmp), waves=JUDGE_WAVES)
        try:
            result = run_rounds(setup, shapes, args.rounds, judge)
        finally:
            judge.close()
    if torch.get_num_threads() != args.threads:
        raise RuntimeError(f"a trainer changed torch's thread count to {torch.get_num_threads()}")
    result["machine"] = machine(args, load_before)
    print_table(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
