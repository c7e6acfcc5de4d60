"""Shared fixtures: one loopback Ray per test session, and the path of the shared benchmarks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from jobs.runtime import use_local_ray_env

# Before anything imports Ray: keep every Ray process of the test session on loopback.
use_local_ray_env()

# The tiny models' matrices are too small to gain from a thread pool; on a 2-core machine a second
# thread only contends with Ray's workers (which run single-threaded already).
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
VQA_RAD = SHARED / "benchmarks" / "vqa_rad"


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray with 2 CPUs on 127.0.0.1, shared by every test that asks for it."""
    import ray

    from jobs.runtime import init_ray
    from stmed.config import RayConfig

    init_ray(RayConfig(num_cpus=2))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def vqa_rad_dir() -> Path:
    if not (VQA_RAD / "test.json").is_file():
        pytest.skip(f"VQA-RAD benchmark not found at {VQA_RAD}")
    return VQA_RAD
