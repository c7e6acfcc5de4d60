"""Every stage on the Gemma 3 and Qwen3-VL families, as a user runs the jobs: stage 1 on 2 DDP workers, self-play,
DPO with packed pairs against the frozen stage-1 model, evaluation, and the endpoint over HTTP, on the
``tiny-gemma3`` and ``tiny-qwen3-vl`` presets (one module-scoped chain per preset)."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image

from jobs import dpo, evaluate, generate, serve, sft
from jobs.runtime import NothingProduced
from stmed.config import ModelConfig, build_config, read_yaml
from stmed.data.records import PreferencePair, read_predictions, write_preferences
from stmed.data.synthetic import make_dataset
from stmed.model.build import load_model
from stmed.model.families import PRESETS, family_of, forward_inputs
from stmed.model.lora import attach_lora, load_trainable
from stmed.model.prompts import answer_prompt
from stmed.runs import MetricsLog

REPO = Path(__file__).resolve().parents[2]
LOCAL = REPO / "jobs" / "configs" / "local"
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module", params=["tiny-gemma3", "tiny-qwen3-vl"])
def preset(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def root(tmp_path_factory, preset) -> Path:
    return tmp_path_factory.mktemp(preset)


@pytest.fixture(scope="module")
def data(root):
    return make_dataset(root / "data", num_images=24, seed=0)


@pytest.fixture(scope="module")
def stage1(ray_session, root, data, preset) -> dict:
    cfg = build_config(sft.SFTConfig, read_yaml(LOCAL / "sft.yaml"), [
        f"output_dir={root / 'sft'}", f"model.preset={preset}", f"data.instruct={data.instruct}",
        f"data.image_root={data.images}", "train.max_steps=2", "train.micro_batch_size=2",
        "train.grad_accum_steps=1", "train.global_batch_size=4", "train.checkpoint_every=2",
    ])  # fmt: skip
    return {"cfg": cfg, "summary": sft.main(cfg)}


def _model(path: str | Path) -> list[str]:
    return ["model.preset=null", f"model.name_or_path={path}"]


def test_stage1_trains_on_two_workers_and_exports_base_plus_adapter(stage1, root, preset):
    summary, cfg = stage1["summary"], stage1["cfg"]
    rows = MetricsLog(root / "sft" / "metrics.jsonl").read()
    assert summary["steps"] == 2 and all(math.isfinite(r["loss_vq"]) and r["n_vq_tokens"] > 0 for r in rows)
    merged, processor = load_model(ModelConfig(name_or_path=summary["outputs"]["merged"]))
    family = PRESETS[preset]
    assert family_of(merged) is family_of(processor) is family
    peft_model = attach_lora(load_model(ModelConfig(preset=preset))[0], cfg.lora)
    load_trainable(peft_model, root / "sft" / "adapter")
    peft_model.eval()
    image = Image.open(next((root / "data" / "images").iterdir())).convert("RGB")
    inputs = dict(processor(text=[answer_prompt("Is there a lesion?", chat=family.chat)], images=[image],
                            return_tensors="pt"))  # fmt: skip
    with torch.no_grad():
        a = merged(**inputs).logits
        b = peft_model(**forward_inputs(peft_model, inputs)).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_generate_self_plays_with_the_stage1_export(stage1, root, data):
    cfg = build_config(generate.GenerateConfig, read_yaml(LOCAL / "generate.yaml"), [
        f"output_dir={root / 'generate'}", f"images={data.unlabelled}", "num_images=3",
        *_model(stage1["summary"]["outputs"]["merged"]), f"judge.reference_findings={data.findings}",
        "generation.questions_per_image=2", "generation.describe_max_tokens=8", "generation.question_max_tokens=8",
        "generation.answer_max_tokens=8",
    ])  # fmt: skip
    # A random-weight model writes no well-formed question: the job says so instead of writing 0 pairs.
    with pytest.raises(NothingProduced, match=r"no preference pairs from 3 images: 0 of 6 questions kept"):
        generate.main(cfg)


@pytest.fixture(scope="module")
def dpo_run(stage1, root, data) -> dict:
    images = sorted(p.name for p in data.images.glob("*.png"))
    pairs = [PreferencePair(pair_id=f"p{i}", image=images[i], question="Is there a lesion?",
                            chosen="Yes, in the left lung.", rejected="No.", chosen_score=8.0,
                            rejected_score=2.0, judge_model="reference-judge", seeds=[i, i + 1])
             for i in range(4)]  # fmt: skip
    prefs = write_preferences(root / "prefs.parquet", pairs)
    cfg = build_config(dpo.DPOConfig, read_yaml(LOCAL / "dpo.yaml"), [
        f"output_dir={root / 'dpo'}", *_model(stage1["summary"]["outputs"]["merged"]), f"preferences={prefs}",
        f"image_root={data.images}", "train.max_steps=2", "train.micro_batch_size=1", "train.grad_accum_steps=1",
        "train.global_batch_size=2", "train.checkpoint_every=2",
    ])  # fmt: skip
    assert cfg.dpo.shared_prefix  # packed pairs: the family's mask and positions are what is tested
    return dpo.main(cfg)


def test_dpo_starts_at_ln2_against_the_frozen_stage1(dpo_run, preset):
    assert dpo_run["pairs_used"] == 4 and dpo_run["rejected"] == 0
    first = MetricsLog(Path(dpo_run["outputs"]["metrics"])).read_steps()[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)
    merged, _ = load_model(ModelConfig(name_or_path=dpo_run["outputs"]["merged"]))
    assert isinstance(merged, PRESETS[preset].model_class)


def test_evaluate_and_serve_the_round(root, dpo_run):
    shipped = {**read_yaml(LOCAL / "evaluate.yaml"), "models": {"dpo1": {"name_or_path": dpo_run["outputs"]["merged"]}}}
    cfg = build_config(evaluate.EvaluateConfig, shipped, [
        f"output_dir={root / 'evaluate'}", f"data_dir={root / 'data'}", "limit=6", "max_new_tokens=4"])
    summary = evaluate.main(cfg)
    assert len(read_predictions(root / "evaluate" / "dpo1" / "synthetic" / "answers.jsonl")) == 6
    assert summary["results"]["dpo1"]["synthetic"]["missing_images"] == 0
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = serve.main(build_config(serve.ServeConfig, read_yaml(LOCAL / "serve.yaml"), [
        f"output_dir={root / 'serve'}", *_model(dpo_run["outputs"]["merged"]), f"http.port={port}",
        "blocking=false", "limits.default_max_tokens=4", "ray.num_cpus=2"]))  # fmt: skip
    try:
        image = next((root / "data" / "images").glob("*.png"))
        reply = httpx.post(f"{result.url}/v1/vqa", data={"question": "Is there a lesion in the image?"},
                           files={"image": (image.name, image.read_bytes(), "image/png")}, timeout=60)
        assert reply.status_code == 200, reply.text
        assert isinstance(reply.json()["answer"], str) and reply.json()["usage"]["prompt_tokens"] > 4
    finally:
        result.stop()
