"""What the selection model learns from: rated answers, and ranking pairs of them (METHOD §7).

An :class:`Answer` is one (image, question, answer) the selector rates; a :class:`RankPair` says that one
answer is better than another, and who said so:

- **judge** pairs come from a generate run's judged rows (``stmed.selfplay.preferences``): every answer of a
  question gets the mean of the judge's scores of it (answers that read the same are one answer, as in
  ``best_against_worst``), and any two answers of the question with different scores make a pair, the
  better-scored one first. Pairs are drawn across score levels (BioMed-VITAL samples its ~30k model
  preferences that way): up to ``pairs_per_question`` per question, the widest gap first, then the others
  in a seeded order. Without ``parts/`` the run's ``preferences.parquet`` gives one pair per question.
- **clinician** pairs come from the review export (``stmed.review.export``): a pair whose reviewers
  preferred one answer (their majority verdict) is a pair in that order; a tie, "both wrong" or a split vote
  gives none. They weigh ``clinician_weight`` each in the loss (BioMed-VITAL sweeps 1–400).

Held-out pairs are split by image (:func:`held_out`), so that no held-out image's answers, judged or
reviewed, are seen in training: the selector's agreement with held-out clinicians is then not the judge's
opinion of the same question learned back.
"""

from __future__ import annotations

import hashlib
import random
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any, Literal

from stmed.data.records import PreferencePair
from stmed.judge.judging import JudgeVerdict
from stmed.selfplay.generation import normalize_text
from stmed.selfplay.preferences import OK

Source = Literal["judge", "clinician"]


