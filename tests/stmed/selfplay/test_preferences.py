"""Self-play rows to preference pairs without Ray: row ids, parts on disk, the resume plan, assembly."""

from __future__ import annotations

import pyarrow as pa

from stmed.judge.judging import JudgeSettings, JudgeVerdict
from stmed.selfplay.preferences import (
    IMAGE_ERROR,
    OK,
    OUTPUT_COLUMNS,
    QUESTION_FILTERED,
    assemble,
    make_row,
    plan_resume,
    read_parts,
    reason_kind,
    summarize_rows,
    write_part,
)

K = 2


def judged(row: dict, score1: float | None, score2: float | None, error: str | None = None) -> dict:
    """A row as it leaves the judge: the generator's columns plus the verdict's."""
    verdict = JudgeVerdict(row["pair_id"], score1, score2, error=error, attempts=1, judge_model="ref")
    return {**row, **{k: v for k, v in verdict.to_row().items() if k != "pair_id"}}


def ok_row(image: str, index: int, answers: tuple[str, str] = ("a", "b")) -> dict:
    return make_row(image, f"/data/{image}", OK, "", index, f"q{index}?", 100 + index, answers, (1, 2),
                    "data:x")


def test_rows_have_the_schema_a_stable_id_and_carry_the_image_only_when_ok():
    row = ok_row("img0", 0)
    assert tuple(row) == OUTPUT_COLUMNS and row["image_data_url"] == "data:x"
    assert row["pair_id"] == ok_row("img0", 0)["pair_id"] != ok_row("img0", 1)["pair_id"]
    dropped = make_row("img0", "/data/img0", QUESTION_FILTERED, "duplicate", 1, "q?", 5,
                       image_data_url="data:x")
    assert dropped["image_data_url"] == ""


def test_parts_round_trip_and_a_later_part_replaces_an_earlier_row(tmp_path):
    first = judged(ok_row("img0", 0), None, None, error="failed: http 500 after 5 attempts")
    retried = judged(ok_row("img0", 0), 7.0, 3.0)
    write_part(tmp_path, "part-a-000000", pa.Table.from_pylist([first]))
    write_part(tmp_path, "part-b-000000", pa.Table.from_pylist([retried]))
    assert not list(tmp_path.glob("*.tmp"))
    rows = read_parts(tmp_path)
    assert list(rows) == [first["pair_id"]] and rows[first["pair_id"]]["score1"] == 7.0


def test_resume_skips_finished_images_and_retries_failed_judgements():
    images = [{"image_id": f"img{i}", "image_path": f"/data/img{i}"} for i in range(4)]
    done_rows = [
        judged(ok_row("img0", 0), 7.0, 3.0), judged(ok_row("img0", 1), 2.0, 5.0),  # img0 finished
        judged(ok_row("img1", 0), 6.0, 1.0),  # img1 half done
        judged(ok_row("img2", 0), None, None, error="failed: timeout"),  # img2: judgement to retry
        make_row("img3", "/data/img3", IMAGE_ERROR, "cannot decode"),  # img3 unreadable: never again
    ]
    todo, skip = plan_resume(images, {r["pair_id"]: r for r in done_rows}, K)
    assert [im["image_id"] for im in todo] == ["img1", "img2"]
    assert skip == {done_rows[2]["pair_id"]}


def test_assemble_orders_by_score_applies_the_tie_policy_and_keeps_every_failure():
    rows = [judged(ok_row("img0", 1, ("x", "y")), 2.0, 8.0),
            judged(ok_row("img0", 0, ("p", "q")), 9.0, 4.0),
            judged(ok_row("img1", 0), 5.0, 5.0),
            judged(ok_row("img1", 1), None, None, error="http 429: slow"),
            make_row("img2", "/data/img2", IMAGE_ERROR, "cannot decode")]
    pairs, failures = assemble(rows, JudgeSettings(tie_policy="drop"))
    assert [(p.chosen, p.rejected, p.chosen_score, p.rejected_score) for p in pairs] == [
        ("p", "q", 9.0, 4.0), ("y", "x", 8.0, 2.0)]
    assert pairs[1].seeds == [2, 1] and pairs[0].judge_model == "ref"
    assert [(f["stage"], f["reason"]) for f in failures] == [
        ("judge", "tie"), ("judge", "failed: http 429: slow"), (IMAGE_ERROR, "cannot decode")]
    assert failures[0]["scores"] == [5.0, 5.0]
    kept, _ = assemble(rows, JudgeSettings(tie_policy="keep_first"))
    assert len(kept) == 3

    summary = summarize_rows(3, rows, pairs, failures, JudgeSettings())
    assert summary["images"] == 3 and summary["image_errors"] == 1 and summary["questions"] == 4
    assert summary["answer_pairs_judged"] == 4 and summary["pairs"] == 2 and summary["ties"] == 1
    assert summary["failures"] == {"judge: tie": 1, "judge: http 429": 1, f"{IMAGE_ERROR}: cannot decode": 1}
    assert reason_kind("failed: http 500 after 5 attempts") == "http 500"
