"""Which judged pairs go to clinicians, in what order, and which answer is shown first.

A generate run's ``preferences.parquet`` holds one pair per question with the judge's two scores. The queue
is a sample of them stratified over the judge's margin (chosen minus rejected score, cut at its tertiles)
and the question's kind (closed yes/no or open), an equal share per stratum so that the small-margin
pairs and the rare kind are not drowned by the common ones, interleaved so that a round stopped half-way
is still stratified. With ``least_certain`` the pairs the judge is least sure of come first: those whose
preference flipped when the judge saw the answers in the other order (read from the run's ``parts/``
where it judged both orders), then the smallest margins.

Which answer is shown as A is drawn per pair from the seed and the pair id: random to a reviewer, the
same for every reviewer of the pair, and the same when the queue is drawn again.
"""

from __future__ import annotations

import hashlib
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from stmed.config import ConfigError
from stmed.data.records import PreferencePair, read_preferences
from stmed.selfplay.generation import is_yes_no


@dataclass(frozen=True)
class QueueConfig:
    """How a review round's items are drawn (config group ``queue``)."""

    preferences: str | None = None
    """A generate run's ``preferences.parquet``; its ``parts/`` beside it give swapped-order verdicts."""
    image_root: str | None = None
    """Folder relative image paths in the pairs are under (default: the parquet file's folder)."""
    items: int = 200
    """How many pairs to queue (all of them when the file holds fewer)."""
    reviewers_per_item: int = 1
    """k: how many reviewers decide each item (2 or more gives inter-reviewer agreement)."""
    least_certain: bool = False
    """Queue the pairs the judge is least sure of first (swapped-order flips, then small margins)."""
    margin_bins: int = 3
    """Strata over the judge's margin (quantile cuts)."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.items < 1:
            raise ConfigError(f"queue.items must be >= 1, got {self.items}")
        if self.reviewers_per_item < 1:
            raise ConfigError(f"queue.reviewers_per_item must be >= 1, got {self.reviewers_per_item}")
        if self.margin_bins < 1:
            raise ConfigError(f"queue.margin_bins must be >= 1, got {self.margin_bins}")


def question_kind(question: str) -> str:
    return "closed" if is_yes_no(question) else "open"


def swap_consistency(parts: Path) -> dict[str, bool]:
    """``{pair_id: consistent}`` for the rows a run judged in both orders (empty without ``parts/``)."""
    out: dict[str, bool] = {}
    for path in sorted(parts.glob("part-*.parquet")):
        table = pq.read_table(path)
        if "consistent" not in table.column_names:
            continue
        for pair_id, consistent in zip(table["pair_id"].to_pylist(), table["consistent"].to_pylist()):
            if consistent is not None:
                out[pair_id] = bool(consistent)
    return out


def _cuts(values: list[float], bins: int) -> list[float]:
    ordered = sorted(values)
    return [ordered[min(len(ordered) - 1, (len(ordered) * i) // bins)] for i in range(1, bins)]


def _margin_bin(margin: float, cuts: list[float]) -> int:
    return sum(margin >= cut for cut in cuts)


def _shown_first(seed: int, pair_id: str) -> bool:
    return hashlib.sha256(f"{seed}\x1f{pair_id}".encode()).digest()[0] % 2 == 0


def draw(pairs: list[PreferencePair], cfg: QueueConfig, consistency: dict[str, bool] | None = None,
         image_root: Path | None = None) -> list[dict[str, Any]]:
    """The queue's rows (``store.Item`` fields), in review order."""
    consistency = consistency or {}
    margins = {p.pair_id: p.chosen_score - p.rejected_score for p in pairs}
    cuts = _cuts(list(margins.values()), cfg.margin_bins) if pairs else []
    strata: dict[str, list[PreferencePair]] = defaultdict(list)
    for pair in pairs:
        strata[f"{question_kind(pair.question)}/margin{_margin_bin(margins[pair.pair_id], cuts)}"].append(pair)
    rng = random.Random(cfg.seed)
    for name in sorted(strata):
        rng.shuffle(strata[name])
    picked: list[tuple[str, PreferencePair]] = []
    while len(picked) < min(cfg.items, len(pairs)):  # round-robin: an equal share per stratum
        for name in sorted(strata):
            if strata[name] and len(picked) < cfg.items:
                picked.append((name, strata[name].pop()))
    if cfg.least_certain:
        picked.sort(key=lambda sp: (consistency.get(sp[1].pair_id) is not False, margins[sp[1].pair_id]))
    return [_row(pair, stratum, cfg.seed, consistency.get(pair.pair_id), image_root) for stratum, pair in picked]


def _row(pair: PreferencePair, stratum: str, seed: int, consistent: bool | None,
         image_root: Path | None) -> dict[str, Any]:
    image = Path(pair.image)
    if not image.is_absolute() and image_root is not None:
        image = image_root / image
    return {"pair_id": pair.pair_id, "image": str(image), "question": pair.question, "chosen": pair.chosen,
            "rejected": pair.rejected, "chosen_score": pair.chosen_score, "rejected_score": pair.rejected_score,
            "judge_model": pair.judge_model, "chosen_first": _shown_first(seed, pair.pair_id),
            "kind": question_kind(pair.question), "stratum": stratum, "swap_consistent": consistent}


def draw_from_run(cfg: QueueConfig) -> list[dict[str, Any]]:
    """Read ``cfg.preferences`` (and its run's ``parts/``) and draw the queue."""
    if not cfg.preferences:
        raise ConfigError("queue.preferences: set it to a generate run's preferences.parquet")
    path = Path(cfg.preferences).resolve()
    if not path.is_file():
        raise ConfigError(f"queue.preferences: file not found: {path} (run jobs.generate first)")
    root = Path(cfg.image_root).resolve() if cfg.image_root else path.parent
    return draw(read_preferences(path), cfg, swap_consistency(path.parent / "parts"), root)