def answer_id(image: str, question: str, answer: str) -> str:
    """Stable id of a rated answer: its image, question and (stripped) text."""
    key = f"{image}\x1f{question.strip()}\x1f{answer.strip()}"
    return hashlib.sha256(key.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Answer:
    """One (image, question, answer) to rate; ``image`` is relative to the run's image root."""

    answer_id: str
    image: str
    question: str
    answer: str

    @classmethod
    def of(cls, image: str, question: str, answer: str) -> Answer:
        return cls(answer_id(image, question, answer), image, question.strip(), answer.strip())

    def to_row(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Answer:
        return cls(**{f.name: row[f.name] for f in fields(cls)})


@dataclass(frozen=True)
class RankPair:
    """``better`` is preferred to ``worse`` (answer ids) by ``source``; ``gap`` is the judge's score gap
    (0 for a clinician pair); ``pair_id`` the generate pair or review item it came from."""

    better: str
    worse: str
    source: Source
    image: str
    pair_id: str
    gap: float = 0.0

    def to_row(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> RankPair:
        return cls(**{f.name: row[f.name] for f in fields(cls)})


def held_out(image: str, fraction: float, seed: int) -> bool:
    """Whether ``image`` (and every pair on it) is held out: a fixed draw per image and seed."""
    digest = hashlib.sha256(f"stmed-selection:{seed}:{image}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _scored_answers(group: list[dict[str, Any]]) -> list[tuple[str, float]]:
    """One question's judged rows → its distinct answers (first text) with their mean judge score."""
    marks: dict[str, tuple[str, list[float]]] = {}
    for row in group:
        verdict = JudgeVerdict.from_row(row)
        if not verdict.ok or verdict.score1 is None or verdict.score2 is None or verdict.consistent is False:
            continue
        for text, score in ((row["answer1"], verdict.score1), (row["answer2"], verdict.score2)):
            if text.strip():
                marks.setdefault(normalize_text(text), (text, []))[1].append(float(score))
    return [(text, statistics.fmean(scores)) for text, scores in marks.values()]


def _spread(candidates: list[tuple[int, int, float]], limit: int, rng: random.Random) -> list[tuple[int, int, float]]:
    """Up to ``limit`` of ``(better, worse, gap)``: the widest gap, then a seeded draw of the rest."""
    if len(candidates) <= limit:
        return candidates
    widest = max(candidates, key=lambda c: c[2])
    rest = [c for c in candidates if c is not widest]
    return [widest, *rng.sample(rest, limit - 1)]


def judge_pairs(rows: Iterable[dict[str, Any]], pairs_per_question: int,
                seed: int = 0) -> tuple[list[Answer], list[RankPair]]:  # fmt: skip
    """A generate run's rows (``parts/``) → the rated answers and judge pairs across score levels."""
    questions: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row["status"] == OK:
            questions[row["image_id"], row["question_index"]].append(row)
    rng = random.Random(f"stmed-selection-pairs:{seed}")
    answers: dict[str, Answer] = {}
    pairs: list[RankPair] = []
    for key in sorted(questions):
        group = sorted(questions[key], key=lambda r: r.get("pair_slot") or 0)
        first = group[0]
        scored = [(Answer.of(first["image_path"], first["question"], text), score)
                  for text, score in _scored_answers(group)]  # fmt: skip
        candidates = [(i, j, scored[i][1] - scored[j][1]) for i in range(len(scored)) for j in range(len(scored))
                      if scored[i][1] > scored[j][1]]  # fmt: skip
        for i, j, gap in _spread(candidates, pairs_per_question, rng):
            better, worse = scored[i][0], scored[j][0]
            answers.setdefault(better.answer_id, better)
            answers.setdefault(worse.answer_id, worse)
            pairs.append(RankPair(better.answer_id, worse.answer_id, "judge", better.image, first["pair_id"], gap))
    return list(answers.values()), pairs


def judge_scores(rows: Iterable[dict[str, Any]]) -> dict[str, float]:
    """Each judged answer's mean judge score, by answer id (what the selector's scale is fitted to)."""
    questions: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row["status"] == OK:
            questions[row["image_id"], row["question_index"]].append(row)
    out = {}
    for group in questions.values():
        first = group[0]
        for text, score in _scored_answers(group):
            out[Answer.of(first["image_path"], first["question"], text).answer_id] = score
    return out


def preference_pairs(pairs: Iterable[PreferencePair]) -> tuple[list[Answer], list[RankPair]]:
    """Assembled pairs (``preferences.parquet``) → one judge pair each where the scores differ."""
    answers: dict[str, Answer] = {}
    out = []
    for p in pairs:
        if p.chosen_score <= p.rejected_score:
            continue
        better, worse = Answer.of(p.image, p.question, p.chosen), Answer.of(p.image, p.question, p.rejected)
        answers.setdefault(better.answer_id, better)
        answers.setdefault(worse.answer_id, worse)
        out.append(RankPair(better.answer_id, worse.answer_id, "judge", p.image, p.pair_id,
                            p.chosen_score - p.rejected_score))  # fmt: skip
    return list(answers.values()), out


def clinician_pairs(labels: list[dict[str, Any]], decided: dict[str, str]) -> tuple[list[Answer], list[RankPair]]:
    """Review labels (``labels.parquet`` rows) and each pair's verdict (``stmed.review.export.verdicts``:
    chosen / rejected / drop) → one clinician pair per pair the reviewers decided one way."""
    answers: dict[str, Answer] = {}
    out, seen = [], set()
    for row in labels:
        verdict = decided.get(row["pair_id"])
        if verdict not in ("chosen", "rejected") or row["pair_id"] in seen:
            continue
        seen.add(row["pair_id"])
        chosen = Answer.of(row["image"], row["question"], row["chosen"])
        rejected = Answer.of(row["image"], row["question"], row["rejected"])
        better, worse = (chosen, rejected) if verdict == "chosen" else (rejected, chosen)
        answers.setdefault(better.answer_id, better)
        answers.setdefault(worse.answer_id, worse)
        out.append(RankPair(better.answer_id, worse.answer_id, "clinician", row["image"], row["pair_id"]))
    return list(answers.values()), out


def judge_agrees(labels: list[dict[str, Any]], decided: dict[str, str], pair_ids: set[str]) -> dict[str, Any]:
    """The judge's own agreement with the clinicians on ``pair_ids``: the share of the pairs they decided one
    way where they preferred the judge's chosen answer (what the selector's clinician agreement is set
    beside)."""
    verdicts = [decided[p] for p in sorted(pair_ids) if decided.get(p) in ("chosen", "rejected")]
    return {"n": len(verdicts),
            "agreement": sum(v == "chosen" for v in verdicts) / len(verdicts) if verdicts else None}
