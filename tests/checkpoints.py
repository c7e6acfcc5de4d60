"""Shrunk random-weight checkpoints in the published layout of real releases, built from ../shared/fixtures.

``build_llava_hf`` writes a folder shaped exactly like ``llava-hf/llava-1.5-7b-hf``: the published
tokenizer (SentencePiece Llama, ``<image>`` = 32000, ``<pad>`` = 32001), processor and chat-template files
verbatim, the published ``config.json`` with the sizes shrunk (336-px images in 14-px patches stay, so an
image is still 576 tokens), and random weights saved under the published key names
(``language_model.model.layers.N…``, ``vision_tower.vision_model…``, ``multi_modal_projector…``), checked
against the release's ``model.safetensors.index.json``. The fixture files are read in place, never copied
into the repository; tests that need them skip when ``../shared`` is absent.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlavaConfig, LlavaForConditionalGeneration

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
LLAVA_HF = FIXTURES / "llava-1.5-7b-hf"
LLAVA_MED = FIXTURES / "llava-med-v1.5-mistral-7b"
QWEN2_5_VL = FIXTURES / "qwen2.5-vl-7b-instruct"
NON_WEIGHT_FILES = (
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
)
SHRUNK_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
}
SHRUNK_VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "projection_dim": 32,
}


def need(folder: Path) -> Path:
    if not (folder / "config.json").is_file():
        pytest.skip(f"checkpoint fixture not found at {folder}")
    return folder


def published_name(name: str) -> str:
    """A transformers-5 LLaVA parameter name as llava-hf published it (transformers 4.36 layout)."""
    for new, old in (
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
        ("model.vision_tower.", "vision_tower.vision_model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
    ):
        if name.startswith(new):
            return old + name[len(new) :]
    raise AssertionError(f"unmapped parameter {name}")


def _layer_index(key: str) -> int | None:
    found = re.search(r"\.layers\.(\d+)\.", key)
    return int(found.group(1)) if found else None


def build_llava_hf(dst: Path, seed: int = 0, drop: tuple[str, ...] = (), no_pad_token: bool = False) -> Path:
    """A shrunk llava-1.5-7b-hf at ``dst``; ``drop`` leaves published files out, ``no_pad_token`` removes
    the pad token from the tokenizer's settings (as Mistral-based conversions ship)."""
    src = need(LLAVA_HF)
    dst.mkdir(parents=True, exist_ok=True)
    for name in NON_WEIGHT_FILES:
        if name not in drop:
            shutil.copyfile(src / name, dst / name)
    config = json.loads((src / "config.json").read_text())
    config["text_config"].update(SHRUNK_TEXT)
    config["vision_config"].update(SHRUNK_VISION)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    if no_pad_token:
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if (dst / name).is_file():
                settings = json.loads((dst / name).read_text())
                settings.pop("pad_token", None)
                (dst / name).write_text(json.dumps(settings, indent=2))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(LlavaConfig.from_pretrained(dst))
    state = {published_name(k): v.contiguous() for k, v in model.state_dict().items()}
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    kept = {k for k in index if _layer_index(k) is None or _layer_index(k) < 2}
    assert set(state) == kept, f"key names differ from the release: {sorted(set(state) ^ kept)[:5]}"
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


# ----------------------------------------------------------------------------- original LLaVA layout

ORIGINAL_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
ORIGINAL_VISION = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 1,
    "image_size": 56,
    "patch_size": 14,
    "projection_dim": 32,
}  # 16 image tokens


