"""Original-layout LLaVA checkpoints to the Hugging Face layout every stage and vLLM load.

    python -m stmed.convert ckpt/llava-med-v1.5-mistral-7b ckpt/llava-med-v1.5-hf
    python -m stmed.convert ckpt/llava-v1.5-7b ckpt/llava-v1.5-hf \
        --vision-tower ckpt/clip-vit-large-patch14-336

SRC is a local folder (``huggingface-cli download microsoft/llava-med-v1.5-mistral-7b --local-dir …``).

The LLaVA code base (and LLaVA-Med v1.5 after it) saves ``LlavaLlamaForCausalLM`` /
``LlavaMistralForCausalLM``: a Llama or Mistral checkpoint whose ``model.`` holds the projector
(``model.mm_projector.{0,2}``, ``mlp2x_gelu``) and, in LLaVA-Med, the CLIP tower
(``model.vision_tower.vision_tower.vision_model.*``), with ``mm_*`` keys in its config and no image
token in its tokenizer (the code splices image features in at id -200). transformers and vLLM load
``LlavaForConditionalGeneration`` instead, so this writes:

- the weights under the names llava-hf publishes for that class (``language_model.model.*``,
  ``vision_tower.vision_model.*``, ``multi_modal_projector.linear_{1,2}.*``, ``language_model.lm_head.weight``),
  in safetensors shards;
- the tokenizer with ``<image>`` (and ``<pad>`` where it has none) added, the embedding and output
  rows of the new tokens set to the mean of the others (never read for ``<image>``, whose positions
  take the image features; masked for ``<pad>``);
- a ``LlavaConfig`` (the text config from the original's fields, the vision config read off the
  tower's weight shapes, ``mm_vision_select_layer`` / ``mm_vision_select_feature`` as the feature
  layer and strategy) and a CLIP image processor with the tower's size.

Other projector types (``linear``, ``mlp3x_gelu``, ``identity``…) are refused by name. One difference
stays: LLaVA's ``image_aspect_ratio: pad`` pads an image to a square before resizing, while the HF
processor resizes the short side and centre-crops (as llava-hf's own conversions do).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlavaConfig,
    LlavaProcessor,
    PreTrainedTokenizerBase,
)

from stmed.log import get_logger
from stmed.model.build import CLIP_MEAN, CLIP_STD, ORIGINAL_LAYOUT_ARCHITECTURES
from stmed.model.export import published_name
from stmed.model.families import LLAVA
from stmed.model.prompts import IMAGE_TOKEN
from stmed.model.tokenizer import load_checkpoint_tokenizer

log = get_logger(__name__)

PAD_TOKEN = "<pad>"
TEXT_MODEL_TYPES = {"LlavaLlamaForCausalLM": "llama", "LlavaMistralForCausalLM": "mistral"}
TEXT_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "sliding_window",
    "attention_dropout",
    "attention_bias",
    "mlp_bias",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "vocab_size",
    "head_dim",
)
VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."
SELECT_FEATURE = {"patch": "default", "cls_patch": "full"}
SHARD_BYTES = 4 * 1024**3


def read_original(src: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The original checkpoint's config and every weight (safetensors shards or a single file)."""
    config_path = src / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{src}: no config.json; expected an original-layout LLaVA checkpoint folder")
    config = json.loads(config_path.read_text())
    arch = [a for a in config.get("architectures") or [] if a in ORIGINAL_LAYOUT_ARCHITECTURES]
    if not arch:
        raise ValueError(f"{src}: architectures {config.get('architectures')} are not an original-layout "
                         f"LLaVA ({', '.join(ORIGINAL_LAYOUT_ARCHITECTURES)}); a llava-hf checkpoint needs "
                         "no conversion")  # fmt: skip
    if arch[0] not in TEXT_MODEL_TYPES:
        raise ValueError(f"{src}: {arch[0]} is not supported; the converter reads "
                         f"{', '.join(TEXT_MODEL_TYPES)}")  # fmt: skip
    projector = config.get("mm_projector_type", "linear")
    if projector != "mlp2x_gelu":
        raise ValueError(f"{src}: mm_projector_type {projector!r} is not supported; the HF LLaVA layout has "
                         "a 2-layer GELU MLP projector (mlp2x_gelu)")  # fmt: skip
    feature = config.get("mm_vision_select_feature", "patch")
    if feature not in SELECT_FEATURE:
        raise ValueError(f"{src}: mm_vision_select_feature {feature!r} is not supported (patch, cls_patch)")
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{src}: no *.safetensors weights (convert .bin shards to safetensors first)")
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        weights.update(load_file(str(file)))
    return config, weights


def _vision_weights(weights: dict[str, torch.Tensor], vision_tower: Path | None) -> dict[str, torch.Tensor]:
    """The CLIP tower's ``vision_model.*`` weights: in the checkpoint (LLaVA-Med) or from ``vision_tower``."""
    inside = {k[len(VISION_PREFIX) :]: v for k, v in weights.items() if k.startswith(VISION_PREFIX)}
    if inside:
        return inside
    if vision_tower is None:
        raise ValueError(
            "the checkpoint holds no vision tower weights (LLaVA-1.5 loads CLIP separately); "
            "pass --vision-tower DIR, a CLIP ViT-L/14-336 checkpoint folder"
        )
    found: dict[str, torch.Tensor] = {}
    for file in sorted(Path(vision_tower).glob("*.safetensors")):
        found.update({k[len("vision_model."):]: v for k, v in load_file(str(file)).items()
                      if k.startswith("vision_model.")})  # fmt: skip
    if not found:
        raise ValueError(f"--vision-tower {vision_tower}: no vision_model.* weights in its *.safetensors")
    return found


