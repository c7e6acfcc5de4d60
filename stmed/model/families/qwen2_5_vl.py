"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): a native-resolution ViT, a patch merger, Qwen2.

Differences from LLaVA that the rest of the code meets only through this family record:

- **chat format** — ChatML; the questioner is its own role, written and trained like the assistant::

      <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n<|vision_start|><|image_pad|><|vision_end|>Q1<|im_end|>\\n
      <|im_start|>assistant\\nA1<|im_end|>\\n<|im_start|>questioner\\nQ2<|im_end|>\\n<|im_start|>assistant\\nA2<|im_end|>\\n

  Targets are ``A1<|im_end|>``, ``Q2<|im_end|>``, ``A2<|im_end|>``; a prompt ends with the open
  ``<|im_start|>assistant\\n`` (or ``questioner``), so the model writes its text directly.
- **image tokens** — the processor resizes each image to a multiple of ``patch_size * merge_size``
  within ``[min_pixels, max_pixels]`` and an image becomes ``t * h * w / merge_size**2`` tokens
  (``image_grid_thw``), so the count depends on the image's size; the forward pass takes the
  flattened patches (``pixel_values``, (patches, 3 * t * p * p)) and ``image_grid_thw`` (images, 3).
- **modules** — vision tower ``visual`` (blocks ``visual.blocks.N``: ``attn.qkv``, ``attn.proj``,
  ``mlp.gate_proj/up_proj/down_proj``), every block feeding the merger ``visual.merger`` (the projector).

The ``tiny-qwen2.5-vl`` preset: seeded random weights, the tiny byte-level BPE tokenizer with Qwen's
special tokens added (no BOS, ``<|im_end|>`` the eos, ``<|endoftext|>`` the pad), and pixel bounds that
make a 64-px phantom 16 image tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image
from tokenizers import AddedToken, Tokenizer, processors
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)
from transformers import Qwen2_5_VLProcessor as HFQwen2_5_VLProcessor

from stmed.config import ConfigError
from stmed.log import get_logger
from stmed.model.families.base import Family, hf_model
from stmed.model.prompts import ASSISTANT, QUESTIONER, USER, ChatFormat
from stmed.model.tokenizer import TINY_TOKENIZER

log = get_logger(__name__)

IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD]

CHATML = ChatFormat(
    name="chatml", names={USER: "user", ASSISTANT: "assistant", QUESTIONER: "questioner"},
    header=IM_START + "system\n{system}" + IM_END + "\n", prefix=IM_START + "{role}\n",
    open_prefix=IM_START + "{role}\n", eos=IM_END, user_tail=IM_END + "\n", answer_tail="\n",
    question_tail="\n", image_token=IMAGE_PAD, image_block=VISION_START + IMAGE_PAD + VISION_END,
)  # fmt: skip
"""Qwen's ChatML with a third role, ``questioner``."""

# The tiny preset: 8 px patches merged 2x2 -> one token per 16x16 pixels; a 64x64 image is 16 tokens.
TINY_PATCH_SIZE, TINY_MERGE_SIZE = 8, 2
TINY_MIN_PIXELS, TINY_MAX_PIXELS = 32 * 32, 64 * 64
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


