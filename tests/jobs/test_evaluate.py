"""jobs.evaluate end to end on loopback Ray: the synthetic benchmark, a damaged copy of it, and VQA-RAD."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest

from jobs.evaluate import RESULT_KEYS, EvaluateConfig, answer_plan, main, resolve_benchmarks
from stmed.config import ConfigError, build_config, load_config, read_yaml
from stmed.data.records import read_benchmark, read_predictions
from stmed.data.synthetic import load_findings, make_dataset
from stmed.eval.metrics import score
from stmed.judge.grading import score_answer
from stmed.model.build import build_tiny
from stmed.model.prompts import CLOSED_SUFFIX

LOCAL = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "local" / "evaluate.yaml"
FAST = ["max_new_tokens=6", "batch_size=4"]


def _damaged_benchmark(data: Path, root: Path) -> tuple[Path, set[str]]:
    """10 synthetic questions, shuffled, string ids, no options suffix; one image missing, one corrupt."""
    entries = json.loads((data / "test.json").read_text())[:10]
    random.Random(0).shuffle(entries)
    (root / "images").mkdir(parents=True)
    for entry in entries:
        entry["id"] = f"d-{entry['id']}"
        shutil.copy(data / "images" / entry["image"], root / "images" / entry["image"])
    missing = entries[2]["image"]
    corrupt = next(e["image"] for e in entries[3:] if e["image"] != missing)  # questions share images
    (root / "images" / missing).unlink()
    (root / "images" / corrupt).write_bytes(b"\x89PNG truncated")
    (root / "test.json").write_text(json.dumps(entries))
    return root / "test.json", {missing, corrupt}


@pytest.fixture(scope="module")
def run(ray_session, tmp_path_factory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("evaluate")
    data = out / "shared_data"
    make_dataset(data, num_images=40, seed=3)  # 8 test images, 40 questions
    damaged, bad_images = _damaged_benchmark(data, out / "damaged")
    # The second model is a saved checkpoint, loaded by path as the merged SFT / DPO exports are.
    model, processor = build_tiny(seed=1)
    model.save_pretrained(out / "sft")
    processor.save_pretrained(out / "sft")
    cfg = build_config(EvaluateConfig, read_yaml(LOCAL), [
        f"output_dir={out / 'run'}", f"data_dir={data}", "limit=16", *FAST,
        f"models.sft.name_or_path={out / 'sft'}", f"benchmarks.damaged.test_file={damaged}",
        "compare.sft=base",
    ])
    return {"cfg": cfg, "summary": main(cfg), "out": out / "run", "data": data, "damaged": damaged,
            "bad_images": bad_images}


def test_answer_files_follow_the_test_files_and_metrics_are_the_scorers(run):
    files = {"synthetic": run["data"] / "test_w_options.json", "damaged": run["damaged"]}
    limits = {"synthetic": 16, "damaged": 10}
    for model in ("base", "sft"):
        for bench, test_file in files.items():
            folder = run["out"] / model / bench
            examples = read_benchmark(test_file)[: limits[bench]]
            preds = read_predictions(folder / "answers.jsonl")
            assert [p.question_id for p in preds] == [e.id for e in examples]
            assert {p.model_id for p in preds} == {model}
            metrics = json.loads((folder / "metrics.json").read_text())
            recomputed = score(examples, preds)
            assert {k: metrics[k] for k in recomputed} == recomputed
            assert run["summary"]["results"][model][bench] == {k: metrics[k] for k in RESULT_KEYS}
            assert metrics["num_questions"] == limits[bench] and metrics["questions_per_s"] > 0
    # The damaged file's ids were shuffled strings: order and type survive the Ray round trip.
    ids = [p.question_id for p in read_predictions(run["out"] / "base" / "damaged" / "answers.jsonl")]
    assert ids != sorted(ids) and all(isinstance(i, str) for i in ids)
    # Each model answered with its own weights (seed 0 vs seed 1).
    texts = {m: [p.text for p in read_predictions(run["out"] / m / "synthetic" / "answers.jsonl")]
             for m in ("base", "sft")}
    assert texts["base"] != texts["sft"]


def test_closed_questions_get_the_options_suffix_once(run):
    for bench in ("synthetic", "damaged"):  # one file carries the suffix, the other not
        examples = read_benchmark(run["data"] / "test.json")
        preds = read_predictions(run["out"] / "base" / bench / "answers.jsonl")
        for pred in preds:
            assert pred.prompt.endswith(CLOSED_SUFFIX) == (pred.answer_type == "CLOSED")
            assert pred.prompt.count(CLOSED_SUFFIX.strip()) <= 1
        asked = {e.question for e in examples}
        assert {p.prompt.removesuffix(CLOSED_SUFFIX) for p in preds} <= asked


def test_missing_and_corrupt_images_are_counted_not_fatal(run):
    metrics = json.loads((run["out"] / "base" / "damaged" / "metrics.json").read_text())
    examples = read_benchmark(run["damaged"])
    hit = {e.id for e in examples if e.image in run["bad_images"]}  # several questions share an image
    assert metrics["missing_images"] == len(hit) >= 2
    failed = {e["question_id"] for e in metrics["image_errors"]}
    assert failed == hit
    answers = read_predictions(run["out"] / "base" / "damaged" / "answers.jsonl")
    preds = {p.question_id: p.text for p in answers}
    assert all(preds[qid] == "" for qid in failed)
    assert run["summary"]["results"]["base"]["synthetic"]["missing_images"] == 0


def test_results_table_summary_and_config(run):
    table = (run["out"] / "results.md").read_text().split("## Reference judge")[0].splitlines()
    header = next(line for line in table if line.startswith("| model"))
    assert "synthetic Recall" in header and "damaged Closed strict" in header
    rows = {line.split("|")[1].strip(): line for line in table if line.startswith("| ") and line != header}
    assert set(rows) == {"base", "sft"}
    closed = run["summary"]["results"]["sft"]["synthetic"]["closed_accuracy"]
    assert f"{closed:.2f}" in rows["sft"]
    summary = json.loads((run["out"] / "summary.json").read_text())
    assert list(summary["results"]) == ["base", "sft"]
    assert all(set(per) == set(RESULT_KEYS) for b in summary["results"].values() for per in b.values())
    assert summary["timing"]["base"]["questions"] == 16 + 10
    reloaded = load_config(EvaluateConfig, ["--config", str(run["out"] / "config.yaml")])
    assert reloaded == run["cfg"]


def test_head_to_head_is_the_reference_judges_scores_of_both_answer_files(run):
    """compare.sft=base: on the synthetic benchmark (it has findings.json) every question's two answers
    are scored against the image's findings; the damaged copy has no findings and gets no comparison."""
    prefs = run["summary"]["judge_preference"]
    assert set(prefs) == {"synthetic"} and set(prefs["synthetic"]) == {"sft_vs_base"}  # no dpo: pair skipped
    got = prefs["synthetic"]["sft_vs_base"]
    findings = load_findings(run["data"] / "findings.json")
    examples = read_benchmark(run["data"] / "test_w_options.json")[:16]
    scores = {m: [score_answer(e.question, p.text, findings[e.image]) for e, p in
                  zip(examples, read_predictions(run["out"] / m / "synthetic" / "answers.jsonl"))]
              for m in ("sft", "base")}
    wins = sum(a > b for a, b in zip(scores["sft"], scores["base"]))
    losses = sum(a < b for a, b in zip(scores["sft"], scores["base"]))
    assert (got["wins"], got["losses"], got["ties"], got["questions"]) == (wins, losses, 16 - wins - losses, 16)
    assert got["mean_score_a"] == pytest.approx(sum(scores["sft"]) / 16)
    assert got["mean_score_b"] == pytest.approx(sum(scores["base"]) / 16)
    table = (run["out"] / "results.md").read_text()
    assert f"| synthetic | sft vs base | {wins} | {16 - wins - losses} | {losses} |" in table


