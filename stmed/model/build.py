"""The vision-language model: building, loading, and what an image costs in tokens (METHOD §1).

Which model family a checkpoint or preset is (LLaVA-1.5, Qwen2.5-VL) is decided here, once, from its
``config.json`` ``model_type`` or the preset's name; everything that differs between families is in
``stmed.model.families`` and reached through :func:`family_of`. Real checkpoints
(``llava-hf/llava-1.5-7b-hf``, ``Qwen/Qwen2.5-VL-7B-Instruct``) load through the Auto classes; a preset
(``tiny``, ``tiny-qwen2.5-vl``) builds the family's architecture with random seeded weights and a
tokenizer trained locally, so tests and demos run on CPU without a download.

LoRA, the optimiser's parameter groups and the merged export are in ``stmed.model.lora``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, PretrainedConfig, PreTrainedModel

from stmed.config import ConfigError, ModelConfig
from stmed.log import get_logger
from stmed.model.families import FAMILIES, Family, family_for_preset, family_of, hf_model
from stmed.model.families.llava import CLIP_MEAN, CLIP_STD, PROJECTOR, build_tiny
from stmed.model.prompts import ChatFormat

__all__ = ["CLIP_MEAN", "CLIP_STD", "PROJECTOR", "build_tiny", "check_checkpoint", "checkpoint_chat", "family_of",
           "hf_model", "image_inputs", "image_seq_len", "image_tokens", "load_model", "load_processor",
           "pixel_values"]  # fmt: skip

log = get_logger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------- building and loading


# Original-layout LLaVA releases (haotian-liu/LLaVA code, LLaVA-Med v1.5): convert them once.
ORIGINAL_LAYOUT_ARCHITECTURES = ("LlavaLlamaForCausalLM", "LlavaMistralForCausalLM", "LlavaMptForCausalLM")
# HF model types that look like LLaVA but tile an image into a variable number of tokens.
UNSUPPORTED_MODEL_TYPES = {
    "llava_next": "LLaVA-NeXT", "llava_next_video": "LLaVA-NeXT-Video", "llava_onevision": "LLaVA-OneVision",
}


def check_checkpoint(name_or_path: str) -> dict:
    """The checkpoint's ``config.json`` as a dict, or ``ConfigError`` naming what to do with it: an
    original-layout LLaVA is converted with ``python -m stmed.convert``, LLaVA-NeXT-style tiling is refused.

    Reads the raw file (no model class is resolved), so a driver can check before any worker starts.
    """
    try:
        raw, _ = PretrainedConfig.get_config_dict(name_or_path)
    except OSError as err:
        reason = " ".join(str(err).split())[:200]
        raise ConfigError(f"model.name_or_path: no checkpoint at {name_or_path} ({reason})") from None
    architectures = raw.get("architectures") or []
    original = [a for a in architectures if a in ORIGINAL_LAYOUT_ARCHITECTURES]
    if original or "mm_projector_type" in raw or "mm_vision_tower" in raw:
        kind = original[0] if original else raw.get("model_type", "LLaVA")
        raise ConfigError(
            f"model.name_or_path: {name_or_path} is an original-layout LLaVA checkpoint ({kind}); convert it "
            f"once with `python -m stmed.convert {name_or_path} DST` and set model.name_or_path=DST")
    model_type = raw.get("model_type")
    if model_type in UNSUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"model.name_or_path: {name_or_path} is {UNSUPPORTED_MODEL_TYPES[model_type]} ({model_type}), "
            "which "
            "tiles each image into a variable number of tokens; stmed trains LLaVA-1.5-style checkpoints "
            "(llava-hf layout, model_type 'llava'); use one of those")
    if model_type not in FAMILIES:
        supported = ", ".join(f"{f.name} (model_type {f.model_type!r})" for f in FAMILIES.values())
        raise ConfigError(f"model.name_or_path: {name_or_path} has model_type {model_type!r}; stmed trains "
                          f"{supported}; LLaVA-1.5 in the llava-hf layout")
    return raw


def checkpoint_chat(name_or_path: str) -> ChatFormat:
    """The chat format of a checkpoint's family, from its ``config.json`` alone: for engines that are
    handed a path and the rendered prompt (vLLM), never the processor."""
    return family_of(check_checkpoint(name_or_path)).chat


def load_processor(cfg: ModelConfig):
    """The processor named by ``cfg``, complete enough to count and expand image tokens: what a driver
    loads to check a length budget before any worker starts (no weights are read)."""
    if cfg.preset is not None:
        return load_model(cfg)[1]
    raw = check_checkpoint(cfg.name_or_path)
    check_safetensors(cfg.name_or_path)  # here too: a driver checks before any worker starts
    family = family_of(raw)
    processor = family.load_processor(cfg.name_or_path)
    family.complete_processor(processor, raw, cfg.name_or_path)
    family.set_pixel_bounds(processor, cfg.min_pixels, cfg.max_pixels)
    return processor


def check_safetensors(name_or_path: str) -> None:
    """A local checkpoint must hold ``*.safetensors`` weights: ``.bin`` files are pickles, which stmed
    never loads (a crafted one would otherwise end in an ``UnpicklingError`` traceback, or worse)."""
    folder = Path(name_or_path)
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles:
        raise ConfigError(f"model.name_or_path: {name_or_path} holds only pickled weights "
                          f"({', '.join(pickles[:3])}), which stmed does not load; convert them to "
                          "safetensors first (e.g. load and save_pretrained(safe_serialization=True) where you "
                          "trust the file)")
    raise ConfigError(f"model.name_or_path: {name_or_path} holds no *.safetensors weights")


def load_model(cfg: ModelConfig) -> tuple[PreTrainedModel, object]:
    """The model and processor named by ``cfg``: a family's tiny preset, or a checkpoint of a family."""
    dtype = DTYPES[cfg.dtype]
    if cfg.preset is not None:
        try:
            family = family_for_preset(cfg.preset)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        model, processor = family.build_tiny(cfg.seed)
        family.set_pixel_bounds(processor, cfg.min_pixels, cfg.max_pixels)
        return model.to(dtype), processor
    processor = load_processor(cfg)
    family = family_of(processor)
    check_safetensors(cfg.name_or_path)
    model = AutoModelForImageTextToText.from_pretrained(
        cfg.name_or_path, dtype=dtype, trust_remote_code=False, use_safetensors=True
    )
    _check_layout(model, family, cfg.name_or_path)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.eval()
    log.info("loaded %s (%s, %s, %.1fM params)", cfg.name_or_path, family.name, cfg.dtype,
             model.num_parameters() / 1e6)  # fmt: skip
    return model, processor


