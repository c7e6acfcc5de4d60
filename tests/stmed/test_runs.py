"""stmed.runs: where a stage's wall time goes, from stamps given by hand (no Ray, no clock waits)."""

from __future__ import annotations

import pytest

from stmed.runs import (
    PHASES,
    SUBMITTED_AT_ENV,
    StageClock,
    pool_start_s,
    submitted_timings,
    timing_block,
    training_phases,
)


def test_a_block_sums_phases_by_kind_and_names_the_rest() -> None:
    phases = {"submit_to_start": 2.0, "imports": 5.0, "ray_init": 1.0, "work": 30.0, "export": 2.0}
    block = timing_block(phases, 50.0, "submit", ended_at=1000.0)
    assert block["phases_s"] == phases and block["total_s"] == 50.0 and block["since"] == "submit"
    kinds = (block["overhead_s"], block["work_s"], block["writing_s"], block["other_s"])
    assert kinds == (8.0, 30.0, 2.0, 10.0)
    assert block["overhead_share"] == 0.16 and "scaled_by" not in block


def test_phases_from_disagreeing_clocks_are_scaled_to_fit_the_total() -> None:
    block = timing_block({"worker_start": 6.0, "work": 6.0, "worker_stop": -1.0}, 10.0, "main", ended_at=0.0)
    assert block["phases_s"] == {"worker_start": 5.0, "work": 5.0, "worker_stop": 0.0}  # a negative span is 0
    assert block["scaled_by"] == pytest.approx(10 / 12, abs=1e-4) and block["other_s"] == 0.0
    assert block["overhead_s"] + block["work_s"] + block["writing_s"] + block["other_s"] <= block["total_s"]


def test_every_phase_has_a_kind_and_a_description() -> None:
    assert all(kind in ("overhead", "work", "writing") and len(what) > 10 for kind, what in PHASES.values())
    with pytest.raises(AssertionError, match="not in PHASES"):
        timing_block({"sleeping": 1.0}, 2.0, "main", ended_at=0.0)
    with pytest.raises(ValueError, match="unknown timing phase 'sleeping'"):
        StageClock().add("sleeping", 1.0)


def test_a_job_clock_starts_at_the_submission_and_splits_off_start_up(monkeypatch: pytest.MonkeyPatch):
    import psutil

    started = psutil.Process().create_time()
    monkeypatch.setenv(SUBMITTED_AT_ENV, repr(started - 3.0))
    clock = StageClock(job=True)
    with clock.phase("ray_init"):
        pass
    block = clock.block()
    assert block["since"] == "submit" and block["phases_s"]["submit_to_start"] == pytest.approx(3.0, abs=0.01)
    assert block["phases_s"]["imports"] == pytest.approx(clock.created_at - started, abs=0.01)
    assert 0 <= block["phases_s"]["ray_init"] < 1 and "scaled_by" not in block
    assert block["total_s"] >= sum(block["phases_s"].values())
    clock.add("work", 0.5)
    clock.add("work", 0.25)  # a phase adds up over its occurrences
    assert clock.phases["work"] == 0.75


def test_a_clock_outside_a_job_starts_at_main(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SUBMITTED_AT_ENV, "12.5")  # inherited from a job this process is not
    block = StageClock().block()
    assert block["since"] == "main" and block["phases_s"] == {} and block["total_s"] < 60


def test_a_training_run_splits_at_rank_0s_stamps() -> None:
    # fit() at 100; rank 0's loop starts at 130, steps from 145 (5 s of them a DPO reference pass), the
    # steps take 20 s, the last report returns at 170, the export ends at 178 and fit() returns at 180.
    worker = {"loop_start": 130.0, "last_report": 170.0, "loop_end": 178.0}
    phases = training_phases(100.0, 180.0, worker, ready_at=145.0, step_s=20.0, precompute_s=5.0)
    assert phases == {"worker_start": 30.0, "worker_setup": 10.0, "work": 25.0, "checkpoints": 5.0,
                      "export": 8.0, "worker_stop": 2.0}  # fmt: skip
    assert sum(phases.values()) == 80.0


def test_the_pool_start_runs_until_the_first_actor_of_each_pass_is_built() -> None:
    passes = [(0.0, 50.0), (60.0, 70.0)]
    actors = [(1.5, 20.0), (1.0, 12.0), (61.0, 75.0), (200.0, 210.0)]  # the last one belongs to no pass
    assert pool_start_s(passes, actors) == 12.0 + 10.0  # the second pass's actor outlived it: its end
    assert pool_start_s(passes, []) == 0.0


def test_the_submitter_adds_the_jobs_exit_and_counts_from_its_submit_call() -> None:
    job = timing_block({"submit_to_start": 1.0, "imports": 4.0, "work": 10.0}, 16.0, "submit", ended_at=116.0)
    block = submitted_timings(job, submitted=100.0, seen=119.0)
    assert block["total_s"] == 19.0 and block["phases_s"]["exit"] == 3.0
    assert block["overhead_s"] == 8.0 and block["work_s"] == 10.0 and block["other_s"] == 1.0
    unknown = submitted_timings(None, submitted=100.0, seen=119.0)  # a job that wrote no timings
    assert unknown["phases_s"] == {} and unknown["other_s"] == 19.0


