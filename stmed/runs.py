"""A run's output directory: the summary that marks a stage finished, and per-step metrics."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

SUMMARY = "summary.json"


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