def _check_layout(model: PreTrainedModel, family: Family, where: str) -> None:
    names = {name.split(".")[-1] for name, _ in model.named_modules()}
    if not isinstance(model, family.model_class) or not {family.projector, family.vision_tower} <= names:
        raise ConfigError(
            f"model.name_or_path: {where} is a {type(model).__name__}, not a {family.name} model "
            f"({family.model_class.__name__}: {family.vision_tower} + {family.projector} + language model)"
        )


def image_seq_len(processor_or_model) -> int:
    """How many image tokens one image expands to in the text: at most (a family whose count depends
    on the image's size, like Qwen2.5-VL, gives the count at its processor's ``max_pixels``)."""
    return family_of(processor_or_model).max_image_tokens(processor_or_model)


def image_tokens(processor, image: Image.Image) -> int:
    """How many image tokens ``image`` expands to in the text with ``processor``."""
    return family_of(processor).image_tokens(processor, image)


def image_inputs(processor, images: list[Image.Image]) -> dict[str, torch.Tensor]:
    """The forward pass's image inputs for ``images`` (``pixel_values``, and ``image_grid_thw`` for
    Qwen2.5-VL); ``stmed.model.families.collate_images`` batches several such dicts."""
    return family_of(processor).image_inputs(processor, images)


def pixel_values(processor, images: list[Image.Image]) -> torch.Tensor:
    """The vision tower's ``pixel_values`` for ``images`` (LLaVA: (batch, 3, H, W) float32, resized,
    cropped, normalised)."""
    return image_inputs(processor, images)["pixel_values"]
