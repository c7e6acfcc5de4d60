"""The selection head: a small MLP from frozen answer features to one score, its ranking loss, its file,
and the figures it is judged by (METHOD §7).

BioMed-VITAL: 1024-d frozen embeddings → 4-layer MLP → one score; a pairwise hinge with margin 1 (a
logistic ranking loss is also in its code). Here the inputs are ``stmed.selection.features`` (image and
answer pools of the policy), standardised by the training answers' mean and spread, which the head keeps
as buffers so that its file alone rates new answers. The file is safetensors (never a pickle), its shape
in the metadata.

Figures (:func:`agreement`, :func:`pair_auc`): on held-out pairs, the share the selector orders as the
rater did (a tie counts half), and the AUC of the better answers' scores against the worse answers'
(Mann–Whitney, unpaired: BioMed-VITAL's positive-against-negative AUC).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn

LossKind = Literal["hinge", "logistic"]


class SelectionHead(nn.Module):
    """``(N, dim)`` features → ``(N,)`` scores: standardise, then ``layers`` linear layers with GELU between."""

    def __init__(self, dim: int, hidden: int = 256, layers: int = 3, dropout: float = 0.1):
        super().__init__()
        if layers < 1 or hidden < 1 or dim < 1:
            raise ValueError(f"SelectionHead: dim, hidden and layers must be >= 1, got {dim}, {hidden}, {layers}")
        self.shape = {"dim": dim, "hidden": hidden, "layers": layers, "dropout": dropout}
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        widths = [dim] + [hidden] * (layers - 1) + [1]
        blocks: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(widths)):
            blocks.append(nn.Linear(a, b))
            if i < layers - 1:
                blocks += [nn.GELU(), nn.Dropout(dropout)]
        self.mlp = nn.Sequential(*blocks)

    def set_scale(self, features: torch.Tensor) -> None:
        """Standardise by these (training) features' mean and spread from now on."""
        self.mean.copy_(features.mean(0))
        self.std.copy_(features.std(0, unbiased=False).clamp(min=1e-6))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp((features - self.mean) / self.std).squeeze(-1)


def ranking_loss(better: torch.Tensor, worse: torch.Tensor, weight: torch.Tensor, total_weight: float,
                 margin: float = 1.0, kind: LossKind = "hinge") -> torch.Tensor:  # fmt: skip
    """``sum(weight * l(better - worse)) / total_weight``: hinge ``max(0, margin - d)`` or logistic
    ``log(1 + exp(margin - d))``; ``total_weight`` is the whole step's (all ranks'), so shards add up."""
    gap = margin - (better - worse)
    per_pair = torch.relu(gap) if kind == "hinge" else nn.functional.softplus(gap)
    return (weight * per_pair).sum() / total_weight


def save_head(head: SelectionHead, path: str | Path, extra: dict | None = None) -> Path:
    """The head's weights and scale as safetensors, its shape (and ``extra``) in the metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={"shape": json.dumps(head.shape), "extra": json.dumps(extra or {})})
    tmp.replace(path)
    return path


def head_extra(path: str | Path) -> dict:
    """The ``extra`` a head was saved with (e.g. ``judge_scale``)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return json.loads(fh.metadata().get("extra") or "{}")


def load_head(path: str | Path) -> SelectionHead:
    """A head written by :func:`save_head`, in eval mode."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        shape = json.loads(fh.metadata()["shape"])
    head = SelectionHead(**shape)
    head.load_state_dict(load_file(str(path)))
    return head.eval()


@torch.no_grad()
def rate(head: SelectionHead, features: torch.Tensor) -> torch.Tensor:
    """Scores of ``(N, dim)`` features, in eval mode (no dropout)."""
    was = head.training
    head.eval()
    try:
        return head(features)
    finally:
        head.train(was)


def agreement(better: torch.Tensor, worse: torch.Tensor) -> float | None:
    """Share of pairs scored in the rater's order; an exact tie counts half."""
    if better.numel() == 0:
        return None
    return float(((better > worse).float() + 0.5 * (better == worse).float()).mean())


def pair_auc(better: torch.Tensor, worse: torch.Tensor) -> float | None:
    """P(score of a better answer > score of a worse answer), over all such (unpaired) combinations."""
    if better.numel() == 0:
        return None
    diff = better.unsqueeze(1) - worse.unsqueeze(0)  # (n, n): fine for held-out sets of a few thousand
    return float(((diff > 0).float() + 0.5 * (diff == 0).float()).mean())
