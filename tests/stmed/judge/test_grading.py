"""The reference judge's grading rules: answers scored against known findings, right above wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stmed.data.synthetic import Findings, load_findings, make_dataset, text_corpus
from stmed.judge.grading import gradable, judge_answer, preference, score_answer

LESION = Findings("ct", "chest", True, side="left", count=2, size="large")
CLEAN = Findings("mri", "brain", False)


def test_open_questions_score_the_right_finding_above_the_wrong_one() -> None:
    assert score_answer("What imaging modality is used?", "CT", LESION) >= 8
    assert score_answer("What imaging modality is used?", "MRI", LESION) <= 2
    assert score_answer("Which organ is shown?", "The image shows the chest.", LESION) >= 8
    assert score_answer("Which organ is shown?", "brain", LESION) <= 2
    assert score_answer("How many lesions are there?", "two", LESION) >= 8
    assert score_answer("How many lesions are there?", "There are 3 lesions.", LESION) <= 2
    assert score_answer("Where is the lesion located?", "On the left side.", LESION) >= 8
    assert score_answer("Where is the lesion located?", "right", LESION) <= 2
    assert score_answer("How large are the lesions?", "There is no lesion.", LESION) <= 2
    assert score_answer("How large are the lesions?", "There is no lesion.", CLEAN) >= 8


def test_more_correct_detail_scores_a_bit_higher_and_false_detail_lower() -> None:
    bare = score_answer("What type of scan is this?", "CT", LESION)
    detailed = score_answer("What type of scan is this?", "This is a CT scan of the chest.", LESION)
    false_detail = score_answer("What type of scan is this?", "This is a CT scan of the brain.", LESION)
    assert detailed > bare > false_detail


def test_closed_questions_check_the_yes_no_against_the_question_claims() -> None:
    q = "Is the lesion on the left side? Please choose from the following two options: [yes, no]"
    assert score_answer(q, "yes", LESION) >= 8
    assert score_answer(q, "no", LESION) <= 2
    assert score_answer(q, "Yes, they are on the left side.", LESION) > score_answer(q, "yes", LESION)
    assert score_answer("Is there a small lesion on the left side?", "No, there are two large lesions.", LESION) >= 8
    assert score_answer("Is there a lesion on the right side?", "No, there is no lesion.", CLEAN) >= 8
    assert score_answer("Is this image normal?", "Yes.", CLEAN) >= 8
    assert score_answer("Is this image normal?", "Yes.", LESION) <= 2
    assert score_answer("Are there multiple lesions?", "Yes, there are two lesions.", LESION) >= 8
    assert score_answer("Is this an X-ray scan?", "No, this is a CT scan.", LESION) >= 8
    # no yes/no word: the statement itself is judged
    assert score_answer("Is this a CT scan?", "It is an MRI scan.", LESION) <= 2


@pytest.mark.parametrize("answer", ["", "   ", "...", "the the the the the the the", "no no no no",
                                    "What type of scan is this?"])
def test_empty_or_degenerate_answers_score_lowest(answer: str) -> None:
    assert score_answer("What imaging modality is used?", answer, LESION) == 1


def test_off_topic_answers_score_low() -> None:
    assert score_answer("What imaging modality is used?", "I like turtles.", LESION) == 3
    assert score_answer("Which side is the lesion on?", "This is a CT scan.", LESION) <= 5


def test_descriptions_score_by_findings_right_and_wrong() -> None:
    q = "Can you describe the image in detail?"
    full = "This is a CT scan of the chest. There are two large lesions on the left side."
    partial = "This is a CT scan of the chest."
    wrong = "This is an MRI scan of the chest. There are two large lesions on the right side."
    assert score_answer(q, full, LESION) == 10
    assert score_answer(q, full, LESION) > score_answer(q, partial, LESION) > score_answer(q, wrong, LESION)
    assert score_answer(q, "This is an MRI scan of the brain. No lesion is seen.", CLEAN) == 10


def test_free_form_questions_fall_back_to_judging_the_statements() -> None:
    q = "What else can be said about this picture?"
    assert score_answer(q, "There are two large lesions.", LESION) > score_answer(q, "There is no lesion.", LESION)


def test_every_benchmark_answer_scores_high_and_its_opposite_low(tmp_path: Path) -> None:
    paths = make_dataset(tmp_path, num_images=60, seed=5, test_images=30)
    findings = load_findings(paths.findings)
    opposite = {"yes": "no", "no": "yes", "left": "right", "right": "left", "small": "large", "large": "small",
                "one": "three", "two": "one", "three": "two", "CT": "MRI", "MRI": "X-ray", "X-ray": "CT",
                "brain": "chest", "chest": "abdomen", "abdomen": "brain"}
    rows = json.loads(paths.test_w_options.read_text()) + json.loads(paths.test.read_text())
    for row in rows:
        question, answer = (t["value"] for t in row["conversations"])
        f = findings[row["image"]]
        assert score_answer(question, answer, f) >= 8, (question, answer, f)
        assert score_answer(question, opposite[answer], f) <= 2, (question, answer, f)
    for row in json.loads(paths.instruct.read_text()):  # the training sentences too, description included
        turns = [t["value"] for t in row["conversations"]]
        for question, answer in zip(turns[::2], turns[1::2], strict=True):
            assert score_answer(question, answer, findings[row["image"]]) >= 8, (question, answer)


def test_findings_may_be_given_as_a_findings_json_entry() -> None:
    entry = {**LESION.to_dict(), "split": "train", "pixel_digest": "ab"}
    assert score_answer("Which organ is shown?", "chest", entry) == score_answer("Which organ is shown?", "chest", LESION)


def test_the_reason_names_what_was_right_or_wrong() -> None:
    assert judge_answer("What imaging modality is used?", "CT", LESION).reason == "correct about modality"
    assert judge_answer("What imaging modality is used?", "MRI", LESION).reason == "wrong about modality"


def test_template_questions_are_gradable_and_unreadable_ones_are_not() -> None:
    questions = [t for t in text_corpus() if t.endswith("?")]
    assert questions and all(gradable(q) for q in questions)
    assert gradable("Is the lesion on the left side? Please choose from the following two options: [yes, no]")
    assert not gradable("What else can be said about this picture?")
    assert not gradable("Is it?")


def test_preference_counts_wins_ties_losses_of_the_first_model() -> None:
    got = preference([8, 2, 5, 9], [2, 8, 5, 3])
    assert (got["wins"], got["ties"], got["losses"], got["questions"]) == (2, 1, 1, 4)
    assert got["win_rate"] == pytest.approx(2 / 3)
    assert (got["mean_score_a"], got["mean_score_b"]) == (6.0, 4.5)
    assert preference([5, 5], [5, 5])["win_rate"] is None  # all ties: no rate, not a fake 0.5
    with pytest.raises(ValueError, match="equal, non-empty"):
        preference([1, 2], [1])
