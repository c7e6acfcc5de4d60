"""The two training objectives: stage-1 token cross-entropy (METHOD §2) and stage-2 sigmoid DPO (METHOD §4).

Both read targets from the same label convention (``stmed.model.conversation``: ``IGNORE_INDEX`` where a
position is not a target; position t's logits predict label t+1). Each objective also yields detached
*sums* (``loss_stats``, ``dpo_stats``) that add up over micro-batches and ranks, so a loop all-reduces
one small tensor per step and turns it into means at the end (``loss_means``, ``dpo_metrics``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from stmed.model.conversation import IGNORE_INDEX, LOSS_QA, LOSS_VQ


def first_scored_position(labels: torch.Tensor) -> int:
    """The first position whose logits any row needs: one before the batch's earliest target.

    A forward pass asked for logits from there on only (``logits_to_keep``) skips the vocabulary
    projection of the image and the prompt, and the losses below read the same values off
    ``labels[:, start:]``.
    """
    targets = (labels != IGNORE_INDEX).any(dim=0).nonzero()
    return max(0, int(targets[0]) - 1) if len(targets) else 0


# ----------------------------------------------------------------------------- stage 1: SFT


def token_losses(
    logits: torch.Tensor, labels: torch.Tensor, loss_kind: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of every target token (position t predicts label t+1) and its loss kind, flattened.

    Only target rows of the logits are upcast to float32, which keeps a 32k-vocab batch small.
    """
    targets, kinds = labels[:, 1:], loss_kind[:, 1:]
    mask = targets != IGNORE_INDEX
    ce = F.cross_entropy(logits[:, :-1][mask].float(), targets[mask], reduction="none")
    return ce, kinds[mask]


def loss_stats(ce: torch.Tensor, kinds: torch.Tensor) -> torch.Tensor:
    """``[sum, n, sum_qa, n_qa, sum_vq, n_vq]`` of token losses (detached), summable over batches/ranks."""
    ce = ce.detach().double()
    qa, vq = kinds == LOSS_QA, kinds == LOSS_VQ
    return torch.stack([ce.sum(), torch.tensor(float(ce.numel()), dtype=torch.float64, device=ce.device),
                        ce[qa].sum(), qa.sum().double(), ce[vq].sum(), vq.sum().double()])  # fmt: skip


def loss_means(stats: torch.Tensor) -> dict[str, float]:
    """``loss``, ``loss_qa``, ``loss_vq`` from :func:`loss_stats` sums; NaN for a kind with no tokens."""
    values = stats.tolist()

    def mean(total: float, count: float) -> float:
        return total / count if count else float("nan")

    return {"loss": mean(values[0], values[1]), "loss_qa": mean(values[2], values[3]),
            "loss_vq": mean(values[4], values[5])}  # fmt: skip


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, loss_kind: torch.Tensor) -> dict[str, float]:
    """Mean CE over all target tokens, over answer (qa) tokens and over question (vq) tokens."""
    return loss_means(loss_stats(*token_losses(logits, labels, loss_kind)))


# ----------------------------------------------------------------------------- stage 2: DPO


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row sum of log p(label_t | tokens < t) over target tokens: ``(rows, T, V)`` → ``(rows,)``.

    Only target rows of the logits are upcast to float32, which keeps a 32k-vocab batch small.
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    token_logps = -F.cross_entropy(logits[:, :-1][mask].float(), targets[mask], reduction="none")
    rows = mask.nonzero()[:, 0]
    return torch.zeros(labels.shape[0], device=logits.device).index_add(0, rows, token_logps)


@dataclass(frozen=True)
class DPOOutput:
    """Per-pair loss and implicit rewards ``β·(log π − log π_ref)``, each of shape ``(pairs,)``."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> DPOOutput:  # fmt: skip
    """Sigmoid DPO: ``-logσ(β·((π_c − ref_c) − (π_r − ref_r)))`` per pair."""
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    return DPOOutput(losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach())


def answer_token_counts(labels: torch.Tensor) -> torch.Tensor:
    """Per-row number of target tokens (what :func:`sequence_logps` sums over), shape ``(rows,)``."""
    return (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)


def with_sft_term(out: DPOOutput, policy_chosen: torch.Tensor, chosen_tokens: torch.Tensor,
                  weight: float) -> DPOOutput:  # fmt: skip
    """Add ``weight`` x the chosen answer's mean token NLL to each pair's DPO loss (RPO-style).

    DPO alone only moves the chosen-rejected *margin*: it can lower both log-probs and drift to
    disfluent answers at higher learning rates. The NLL term keeps the chosen answers likely. The mean
    is per pair over its own answer tokens, so long and short answers weigh alike. The rewards are
    untouched; ``weight`` 0 returns ``out`` itself.
    """
    if weight < 0:
        raise ValueError(f"sft weight must be >= 0, got {weight}")
    if weight == 0:
        return out
    nll = -policy_chosen / chosen_tokens.clamp(min=1).to(policy_chosen.dtype)
    return replace(out, losses=out.losses + weight * nll)


def dpo_stats(out: DPOOutput, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor) -> torch.Tensor:
    """Sums of loss, rewards, accuracy, margin, pair count and policy log-probs, summable over ranks."""
    chosen, rejected = out.chosen_rewards.double(), out.rejected_rewards.double()
    return torch.stack([out.losses.detach().double().sum(), chosen.sum(), rejected.sum(),
                        (chosen > rejected).double().sum(), (chosen - rejected).sum(),
                        torch.tensor(float(chosen.numel()), dtype=torch.float64, device=chosen.device),
                        policy_chosen.detach().double().sum(), policy_rejected.detach().double().sum()])  # fmt: skip


def dpo_metrics(stats: torch.Tensor) -> dict[str, float]:
    """Means over pairs of the :func:`dpo_stats` sums, under TRL's metric names."""
    loss, chosen, rejected, hits, margin, n, logp_c, logp_r = stats.tolist()[:8]
    return {"loss": loss / n, "rewards/chosen": chosen / n, "rewards/rejected": rejected / n,
            "rewards/accuracies": hits / n, "rewards/margins": margin / n,
            "logps/chosen": logp_c / n, "logps/rejected": logp_r / n}  # fmt: skip
