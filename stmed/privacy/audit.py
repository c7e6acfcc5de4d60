"""The audit of what left: one line per image sent to a judge, and the totals for a summary.

A line holds the image id, the pixel digest of what was sent, the destination host, the gate's action
and the number of masked regions, plus how many judge requests carried it; never the recognised text
and never the pixels. ``jobs.generate`` writes ``audit.jsonl`` beside ``failures.jsonl``.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from stmed.privacy.gate import REFUSED


def audit_lines(rows: list[dict[str, Any]], host: str) -> list[dict[str, Any]]:
    """One line per image whose pixels went to ``host``: rows that were judged (a request was sent or a
    cached reply stood for one) grouped by image; refused images are listed with ``sent: false``."""
    lines: dict[str, dict[str, Any]] = {}
    for row in rows:
        action = row.get("gate_action") or ""
        sent = row.get("status") == "ok" and action not in ("", REFUSED) and bool(
            (row.get("attempts") or 0) or row.get("cached"))
        refused = action == REFUSED
        if not sent and not refused:
            continue
        line = lines.setdefault(row["image_id"], {
            "image_id": row["image_id"], "sent": sent, "host": host if sent else "",
            "pixel_digest": row.get("sent_digest") or "", "gate_action": action,
            "masked_regions": int(row.get("gate_regions") or 0), "requests": 0})
        line["requests"] += int(row.get("attempts") or 0)
    return sorted(lines.values(), key=lambda line: line["image_id"])


def audit_totals(lines: list[dict[str, Any]]) -> dict[str, Any]:
    """``{"images_sent", "images_refused", "actions", "masked_regions", "hosts"}`` for summary.json."""
    sent = [line for line in lines if line["sent"]]
    return {"images_sent": len(sent), "images_refused": len(lines) - len(sent),
            "actions": dict(sorted(Counter(line["gate_action"] for line in lines).items())),
            "masked_regions": sum(line["masked_regions"] for line in sent),
            "hosts": dict(sorted(Counter(line["host"] for line in sent).items()))}


def write_audit(path: str | os.PathLike, lines: list[dict[str, Any]]) -> Path:
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(line) + "\n" for line in lines))
    os.replace(tmp, path)
    return path
