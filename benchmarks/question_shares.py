"""The share of well-formed questions in generate runs, e.g. with and without ``generation.demonstrations``.

    .venv/bin/python benchmarks/question_shares.py runs/x/gen-plain runs/x/gen-demos

Reads every question row of each run's ``parts/`` (kept or filtered) and prints one JSON line a run:
questions sampled, well-formed ones (not empty, too short, repetitive or without a ``?``:
``stmed.selfplay.generation.question_reason``) and their share, the filter reasons, questions kept, distinct
kept questions, questions that repeat a demonstration shown for their image (dropped as duplicates), and
the run's preference pairs. Compare runs made on the same images and seeds (docs/review.md).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

from stmed.selfplay.generation import GenerationSettings, demonstrations_for, normalize_text

MALFORMED = ("empty", "too_short", "repetitive", "not_a_question")


def shares(run: Path) -> dict:
    rows = [r for p in sorted((run / "parts").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    questions = {(r["image_id"], r["question_index"]): (r["reason"] if r["status"] == "question_filtered" else "",
                                                        r["question"])
                 for r in rows if r["status"] != "image_error"}
    reasons = Counter(reason for reason, _ in questions.values())
    n, malformed = len(questions), sum(reasons[k] for k in MALFORMED)
    fingerprint = json.loads((run / "fingerprint.json").read_text())
    copies = 0
    if fingerprint.get("generation.demonstrations"):
        settings = GenerationSettings(seed=fingerprint["generation.seed"],
                                      demonstrations=fingerprint["generation.demonstrations"],
                                      demonstrations_k=fingerprint["generation.demonstrations_k"])
        for (image_id, _), (_, question) in questions.items():
            shown = {normalize_text(q) for q, _ in demonstrations_for(settings, image_id)}
            copies += normalize_text(question) in shown
    summary = json.loads((run / "summary.json").read_text())
    return {"run": str(run), "demonstrations": fingerprint.get("generation.demonstrations"), "questions": n,
            "well_formed": n - malformed, "well_formed_share": round((n - malformed) / n, 3) if n else None,
            "reasons": {k or "kept": v for k, v in sorted(reasons.items())}, "kept": summary["questions_kept"],
            "distinct_kept": len({normalize_text(q) for reason, q in questions.values() if not reason}),
            "demonstration_copies": copies, "pairs": summary["pairs"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="generate output_dirs")
    for run in parser.parse_args().runs:
        print(json.dumps(shares(run)))


if __name__ == "__main__":
    main()
