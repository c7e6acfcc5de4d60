"""actors.training.run_training: a deterministic data error ends the run after one attempt, in the
driver, while a worker failure is still retried from FailureConfig."""

from __future__ import annotations

from pathlib import Path

import pytest
from ray.train import TrainingFailedError

from actors.training import run_training
from stmed.config import RayConfig
from stmed.data.records import DataError

pytestmark = pytest.mark.timeout(600)


def _unusable_data(config, session) -> None:
    with open(config["attempts"], "a") as f:
        f.write(f"{session.world_rank}\n")
    raise DataError("no usable training samples in instruct.json: 3 skipped: image_missing (3)")


def _flaky_worker(config, session) -> None:
    with open(config["attempts"], "a") as f:
        f.write(f"{session.world_rank}\n")
    raise RuntimeError("worker lost")


def test_a_data_error_is_raised_in_the_driver_without_a_retry(ray_session, tmp_path: Path):
    attempts = tmp_path / "attempts.txt"
    cfg = RayConfig(num_workers=1, cpus_per_worker=1, max_failures=2)
    with pytest.raises(DataError, match="no usable training samples"):
        run_training(_unusable_data, {"attempts": str(attempts)}, cfg, "data-error", tmp_path / "ckpt")
    assert attempts.read_text().splitlines() == ["0"]  # one attempt, not max_failures + 1


def test_a_worker_failure_is_still_retried(ray_session, tmp_path: Path):
    attempts = tmp_path / "attempts.txt"
    cfg = RayConfig(num_workers=1, cpus_per_worker=1, max_failures=1)
    with pytest.raises(TrainingFailedError):
        run_training(_flaky_worker, {"attempts": str(attempts)}, cfg, "flaky", tmp_path / "ckpt")
    assert attempts.read_text().splitlines() == ["0", "0"]
