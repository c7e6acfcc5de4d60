"""Stage-2 training data: judged preference pairs as checked, encoded chosen/rejected training items.

Mirrors ``stmed.data.sft``. Reading is strict but forgiving: an empty question or answer, identical
answers, an image that does not decode, or a prompt whose image alone overflows ``max_length`` is
rejected and counted with its reason (``PreferenceData.report``), never a crash in the middle of a run.
Each image is decoded once for the check (an image shared by several questions too); on several ranks
each checks a slice and the verdicts are gathered.

A pair is rendered with the plain Vicuna v1 prompt (``preference_prompt``, no questioner; METHOD §4) by
default, or with another system prompt (``dpo.system``), and encoded by ``encode_prompt_answer``: the answer and its ``</s>`` are the targets, the same mask convention as
stage 1. Items are keyed like stage 1 by ``(epoch, index)`` so both stages share
``stmed.train.stage.StepPlan``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from stmed.data.images import ImageLoadError, load_image
from stmed.data.records import DataError, Gather, PreferencePair, Skip, check_by_rank, read_preferences
from stmed.model.build import family_of, image_inputs, image_tokens
from stmed.model.conversation import Encoded, collate, encode_prompt_answer
from stmed.model.families import collate_images
from stmed.model.packing import collate_packed, pack_pair
from stmed.model.prompts import SYSTEM_PLAIN, VICUNA, ChatFormat, answer_prompt

_MISSING_IMAGE = ("file not found", "is a directory")


@dataclass(frozen=True)
class PreferenceData:
    """The usable pairs, the rejected ones with reasons, and how many pairs get truncated."""

    pairs: list[PreferencePair]
    skips: list[Skip]
    read: int
    truncated: int

    def report(self) -> dict[str, Any]:
        reasons = Counter(skip.reason.split(":")[0] for skip in self.skips)
        return {"pairs_read": self.read, "pairs_used": len(self.pairs), "rejected": len(self.skips),
                "rejected_by_reason": dict(reasons.most_common()), "truncated": self.truncated,
                "rejected_examples": [skip.to_row() for skip in self.skips[:20]]}  # fmt: skip


def encode_pair(pair: PreferencePair, tokenizer, seq_len: int, max_length: int,
                system: str = SYSTEM_PLAIN, chat: ChatFormat = VICUNA) -> tuple[Encoded, Encoded]:  # fmt: skip
    """The chosen and rejected sequences: the prompt under ``system`` + answer, answer tokens as targets.

    The default ``SYSTEM_PLAIN`` gives exactly ``preference_prompt``; ``seq_len`` is this pair's image's
    token count, ``chat`` the model family's chat format.
    """
    prompt = answer_prompt(pair.question, system=system, chat=chat)
    return (encode_prompt_answer(prompt, pair.chosen, tokenizer, seq_len, max_length, chat),
            encode_prompt_answer(prompt, pair.rejected, tokenizer, seq_len, max_length, chat))  # fmt: skip


def pair_problem(pair: PreferencePair, image_root: Path, processor, max_length: int,
                 images_seen: dict[Path, str | int], system: str = SYSTEM_PLAIN) -> tuple[str | None, bool]:  # fmt: skip
    """``(reason, truncated)``: why a pair cannot be trained on (``"kind: detail"``, None if it can).

    ``images_seen`` caches each image's verdict (its token count, or why it cannot be read): a file
    shared by several questions is decoded once.
    """
    chosen, rejected = pair.chosen.strip(), pair.rejected.strip()
    if not pair.question.strip():
        return "empty_question", False
    if not chosen or not rejected:
        return "empty_answer: " + ("chosen" if not chosen else "rejected"), False
    if chosen == rejected:
        return "chosen_equals_rejected", False
    path = image_root / pair.image
    if path not in images_seen:
        try:
            images_seen[path] = image_tokens(processor, load_image(path))
        except ImageLoadError as err:
            kind = "image_missing" if err.reason in _MISSING_IMAGE else "image_unreadable"
            images_seen[path] = f"{kind}: {err.reason}"
    if isinstance(images_seen[path], str):
        return images_seen[path], False
    seq_len, tokenizer, chat = images_seen[path], processor.tokenizer, family_of(processor).chat
    prompt_len = len(tokenizer(answer_prompt(pair.question, system=system, chat=chat))["input_ids"]) - 1 + seq_len
    if prompt_len >= max_length:
        return f"too_long: prompt and image take {prompt_len} tokens, max_length={max_length}", False
    try:
        encoded = encode_pair(pair, tokenizer, seq_len, max_length, system, chat)
    except ValueError as err:
        return f"bad_text: {err}", False
    if min(e.num_targets for e in encoded) == 0:
        return f"too_long: no answer token within max_length={max_length}", False
    return None, any(e.truncated for e in encoded)


def load_preference_data(path: str | Path, image_root: str | Path, processor, max_length: int,
                         rank: int = 0, world_size: int = 1, system: str = SYSTEM_PLAIN,
                         gather: Gather | None = None) -> PreferenceData:  # fmt: skip
    """Read and check the preference parquet; each rank checks a slice and ``gather``
    (the training loop's collective) shares the verdicts (``check_by_rank``).

    Raises ``ValueError`` when no pair is usable.
    """
    pairs = read_preferences(path)
    root, seen = Path(image_root), {}
    verdicts = check_by_rank(
        pairs, lambda pair: pair_problem(pair, root, processor, max_length, seen, system),
        rank, world_size, gather, "pairs")  # fmt: skip
    kept = [p for i, p in enumerate(pairs) if verdicts[i][0] is None]
    skips = [Skip(p.pair_id, verdicts[i][0]) for i, p in enumerate(pairs) if verdicts[i][0]]
    data = PreferenceData(kept, skips, len(pairs), sum(1 for v in verdicts.values() if v[0] is None and v[1]))
    if not kept:
        top = ", ".join(f"{r} ({n})" for r, n in Counter(data.report()["rejected_by_reason"]).most_common(3))
        raise DataError(f"no usable preference pairs in {path} (images under {image_root}); "
                         f"{len(skips)} rejected: {top or 'the file is empty'}")  # fmt: skip
    return data


Images = dict[str, torch.Tensor]


class PreferenceDataset(Dataset):
    """Checked pairs as ``(index, chosen, rejected, image inputs)``, keyed like stage 1 by ``(epoch, index)``."""

    def __init__(self, pairs: list[PreferencePair], image_root: str | Path, processor, max_length: int,
                 system: str = SYSTEM_PLAIN):  # fmt: skip
        self.pairs, self.image_root, self.processor, self.system = pairs, Path(image_root), processor, system
        self.max_length, self.family = max_length, family_of(processor)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, Encoded, Encoded, Images]:
        _, index = key  # the epoch does not change a pair's encoding
        pair = self.pairs[index]
        image = load_image(self.image_root / pair.image)
        seq_len = self.family.image_tokens(self.processor, image)
        chosen, rejected = encode_pair(pair, self.processor.tokenizer, seq_len, self.max_length, self.system,
                                       self.family.chat)  # fmt: skip
        return index, chosen, rejected, image_inputs(self.processor, [image])


def collate_pairs(items: list[tuple[int, Encoded, Encoded, Images]], pad_id: int) -> dict[str, torch.Tensor]:
    """One batch of ``2B`` rows — the B chosen sequences, then the B rejected — plus each pair's index
    (the unshared layout; :func:`collate_shared_pairs` packs each pair into one row)."""
    batch = collate([c for _, c, _, _ in items] + [r for _, _, r, _ in items], pad_id)
    images = [p for _, _, _, p in items]
    batch.update(collate_images(images + images))  # each image once per row that holds it
    batch["index"] = torch.tensor([i for i, _, _, _ in items], dtype=torch.long)
    return batch


def collate_shared_pairs(items: list[tuple[int, Encoded, Encoded, Images]],
                         pad_id: int) -> dict[str, torch.Tensor]:  # fmt: skip
    """One batch of ``B`` packed rows (``stmed.model.packing``): each pair's prompt and image once, its
    chosen and rejected answers as two branches on top; plus each pair's index."""
    batch = collate_packed([pack_pair(chosen, rejected) for _, chosen, rejected, _ in items], pad_id)
    batch.update(collate_images([p for _, _, _, p in items]))  # one image per pair
    batch["index"] = torch.tensor([i for i, _, _, _ in items], dtype=torch.long)
    return batch
