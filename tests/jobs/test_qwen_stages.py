"""The stage jobs on the Qwen2.5-VL family: self-play, DPO, evaluation and the endpoint, as a user runs
them, on the ``tiny-qwen2.5-vl`` preset's export and on a shrunk checkpoint in the published
Qwen2.5-VL-7B-Instruct layout (stage 1 on the preset is tests/jobs/test_sft.py)."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import httpx
import pytest

from jobs import dpo, evaluate, generate, serve, sft
from jobs.runtime import NothingProduced
from stmed.config import ModelConfig, build_config, read_yaml
from stmed.data.records import PreferencePair, read_predictions, write_preferences
from stmed.data.synthetic import make_dataset
from stmed.model.build import load_model
from stmed.runs import MetricsLog
from tests.checkpoints import build_qwen2_5_vl

REPO = Path(__file__).resolve().parents[2]
LOCAL = REPO / "jobs" / "configs" / "local"
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("qwen-stages")


@pytest.fixture(scope="module")
def data(root):
    return make_dataset(root / "data", num_images=24, seed=0)


@pytest.fixture(scope="module", params=["tiny-qwen2.5-vl", "real-layout"])
def stage1(request, root) -> Path:
    """Stage 1's export: the preset saved as a checkpoint folder, or the shrunk real-layout
    Qwen2.5-VL-7B-Instruct (the release's tokenizer, processor and key names; skipped without fixtures)."""
    out = root / request.param / "stage1"
    if request.param == "real-layout":  # stage 1 itself, on the published layout, as the README runs it
        data = make_dataset(root / "real-layout" / "data", num_images=12, seed=0)
        summary = sft.main(build_config(sft.SFTConfig, read_yaml(LOCAL / "sft.yaml"), [
            f"output_dir={root / 'real-layout' / 'sft'}", *_model(build_qwen2_5_vl(root / "real-layout" / "release")),
            f"data.instruct={data.instruct}", f"data.image_root={data.images}", "train.max_steps=2",
            "train.micro_batch_size=2", "train.global_batch_size=4", "train.checkpoint_every=2"]))  # fmt: skip
        assert summary["steps"] == 2 and summary["samples_used"] == 12 - 12 // 5
        return Path(summary["outputs"]["merged"])
    model, processor = load_model(ModelConfig(preset="tiny-qwen2.5-vl"))
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _model(path: Path) -> list[str]:
    # Pixel bounds as a user sets them: the release's max (12.8 Mpx) is 16,384 image tokens, more than
    # any max_length here; 200,704 px is at most 256 (the length budget is checked for the largest image).
    return ["model.preset=null", f"model.name_or_path={path}", "model.max_pixels=200704"]


def test_generate_self_plays_with_the_qwen_export(ray_session, root, data, stage1):
    cfg = build_config(generate.GenerateConfig, read_yaml(LOCAL / "generate.yaml"), [
        f"output_dir={stage1.parent / 'generate'}", f"images={data.unlabelled}", "num_images=3", *_model(stage1),
        f"judge.reference_findings={data.findings}", "generation.questions_per_image=2",
        "generation.describe_max_tokens=8", "generation.question_max_tokens=8", "generation.answer_max_tokens=8",
    ])  # fmt: skip
    # A random-weight model writes no well-formed question: the job says so instead of writing 0 pairs.
    with pytest.raises(NothingProduced, match=r"no preference pairs from 3 images: 0 of 6 questions kept"):
        generate.main(cfg)


@pytest.fixture(scope="module")
def dpo_run(ray_session, root, data, stage1) -> dict:
    images = sorted(p.name for p in data.images.glob("*.png"))
    pairs = [PreferencePair(pair_id=f"p{i}", image=images[i], question="Is there a lesion?",
                            chosen="Yes, in the left lung.", rejected="No.", chosen_score=8.0,
                            rejected_score=2.0, judge_model="reference-judge", seeds=[i, i + 1])
             for i in range(4)]  # fmt: skip
    prefs = write_preferences(stage1.parent / "prefs.parquet", pairs)
    cfg = build_config(dpo.DPOConfig, read_yaml(LOCAL / "dpo.yaml"), [
        f"output_dir={stage1.parent / 'dpo'}", *_model(stage1), f"preferences={prefs}", f"image_root={data.images}",
        "train.max_steps=2", "train.micro_batch_size=1", "train.grad_accum_steps=1", "train.global_batch_size=2",
        "train.checkpoint_every=2",
    ])  # fmt: skip
    return dpo.main(cfg)


def test_dpo_starts_at_ln2_against_the_frozen_qwen_stage1(dpo_run):
    assert dpo_run["pairs_used"] == 4 and dpo_run["rejected"] == 0
    first = MetricsLog(Path(dpo_run["outputs"]["metrics"])).read_steps()[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)
    merged, _ = load_model(ModelConfig(name_or_path=dpo_run["outputs"]["merged"]))
    assert type(merged).__name__ == "Qwen2_5_VLForConditionalGeneration"


def test_evaluate_and_serve_the_qwen_round(ray_session, root, stage1, dpo_run):
    shipped = {**read_yaml(LOCAL / "evaluate.yaml"), "models": {"dpo1": {"name_or_path": dpo_run["outputs"]["merged"]}}}
    cfg = build_config(evaluate.EvaluateConfig, shipped, [
        f"output_dir={stage1.parent / 'evaluate'}", f"data_dir={root / 'data'}", "limit=6", "max_new_tokens=4"])
    summary = evaluate.main(cfg)
    assert len(read_predictions(stage1.parent / "evaluate" / "dpo1" / "synthetic" / "answers.jsonl")) == 6
    assert summary["results"]["dpo1"]["synthetic"]["missing_images"] == 0
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = serve.main(build_config(serve.ServeConfig, read_yaml(LOCAL / "serve.yaml"), [
        f"output_dir={stage1.parent / 'serve'}", *_model(Path(dpo_run["outputs"]["merged"])), f"http.port={port}",
        "blocking=false", "limits.default_max_tokens=4", "ray.num_cpus=2"]))  # fmt: skip
    try:
        image = next((root / "data" / "images").glob("*.png"))
        reply = httpx.post(f"{result.url}/v1/vqa", data={"question": "Is there a lesion in the image?"},
                           files={"image": (image.name, image.read_bytes(), "image/png")}, timeout=60)
        assert reply.status_code == 200, reply.text
        assert isinstance(reply.json()["answer"], str) and reply.json()["usage"]["prompt_tokens"] > 4
    finally:
        result.stop()
