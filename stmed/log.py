"""One logger for the project, quiet on every Ray Train worker but rank 0."""

from __future__ import annotations

import logging
import os
import sys

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def get_logger(name: str = "stmed") -> logging.Logger:
    """A logger under the ``stmed`` namespace; non-zero ranks only log warnings and above."""
    root = logging.getLogger("stmed")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        root.addHandler(handler)
        root.propagate = False
        rank = int(os.environ.get("RANK", "0") or 0)
        root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    return root if name == "stmed" else root.getChild(name.removeprefix("stmed."))
