"""stmed.eval.gate: a round is promoted only if it is not worse than the previous one, by the margins."""

from __future__ import annotations

import pytest

from stmed.config import ConfigError
from stmed.eval.gate import GateConfig, decide


def _summary(closed_before: float, closed_after: float, wins: int, losses: int) -> dict:
    results = {
        "sft": {"gate": {"closed_accuracy": closed_before}},
        "dpo1": {"gate": {"closed_accuracy": closed_after}},
    }
    win_rate = wins / (wins + losses) if wins + losses else None
    head = {"wins": wins, "ties": 50, "losses": losses, "win_rate": win_rate}
    return {"results": results, "judge_preference": {"gate": {"dpo1_vs_sft": head}}}


def test_a_round_not_worse_is_promoted():
    decision = decide(_summary(60.0, 59.0, 12, 10), "sft", "dpo1", "gate", GateConfig(closed_margin=2.0))
    assert (
        decision["promoted"]
        and decision["closed_delta"] == -1.0
        and decision["win_rate"] == pytest.approx(12 / 22)
    )


def test_a_worse_round_is_stopped_and_the_reason_names_both_figures():
    decision = decide(_summary(60.0, 55.0, 4, 12), "sft", "dpo1", "gate", GateConfig(closed_margin=2.0))
    assert not decision["promoted"]
    assert "60.00 -> 55.00 (-5.00)" in decision["reason"] and "0.25" in decision["reason"]
    assert not decide(_summary(60.0, 61.0, 4, 12), "sft", "dpo1", "gate", GateConfig())[
        "promoted"
    ]  # judge alone


def test_gate_settings_are_checked():
    with pytest.raises(ConfigError, match="gate.win_margin"):
        GateConfig(win_margin=0.6)
    with pytest.raises(ConfigError, match="gate.images"):
        GateConfig(images=1)
