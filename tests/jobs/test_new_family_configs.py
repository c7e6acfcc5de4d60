"""jobs/configs/medgemma-4b/ and jobs/configs/qwen3-vl-8b/: the MedGemma-4B and Qwen3-VL-8B cluster runs beside the
LLaVA-1.5-7B and Qwen2.5-VL-7B ones, checked offline: each stage file builds its job's config and opens with
its launch command, the LoRA targets name every linear of the family's decoder and vision blocks (on the tiny
preset), pixel bounds exist only where the family has them and agree across stages, and the stages chain."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.dpo import DPOConfig
from jobs.generate import GenerateConfig
from jobs.serve import ServeConfig
from jobs.sft import SFTConfig
from stmed.config import ModelConfig, build_config, read_yaml
from stmed.model.build import image_seq_len, load_model
from stmed.model.lora import lora_targets

REPO = Path(__file__).resolve().parents[2]
STAGES = {"sft": SFTConfig, "generate": GenerateConfig, "dpo": DPOConfig, "serve": ServeConfig}
RUNS = {  # folder: (release, tiny preset, ViT linears per block, pixels per image token side)
    "medgemma-4b": ("google/medgemma-4b-it", "tiny-gemma3", 6, None),
    "qwen3-vl-8b": ("Qwen/Qwen3-VL-8B-Instruct", "tiny-qwen3-vl", 4, 32),
}


@pytest.fixture(scope="module", params=list(RUNS))
def run(request) -> tuple[str, dict]:
    folder = REPO / "jobs" / "configs" / request.param
    return request.param, {stage: build_config(cls, read_yaml(folder / f"{stage}.yaml")) for stage, cls in STAGES.items()}


def test_every_stage_file_builds_and_opens_with_its_launch_command(run):
    name, configs = run
    for stage in STAGES:
        text = (REPO / "jobs" / "configs" / name / f"{stage}.yaml").read_text()
        assert f"python -m jobs.{stage} --config jobs/configs/{name}/{stage}.yaml" in text.split("\n\n")[0]
    assert configs["sft"].model.name_or_path == RUNS[name][0]


def test_the_lora_targets_every_decoder_and_vision_block_linear(run):
    name, configs = run
    model, _ = load_model(ModelConfig(preset=RUNS[name][1]))
    for stage in ("sft", "dpo"):
        llm, vit = lora_targets(model, configs[stage].lora)
        assert len(llm) == 2 * 7 and len(vit) == 2 * RUNS[name][2]  # 2 tiny layers / blocks
        assert configs[stage].lora.llm_r == 128 and configs[stage].lora.vit_r == 32


def test_pixel_bounds_where_the_family_has_them(run):
    name, configs = run
    sft, dpo, generate = configs["sft"], configs["dpo"], configs["generate"]
    bounds = (sft.model.min_pixels, sft.model.max_pixels)
    assert (dpo.model.min_pixels, dpo.model.max_pixels) == bounds
    engine = generate.generation.vllm_engine_kwargs
    side = RUNS[name][3]
    if side is None:  # Gemma 3: one square, 256 tokens; no bounds anywhere
        assert bounds == (None, None) and "mm_processor_kwargs" not in engine
        assert engine["max_model_len"] >= 256 + generate.generation.question_max_tokens + 512
        return
    mm = engine["mm_processor_kwargs"]
    assert (mm["min_pixels"], mm["max_pixels"]) == bounds and all(b % side**2 == 0 for b in bounds)
    most = bounds[1] // side**2
    assert most <= sft.train.max_length // 2 and engine["max_model_len"] >= most + 812
    _, processor = load_model(ModelConfig(preset=RUNS[name][1], min_pixels=bounds[0], max_pixels=bounds[1]))
    proc = processor.image_processor  # the tiny preset's 16-px merged patches: the same bounds, 4x the tokens
    assert image_seq_len(processor) == bounds[1] // (proc.patch_size * proc.merge_size) ** 2


def test_stages_chain_and_stay_apart_from_the_other_runs(run):
    name, configs = run
    sft_out = configs["sft"].output_dir
    assert configs["generate"].model.name_or_path == f"{sft_out}/merged"
    assert configs["dpo"].model.name_or_path == f"{sft_out}/merged"
    assert configs["dpo"].preferences == f"{configs['generate'].output_dir}/preferences.parquet"
    assert configs["serve"].model.name_or_path == f"{configs['dpo'].output_dir}/merged"
    assert all(f"/{name}/" in c.output_dir for c in configs.values())
    assert configs["serve"].engine == "vllm" and configs["generate"].generation.engine == "vllm"
