"""The pipeline's wiring and skip logic, without launching a stage; the real run is one `slow` test."""

from __future__ import annotations

import json
import os
import shlex
import time
from pathlib import Path

import pytest

from jobs import pipeline
from jobs.pipeline import PipelineConfig, pending, stage_args, stage_plan
from jobs.submit import LocalHead
from stmed.config import ConfigError, build_config, read_yaml
from stmed.runs import SUBMITTED_AT_ENV, TIMINGS, timing_block, write_json, write_summary

REPO = Path(__file__).resolve().parents[2]
LOCAL = REPO / "jobs" / "configs" / "local" / "pipeline.yaml"
RESULTS = {m: {"synthetic": {"open_recall": r, "open_f1": 1.0, "closed_accuracy": c, "closed_accuracy_strict": c}}
           for m, r, c in (("base", 0.0, 40.0), ("sft", 20.0, 50.0), ("dpo1", 25.0, 55.0))}
ONE_ROUND = ("rounds=1", "warmup.enabled=false")
PLAN = ["sft", "generate1", "dpo1", "gate1", "evaluate", "serve"]
PHASES = {"submit_to_start": 0.03, "imports": 0.05, "work": 0.1, "writing": 0.02}
"""A stage job's timings, in seconds, as a fake job writes them."""


def _config(run_dir: Path, *overrides: str) -> PipelineConfig:
    return build_config(PipelineConfig, read_yaml(LOCAL), [f"output_dir={run_dir}", *overrides])


def _finish(run_dir: Path, *stages: str, promoted: bool = True) -> None:
    """Mark stages finished the way they do: a summary (serve: the answered request; a gate: its decision)."""
    for stage in stages:
        if stage == "serve":
            write_json(run_dir / "serve" / "request.json", {"url": "http://127.0.0.1:1", "model": "m",
                       "question": "q", "vqa_answer": "yes", "chat_answer": "yes"})  # fmt: skip
        elif stage.startswith("gate"):
            r = int(stage[4:])
            write_json(run_dir / stage / "decision.json", {
                "before": "sft" if r == 1 else f"dpo{r - 1}", "after": f"dpo{r}", "promoted": promoted,
                "closed_before": 50.0, "closed_after": 55.0 if promoted else 45.0,
                "closed_delta": 5.0 if promoted else -5.0, "win_rate": 0.6, "wins": 6, "ties": 10, "losses": 4,
                "reason": "not worse" if promoted else "closed accuracy fell"})
        else:
            write_summary(run_dir / stage, {"stage": stage, "results": RESULTS} if stage == "evaluate" else {})


def test_pending_starts_at_the_first_unfinished_stage(tmp_path: Path) -> None:
    cfg = _config(tmp_path, *ONE_ROUND)
    assert pending(cfg, tmp_path) == PLAN
    _finish(tmp_path, "sft", "generate1")
    assert pending(cfg, tmp_path) == ["dpo1", "gate1", "evaluate", "serve"]
    _finish(tmp_path, "dpo1", "gate1", "evaluate", "serve")
    assert pending(cfg, tmp_path) == []
    assert pending(_config(tmp_path, *ONE_ROUND, "serve.keep_running=true"), tmp_path) == ["serve"]


def test_a_later_summary_does_not_hide_an_unfinished_earlier_stage(tmp_path: Path) -> None:
    _finish(tmp_path, "generate1", "dpo1", "gate1", "evaluate", "serve")
    assert pending(_config(tmp_path, *ONE_ROUND), tmp_path) == PLAN


