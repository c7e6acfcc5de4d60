"""Running a stage as a real Ray job: a loopback head for local runs, submission, status and logs.

The same path a cluster user takes (``ray job submit --working-dir . -- python -m jobs.sft …``), driven
from Python so the pipeline and the tests can use it::

    head = start_local_head(num_cpus=2)            # ray start --head, every port on 127.0.0.1
    try:
        status, logs = submit_job(head.address, "python -m jobs.sft --config …", working_dir=".", timeout=600)
    finally:
        head.stop()

On a real cluster only ``submit_job`` is used, with the dashboard address (e.g. through
``ray dashboard cluster/ray-cluster.yaml`` or ``kubectl port-forward``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.runtime import LOCAL_RAY_ENV, LOOPBACK
from stmed.log import get_logger

log = get_logger("stmed.jobs.submit")

# What never travels with --working-dir: the upload limit is ~500 MB and a .venv alone is several GB.
# cluster/runtime_env.yaml lists the same patterns for `ray job submit --runtime-env`.
EXCLUDES = [".venv", "runs", ".git", "**/__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache"]
JOB_ENV = {"TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# Right after start-up the dashboard may answer before a job agent has registered (ARCHITECTURE.md).
# Retried for at most _STARTUP_S, so that a wrong address fails in a minute, not after the job timeout.
_RETRYABLE = ("No available agent", "Connection refused", "Failed to connect", "Max retries exceeded")
_STARTUP_S = 60.0
# Ray's job client prefers these variables over the address it is given (even an explicit one).
_ADDRESS_VARS = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
_RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    """A TCP port that is free on loopback right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def local_env() -> dict[str, str]:
    """This process's environment plus the loopback-only Ray settings, minus any cluster address."""
    env = {k: v for k, v in os.environ.items() if k not in _ADDRESS_VARS}
    env.update(LOCAL_RAY_ENV)
    return env


