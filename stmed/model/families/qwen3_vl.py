"""Qwen3-VL (``Qwen3VLForConditionalGeneration``, e.g. ``Qwen/Qwen3-VL-8B-Instruct``): a native-resolution ViT
with DeepStack, a patch merger, Qwen3.

What it shares with Qwen2.5-VL (``stmed.model.families.qwen2_5_vl``, whose pieces it reuses): ChatML with the
``questioner`` role and the ``<|vision_start|><|image_pad|><|vision_end|>`` image block, an image count that
depends on its size (``t * h * w / merge_size**2`` within the pixel bounds), the flattened patches and
``image_grid_thw`` as the forward's image inputs, and M-RoPE positions that training must pass itself.

Where it differs, and what that means here:

- **patches** — 16 px (Qwen2.5-VL: 14), merged 2×2: 32 px per image token side on the release.
- **positions** — M-RoPE with the frequencies interleaved over time/height/width (``mrope_interleaved``),
  numbered by the model's own ``get_rope_index`` (which wants ``mm_token_type_ids``: 1 on image tokens;
  ``text_positions`` builds them). Text after the image advances all three rows by one, as in Qwen2.5-VL,
  so packed DPO pairs (``stmed.model.packing``) renumber their second branch the same way, exactly.
- **DeepStack** — features of a few intermediate vision blocks (``deepstack_visual_indexes``) go through
  their own mergers (``visual.deepstack_merger_list.N``) and are added to the first decoder layers'
  hidden states at the image tokens. In a packed pair the image lies in the shared prompt, so the
  injection reaches exactly the tokens it reaches in each separate sequence. Those mergers stay frozen:
  the projector group is ``visual.merger`` (a family names one projector module); their blocks do get ViT
  LoRA (every block feeds the merger or a DeepStack merger).
- **modules** — blocks ``visual.blocks.N`` with ``attn.qkv``, ``attn.proj``, ``mlp.linear_fc1/linear_fc2``
  (a GELU MLP, not Qwen2.5-VL's gated one).
- **layout** — the release already uses transformers 5's names (``model.language_model.…``,
  ``model.visual.…``, ``lm_head``), which vLLM reads as they are.

The ``tiny-qwen3-vl`` preset: seeded random weights, the Qwen2.5-VL preset's tokenizer (Qwen3-VL keeps
Qwen's special tokens), 8-px patches merged 2×2 so a 64-px phantom is 16 image tokens, and DeepStack from
block 0 of 2.
"""

from __future__ import annotations

import torch
from transformers import (
    AutoTokenizer,
    Qwen2VLImageProcessorPil,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)
from transformers import Qwen3VLProcessor as HFQwen3VLProcessor

from stmed.model.families import qwen2_5_vl as qwen
from stmed.model.families.base import Family, hf_model

# The tiny preset: 8 px patches merged 2x2 -> one token per 16x16 pixels; a 64x64 image is 16 tokens.
TINY_PATCH_SIZE, TINY_MERGE_SIZE = 8, 2
TINY_MIN_PIXELS, TINY_MAX_PIXELS = 32 * 32, 64 * 64
QWEN3_MEAN = QWEN3_STD = [0.5, 0.5, 0.5]


class Qwen3VLProcessor(HFQwen3VLProcessor):
    """Transformers' Qwen3-VL processor without its video processor: images and text only.

    As for Qwen2.5-VL: the video processor needs torchvision, which the CPU machines do not have, and the
    class is named like the stock one so that an export's ``processor_class`` names the stock class.
    """

    @classmethod
    def get_attributes(cls) -> list[str]:
        return ["image_processor", "tokenizer"]


def load_processor(name_or_path: str) -> HFQwen3VLProcessor:
    """A checkpoint's tokenizer, image processor and chat template, without the video processor."""
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(name_or_path)
    return Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                            chat_template=getattr(tokenizer, "chat_template", None))  # fmt: skip


