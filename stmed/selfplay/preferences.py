"""From self-play rows to preference pairs (METHOD §3): the row schema, resume bookkeeping, assembly.

A generation stream (``actors.generator``, ``actors.vllm_generator``) emits one row per sampled question
and sub-pair of its answers (k questions per image, ``answers_per_question / 2`` sub-pairs each, told
apart by ``pair_slot``; a filtered question is one row), and one per unreadable image, all with
``OUTPUT_COLUMNS``. ``status`` is ``ok`` for a pair to judge, else ``image_error``, ``question_filtered``
or ``answer_filtered`` with the ``reason``; the judge adds its verdict columns to ``ok`` rows. ``pair_id``
identifies a row across reruns.

``jobs.generate`` writes finished rows to ``parts/`` as they arrive (:func:`write_part`); a rerun reads
them back (:func:`read_parts`) and regenerates only what is missing (:func:`plan_resume`). At the end
:func:`assemble` turns each question's judged rows into one ``PreferencePair`` (its best- against its
worst-scored answer, by the tie policy) and every other row into a failure record with its reason;
:func:`summarize_rows` counts both for ``summary.json``.
"""

from __future__ import annotations

import hashlib
import os
import re
import statistics
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from stmed.data.records import DataError, PreferencePair
from stmed.judge.judging import JudgeSettings, JudgeVerdict, decide, summarize
from stmed.selfplay.generation import is_yes_no, normalize_text

OK, IMAGE_ERROR = "ok", "image_error"
QUESTION_FILTERED, ANSWER_FILTERED = "question_filtered", "answer_filtered"
INPUT_COLUMNS = ("image_id", "image_path")
OUTPUT_COLUMNS = ("pair_id", "image_id", "image_path", "question_index", "question", "question_seed",
                  "pair_slot", "answer1", "answer2", "seed1", "seed2", "image_data_url", "status", "reason",
                  "gate_action", "gate_regions", "sent_digest")
"""``gate_action`` / ``gate_regions`` / ``sent_digest``: what the burned-in-text gate (``stmed.privacy``) did to
the image and the pixel digest of what goes to the judge; empty when the stream did not gate it (the
judge actor then does)."""


# ----------------------------------------------------------------------------- the row


def make_pair_id(image_id: str, index: int, question_seed: int, slot: int = 0) -> str:
    """Stable id of sub-pair ``slot`` of question ``index`` of an image (``index=-1``: the image itself);
    slot 0's id is the question's (with two answers, its preference pair's)."""
    key = f"{image_id}\x1f{index}\x1f{question_seed}" + (f"\x1f{slot}" if slot else "")
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def make_row(image_id: str, image_path: str, status: str = OK, reason: str = "", index: int = -1,
             question: str = "", question_seed: int = -1, answers: tuple[str, str] = ("", ""),
             seeds: tuple[int, int] = (-1, -1), image_data_url: str = "", slot: int = 0,
             gate: tuple[str, int, str] = ("", 0, "")) -> dict[str, Any]:
    """One output row; the image travels only with ``ok`` rows (the judge needs it, nothing else does)."""
    return {
        "pair_id": make_pair_id(image_id, index, question_seed, slot), "image_id": image_id,
        "image_path": image_path, "question_index": index, "question": question,
        "question_seed": question_seed, "pair_slot": slot, "answer1": answers[0], "answer2": answers[1],
        "seed1": seeds[0], "seed2": seeds[1], "image_data_url": image_data_url if status == OK else "",
        "status": status, "reason": reason,
        "gate_action": gate[0], "gate_regions": gate[1], "sent_digest": gate[2],
    }


# ----------------------------------------------------------------------------- parts and resume


def write_part(parts: Path, name: str, table: pa.Table) -> Path:
    """One finished block, atomically: a kill leaves whole parts or none."""
    path = parts / f"{name}.parquet"
    pq.write_table(table, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)
    return path


def read_parts(parts: Path) -> dict[str, dict[str, Any]]:
    """Every row written so far, by pair_id; a later part (a retried judgement) replaces an earlier."""
    rows: dict[str, dict[str, Any]] = {}
    for path in sorted(parts.glob("part-*.parquet")):
        for row in _read_part(path):
            rows[row["pair_id"]] = row
    return rows


def _read_part(path: Path) -> list[dict[str, Any]]:
    """One part's rows, or a one-line ``DataError``: parts are written whole (``write_part``), so an
    unreadable one was cut short or changed by something else, and its rows are best made again."""
    fix = f"delete {path} and rerun: its rows are generated again"
    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as err:  # truncated, not parquet, unreadable
        raise DataError(f"{path}: not a readable parquet part ({type(err).__name__}: "
                        f"{' '.join(str(err).split())[:80]}); {fix}") from None
    if rows and "pair_id" not in rows[0]:
        raise DataError(f"{path}: not a generate part (no pair_id column); {fix}")
    return rows


