"""Self-play rows to preference pairs without Ray: row ids, parts on disk, the resume plan, assembly."""

from __future__ import annotations

import pyarrow as pa
import pytest

from stmed.data.records import DataError
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


def test_a_truncated_part_is_a_one_line_data_error_naming_the_file_and_the_fix(tmp_path):
    path = write_part(tmp_path, "part-a-000000", pa.Table.from_pylist([judged(ok_row("img0", 0), 7.0, 3.0)]))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # storage cut the file short
    with pytest.raises(DataError, match=r"part-a-000000.parquet: not a readable parquet part") as err:
        read_parts(tmp_path)
    assert "\n" not in str(err.value) and f"delete {path} and rerun" in str(err.value)


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


def slot_row(image: str, index: int, slot: int, answers: tuple[str, str]) -> dict:
    seeds = (10 * slot + 1, 10 * slot + 2)
    return make_row(image, f"/data/{image}", OK, "", index, f"q{index}?", 100 + index, answers, seeds,
                    "data:x", slot)


def test_a_question_with_more_answers_pairs_its_best_against_its_worst():
    settings = JudgeSettings(tie_policy="drop")
    rows = [judged(slot_row("img0", 0, 0, ("yes", "yes")), 6.0, 6.0),
            judged(slot_row("img0", 0, 1, ("no", "maybe")), 2.0, 4.0)]
    pairs, failures = assemble(rows, settings)
    assert failures == [] and len(pairs) == 1
    pair = pairs[0]
    assert (pair.chosen, pair.rejected, pair.chosen_score, pair.rejected_score) == ("yes", "no", 6.0, 2.0)
    assert pair.seeds == [1, 11] and pair.pair_id == rows[0]["pair_id"] != rows[1]["pair_id"]
    # a text is one answer, scored by its mean over the sub-pairs it appears in: never both chosen and
    # rejected, and the judge's direct comparison of two answers is not overturned by another request's
    # scale; a failed sub-pair is a failure, the others still count
    rows = [judged(slot_row("img1", 0, 0, ("yes", "No.")), 7.0, 5.0),
            judged(slot_row("img1", 0, 1, ("Yes", "no")), 3.0, 4.0),
            judged(slot_row("img1", 0, 2, ("x", "y")), None, None, error="timeout")]
    pairs, failures = assemble(rows, settings)
    got = [(p.chosen, p.rejected, p.chosen_score, p.rejected_score) for p in pairs]
    assert got == [("yes", "No.", 5.0, 4.5)]
    assert [(f["stage"], f["reason"]) for f in failures] == [("judge", "failed: timeout")]
    # keep_first never makes a lower-scored answer the chosen one
    lower_first = [judged(slot_row("img4", 0, 0, ("A", "A")), 3.0, 5.0),
                   judged(slot_row("img4", 0, 1, ("B", "A")), 5.0, 5.0)]
    for policy in ("drop", "keep_first"):
        got = assemble(lower_first, JudgeSettings(tie_policy=policy))[0]
        assert [(p.chosen, p.rejected, p.chosen_score) for p in got] == [("B", "A", 5.0)]
        assert got[0].rejected_score == pytest.approx(13 / 3)
    # every answer alike: nothing to prefer; every score alike: a tie, kept as the first two by keep_first
    same = [judged(slot_row("img2", 0, s, ("yes", "Yes.")), 5.0, 5.0) for s in (0, 1)]
    assert assemble(same, settings)[1][0]["reason"] == "identical_answers"
    tie = [judged(slot_row("img3", 0, s, answers), 5.0, 5.0)
           for s, answers in ((0, ("a", "a")), (1, ("b", "c")))]
    assert [f["reason"] for f in assemble(tie, settings)[1]] == ["tie"]
    kept = assemble(tie, JudgeSettings(tie_policy="keep_first"))[0]
    assert [(p.chosen, p.rejected) for p in kept] == [("a", "b")]
    summary = summarize_rows(4, [*rows, *same, *tie], pairs, failures, settings)
    assert summary["questions"] == 3 and summary["answer_pairs_judged"] == 7


def test_resume_waits_for_every_sub_pair_of_a_question():
    images = [{"image_id": f"img{i}", "image_path": f"/data/img{i}"} for i in range(3)]
    done_rows = [
        *(judged(slot_row("img0", j, s, ("a", "b")), 5.0, 3.0) for j in range(K) for s in (0, 1)),  # done
        judged(slot_row("img1", 0, 0, ("a", "b")), 5.0, 3.0),  # img1: question 0 lacks slot 1
        make_row("img1", "/data/img1", QUESTION_FILTERED, "duplicate", 1, "q1?", 101),
        make_row("img2", "/data/img2", QUESTION_FILTERED, "too_short", 0, "q?", 100),  # img2: filtered
        *(judged(slot_row("img2", 1, s, ("a", "b")), 5.0, 3.0) for s in (0, 1)),  # ... and done
    ]
    todo, skip = plan_resume(images, {r["pair_id"]: r for r in done_rows}, K, slots=2)
    assert [im["image_id"] for im in todo] == ["img1"]
    assert skip == {done_rows[4]["pair_id"], done_rows[5]["pair_id"]}


def test_balancing_keeps_as_many_chosen_yes_as_chosen_no_on_yes_no_questions():
    from stmed.data.records import PreferencePair
    from stmed.selfplay.preferences import balance_yes_no, says

    def pair(n: int, question: str, chosen: str, rejected: str) -> PreferencePair:
        return PreferencePair(pair_id=f"p{n}", image=f"/i{n}.png", question=question, chosen=chosen,
                              rejected=rejected, chosen_score=8.0, rejected_score=2.0, judge_model="ref")

    closed = "Is there a lesion? Please choose from the following two options: [yes, no]"
    pairs = [*(pair(n, closed, "No.", "Yes") for n in range(5)), pair(5, closed, "yes, on the left", "no"),
             pair(6, closed, "Yes", "the"), pair(7, "Where is the lesion?", "No lesion.", "Left."),
             pair(8, closed, "Left.", "no")]
    kept, dropped = balance_yes_no(pairs)
    said = [says(p.chosen) for p in kept if p.question == closed]
    assert said.count("yes") == said.count("no") == 2
    # open questions and answers that open with neither word are never dropped
    assert {"p7", "p8", "p5", "p6"} <= {p.pair_id for p in kept} and len(kept) + len(dropped) == len(pairs)
    assert {f["pair_id"] for f in dropped} == {p.pair_id for p in pairs} - {p.pair_id for p in kept}
    assert all(f["stage"] == "balance" and reason_kind(f["reason"]) == "yes/no balance" for f in dropped)
    assert balance_yes_no(pairs) == (kept, dropped)  # the same pairs every run
    assert says("[yes, no]") == "yes" and says("Normal.") is None


def test_a_floor_on_the_chosen_score_drops_pairs_of_two_poor_answers():
    from stmed.data.records import PreferencePair
    from stmed.selfplay.preferences import chosen_at_least

    pairs = [PreferencePair(pair_id=f"p{s}", image="/i.png", question="How large are the lesions?",
                            chosen="The lesions are small.", rejected="The lesions are large.",
                            chosen_score=s, rejected_score=2.0, judge_model="ref") for s in (9.0, 6.0, 5.0)]
    kept, dropped = chosen_at_least(pairs, 6)
    assert [p.pair_id for p in kept] == ["p9.0", "p6.0"]
    assert [(f["pair_id"], f["stage"], reason_kind(f["reason"])) for f in dropped] == [
        ("p5.0", "floor", "chosen score below the floor")]