def build_tiny(seed: int = 0) -> tuple[Qwen3VLForConditionalGeneration, Qwen3VLProcessor]:
    """A sub-million-parameter Qwen3-VL with seeded random weights and the tiny ChatML tokenizer."""
    tokenizer = qwen.tiny_tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in qwen.SPECIAL_TOKENS}
    text = {
        "vocab_size": len(tokenizer), "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "max_position_embeddings": 4096,
        # Interleaved M-RoPE over each head's 16 rotary frequencies (the 8B: [24, 20, 20] of 64).
        "rope_parameters": {"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [6, 5, 5],
                            "mrope_interleaved": True},
        "tie_word_embeddings": False, "bos_token_id": None, "eos_token_id": ids[qwen.IM_END],
        "pad_token_id": ids[qwen.ENDOFTEXT],
    }  # fmt: skip
    vision = {
        "depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 4, "out_hidden_size": 128,
        "patch_size": TINY_PATCH_SIZE, "spatial_merge_size": TINY_MERGE_SIZE, "temporal_patch_size": 2,
        "num_position_embeddings": 64, "deepstack_visual_indexes": [0], "in_channels": 3,
    }  # fmt: skip
    config = Qwen3VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids[qwen.IMAGE_PAD],
        video_token_id=ids[qwen.VIDEO_PAD], vision_start_token_id=ids[qwen.VISION_START],
        vision_end_token_id=ids[qwen.VISION_END], tie_word_embeddings=False,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3VLForConditionalGeneration(config)
    model.generation_config.bos_token_id = None
    model.generation_config.eos_token_id = ids[qwen.IM_END]
    model.generation_config.pad_token_id = ids[qwen.ENDOFTEXT]
    model.eval()
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": TINY_MIN_PIXELS, "longest_edge": TINY_MAX_PIXELS},
        patch_size=TINY_PATCH_SIZE, merge_size=TINY_MERGE_SIZE, temporal_patch_size=2,
        image_mean=QWEN3_MEAN, image_std=QWEN3_STD,
    )  # fmt: skip
    return model, Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer)


def max_image_tokens(processor_or_model) -> int:
    """The image tokens at ``max_pixels`` (processor); the model alone does not know its processor's bounds."""
    if isinstance(processor_or_model, HFQwen3VLProcessor):
        proc = processor_or_model.image_processor
        return proc.size["longest_edge"] // (proc.patch_size * proc.merge_size) ** 2
    vision = hf_model(processor_or_model).config.vision_config
    raise ValueError(f"Qwen3-VL's image token count depends on its processor's pixel bounds, not the model "
                     f"(patch {vision.patch_size}); pass the processor")  # fmt: skip


PUBLISHED_NAMES = (
    ("model.language_model.", "model.language_model."),
    ("model.visual.", "model.visual."),
    ("lm_head.", "lm_head."),
)
"""The names of ``Qwen/Qwen3-VL-8B-Instruct``'s release: transformers 5's own, which vLLM reads."""

QWEN3_VL = Family(
    name="qwen3-vl", model_type="qwen3_vl", model_class=Qwen3VLForConditionalGeneration,
    processor_class=HFQwen3VLProcessor, load_processor=load_processor, chat=qwen.CHATML, preset="tiny-qwen3-vl",
    build_tiny=build_tiny, complete_processor=qwen.complete_processor, image_tokens=qwen.image_tokens,
    max_image_tokens=max_image_tokens, image_inputs=qwen.image_inputs, vision_tower="visual",
    vision_blocks="blocks", projector="merger",
    # Every block feeds the merger (the tower's last layer) or a DeepStack merger.
    vision_blocks_used=lambda model: range(hf_model(model).config.vision_config.depth),
    vit_targets=("qkv", "proj", "linear_fc1", "linear_fc2"), set_pixel_bounds=qwen.set_pixel_bounds,
    text_positions=qwen.text_positions, published_names=PUBLISHED_NAMES,
)  # fmt: skip
