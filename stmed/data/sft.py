"""Stage-1 training data: LLaVA-Med instruct conversations as checked, re-labelled training items.

Reading is strict but forgiving: a malformed conversation, an image that does not decode, or a sample
whose image alone overflows ``max_length`` is skipped and counted with its reason (``SFTData.report``),
never a crash hours into a run. Each image is decoded once for the check; on several ranks each checks
a slice and the verdicts are gathered, so the check costs no more than one pass over the data. The
check also records each sample's token count (``SFTData.lengths``), which stage 1 groups batches by.

An item is keyed by ``(epoch, index)``: the questioner relabelling (METHOD §2: each later user turn
becomes a ``VUSER`` turn with probability ``sq_ratio``) is re-drawn at every load from a seed built
from that key, so it changes across epochs yet a resumed run replays exactly the same draws.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from stmed.data.images import ImageLoadError, load_image
from stmed.data.records import DataError, Gather, InstructSample, Skip, check_by_rank, read_instruct
from stmed.model.build import family_of, image_inputs
from stmed.model.conversation import Encoded, collate, encode, render, to_turns
from stmed.model.families import collate_images
from stmed.model.prompts import SYSTEM_SQ


@dataclass(frozen=True)
class SFTData:
    """The usable instruct samples with their token counts, the skipped ones with reasons, and how many
    get truncated."""

    samples: list[InstructSample]
    lengths: list[int]
    """Tokens of each sample (image tokens included, at most ``max_length``) as checked: every later
    question as VUSER, the longest draw; a draw that keeps a question as USER is a token or two shorter
    per such turn (LLaVA 1, Qwen2.5-VL 2), close enough to sort batches by (``train.group_by_length``)."""
    skips: list[Skip]
    read: int
    truncated: int

    def report(self) -> dict[str, Any]:
        reasons = Counter(skip.reason for skip in self.skips)
        return {"samples_read": self.read, "samples_used": len(self.samples), "skipped": len(self.skips),
                "skipped_by_reason": dict(reasons.most_common()), "truncated": self.truncated,
                "skipped_examples": [skip.to_row() for skip in self.skips[:20]]}  # fmt: skip


def _sample_problem(sample: InstructSample, image_root: Path, processor, max_length: int):
    """``(reason, truncated, length)``: why a sample cannot be trained on (None if it can), whether it is
    cut at ``max_length``, and its token count (0 when skipped)."""
    try:
        image = load_image(image_root / sample.image)
    except ImageLoadError as err:
        return f"image: {err.reason}", False, 0
    family = family_of(processor)
    try:
        # Relabelling touches later turns only, so whether the image fits and the first answer keeps a
        # target never depends on the draw; every later question as VUSER is the longest rendering.
        turns = to_turns(sample.conversations, 1.0, random.Random(0))
        encoded = encode(render(turns, SYSTEM_SQ, family.chat), processor.tokenizer,
                         family.image_tokens(processor, image), max_length, family.chat)  # fmt: skip
    except ValueError as err:
        return f"conversation: {err}", False, 0
    if encoded.num_targets == 0:
        return f"conversation: no target tokens within max_length={max_length}", False, 0
    return None, encoded.truncated, len(encoded)


def load_sft_data(instruct_path: str | Path, image_root: str | Path, processor, max_length: int,
                  rank: int = 0, world_size: int = 1, gather: Gather | None = None) -> SFTData:  # fmt: skip
    """Read and check the instruct data; each rank checks a slice and ``gather``
    (the training loop's collective) shares the verdicts (``check_by_rank``).

    Raises ``ValueError`` when nothing usable is left.
    """
    samples, skips = read_instruct(instruct_path)
    read = len(samples) + len(skips)
    root = Path(image_root)
    verdicts = check_by_rank(
        samples, lambda sample: _sample_problem(sample, root, processor, max_length),
        rank, world_size, gather, "samples")  # fmt: skip
    usable = [i for i in range(len(samples)) if verdicts[i][0] is None]
    skips = skips + [Skip(s.id, verdicts[i][0]) for i, s in enumerate(samples) if verdicts[i][0]]
    kept = [samples[i] for i in usable]
    data = SFTData(kept, [verdicts[i][2] for i in usable], skips, read,
                   truncated=sum(1 for i in usable if verdicts[i][1]))  # fmt: skip
    if not kept:
        top = ", ".join(f"{r} ({n})" for r, n in Counter(s.reason for s in skips).most_common(3))
        raise DataError(f"no usable training samples in {instruct_path} (images under {image_root}); "
                         f"{len(skips)} skipped: {top or 'the file is empty'}")  # fmt: skip
    return data


class SFTDataset(Dataset):
    """Checked instruct samples as training items, keyed by ``(epoch, index)``.

    The key carries the epoch so the questioner relabelling is re-drawn per load yet reproducible. An
    item is the encoded conversation and its image's forward inputs (``stmed.model.build.image_inputs``);
    the image's token count comes from the processor (per image where the family's depends on size).
    """

    def __init__(self, samples: list[InstructSample], image_root: str | Path, processor, max_length: int,
                 sq_ratio: float, seed: int):  # fmt: skip
        self.samples, self.image_root, self.processor = samples, Path(image_root), processor
        self.max_length, self.sq_ratio, self.seed = max_length, sq_ratio, seed
        self.family = family_of(processor)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Encoded, dict[str, torch.Tensor]]:
        epoch, index = key
        sample = self.samples[index]
        rng = random.Random(f"{self.seed}:{epoch}:{index}")  # str seeds hash the same in every process
        turns = to_turns(sample.conversations, self.sq_ratio, rng)
        image = load_image(self.image_root / sample.image)
        chat, seq_len = self.family.chat, self.family.image_tokens(self.processor, image)
        encoded = encode(
            render(turns, SYSTEM_SQ, chat), self.processor.tokenizer, seq_len, self.max_length, chat
        )
        return encoded, image_inputs(self.processor, [image])


def collate_sft(items: list[tuple[Encoded, dict[str, torch.Tensor]]], pad_id: int) -> dict[str, torch.Tensor]:
    """``stmed.model.conversation.collate`` plus the images' forward inputs: ``pixel_values``
    (LLaVA: (batch, 3, H, W)) and, for Qwen2.5-VL, ``image_grid_thw``."""
    batch = collate([encoded for encoded, _ in items], pad_id)
    batch.update(collate_images([images for _, images in items]))
    return batch
