"""Model families behind one interface (``Family``), and how a model, processor or preset selects one.

| family | model_type | model class | preset |
|---|---|---|---|
| LLaVA-1.5 | ``llava`` | ``LlavaForConditionalGeneration`` | ``tiny`` |
| Qwen2.5-VL | ``qwen2_5_vl`` | ``Qwen2_5_VLForConditionalGeneration`` | ``tiny-qwen2.5-vl`` |
| Gemma 3 (MedGemma) | ``gemma3`` | ``Gemma3ForConditionalGeneration`` | ``tiny-gemma3`` |
| Qwen3-VL | ``qwen3_vl`` | ``Qwen3VLForConditionalGeneration`` | ``tiny-qwen3-vl`` |
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from stmed.model.families.base import IMAGE_KEYS, Family, collate_images, hf_model, image_kwargs
from stmed.model.families.gemma3 import GEMMA3
from stmed.model.families.llava import LLAVA
from stmed.model.families.qwen2_5_vl import QWEN2_5_VL
from stmed.model.families.qwen3_vl import QWEN3_VL

FAMILIES: dict[str, Family] = {family.model_type: family for family in (LLAVA, QWEN2_5_VL, GEMMA3, QWEN3_VL)}
"""Every supported family by its ``model_type``."""
PRESETS: dict[str, Family] = {family.preset: family for family in FAMILIES.values()}

__all__ = [
    "FAMILIES",
    "GEMMA3",
    "IMAGE_KEYS",
    "LLAVA",
    "PRESETS",
    "QWEN2_5_VL",
    "QWEN3_VL",
    "Family",
    "collate_images",
    "family_for_preset",
    "family_of",
    "forward_inputs",
    "hf_model",
    "image_kwargs",
]  # fmt: skip


def family_for_preset(preset: str) -> Family:
    if preset not in PRESETS:
        raise ValueError(f"model.preset: unknown preset {preset!r}; the presets are {sorted(PRESETS)}")
    return PRESETS[preset]


def family_of(obj: Any) -> Family:
    """The family of a model (PEFT-wrapped or not), a processor, or a raw ``config.json`` dict."""
    if isinstance(obj, dict):
        model_type = obj.get("model_type")
    else:
        for family in FAMILIES.values():
            if isinstance(obj, family.processor_class):
                return family
        model_type = getattr(getattr(hf_model(obj), "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"model_type {model_type!r} is not a supported family; supported: {sorted(FAMILIES)}")
    return FAMILIES[model_type]


def forward_inputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A collated training batch as the forward pass's keyword arguments: ids, mask, images and the family's
    own positions (``Family.text_positions``; M-RoPE for Qwen2.5-VL, which our batches would otherwise
    not get) and per-token inputs (``Family.text_inputs``; Gemma 3's ``token_type_ids``)."""
    hf, images = hf_model(model), image_kwargs(batch)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    family = family_of(hf)
    positions = family.text_positions(hf, ids, mask, images)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions, **images,
            **family.text_inputs(hf, ids)}
