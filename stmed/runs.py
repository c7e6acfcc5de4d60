"""A run's output directory: the summary that marks a stage finished, and per-step metrics."""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from pathlib import Path
from typing import Any

from stmed.log import get_logger

log = get_logger(__name__)

SUMMARY = "summary.json"
RUN_FILE = "run.json"
"""A training stage's Ray Train run name, so that a rerun after a crash resumes that run."""


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return value.item()
    return value


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write JSON atomically (temp file + rename), so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_jsonable(data), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def write_summary(output_dir: str | os.PathLike, summary: dict[str, Any]) -> Path:
    """Write ``output_dir/summary.json``: what the stage did, with counts and figures."""
    return write_json(Path(output_dir) / SUMMARY, summary)


def read_summary(output_dir: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(output_dir) / SUMMARY
    return json.loads(path.read_text()) if path.is_file() else None


class MetricsLog:
    """Append-only JSONL of per-step metrics (one object per line, flushed each write)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(_jsonable(record)) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def read_steps(self) -> list[dict[str, Any]]:
        """One row per step, in step order. A training attempt restarted from a checkpoint logs the steps
        after that checkpoint again: the latest row of each step is the one that counts."""
        return sorted({row["step"]: row for row in self.read()}.values(), key=lambda row: row["step"])


def clear_run_logs(output_dir: str | os.PathLike, names: tuple[str, ...]) -> None:
    """Start a fresh run in a used ``output_dir``: drop the old run's appended logs, its summary and its
    fault-injection markers (a resumed run keeps them, to carry on where it stopped)."""
    out = Path(output_dir)
    for name in (*names, SUMMARY):
        (out / name).unlink(missing_ok=True)
    for marker in out.glob(".fault_injected_step*"):
        marker.unlink()


def training_run_name(output_dir: str | os.PathLike, stage: str, requested: str | None,
                      logs: tuple[str, ...]) -> str:  # fmt: skip
    """The Ray Train run name of a training stage in ``output_dir``, recorded in ``run.json``.

    ``requested`` when given. Otherwise the folder's unfinished run (``run.json`` but no summary: its
    driver died), so that a rerun resumes from that run's checkpoints; otherwise a fresh name, and the
    old run's logs go (a finished stage run again starts anew).
    """
    out = Path(output_dir)
    record = out / RUN_FILE
    name = requested
    if name is None and record.is_file() and not (out / SUMMARY).is_file():
        try:
            name = json.loads(record.read_text())["run_name"]
        except (ValueError, KeyError, TypeError):
            name = None
        if name:
            log.info("%s: resuming the unfinished run %s from its checkpoints", out, name)
    if name is None:
        name = f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        clear_run_logs(out, logs)
    write_json(record, {"run_name": name})
    return name
