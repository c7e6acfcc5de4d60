"""Score a LLaVA-Med answer file against a benchmark file, as the field's tables do.

    python -m stmed.score --gt benchmarks/vqa_rad/test.json --pred answers.jsonl

Prints one JSON object to stdout: the metrics of ``stmed.eval.metrics.score``, percentages at full
precision (JSON is for programs; tables round). Bad input (a missing or malformed file, ids that do not
line up) is one line on stderr and exit status 2, so a script can tell a failed scoring from a low score.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from stmed.data.records import read_benchmark, read_predictions
from stmed.eval.metrics import score

EXIT_BAD_INPUT = 2


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m stmed.score", description=__doc__.split("\n")[0])
    parser.add_argument("--gt", required=True, help="benchmark file (LLaVA-Med JSON array, e.g. test.json)")
    parser.add_argument("--pred", required=True, help="answer file (JSONL: question_id, text, ...), same order")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        metrics = score(read_benchmark(args.gt), read_predictions(args.pred))
    except (OSError, ValueError) as exc:
        # One line, no traceback: these are the user's files being wrong, not a bug in the scorer.
        message = f"{type(exc).__name__}: {exc}" if isinstance(exc, OSError) else str(exc)
        sys.stderr.write(f"stmed.score: error: {' '.join(message.split())}\n")
        return EXIT_BAD_INPUT
    sys.stdout.write(json.dumps(metrics) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
