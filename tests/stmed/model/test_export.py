"""stmed.model.export: every export carries the key names of its family's release and no decoding defaults.

The names are checked against the releases' own ``model.safetensors.index.json`` in ``../shared/fixtures``
(llava-hf/llava-1.5-7b-hf, Qwen/Qwen2.5-VL-7B-Instruct), the published layout that vLLM reads.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, GenerationConfig

from stmed.config import LoRAConfig, ModelConfig
from stmed.model.build import load_model
from stmed.model.export import neutral_generation_config, published_name
from stmed.model.families import LLAVA, PRESETS
from stmed.model.lora import attach_lora, merge_and_export
from tests.checkpoints import LLAVA_HF, QWEN2_5_VL, need

RELEASES = {"tiny": LLAVA_HF, "tiny-qwen2.5-vl": QWEN2_5_VL}
LORA = LoRAConfig(llm_r=2, llm_alpha=4, vit_r=2, vit_alpha=4)


def release_keys(release: Path, depth: dict[str, int]) -> set[str]:
    """The release's weight names for a model with ``depth[kind]`` numbered layers / blocks of each kind."""
    index = json.loads((need(release) / "model.safetensors.index.json").read_text())["weight_map"]
    kept = set()
    for key in index:
        found = re.search(r"\.(layers|blocks)\.(\d+)\.", key)
        kind = None if found is None else key[: found.start()] + "." + found.group(1)
        if found is None or int(found.group(2)) < depth[kind]:
            kept.add(key)
    return kept


def depths(keys: set[str]) -> dict[str, int]:
    """How many numbered layers / blocks each stack of ``keys`` has (``{"visual.blocks": 2, ...}``)."""
    out: dict[str, int] = {}
    for key in keys:
        if found := re.search(r"\.(layers|blocks)\.(\d+)\.", key):
            kind = key[: found.start()] + "." + found.group(1)
            out[kind] = max(out.get(kind, 0), int(found.group(2)) + 1)
    return out


@pytest.fixture(scope="module", params=sorted(PRESETS))
def exported(request, tmp_path_factory) -> tuple[str, Path, torch.nn.Module]:
    preset = request.param
    model, processor = load_model(ModelConfig(preset=preset))
    peft_model = attach_lora(model, LORA)
    out = merge_and_export(peft_model, processor, tmp_path_factory.mktemp(preset) / "merged")
    return preset, out, peft_model.merge_and_unload()


def test_a_preset_export_carries_the_release_key_names(exported):
    preset, out, _ = exported
    if preset not in RELEASES:
        pytest.skip(f"no release index for {preset}'s family in ../shared/fixtures")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys == release_keys(RELEASES[preset], depths(keys))
    if preset == "tiny":  # the name vLLM refused before: vision_tower.embeddings.*
        assert "vision_tower.vision_model.embeddings.patch_embedding.weight" in keys


def test_an_export_loads_back_in_transformers_with_every_weight(exported):
    _, out, merged = exported
    reloaded = AutoModelForImageTextToText.from_pretrained(out)
    want, got = merged.state_dict(), reloaded.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_an_export_has_no_decoding_defaults(exported):
    _, out, _ = exported
    saved = json.loads((out / "generation_config.json").read_text())
    assert set(saved) - {"transformers_version", "_from_model_config"} <= {"bos_token_id", "eos_token_id",
                                                                           "pad_token_id"}


def test_the_releases_decoding_defaults_are_dropped():
    """Qwen2.5-VL-7B-Instruct's generation_config.json: a repetition penalty HF applies and ray.data.llm not."""
    released = GenerationConfig.from_pretrained(need(QWEN2_5_VL))
    assert released.repetition_penalty == 1.05
    neutral = neutral_generation_config(released)
    assert neutral.repetition_penalty in (None, 1.0) and not neutral.do_sample and neutral.temperature is None
    assert neutral.eos_token_id == released.eos_token_id and neutral.pad_token_id == released.pad_token_id


def test_a_name_without_a_published_form_is_refused():
    with pytest.raises(ValueError, match="no published name"):
        published_name(LLAVA, "visual.blocks.0.attn.qkv.weight")