def test_effects_are_paired_bootstrap_deltas_of_the_answer_files(run):
    """summary.json's effects: base -> sft on each benchmark and metric, recomputed from the answers."""
    from stmed.eval.effects import paired_bootstrap, per_question

    found = {(e["benchmark"], e["metric"]): e for e in run["summary"]["effects"]}
    assert {(e["from"], e["to"]) for e in found.values()} == {("base", "sft")}  # the models' order, and compare
    examples = read_benchmark(run["data"] / "test_w_options.json")[:16]
    texts = {m: [p.text for p in read_predictions(run["out"] / m / "synthetic" / "answers.jsonl")] for m in ("base", "sft")}
    for metric in ("closed_accuracy", "open_recall"):
        a, b = (per_question(examples, texts[m], metric) for m in ("base", "sft"))
        delta, ci = paired_bootstrap(a, b)
        got = found[("synthetic", metric)]
        assert got["delta"] == pytest.approx(delta) and got["ci95"] == pytest.approx(list(ci)) and got["n"] == a.size
        assert got["ci95"][0] <= got["delta"] <= got["ci95"][1]
    assert ("synthetic", "closed_accuracy") in found and ("damaged", "closed_accuracy") in found
    assert "paired bootstrap 95% intervals" in (run["out"] / "results.md").read_text()


def test_vqa_rad_answer_file_format(ray_session, vqa_rad_dir: Path, tmp_path: Path):
    vqa_rad = {"test_file": str(vqa_rad_dir / "test.json"), "limit": 20}
    cfg = build_config(EvaluateConfig, {"output_dir": str(tmp_path), "models": {"tiny": {"preset": "tiny"}},
                                        "benchmarks": {"vqa_rad": vqa_rad},
                                        "ray": {"num_workers": 1, "num_cpus": 2}}, FAST)
    summary = main(cfg)
    examples = read_benchmark(vqa_rad_dir / "test.json")[:20]
    preds = read_predictions(tmp_path / "tiny" / "vqa_rad" / "answers.jsonl")
    assert [p.question_id for p in preds] == [e.id for e in examples]  # int ids, file order
    assert all(isinstance(p.question_id, int) for p in preds)
    result = summary["results"]["tiny"]["vqa_rad"]
    assert result["missing_images"] == 0
    assert result["num_open"] + result["num_closed"] == 20
    assert result["closed_accuracy"] == score(examples, preds)["closed_accuracy"]


