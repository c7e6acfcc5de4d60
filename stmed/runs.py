"""A run's output directory: the summary that marks a stage finished, per-step metrics, and where a
stage's wall time went (the summary's ``timings`` block)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from stmed.log import get_logger

log = get_logger(__name__)

SUMMARY = "summary.json"
RUN_FILE = "run.json"
"""A training stage's Ray Train run name, so that a rerun after a crash resumes that run."""


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return value.item()
    return value


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write JSON atomically (temp file + rename), so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_jsonable(data), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def write_summary(output_dir: str | os.PathLike, summary: dict[str, Any]) -> Path:
    """Write ``output_dir/summary.json``: what the stage did, with counts and figures."""
    return write_json(Path(output_dir) / SUMMARY, summary)


def read_summary(output_dir: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(output_dir) / SUMMARY
    return json.loads(path.read_text()) if path.is_file() else None


class MetricsLog:
    """Append-only JSONL of per-step metrics (one object per line, flushed each write).

    A process killed mid-write leaves a torn last line. The next writer starts on a fresh line, and the
    reader skips a line that is not a JSON object (with a warning), so a torn line never wedges a stage:
    the rows around it are read, and a rerun that appends after it completes.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(_jsonable(record)) + "\n"
        with self.path.open("a+b") as fh:
            if fh.tell() > 0:
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":  # a torn last line: close it, so this row is a line of its own
                    line = "\n" + line
            fh.write(line.encode())

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        rows, torn = [], []
        for number, line in enumerate(self.path.read_text(errors="replace").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (ValueError, RecursionError):
                row = None
            if isinstance(row, dict):
                rows.append(row)
            else:
                torn.append(number)
        if torn:
            log.warning("%s: skipped %d line(s) that are not a JSON object (a torn write?): line(s) %s",
                        self.path, len(torn), torn[:5])
        return rows

    def read_steps(self) -> list[dict[str, Any]]:
        """One row per step, in step order. A training attempt restarted from a checkpoint logs the steps
        after that checkpoint again: the latest row of each step is the one that counts."""
        rows = [row for row in self.read() if isinstance(row.get("step"), int)]
        return sorted({row["step"]: row for row in rows}.values(), key=lambda row: row["step"])


class OutputDirError(ValueError):
    """An ``output_dir`` a stage may not write into; jobs report it as one line and exit 2."""


OWNER_FILE = ".stmed-outputs.json"
"""Written into a stage's ``output_dir`` before anything else: the stage, and the names of the files and
folders it writes there. A name is listed only when nothing held it at the first claim, so whatever is
there later is stmed's: the only files a stage ever deletes or overwrites."""
TRAINING_OUTPUTS = ("config.yaml", RUN_FILE, SUMMARY, "metrics.jsonl", "attempts.jsonl", "data_report.json",
                    "adapter", "merged", "checkpoints", "fingerprint.json")
"""What a training stage (``jobs.sft``, ``jobs.dpo``, ``jobs.warmup``) writes in its ``output_dir``."""


def _owned(out: Path) -> tuple[str | None, set[str]]:
    """(stage, names) of the folder's ``OWNER_FILE``; (None, empty) when it has none or it is unreadable."""
    try:
        record = json.loads((out / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return None, set()
    if not isinstance(record, dict) or not isinstance(record.get("files"), list):
        return None, set()
    return str(record.get("stage")), {str(name) for name in record["files"]}


def claim_output_dir(output_dir: str | os.PathLike, stage: str, names: tuple[str, ...]) -> Path:
    """Make ``output_dir`` this stage's before writing anything there, or refuse with one line and leave
    it untouched: a folder of another stage, or one where any of ``names`` exists that stmed cannot prove
    it wrote (a user's folder, an older run without the record). An empty or new folder is claimed."""
    out = Path(output_dir)
    owner, owned = _owned(out)
    if owner is not None and owner != stage:
        raise OutputDirError(f"output_dir: {out} holds the outputs of stage {owner!r}, not {stage!r}; "
                          f"give {stage} its own output_dir")
    foreign = sorted(name for name in names if (out / name).exists() and name not in owned)
    if foreign:
        raise OutputDirError(f"output_dir: {out} holds {', '.join(foreign[:4])} that stmed did not write "
                          f"(no {OWNER_FILE} lists them), and {stage} would replace them; nothing was "
                          "changed: use a new or empty output_dir")
    write_json(out / OWNER_FILE, {"stage": stage, "files": sorted(owned | set(names))})
    return out


FINGERPRINT_FILE = "fingerprint.json"
"""What made a resumable stage's rows (model, judge, data, the settings that change rows), as flat
``key: value`` pairs: a rerun under another fingerprint must not add its rows to these."""
_SAMPLE = 1 << 20


def _file_digest(path: Path, h: Any) -> None:
    """Size, then the whole file when small, else 16 evenly spaced 1 MiB samples: a changed checkpoint
    (a merged LoRA touches every layer) differs in them, and a 15 GB model is read in 16 MiB."""
    size = path.stat().st_size
    h.update(f"{path.name}:{size}:".encode())
    with path.open("rb") as fh:
        if size <= 16 * _SAMPLE:
            h.update(fh.read())
            return
        for i in range(16):
            fh.seek((size - _SAMPLE) * i // 15)
            h.update(fh.read(_SAMPLE))


def content_digest(path: str | os.PathLike | None, folder_listing_only: bool = False) -> str | None:
    """A cheap content identity of a file or a folder (every file under it, by relative path), or None
    when ``path`` is not on this machine (a hub id). ``folder_listing_only``: a folder's names and sizes
    only (an image folder of thousands of files)."""
    if path is None or not Path(path).exists():
        return None
    root, h = Path(path), hashlib.sha256()
    if root.is_file():
        _file_digest(root, h)
        return h.hexdigest()[:16]
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = file.relative_to(root).as_posix()
        if folder_listing_only:
            h.update(f"{relative}:{file.stat().st_size}\n".encode())
        else:
            h.update(relative.encode())
            _file_digest(file, h)
    return h.hexdigest()[:16]


def fingerprint_changes(output_dir: str | os.PathLike, fingerprint: dict[str, Any]) -> list[str] | None:
    """``"key was A, now B"`` for each key whose value differs from the folder's ``FINGERPRINT_FILE`` (an
    empty list: the same); None when the folder has none."""
    path = Path(output_dir) / FINGERPRINT_FILE
    if not path.is_file():
        return None
    try:
        before = json.loads(path.read_text())
    except ValueError:
        before = {}
    before = before if isinstance(before, dict) else {}
    now = _jsonable(fingerprint)
    return [f"{key} was {before.get(key)!r}, now {now.get(key)!r}" for key in sorted(set(before) | set(now))
            if before.get(key) != now.get(key)]


def write_fingerprint(output_dir: str | os.PathLike, fingerprint: dict[str, Any]) -> Path:
    return write_json(Path(output_dir) / FINGERPRINT_FILE, fingerprint)


def clear_run_logs(output_dir: str | os.PathLike, names: tuple[str, ...]) -> None:
    """Start a fresh run in a used ``output_dir``: drop the old run's appended logs, its summary and its
    fault-injection markers (a resumed run keeps them, to carry on where it stopped). Only files the
    folder's ``OWNER_FILE`` lists are deleted (``claim_output_dir``); any other is left alone."""
    out = Path(output_dir)
    _, owned = _owned(out)
    for name in (*names, SUMMARY):
        if name in owned:
            (out / name).unlink(missing_ok=True)
        elif (out / name).exists():
            log.warning("%s: not deleting %s, which stmed did not write here", out, name)
    if owned:
        for marker in out.glob(".fault_injected_step*"):
            marker.unlink()


RESUME_NEUTRAL = frozenset({"train.log_every", "train.checkpoint_every", "output_dir"})
"""Training settings a resumed run may change: when it reports and saves, not what it learns."""


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def training_fingerprint(loop_config: dict[str, Any]) -> dict[str, Any]:
    """What a training run learns from, for a resume to check: its loop's settings (flattened), a content
    digest of the start model (``model.content``) and of each input file (``<key>.content`` for the loop's
    ``*_path`` keys: the instruct file, the preference pairs)."""
    out = {k: v for k, v in _flat(loop_config).items() if k not in RESUME_NEUTRAL}
    model = loop_config.get("model") or {}
    out["model.content"] = content_digest(model.get("name_or_path"))
    for key, value in loop_config.items():
        if key.endswith("_path") and isinstance(value, str):
            out[f"{key}.content"] = content_digest(value)
    return out


def training_run_name(output_dir: str | os.PathLike, stage: str, requested: str | None,
                      logs: tuple[str, ...], fingerprint: dict[str, Any] | None = None) -> str:  # fmt: skip
    """The Ray Train run name of a training stage in ``output_dir``, recorded in ``run.json``.

    ``requested`` when given. Otherwise the folder's unfinished run (``run.json`` but no summary: its
    driver died), so that a rerun resumes from that run's checkpoints; otherwise a fresh name, and the
    old run's logs go (a finished stage run again starts anew). With a ``fingerprint``
    (``training_fingerprint``), resuming under another one is refused, naming the keys that changed.
    """
    out = Path(output_dir)
    record = out / RUN_FILE
    name = requested
    if name is None and record.is_file() and not (out / SUMMARY).is_file():
        try:
            name = json.loads(record.read_text())["run_name"]
        except (ValueError, KeyError, TypeError):
            name = None
        if name:
            changes = fingerprint_changes(out, fingerprint) if fingerprint is not None else None
            if changes:
                raise OutputDirError(f"{out} holds the unfinished run {name}, made under other settings: "
                                     f"{', '.join(changes)}; rerun with those settings to resume it, or "
                                     f"use a new output_dir (or delete {record} to start afresh here)")
            log.info("%s: resuming the unfinished run %s from its checkpoints", out, name)
    if name is None:
        name = f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        clear_run_logs(out, logs)
    if fingerprint is not None:
        write_fingerprint(out, fingerprint)
    write_json(record, {"run_name": name})
    return name


# ----------------------------------------------------------------------------- where the time goes

TIMINGS = "timings"
SUBMITTED_AT_ENV = "STMED_SUBMITTED_AT"
"""Set by the submitter on a stage's job (``jobs.pipeline``): when it called submit, as ``time.time()``."""
OVERHEAD, WORK, WRITING = "overhead", "work", "writing"
PHASES: dict[str, tuple[str, str]] = {
    "submit_to_start": (OVERHEAD, ("the submitter's submit call (working-dir packaging and upload, the job's "
                                  "runtime env) until the job's process started")),
    "imports": (OVERHEAD, "the job's process start until its main(): interpreter start-up, imports, config"),
    "ray_init": (OVERHEAD, "connecting to Ray"),
    "model_load": (OVERHEAD, "a model or processor loaded in the job's own process"),
    "worker_start": (OVERHEAD, ("Ray Train: trainer.fit() until rank 0's training loop started (a failed "
                               "attempt before the last included)")),
    "worker_setup": (OVERHEAD, ("Ray Train, rank 0: the loop's start until its first step: model, processor "
                               "and data load, optimiser, resume")),
    "worker_stop": (OVERHEAD, "Ray Train: the loop's end until trainer.fit() returned"),
    "pool_start": (OVERHEAD, ("Ray Data: each pass's start until the first model actor of its pool was built "
                             "(actor process start, imports, model load); the other actors' builds overlap "
                             "the work")),
    "judge_start": (OVERHEAD, "starting the offline reference judge's server"),
    "serve_start": (OVERHEAD, "Serve's controller and HTTP proxy started"),
    "deploy": (OVERHEAD, "the application deployed until healthy: replica start and its model load"),
    "exit": (OVERHEAD, ("the job's summary written until the submitter saw the job end and fetched its log "
                       "(process exit, Ray disconnect, status polling)")),
    "data": (WORK, "making or reading the stage's own data in the job's process (warm-up phantoms, checks)"),
    "contamination": (WORK, "self-play: hashing the pool against the benchmarks' images, copies removed"),
    "judge_batch": (WORK, "self-play, judge.mode=batch: the Batch API jobs after generation (upload, wait, results)"),
    "work": (WORK, ("Ray Train: the steps (and DPO's reference pass); Ray Data: the rest of each pass "
                   "(generation, judging, answering)")),
    "checkpoints": (WRITING, ("Ray Train, rank 0: ready to step until the last report, outside the steps "
                             "(checkpoints, reports and their wait for the controller's poll, metrics)")),
    "export": (WRITING, ("Ray Train, rank 0: the last report until the loop returned (adapter and merged "
                         "export)")),
    "writing": (WRITING, "the job's output files and scores after the work"),
}
"""Every phase a ``timings`` block may hold: its kind (fixed overhead, work, writing) and what it measures.
The rest of a stage's wall time (config and data checks, anything unnamed) is the block's ``other_s``."""


def process_start_time() -> float | None:
    """When this process started (``time.time()`` scale), or None where that cannot be read."""
    try:
        import psutil  # with Ray; stmed itself does not need it
    except ImportError:
        return None
    return psutil.Process().create_time()


def submitted_at() -> float | None:
    """When the submitter submitted this process's job (``SUBMITTED_AT_ENV``), or None."""
    value = os.environ.get(SUBMITTED_AT_ENV)
    try:
        return float(value) if value else None
    except ValueError:
        return None


def timing_block(phases: dict[str, float], total_s: float, since: str, ended_at: float) -> dict[str, Any]:
    """A summary's ``timings``: ``total_s`` (wall time since ``since``), each phase's seconds, their sums by
    kind, ``other_s`` (the rest), and ``overhead_share`` (fixed overhead / total).

    Phases stamped in several processes may overlap the total by a clock's disagreement; then every phase
    is scaled down to fit, and ``scaled_by`` says by how much."""
    unknown = sorted(set(phases) - set(PHASES))
    assert not unknown, f"timing phases {unknown} are not in PHASES"
    phases = {name: max(0.0, seconds) for name, seconds in phases.items()}
    total_s = max(0.0, total_s)
    # Stamps from several processes (or clocks) can disagree a little: phases never add up past the total.
    scale = min(1.0, total_s / sum(phases.values())) if sum(phases.values()) > 0 else 1.0
    # Milliseconds, phases rounded down: their sum stays within the (rounded) total.
    phases = {name: math.floor(seconds * scale * 1000) / 1000 for name, seconds in phases.items()}
    by_kind = {kind: round(sum(s for name, s in phases.items() if PHASES[name][0] == kind), 3)
               for kind in (OVERHEAD, WORK, WRITING)}  # fmt: skip
    total_s = round(total_s, 3)
    block = {
        "since": since, "ended_at": ended_at, "total_s": total_s, "phases_s": phases,
        "overhead_s": by_kind[OVERHEAD], "work_s": by_kind[WORK], "writing_s": by_kind[WRITING],
        "other_s": round(max(0.0, total_s - sum(by_kind.values())), 3),
        "overhead_share": round(by_kind[OVERHEAD] / total_s, 4) if total_s > 0 else None,
    }  # fmt: skip
    return {**block, "scaled_by": round(scale, 4)} if scale < 0.9999 else block


class StageClock:
    """A stage's phases as it runs, for its summary's ``timings`` block.

    ``job=True`` (the process is the stage's job, started by ``jobs.runtime.run_job``): the block starts at
    the job's submission (``SUBMITTED_AT_ENV``) or else at the process's start, and holds the submission
    and import phases. Otherwise (a test calling ``main`` directly) it starts when the clock was made.
    """

    def __init__(self, job: bool = False) -> None:
        self.created_at = time.time()
        self.process_start = process_start_time() if job else None
        self.submitted_at = submitted_at() if job else None
        self.phases: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as ``name`` (added to what that phase already holds)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        if name not in PHASES:
            raise ValueError(f"unknown timing phase {name!r}; phases are {sorted(PHASES)}")
        self.phases[name] = self.phases.get(name, 0.0) + max(0.0, seconds)

    def add_all(self, phases: dict[str, float]) -> None:
        for name, seconds in phases.items():
            self.add(name, seconds)

    def block(self) -> dict[str, Any]:
        """The ``timings`` block, as of now."""
        now = time.time()
        started = {}
        if self.process_start is not None:
            if self.submitted_at is not None:
                started["submit_to_start"] = self.process_start - self.submitted_at
            started["imports"] = self.created_at - self.process_start
        since = ("submit" if self.submitted_at is not None else
                 "process_start" if self.process_start is not None else "main")  # fmt: skip
        start = {"submit": self.submitted_at, "process_start": self.process_start}.get(since)
        start = start if start is not None else self.created_at
        return timing_block({**started, **self.phases}, now - start, since, now)


def training_phases(fit_start: float, fit_end: float, worker: dict[str, float], ready_at: float,
                    step_s: float, precompute_s: float = 0.0) -> dict[str, float]:  # fmt: skip
    """A Ray Train run's phases, from wall-clock stamps (``time.time()``) of the driver and of rank 0.

    ``fit_start`` / ``fit_end``: around ``trainer.fit()``. ``worker``: rank 0's ``loop_start``,
    ``last_report`` and ``loop_end`` in its last attempt. ``ready_at``: when that attempt's loop was ready
    to step (its ``attempts.jsonl`` row), ``step_s`` the summed time of its steps and ``precompute_s`` the
    reference pass before them (DPO), both counted as work.
    """
    loop_start, last_report, loop_end = (worker[k] for k in ("loop_start", "last_report", "loop_end"))
    return {
        "worker_start": loop_start - fit_start,
        "worker_setup": ready_at - precompute_s - loop_start,
        "work": step_s + precompute_s,
        "checkpoints": last_report - ready_at - step_s,
        "export": loop_end - last_report,
        "worker_stop": fit_end - loop_end,
    }


def pool_start_s(passes: list[tuple[float, float]], actors: list[tuple[float, float]]) -> float:
    """Ray Data's pool start, summed over ``passes`` (each ``(start, end)``): from a pass's start until the
    first of the ``actors`` (each ``(created, built)``) created during it was built, at most the pass's end.
    The first, because from then on the pass works: the time is overhead that no work overlaps."""
    total = 0.0
    for start, end in passes:
        built = [b for created, b in actors if start <= created <= end]
        if built:
            total += min(min(built), end) - start
    return total


def submitted_timings(stage: dict[str, Any] | None, submitted: float, seen: float) -> dict[str, Any]:
    """The submitter's ``timings`` of a job it submitted at ``submitted`` and saw finished at ``seen``
    (``time.time()`` both): the job's own phases (``stage``, its summary's block, if it wrote one) plus
    ``exit``, from the job's summary until ``seen``; the total is ``seen - submitted``."""
    phases = dict((stage or {}).get("phases_s") or {})
    if stage and stage.get("ended_at"):
        phases["exit"] = seen - stage["ended_at"]
    return timing_block(phases, seen - submitted, "submit", seen)
