"""Shared-prefix packing: a preference pair's two answers on top of one copy of their common prompt.

A pair's chosen and rejected sequences share the image and the prompt (576 image tokens and the question
on a 336-px LLaVA) and differ only in a short answer. Run separately, the vision tower and the prompt
are computed twice. Packed, one row holds the prompt once and both answers after it::

    tokens    p0 p1 … p(s-2) | p(s-1) c_s … c_end | p(s-1) r_s … r_end
    segment   SHARED         | CHOSEN             | REJECTED
    position  0 1 … s-2      | s-1    s  …        | s-1    s  …

``s`` is the length of the common token prefix (capped before either sequence's first target). Its
last token ``p(s-1)`` opens both branches: each branch starts with its own copy, at the same position,
and a block attention mask lets a token see the shared segment and the earlier tokens of its own branch
only. Every token of a branch then sees exactly the keys and values it would see in its own unshared
sequence (the copy of ``p(s-1)`` has the same token, position and context as the original), so the
log-probabilities are the unshared ones up to float summation order; and position ``t``'s logits still
predict token ``t + 1`` inside each branch, so the usual shifted cross-entropy reads each answer off
its own label row (``chosen_labels``, ``rejected_labels``).

Positions come from the family (``Family.text_positions``: ``arange`` for LLaVA, M-RoPE's three rows
for Qwen2.5-VL), computed over the shared and chosen segments as one ordinary sequence; the rejected
branch repeats the chosen branch's positions from ``s - 1`` on (text after the image advances every
row by one). A family whose own attention is not plain causal adapts the mask (``Family.packed_mask``:
Gemma 3's image tokens attend to each other both ways, and its sliding-window layers get the window counted
in positions). The mask is boolean for SDPA and additive for eager attention; kernels that cannot take a
custom mask (FlashAttention) use the unshared path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stmed.model.conversation import IGNORE_INDEX, Encoded, right_pad

PAD, SHARED, CHOSEN, REJECTED = 0, 1, 2, 3
"""Segment ids of a packed row."""

MASKABLE_ATTENTION = ("eager", "sdpa")
"""Attention implementations that accept a custom 4D additive mask."""


@dataclass(frozen=True)
class PackedPair:
    """One pair as one row: the shared prompt, then the chosen branch, then the rejected branch."""

    input_ids: list[int]
    chosen_labels: list[int]
    rejected_labels: list[int]
    segments: list[int]
    branch_start: int
    """``s - 1``: the index of the token that opens both branches (its copy opens the rejected one)."""

    def __len__(self) -> int:
        return len(self.input_ids)


def first_target(encoded: Encoded) -> int:
    """Index of the first target token of a sequence (its length if there is none)."""
    return next((i for i, label in enumerate(encoded.labels) if label != IGNORE_INDEX), len(encoded))


def shared_length(chosen: Encoded, rejected: Encoded) -> int:
    """``s``: the common token prefix, up to (not including) either sequence's first target."""
    limit = min(first_target(chosen), first_target(rejected))
    s = 0
    while s < limit and chosen.input_ids[s] == rejected.input_ids[s]:
        s += 1
    return s


def pack_pair(chosen: Encoded, rejected: Encoded) -> PackedPair:
    """Pack one pair (see the module docstring). ``ValueError`` if the two share no prompt token."""
    s = shared_length(chosen, rejected)
    if s < 1:
        raise ValueError("pack_pair: the chosen and rejected sequences share no prompt token")
    tail = rejected.input_ids[s - 1 :]  # the rejected branch, opened by its own copy of token s - 1
    return PackedPair(
        input_ids=chosen.input_ids + tail,
        chosen_labels=chosen.labels + [IGNORE_INDEX] * len(tail),
        # The copy of token s - 1 is never a target: s stops before the first target.
        rejected_labels=[IGNORE_INDEX] * len(chosen) + rejected.labels[s - 1 :],
        segments=[SHARED] * (s - 1) + [CHOSEN] * (len(chosen) - s + 1) + [REJECTED] * len(tail),
        branch_start=s - 1,
    )


def collate_packed(rows: list[PackedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad packed rows: ``input_ids``, ``labels`` (chosen), ``rejected_labels``, ``segments``, and
    ``attention_mask`` (1 on every real token; the block structure lives in ``segments``)."""
    if not rows:
        raise ValueError("collate_packed: empty batch")
    return {
        "input_ids": right_pad([r.input_ids for r in rows], pad_id),
        "attention_mask": right_pad([[1] * len(r) for r in rows], 0),
        "labels": right_pad([r.chosen_labels for r in rows], IGNORE_INDEX),
        "rejected_labels": right_pad([r.rejected_labels for r in rows], IGNORE_INDEX),
        "segments": right_pad([r.segments for r in rows], PAD),
        "branch_start": torch.tensor([r.branch_start for r in rows], dtype=torch.long),
    }


def block_attention_mask(segments: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``(B, 1, L, L)``: query ``q`` sees key ``k`` iff ``k <= q`` and ``k`` is shared or in its own branch.

    Boolean (True = attend, what SDPA takes) when ``dtype`` is None, else additive in ``dtype`` (0 or its
    minimum, what eager attention adds to its scores). A padding query sees only itself, so no softmax row
    is empty: an empty row would be NaN, and NaN times a zero weight still poisons the next layer.
    """
    length = segments.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()
    query, key = segments[:, :, None], segments[:, None, :]
    same_branch = (key == SHARED) | (key == query)
    allowed = causal & same_branch & (key != PAD) & (query != PAD)
    allowed |= torch.eye(length, dtype=torch.bool, device=segments.device)
    return attention_mask_as(allowed[:, None], dtype)


def attention_mask_as(allowed, dtype: torch.dtype | None):
    """A boolean mask (or a dict of them by layer type) as it is, for SDPA (``dtype`` None), or additive in
    ``dtype`` (0 where allowed, else its minimum) for eager attention."""
    if isinstance(allowed, dict):
        return {key: attention_mask_as(mask, dtype) for key, mask in allowed.items()}
    if dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed,
                                                                                       torch.finfo(dtype).min)


def branch_positions(
    positions: torch.Tensor, segments: torch.Tensor, branch_start: torch.Tensor
) -> torch.Tensor:
    """Give the rejected branch the chosen branch's positions from ``branch_start`` on.

    ``positions`` is ``(B, L)`` or ``(R, B, L)`` (M-RoPE rows), valid on the shared and chosen segments;
    the result holds, at the j-th token of a row's rejected branch, the position of ``branch_start + j``
    in the chosen branch's own numbering (its opening token's position plus j, in every row).
    """
    out = positions.clone()
    rows = out if out.dim() == 3 else out[None]
    for b in range(segments.shape[0]):
        rejected = (segments[b] == REJECTED).nonzero().flatten()
        if len(rejected):
            start = rows[:, b, branch_start[b]]  # (R,)
            steps = torch.arange(len(rejected), device=out.device)
            rows[:, b, rejected] = start[:, None] + steps[None, :]
    return out

