"""stmed.eval.effects: per-question scores and the paired bootstrap interval of a difference."""

from __future__ import annotations

import numpy as np
import pytest

from stmed.data.records import VQAExample
from stmed.eval.effects import effects, paired_bootstrap, per_question


def _example(i: int, answer: str, kind: str) -> VQAExample:
    return VQAExample(id=i, image="x.png", question="q?", answer=answer, answer_type=kind)


def test_per_question_scores_follow_the_scorer():
    examples = [_example(0, "yes", "CLOSED"), _example(1, "left lung", "OPEN"), _example(2, "no", "CLOSED")]
    texts = ["yes", "the left side", "yes it is"]
    assert per_question(examples, texts, "closed_accuracy").tolist() == [100.0, 0.0]
    assert per_question(examples, texts, "open_recall").tolist() == [50.0]  # "left" of "left lung"


def test_paired_bootstrap_is_exact_at_the_extremes_and_reproducible():
    a = np.array([0.0, 100.0, 100.0, 0.0])
    assert paired_bootstrap(a, a) == (0.0, (0.0, 0.0))
    assert paired_bootstrap(a, a + 5.0) == (5.0, (5.0, 5.0))  # every question moves alike: no spread
    rng = np.random.default_rng(1)
    before = 100.0 * (rng.random(600) < 0.55)
    after = np.where(rng.random(600) < 0.2, 100.0 - before, before)  # 20% of answers flipped
    delta, (lo, hi) = paired_bootstrap(before, after, seed=3)
    assert lo < delta < hi and (delta, (lo, hi)) == paired_bootstrap(before, after, seed=3)
    se = (after - before).std(ddof=1) / np.sqrt(600)  # the normal approximation agrees
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.15)
    with pytest.raises(ValueError, match="equal, non-empty"):
        paired_bootstrap(before, after[:10])


def test_effects_cover_every_pair_and_metric_with_questions():
    examples = [_example(i, "yes" if i % 2 else "no", "CLOSED") for i in range(20)] + [
        _example(99, "mass", "OPEN")
    ]
    texts = {"sft": ["no"] * 20 + ["mass"], "dpo1": ["yes" if i % 2 else "no" for i in range(20)] + ["none"]}
    found = effects("synthetic", examples, texts, [("sft", "dpo1")])
    by_metric = {e["metric"]: e for e in found}
    assert (
        by_metric["closed_accuracy"]["delta"] == pytest.approx(50.0)
        and by_metric["closed_accuracy"]["n"] == 20
    )
    assert by_metric["open_recall"]["delta"] == -100.0 and by_metric["open_recall"]["ci95"] == [
        -100.0,
        -100.0,
    ]
    assert {e["from"] for e in found} == {"sft"} and {e["benchmark"] for e in found} == {"synthetic"}