def test_vllm_engine_builds_a_ray_data_llm_plan_without_a_gpu(ray_session, run):
    """Only the plan: running it needs vLLM and a GPU (that path is unverified here)."""
    cfg = build_config(EvaluateConfig, {"output_dir": str(run["out"] / "vllm"), "engine": "vllm",
                                        "models": {"sft": {"name_or_path": str(run["out"].parent / "sft")}},
                                        "benchmarks": {"damaged": {"test_file": str(run["damaged"])}}})
    plan = str(answer_plan(cfg, cfg.models["sft"], resolve_benchmarks(cfg)))
    assert "vLLMEngineStage" in plan and "Answerer" not in plan


def test_config_mistakes_are_named(tmp_path: Path):
    base = {"output_dir": str(tmp_path), "models": {"base": {"preset": "tiny"}}}
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        build_config(EvaluateConfig, base)
    with pytest.raises(ConfigError, match="engine=vllm"):
        build_config(EvaluateConfig, {**base, "synthetic": True, "engine": "vllm"})
    with pytest.raises(ConfigError, match="reserved"):
        build_config(EvaluateConfig, {**base, "synthetic": True,
                                      "benchmarks": {"synthetic": {"test_file": "x"}}})
    with pytest.raises(ConfigError, match="folders"):
        build_config(EvaluateConfig, {**base, "models": {"../up": {"preset": "tiny"}}, "synthetic": True})
    with pytest.raises(ConfigError, match="unknown key 'benchmarks.b.limt'"):
        build_config(EvaluateConfig, {**base, "benchmarks": {"b": {"test_file": "x", "limt": 3}}})
    missing = {"b": {"test_file": str(tmp_path / "none.json")}}
    cfg = build_config(EvaluateConfig, {**base, "benchmarks": missing})
    with pytest.raises(ConfigError, match="benchmarks.b.test_file"):
        resolve_benchmarks(cfg)


# ----------------------------------------------------------------------------- user mistakes, real files


def _cli(*overrides: str, cwd: Path) -> "subprocess.CompletedProcess[str]":
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "jobs.evaluate", "--config", str(LOCAL), *overrides],
                          cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=300)


def test_vqa_rad_options_are_never_asked_twice(vqa_rad_dir: Path, tmp_path: Path):
    """Finding 10: VQA-RAD's test_w_options.json writes "[Yes, No]" on 188 of its 272 closed questions."""
    base = {"output_dir": str(tmp_path), "models": {"tiny": {"preset": "tiny"}}}
    for name, suffixed in (("test_w_options.json", 0), ("test.json", 272)):
        cfg = build_config(EvaluateConfig, {**base, "benchmarks": {"r": {"test_file": str(vqa_rad_dir / name)}}})
        bench = resolve_benchmarks(cfg)[0]
        closed = [(e, q) for e, q in zip(bench.examples, bench.asked) if e.answer_type == "CLOSED"]
        assert len(closed) == 272
        assert sum(q != e.question for e, q in closed) == suffixed
        assert all(q.lower().count("please choose from the following two options") == 1 for _, q in closed)


def test_a_wrong_image_folder_is_a_config_error_naming_the_key(tmp_path: Path):
    """Finding 11: SLAKE keeps its images under imgs/; the default images/ must not give empty answers."""
    data = make_dataset(tmp_path / "data", num_images=10, seed=0)
    (data.test.parent / "images").rename(data.test.parent / "imgs")
    proc = _cli(f"output_dir={tmp_path / 'out'}", "synthetic=false", f"benchmarks.slake.test_file={data.test}",
                cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "benchmarks.slake.image_root" in proc.stderr.strip().splitlines()[-1]
    fixed = build_config(EvaluateConfig, read_yaml(LOCAL), [f"output_dir={tmp_path}", "synthetic=false",
                         f"benchmarks.slake.test_file={data.test}",
                         f"benchmarks.slake.image_root={data.test.parent / 'imgs'}"])  # fmt: skip
    assert len(resolve_benchmarks(fixed)[0].examples) > 0


@pytest.mark.parametrize("mistake", ["missing_key", "missing_file", "jsonl"])
def test_test_file_mistakes_exit_2_with_one_line(tmp_path: Path, mistake: str):
    """Finding 12: a missing test_file, or a JSONL file given as one, is a config error, not a traceback."""
    jsonl = tmp_path / "answers.jsonl"
    jsonl.write_text('{"question_id": 1, "text": "yes"}\n{"question_id": 2, "text": "no"}\n')
    overrides = {"missing_key": ["benchmarks.b.image_root=/nowhere"],
                 "missing_file": [f"benchmarks.b.test_file={tmp_path / 'nope.json'}"],
                 "jsonl": [f"benchmarks.b.test_file={jsonl}"]}[mistake]
    proc = _cli(f"output_dir={tmp_path / 'out'}", "synthetic=false", *overrides, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-1500:]
    assert "Traceback" not in proc.stderr and "benchmarks.b.test_file" in proc.stderr.strip().splitlines()[-1]
