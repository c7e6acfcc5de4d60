"""A real Ray head on loopback, real job submissions: the `ray job submit` CLI once, then jobs.submit.

The head is started with ``ray start --head`` in its own session, on its own ports and temp dir, so it
lives beside the test session's in-process Ray (the ``ray_session`` fixture) without touching it, and is
stopped by process group — never ``ray stop``, which would kill every Ray on the machine.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from jobs.submit import LocalHead, local_env, start_local_head, submit_job

REPO = Path(__file__).resolve().parents[2]
LOOPBACK_IPS = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}
# Runs inside the job: what the job saw, as one JSON line after a marker.
PROBE = (
    "import json, os, stmed, jobs; print('PROBE ' + json.dumps({'files': sorted(os.listdir('.')), "
    "'stmed': stmed.__file__, 'cwd': os.getcwd(), 'tok': os.environ.get('TOKENIZERS_PARALLELISM')}))"
)


@pytest.fixture(scope="module")
def head() -> LocalHead:
    head = start_local_head(num_cpus=2)
    try:
        yield head
    finally:
        head.stop()
    assert head.processes() == [], "processes of the head outlived stop()"
    assert not head.temp_dir.exists()


def _probe(logs: str) -> dict[str, Any]:
    line = next(line for line in logs.splitlines() if line.startswith("PROBE "))
    return json.loads(line.removeprefix("PROBE "))


def _check_shipped_tree(seen: dict[str, Any], head: LocalHead) -> None:
    """The job ran in Ray's unpacked copy of the checkout, without the heavy or private folders."""
    assert {"stmed", "jobs", "actors", "cluster", "pyproject.toml"} <= set(seen["files"])
    assert not {".venv", ".git", "runs"} & set(seen["files"]), seen["files"]
    assert Path(seen["cwd"]).is_relative_to(head.temp_dir), "not the uploaded working dir"
    assert Path(seen["stmed"]).is_relative_to(seen["cwd"]), "stmed imported from the checkout, not the upload"
    assert seen["tok"] == "false", "runtime env vars did not reach the job"


def test_head_listens_on_loopback_only(head: LocalHead) -> None:
    import psutil

    listening = []
    for proc in head.processes():
        with contextlib.suppress(psutil.NoSuchProcess):  # a worker may exit between listing and inspection
            listening += [c.laddr for c in proc.net_connections("inet") if c.status == "LISTEN"]
    ports = {addr.port for addr in listening}
    assert {head.gcs_port, head.dashboard_port} <= ports
    assert {addr.ip for addr in listening} <= LOOPBACK_IPS, listening


def test_ray_job_submit_cli_with_the_cluster_runtime_env(head: LocalHead) -> None:
    # Ray's own defaults (.git/.venv excluded, .gitignore honoured) are switched off: only
    # cluster/runtime_env.yaml keeps the 2 GB .venv out of the upload here.
    env = {
        **local_env(),
        "RAY_RUNTIME_ENV_IGNORE_GITIGNORE": "1",
        "RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES": "",
    }
    cmd = [str(Path(sys.executable).with_name("ray")), "job", "submit", "--address", head.address,
           "--runtime-env", str(REPO / "cluster" / "runtime_env.yaml"), "--working-dir", str(REPO),
           "--", "python", "-c", PROBE]  # fmt: skip
    deadline = time.monotonic() + 120
    while True:  # right after start-up the job server may not have an agent yet
        done = subprocess.run(
            cmd, check=False, env=env, cwd=REPO, capture_output=True, text=True, timeout=180
        )
        output = done.stdout + done.stderr
        if "No available agent" not in output or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert done.returncode == 0 and "' succeeded" in output, output[-3000:]
    _check_shipped_tree(_probe(done.stdout), head)


def test_submit_job_runs_a_job_and_returns_its_logs(
    head: LocalHead, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ray's job client prefers $RAY_ADDRESS to the address it is given; submit_job must not.
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")
    out = tmp_path / "result.json"
    code = (
        PROBE + "; from stmed.config import RayConfig; import pathlib; "
        f"pathlib.Path({str(out)!r}).write_text(json.dumps({{'workers': RayConfig(num_workers=3).num_workers}}))"
    )
    status, logs = submit_job(head.address, f'python -c "{code}"', working_dir=REPO, timeout=180)
    assert status == "SUCCEEDED", logs[-3000:]
    _check_shipped_tree(_probe(logs), head)
    assert json.loads(out.read_text()) == {"workers": 3}


def test_submit_job_reports_a_failing_job(head: LocalHead) -> None:
    status, logs = submit_job(
        head.address,
        "python -c \"import sys; print('stage broke'); sys.exit(3)\"",
        working_dir=REPO,
        timeout=180,
    )
    assert status == "FAILED"
    assert "stage broke" in logs


def test_submit_job_stops_a_job_that_outlives_its_timeout(
    head: LocalHead, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ray.job_submission import JobSubmissionClient

    for name in (
        "RAY_ADDRESS",
        "RAY_API_SERVER_ADDRESS",
    ):  # the client below would prefer them to head.address
        monkeypatch.delenv(name, raising=False)

    with pytest.raises(TimeoutError, match="stopped it") as info:
        submit_job(
            head.address, 'python -c "import time; time.sleep(300)"', working_dir=REPO / "cluster", timeout=8
        )
    job_id = str(info.value).split()[1]
    client = JobSubmissionClient(head.address)
    deadline = time.monotonic() + 30
    while (status := client.get_job_status(job_id).value) != "STOPPED" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert status == "STOPPED"
