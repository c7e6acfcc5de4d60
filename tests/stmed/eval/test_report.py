"""The run report, built from hand-made stage output folders: plots are real PNGs, numbers are the inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from stmed.data.records import PreferencePair, write_preferences
from stmed.eval.report import evaluation_table, judge_counts, read_judge_scores, write_report
from stmed.runs import PHASES, MetricsLog, timing_block, write_json, write_summary

SFT_ROWS = [{"step": s, "loss": 3.0 - 0.25 * s, "loss_qa": 2.5 - 0.2 * s, "loss_vq": 4.0 - 0.3 * s}
            for s in range(1, 6)]
DPO_ROWS = [{"step": s, "loss": 0.69 - 0.01 * s, "rewards/chosen": 0.02 * s, "rewards/rejected": -0.01 * s,
             "rewards/margins": 0.03 * s, "rewards/accuracies": 0.5 + 0.1 * s} for s in range(1, 5)]
RESULTS = {
    "base": {"synthetic": {"open_recall": 1.25, "open_f1": 0.5, "closed_accuracy": 40.0,
                           "closed_accuracy_strict": 35.0}},
    "sft": {"synthetic": {"open_recall": 30.5, "open_f1": 20.25, "closed_accuracy": 55.0,
                          "closed_accuracy_strict": 50.0, "closed_said_yes": 20.0}},
    "dpo": {"synthetic": {"open_recall": 33.75, "open_f1": 22.0, "closed_accuracy": 61.5,
                          "closed_accuracy_strict": 57.25, "closed_said_yes": 45.5}},
}
PREFS = {"synthetic": {"dpo_vs_sft": {"a": "dpo", "b": "sft", "questions": 20, "wins": 7, "ties": 10, "losses": 3,
                                      "win_rate": 0.7, "mean_score_a": 6.1, "mean_score_b": 5.4}}}
JUDGE = {"pairs": 9, "judged": 8, "failed": 1,
         "decisions": {"answer 1 scored higher": 3, "answer 2 scored higher": 2, "tie": 3, "failed": 1}}
# jobs.generate's failures.jsonl: judged-but-dropped pairs carry their scores, other drops do not.
FAILURES = [{"pair_id": "t1", "stage": "judge", "reason": "tie", "scores": [7.0, 7.0]},
            {"pair_id": "t2", "stage": "judge", "reason": "tie", "scores": [4.0, 4.0]},
            {"pair_id": "t3", "stage": "judge", "reason": "tie", "scores": [7.0, 7.0]},
            {"pair_id": "f1", "stage": "judge", "reason": "failed: parse error", "scores": [None, None]},
            {"pair_id": "q1", "stage": "question_filtered", "reason": "empty question"}]


def _pair(i: int, chosen: float, rejected: float) -> PreferencePair:
    return PreferencePair(pair_id=f"p{i}", image="images/a.png", question="Is there a lesion?", chosen="yes",
                          rejected="no", chosen_score=chosen, rejected_score=rejected, judge_model="reference")


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    for row in SFT_ROWS:
        MetricsLog(tmp_path / "sft" / "metrics.jsonl").write(row)
    write_summary(tmp_path / "sft", {"stage": "sft", "wall_time_s": 61.5})
    pairs = [_pair(0, 9, 2), _pair(1, 7, 3), _pair(2, 8, 3), _pair(3, 6, 5), _pair(4, 10, 1)]
    write_preferences(tmp_path / "generate" / "preferences.parquet", pairs)
    (tmp_path / "generate" / "failures.jsonl").write_text("".join(json.dumps(f) + "\n" for f in FAILURES))
    write_summary(tmp_path / "generate", {"pairs": 5, "ties": 3, "judge": JUDGE})
    for row in DPO_ROWS:
        MetricsLog(tmp_path / "dpo" / "metrics.jsonl").write(row)
    write_summary(tmp_path / "dpo", {"stage": "dpo"})
    write_summary(tmp_path / "evaluate", {"stage": "evaluate", "results": RESULTS, "judge_preference": PREFS})
    write_json(tmp_path / "pipeline.json", {"stages": {"sft": {"wall_s": 72.25}, "generate": {"wall_s": 100.0}}})
    return tmp_path


def test_report_plots_are_valid_pngs(run_dir: Path) -> None:
    write_report(run_dir)
    for name in ("sft_loss.png", "judge_scores.png", "dpo_rewards.png"):
        path = run_dir / "plots" / name
        with Image.open(path) as img:
            assert img.format == "PNG" and img.size[0] > 100 and img.size[1] > 100
            img.verify()


def test_report_numbers_are_the_inputs(run_dir: Path) -> None:
    text = write_report(run_dir).read_text()
    first, last = SFT_ROWS[0], SFT_ROWS[-1]
    assert f"| first step | {first['loss']:.4f} | {first['loss_qa']:.4f} | {first['loss_vq']:.4f} |" in text
    assert f"| last step | {last['loss']:.4f} | {last['loss_qa']:.4f} | {last['loss_vq']:.4f} |" in text
    # 9 pairs judged: 5 kept, 3 ties, 1 failure; scores from the kept pairs and the ties (16 answers).
    assert "| 9 | 5 | 3 | 0 | 1 |" in text
    assert "(16 answers): 1: 1, 2: 1, 3: 2, 4: 2, 5: 1, 6: 1, 7: 5, 8: 1, 9: 1, 10: 1." in text
    row = DPO_ROWS[-1]
    assert (f"| last step | {row['loss']:.4f} | {row['rewards/chosen']:.4f} | {row['rewards/rejected']:.4f} "
            f"| {row['rewards/margins']:.4f} | {row['rewards/accuracies']:.4f} |") in text
    assert "| dpo | 33.75 | 22.00 | 61.50 | 57.25 |" in text
    assert "| base | 1.25 | 0.50 | 40.00 | 35.00 |" in text
    # Self-training effect: sft → dpo deltas of closed accuracy, strict closed and open recall.
    # and the reference judge's head-to-head of the dpo answers against the sft ones.
    # (An older summary has no bootstrap effects: their columns are dashes.)
    assert ("| synthetic | sft → dpo | 55.00 → 61.50 (+6.50) | – | 50.00 → 57.25 (+7.25) | 20.00 → 45.50 (+25.50) "
            "| 30.50 → 33.75 (+3.25) | – | 7/10/3 | 0.70 |") in text
    # base has no yes-share (an older summary): a dash, not a crash
    assert ("| synthetic | base → dpo | 40.00 → 61.50 (+21.50) | – | 35.00 → 57.25 (+22.25) | – "
            "| 1.25 → 33.75 (+32.50) | – | – | – |") in text
    # Timing: the pipeline's own measurement wins over the stage summary's.
    assert "| sft | 72.2 |" in text and "| generate | 100.0 |" in text and "| total | 172.2 |" in text
    # Rows appear base, sft, dpo whatever the summary's order.
    assert text.index("| base |") < text.index("| sft |") < text.index("| dpo |")


def test_half_finished_run_still_reports(tmp_path: Path) -> None:
    for row in SFT_ROWS:
        MetricsLog(tmp_path / "sft" / "metrics.jsonl").write(row)
    write_summary(tmp_path / "sft", {"stage": "sft"})
    text = write_report(tmp_path).read_text()
    assert "Not run yet (no `generate/summary.json`)" in text
    assert "Not run yet (no `evaluate/summary.json`)" in text
    assert (tmp_path / "plots" / "sft_loss.png").is_file()
    assert not (tmp_path / "plots" / "dpo_rewards.png").exists()


def test_judge_counts_come_from_the_generate_summary() -> None:
    assert judge_counts({"pairs": 5, "ties": 3, "judge": JUDGE}) == {
        "pairs": 9, "kept": 5, "ties": 3, "failed": 1, "inconsistent": 0}


def test_judge_scores_without_failures_file(tmp_path: Path) -> None:
    write_preferences(tmp_path / "preferences.parquet", [_pair(0, 9, 2)])
    assert sorted(read_judge_scores(tmp_path)) == [2.0, 9.0]


def test_evaluation_table_missing_metric_is_a_dash() -> None:
    table = evaluation_table({"sft": {"b": {"open_recall": None, "open_f1": 1.0, "closed_accuracy": 2.0}}})
    assert "| sft | – | 1.00 | 2.00 | – |" in table


def test_report_of_a_missing_dir_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a directory"):
        write_report(tmp_path / "nope")


def test_served_request_is_reported_table_safe(tmp_path: Path) -> None:
    write_json(tmp_path / "serve" / "request.json", {
        "url": "http://127.0.0.1:8000", "model": "stmed-dpo", "question": "left | right?", "ground_truth": None,
        "vqa_answer": "left", "chat_answer": "left side"})
    text = write_report(tmp_path).read_text()
    assert "`stmed-dpo` at http://127.0.0.1:8000 answered a request:" in text
    assert "| left \\| right? | – | left | left side |" in text


def test_rounds_their_effects_with_intervals_and_the_gate(tmp_path: Path) -> None:
    """A two-round run: both rounds' sections, every round against the one before with its bootstrap
    interval, and the gate's decision with its reason."""
    results = {m: {"synthetic": {"open_recall": r, "open_f1": 1.0, "closed_accuracy": c,
                                 "closed_accuracy_strict": c}}
               for m, r, c in (("dpo2", 31.0, 58.0), ("base", 10.0, 40.0), ("sft", 30.0, 50.0), ("dpo1", 32.0, 60.0))}
    effects = [{"from": "sft", "to": "dpo1", "benchmark": "synthetic", "metric": "closed_accuracy", "delta": 10.0,
                "ci95": [4.5, 15.25], "n": 300},
               {"from": "dpo1", "to": "dpo2", "benchmark": "synthetic", "metric": "open_recall", "delta": -1.0,
                "ci95": [-3.0, 1.0], "n": 200}]
    write_summary(tmp_path / "evaluate", {"stage": "evaluate", "results": results, "effects": effects})
    for r in (1, 2):
        write_summary(tmp_path / f"generate{r}", {"stage": "generate", "pairs": 4})
        write_summary(tmp_path / f"dpo{r}", {"stage": "dpo"})
    write_json(tmp_path / "gate2" / "decision.json", {
        "before": "dpo1", "after": "dpo2", "promoted": False, "closed_before": 60.0, "closed_after": 55.0,
        "closed_delta": -5.0, "win_rate": 0.4, "wins": 4, "ties": 10, "losses": 6,
        "reason": "closed accuracy 60.00 -> 55.00 (-5.00) is below the margin of -2 points"})
    text = write_report(tmp_path).read_text()
    assert "## Self-generated preferences, round 1" in text and "## Stage 2 — preference revelation (DPO), round 2" in text
    assert "| synthetic | sft → dpo1 | 50.00 → 60.00 (+10.00) | +10.00 [+4.50, +15.25] |" in text
    assert "| synthetic | dpo1 → dpo2 | 60.00 → 58.00 (-2.00) | – |" in text and "-1.00 [-3.00, +1.00]" in text
    assert "| synthetic | base → dpo2 |" in text
    assert "| dpo1 → dpo2 | 60.00 → 55.00 (-5.00) | 4/10/6 | 0.40 | **no** | closed accuracy 60.00" in text
    assert text.index("| base |") < text.index("| sft |") < text.index("| dpo1 |") < text.index("| dpo2 |")


