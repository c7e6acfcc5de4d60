"""Every stage job on a checkpoint in the published llava-hf/llava-1.5-7b-hf layout (shrunk, random weights).

The checkpoint has the release's tokenizer (SentencePiece Llama, ``<image>`` = 32000, ``<pad>`` = 32001),
processor and config, 336-px images in 14-px patches (576 image tokens) and the release's key names
(``tests.checkpoints.build_llava_hf``). The stages run as a user runs them, each handing files to the
next: SFT on the shipped local config, self-play with the reference judge, DPO, evaluation, and the
endpoint answering over HTTP. Skipped when ``../shared/fixtures`` is absent.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest

from jobs import dpo, evaluate, generate, serve, sft
from jobs.runtime import NothingProduced
from stmed.config import ModelConfig, build_config, read_yaml
from stmed.data.records import PreferencePair, read_predictions, write_preferences
from stmed.data.synthetic import make_dataset
from stmed.model.build import image_seq_len, load_model
from stmed.runs import MetricsLog, read_summary
from tests.checkpoints import build_llava_hf

REPO = Path(__file__).resolve().parents[2]
LOCAL = REPO / "jobs" / "configs" / "local"
pytestmark = pytest.mark.timeout(900)
TIMES: dict[str, float] = {}


def _timed(stage: str, run):
    started = time.perf_counter()
    result = run()
    TIMES[stage] = time.perf_counter() - started
    print(f"real-layout {stage}: {TIMES[stage]:.1f} s", file=sys.stderr)
    return result


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("real-layout")


@pytest.fixture(scope="module")
def checkpoint(root) -> Path:
    return build_llava_hf(root / "llava-1.5-7b-hf-shrunk")


@pytest.fixture(scope="module")
def data(root):
    return make_dataset(root / "data", num_images=24, seed=0)


@pytest.fixture(scope="module")
def sft_run(ray_session, root, checkpoint, data) -> dict:
    # jobs/configs/local/sft.yaml as shipped, with the README's overrides for one's own checkpoint.
    cfg = build_config(sft.SFTConfig, read_yaml(LOCAL / "sft.yaml"), [
        f"output_dir={root / 'sft'}", "model.preset=null", f"model.name_or_path={checkpoint}",
        f"data.instruct={data.instruct}", f"data.image_root={data.images}", "train.max_steps=2",
        "train.micro_batch_size=2", "train.global_batch_size=4", "train.checkpoint_every=2",
    ])  # fmt: skip
    return _timed("sft", lambda: sft.main(cfg))


def test_sft_trains_every_sample_with_its_576_image_tokens(sft_run, checkpoint):
    report = json.loads(Path(sft_run["outputs"]["data_report"]).read_text())
    assert report["samples_used"] == report["samples_read"] > 0 and report["skipped"] == 0
    rows = MetricsLog(Path(sft_run["outputs"]["metrics"])).read_steps()
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    assert all(r["n_qa_tokens"] > 0 and r["tokens"] > 4 * 576 for r in rows)  # 4 samples, each > 576 tokens
    merged, processor = load_model(ModelConfig(name_or_path=sft_run["outputs"]["merged"]))
    assert image_seq_len(processor) == 576 and processor.tokenizer.convert_tokens_to_ids("<image>") == 32000
    assert merged.config.text_config.vocab_size == 32064


def test_generate_self_plays_on_the_stage1_export(ray_session, root, data, sft_run):
    cfg = build_config(generate.GenerateConfig, read_yaml(LOCAL / "generate.yaml"), [
        f"output_dir={root / 'generate'}", f"images={data.unlabelled}", "num_images=3", "model.preset=null",
        f"model.name_or_path={sft_run['outputs']['merged']}", f"judge.reference_findings={data.findings}",
        "generation.questions_per_image=2", "generation.describe_max_tokens=8",
        "generation.question_max_tokens=8", "generation.answer_max_tokens=8", "pools.images_per_batch=3",
    ])  # fmt: skip
    # A random-weight stage 1 writes no well-formed question, so no pair reaches the judge: the job
    # says so and fails (exit 1, no summary.json) instead of handing DPO an empty file.
    with pytest.raises(NothingProduced, match=r"no preference pairs from 3 images: 0 of 6 questions kept"):
        _timed("generate", lambda: generate.main(cfg))
    rows = [
        r
        for part in sorted((root / "generate" / "parts").glob("*.parquet"))
        for r in pq.read_table(part).to_pylist()
    ]
    assert len(rows) == 6 and {r["status"] for r in rows} == {
        "question_filtered"
    }  # described, asked, filtered
    assert not (root / "generate" / "summary.json").exists()


@pytest.fixture(scope="module")
def dpo_run(ray_session, root, data, sft_run) -> dict:
    images = sorted(p.name for p in data.images.glob("*.png"))
    pairs = [PreferencePair(pair_id=f"p{i}", image=images[i], question="Is there a lesion?",
                            chosen="Yes, in the left lung.", rejected="No.", chosen_score=8.0,
                            rejected_score=2.0, judge_model="reference-judge", seeds=[i, i + 1])
             for i in range(4)]  # fmt: skip
    prefs = write_preferences(root / "prefs.parquet", pairs)
    cfg = build_config(dpo.DPOConfig, read_yaml(LOCAL / "dpo.yaml"), [
        f"output_dir={root / 'dpo'}", "model.preset=null", f"model.name_or_path={sft_run['outputs']['merged']}",
        f"preferences={prefs}", f"image_root={data.images}", "train.max_steps=2", "train.micro_batch_size=1",
        "train.grad_accum_steps=1", "train.global_batch_size=2", "train.checkpoint_every=2",
    ])  # fmt: skip
    return _timed("dpo", lambda: dpo.main(cfg))


def test_dpo_uses_every_pair_and_starts_at_ln2(dpo_run):
    assert dpo_run["pairs_used"] == 4 and dpo_run["rejected"] == 0
    first = MetricsLog(Path(dpo_run["outputs"]["metrics"])).read_steps()[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 1
    assert (Path(dpo_run["outputs"]["merged"]) / "model.safetensors").is_file()


def test_evaluate_answers_the_synthetic_benchmark_and_vqa_rad(ray_session, root, data, dpo_run, vqa_rad_dir):
    shipped = {
        **read_yaml(LOCAL / "evaluate.yaml"),
        "models": {"dpo": {"name_or_path": dpo_run["outputs"]["merged"]}},
    }
    cfg = build_config(evaluate.EvaluateConfig, shipped, [
        f"output_dir={root / 'evaluate'}", f"data_dir={root / 'data'}", "limit=6", "max_new_tokens=4",
        f"benchmarks.vqa_rad.test_file={vqa_rad_dir / 'test_w_options.json'}",
    ])  # fmt: skip
    summary = _timed("evaluate", lambda: evaluate.main(cfg))
    for bench in ("synthetic", "vqa_rad"):
        answers = read_predictions(root / "evaluate" / "dpo" / bench / "answers.jsonl")
        assert len(answers) == 6 and summary["results"]["dpo"][bench]["missing_images"] == 0
        # The file's own "[Yes, No]" options are not asked a second time.
        assert all(a.prompt.lower().count("please choose from") <= 1 for a in answers)


def test_the_endpoint_answers_over_http(ray_session, root, data, dpo_run):
    port = _free_port()
    cfg = build_config(serve.ServeConfig, read_yaml(LOCAL / "serve.yaml"), [
        f"output_dir={root / 'serve'}", "model.preset=null", f"model.name_or_path={dpo_run['outputs']['merged']}",
        f"http.port={port}", "blocking=false", "limits.default_max_tokens=4", "ray.num_cpus=2",
    ])  # fmt: skip
    result = _timed("serve", lambda: serve.main(cfg))
    try:
        image = next(data.images.glob("*.png"))
        reply = httpx.post(
            f"{result.url}/v1/vqa",
            data={"question": "Is there a lesion in the image?"},
            files={"image": (image.name, image.read_bytes(), "image/png")},
            timeout=60,
        )
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert isinstance(body["answer"], str) and body["usage"]["prompt_tokens"] > 576
        assert read_summary(root / "serve")["model"] == result.model_name
    finally:
        result.stop()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_too_short_max_length_is_refused_before_any_worker_starts(checkpoint, data, tmp_path):
    """Finding 1: 512 tokens cannot hold a 576-token image; the driver says so, exit 2, no Ray started."""
    proc = subprocess.run([sys.executable, "-m", "jobs.sft", "--config", str(LOCAL / "sft.yaml"),
                           f"output_dir={tmp_path}", "model.preset=null", f"model.name_or_path={checkpoint}",
                           f"data.instruct={data.instruct}", "train.max_length=512"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "train.max_length=512" in last and "576" in last and "train.max_length=1024" in last
    assert "Traceback" not in proc.stderr and "Starting Ray" not in proc.stderr + proc.stdout
    assert not (tmp_path / "checkpoints").exists()
