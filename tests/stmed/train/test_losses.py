"""The training objectives on hand-made tensors: stage-1 masked CE with its qa/vq split, stage-2 DPO."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from stmed.model.conversation import IGNORE_INDEX, LOSS_QA, LOSS_VQ
from stmed.train.losses import (
    answer_token_counts,
    dpo_loss,
    sequence_logps,
    sft_loss,
    token_losses,
    with_sft_term,
)

# ----------------------------------------------------------------------------- stage 1


def _hand_ce(logits: torch.Tensor, labels: torch.Tensor, kinds: torch.Tensor, want: set[int]) -> float:
    """Mean CE written out token by token: position t-1 predicts the label at t."""
    total, count = 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(1, labels.shape[1]):
            if labels[b, t] != IGNORE_INDEX and int(kinds[b, t]) in want:
                total -= torch.log_softmax(logits[b, t - 1], dim=-1)[labels[b, t]].item()
                count += 1
    return total / count


def test_loss_masks_and_split_on_a_hand_batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 7, generator=g)
    x = IGNORE_INDEX
    # Row 0 position 0 carries a label and a kind: nothing predicts it, so it must not count.
    labels = torch.tensor([[3, x, 4, 5, x, 2], [x, x, 1, 6, 2, x]])
    kinds = torch.tensor([[1, 0, 1, 2, 0, 2], [0, 0, 2, 2, 1, 0]])
    got = sft_loss(logits, labels, kinds)
    assert got["loss"] == pytest.approx(_hand_ce(logits, labels, kinds, {LOSS_QA, LOSS_VQ}), rel=1e-6)
    assert got["loss_qa"] == pytest.approx(_hand_ce(logits, labels, kinds, {LOSS_QA}), rel=1e-6)
    assert got["loss_vq"] == pytest.approx(_hand_ce(logits, labels, kinds, {LOSS_VQ}), rel=1e-6)
    ce, k = token_losses(logits, labels, kinds)
    assert ce.numel() == 6 and sorted(k.tolist()) == [1, 1, 2, 2, 2, 2]
    # No question tokens at all: L_vq is undefined (NaN), never 0.
    only_qa = sft_loss(logits, labels, torch.where(kinds == LOSS_VQ, LOSS_QA, kinds))
    assert math.isnan(only_qa["loss_vq"]) and only_qa["loss_qa"] == pytest.approx(got["loss"], rel=1e-6)


# ----------------------------------------------------------------------------- stage 2


def test_sequence_logps_sum_target_tokens_only():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    x = IGNORE_INDEX
    labels = torch.tensor([[4, x, 3, 5, x], [x, x, x, 6, 2]])  # position 0 has no predictor: ignored
    want = [sum(torch.log_softmax(logits[b, t - 1], -1)[labels[b, t]].item()
                for t in range(1, 5) if labels[b, t] != x) for b in range(2)]  # fmt: skip
    assert sequence_logps(logits, labels).tolist() == pytest.approx(want, rel=1e-6)


def test_dpo_loss_is_the_sigmoid_formula_and_ln2_when_policy_is_reference():
    pc, pr = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])
    rc, rr = torch.tensor([-3.5, -4.0]), torch.tensor([-3.0, -2.5])
    out = dpo_loss(pc, pr, rc, rr, beta=0.1)
    # pair 0: 0.1*((-3+3.5) - (-4+3)) = 0.15; pair 1: 0.1*((-5+4) - (-2+2.5)) = -0.15
    assert out.losses.tolist() == pytest.approx([-F.logsigmoid(torch.tensor(0.15)).item(),
                                                 -F.logsigmoid(torch.tensor(-0.15)).item()])  # fmt: skip
    assert out.chosen_rewards.tolist() == pytest.approx([0.05, -0.1])
    assert out.rejected_rewards.tolist() == pytest.approx([-0.1, 0.05])
    same = dpo_loss(pc, pr, pc, pr, beta=0.1)
    assert same.losses.tolist() == pytest.approx([math.log(2)] * 2)


def test_sft_term_adds_weight_times_chosen_mean_token_nll_and_zero_weight_changes_nothing():
    torch.manual_seed(0)
    logits = torch.randn(4, 6, 7)  # rows 0,1 chosen; 2,3 rejected
    labels = torch.full((4, 6), IGNORE_INDEX)
    labels[0, 2:5] = torch.tensor([1, 2, 3])
    labels[1, 3:6] = torch.tensor([4, 5, 6])
    labels[1, 1] = 0  # a second row with 4 targets: per-pair means, not a pooled one
    labels[2, 4:6] = torch.tensor([2, 2])
    labels[3, 1:3] = torch.tensor([3, 1])
    logps = sequence_logps(logits, labels)
    pc, pr = logps[:2], logps[2:]
    rc, rr = pc.detach() - 0.3, pr.detach() + 0.2
    base = dpo_loss(pc, pr, rc, rr, beta=0.1)
    counts = answer_token_counts(labels)[:2]
    assert counts.tolist() == [3, 4]
    assert with_sft_term(base, pc, counts, 0.0) is base
    # The chosen rows' mean token NLL, written out: position t-1 predicts the label at t.
    logp = F.log_softmax(logits, dim=-1)
    nll = [-sum(logp[b, t - 1, labels[b, t]].item() for t in range(1, 6) if labels[b, t] != IGNORE_INDEX)
           / sum(1 for t in range(1, 6) if labels[b, t] != IGNORE_INDEX) for b in range(2)]  # fmt: skip
    out = with_sft_term(base, pc, counts, 0.5)
    assert out.losses.tolist() == pytest.approx([base.losses[i].item() + 0.5 * nll[i] for i in range(2)], rel=1e-5)
    assert torch.equal(out.chosen_rewards, base.chosen_rewards)
    assert torch.equal(out.rejected_rewards, base.rejected_rewards)
    with pytest.raises(ValueError, match="sft weight"):
        with_sft_term(base, pc, counts, -1.0)
