"""The regression gate between self-training rounds: a round's model is promoted only if it is not worse.

Round r's model is set against round r-1's on a held-out slice that no training and no self-play ever
saw (synthetic phantoms of their own seed). It is promoted when its closed accuracy is not lower by more
than ``closed_margin`` points and the reference judge's win rate of its answers over the previous ones is
at least ``0.5 - win_margin``; otherwise the rounds stop there, and the decision says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stmed.config import ConfigError


@dataclass(frozen=True)
class GateConfig:
    """The regression gate (config group ``gate``)."""

    enabled: bool = True
    images: int = 60
    """Held-out phantoms of the gate slice (5 questions each, 3 of them closed)."""
    closed_margin: float = 2.0
    """Points of closed accuracy a round may lose on the slice and still be promoted."""
    win_margin: float = 0.05
    """The judge's win rate may be this far below 0.5 (a draw) and still promote."""
    test_file: str | None = None
    """The held-out slice, a LLaVA-Med test file; None: synthetic phantoms of the slice's own seed
    (the embedded default). With real data, a split that no training and no self-play ever saw; the
    judge's head-to-head needs the findings only the synthetic slice has, so there closed accuracy alone
    decides."""

    def __post_init__(self) -> None:
        if self.images < 2:
            raise ConfigError(f"gate.images must be >= 2, got {self.images}")
        if self.closed_margin < 0 or not 0 <= self.win_margin < 0.5:
            raise ConfigError("gate.closed_margin must be >= 0 and gate.win_margin in [0, 0.5)")


def decide(
    summary: dict[str, Any], before: str, after: str, benchmark: str, gate: GateConfig
) -> dict[str, Any]:
    """Promote ``after`` over ``before``? From a ``jobs.evaluate`` summary of both on the gate slice."""
    closed = {m: summary["results"][m][benchmark]["closed_accuracy"] for m in (before, after)}
    head = summary.get("judge_preference", {}).get(benchmark, {}).get(f"{after}_vs_{before}", {})
    win_rate = head.get("win_rate")
    delta = closed[after] - closed[before]
    reasons = []
    if delta < -gate.closed_margin:
        reasons.append(f"closed accuracy {closed[before]:.2f} -> {closed[after]:.2f} ({delta:+.2f}) is below the "
                       f"margin of -{gate.closed_margin:g} points")  # fmt: skip
    if win_rate is not None and win_rate < 0.5 - gate.win_margin:
        reasons.append(f"the judge prefers {after} on {win_rate:.2f} of the decided questions, below "
                       f"{0.5 - gate.win_margin:.2f}")  # fmt: skip
    return {
        "before": before,
        "after": after,
        "benchmark": benchmark,
        "promoted": not reasons,
        "closed_before": closed[before],
        "closed_after": closed[after],
        "closed_delta": delta,
        "win_rate": win_rate,
        "wins": head.get("wins"),
        "ties": head.get("ties"),
        "losses": head.get("losses"),
        "reason": "; ".join(reasons) or "not worse than the previous round on the held-out slice",
    }