@dataclass(frozen=True)
class LocalHead:
    """A Ray head started by ``start_local_head``; ``stop`` ends exactly its processes."""

    temp_dir: Path
    gcs_port: int
    dashboard_port: int
    pgid: int
    """``ray start`` runs in its own session, so the head's daemons share this process group."""

    @property
    def address(self) -> str:
        """The job-submission (dashboard) address."""
        return f"http://{LOOPBACK}:{self.dashboard_port}"

    @property
    def gcs_address(self) -> str:
        return f"{LOOPBACK}:{self.gcs_port}"

    def processes(self) -> list[Any]:
        """The head's live processes: its process group and every descendant (workers, job drivers)."""
        import psutil

        found: dict[int, Any] = {}
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                if os.getpgid(proc.pid) == self.pgid:
                    found[proc.pid] = proc
                    found.update({c.pid: c for c in proc.children(recursive=True)})
        return list(found.values())

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop the head's processes (SIGTERM, then SIGKILL after ``grace_s``) and remove its temp dir.

        Not ``ray stop``: that kills every Ray process of this user on the machine, including other
        sessions' clusters. Same order as ``ray stop`` though: raylet first, GCS last. Terminated all
        at once, the raylet waits out its GCS reconnect timeout (~10 s) before exiting.
        """
        import psutil

        procs = self.processes()
        names = {}
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                names[proc.pid] = proc.name()
        rank = {"raylet": 0, "gcs_server": 2}
        for step in range(3):
            bucket = [p for p in procs if rank.get(names.get(p.pid, ""), 1) == step]
            for proc in bucket:
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.send_signal(signal.SIGTERM)
            _, alive = psutil.wait_procs(bucket, timeout=grace_s)
            for proc in alive:
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.kill()
            psutil.wait_procs(alive, timeout=5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        log.info("stopped the local Ray head at %s (%d processes)", self.address, len(procs))


def start_local_head(num_cpus: int = 2, timeout: float = 120.0) -> LocalHead:
    """``ray start --head`` on 127.0.0.1 with its own ports and temp dir (beside any other local Ray)."""
    # Short: Ray puts Unix sockets under it, and socket paths are limited to ~107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="stmed-ray-", dir="/tmp"))
    gcs_port, dashboard_port = free_port(), free_port()
    cmd = [_RAY, "start", "--head", "--node-ip-address", LOOPBACK, "--port", str(gcs_port),
           "--dashboard-host", LOOPBACK, "--dashboard-port", str(dashboard_port),
           # Defaults are fixed ports (52365, 10001) that another local Ray may hold already.
           "--dashboard-agent-listen-port", str(free_port()), "--ray-client-server-port", str(free_port()),
           "--num-cpus", str(num_cpus), "--temp-dir", str(temp_dir), "--disable-usage-stats"]  # fmt: skip
    proc = subprocess.Popen(
        cmd,
        env=local_env(),
        start_new_session=True,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    head = LocalHead(temp_dir, gcs_port, dashboard_port, pgid=proc.pid)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        head.stop()
        raise RuntimeError(f"`ray start --head` did not finish within {timeout:.0f}s") from None
    if proc.returncode != 0:
        head.stop()
        raise RuntimeError(f"`ray start --head` failed (exit {proc.returncode}):\n{output[-3000:]}")
    log.info("started a local Ray head: jobs at %s, GCS at %s", head.address, head.gcs_address)
    return head


def default_runtime_env(working_dir: str | os.PathLike) -> dict[str, Any]:
    return {"working_dir": str(working_dir), "excludes": list(EXCLUDES), "env_vars": dict(JOB_ENV)}


@contextlib.contextmanager
def _without_address_vars() -> Iterator[None]:
    saved = {k: os.environ.pop(k) for k in _ADDRESS_VARS if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _retryable(err: Exception) -> bool:
    return isinstance(err, ConnectionError) or any(text in str(err) for text in _RETRYABLE)


def _submit(address: str, entrypoint: str, runtime_env: dict[str, Any], deadline: float) -> tuple[Any, str]:
    """Connect and submit, retrying while the head is still coming up; returns (client, submission id)."""
    from ray.job_submission import JobSubmissionClient

    submission_id = f"stmed-{uuid.uuid4().hex[:12]}"  # fixed across retries: a retry never runs it twice
    client = None
    while True:
        try:
            with _without_address_vars():  # the job client would otherwise prefer $RAY_ADDRESS to `address`
                client = JobSubmissionClient(address)
            client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id)
            return client, submission_id
        except (RuntimeError, ConnectionError) as err:
            if client is not None and "already exists" in str(err):
                return client, submission_id  # an earlier attempt got through after all
            if not _retryable(err) or time.monotonic() > deadline:
                raise
            log.info("job server at %s not ready yet (%s); retrying", address, str(err).splitlines()[0][:120])
            time.sleep(1.0)


def submit_job(
    address: str,
    entrypoint: str,
    working_dir: str | os.PathLike,
    timeout: float,
    runtime_env: dict[str, Any] | None = None,
    poll_s: float = 0.25,
    env_vars: dict[str, str] | None = None,
) -> tuple[str, str]:
    """Submit ``entrypoint`` as a Ray job, wait for it to finish, return ``(status, logs)``.

    ``status`` is SUCCEEDED, FAILED or STOPPED, seen within ``poll_s`` of the job's end (a status request
    is one small HTTP call to the job server; polling once a second cost each stage half a second on
    average). ``runtime_env`` replaces the default (working dir with ``EXCLUDES``, ``JOB_ENV``); its
    ``working_dir`` is set to ``working_dir``, and ``env_vars`` are added to its environment. A job still
    running after ``timeout`` seconds is stopped and TimeoutError raised.
    """
    env = dict(runtime_env) if runtime_env is not None else default_runtime_env(working_dir)
    env["working_dir"] = str(working_dir)
    if env_vars:
        env["env_vars"] = {**env.get("env_vars", {}), **env_vars}
    deadline = time.monotonic() + timeout
    client, job_id = _submit(address, entrypoint, env, min(deadline, time.monotonic() + _STARTUP_S))
    log.info("submitted %s to %s: %s", job_id, address, entrypoint)
    while (status := str(client.get_job_status(job_id).value)) not in TERMINAL:
        if time.monotonic() > deadline:
            client.stop_job(job_id)
            raise TimeoutError(
                f"job {job_id} still {status} after {timeout:.0f}s; stopped it. "
                f"Logs so far:\n{client.get_job_logs(job_id)[-3000:]}"
            )
        time.sleep(poll_s)
    logs = client.get_job_logs(job_id)
    log.info("job %s finished: %s", job_id, status)
    return status, logs
