"""jobs.sft end to end on Ray Train: 2 CPU workers, the tiny model, synthetic data, one injected failure.

One run serves every Ray test here (a Ray Train worker group costs tens of seconds to start on two
cores): rank 0 fails once before step 5, Ray restarts the group from the step-4 checkpoint, and the run
finishes. Its final attempt is an ordinary run, so the outputs of a normal run are checked on it too.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from jobs.sft import SFTConfig, main
from stmed.config import ConfigError, LoRAConfig, ModelConfig, build_config, read_yaml
from stmed.model.build import build_tiny, load_model
from stmed.model.lora import attach_lora, load_trainable
from stmed.model.prompts import answer_prompt
from stmed.runs import MetricsLog, read_summary

REPO = Path(__file__).resolve().parents[2]
LOCAL = REPO / "jobs" / "configs" / "local" / "sft.yaml"
STEPS = 6
# A Ray Train run that cannot get its 2 CPUs (held by another test's actors) would otherwise wait forever.
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def sft_run(ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    cfg = build_config(SFTConfig, read_yaml(LOCAL), [
        f"output_dir={out}", "data.synthetic_images=30", f"train.max_steps={STEPS}",
        "train.micro_batch_size=2", "train.grad_accum_steps=1", "train.global_batch_size=4",
        "train.checkpoint_every=2", "train.log_every=2", "train.fail_at_step=5", "ray.max_failures=1",
    ])  # fmt: skip
    return out, main(cfg)


def test_run_resumed_from_its_checkpoint_after_a_worker_failure(sft_run):
    out, summary = sft_run
    assert (out / ".fault_injected_step5").is_file()  # the failure did happen
    assert summary["attempts"] == 2 and summary["resumed_from_steps"] == [4]
    attempts = MetricsLog(out / "attempts.jsonl").read()
    assert [(a["start_step"], a["world_size"]) for a in attempts] == [(0, 2), (4, 2)]
    # Steps 1-4 ran once before the failure, 5-6 after the restart; nothing ran again from step 0.
    assert [row["step"] for row in MetricsLog(out / "metrics.jsonl").read()] == list(range(1, STEPS + 1))
    assert summary["steps"] == summary["total_steps"] == STEPS
    # Timings split the last attempt: its steps are the work, the failed attempt is in the worker start.
    timings = summary["timings"]
    resumed = [r for r in MetricsLog(out / "metrics.jsonl").read_steps() if r["step"] > 4]
    assert timings["phases_s"]["work"] == pytest.approx(sum(r["step_time_s"] for r in resumed), abs=0.002)
    assert all(v >= 0 for v in timings["phases_s"].values()) and timings["phases_s"]["worker_start"] > 0
    assert sum(timings["phases_s"].values()) <= timings["total_s"]


def test_metrics_report_both_losses_every_step(sft_run):
    out, _ = sft_run
    rows = MetricsLog(out / "metrics.jsonl").read()
    for row in rows:
        assert all(math.isfinite(row[key]) and row[key] > 0 for key in ("loss", "loss_qa", "loss_vq"))
        assert row["n_qa_tokens"] > 0 and row["n_vq_tokens"] > 0
        assert row["samples"] == 4 and row["tokens_per_s"] > 0
        assert {"lr_llm_lora", "lr_vit_lora", "lr_projector"} <= row.keys()
    train = read_yaml(LOCAL)["train"]
    assert rows[-1]["lr_llm_lora"] / rows[-1]["lr_projector"] == pytest.approx(
        float(train["lr_llm"]) / float(train["lr_projector"]))


def test_summary_counts_and_points_at_the_outputs(sft_run):
    out, summary = sft_run
    assert read_summary(out) == json.loads(json.dumps(summary))
    assert summary["samples_read"] == summary["samples_used"] == 24 and summary["skipped"] == 0
    assert math.isfinite(summary["final"]["loss"]) and summary["final"]["loss"] < summary["first"]["loss"]
    assert summary["tokens_per_s"] > 0 and summary["wall_time_s"] > 0
    ckpt = Path(summary["outputs"]["checkpoint"])
    assert ckpt.name == f"checkpoint_{STEPS:06d}" and ckpt.is_relative_to(out / "checkpoints")
    assert {p.name for p in ckpt.iterdir()} >= {"adapter", "trainer_state.pt", "rng_rank0.json", "rng_rank1.json"}
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["fail_at_step"] == 5


def test_adapter_and_merged_export_reload_and_agree(sft_run):
    out, summary = sft_run
    merged, processor = load_model(ModelConfig(name_or_path=summary["outputs"]["merged"]))
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    peft_model = attach_lora(build_tiny(0)[0], build_config(LoRAConfig, cfg["lora"]))
    load_trainable(peft_model, out / "adapter")
    peft_model.eval()
    image = Image.open(next((out / "data" / "images").iterdir())).convert("RGB")
    inputs = processor(text=[answer_prompt("Is there a lesion?")], images=[image], return_tensors="pt")
    with torch.no_grad():
        a, b = merged(**inputs).logits, peft_model(**inputs).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert not torch.equal(b, build_tiny(0)[0].eval()(**inputs).logits)  # training changed the model


def test_the_qwen2_5_vl_preset_trains_on_two_ddp_workers_and_exports_what_it_trained(ray_session, tmp_path):
    """The other family as a job: 2 Ray Train workers under DDP (every adapter receives a gradient), and
    the merged folder is a Qwen2.5-VL checkpoint whose logits are those of base + the saved adapter."""
    from stmed.model.families import QWEN2_5_VL, family_of, image_kwargs

    cfg = build_config(SFTConfig, read_yaml(LOCAL), [
        f"output_dir={tmp_path}", "model.preset=tiny-qwen2.5-vl", "data.synthetic_images=30", "train.max_steps=3",
        "train.micro_batch_size=2", "train.grad_accum_steps=1", "train.global_batch_size=4",
    ])  # fmt: skip
    summary = main(cfg)
    rows = MetricsLog(tmp_path / "metrics.jsonl").read()
    assert summary["steps"] == 3 and all(math.isfinite(r["loss_vq"]) and r["n_vq_tokens"] > 0 for r in rows)
    merged, processor = load_model(ModelConfig(name_or_path=summary["outputs"]["merged"]))
    assert family_of(merged) is family_of(processor) is QWEN2_5_VL
    peft_model = attach_lora(load_model(ModelConfig(preset="tiny-qwen2.5-vl"))[0], cfg.lora)
    load_trainable(peft_model, tmp_path / "adapter")
    peft_model.eval()
    image = Image.open(next((tmp_path / "data" / "images").iterdir())).convert("RGB")
    prompt = answer_prompt("Is there a lesion?", chat=QWEN2_5_VL.chat)
    inputs = dict(processor(text=[prompt], images=[image], return_tensors="pt"))
    with torch.no_grad():
        a = merged(input_ids=inputs["input_ids"], **image_kwargs(inputs)).logits
        b = peft_model(input_ids=inputs["input_ids"], **image_kwargs(inputs)).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- config (no Ray)


def test_configs_load_and_the_batch_arithmetic_is_checked():
    cluster = build_config(SFTConfig, read_yaml(REPO / "jobs" / "configs" / "sft.yaml"))
    assert cluster.train.global_batch_size == 128 and cluster.ray.num_workers == 4 and cluster.ray.use_gpu
    assert (cluster.lora.llm_r, cluster.lora.vit_r, cluster.train.lr_llm) == (128, 32, 2e-4)
    local = build_config(SFTConfig, read_yaml(LOCAL))
    assert local.data.synthetic and local.ray.num_workers == 2 and local.model.preset == "tiny"
    with pytest.raises(ConfigError, match=r"train.global_batch_size=16 but .* ray.num_workers \(4\) = 32"):
        build_config(SFTConfig, read_yaml(LOCAL), ["ray.num_workers=4"])
    with pytest.raises(ConfigError, match="data.instruct is required"):
        build_config(SFTConfig, {"output_dir": "x", "model": {"preset": "tiny"}})
