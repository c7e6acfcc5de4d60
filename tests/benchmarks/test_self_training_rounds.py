"""benchmarks/self_training_rounds.py: reading a pipeline run's outputs into rows, the table and the
aggregate over seeds (the runs themselves are the pipeline's, tested there)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from stmed.runs import write_json, write_summary

SPEC = importlib.util.spec_from_file_location(
    "self_training_rounds", Path(__file__).resolve().parents[2] / "benchmarks" / "self_training_rounds.py"
)
rounds = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(rounds)


def _run(root: Path, seed: int, closed: tuple[float, float, float], promoted2: bool) -> Path:
    run = root / f"seed{seed}"
    results = {
        m: {"synthetic": {"closed_accuracy": c, "open_recall": 50.0}}
        for m, c in zip(("sft", "dpo1", "dpo2"), closed)
    }
    effects = [
        {
            "from": a,
            "to": b,
            "benchmark": "synthetic",
            "metric": "closed_accuracy",
            "delta": cb - ca,
            "ci95": [cb - ca - 3, cb - ca + 3],
            "n": 180,
        }
        for (a, ca), (b, cb) in zip(zip(("sft", "dpo1"), closed), zip(("dpo1", "dpo2"), closed[1:]))
    ]
    prefs = {"synthetic": {"dpo1_vs_sft": {"win_rate": 0.7}, "dpo2_vs_dpo1": {"win_rate": 0.5}}}
    write_summary(run / "evaluate", {"results": results, "effects": effects, "judge_preference": prefs})
    for r in (1, 2):
        write_summary(run / f"generate{r}", {"questions": 100, "questions_kept": 80 + r})
        write_json(run / f"gate{r}" / "decision.json", {"promoted": r == 1 or promoted2})
    return run


def test_rows_table_and_aggregate(tmp_path: Path):
    rows = [
        (s, rounds.seed_row(_run(tmp_path, s, c, p)))
        for s, c, p in (
            (0, (50.0, 56.0, 57.0), True),
            (1, (52.0, 55.0, 53.0), False),
            (2, (48.0, 54.0, 55.0), True),
        )
    ]
    assert rows[1][1]["rounds"][1] == {
        "round": 2,
        "closed": {
            "from": "dpo1",
            "to": "dpo2",
            "benchmark": "synthetic",
            "metric": "closed_accuracy",
            "delta": -2.0,
            "ci95": [-5.0, 1.0],
            "n": 180,
        },
        "recall": None,
        "win_rate": 0.5,
        "promoted": False,
        "well_formed": 0.82,
    }
    text = rounds.table(rows)
    assert "| 0 | 1 | 50.0 → 56.0 | +6.0 [+3.0, +9.0] | – | 0.70 | 0.81 | promoted |" in text
    assert "| 1 | 2 | 55.0 → 53.0 | -2.0 [-5.0, +1.0] | – | 0.50 | 0.82 | stopped |" in text
    agg = rounds.aggregate(rows)
    mean, lo, hi = agg["round1"]["closed_delta"]
    assert mean == pytest.approx(5.0) and lo < 5.0 < hi and agg["round1"]["win_rate"] == pytest.approx(0.7)
    assert agg["round2"]["beat_previous"] == 2 and agg["round2"]["stopped_by_gate"] == 1
    assert rounds.mean_ci([1.0]) is None
