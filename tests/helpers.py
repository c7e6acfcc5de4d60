"""Small helpers shared by test modules (not fixtures: plain functions a test calls)."""

from __future__ import annotations

import torch


def perturb_trainable(model, seed: int = 1) -> None:
    """Move every trainable weight (LoRA B is zero at init, the projector copy equals the original) as
    training would, so that merging, saving or a reference pass has something to tell apart."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
