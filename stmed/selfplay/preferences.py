"""From self-play rows to preference pairs (METHOD §3): the row schema, resume bookkeeping, assembly.

A generation stream (``actors.generator``, ``actors.vllm_generator``) emits one row per sampled question
(k per image) and one per unreadable image, all with ``OUTPUT_COLUMNS``. ``status`` is ``ok`` for a pair
to judge, else ``image_error``, ``question_filtered`` or ``answer_filtered`` with the ``reason``; the
judge adds its verdict columns to ``ok`` rows. ``pair_id`` identifies a row across reruns.

``jobs.generate`` writes finished rows to ``parts/`` as they arrive (:func:`write_part`); a rerun reads
them back (:func:`read_parts`) and regenerates only what is missing (:func:`plan_resume`). At the end
:func:`assemble` turns the judged rows into ``PreferencePair`` records by the tie policy and every other
row into a failure record with its reason; :func:`summarize_rows` counts both for ``summary.json``.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from stmed.data.records import PreferencePair
from stmed.judge.judging import JudgeSettings, JudgeVerdict, decide, summarize

OK, IMAGE_ERROR = "ok", "image_error"
QUESTION_FILTERED, ANSWER_FILTERED = "question_filtered", "answer_filtered"
INPUT_COLUMNS = ("image_id", "image_path")
OUTPUT_COLUMNS = ("pair_id", "image_id", "image_path", "question_index", "question", "question_seed",
                  "answer1", "answer2", "seed1", "seed2", "image_data_url", "status", "reason")


# ----------------------------------------------------------------------------- the row


def make_pair_id(image_id: str, index: int, question_seed: int) -> str:
    """Stable id of question ``index`` of an image (``index=-1``: the image itself)."""
    return hashlib.sha256(f"{image_id}\x1f{index}\x1f{question_seed}".encode()).hexdigest()[:24]


def make_row(image_id: str, image_path: str, status: str = OK, reason: str = "", index: int = -1,
             question: str = "", question_seed: int = -1, answers: tuple[str, str] = ("", ""),
             seeds: tuple[int, int] = (-1, -1), image_data_url: str = "") -> dict[str, Any]:
    """One output row; the image travels only with ``ok`` rows (the judge needs it, nothing else does)."""
    return {
        "pair_id": make_pair_id(image_id, index, question_seed), "image_id": image_id,
        "image_path": image_path, "question_index": index, "question": question,
        "question_seed": question_seed, "answer1": answers[0], "answer2": answers[1],
        "seed1": seeds[0], "seed2": seeds[1], "image_data_url": image_data_url if status == OK else "",
        "status": status, "reason": reason,
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
        for row in pq.read_table(path).to_pylist():
            rows[row["pair_id"]] = row
    return rows


def _finished(row: dict[str, Any]) -> bool:
    return row["status"] != OK or row.get("error") is None


def plan_resume(images: list[dict], done: dict[str, dict], k: int) -> tuple[list[dict], frozenset[str]]:
    """Images still to generate, and the pair_ids of their rows that are already finished."""
    finished = [row for row in done.values() if _finished(row)]
    per_image = Counter(row["image_id"] for row in finished)
    failed_images = {row["image_id"] for row in finished if row["status"] == IMAGE_ERROR}
    todo = [im for im in images if im["image_id"] not in failed_images and per_image[im["image_id"]] < k]
    pending = {im["image_id"] for im in todo}
    return todo, frozenset(row["pair_id"] for row in finished if row["image_id"] in pending)


# ----------------------------------------------------------------------------- pairs


def assemble(rows: list[dict], judge: JudgeSettings) -> tuple[list[PreferencePair], list[dict]]:
    """Judged rows → preference pairs by the tie policy; everything else → failure records."""
    pairs, failures = [], []
    for row in sorted(rows, key=lambda r: (r["image_id"], r["question_index"])):
        where = {"pair_id": row["pair_id"], "image": row["image_path"], "question": row["question"]}
        if row["status"] != OK:
            failures.append({**where, "stage": row["status"], "reason": row["reason"]})
            continue
        verdict = JudgeVerdict.from_row(row)
        choice, why = decide(verdict, judge.tie_policy, judge.drop_inconsistent)
        if choice is None:
            failures.append({**where, "stage": "judge", "reason": why,
                             "scores": [verdict.score1, verdict.score2]})
            continue
        answers, scores = (row["answer1"], row["answer2"]), (verdict.score1, verdict.score2)
        seeds = (row["seed1"], row["seed2"])
        pairs.append(PreferencePair(
            pair_id=row["pair_id"], image=row["image_path"], question=row["question"],
            chosen=answers[choice], rejected=answers[1 - choice], chosen_score=scores[choice],
            rejected_score=scores[1 - choice], judge_model=verdict.judge_model,
            seeds=[seeds[choice], seeds[1 - choice]], question_seed=row["question_seed"]))
    return pairs, failures


def reason_kind(reason: str) -> str:
    """``"failed: http 500 after 5 attempts"`` → ``"http 500"``: the reason without its particulars."""
    return reason.removeprefix("failed: ").split(":")[0].split(" after ")[0]


def summarize_rows(num_images: int, rows: list[dict], pairs: list[PreferencePair], failures: list[dict],
                   judge: JudgeSettings) -> dict[str, Any]:  # fmt: skip
    """What every filter kept and dropped, from images to pairs, plus the judge's counts and cost."""
    judged = [JudgeVerdict.from_row(r) for r in rows if r["status"] == OK]
    questions = [r for r in rows if r["status"] != IMAGE_ERROR]
    return {
        "images": num_images,
        "image_errors": sum(r["status"] == IMAGE_ERROR for r in rows),
        "questions": len(questions),
        "questions_kept": sum(r["status"] != QUESTION_FILTERED for r in questions),
        "answer_pairs_judged": len(judged),
        "pairs": len(pairs),
        "ties": sum(f["reason"] == "tie" for f in failures),
        "failures": dict(Counter(f"{f['stage']}: {reason_kind(f['reason'])}" for f in failures)),
        "judge": summarize(judged, judge),
    }