def awaiting_batch(row: dict[str, Any]) -> bool:
    """A generated pair that ``judge.mode=batch`` is still to judge: ``ok``, no verdict yet (pending, or
    failed in an earlier batch), its gated image kept on the row for the next batch."""
    return row["status"] == OK and row.get("error") is not None and bool(row.get("image_data_url"))


def _finished(row: dict[str, Any], batch: bool = False) -> bool:
    return row["status"] != OK or row.get("error") is None or (batch and awaiting_batch(row))


def plan_resume(images: list[dict], done: dict[str, dict], k: int, slots: int = 1,
                batch: bool = False) -> tuple[list[dict], frozenset[str]]:  # fmt: skip
    """Images still to generate, and the pair_ids of their rows that are already finished. A question is
    done when it was filtered or all ``slots`` of its sub-pairs are finished; an image when k are. With
    ``batch`` (``judge.mode=batch``) a pair awaiting its batch is finished here: it is judged, not generated."""
    finished = [row for row in done.values() if _finished(row, batch)]
    failed_images = {row["image_id"] for row in finished if row["status"] == IMAGE_ERROR}
    per_question: Counter = Counter()
    for row in finished:
        weight = slots if row["status"] == QUESTION_FILTERED else 1
        per_question[row["image_id"], row["question_index"]] += weight
    per_image = Counter(image for (image, _), n in per_question.items() if n >= slots)
    todo = [im for im in images if im["image_id"] not in failed_images and per_image[im["image_id"]] < k]
    pending = {im["image_id"] for im in todo}
    return todo, frozenset(row["pair_id"] for row in finished if row["image_id"] in pending)


# ----------------------------------------------------------------------------- pairs


def assemble(rows: list[dict], judge: JudgeSettings) -> tuple[list[PreferencePair], list[dict]]:
    """Judged rows → one preference pair per question (:func:`best_against_worst` over its sub-pairs);
    everything else → failure records."""
    pairs, failures = [], []
    ordered = sorted(rows, key=lambda r: (r["image_id"], r["question_index"], r.get("pair_slot") or 0))
    questions: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for row in ordered:
        if row["status"] == OK:
            questions[row["image_id"], row["question_index"]].append(row)
    for row in ordered:  # in row order: a question's outcome where its first sub-pair is
        if row["status"] != OK:
            failures.append({**_where(row), "stage": row["status"], "reason": row["reason"]})
            continue
        group = questions[row["image_id"], row["question_index"]]
        if row is group[0]:
            pair, dropped = best_against_worst(group, judge)
            pairs += [pair] if pair else []
            failures += dropped
    return pairs, failures


def _where(row: dict) -> dict[str, Any]:
    return {"pair_id": row["pair_id"], "image": row["image_path"], "question": row["question"]}


def best_against_worst(group: list[dict], judge: JudgeSettings) -> tuple[PreferencePair | None, list[dict]]:
    """One question's judged sub-pairs (slot order) → its pair and the failure records.

    Every answer of a sub-pair the judge scored (not failed, and consistent under a position swap when
    ``drop_inconsistent``) counts. Answers that read the same (``normalize_text``) are one answer, scored
    by the mean of their scores, so a text is never both chosen and rejected and scores from separate
    requests are pooled; the chosen answer is the best-scored, the rejected one the worst-scored (the
    earliest wins equal scores). When every answer scores the same it is a tie, dropped or kept as the
    first two by ``tie_policy``. With one sub-pair this is exactly ``decide`` on it. The pair's id is
    its first judged sub-pair's (slot 0's, unless that one was filtered)."""
    answers: dict[str, tuple[str, int, list[float]]] = {}  # normalised → (first text, its seed, scores)
    failures, verdicts, scores = [], [], []
    for row in group:
        verdict = JudgeVerdict.from_row(row)
        choice, why = decide(verdict, judge.tie_policy, judge.drop_inconsistent)
        if choice is None and why != "tie":
            failures.append({**_where(row), "stage": "judge", "reason": why,
                             "scores": [verdict.score1, verdict.score2]})
            continue
        verdicts.append(verdict)
        for text, score, seed in ((row["answer1"], verdict.score1, row["seed1"]),
                                  (row["answer2"], verdict.score2, row["seed2"])):
            answers.setdefault(normalize_text(text), (text, seed, []))[2].append(score)
            scores.append(score)
    if not answers:
        return None, failures
    where = _where(group[0])
    distinct = [(text, seed, statistics.fmean(marks)) for text, seed, marks in answers.values()]
    if len(distinct) < 2:
        return None, [*failures, {**where, "stage": "judge", "reason": "identical_answers", "scores": scores}]
    order = range(len(distinct))
    best = max(order, key=lambda i: (distinct[i][2], -i))
    worst = min(order, key=lambda i: (distinct[i][2], i))
    if distinct[best][2] == distinct[worst][2]:
        if judge.tie_policy == "drop":
            return None, [*failures, {**where, "stage": "judge", "reason": "tie", "scores": scores}]
        best, worst = 0, 1  # keep_first: the first answer against the first that reads differently
    chosen, chosen_seed, chosen_score = distinct[best]
    rejected, rejected_seed, rejected_score = distinct[worst]
    return PreferencePair(
        pair_id=group[0]["pair_id"], image=group[0]["image_path"], question=group[0]["question"],
        chosen=chosen, rejected=rejected, chosen_score=chosen_score, rejected_score=rejected_score,
        judge_model=verdicts[0].judge_model, seeds=[chosen_seed, rejected_seed],
        question_seed=group[0]["question_seed"]), failures


