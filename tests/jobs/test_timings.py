"""A stage's summary says where its wall time went: the warm-up, the cheapest Ray Train stage (one worker,
two steps of the tiny preset), run through its job's ``main`` on the session's loopback Ray."""

from __future__ import annotations

import pytest

from jobs.warmup import WarmupConfig, main
from stmed.config import build_config
from stmed.runs import PHASES, TIMINGS, MetricsLog, read_summary

pytestmark = pytest.mark.timeout(600)


def test_the_summary_splits_the_wall_time_into_named_phases(ray_session, tmp_path) -> None:
    cfg = build_config(WarmupConfig, {"output_dir": str(tmp_path), "images": 16, "steps": 2,
                                      "ray": {"num_workers": 1, "cpus_per_worker": 1}})  # fmt: skip
    block = main(cfg)[TIMINGS]
    assert read_summary(tmp_path)[TIMINGS] == block
    phases = block["phases_s"]
    # main() called directly (not a submitted job): the clock starts in main, with no submit or import phase.
    assert block["since"] == "main" and "submit_to_start" not in phases and "imports" not in phases
    expected = {"data", "ray_init", "worker_start", "worker_setup", "work", "checkpoints", "export",
                "worker_stop"}  # fmt: skip
    assert set(phases) == expected and set(phases) <= set(PHASES)
    assert all(seconds >= 0 for seconds in phases.values()) and "scaled_by" not in block
    assert sum(phases.values()) <= block["total_s"]
    kinds = [block[k] for k in ("overhead_s", "work_s", "writing_s", "other_s")]
    assert all(seconds >= 0 for seconds in kinds) and sum(kinds) == pytest.approx(block["total_s"], abs=0.005)
    # The work is the steps the loop timed, and the Ray Train worker group's start is fixed overhead.
    steps = MetricsLog(tmp_path / "metrics.jsonl").read_steps()
    assert phases["work"] == pytest.approx(sum(row["step_time_s"] for row in steps), abs=0.002)
    assert block["overhead_s"] >= phases["worker_start"] > 0 and 0 < block["overhead_share"] < 1
