"""jobs/configs/qwen2.5-vl-7b/: the Qwen2.5-VL-7B cluster run beside the LLaVA-1.5-7B one, checked offline.

Each stage file builds its job's config; LoRA targets name the family's modules (on the published layout
when ``../shared/fixtures`` is there, on the tiny preset always); the pixel bounds keep an image within
the length budget and are the same for training, generation (vLLM) and DPO; the stages read where the
earlier ones write, and nothing is shared with the LLaVA run's folders.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.dpo import DPOConfig
from jobs.generate import GenerateConfig
from jobs.serve import ServeConfig
from jobs.sft import SFTConfig
from stmed.config import ModelConfig, build_config, read_yaml
from stmed.model.build import image_seq_len, load_model
from stmed.model.families import QWEN2_5_VL, family_of
from stmed.model.lora import lora_targets
from tests.checkpoints import QWEN2_5_VL as QWEN_FIXTURE

REPO = Path(__file__).resolve().parents[2]
QWEN = REPO / "jobs" / "configs" / "qwen2.5-vl-7b"
STAGES = {"sft": SFTConfig, "generate": GenerateConfig, "dpo": DPOConfig, "serve": ServeConfig}
PATCH = 28  # Qwen2.5-VL: 14-px patches merged 2x2 -> one image token per 28x28 pixels


@pytest.fixture(scope="module")
def configs() -> dict:
    return {stage: build_config(cls, read_yaml(QWEN / f"{stage}.yaml")) for stage, cls in STAGES.items()}


def test_every_stage_file_builds_and_opens_with_its_launch_command(configs):
    for stage in STAGES:
        text = (QWEN / f"{stage}.yaml").read_text()
        assert f"python -m jobs.{stage} --config jobs/configs/qwen2.5-vl-7b/{stage}.yaml" in text.split("\n\n")[0]
    assert configs["sft"].model.name_or_path == "Qwen/Qwen2.5-VL-7B-Instruct"


def test_the_release_is_the_qwen_family_and_the_lora_targets_its_modules(configs):
    if (QWEN_FIXTURE / "config.json").is_file():
        assert family_of(json.loads((QWEN_FIXTURE / "config.json").read_text())) is QWEN2_5_VL
        index = json.loads((QWEN_FIXTURE / "model.safetensors.index.json").read_text())["weight_map"]
        for stage in ("sft", "dpo"):
            lora = configs[stage].lora
            for suffix in lora.llm_targets:
                assert any(k.startswith("model.layers.0.") and f".{suffix}.weight" in k for k in index), suffix
            for suffix in lora.vit_targets:
                assert any(k.startswith("visual.blocks.0.") and f".{suffix}.weight" in k for k in index), suffix
    model, _ = load_model(ModelConfig(preset="tiny-qwen2.5-vl"))
    for stage in ("sft", "dpo"):
        llm, vit = lora_targets(model, configs[stage].lora)
        assert len(llm) == 2 * 7 and len(vit) == 2 * 5  # every decoder linear, every vision-block linear
        assert configs[stage].lora.llm_r == 128 and configs[stage].lora.vit_r == 32


def test_pixel_bounds_fit_the_length_budgets_and_agree_across_stages(configs):
    sft, dpo, generate = configs["sft"], configs["dpo"], configs["generate"]
    bounds = (sft.model.min_pixels, sft.model.max_pixels)
    assert (dpo.model.min_pixels, dpo.model.max_pixels) == bounds
    mm = generate.generation.vllm_engine_kwargs["mm_processor_kwargs"]
    assert (mm["min_pixels"], mm["max_pixels"]) == bounds
    assert all(b % PATCH**2 == 0 for b in bounds)
    most = bounds[1] // PATCH**2
    assert most <= sft.train.max_length // 2 and most <= dpo.train.max_length // 2  # half is left for text
    engine = generate.generation.vllm_engine_kwargs
    assert engine["max_model_len"] >= most + generate.generation.question_max_tokens + 512
    assert engine["limit_mm_per_prompt"] == {"image": 1}
    # The bounds reach the processor as the image processor's size: the same count stmed computes.
    _, processor = load_model(ModelConfig(preset="tiny-qwen2.5-vl", min_pixels=bounds[0], max_pixels=bounds[1]))
    proc = processor.image_processor
    assert image_seq_len(processor) == bounds[1] // (proc.patch_size * proc.merge_size) ** 2


def test_stages_chain_and_stay_apart_from_the_llava_run(configs):
    sft_out = configs["sft"].output_dir
    assert configs["generate"].model.name_or_path == f"{sft_out}/merged"
    assert configs["dpo"].model.name_or_path == f"{sft_out}/merged"
    assert configs["dpo"].preferences == f"{configs['generate'].output_dir}/preferences.parquet"
    assert configs["serve"].model.name_or_path == f"{configs['dpo'].output_dir}/merged"
    llava = {stage: read_yaml(REPO / "jobs" / "configs" / f"{stage}.yaml")["output_dir"] for stage in STAGES}
    assert not {c.output_dir for c in configs.values()} & set(llava.values())
    assert configs["serve"].engine == "vllm" and configs["generate"].generation.engine == "vllm"