class Qwen2_5_VLProcessor(HFQwen2_5_VLProcessor):
    """Transformers' Qwen2.5-VL processor without its video processor: images and text only.

    Transformers' video processors need torchvision, which the CPU machines do not have, and the
    stock processor refuses to be built without one even for images. Named like the stock class on
    purpose: ``save_pretrained`` writes ``"processor_class": self.__class__.__name__``, and an export must
    name the stock class so that transformers and vLLM load it as any Qwen2.5-VL checkpoint.
    """

    @classmethod
    def get_attributes(cls) -> list[str]:
        return ["image_processor", "tokenizer"]

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save, then add the video processor the stock class needs to be built (vLLM builds it): the
        image processor's patching and normalisation, so a loader sees the release's set of parts."""
        saved = super().save_pretrained(save_directory, *args, **kwargs)
        path = Path(save_directory) / "processor_config.json"
        config = json.loads(path.read_text())
        image = self.image_processor
        config["video_processor"] = {
            "video_processor_type": "Qwen2VLVideoProcessor", "patch_size": image.patch_size,
            "temporal_patch_size": image.temporal_patch_size, "merge_size": image.merge_size,
            "image_mean": list(image.image_mean), "image_std": list(image.image_std), "size": dict(image.size),
        }  # fmt: skip
        path.write_text(json.dumps(config, indent=2) + "\n")
        return saved


def load_processor(name_or_path: str) -> HFQwen2_5_VLProcessor:
    """A checkpoint's tokenizer, image processor and chat template, without the video processor."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(name_or_path)
    return Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               chat_template=getattr(tokenizer, "chat_template", None))  # fmt: skip


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny preset's byte-level BPE with Qwen's special tokens added and no BOS."""
    bpe = Tokenizer.from_file(str(TINY_TOKENIZER))
    bpe.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])
    # Offsets must cover every character, leading spaces included (see stmed.model.tokenizer).
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token=IM_END, pad_token=ENDOFTEXT,
        extra_special_tokens={"image_token": IMAGE_PAD, "video_token": VIDEO_PAD,
                              "vision_bos_token": VISION_START, "vision_eos_token": VISION_END},
        padding_side="right", model_max_length=4096, clean_up_tokenization_spaces=False,
    )  # fmt: skip


def build_tiny(seed: int = 0) -> tuple[Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor]:
    """A sub-million-parameter Qwen2.5-VL with seeded random weights and the tiny ChatML tokenizer."""
    tokenizer = tiny_tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    text = {
        "vocab_size": len(tokenizer), "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
        # M-RoPE splits each head's 32 rotary dims (16 frequencies) over time, height and width.
        "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]}, "tie_word_embeddings": False,
        "bos_token_id": None, "eos_token_id": ids[IM_END], "pad_token_id": ids[ENDOFTEXT],
    }  # fmt: skip
    vision = {
        "depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 4, "out_hidden_size": 128,
        "patch_size": TINY_PATCH_SIZE, "spatial_merge_size": TINY_MERGE_SIZE, "temporal_patch_size": 2,
        # Attention windows of 4x4 merged tokens; block 1 attends globally (the 7B: every 8th block).
        "window_size": 4 * TINY_PATCH_SIZE * TINY_MERGE_SIZE, "fullatt_block_indexes": [1], "in_chans": 3,
    }  # fmt: skip
    config = Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids[IMAGE_PAD], video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START], vision_end_token_id=ids[VISION_END],
        bos_token_id=None, eos_token_id=ids[IM_END], pad_token_id=ids[ENDOFTEXT], tie_word_embeddings=False,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.bos_token_id = None
    model.generation_config.eos_token_id = ids[IM_END]
    model.generation_config.pad_token_id = ids[ENDOFTEXT]
    model.eval()
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": TINY_MIN_PIXELS, "longest_edge": TINY_MAX_PIXELS},
        patch_size=TINY_PATCH_SIZE, merge_size=TINY_MERGE_SIZE, temporal_patch_size=2,
        image_mean=CLIP_MEAN, image_std=CLIP_STD,
    )  # fmt: skip
    return model, Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer)


def complete_processor(processor: HFQwen2_5_VLProcessor, raw: dict, where: str) -> None:
    """Qwen releases ship their processor complete; only a missing pad token is filled in."""
    tokenizer = processor.tokenizer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = ENDOFTEXT
        log.info("%s has no pad token: padding with %s", where, ENDOFTEXT)


def image_tokens(processor: Qwen2_5_VLProcessor, image: Image.Image) -> int:
    """``t * h * w / merge**2`` for ``image`` resized within the processor's pixel bounds."""
    proc = processor.image_processor
    width, height = image.size
    return proc.get_number_of_image_patches(height, width) // proc.merge_size**2


