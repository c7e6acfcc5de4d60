"""Selective judging (METHOD §7): the selector rates every new answer pair first; only the uncertain ones
are paid for at the judge, the rest are labelled by the selector.

A generated sub-pair (two answers to one question) gets the selector's margin, score(answer 1) − score(answer
2). The pairs it is least sure of — the smallest ``|margin|`` — go to the judge: with ``judge_share``, that
share of each batch of pairs (streaming: each batch is routed on its own, so the share holds per batch);
with ``margin_threshold``, every pair whose ``|margin|`` is below it. The others get a verdict from the
selector: its two scores mapped onto the judge's scale by the line fitted at training time (``jobs.select``:
the judge's mean score of a training answer against the head's score of it), clipped to ``[0, 10]``, so that
pair assembly (best against worst answer of a question, ties, the chosen-score floor) reads them as it reads
the judge's. Every ``ok`` row says who labelled it (``labelled_by``: ``judge`` or ``selector``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from stmed.config import ConfigError
from stmed.judge.judging import JudgeVerdict

JUDGE, SELECTOR = "judge", "selector"
SELECTOR_MODEL = "stmed-selector"


@dataclass(frozen=True)
class SelectiveSettings:
    """Selective judging in jobs.generate (from round 2 on: a selector trained on round 1)."""

    select_dir: str | None = None
    """A jobs.select output folder (its ``head.safetensors`` and, in its ``config.yaml``, the policy whose
    frozen states are the features); None: every pair goes to the judge."""
    judge_share: float | None = 0.5
    """Share of each batch of pairs, the most uncertain first, sent to the judge."""
    margin_threshold: float | None = None
    """Instead of judge_share: pairs whose |selector margin| is below this go to the judge."""
    selector_cpus: float = 0.5
    """CPUs of the one selector actor (it loads the policy once)."""
    pairs_per_batch: int = 16

    def __post_init__(self) -> None:
        if (self.judge_share is None) == (self.margin_threshold is None):
            raise ConfigError("selective: set exactly one of selective.judge_share and selective.margin_threshold "
                              "(the other null)")
        if self.judge_share is not None and not 0.0 <= self.judge_share <= 1.0:
            raise ConfigError(f"selective.judge_share must be in [0, 1], got {self.judge_share}")
        if self.margin_threshold is not None and self.margin_threshold < 0:
            raise ConfigError(f"selective.margin_threshold must be >= 0, got {self.margin_threshold}")
        if self.selector_cpus <= 0 or self.pairs_per_batch < 1:
            raise ConfigError("selective.selector_cpus must be > 0 and selective.pairs_per_batch >= 1")


def to_judge(margins: list[float | None], settings: SelectiveSettings) -> list[bool]:
    """For each pair, whether it goes to the judge: an unrated pair (None) always does; then the most
    uncertain ``judge_share`` of the rated ones (at least one when the share is above 0), or those with
    ``|margin| < margin_threshold``."""
    if settings.margin_threshold is not None:
        return [m is None or abs(m) < settings.margin_threshold for m in margins]
    rated = sorted((abs(m), i) for i, m in enumerate(margins) if m is not None)
    count = math.ceil(settings.judge_share * len(rated))
    chosen = {i for _, i in rated[:count]}
    return [m is None or i in chosen for i, m in enumerate(margins)]


def on_judge_scale(score: float, scale: tuple[float, float]) -> float:
    """A head score as a judge score: ``a * score + b``, clipped to [0, 10]."""
    a, b = scale
    return min(10.0, max(0.0, a * score + b))


def fit_judge_scale(head_scores: list[float], judge_scores: list[float]) -> tuple[float, float]:
    """Least-squares ``(a, b)`` with ``judge ≈ a * head + b``; ``(0, mean)`` when the head scores are constant."""
    n = len(head_scores)
    if n == 0:
        raise ValueError("fit_judge_scale: no scores")
    mx, my = sum(head_scores) / n, sum(judge_scores) / n
    var = sum((x - mx) ** 2 for x in head_scores)
    if var == 0:
        return 0.0, my
    a = sum((x - mx) * (y - my) for x, y in zip(head_scores, judge_scores)) / var
    return a, my - a * mx


def selector_verdict(pair_id: str, score1: float, score2: float, scale: tuple[float, float]) -> dict[str, Any]:
    """The verdict columns (``JudgeVerdict.to_row``) of a pair the selector labelled: no request, nothing paid."""
    verdict = JudgeVerdict(pair_id, on_judge_scale(score1, scale), on_judge_scale(score2, scale),
                           judge_model=SELECTOR_MODEL)  # fmt: skip
    return verdict.to_row()
