"""A training stage whose driver was killed resumes from its folder's checkpoints when run again.

The driver (``python -m jobs.sft``, its own local Ray) is SIGKILLed, process group and all, once a
checkpoint is on disk; the same command run again continues that Ray Train run from the checkpoint
instead of starting at step 0.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs.sft import SFTConfig, main
from stmed.config import build_config, read_yaml
from stmed.runs import MetricsLog

REPO = Path(__file__).resolve().parents[2]
LOCAL = REPO / "jobs" / "configs" / "local" / "sft.yaml"
pytestmark = pytest.mark.timeout(900)


def test_a_rerun_after_the_driver_was_killed_resumes_from_the_checkpoint(ray_session, tmp_path: Path):
    out = tmp_path / "sft"
    overrides = [f"output_dir={out}", "data.synthetic_images=30", "train.max_steps=40",
                 "train.micro_batch_size=2", "train.grad_accum_steps=1", "train.global_batch_size=4",
                 "train.checkpoint_every=10", "train.log_every=10"]  # fmt: skip
    driver = subprocess.Popen(
        [sys.executable, "-m", "jobs.sft", "--config", str(LOCAL), *overrides],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and driver.poll() is None:
            steps = (
                [r["step"] for r in MetricsLog(out / "metrics.jsonl").read()]
                if (out / "metrics.jsonl").is_file()
                else []
            )
            if steps and max(steps) >= 13:
                break
            time.sleep(0.2)
        assert driver.poll() is None, "the run ended before it could be killed"
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    killed_at = max(r["step"] for r in MetricsLog(out / "metrics.jsonl").read())
    assert not (out / "summary.json").exists() and 13 <= killed_at < 40
    name = json.loads((out / "run.json").read_text())["run_name"]

    summary = main(build_config(SFTConfig, read_yaml(LOCAL), overrides))
    assert summary["run_name"] == name
    attempts = MetricsLog(out / "attempts.jsonl").read()
    assert attempts[0]["start_step"] == 0 and attempts[-1]["start_step"] >= 10  # not step 0 again
    assert summary["steps"] == summary["total_steps"] == 40
    steps = [r["step"] for r in MetricsLog(out / "metrics.jsonl").read()]
    assert sorted(set(steps)) == list(range(1, 41))
