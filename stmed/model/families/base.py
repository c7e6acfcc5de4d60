"""The model-family interface: everything that differs between LLaVA, Qwen2.5-VL, … in one frozen record.

A family says how its chat template writes the three roles (a ``ChatFormat``), where image tokens go
and how many one image becomes (the processor decides), what pixel inputs the forward pass takes,
which modules form the vision tower, the projector (or merger) and the LLM for the LoRA groups, and
how its tiny preset is built. Code outside ``stmed.model.families`` asks :func:`family_of` for the
record and calls it; it never branches on the family itself. Composition, not inheritance: a family
is data plus a few functions, and a new one is a new module that fills in a :class:`Family`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from peft import PeftModel
from PIL import Image
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from transformers import PreTrainedModel

from stmed.model.prompts import ChatFormat

LANGUAGE_MODEL = "language_model"
"""The module every family's decoder LLM lives under (transformers 5 layout)."""
IMAGE_KEYS = ("pixel_values", "image_grid_thw")
"""Batch keys that carry images into a forward pass (each family uses a subset)."""


@dataclass(frozen=True)
class Family:
    """One model family: its chat format, its image handling, its module layout, its tiny preset."""

    name: str
    """Shown in logs and the README table, e.g. ``"llava-1.5"``."""
    model_type: str
    """``config.json``'s ``model_type`` that selects this family."""
    model_class: type[PreTrainedModel]
    processor_class: type
    load_processor: Callable[[str], Any]
    """A checkpoint's processor (tokenizer, image processor, chat template), on CPU-only machines too."""
    chat: ChatFormat
    preset: str
    """``model.preset`` value of the family's tiny model."""
    build_tiny: Callable[[int], tuple[PreTrainedModel, Any]]
    """``seed -> (model, processor)``: seeded random weights, a locally trained tokenizer, no download."""
    complete_processor: Callable[[Any, dict, str], None]
    """Fill in what a snapshot's processor lacks, from the raw model config (``processor, raw, where``)."""
    image_tokens: Callable[[Any, Image.Image], int]
    """How many image tokens ``image`` becomes in the text with this processor."""
    max_image_tokens: Callable[[Any], int]
    """The most image tokens any image can become (processor or model): for length budgets."""
    image_inputs: Callable[[Any, list[Image.Image]], dict[str, torch.Tensor]]
    """The forward pass's image inputs for ``images``; concatenating two results along dim 0 batches them."""
    vision_tower: str
    """Module name of the vision encoder (its linears get the ViT LoRA)."""
    vision_blocks: str
    """Child of the vision tower holding its numbered blocks."""
    projector: str
    """Module name of the projector / merger (trained fully)."""
    vision_blocks_used: Callable[[PreTrainedModel], range]
    """Vision blocks whose output reaches the projector (adapters elsewhere would be dead weight)."""
    vit_targets: tuple[str, ...]
    """Default ViT LoRA target linears (``lora.vit_targets`` overrides)."""
    set_pixel_bounds: Callable[[Any, int | None, int | None], None]
    """Apply ``model.min_pixels`` / ``model.max_pixels`` to a processor (None: keep its own); a family
    without pixel bounds raises ``ConfigError`` when either is set."""
    text_positions: Callable[[PreTrainedModel, torch.Tensor, torch.Tensor, dict], torch.Tensor]
    """``(model, input_ids, attention_mask, image inputs) -> position_ids`` of right-padded rows, as the
    family's own forward pass would number them: ``(B, L)``, or ``(3, B, L)`` for M-RoPE. Training passes
    them explicitly, so a packed row (``stmed.model.packing``) can renumber its second branch."""
    published_names: tuple[tuple[str, str], ...] = ()
    """``(in-memory prefix, published prefix)`` pairs, first match wins: how the family's releases name
    the parameters that transformers 5 holds as ``model.…`` (``stmed.model.export``)."""
    mm_limits: tuple[tuple[str, int], ...] = (("image", 1),)
    """vLLM's ``limit_mm_per_prompt``: one image, and none of any other input the family could take
    (Qwen2.5-VL's video), so an engine's start-up profiles only inputs that come."""
    shares_prefix: bool = True
    """Whether a preference pair's answers can be packed on one copy of the prompt (``dpo.shared_prefix``):
    the family's forward takes explicit positions and a 4D attention mask."""
    text_inputs: Callable[[PreTrainedModel, torch.Tensor], dict[str, torch.Tensor]] = lambda model, ids: {}
    """``(model, input_ids) -> extra per-token forward inputs`` that the family's processor would add to a
    batch (Gemma 3's ``token_type_ids``, which switch on attention both ways among an image's tokens)."""
    packed_mask: Callable[[PreTrainedModel, torch.Tensor, torch.Tensor, torch.Tensor], Any] = (
        lambda model, allowed, ids, positions: allowed)
    """``(model, allowed, input_ids, position_ids) -> attention_mask`` of packed pairs: ``allowed`` is the
    boolean ``(B, 1, L, L)`` block mask of ``stmed.model.packing``; a family whose own mask differs from a
    causal one (Gemma 3: images attend both ways, sliding-window layers) returns its version, a tensor or a
    dict by layer type, still boolean."""

    def is_vision(self, name: str) -> bool:
        """Whether module ``name`` lies in the vision encoder proper (not its projector / merger)."""
        parts = name.split(".")
        return self.vision_tower in parts and self.projector not in parts


def hf_model(model: nn.Module) -> PreTrainedModel:
    """The underlying Hugging Face model, whether or not DDP and PEFT wrappers are around it."""
    if isinstance(model, DistributedDataParallel):
        model = model.module
    return model.get_base_model() if isinstance(model, PeftModel) else model


def image_kwargs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The image inputs of a collated batch, as keyword arguments for the model's forward."""
    return {key: batch[key] for key in IMAGE_KEYS if key in batch}


def collate_images(inputs: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Batch per-image inputs of :attr:`Family.image_inputs` (each with a leading image axis)."""
    if not inputs:
        raise ValueError("collate_images: no images")
    return {key: torch.cat([one[key] for one in inputs]) for key in inputs[0]}
