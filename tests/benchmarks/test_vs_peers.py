"""The peer benchmark's arithmetic: which steps are timed, how rounds become a figure, who runs first."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import vs_peers as vp


def test_steady_rate_times_the_steps_between_the_first_and_the_last() -> None:
    # Steps end at 1, 2, 4 and 7 s: step 1 (allocations) and step 4 (a checkpoint) are not counted,
    # steps 2 and 3 processed 3 + 6 units in 4 - 1 = 3 wall seconds and 2.0 - 0.5 = 1.5 CPU seconds.
    ticks = [(1.0, 0.5), (2.0, 1.0), (4.0, 2.0), (7.0, 5.0)]
    wall, cpu = vp.steady_rate(ticks, [100, 3, 6, 100])
    assert wall == pytest.approx(3.0)
    assert cpu == pytest.approx(6.0)


def test_steady_rate_needs_a_timed_step_and_one_count_per_step() -> None:
    with pytest.raises(ValueError, match=">= 3 steps"):
        vp.steady_rate([(0.0, 0.0), (1.0, 1.0)], [1, 1])
    with pytest.raises(ValueError, match="one unit count each"):
        vp.steady_rate([(0.0, 0.0), (1.0, 1.0), (2.0, 2.0)], [1, 1])


def test_figure_takes_each_ratio_within_its_round() -> None:
    ours = [vp.Run(10.0, 5.0, {"tokens_per_pair": 90}), vp.Run(4.0, 4.0, {"tokens_per_pair": 90}),
            vp.Run(9.0, 3.0, {"tokens_per_pair": 90})]  # fmt: skip
    peer = [vp.Run(5.0, 5.0, {"tokens_per_pair": 180}), vp.Run(4.0, 2.0, {"tokens_per_pair": 180}),
            vp.Run(3.0, 3.0, {"tokens_per_pair": 180})]  # fmt: skip
    f = vp.figure(ours, peer, "pairs", "trl")
    # Round ratios 2, 1, 3: median 2 (not median(ours) / median(peer) = 9 / 4); CPU ratios 1, 2, 1.
    assert (f["median"], f["min"], f["max"]) == (2.0, 1.0, 3.0)
    assert (f["cpu_median"], f["cpu_min"], f["cpu_max"]) == (1.0, 1.0, 2.0)
    assert (f["stmed_pairs_per_s"], f["trl_pairs_per_s"], f["rounds"]) == (9.0, 4.0, 3)
    assert (f["stmed_tokens_per_pair"], f["trl_tokens_per_pair"]) == (90, 180)
    with pytest.raises(ValueError, match="one run of each side per round"):
        vp.figure(ours, peer[:2], "pairs", "trl")


def test_in_turn_alternates_which_side_runs_first() -> None:
    order: list[str] = []

    def side(name: str):
        return lambda: order.append(name) or name

    assert vp.in_turn(0, side("stmed"), side("peer")) == ("stmed", "peer")
    assert vp.in_turn(1, side("stmed"), side("peer")) == ("stmed", "peer")
    assert order == ["stmed", "peer", "peer", "stmed"]


def test_plan_order_gives_each_pair_once_per_epoch_in_the_loops_order() -> None:
    keys = vp.plan_order(8, batch=2, steps=4, seed=3)
    plan = vp.StepPlan(8, rank=0, world_size=1, micro_batch_size=2, grad_accum_steps=1, seed=3)
    assert keys == [key for micro in plan.micro_batches(0, 4) for key in micro]
    assert sorted(index for _, index in keys) == list(range(8))
    assert {epoch for epoch, _ in keys} == {0}


def test_the_llava_shape_is_built_in_code_without_the_fixtures(tmp_path, monkeypatch) -> None:
    """Without ../shared the llava-1.5 shape comes from a config in code: still 576 image tokens."""
    import tests.checkpoints
    from stmed.config import ModelConfig
    from stmed.model.build import image_seq_len, load_model

    monkeypatch.setattr(tests.checkpoints, "LLAVA_HF", tmp_path / "absent")
    note = vp.build_llava15(tmp_path / "model")
    assert "tiny tokenizer" in note
    model, processor = load_model(ModelConfig(name_or_path=str(tmp_path / "model")))
    assert image_seq_len(processor) == 576
    assert model.config.text_config.vocab_size == 32064
