"""jobs.dpo end to end on Ray Train: 2 CPU workers, a tiny "stage-1" model, a small judged-pair parquet.

One run serves every Ray test here: the reference log-probs are precomputed (the two ranks split the
pairs and share the table), rank 0 fails once before step 3, Ray restarts the group from the step-2
checkpoint, the restarted workers read the cached table, and the run finishes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from jobs.dpo import DPOConfig, main
from stmed.config import ConfigError, ModelConfig, build_config, read_yaml
from stmed.data.records import PreferencePair, write_preferences
from stmed.data.synthetic import make_dataset
from stmed.model.build import build_tiny, load_model
from stmed.model.prompts import preference_prompt
from stmed.runs import MetricsLog, read_summary
from stmed.train.dpo import REFERENCE_CACHE_FILE

REPO = Path(__file__).resolve().parents[2]
LOCAL = REPO / "jobs" / "configs" / "local" / "dpo.yaml"
STEPS = 4


def _pairs(images: list[str]) -> list[PreferencePair]:
    good = [PreferencePair(pair_id=f"p{i}", image=images[i % len(images)], question="Is there a lesion?",
                           chosen="Yes, there is a lesion in the left lung.", rejected="No, the image is normal.",
                           chosen_score=8.0, rejected_score=2.0, judge_model="reference-judge", seeds=[i, i + 1])
            for i in range(8)]  # fmt: skip
    tie = PreferencePair(**{**good[0].to_row(), "pair_id": "same", "rejected": good[0].chosen})
    lost = PreferencePair(**{**good[0].to_row(), "pair_id": "lost", "image": "missing.png"})
    return [*good, tie, lost]


@pytest.fixture(scope="module")
def dpo_run(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    data = make_dataset(root / "data", num_images=6, seed=0)
    stage1, processor = build_tiny(seed=0)
    stage1.save_pretrained(root / "stage1")
    processor.save_pretrained(root / "stage1")
    prefs = write_preferences(root / "prefs.parquet", _pairs(sorted(p.name for p in data.images.glob("*.png"))))
    out = root / "out"
    cfg = build_config(DPOConfig, read_yaml(LOCAL), [
        f"output_dir={out}", "model.preset=null", f"model.name_or_path={root / 'stage1'}",
        f"preferences={prefs}", f"image_root={data.images}", f"train.max_steps={STEPS}",
        "train.micro_batch_size=2", "train.grad_accum_steps=1", "train.global_batch_size=4",
        "train.lr_llm=2e-3", "train.lr_projector=1e-3", "train.lr_vit=1e-3", "train.checkpoint_every=2",
        "train.log_every=2", "train.fail_at_step=3", "dpo.precompute_reference=true", "ray.max_failures=1",
    ])  # fmt: skip
    return out, root, main(cfg)


def test_run_resumed_from_its_checkpoint_with_the_cached_reference(dpo_run):
    out, _, summary = dpo_run
    assert (out / ".fault_injected_step3").is_file()
    assert summary["attempts"] == 2 and summary["resumed_from_steps"] == [2]
    attempts = MetricsLog(out / "attempts.jsonl").read()
    assert [(a["start_step"], a["world_size"]) for a in attempts] == [(0, 2), (2, 2)]
    assert [row["step"] for row in MetricsLog(out / "metrics.jsonl").read()] == list(range(1, STEPS + 1))
    assert summary["steps"] == summary["total_steps"] == STEPS
    table = torch.load(out / REFERENCE_CACHE_FILE, weights_only=False)
    assert table["logps"].shape == (8, 2) and table["key"]["pairs"] == 8 and table["key"]["weights"]
    assert torch.isfinite(table["logps"]).all() and (table["logps"] < 0).all()


def test_metrics_log_loss_and_rewards_every_step(dpo_run):
    out, _, _ = dpo_run
    rows = MetricsLog(out / "metrics.jsonl").read()
    # Step 1: policy == reference (LoRA B = 0), up to the batch-shape noise of the precomputed table.
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    for row in rows:
        assert row["pairs"] == 4 and row["pairs_per_s"] > 0 and math.isfinite(row["grad_norm"])
        assert 0.0 <= row["rewards/accuracies"] <= 1.0
        assert row["rewards/margins"] == pytest.approx(row["rewards/chosen"] - row["rewards/rejected"], abs=1e-6)
        assert {"lr_llm_lora", "lr_vit_lora", "lr_projector"} <= row.keys()
    assert rows[-1]["rewards/margins"] > rows[0]["rewards/margins"]


def test_summary_counts_rejected_pairs_and_points_at_the_outputs(dpo_run):
    out, _, summary = dpo_run
    assert read_summary(out) == json.loads(json.dumps(summary))
    assert summary["pairs_read"] == 10 and summary["pairs_used"] == 8 and summary["rejected"] == 2
    assert summary["rejected_by_reason"] == {"chosen_equals_rejected": 1, "image_missing": 1}
    assert summary["pairs_trained"] == 4 * STEPS and summary["pairs_per_s"] > 0
    assert summary["reference_precompute_s"] > 0 and summary["wall_time_s"] > 0
    assert set(summary["final"]) == {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                                     "rewards/margins"}  # fmt: skip
    ckpt = Path(summary["outputs"]["checkpoint"])
    assert ckpt.name == f"checkpoint_{STEPS:06d}" and ckpt.is_relative_to(out / "checkpoints")
    assert {p.name for p in ckpt.iterdir()} >= {"adapter", "trainer_state.pt", "rng_rank0.json", "rng_rank1.json"}
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert yaml.safe_load((out / "config.yaml").read_text())["dpo"]["precompute_reference"] is True


def test_merged_export_reloads_and_differs_from_stage1(dpo_run):
    _, root, summary = dpo_run
    merged, processor = load_model(ModelConfig(name_or_path=summary["outputs"]["merged"]))
    stage1, _ = load_model(ModelConfig(name_or_path=str(root / "stage1")))
    image = Image.open(next((root / "data" / "images").glob("*.png"))).convert("RGB")
    inputs = processor(text=[preference_prompt("Is there a lesion?")], images=[image], return_tensors="pt")
    with torch.no_grad():
        a, b = merged(**inputs).logits, stage1(**inputs).logits
    assert torch.isfinite(a).all() and not torch.allclose(a, b)


# ----------------------------------------------------------------------------- config (no Ray)


def test_configs_load_with_the_dpo_defaults():
    cluster = build_config(DPOConfig, read_yaml(REPO / "jobs" / "configs" / "dpo.yaml"))
    assert cluster.ray.num_workers == 4 and cluster.ray.use_gpu and cluster.train.global_batch_size == 64
    assert (cluster.train.lr_llm, cluster.train.lr_projector, cluster.train.lr_vit) == (5e-6, 2e-5, 2e-5)
    assert (cluster.lora.llm_r, cluster.lora.vit_r, cluster.lora.vit_dropout, cluster.dpo.beta) == (128, 32, 0.1, 0.1)
    local = build_config(DPOConfig, read_yaml(LOCAL))
    assert local.ray.num_workers == 2 and not local.ray.use_gpu
    # A partial train/lora group keeps the stage-2 defaults, not stage 1's.
    partial = build_config(DPOConfig, {"output_dir": "x", "model": {"name_or_path": "m"}, "preferences": "p",
                                       "train": {"max_steps": 3}, "lora": {"llm_r": 8}})  # fmt: skip
    assert (partial.train.lr_llm, partial.train.lr_vit, partial.lora.vit_dropout) == (5e-6, 2e-5, 0.1)
    with pytest.raises(ConfigError, match="dpo.beta must be > 0"):
        build_config(DPOConfig, read_yaml(LOCAL), ["dpo.beta=0"])
    with pytest.raises(ConfigError, match="unknown key 'dpo.bta'"):
        build_config(DPOConfig, read_yaml(LOCAL), ["dpo.bta=0.2"])


def test_missing_preferences_file_is_a_config_error(tmp_path):
    cfg = build_config(DPOConfig, read_yaml(LOCAL), [f"output_dir={tmp_path}", f"preferences={tmp_path / 'no.parquet'}"])
    with pytest.raises(ConfigError, match="preferences: file not found"):
        main(cfg)