def small_tokenizer(dst: Path):
    """A Mistral-like tokenizer with no ``<image>`` and no pad token, as LLaVA-Med v1.5 ships."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(["Is there a lesion in the left lung? USER: ASSISTANT: yes no"], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.save_pretrained(dst)
    return tokenizer


def build_llava_med_original(dst: Path, seed: int = 0) -> Path:
    """A shrunk microsoft/llava-med-v1.5-mistral-7b in its original layout (LlavaMistralForCausalLM):
    the release's config.json with the sizes shrunk, random weights under its key names (checked against
    its weight index), a tokenizer without an image token."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, MistralConfig, MistralForCausalLM

    src = need(LLAVA_MED)
    dst.mkdir(parents=True, exist_ok=True)
    tokenizer = small_tokenizer(dst)
    config = json.loads((src / "config.json").read_text())
    config.update(
        ORIGINAL_TEXT,
        vocab_size=len(tokenizer),
        mm_hidden_size=ORIGINAL_VISION["hidden_size"],
        mm_vision_tower="openai/clip-vit-large-patch14-336",
    )
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text = MistralForCausalLM(
            MistralConfig(
                **{k: config[k] for k in (*ORIGINAL_TEXT, "vocab_size", "rms_norm_eps", "rope_theta")}
            )
        )
        vision = CLIPVisionModel(CLIPVisionConfig(**ORIGINAL_VISION))
        hidden, mm = config["hidden_size"], config["mm_hidden_size"]
        projector = {
            "model.mm_projector.0.weight": torch.randn(hidden, mm) * 0.1,
            "model.mm_projector.0.bias": torch.randn(hidden) * 0.1,
            "model.mm_projector.2.weight": torch.randn(hidden, hidden) * 0.1,
            "model.mm_projector.2.bias": torch.randn(hidden) * 0.1,
        }
    state = {
        **text.state_dict(),
        **projector,
        **{"model.vision_tower.vision_tower.vision_model." + k: v for k, v in vision.state_dict().items()},
    }
    state = {k: v.contiguous() for k, v in state.items() if not k.endswith("position_ids")}
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    kept = {
        k
        for k in index
        if _layer_index(k) is None or _layer_index(k) < (2 if k.startswith("model.layers") else 3)
    }
    assert set(state) == kept, f"key names differ from the release: {sorted(set(state) ^ kept)[:5]}"
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


# ----------------------------------------------------------------------------- Qwen2.5-VL

QWEN_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "chat_template.json", "preprocessor_config.json",
              "generation_config.json")
QWEN_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}}
QWEN_VISION = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
               "fullatt_block_indexes": [1]}


def _block_index(key: str) -> int | None:
    found = re.search(r"\.(?:layers|blocks)\.(\d+)\.", key)
    return int(found.group(1)) if found else None


def build_qwen2_5_vl(dst: Path, seed: int = 0) -> Path:
    """A shrunk Qwen/Qwen2.5-VL-7B-Instruct at ``dst``: the published tokenizer (byte-level BPE from
    vocab.json + merges.txt, plus the tokenizer.json the release also ships, converted from them), chat
    template and preprocessor config verbatim (14-px patches merged 2x2, the release's pixel bounds), the
    published config.json with the sizes shrunk, and random weights under the published key names
    (``model.layers.N…``, ``visual.blocks.N…``, ``visual.merger…``), checked against the weight index."""
    from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    src = need(QWEN2_5_VL)
    dst.mkdir(parents=True, exist_ok=True)
    for name in QWEN_FILES:
        shutil.copyfile(src / name, dst / name)
    AutoTokenizer.from_pretrained(dst).save_pretrained(dst)  # slow -> fast once: writes tokenizer.json
    for name in ("tokenizer_config.json", "chat_template.json"):  # what the release ships, not the re-save
        shutil.copyfile(src / name, dst / name)
    config = json.loads((src / "config.json").read_text())
    config.update(QWEN_TEXT)
    config["vision_config"].update(QWEN_VISION)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_pretrained(dst))
    weights = dst / "_weights"
    model.save_pretrained(weights)  # transformers writes the published (pre-v5) key names
    from safetensors import safe_open

    with safe_open(str(weights / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    kept = {k for k in index if _block_index(k) is None or _block_index(k) < 2}
    assert saved == kept, f"key names differ from the release: {sorted(saved ^ kept)[:5]}"
    shutil.move(weights / "model.safetensors", dst / "model.safetensors")
    shutil.rmtree(weights)
    return dst
