"""Stage-to-stage differences with their uncertainty: a paired bootstrap over the benchmark's questions.

Two models answer the same questions, so their per-question scores are paired: the delta of the means is
the mean of the per-question differences, and resampling the questions (with replacement, the pairs kept
together) gives its sampling distribution. The 95% interval is the 2.5th to 97.5th percentile of the
resampled deltas. On the synthetic benchmark's hundreds of closed questions, one model's accuracy alone
carries a binomial standard error of about 2-3 points; the paired interval of a difference is narrower
when both models get the same questions right, which is what it measures.

Metrics, per question and in percent like the scorer's: ``closed_accuracy`` (LLaVA-Med's closed rule, 0 or
100 per CLOSED question) and ``open_recall`` (unigram recall per OPEN question).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from stmed.data.records import VQAExample
from stmed.eval.metrics import CLOSED, OPEN, closed_hit, open_scores

BOOTSTRAP_SAMPLES = 2000
METRICS: dict[str, tuple[str, Callable[[str, str], float]]] = {
    "closed_accuracy": (CLOSED, lambda pred, gt: 100.0 * closed_hit(pred, gt)),
    "open_recall": (OPEN, lambda pred, gt: 100.0 * open_scores(pred, gt)[1]),
}


def per_question(examples: Sequence[VQAExample], texts: Sequence[str], metric: str) -> np.ndarray:
    """The metric's score of every question of its kind, in benchmark order."""
    kind, score = METRICS[metric]
    return np.array([score(text, e.answer) for e, text in zip(examples, texts) if e.answer_type == kind])


def paired_bootstrap(before: np.ndarray, after: np.ndarray, samples: int = BOOTSTRAP_SAMPLES,
                     seed: int = 0) -> tuple[float, tuple[float, float]]:  # fmt: skip
    """``(mean(after - before), (lo, hi))``, the 95% percentile interval of that delta."""
    if before.shape != after.shape or before.size == 0:
        raise ValueError(f"paired_bootstrap: need two equal, non-empty score vectors, got {before.shape} "
                         f"and {after.shape}")  # fmt: skip
    diff = after - before
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, size=(samples, diff.size))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(diff.mean()), (float(lo), float(hi))


def effects(benchmark: str, examples: Sequence[VQAExample], texts: dict[str, Sequence[str]],
            pairs: Sequence[tuple[str, str]], seed: int = 0) -> list[dict[str, Any]]:  # fmt: skip
    """``{from, to, benchmark, metric, delta, ci95, n}`` for every ``(from, to)`` pair and metric with
    questions of its kind."""
    out = []
    for before, after in pairs:
        for metric in METRICS:
            a, b = per_question(examples, texts[before], metric), per_question(examples, texts[after], metric)
            if a.size == 0:
                continue
            delta, (lo, hi) = paired_bootstrap(a, b, seed=seed)
            out.append({"from": before, "to": after, "benchmark": benchmark, "metric": metric, "delta": delta,
                        "ci95": [lo, hi], "n": int(a.size)})  # fmt: skip
    return out
