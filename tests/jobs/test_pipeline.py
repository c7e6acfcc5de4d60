"""The pipeline's wiring and skip logic, without launching a stage; the real run is one `slow` test."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import pytest

from jobs import pipeline
from jobs.pipeline import STAGES, PipelineConfig, pending, stage_args
from jobs.submit import LocalHead
from stmed.config import ConfigError, build_config, read_yaml
from stmed.runs import write_json, write_summary

REPO = Path(__file__).resolve().parents[2]
LOCAL = REPO / "jobs" / "configs" / "local" / "pipeline.yaml"
RESULTS = {m: {"synthetic": {"open_recall": r, "open_f1": 1.0, "closed_accuracy": c, "closed_accuracy_strict": c}}
           for m, r, c in (("base", 0.0, 40.0), ("sft", 20.0, 50.0), ("dpo", 25.0, 55.0))}


def _config(run_dir: Path, *overrides: str) -> PipelineConfig:
    return build_config(PipelineConfig, read_yaml(LOCAL), [f"output_dir={run_dir}", *overrides])


def _finish(run_dir: Path, *stages: str) -> None:
    """Mark stages finished the way they do: a summary (serve: the answered request)."""
    for stage in stages:
        if stage == "serve":
            write_json(run_dir / "serve" / "request.json", {"url": "http://127.0.0.1:1", "model": "m",
                       "question": "q", "vqa_answer": "yes", "chat_answer": "yes"})  # fmt: skip
        else:
            write_summary(run_dir / stage, {"stage": stage, "results": RESULTS} if stage == "evaluate" else {})


def test_pending_starts_at_the_first_unfinished_stage(tmp_path: Path) -> None:
    assert pending(tmp_path) == list(STAGES)
    _finish(tmp_path, "sft", "generate")
    assert pending(tmp_path) == ["dpo", "evaluate", "serve"]
    _finish(tmp_path, "dpo", "evaluate", "serve")
    assert pending(tmp_path) == []
    assert pending(tmp_path, keep_running=True) == ["serve"]  # an endpoint to keep up must be started


def test_a_later_summary_does_not_hide_an_unfinished_earlier_stage(tmp_path: Path) -> None:
    _finish(tmp_path, "generate", "dpo", "evaluate", "serve")
    assert pending(tmp_path) == list(STAGES)


def test_finished_dir_runs_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    write_summary(tmp_path / "data", {"stage": "data"})
    _finish(tmp_path, *STAGES)

    def refuse(*args, **kwargs):
        raise AssertionError("a finished pipeline must neither start Ray nor submit a job")

    monkeypatch.setattr(pipeline, "start_local_head", refuse)
    monkeypatch.setattr(pipeline, "submit_job", refuse)
    result = pipeline.main(_config(tmp_path))
    assert result["ran"] == [] and result["endpoint"] is None
    report = (tmp_path / "report.md").read_text()
    assert "| dpo | 25.00 | 1.00 | 55.00 | 55.00 |" in report
    out = capsys.readouterr().out
    assert f"Report: {tmp_path / 'report.md'}" in out
    assert f"model.preset=null model.name_or_path={tmp_path / 'dpo' / 'merged'}" in out
    assert "curl -s http://127.0.0.1:8000/v1/vqa" in out and "openai.OpenAI(" in out


def test_stages_hand_over_files_by_absolute_path(tmp_path: Path) -> None:
    run = tmp_path.resolve()
    args = stage_args(_config(run, "overrides.dpo=[train.max_steps=3]"), run, port=8123)
    assert all(a[0] == f"output_dir={run / s}" for s, a in args.items())
    assert f"data.instruct={run / 'data' / 'instruct.json'}" in args["sft"]
    assert "model.preset=tiny" in args["sft"] and "model.name_or_path=null" in args["sft"]
    for stage in ("generate", "dpo"):
        assert f"model.name_or_path={run / 'sft' / 'merged'}" in args[stage] and "model.preset=null" in args[stage]
    assert f"preferences={run / 'generate' / 'preferences.parquet'}" in args["dpo"]
    assert args["dpo"][-1] == "train.max_steps=3"  # user overrides come last, so they win
    assert f"models.dpo.name_or_path={run / 'dpo' / 'merged'}" in args["evaluate"]
    assert "models.base.preset=tiny" in args["evaluate"] and f"data_dir={run / 'data'}" in args["evaluate"]
    assert {"blocking=false", "http.port=8123", f"model.name_or_path={run / 'dpo' / 'merged'}"} <= set(args["serve"])


def test_run_stage_submits_the_entrypoint_and_keeps_the_log(tmp_path: Path, monkeypatch) -> None:
    cfg = _config(tmp_path)
    _finish(tmp_path, "dpo")  # a stage after one that ran: its old outputs are moved aside
    seen = {}

    def fake_submit(address, entrypoint, working_dir, timeout):
        seen.update(address=address, argv=shlex.split(entrypoint), working_dir=working_dir)
        return "SUCCEEDED", "line 1\nline 2\n"

    monkeypatch.setattr(pipeline, "submit_job", fake_submit)
    args = stage_args(cfg, tmp_path, 8000)["dpo"]
    wall = pipeline.run_stage(cfg, "dpo", args, tmp_path / "dpo", "http://127.0.0.1:1", "/usr/bin/python3", fresh=True)
    assert wall >= 0 and seen["address"] == "http://127.0.0.1:1" and seen["working_dir"] == REPO
    assert seen["argv"] == ["/usr/bin/python3", "-m", "jobs.dpo", "--config", "jobs/configs/local/dpo.yaml", *args]
    assert (tmp_path / "dpo" / "job.log").read_text() == "line 1\nline 2\n"
    assert [p.name.startswith("dpo.stale-") for p in tmp_path.iterdir()].count(True) == 1


def test_failed_stage_raises_with_its_log(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(pipeline, "submit_job", lambda *a, **k: ("FAILED", "Traceback: boom\n"))
    cfg = _config(tmp_path)
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
    result = pipeline.main(_config(tmp_path, "serve.port=0"))
    assert result["ran"] == list(STAGES)
    assert result["endpoint"]["vqa_answer"] and result["endpoint"]["chat_answer"]
    for stage in STAGES[:-1]:
        assert (tmp_path / stage / "summary.json").is_file()
    report = (tmp_path / "report.md").read_text()
    assert "| dpo |" in report and (tmp_path / "plots" / "sft_loss.png").is_file()
    assert pipeline.main(_config(tmp_path))["ran"] == []