def test_rounds_chain_their_models_and_a_refused_round_ends_them(tmp_path: Path) -> None:
    run = tmp_path.resolve()
    cfg = _config(run, "rounds=3", "warmup.enabled=false")
    assert stage_plan(cfg, run) == ["sft", *(f"{k}{r}" for r in (1, 2, 3) for k in ("generate", "dpo", "gate")),
                                    "evaluate", "serve"]
    args = stage_args(cfg, run, port=8000)
    # Round 2 asks, answers and trains from round 1's model, which is DPO's frozen reference too.
    assert f"model.name_or_path={run / 'dpo1' / 'merged'}" in args["generate2"]
    assert f"model.name_or_path={run / 'dpo1' / 'merged'}" in args["dpo2"]
    assert f"preferences={run / 'generate2' / 'preferences.parquet'}" in args["dpo2"]
    assert {f"models.dpo1.name_or_path={run / 'dpo1' / 'merged'}", f"models.dpo2.name_or_path={run / 'dpo2' / 'merged'}",
            "compare.dpo2=dpo1", f"benchmarks.gate.test_file={run / 'data' / 'gate' / 'test_w_options.json'}"
            } <= set(args["gate2"])  # fmt: skip
    assert {"compare.dpo1=sft", "compare.dpo2=dpo1", "compare.dpo3=dpo2"} <= set(args["evaluate"])
    assert "model_name=stmed-dpo3" in args["serve"]
    _finish(run, "sft", "generate1", "dpo1", "gate1", "generate2", "dpo2")
    _finish(run, "gate2", promoted=False)
    assert stage_plan(cfg, run) == ["sft", "generate1", "dpo1", "gate1", "generate2", "dpo2", "gate2",
                                    "evaluate", "serve"]
    args = stage_args(cfg, run, port=8000)
    assert "models.dpo2.preset=null" in args["evaluate"] and "models.dpo3.preset=null" not in args["evaluate"]
    assert f"model.name_or_path={run / 'dpo1' / 'merged'}" in args["serve"] and "model_name=stmed-dpo1" in args["serve"]


def test_the_warm_up_is_built_once_beside_the_runs_and_is_their_base(tmp_path: Path) -> None:
    run = (tmp_path / "demo").resolve()
    cfg = _config(run, "rounds=1", "warmup.enabled=true")
    assert stage_plan(cfg, run)[0] == "warmup"
    args = stage_args(cfg, run, port=8000)
    assert args["warmup"][0] == f"output_dir={tmp_path.resolve() / 'warmup'}"
    assert f"model.name_or_path={tmp_path.resolve() / 'warmup' / 'merged'}" in args["sft"]
    assert f"models.base.name_or_path={tmp_path.resolve() / 'warmup' / 'merged'}" in args["evaluate"]
    write_summary(tmp_path / "warmup", {"stage": "warmup"})  # another run beside it built it
    assert pending(cfg, run)[0] == "sft"
    for other in (["model.preset=null", "model.name_or_path=/ckpt"], ["model.preset=tiny-qwen2.5-vl"]):
        plan = stage_plan(_config(run, "warmup.enabled=true", *other), run)  # aligned already, or no recipe
        assert plan[0] == "sft" and "warmup" not in plan


def test_main_stops_the_rounds_at_a_refused_gate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop itself, with every job faked: a gate that finds round 1 worse ends the rounds there,
    the evaluation still sees round 1, and stage 1's model is the one served."""
    run = tmp_path.resolve()
    submitted = []

    def fake_submit(address, entrypoint, working_dir, timeout, env_vars=None):
        argv = shlex.split(entrypoint)
        if argv[1] == "-c":  # the Serve shutdown at the end
            return "SUCCEEDED", ""
        out = Path(next(a for a in argv if a.startswith("output_dir=")).split("=", 1)[1])
        submitted.append(out.name)
        models = [a.split(".")[1] for a in argv if a.startswith("models.") and a.endswith(".preset=null")]
        results = {m: {"gate": {"closed_accuracy": 60.0 if m == "sft" else 50.0}} for m in models}
        prefs = {"gate": {"dpo1_vs_sft": {"wins": 1, "ties": 5, "losses": 9, "win_rate": 0.1}}}
        summary = {"url": "http://127.0.0.1:1", "model": "stmed-sft"} if out.name == "serve" else {
            "results": results, "judge_preference": prefs}
        write_summary(out, summary)
        return "SUCCEEDED", "ok\n"

    monkeypatch.setattr(pipeline, "submit_job", fake_submit)
    monkeypatch.setattr(pipeline, "ask", lambda url, model, request: {
        "url": url, "model": model, "question": "q", "vqa_answer": "no", "chat_answer": "no"})
    monkeypatch.setattr(pipeline, "write_report", lambda run_dir: run_dir / "report.md")
    result = pipeline.main(_config(run, "rounds=2", "warmup.enabled=false", "ray.address=http://127.0.0.1:1"))
    assert result["ran"] == submitted == ["sft", "generate1", "dpo1", "gate1", "evaluate", "serve"]
    decision = json.loads((run / "gate1" / "decision.json").read_text())
    assert not decision["promoted"] and "60.00 -> 50.00 (-10.00)" in decision["reason"]
    assert result["endpoint"]["model"] == "stmed-sft"


