"""The LLaVA-style vision-language model: building, loading, and what an image costs in tokens (METHOD §1).

One model family throughout: Hugging Face ``LlavaForConditionalGeneration`` — a CLIP vision tower read at
its penultimate layer with CLS dropped, a 2-layer MLP projector (``multi_modal_projector``), and a Llama
decoder. Real checkpoints (``llava-hf/llava-1.5-7b-hf``) load through the Auto classes; the ``tiny``
preset builds the same architecture with random seeded weights and a tokenizer trained locally (shipped
as ``tiny_tokenizer.json`` beside this file), so tests and demos run on CPU without a download.

LoRA, the optimiser's parameter groups and the merged export are in ``stmed.model.lora``.
"""

from __future__ import annotations

import torch
from peft import PeftModel
from PIL import Image
from torch import nn
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PretrainedConfig,
    PreTrainedModel,
)

from stmed.config import ConfigError, ModelConfig
from stmed.log import get_logger
from stmed.model.tokenizer import IMAGE, TINY_TOKENIZER, load_tokenizer

log = get_logger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PROJECTOR = "multi_modal_projector"

# The tiny preset: 64 px images in 8 px patches -> 64 image tokens (CLS dropped).
TINY_IMAGE_SIZE = 64
TINY_PATCH_SIZE = 8
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


# ----------------------------------------------------------------------------- building and loading


def build_tiny(seed: int = 0) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A sub-million-parameter LLaVA with seeded random weights and the tiny tokenizer."""
    tokenizer = load_tokenizer(TINY_TOKENIZER)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE)
    vision = CLIPVisionConfig(
        hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        image_size=TINY_IMAGE_SIZE, patch_size=TINY_PATCH_SIZE, projection_dim=64,
    )  # fmt: skip
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )  # fmt: skip
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=image_token_id,
        image_seq_length=(TINY_IMAGE_SIZE // TINY_PATCH_SIZE) ** 2,
        vision_feature_select_strategy="default", vision_feature_layer=-2,
    )  # fmt: skip
    # fork_rng: the weights depend on `seed` alone, and the caller's global RNG stream is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": TINY_IMAGE_SIZE},
        crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
        image_mean=CLIP_MEAN, image_std=CLIP_STD,
    )  # fmt: skip
    # num_additional_image_tokens=1 counts CLIP's CLS; "default" removes it again -> 64 tokens.
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=TINY_PATCH_SIZE,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, image_token=IMAGE,
    )  # fmt: skip
    return model, processor


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
    if model_type != "llava":
        raise ConfigError(f"model.name_or_path: {name_or_path} has model_type {model_type!r}; stmed trains "
                          "LLaVA-1.5-style checkpoints (llava-hf layout, model_type 'llava')")
    return raw


def load_processor(cfg: ModelConfig) -> LlavaProcessor:
    """The processor named by ``cfg``, complete enough to count and expand image tokens: what a driver
    loads to check a length budget before any worker starts (no weights are read)."""
    if cfg.preset is not None:
        return load_model(cfg)[1]
    raw = check_checkpoint(cfg.name_or_path)
    processor = AutoProcessor.from_pretrained(cfg.name_or_path, trust_remote_code=False)
    _complete_processor(processor, raw, cfg.name_or_path)
    return processor


def _complete_processor(processor: LlavaProcessor, raw: dict, where: str) -> None:
    """Fill in what an older snapshot leaves out, from the model config.

    Without ``processor_config.json`` the processor has no ``patch_size``: it can neither count image
    tokens nor expand ``<image>`` into them, although the model config says how many there are. A
    tokenizer without a pad token (common in Mistral-based conversions) cannot pad a batch: pad with
    ``<unk>`` (or ``</s>``) — padded positions are masked out of attention and of every loss.
    """
    if processor.patch_size is None:
        vision = raw.get("vision_config", {})
        processor.patch_size = vision.get("patch_size", 14)
        processor.vision_feature_select_strategy = raw.get("vision_feature_select_strategy", "default")
        clip = vision.get("model_type", "clip_vision_model") == "clip_vision_model"
        processor.num_additional_image_tokens = 1 if clip else 0
        log.info("%s has no processor_config.json: patch size %d and the %s feature strategy from its "
                 "config.json", where, processor.patch_size, processor.vision_feature_select_strategy)
    tokenizer = processor.tokenizer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
        log.info("%s has no pad token: padding with %s", where, tokenizer.pad_token)


def load_model(cfg: ModelConfig) -> tuple[PreTrainedModel, LlavaProcessor]:
    """The model and processor named by ``cfg``: the tiny preset, or a LLaVA-1.5-style checkpoint."""
    dtype = DTYPES[cfg.dtype]
    if cfg.preset == "tiny":
        model, processor = build_tiny(cfg.seed)
        return model.to(dtype), processor
    if cfg.preset is not None:
        raise ConfigError(f"model.preset: unknown preset {cfg.preset!r}; the only preset is 'tiny'")
    processor = load_processor(cfg)
    model = AutoModelForImageTextToText.from_pretrained(
        cfg.name_or_path, dtype=dtype, trust_remote_code=False
    )
    inner = getattr(model, "model", None)
    if not hasattr(inner, PROJECTOR) or not hasattr(inner, "vision_tower"):
        raise ConfigError(
            f"model.name_or_path: {cfg.name_or_path} is a {type(model).__name__}, not a LLaVA-style model "
            f"(vision_tower + {PROJECTOR} + language model)"
        )
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.eval()
    log.info("loaded %s (%s, %.1fM params)", cfg.name_or_path, cfg.dtype, model.num_parameters() / 1e6)
    return model, processor


def image_seq_len(processor_or_model: LlavaProcessor | PreTrainedModel) -> int:
    """How many ``<image>`` tokens one image expands to in the text."""
    if isinstance(processor_or_model, LlavaProcessor):
        proc = processor_or_model
        crop = proc.image_processor.crop_size
        n = (crop["height"] // proc.patch_size) * (crop["width"] // proc.patch_size)
        n += proc.num_additional_image_tokens
        return n - 1 if proc.vision_feature_select_strategy == "default" else n
    config = hf_model(processor_or_model).config
    vision = config.vision_config
    n = (vision.image_size // vision.patch_size) ** 2
    # A CLIP tower adds a CLS token; the "full" strategy keeps it.
    has_cls = vision.model_type == "clip_vision_model"
    return n + 1 if has_cls and config.vision_feature_select_strategy == "full" else n


def pixel_values(processor: LlavaProcessor, images: list[Image.Image]) -> torch.Tensor:
    """The vision tower's input for ``images``: (batch, 3, H, W) float32, resized, cropped, normalised."""
    if not images:
        raise ValueError("pixel_values: no images given")
    return processor.image_processor(images=images, return_tensors="pt")["pixel_values"]

def hf_model(model: nn.Module) -> PreTrainedModel:
    """The underlying Hugging Face model, whether or not a PEFT wrapper is around it."""
    return model.get_base_model() if isinstance(model, PeftModel) else model