def max_image_tokens(processor_or_model) -> int:
    """The image tokens at ``max_pixels`` (processor), or of the model's largest grid it was built for."""
    if isinstance(processor_or_model, HFQwen2_5_VLProcessor):
        proc = processor_or_model.image_processor
        return proc.size["longest_edge"] // (proc.patch_size * proc.merge_size) ** 2
    vision = hf_model(processor_or_model).config.vision_config
    raise ValueError(f"Qwen2.5-VL's image token count depends on its processor's pixel bounds, not the model "
                     f"(patch {vision.patch_size}); pass the processor")  # fmt: skip


def image_inputs(processor: Qwen2_5_VLProcessor, images: list[Image.Image]) -> dict[str, torch.Tensor]:
    """``pixel_values`` (patches, 3 * t * p * p) and ``image_grid_thw`` (images, 3)."""
    if not images:
        raise ValueError("pixel_values: no images given")
    out = processor.image_processor(images=images, return_tensors="pt")
    return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}


def set_pixel_bounds(processor: HFQwen2_5_VLProcessor, min_pixels: int | None, max_pixels: int | None) -> None:
    """Resize every image to ``[min_pixels, max_pixels]`` pixels (the image processor's ``size``)."""
    proc = processor.image_processor
    size = {"shortest_edge": proc.size["shortest_edge"], "longest_edge": proc.size["longest_edge"]}
    size["shortest_edge"] = min_pixels or size["shortest_edge"]
    size["longest_edge"] = max_pixels or size["longest_edge"]
    if size["shortest_edge"] > size["longest_edge"]:
        raise ConfigError(f"model.min_pixels / model.max_pixels: {size['shortest_edge']} > "
                          f"{size['longest_edge']} once combined with the processor's own bounds")  # fmt: skip
    factor = (proc.patch_size * proc.merge_size) ** 2
    if size["longest_edge"] < factor:
        raise ConfigError(f"model.max_pixels must be at least one merged patch ({factor} pixels), "
                          f"got {size['longest_edge']}")  # fmt: skip
    proc.size = size


def text_positions(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   images: dict[str, torch.Tensor]) -> torch.Tensor:  # fmt: skip
    """``(3, B, L)`` M-RoPE positions: text advances all three rows by one, an image's tokens take their
    (time, height, width) grid coordinates.

    Transformers computes these itself only when the batch carries ``mm_token_type_ids`` (its processor
    adds them); a training batch built from our own encoding does not, and would silently fall back to
    1D positions that no Qwen2.5-VL checkpoint was trained with. So training passes them explicitly.
    """
    inner = hf_model(model).model
    token_types = (input_ids == inner.config.image_token_id).int()
    positions, _ = inner.get_rope_index(input_ids, token_types, image_grid_thw=images.get("image_grid_thw"),
                                        attention_mask=attention_mask)  # fmt: skip
    return positions


PUBLISHED_NAMES = (
    ("model.language_model.", "model."),
    ("model.visual.", "visual."),
    ("lm_head.", "lm_head."),
)
"""The names of ``Qwen/Qwen2.5-VL-7B-Instruct``'s release, which vLLM reads."""

QWEN2_5_VL = Family(
    name="qwen2.5-vl", model_type="qwen2_5_vl", model_class=Qwen2_5_VLForConditionalGeneration,
    processor_class=HFQwen2_5_VLProcessor, load_processor=load_processor, chat=CHATML, preset="tiny-qwen2.5-vl",
    build_tiny=build_tiny,
    complete_processor=complete_processor, image_tokens=image_tokens, max_image_tokens=max_image_tokens,
    image_inputs=image_inputs, vision_tower="visual", vision_blocks="blocks", projector="merger",
    # Every block feeds the merger (Qwen2.5-VL reads the tower's last layer).
    vision_blocks_used=lambda model: range(hf_model(model).config.vision_config.depth),
    vit_targets=("qkv", "proj", "gate_proj", "up_proj", "down_proj"), set_pixel_bounds=set_pixel_bounds,
    text_positions=text_positions, published_names=PUBLISHED_NAMES, mm_limits=(("image", 1), ("video", 0)),
)  # fmt: skip