def test_finished_dir_runs_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    write_summary(tmp_path / "data", {"stage": "data"})
    _finish(tmp_path, *PLAN)

    def refuse(*args, **kwargs):
        raise AssertionError("a finished pipeline must neither start Ray nor submit a job")

    monkeypatch.setattr(pipeline, "start_local_head", refuse)
    monkeypatch.setattr(pipeline, "submit_job", refuse)
    result = pipeline.main(_config(tmp_path, *ONE_ROUND))
    assert result["ran"] == [] and result["endpoint"] is None
    report = (tmp_path / "report.md").read_text()
    assert "| dpo1 | 25.00 | 1.00 | 55.00 | 55.00 |" in report
    out = capsys.readouterr().out
    assert f"Report: {tmp_path / 'report.md'}" in out
    assert f"model.preset=null model.name_or_path={tmp_path / 'dpo1' / 'merged'}" in out
    assert "curl -s http://127.0.0.1:8000/v1/vqa" in out and "openai.OpenAI(" in out


def test_stages_hand_over_files_by_absolute_path(tmp_path: Path) -> None:
    run = tmp_path.resolve()
    args = stage_args(_config(run, *ONE_ROUND, "overrides.dpo=[train.max_steps=3]"), run, port=8123)
    assert all(a[0] == f"output_dir={run / s}" for s, a in args.items())
    assert f"data.instruct={run / 'data' / 'instruct.json'}" in args["sft"]
    assert "model.preset=tiny" in args["sft"] and "model.name_or_path=null" in args["sft"]
    for stage in ("generate1", "dpo1"):
        assert f"model.name_or_path={run / 'sft' / 'merged'}" in args[stage] and "model.preset=null" in args[stage]
    assert f"preferences={run / 'generate1' / 'preferences.parquet'}" in args["dpo1"]
    assert args["dpo1"][-1] == "train.max_steps=3"  # user overrides come last, so they win
    assert f"models.dpo1.name_or_path={run / 'dpo1' / 'merged'}" in args["evaluate"]
    assert "models.base.preset=tiny" in args["evaluate"] and f"data_dir={run / 'data'}" in args["evaluate"]
    assert {"blocking=false", "http.port=8123", f"model.name_or_path={run / 'dpo1' / 'merged'}"} <= set(args["serve"])


def test_self_play_runs_on_the_separate_pool_with_the_demo_recipe(tmp_path: Path) -> None:
    """The demo's self-play: the pool phantoms no conversation mentions, 8 answers a question, balanced."""
    run = tmp_path.resolve()
    cfg = _config(run, *ONE_ROUND, "data.synthetic_images=12", "data.test_images=4", "data.pool_images=6",
                  "gate.enabled=false")
    pipeline.make_data(cfg, run)
    pool = json.loads((run / "data" / "unlabelled.json").read_text())
    instruct = {row["image"] for row in json.loads((run / "data" / "instruct.json").read_text())}
    assert len(pool) == 6 and not {Path(p).name for p in pool} & instruct
    args = stage_args(cfg, run, port=8123)["generate1"]
    assert f"images={run / 'data' / 'unlabelled.json'}" in args
    assert {"generation.answers_per_question=8", "balance_yes_no=true", "num_images=480"} <= set(args)