def vision_config(vision: dict[str, torch.Tensor]) -> CLIPVisionConfig:
    """The CLIP tower's config, read off its weight shapes (a CLIP head is 64 wide)."""
    patch = vision["embeddings.patch_embedding.weight"]  # (hidden, 3, patch, patch)
    positions = vision["embeddings.position_embedding.weight"].shape[0]  # patches + CLS
    side = math.isqrt(positions - 1)
    layers = 1 + max(int(m.group(1)) for k in vision if (m := re.match(r"encoder\.layers\.(\d+)\.", k)))
    hidden = patch.shape[0]
    return CLIPVisionConfig(
        hidden_size=hidden, intermediate_size=vision["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64), patch_size=patch.shape[2],
        image_size=side * patch.shape[2], projection_dim=768,
    )  # fmt: skip


def _add_tokens(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Add the image token (and a pad token when there is none); the tokens added, in id order."""
    added = []
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
        added.append(IMAGE_TOKEN)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        added.append(PAD_TOKEN)
    return added


def _grow(matrix: torch.Tensor, rows: int) -> torch.Tensor:
    """``matrix`` with ``rows`` more rows, each the mean of the existing ones."""
    if rows <= 0:
        return matrix
    mean = matrix.float().mean(dim=0, keepdim=True).to(matrix.dtype)
    return torch.cat([matrix, mean.expand(rows, -1)], dim=0)


def hf_weights(weights: dict[str, torch.Tensor], vision: dict[str, torch.Tensor], vocab: int
               ) -> dict[str, torch.Tensor]:  # fmt: skip
    """Every tensor under its ``LlavaForConditionalGeneration`` name, embeddings grown to ``vocab``."""
    out: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        if key.startswith("model.vision_tower."):
            continue
        if key.startswith("model.mm_projector."):
            index, rest = key[len("model.mm_projector.") :].split(".", 1)
            out[f"model.multi_modal_projector.linear_{1 + int(index) // 2}.{rest}"] = value
        elif key.startswith("model."):
            out["model.language_model." + key[len("model.") :]] = value
        elif key == "lm_head.weight":
            out[key] = value
        else:
            raise ValueError(f"unexpected weight {key} in an original-layout LLaVA checkpoint")
    out.update({f"model.vision_tower.{k}": v for k, v in vision.items()})
    for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        if key in out:
            out[key] = _grow(out[key], vocab - out[key].shape[0])
    return out


def llava_config(original: dict[str, Any], vision: CLIPVisionConfig, tokenizer: PreTrainedTokenizerBase,
                 vocab: int) -> LlavaConfig:  # fmt: skip
    arch = next(a for a in original["architectures"] if a in TEXT_MODEL_TYPES)
    text = {k: original[k] for k in TEXT_KEYS if k in original}
    text.update(model_type=TEXT_MODEL_TYPES[arch], vocab_size=vocab, pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(
        text_config=text, vision_config=vision.to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=original.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy=SELECT_FEATURE[original.get("mm_vision_select_feature", "patch")],
        projector_hidden_act="gelu", image_seq_length=(vision.image_size // vision.patch_size) ** 2,
        tie_word_embeddings=original.get("tie_word_embeddings", False), pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    config.architectures = ["LlavaForConditionalGeneration"]
    return config


def _save_shards(tensors: dict[str, torch.Tensor], dst: Path) -> None:
    """safetensors shards of at most ``SHARD_BYTES`` and, with several, the index transformers reads."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(tensors):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key].contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(dst / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(dst / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (dst / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )


def convert(src: str | Path, dst: str | Path, vision_tower: str | Path | None = None) -> Path:
    """Write the HF-layout checkpoint of the original-layout LLaVA at ``src`` to ``dst``."""
    src, dst = Path(src), Path(dst)
    original, weights = read_original(src)
    vision = _vision_weights(weights, Path(vision_tower) if vision_tower else None)
    tokenizer = load_checkpoint_tokenizer(src)
    added = _add_tokens(tokenizer)
    vocab = max(len(tokenizer), original.get("vocab_size", 0))
    vcfg = vision_config(vision)
    config = llava_config(original, vcfg, tokenizer, vocab)
    tensors = hf_weights(weights, vision, vocab)
    dst.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(dst)
    # llava-hf's key names (vision_tower.vision_model.…): what vLLM and other readers of the release expect.
    _save_shards({published_name(LLAVA, k): v for k, v in tensors.items()}, dst)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": vcfg.image_size},
        crop_size={"height": vcfg.image_size, "width": vcfg.image_size},
        image_mean=CLIP_MEAN, image_std=CLIP_STD, resample=3,
    )  # fmt: skip
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=vcfg.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1, image_token=IMAGE_TOKEN,
    )  # fmt: skip
    processor.save_pretrained(dst)
    log.info(
        "converted %s (%s) to %s: %d tensors, tokens added %s, %d image tokens",
        src,
        original["architectures"][0],
        dst,
        len(tensors),
        added or "none",
        config.image_seq_length,
    )
    return dst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stmed.convert", description=__doc__.split("\n")[0])
    parser.add_argument("src", help="original-layout LLaVA folder (LlavaLlama/LlavaMistralForCausalLM)")
    parser.add_argument("dst", help="folder to write the llava-hf layout checkpoint to")
    parser.add_argument(
        "--vision-tower",
        default=None,
        help="CLIP checkpoint folder, for checkpoints that do not hold the tower's weights",
    )
    args = parser.parse_args(argv)
    try:
        convert(args.src, args.dst, args.vision_tower)
    except (OSError, ValueError) as err:
        parser.exit(2, f"stmed.convert: error: {' '.join(str(err).split())}\n")
    return 0
