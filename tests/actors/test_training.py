"""actors.training.run_training: a deterministic data error ends the run after one attempt, in the
driver (a worker failure is still retried from FailureConfig: tests/jobs/test_sft.py injects one)."""

from __future__ import annotations

from pathlib import Path

import pytest

from actors.training import run_training
from stmed.config import RayConfig
from stmed.data.records import DataError

pytestmark = pytest.mark.timeout(600)


def _unusable_data(config, session) -> None:
    with open(config["attempts"], "a") as f:
        f.write(f"{session.world_rank}\n")
    raise DataError("no usable training samples in instruct.json: 3 skipped: image_missing (3)")


def test_a_data_error_is_raised_in_the_driver_without_a_retry(ray_session, tmp_path: Path):
    attempts = tmp_path / "attempts.txt"
    cfg = RayConfig(num_workers=1, cpus_per_worker=1, max_failures=2)
    with pytest.raises(DataError, match="no usable training samples"):
        run_training(_unusable_data, {"attempts": str(attempts)}, cfg, "data-error", tmp_path / "ckpt")
    assert attempts.read_text().splitlines() == ["0"]  # one attempt, not max_failures + 1