def chosen_at_least(pairs: list[PreferencePair], floor: float) -> tuple[list[PreferencePair], list[dict]]:
    """The pairs whose chosen answer scored at least ``floor``, and the others as failure records."""
    kept = [p for p in pairs if p.chosen_score >= floor]
    return kept, [{"pair_id": p.pair_id, "image": p.image, "question": p.question, "stage": "floor",
                   "reason": f"chosen score below the floor: {p.chosen_score} < {floor}"}
                  for p in pairs if p.chosen_score < floor]


def says(answer: str) -> str | None:
    """"yes" or "no" when the answer opens with it, else None."""
    first = next(iter(re.findall(r"[a-z]+", answer.lower())), None)
    return first if first in ("yes", "no") else None


def balance_yes_no(pairs: list[PreferencePair]) -> tuple[list[PreferencePair], list[dict]]:
    """As many yes/no-question pairs whose chosen answer opens with "yes" as with "no": the surplus of
    the larger side is dropped (a fixed choice, by pair id) and returned as failure records.

    A model's own yes/no questions mostly ask about findings the image does not have, so the judge
    mostly prefers "no"; trained on that, DPO learns to say "no" rather than to read the image (on
    the phantoms, round 1 answered "yes" to 8% of a balanced benchmark). Balanced, a bias shift earns
    nothing and what is left to learn is which images get which answer."""
    sides: dict[str, list[PreferencePair]] = {"yes": [], "no": []}
    for pair in pairs:
        said = says(pair.chosen) if is_yes_no(pair.question) else None
        if said:
            sides[said].append(pair)
    keep = min(len(sides["yes"]), len(sides["no"]))
    surplus = max(sides.values(), key=len)
    by_id = sorted(surplus, key=lambda p: hashlib.sha256(p.pair_id.encode()).digest())
    dropped = {p.pair_id for p in by_id[keep:]}
    failures = [{"pair_id": p.pair_id, "image": p.image, "question": p.question, "stage": "balance",
                 "reason": f"yes/no balance: surplus chosen {says(p.chosen)!r}"}
                for p in pairs if p.pair_id in dropped]
    return [p for p in pairs if p.pair_id not in dropped], failures


def reason_kind(reason: str) -> str:
    """``"failed: http 500 after 5 attempts"`` → ``"http 500"``: the reason without its particulars."""
    return reason.removeprefix("failed: ").split(":")[0].split(" after ")[0]


def summarize_rows(num_images: int, rows: list[dict], pairs: list[PreferencePair], failures: list[dict],
                   judge: JudgeSettings) -> dict[str, Any]:  # fmt: skip
    """What every filter kept and dropped, from images to pairs, plus the judge's counts and cost."""
    judged = [JudgeVerdict.from_row(r) for r in rows if r["status"] == OK]
    questions = {(r["image_id"], r["question_index"]): r["status"]
                 for r in rows if r["status"] != IMAGE_ERROR}
    return {
        "images": num_images,
        "image_errors": sum(r["status"] == IMAGE_ERROR for r in rows),
        "questions": len(questions),
        "questions_kept": sum(status != QUESTION_FILTERED for status in questions.values()),
        "answer_pairs_judged": len(judged),
        "pairs": len(pairs),
        "ties": sum(f["reason"] == "tie" for f in failures),
        "failures": dict(Counter(f"{f['stage']}: {reason_kind(f['reason'])}" for f in failures)),
        "judge": summarize(judged, judge),
    }