def test_a_torn_last_line_is_skipped_and_the_next_row_starts_on_a_fresh_line(tmp_path, caplog):
    from stmed.runs import MetricsLog

    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    log.write({"step": 1, "loss": 2.0})
    with path.open("a") as fh:  # a kill in the middle of a write
        fh.write('{"step": 2, "loss": 1.')
    assert [r["step"] for r in log.read_steps()] == [1]
    assert "skipped 1 line(s)" in caplog.text
    log.write({"step": 2, "loss": 1.5})  # the resumed attempt
    log.write({"step": 3, "loss": 1.0})
    assert [(r["step"], r["loss"]) for r in log.read_steps()] == [(1, 2.0), (2, 1.5), (3, 1.0)]
    assert path.read_text().splitlines()[2] == '{"step": 2, "loss": 1.5}'


def test_a_dpo_summary_after_a_torn_metrics_line_completes(tmp_path):
    """What wedged DPO: every rerun crashed reading metrics.jsonl after its export, with no summary."""
    import json

    from jobs.dpo import _summarise
    from stmed.runs import MetricsLog
    from stmed.train.stage import ATTEMPTS_FILE, DATA_REPORT_FILE, METRICS_FILE

    (tmp_path / DATA_REPORT_FILE).write_text(json.dumps({"pairs_used": 4, "rejected": 0}))
    MetricsLog(tmp_path / ATTEMPTS_FILE).write({"start_step": 0, "total_steps": 2})
    row = {"loss": 0.6, "rewards/chosen": 0.1, "rewards/rejected": 0.0, "rewards/accuracies": 1.0,
           "rewards/margins": 0.1, "pairs": 2, "step_time_s": 1.0}
    metrics = MetricsLog(tmp_path / METRICS_FILE)
    metrics.write({"step": 1, **row})
    with (tmp_path / METRICS_FILE).open("a") as fh:
        fh.write('{"step": 2, "lo')
    metrics.write({"step": 2, **row, "loss": 0.5})
    summary = _summarise(tmp_path, "dpo-x", None, 1.0)
    assert (summary["steps"], summary["final"]["loss"], summary["pairs_trained"]) == (2, 0.5, 4)


def test_a_folder_of_files_stmed_did_not_write_is_refused_and_left_untouched(tmp_path):
    from stmed.runs import OWNER_FILE, TRAINING_OUTPUTS, OutputDirError, claim_output_dir, clear_run_logs

    theirs = {"summary.json": "{}", "metrics.jsonl": "their log\n", "data_report.json": "[1]",
              "notes.txt": "x"}
    for name, text in theirs.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(OutputDirError, match=r"holds data_report.json, metrics.jsonl, summary.json that "
                                             r"stmed did not write .* nothing was changed") as err:
        claim_output_dir(tmp_path, "dpo", TRAINING_OUTPUTS)
    assert "\n" not in str(err.value) and not (tmp_path / OWNER_FILE).exists()
    clear_run_logs(tmp_path, ("metrics.jsonl", "data_report.json"))  # called without a claim: deletes nothing
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == theirs


def test_a_claimed_folder_is_cleared_of_its_own_logs_only_and_keeps_its_stage(tmp_path):
    from stmed.runs import TRAINING_OUTPUTS, OutputDirError, claim_output_dir, clear_run_logs, write_summary

    (tmp_path / "notes.txt").write_text("mine")  # a user's file beside the outputs: never touched
    claim_output_dir(tmp_path, "dpo", TRAINING_OUTPUTS)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    write_summary(tmp_path, {"steps": 1})
    claim_output_dir(tmp_path, "dpo", TRAINING_OUTPUTS)  # a rerun: the same stage's own files
    clear_run_logs(tmp_path, ("metrics.jsonl",))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".stmed-outputs.json", "notes.txt"]
    with pytest.raises(OutputDirError, match="holds the outputs of stage 'dpo', not 'sft'"):
        claim_output_dir(tmp_path, "sft", TRAINING_OUTPUTS)


def test_an_unfinished_training_run_resumes_only_under_its_own_fingerprint(tmp_path):
    from stmed.runs import (
        TRAINING_OUTPUTS,
        OutputDirError,
        claim_output_dir,
        training_fingerprint,
        training_run_name,
        write_summary,
    )

    instruct = tmp_path / "instruct.json"
    instruct.write_text("[1]")
    loop = {"model": {"preset": "tiny", "name_or_path": None}, "train": {"lr_llm": 1e-3, "log_every": 1},
            "instruct_path": str(instruct), "output_dir": str(tmp_path / "out")}
    out = claim_output_dir(tmp_path / "out", "sft", TRAINING_OUTPUTS)
    first = training_run_name(out, "sft", None, ("metrics.jsonl",), training_fingerprint(loop))
    again = {**loop, "train": {"lr_llm": 1e-3, "log_every": 5}}  # when it logs: not what it learns
    assert training_run_name(out, "sft", None, ("metrics.jsonl",), training_fingerprint(again)) == first
    other = {**loop, "train": {"lr_llm": 2e-3, "log_every": 1}}
    with pytest.raises(OutputDirError, match=r"unfinished run sft-.*train.lr_llm was 0.001, now 0.002"):
        training_run_name(out, "sft", None, ("metrics.jsonl",), training_fingerprint(other))
    instruct.write_text("[2]")  # the same path, other data
    with pytest.raises(OutputDirError, match=r"instruct_path.content was '\w+', now '\w+'"):
        training_run_name(out, "sft", None, ("metrics.jsonl",), training_fingerprint(loop))
    write_summary(out, {"steps": 1})  # finished: a rerun starts afresh under the new settings
    assert training_run_name(out, "sft", None, ("metrics.jsonl",), training_fingerprint(other)) != first