def test_wall_times_split_into_fixed_overhead_and_work_with_what_each_phase_measures(tmp_path: Path) -> None:
    phases = {"submit_to_start": 1.0, "imports": 8.0, "worker_start": 15.0, "work": 60.0, "export": 2.0,
              "exit": 4.0}  # fmt: skip
    sft = timing_block(phases, 100.0, "submit", ended_at=0.0)
    evaluate = timing_block({"imports": 5.0, "pool_start": 20.0, "work": 20.0}, 50.0, "submit", ended_at=0.0)
    write_summary(tmp_path / "data", {"stage": "data", "wall_time_s": 2.0})  # made in the pipeline: unsplit
    write_json(tmp_path / "pipeline.json", {"stages": {"sft": {"wall_s": 100.5, "timings": sft},
                                                       "evaluate": {"wall_s": 50.5, "timings": evaluate}}})
    text = write_report(tmp_path).read_text()
    assert "| stage | total s | fixed overhead s | work s | writing and other s | overhead share |" in text
    assert "| data | 2.0 | – | – | – | – |" in text
    assert "| sft | 100.0 | 28.0 | 60.0 | 12.0 | 28% |" in text
    assert "| evaluate | 50.0 | 25.0 | 20.0 | 5.0 | 50% |" in text
    assert "| total | 152.0 | 53.0 | 80.0 | 19.0 | 35% |" in text
    assert text.index("| data |") < text.index("| sft |") < text.index("| evaluate |")  # the order they ran
    # The overhead phases any stage had, per stage; and what each number measures.
    assert "| stage | submit_to_start | imports | worker_start | pool_start | exit |" in text
    assert "| sft | 1.0 | 8.0 | 15.0 | – | 4.0 |" in text
    assert "| evaluate | – | 5.0 | – | 20.0 | – |" in text
    assert f"- `pool_start` (overhead): {PHASES['pool_start'][1]}" in text and "`deploy`" not in text


def test_the_judge_spend_of_a_round_is_one_line_from_the_generate_summary(run_dir: Path) -> None:
    spend = {"usd": 0.0234, "online_usd": 0.0134, "batch_usd": 0.01, "calls": 12, "cached_calls": 3,
             "usd_per_judged_pair": 0.0026, "usd_per_kept_pair": 0.00468, "budget_usd": 1.0}
    write_summary(run_dir / "generate", {"pairs": 5, "ties": 3, "judge": JUDGE, "spend": spend})
    text = write_report(run_dir).read_text()
    assert ("Judge spend (ledger, every run of the round): $0.0234 (online $0.0134, batch $0.0100) over 12 "
            "calls, 3 of them from the cache at $0; $0.0026 per judged pair, $0.0047 per pair kept; "
            "budget $1.0000.") in text
