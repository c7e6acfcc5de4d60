"""``python -m stmed.score --gt test.json --pred answers.jsonl``: the scorer (``stmed.eval.score``)."""

import sys

from stmed.eval.score import main

if __name__ == "__main__":
    sys.exit(main())
