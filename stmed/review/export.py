"""Clinician labels out of the review database, and back in where training reads them.

``labels.parquet`` / ``labels.jsonl``: one row per decision (``store.label_row``), ``preferred`` in the
judge's terms (chosen / rejected / tie / both_wrong). ``demonstrations.jsonl``: the starred question-answers
(the corrected answer where one was written, else the answer the reviewer preferred), which
``generation.demonstrations`` reads as the questioner's few-shot examples.

``apply_labels`` is what DPO does with them: where reviewers decided a pair, their decision overrides the
judge's — a pair they preferred the other way is swapped, a tie or "both wrong" drops it; a pair with
several reviewers goes by their majority, and a split vote drops it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from stmed.data.records import DataError, PreferencePair

LABEL_FILES = ("labels.parquet", "labels.jsonl", "demonstrations.jsonl")


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_labels(labels: list[dict[str, Any]], out: Path) -> dict[str, Path]:
    """The three files under ``out``; returns their paths by name."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in LABEL_FILES}
    if labels:
        pq.write_table(pa.Table.from_pylist(labels), paths["labels.parquet"].with_suffix(".tmp"))
        os.replace(paths["labels.parquet"].with_suffix(".tmp"), paths["labels.parquet"])
    else:
        paths.pop("labels.parquet")
    _atomic_text(paths["labels.jsonl"], "".join(json.dumps(row) + "\n" for row in labels))
    _atomic_text(paths["demonstrations.jsonl"], "".join(json.dumps(d) + "\n" for d in demonstrations(labels)))
    return paths


def demonstrations(labels: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Starred, well-formed question-answers, one per pair."""
    out, seen = [], set()
    for row in labels:
        if not row["starred"] or row["ill_formed"] or row["pair_id"] in seen:
            continue
        answer = row["corrected"] or {"chosen": row["chosen"], "rejected": row["rejected"]}.get(row["preferred"])
        if answer:
            seen.add(row["pair_id"])
            out.append({"pair_id": row["pair_id"], "image": row["image"], "question": row["question"],
                        "answer": answer})
    return out


def read_labels(path: str | os.PathLike) -> list[dict[str, Any]]:
    """``labels.parquet`` or ``labels.jsonl``; raises ``DataError`` naming what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such labels file (export them with python -m jobs.review export)")
    try:
        if path.suffix == ".parquet":
            rows = pq.read_table(path).to_pylist()
        else:
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (pa.ArrowException, OSError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: not a readable labels file ({type(err).__name__})") from None
    missing = {"pair_id", "preferred"} - set(rows[0]) if rows else set()
    if missing:
        raise DataError(f"{path}: not a labels file, missing columns {sorted(missing)}")
    return rows


def verdicts(labels: list[dict[str, Any]]) -> dict[str, str]:
    """One verdict per pair: the reviewers' majority (chosen / rejected / drop), a split vote drops."""
    votes: dict[str, Counter] = defaultdict(Counter)
    for row in labels:
        votes[row["pair_id"]][row["preferred"] if row["preferred"] in ("chosen", "rejected") else "drop"] += 1
    out = {}
    for pair_id, counted in votes.items():
        (top, n), *rest = counted.most_common()
        out[pair_id] = "drop" if rest and rest[0][1] == n else top
    return out


def apply_labels(pairs: list[PreferencePair], labels: list[dict[str, Any]]) -> tuple[list[PreferencePair],
                                                                                      dict[str, int]]:
    """The pairs with the clinicians' verdicts applied, and the counts for the summary."""
    decided = verdicts(labels)
    kept, counts = [], Counter()
    for pair in pairs:
        verdict = decided.get(pair.pair_id)
        if verdict is None:
            kept.append(pair)
            continue
        counts[{"chosen": "confirmed", "rejected": "swapped", "drop": "dropped"}[verdict]] += 1
        if verdict == "chosen":
            kept.append(pair)
        elif verdict == "rejected":
            kept.append(dataclasses.replace(pair, chosen=pair.rejected, rejected=pair.chosen,
                                            chosen_score=pair.rejected_score, rejected_score=pair.chosen_score,
                                            seeds=list(reversed(pair.seeds))))
    known = {p.pair_id for p in pairs}
    return kept, {"reviewed": sum(counts.values()), **{k: counts[k] for k in ("confirmed", "swapped", "dropped")},
                  "labels_for_other_pairs": sum(pair_id not in known for pair_id in decided)}
