"""Data selection: the preference pairs DPO keeps, by the selector's margin (METHOD §7).

BioMed-VITAL scores every candidate and keeps the top 10 / 40 / 80 / 90% for instruction tuning. For a
preference pair the selector's word is its **margin**: score(chosen) − score(rejected). A wide positive
margin is a pair the selector is sure the judge ordered rightly; a negative one, a pair it would order the
other way. ``selection.keep_fraction`` keeps that share of the pairs, widest margin first; a pair whose
answers could not be rated (an unreadable image) ranks last. The report says what was kept and why.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from stmed.data.records import PreferencePair


def keep_by_margin(pairs: list[PreferencePair], margins: dict[str, float],
                   keep_fraction: float) -> tuple[list[PreferencePair], dict[str, Any]]:  # fmt: skip
    """The ``ceil(keep_fraction * len(pairs))`` pairs of widest margin (by ``pair_id``; file order kept among
    them), and the report."""
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"selection.keep_fraction must be in (0, 1], got {keep_fraction}")
    ranked = sorted(range(len(pairs)), key=lambda i: (-margins.get(pairs[i].pair_id, -math.inf), i))
    count = math.ceil(keep_fraction * len(pairs))
    chosen = set(ranked[:count])
    kept = [p for i, p in enumerate(pairs) if i in chosen]
    dropped = [p for i, p in enumerate(pairs) if i not in chosen]
    return kept, _report(pairs, kept, dropped, margins, keep_fraction)


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _report(pairs: list[PreferencePair], kept: list[PreferencePair], dropped: list[PreferencePair],
            margins: dict[str, float], keep_fraction: float) -> dict[str, Any]:  # fmt: skip
    def margin_of(group: list[PreferencePair]) -> list[float]:
        return [margins[p.pair_id] for p in group if p.pair_id in margins]

    kept_margins = margin_of(kept)
    return {
        "keep_fraction": keep_fraction, "pairs": len(pairs), "kept": len(kept), "dropped": len(dropped),
        "unrated": sum(p.pair_id not in margins for p in pairs),
        "why": "the pairs with the widest selector margin, score(chosen) - score(rejected): those the selector "
               "most agrees the judge ordered rightly",
        "lowest_kept_margin": min(kept_margins) if kept_margins else None,
        "mean_margin": {"kept": _mean(kept_margins), "dropped": _mean(margin_of(dropped))},
        "selector_disagrees": {"kept": sum(m < 0 for m in kept_margins),
                               "dropped": sum(m < 0 for m in margin_of(dropped))},
        "mean_judge_gap": {"kept": _mean([p.chosen_score - p.rejected_score for p in kept]),
                           "dropped": _mean([p.chosen_score - p.rejected_score for p in dropped])},
    }  # fmt: skip
