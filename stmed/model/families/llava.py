"""LLaVA-1.5 (llava-hf layout, ``LlavaForConditionalGeneration``): METHOD §1's model.

A CLIP vision tower read at its penultimate layer with CLS dropped, a 2-layer MLP projector
(``multi_modal_projector``), a Llama decoder, the Vicuna v1 template with the questioner ``VUSER``.
Every image is resized and cropped to one size, so it is always the same number of ``<image>`` tokens.
The ``tiny`` preset builds this architecture with seeded random weights and the tokenizer trained
locally (``stmed/model/tiny_tokenizer.json``).
"""

from __future__ import annotations

import torch
from PIL import Image
from transformers import (
    AutoProcessor,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedModel,
)

from stmed.config import ConfigError
from stmed.log import get_logger
from stmed.model.families.base import Family, hf_model
from stmed.model.prompts import VICUNA
from stmed.model.tokenizer import IMAGE, TINY_TOKENIZER, load_checkpoint_tokenizer, load_tokenizer

log = get_logger(__name__)

PROJECTOR = "multi_modal_projector"
# The tiny preset: 64 px images in 8 px patches -> 64 image tokens (CLS dropped).
TINY_IMAGE_SIZE = 64
TINY_PATCH_SIZE = 8
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


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


def load_processor(name_or_path: str) -> LlavaProcessor:
    """The checkpoint's processor with the PIL image processor, whether or not torchvision is installed
    (transformers picks the torchvision one when it is, whose resize differs in the last bits)."""
    return AutoProcessor.from_pretrained(name_or_path, trust_remote_code=False, backend="pil",
                                         tokenizer=load_checkpoint_tokenizer(name_or_path))


def complete_processor(processor: LlavaProcessor, raw: dict, where: str) -> None:
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


def max_image_tokens(processor_or_model: LlavaProcessor | PreTrainedModel) -> int:
    """How many ``<image>`` tokens one image expands to in the text (every image: they are cropped)."""
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


def image_inputs(processor: LlavaProcessor, images: list[Image.Image]) -> dict[str, torch.Tensor]:
    """``pixel_values`` (batch, 3, H, W) float32: resized, cropped, normalised."""
    if not images:
        raise ValueError("pixel_values: no images given")
    return {"pixel_values": processor.image_processor(images=images, return_tensors="pt")["pixel_values"]}


def vision_blocks_used(model: PreTrainedModel) -> range:
    """Vision encoder layers whose output reaches the projector.

    LLaVA reads the tower at ``vision_feature_layer`` (the penultimate layer), so later layers never get a
    gradient; an adapter there would only be dead weight — and an unused trainable parameter that
    DistributedDataParallel refuses to reduce.
    """
    config = model.config
    n_layers = config.vision_config.num_hidden_layers
    feature_layers = config.vision_feature_layer
    feature_layers = [feature_layers] if isinstance(feature_layers, int) else list(feature_layers)
    # hidden_states has n_layers + 1 entries (embeddings first); entry i is the output of layer i - 1.
    deepest = max(layer % (n_layers + 1) for layer in feature_layers)
    return range(deepest)


def set_pixel_bounds(processor: LlavaProcessor, min_pixels: int | None, max_pixels: int | None) -> None:
    if min_pixels is not None or max_pixels is not None:
        raise ConfigError("model.min_pixels / model.max_pixels: LLaVA-1.5 resizes and crops every image to one "
                          "size, so it has no pixel bounds; leave both unset")  # fmt: skip


def text_positions(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   images: dict[str, torch.Tensor]) -> torch.Tensor:  # fmt: skip
    """``(B, L)``: LLaVA numbers every token of a right-padded row 0, 1, 2, … (image tokens included)."""
    return torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape[0], -1)


PUBLISHED_NAMES = (
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)
"""llava-hf's names (the transformers 4.36 layout of ``llava-hf/llava-1.5-7b-hf``), which vLLM reads."""

LLAVA = Family(
    name="llava-1.5", model_type="llava", model_class=LlavaForConditionalGeneration,
    processor_class=LlavaProcessor, load_processor=load_processor, chat=VICUNA, preset="tiny", build_tiny=build_tiny,
    complete_processor=complete_processor, image_tokens=lambda processor, _image: max_image_tokens(processor),
    max_image_tokens=max_image_tokens, image_inputs=image_inputs, vision_tower="vision_tower",
    vision_blocks="layers", projector=PROJECTOR, vision_blocks_used=vision_blocks_used,
    vit_targets=("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"), set_pixel_bounds=set_pixel_bounds,
    text_positions=text_positions, published_names=PUBLISHED_NAMES,
)  # fmt: skip
