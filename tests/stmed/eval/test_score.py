"""``python -m stmed.score``: one JSON object on success, one stderr line and exit 2 on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from stmed.data.records import Prediction, read_benchmark, write_predictions
from stmed.eval.score import EXIT_BAD_INPUT, main

REPO = Path(__file__).resolve().parents[3]
VQA_RAD = REPO.parent / "shared" / "benchmarks" / "vqa_rad" / "test.json"


def _benchmark(path: Path, rows: list[tuple[int, str, str]], key: str = "conversations") -> Path:
    """A LLaVA-Med benchmark file from (id, ground truth, answer_type) rows."""
    entries = [{"id": qid, "image": f"{qid}.jpg", "answer_type": answer_type,
                key: [{"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": gt}]}
               for qid, gt, answer_type in rows]
    path.write_text(json.dumps(entries))
    return path


def _answers(path: Path, rows: list[tuple[int, str]]) -> Path:
    """An official-style answer file: only question_id and text are needed."""
    path.write_text("".join(json.dumps({"question_id": qid, "prompt": "q", "text": text, "answer_id": "x",
                                        "model_id": "m", "metadata": {}}) + "\n" for qid, text in rows))
    return path


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stmed.score", *args], check=False, cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_prints_one_json_object_at_full_precision(tmp_path, capsys):
    gt = _benchmark(tmp_path / "test.json", [(1, "mass", "OPEN"), (2, "no", "CLOSED"), (3, "yes", "CLOSED")],
                    key="conversatons")  # the misspelt key some public files use
    pred = _answers(tmp_path / "answers.jsonl", [(1, "mass mass lung"), (2, "normal"), (3, "no")])
    assert main(["--gt", str(gt), "--pred", str(pred)]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    # OPEN: P 2/3, R 1, F1 0.8. CLOSED: "normal" hits "no" by substring (not strictly); "no" misses "yes".
    metrics = json.loads(out)
    assert metrics.pop("open_precision") == pytest.approx(200 / 3, abs=1e-9)  # not 66.67: JSON keeps it all
    assert metrics == {"open_recall": 100.0, "open_f1": 80.0, "closed_accuracy": 50.0,
                       "closed_accuracy_strict": 0.0, "num_open": 1, "num_closed": 2}


def test_mismatched_ids_exit_2_with_one_line(tmp_path, capsys):
    gt = _benchmark(tmp_path / "test.json", [(1, "yes", "CLOSED"), (2, "no", "CLOSED")])
    pred = _answers(tmp_path / "answers.jsonl", [(2, "no"), (1, "yes")])
    assert main(["--gt", str(gt), "--pred", str(pred)]) == EXIT_BAD_INPUT
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and "position 0" in captured.err


def test_count_mismatch_names_both_counts(tmp_path, capsys):
    gt = _benchmark(tmp_path / "test.json", [(1, "yes", "CLOSED"), (2, "no", "CLOSED")])
    pred = _answers(tmp_path / "answers.jsonl", [(1, "yes")])
    assert main(["--gt", str(gt), "--pred", str(pred)]) == EXIT_BAD_INPUT
    assert "2 questions but there are 1 predictions" in capsys.readouterr().err


def test_malformed_answer_line_exits_2(tmp_path, capsys):
    gt = _benchmark(tmp_path / "test.json", [(1, "yes", "CLOSED")])
    pred = tmp_path / "answers.jsonl"
    pred.write_text('{"question_id": 1, "text": "yes"\n')  # truncated JSON
    assert main(["--gt", str(gt), "--pred", str(pred)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "answers.jsonl:1" in err


def test_missing_file_in_a_subprocess_has_no_traceback(tmp_path):
    gt = _benchmark(tmp_path / "test.json", [(1, "yes", "CLOSED")])
    result = _run_cli("--gt", str(gt), "--pred", str(tmp_path / "nope.jsonl"))
    assert result.returncode == EXIT_BAD_INPUT
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "nope.jsonl" in result.stderr


@pytest.mark.skipif(not VQA_RAD.is_file(), reason=f"VQA-RAD benchmark not present at {VQA_RAD}")
def test_vqa_rad_always_yes_baseline_through_the_cli(tmp_path):
    examples = read_benchmark(VQA_RAD)
    pred = write_predictions(tmp_path / "yes.jsonl",
                             [Prediction(question_id=e.id, prompt=e.question, text="yes") for e in examples])
    result = _run_cli("--gt", str(VQA_RAD), "--pred", str(pred))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"open_recall": 0.0, "open_f1": 0.0, "open_precision": 0.0,
                                         "closed_accuracy": 100 * 118 / 272, "closed_accuracy_strict": 100 * 118 / 272,
                                         "num_open": 179, "num_closed": 272}