def test_run_stage_submits_the_entrypoint_and_keeps_the_log(tmp_path: Path, monkeypatch) -> None:
    cfg = _config(tmp_path, *ONE_ROUND)
    _finish(tmp_path, "dpo1")  # a stage after one that ran: its old outputs are moved aside
    seen = {}

    def fake_submit(address, entrypoint, working_dir, timeout, env_vars=None):
        seen.update(address=address, argv=shlex.split(entrypoint), working_dir=working_dir)
        # The job's side: its clock runs from the submission the pipeline passed it.
        time.sleep(0.2)
        submitted, now = float(env_vars[SUBMITTED_AT_ENV]), time.time()
        out = Path(next(a for a in seen["argv"] if a.startswith("output_dir=")).split("=", 1)[1])
        write_summary(out, {"stage": "dpo", TIMINGS: timing_block(PHASES, now - submitted, "submit", now)})
        return "SUCCEEDED", "line 1\nline 2\n"

    monkeypatch.setattr(pipeline, "submit_job", fake_submit)
    args = stage_args(cfg, tmp_path, 8000)["dpo1"]
    head, python = "http://127.0.0.1:1", "/usr/bin/python3"
    record = pipeline.run_stage(cfg, "dpo1", args, tmp_path / "dpo1", head, python, fresh=True)
    assert record["wall_s"] >= 0 and seen["address"] == "http://127.0.0.1:1" and seen["working_dir"] == REPO
    timings = record[TIMINGS]  # the job's phases, and its exit until the pipeline saw it end
    assert PHASES.items() <= timings["phases_s"].items() and timings["phases_s"]["exit"] >= 0
    assert timings["overhead_s"] == pytest.approx(0.08 + timings["phases_s"]["exit"], abs=0.002)
    assert timings["work_s"] == 0.1 and timings["total_s"] >= 0.2
    phases = sum(timings["phases_s"].values())
    assert timings["total_s"] == pytest.approx(phases + timings["other_s"], abs=0.002)
    assert seen["argv"] == ["/usr/bin/python3", "-m", "jobs.dpo", "--config", "jobs/configs/local/dpo.yaml", *args]
    assert (tmp_path / "dpo1" / "job.log").read_text() == "line 1\nline 2\n"
    assert [p.name.startswith("dpo1.stale-") for p in tmp_path.iterdir()].count(True) == 1
    gate = stage_args(cfg, tmp_path, 8000)["gate1"]
    pipeline.run_stage(cfg, "gate1", gate, tmp_path / "gate1", "http://127.0.0.1:1", "python")
    assert seen["argv"][:5] == ["python", "-m", "jobs.evaluate", "--config", "jobs/configs/local/gate.yaml"]


def test_failed_stage_raises_with_its_log(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(pipeline, "submit_job", lambda *a, **k: ("FAILED", "Traceback: boom\n"))
    cfg = _config(tmp_path, *ONE_ROUND)
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "partial.ckpt").write_text("step 10")
    with pytest.raises(pipeline.StageFailed, match=r"stage sft: job FAILED.*job\.log"):
        pipeline.run_stage(cfg, "sft", stage_args(cfg, tmp_path, 8000)["sft"], tmp_path / "sft",
                           "http://127.0.0.1:1", "python")
    assert "boom" in (tmp_path / "sft" / "job.log").read_text()
    assert (tmp_path / "sft" / "partial.ckpt").is_file()  # not fresh: a failed stage's folder stays to resume


def test_config_files_build_and_bad_stage_names_are_rejected(tmp_path: Path) -> None:
    assert _config(tmp_path).model.preset == "tiny"
    cluster = build_config(PipelineConfig, read_yaml(REPO / "jobs" / "configs" / "pipeline.yaml"))
    assert cluster.ray.address and cluster.model.name_or_path and not cluster.data.synthetic
    with pytest.raises(ConfigError, match="unknown stage"):
        _config(tmp_path, "overrides.sftt=[a=1]")


def test_usage_with_the_endpoint_kept_up(tmp_path: Path) -> None:
    head = LocalHead(Path("/tmp/stmed-ray-x"), 11, 22, pgid=123)
    endpoint = {"url": "http://127.0.0.1:9", "model": "stmed-dpo"}
    text = pipeline.usage(_config(tmp_path, "serve.keep_running=true"), tmp_path, tmp_path / "r.md", endpoint, head)
    assert "curl -s http://127.0.0.1:9/v1/vqa" in text and "shut down" not in text
    argv = shlex.split(text.splitlines()[-1])
    assert argv[1] == "-c" and "LocalHead(Path('/tmp/stmed-ray-x'), 11, 22, 123).stop()" in argv[2]
    compile(argv[2], "<stop>", "exec")


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("STMED_SLOW") != "1", reason="the whole pipeline takes minutes: STMED_SLOW=1")
def test_whole_pipeline_end_to_end(tmp_path: Path) -> None:
    """`make demo` in small: every stage as a real Ray job on a loopback head, then a rerun that skips all."""
    cfg = _config(tmp_path / "demo", "serve.port=0")
    result = pipeline.main(cfg)
    assert result["ran"][-2:] == ["evaluate", "serve"] and result["ran"][:2] == ["warmup", "sft"]
    assert result["endpoint"]["vqa_answer"] and result["endpoint"]["chat_answer"]
    for stage in result["ran"][:-1]:
        assert (pipeline.stage_dir(cfg, tmp_path / "demo", stage) / "summary.json").is_file()
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "| dpo1 |" in report and (tmp_path / "demo" / "plots" / "sft_loss.png").is_file()
    assert pipeline.main(cfg)["ran"] == []
