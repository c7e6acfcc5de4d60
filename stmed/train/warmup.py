"""General-alignment warm-up for the tiny preset: what a real base model (LLaVA) brings to stage 1.

The paper fine-tunes LLaVA, which already reads images and answers yes/no questions about them. The tiny
preset starts from random weights, and measured on the synthetic phantoms (README, "Does self-training
help") it learns image-to-word read-outs fast (a description names modality and organ after a few hundred
steps) but the binding a yes/no question needs (does the image show what the question names?) only after
some 600 steps on thousands of such questions; with stage 1's few labelled conversations it stays near
chance. The warm-up
gives the tiny model that general skill on the *appearance* findings only: descriptions, and open and yes/no
questions about modality and organ, on phantoms of their own (``WARMUP_SEED``, never a benchmark's or the
unlabelled pool's images). Lesions, the "medical" findings, are left for stage 1 and self-training to learn.

    paths = make_warmup_data("runs/warmup/data")           # phantoms + warmup.json
    train_sft(warmup_train_config(paths, "runs/warmup/align"), LocalSession(...))  # -> align/merged
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

from stmed.data.synthetic import (
    Findings,
    closed_question,
    describe,
    load_findings,
    make_dataset,
    open_question,
)
from stmed.model.prompts import CLOSED_SUFFIX, DESCRIBE_QUESTION, IMAGE_TOKEN
from stmed.runs import write_json

WARMUP_TOPICS = ("modality", "organ")
WARMUP_SEED = 1000
"""The warm-up phantoms' dataset seed: other images than those of any benchmark seed in use (0-2)."""
DESCRIPTION_FIRST = 0.3
"""Share of conversations that open with the description; the rest end with it, so most questions are
answered from the image and not from a description already in the context."""
WARMUP_FILE = "warmup.json"


def warmup_conversation(f: Findings, rng: random.Random) -> list[dict[str, str]]:
    """Per warm-up topic, a yes/no question asked the benchmark way (bare answer) and an open one, in random
    order, and the description; the first human turn carries the image."""
    qa = []
    for topic in WARMUP_TOPICS:
        yes = rng.random() < 0.5
        question, _ = closed_question(topic, f, yes, rng)  # type: ignore[misc]  # always possible for these
        qa.append((question + CLOSED_SUFFIX, "yes" if yes else "no"))
        question, _, sentence = open_question(topic, f, rng)
        qa.append((question, sentence))
    rng.shuffle(qa)
    description = (DESCRIBE_QUESTION, describe(f, rng))
    turns = [description, *qa] if rng.random() < DESCRIPTION_FIRST else [*qa, description]
    turns[0] = (f"{IMAGE_TOKEN}\n{turns[0][0]}", turns[0][1])
    return [{"from": who, "value": text} for q, a in turns for who, text in (("human", q), ("gpt", a))]


def make_warmup_data(out_dir: str | os.PathLike, num_images: int = 600, seed: int = WARMUP_SEED) -> Path:
    """Phantoms under ``out_dir/images`` and their warm-up conversations in ``out_dir/warmup.json``;
    returns the latter. Same arguments, same bytes."""
    out = Path(out_dir)
    paths = make_dataset(out, num_images=num_images + 1, seed=seed, test_images=1)  # one held out: unused
    findings = load_findings(paths.findings)
    rows = [{**row, "conversations": warmup_conversation(findings[row["image"]], random.Random(row["image"]))}
            for row in json.loads(paths.instruct.read_text())]
    write_json(out / WARMUP_FILE, rows)
    return out / WARMUP_FILE


def warmup_train_config(conversations: str | os.PathLike, output_dir: str | os.PathLike, steps: int = 600,
                        seed: int = 0) -> dict[str, Any]:
    """A ``stmed.train.sft.train_sft`` config for the warm-up: the tiny preset, full-rank adapters (in effect
    full training of its random weights, merged at the end), one learning rate of 1e-3 for all three groups
    (3e-3 made the projector's output grow until the model ignored the image), no questioner turns."""
    conversations = Path(conversations)
    return {
        "model": {"preset": "tiny", "seed": seed},
        "lora": {"llm_r": 128, "llm_alpha": 256, "vit_r": 64, "vit_alpha": 128, "train_embeddings": True,
                 "llm_dropout": 0.0, "vit_dropout": 0.0},
        "train": {"lr_llm": 1e-3, "lr_projector": 1e-3, "lr_vit": 1e-3, "warmup_ratio": 0.05, "max_steps": steps,
                  "micro_batch_size": 16, "max_length": 512, "log_every": 50, "checkpoint_every": steps,
                  "sq_ratio": 0.0, "seed": seed},
        "instruct_path": str(conversations), "image_root": str(conversations.parent / "images"),
        "output_dir": str(output_dir),
    }
