"""Fault drill: replay the hardening attacks and faults against a live endpoint and the jobs' entry points.

    .venv/bin/python benchmarks/fault_drill.py                 # everything (several minutes on 2 CPUs)
    .venv/bin/python benchmarks/fault_drill.py --quick --out drill.json

Endpoint (jobs.serve on 127.0.0.1, the tiny preset, a short body deadline so stalled uploads end fast):
malformed DICOMs carrying patient tags (4xx, and afterwards none of the patient values in the Ray
session's files, the endpoint's output folder or any reply), thin PNGs (413/422), deep JSON and
5000-digit integers (400), a lone-surrogate question batched with valid ones (it alone fails), 64 stalled
uploads (/healthz and an answer still 200, then each stall a 408), chat with an unknown model (404), bad
sampling fields (400) and a 1 MB max_tokens (a short message), and no 5xx for any bad input. The full
drill also kills the replica under an in-flight request (a JSON 500 from the proxy).

Jobs (``python -m jobs.<stage>`` subprocesses on the shipped local configs): each input mistake exits 2
with one stderr line naming it and no traceback; generate with its judge down exits 1 with one line.

Hardening (``benchmarks/hardening_drill.py``): a row per finding of the second red team: pickles planted in
a checkpoint (no marker file written), ambiguous judge score lines (none read as a pair), a gzip bomb, an
endless body and a 307 from the judge (a recorded failure, the client's RSS growth measured, no redirect
followed), malformed judge bodies, a resume under another model or judge, a torn metrics line, a folder of
someone else's files, a truncated part, a YAML alias bomb, manifest paths out of the image root, a prompt
injection of the reference judge, and the endpoint's ``n`` and ``bearer``.

Privacy (``benchmarks/privacy_drill.py``, issue 29): phantoms with fake identifiers through the Judge actor
to a loopback judge that keeps what it receives (Tesseract recovers none of them there), a judge URL
outside ``judge.allowed_hosts`` refused before any request, planted benchmark copies removed from a pool.

Prints tried | expected | observed | ok for every row, the counts the issue's "done when" asks for and the
wall time; exits 1 if any row fails. Every "observed" is measured in this run.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script: the project's packages come from the checkout

from jobs.runtime import use_local_ray_env  # noqa: E402

use_local_ray_env()  # before Ray is imported anywhere below: loopback only, auth off

import httpx  # noqa: E402
from PIL import Image  # noqa: E402

from tests.malformed import (  # noqa: E402  (values no other data holds: a hit is a leak)
    PATIENT,
    malformed_dicoms,
    patient_dicom,
)

LOCAL = REPO / "jobs" / "configs" / "local"
BODY_TIMEOUT_S = 5.0


@dataclass
class Row:
    area: str
    tried: str
    expected: str
    observed: str
    ok: bool


@dataclass
class Drill:
    """The rows so far, and the status of every request that carried bad input (for the 5xx count)."""

    rows: list[Row] = field(default_factory=list)
    bad_statuses: list[int] = field(default_factory=list)
    replies: list[str] = field(default_factory=list)

    def add(self, area: str, tried: str, expected: str, observed: str, ok: bool) -> None:
        self.rows.append(Row(area, tried, expected, observed, ok))
        print(f"  [{'ok' if ok else 'FAIL'}] {tried}: {observed}", flush=True)

    def bad(self, response: httpx.Response) -> httpx.Response:
        self.bad_statuses.append(response.status_code)
        self.replies.append(response.text)
        return response


# ----------------------------------------------------------------------------- payloads


def png(size: tuple[int, int] = (64, 64), colour: tuple[int, int, int] = (40, 90, 140), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, colour if mode == "RGB" else 90).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def patient_needles() -> list[bytes]:
    values = {n for v in PATIENT.values() for n in (v, v.split("^")[0], v[:13])}
    return sorted(v.encode() for v in values)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def error_of(response: httpx.Response) -> dict:
    try:
        return response.json().get("error") or {}
    except ValueError:
        return {}


def json_post(url: str, body: object) -> dict:
    """httpx's ``json=`` cannot encode a lone surrogate or NaN; ``json.dumps`` writes "\\ud800" and NaN."""
    return {"url": url, "content": json.dumps(body), "headers": {"content-type": "application/json"}}


# ----------------------------------------------------------------------------- endpoint rows


def row_malformed_dicoms(drill: Drill, url: str) -> None:
    statuses = []
    for name, data in malformed_dicoms().items():
        reply = drill.bad(httpx.post(f"{url}/v1/vqa", files={"image": (f"{name[:8]}.dcm", data, "application/dicom")},
                                     data={"question": "Is there a lesion?"}, timeout=60))
        statuses.append(reply.status_code)
    ok = all(400 <= s < 500 for s in statuses)
    drill.add("endpoint", f"{len(statuses)} malformed DICOMs with patient tags", "4xx each",
              f"statuses {statuses}", ok)
    valid = httpx.post(f"{url}/v1/vqa", files={"image": ("scan.dcm", patient_dicom(), "application/dicom")},
                       data={"question": "Is there a lesion?"}, timeout=60)
    drill.replies.append(valid.text)
    drill.add("endpoint", "the same DICOM intact (patient tags)", "200", str(valid.status_code),
              valid.status_code == 200)


def row_thin_pngs(drill: Drill, url: str) -> None:
    cases = {(1_600_000, 1): 413, (400_000, 4): 413, (2000, 50): 422}
    got = {}
    for size in cases:
        reply = drill.bad(httpx.post(f"{url}/v1/vqa", files={"image": ("thin.png", png(size, mode="L"), "image/png")},
                                     data={"question": "q"}, timeout=60))
        got[size] = reply.status_code
    drill.add("endpoint", "thin PNGs 1600000x1, 400000x4, 2000x50", "413, 413, 422",
              ", ".join(str(got[s]) for s in cases), got == cases)


def row_deep_json(drill: Drill, url: str) -> None:
    bodies = {"deep": b"[" * 100_000 + b"]" * 100_000, "int": b'{"max_tokens": ' + b"9" * 5000 + b"}"}
    got = []
    for route in ("/v1/vqa", "/v1/chat/completions"):
        for body in bodies.values():
            reply = drill.bad(httpx.post(f"{url}{route}", content=body, timeout=60,
                                         headers={"content-type": "application/json"}))
            got.append(f"{reply.status_code} {error_of(reply).get('type')}")
    drill.add("endpoint", "100k-deep JSON, 5000-digit int; /v1/vqa and chat", "400 invalid_json x4",
              "; ".join(got), all(g == "400 invalid_json" for g in got))


async def _poisoned_burst(url: str, mates: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=120) as client:
        return await asyncio.gather(*(
            client.post(**json_post(f"{url}/v1/vqa", {
                "image_base64": data_url(png(colour=(i * 11 % 256, 50, 50))),
                "question": "Is \ud800 normal?" if i == 0 else f"Is there a lesion in region {i}?",
                "max_tokens": 2}))
            for i in range(mates + 1)))


def row_poisoned_batch(drill: Drill, url: str, mates: int) -> None:
    responses = asyncio.run(_poisoned_burst(url, mates))
    poisoned, valid = drill.bad(responses[0]), responses[1:]
    answered = sum(r.status_code == 200 for r in valid)
    sizes = [r.json()["usage"]["batch_size"] for r in valid if r.status_code == 200]
    ok = 400 <= poisoned.status_code < 500 and answered == len(valid)
    drill.add("endpoint", f"lone-surrogate question among {mates} valid, at once",
              f"bad 4xx, {mates}/{mates} valid 200",
              f"bad {poisoned.status_code} ({error_of(poisoned).get('param')}), {answered}/{len(valid)} valid 200, "
              f"largest batch {max(sizes, default=0)}", ok)


def stalled_upload(port: int) -> socket.socket:
    """A /v1/vqa request that sends its headers and 100 of its 100,000 body bytes, then stalls."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.sendall(b"POST /v1/vqa HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100000\r\n\r\n" + b"{" + b" " * 99)
    return sock


def read_status(sock: socket.socket) -> tuple[int, str]:
    """Status code and content type of the one response on ``sock`` (0 when it closed without one)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    lines = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    if not lines[0].startswith("HTTP/"):
        return 0, ""
    headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), headers.get("content-type", "")


def row_stalled_uploads(drill: Drill, url: str, count: int) -> None:
    port = int(url.rsplit(":", 1)[1])
    stalled = [stalled_upload(port) for _ in range(count)]
    try:
        time.sleep(0.5)  # each has reached the replica and holds a slot
        start = time.monotonic()
        health = httpx.get(f"{url}/healthz", timeout=BODY_TIMEOUT_S - 1)
        health_s = time.monotonic() - start
        answer = httpx.post(f"{url}/v1/vqa", timeout=120, **_json_image("Is it normal?"))
        drill.add("endpoint", f"{count} stalled uploads, then /healthz and a question",
                  f"200 in < {BODY_TIMEOUT_S - 1:.0f} s, 200",
                  f"{health.status_code} in {health_s:.2f} s, {answer.status_code}",
                  health.status_code == 200 and health_s < BODY_TIMEOUT_S - 1 and answer.status_code == 200)
        ends = [read_status(sock) for sock in stalled]
    finally:
        for sock in stalled:
            sock.close()
    drill.bad_statuses += [status for status, _ in ends]
    timed_out = sum(status == 408 and "json" in kind for status, kind in ends)
    drill.add("endpoint", f"the {count} stalls at limits.body_timeout_s={BODY_TIMEOUT_S:g}",
              f"{count}x 408 JSON", f"{timed_out}x 408 JSON, statuses {sorted({s for s, _ in ends})}",
              timed_out == count)


def _json_image(question: str) -> dict:
    return {"json": {"image_base64": data_url(png()), "question": question, "max_tokens": 2}}


def _chat_messages() -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": "Is it normal?"},
                                         {"type": "image_url", "image_url": {"url": data_url(png())}}]}]


def row_chat_fields(drill: Drill, url: str, model: str) -> None:
    chat = f"{url}/v1/chat/completions"
    unknown = drill.bad(httpx.post(chat, json={"model": "gpt-4o", "messages": _chat_messages()}, timeout=60))
    drill.add("endpoint", "chat with model gpt-4o", "404 model_not_found",
              f"{unknown.status_code} {error_of(unknown).get('code') or error_of(unknown).get('type')}",
              unknown.status_code == 404)
    got = []
    for name, value in (("temperature", float("nan")), ("temperature", -1), ("temperature", "hot"),
                        ("top_p", -5)):
        reply = drill.bad(httpx.post(timeout=60, **json_post(chat, {"model": model, "messages": _chat_messages(),
                                                                     name: value})))
        got.append((reply.status_code, error_of(reply).get("param")))
    drill.add("endpoint", "temperature NaN, -1, 'hot'; top_p -5", "400 naming the field x4",
              ", ".join(f"{s} {p}" for s, p in got),
              got == [(400, "temperature")] * 3 + [(400, "top_p")])
    huge = drill.bad(httpx.post(chat, timeout=60, json={"model": model, "messages": _chat_messages(),
                                                        "max_tokens": "9" * 1_000_000}))
    message = error_of(huge).get("message", "")
    drill.add("endpoint", "chat max_tokens = a 1 MB string", "4xx, message < 300 chars",
              f"{huge.status_code}, message {len(message)} chars",
              400 <= huge.status_code < 500 and 0 < len(message) < 300)


def row_dead_replica(drill: Drill, url: str) -> None:
    """Kill the replica under an in-flight request: Serve's proxy must answer in the JSON error shape."""
    import ray

    in_flight = stalled_upload(int(url.rsplit(":", 1)[1]))
    try:
        time.sleep(1.0)  # the request waits inside the replica, reading its body
        replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                    if a["name"].startswith("SERVE_REPLICA::vqa")]
        for actor in replicas:
            ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]))
        status, kind = read_status(in_flight)
    finally:
        in_flight.close()
    drill.add("endpoint", f"kill the replica ({len(replicas)}) under an in-flight request", "500 JSON",
              f"{status} {kind or 'no content type'}", status == 500 and "json" in kind)


def count_leaks(roots: list[Path], texts: list[str]) -> tuple[list[Path], int, list[str]]:
    """The files under ``roots``, and the occurrences of any patient value in them and in ``texts``."""
    needles = patient_needles()
    files = [p for root in roots for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
    hits, where = 0, []
    for path in files:
        found = sum(path.read_bytes().count(n) for n in needles)
        hits += found
        where += [path.name] if found else []
    for text in texts:
        found = sum(text.encode("utf-8", "replace").count(n) for n in needles)
        hits += found
        where += ["a reply"] if found else []
    return files, hits, where


def row_no_leaks(drill: Drill, session_dir: Path, output_dir: Path) -> None:
    time.sleep(2.0)  # Ray's log monitor writes worker output to the session files asynchronously
    files, hits, where = count_leaks([session_dir, output_dir], drill.replies)
    # A zero means something only if the replica's own logs (where pydicom's warnings would land) were read.
    replica_logs = sum("replica" in p.name.lower() for p in files)
    drill.add("endpoint", f"patient values in {len(files)} session/output files, {len(drill.replies)} replies",
              "0 occurrences, replica logs read",
              f"{hits}" + (f" in {sorted(set(where))[:4]}" if where else "") + f"; {replica_logs} replica log files",
              hits == 0 and replica_logs > 0)


def row_no_5xx(drill: Drill) -> None:
    fives = [s for s in drill.bad_statuses if s >= 500]
    drill.add("endpoint", f"5xx over all {len(drill.bad_statuses)} bad-input requests", "0",
              f"{len(fives)}" + (f" ({sorted(set(fives))})" if fives else ""), not fives)


def endpoint_rows(drill: Drill, work: Path, quick: bool) -> None:
    import ray

    from jobs.serve import ServeConfig
    from jobs.serve import main as serve_main
    from stmed.config import build_config, read_yaml

    out = work / "serve"
    # A long batch wait so the poisoned request really shares a batch with its mates on a busy box.
    cfg = build_config(ServeConfig, read_yaml(LOCAL / "serve.yaml"), [
        f"output_dir={out}", "blocking=false", f"http.port={free_port()}", "model.preset=tiny",
        f"limits.body_timeout_s={BODY_TIMEOUT_S}", "limits.default_max_tokens=4",
        "batching.batch_wait_timeout_s=0.3"])
    started = time.perf_counter()
    result = serve_main(cfg)
    print(f"endpoint up at {result.url} in {time.perf_counter() - started:.1f} s", flush=True)
    try:
        session = Path(ray._private.worker._global_node.get_session_dir_path())
        row_malformed_dicoms(drill, result.url)
        row_thin_pngs(drill, result.url)
        row_deep_json(drill, result.url)
        row_poisoned_batch(drill, result.url, mates=8 if quick else 20)
        row_stalled_uploads(drill, result.url, count=64)
        row_chat_fields(drill, result.url, result.model_name)
        row_no_5xx(drill)
        if not quick:
            row_dead_replica(drill, result.url)
        row_no_leaks(drill, session, out)
    finally:
        result.stop()
        ray.shutdown()


# ----------------------------------------------------------------------------- job rows


@dataclass(frozen=True)
class Mistake:
    tried: str
    stage: str
    overrides: list[str]
    names: str
    """A piece of text the one stderr line must hold: the key or file it is about."""
    config: Path | None = None
    exit_code: int = 2


def run_cli(stage: str, config: Path, overrides: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "SOME_UNSET_VAR"}
    return subprocess.run([sys.executable, "-m", f"jobs.{stage}", "--config", str(config), *overrides],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s, check=False)


@dataclass(frozen=True)
class Outcome:
    returncode: int | None
    """None: no exit within the timeout."""
    stderr: str
    seconds: float


def run_mistake(mistake: Mistake, timeout_s: float) -> Outcome:
    start = time.perf_counter()
    config = mistake.config or LOCAL / f"{mistake.stage}.yaml"
    try:
        proc = run_cli(mistake.stage, config, mistake.overrides, timeout_s)
    except subprocess.TimeoutExpired as err:
        stderr = err.stderr.decode(errors="replace") if isinstance(err.stderr, bytes) else err.stderr or ""
        return Outcome(None, stderr, time.perf_counter() - start)
    return Outcome(proc.returncode, proc.stderr, time.perf_counter() - start)


def check_mistake(drill: Drill, mistake: Mistake, outcome: Outcome) -> None:
    """Exit 2 (a user mistake): stderr is exactly one line. Exit 1 (the job ran and failed): a job that
    got as far as starting Ray also has Ray's and its own progress lines, so there the one line is the
    job's verdict (``failed: ...``), the last line, said once."""
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    verdicts = [line for line in lines if line.startswith(("failed:", "config error:", "input error:"))]
    one_line = len(lines) == 1 if mistake.exit_code == 2 else verdicts == [last]
    ok = (outcome.returncode == mistake.exit_code and one_line and "Traceback" not in outcome.stderr
          and mistake.names in last)
    shape = f"{len(lines)} line(s)" if mistake.exit_code == 2 else f"{len(verdicts)} verdict line(s) of {len(lines)}"
    exit_text = "no exit" if outcome.returncode is None else f"exit {outcome.returncode}"
    expected = f"exit {mistake.exit_code}, 1 {'line' if mistake.exit_code == 2 else 'verdict line'}"
    drill.add("job", mistake.tried, f"{expected} naming {mistake.names!r}",
              f"{exit_text}, {shape} in {outcome.seconds:.0f} s: {' '.join(last.split())}", ok)


def job_data(work: Path) -> dict[str, Path]:
    """Synthetic data and the broken files the mistakes point at."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from stmed.data.records import PREFERENCE_SCHEMA, write_preferences
    from stmed.data.synthetic import make_dataset

    data = make_dataset(work / "data", num_images=10, seed=0)
    files = {"instruct": data.instruct, "images": data.images, "unlabelled": data.unlabelled,
             "empty_instruct": work / "empty_instruct.json", "empty_prefs": work / "empty.parquet",
             "corrupt_prefs": work / "corrupt.parquet", "no_column": work / "no_column.parquet",
             "jsonl": work / "answers.jsonl", "binary_yaml": work / "binary.yaml"}
    files["empty_instruct"].write_text("[]")
    write_preferences(files["empty_prefs"], [])
    files["corrupt_prefs"].write_bytes(os.urandom(4096))
    pq.write_table(pa.Table.from_pylist([], schema=PREFERENCE_SCHEMA).drop_columns(["chosen"]), files["no_column"])
    files["jsonl"].write_text('{"question_id": 1, "text": "yes"}\n{"question_id": 2, "text": "no"}\n')
    files["binary_yaml"].write_bytes(bytes(range(256)) * 8)
    return files


def mistakes(work: Path, f: dict[str, Path]) -> list[Mistake]:
    out = f"output_dir={work / 'out'}"
    sft = [out, f"data.instruct={f['instruct']}"]
    dpo = [out, "model.preset=tiny", "model.name_or_path=null"]
    return [
        Mistake("sft: missing instruct file", "sft", [out, f"data.instruct={work / 'nope.json'}"], "data.instruct"),
        Mistake("sft: empty instruct file ([])", "sft", [out, f"data.instruct={f['empty_instruct']}"],
                "data.instruct"),
        Mistake("sft: missing image root", "sft", [*sft, f"data.image_root={work / 'no_images'}"], "data.image_root"),
        Mistake("dpo: empty preferences parquet", "dpo", [*dpo, f"preferences={f['empty_prefs']}"], "no pairs"),
        Mistake("dpo: corrupt preferences parquet", "dpo", [*dpo, f"preferences={f['corrupt_prefs']}"],
                "not a readable parquet"),
        Mistake("dpo: parquet missing column 'chosen'", "dpo", [*dpo, f"preferences={f['no_column']}"], "chosen"),
        Mistake("sft: missing model folder", "sft", [*sft, "model.preset=null", "model.name_or_path=/nonexistent"],
                "/nonexistent"),
        Mistake("evaluate: a JSONL file as test_file", "evaluate",
                [out, "synthetic=false", f"benchmarks.b.test_file={f['jsonl']}"], "benchmarks.b.test_file"),
        Mistake("serve: api_key_env=SOME_UNSET_VAR", "serve", [out, "api_key_env=SOME_UNSET_VAR"], "SOME_UNSET_VAR"),
        Mistake("sft: binary YAML config file", "sft", [out], "binary.yaml", config=f["binary_yaml"]),
        Mistake("sft: train.lr_llm=.inf", "sft", [*sft, "train.lr_llm=.inf"], "train.lr_llm"),
    ]


def judge_down(work: Path, f: dict[str, Path]) -> Mistake:
    with socket.socket() as sock:  # a loopback port nothing listens on once this block ends
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    return Mistake("generate: judge down (closed loopback port)", "generate", [
        f"output_dir={work / 'generate'}", f"images={f['unlabelled']}", "num_images=2", "model.preset=tiny",
        "judge.reference_findings=null", f"judge.base_url={dead}", "judge.max_attempts=1",
        "generation.questions_per_image=2", "generation.describe_max_tokens=8", "generation.question_max_tokens=8",
        "generation.answer_max_tokens=8", "pools.images_per_batch=2"], "no preference pairs", exit_code=1)


def job_rows(drill: Drill, work: Path, quick: bool, parallel: int = 3) -> None:
    files = job_data(work)
    chosen = mistakes(work, files)
    if quick:  # one of each kind of file mistake: the other rows start the same interpreter again
        chosen = [m for m in chosen if not m.tried.startswith(("sft: empty", "dpo: empty", "sft: binary"))]
    else:  # starts a Ray, a generator and a judge pool: the slowest row, so it goes first
        chosen = [judge_down(work, files), *chosen]
    # Each mistake is a fresh interpreter importing torch: mostly waiting on a busy box, so a few at once.
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        outcomes = list(pool.map(lambda m: run_mistake(m, 600 if m.exit_code == 1 else 300), chosen))
    for mistake, outcome in zip(chosen, outcomes):
        check_mistake(drill, mistake, outcome)


# ----------------------------------------------------------------------------- report


def print_table(rows: list[Row]) -> None:
    heads = ("tried", "expected", "observed", "ok")
    cells = [(r.tried, r.expected, r.observed, "ok" if r.ok else "FAIL") for r in rows]
    widths = [min(max(len(c[i]) for c in [heads, *cells]), cap) for i, cap in enumerate((54, 52, 110, 4))]

    def line(values: tuple[str, ...]) -> str:
        return " | ".join(v[:w].ljust(w) for v, w in zip(values, widths)).rstrip()

    print(line(heads))
    print("-+-".join("-" * w for w in widths))
    for values in cells:
        print(line(values))


def summary_lines(drill: Drill, wall_s: float) -> list[str]:
    rows = drill.rows
    leak = next((r.observed for r in rows if r.tried.startswith("patient values")), "not run")
    fives = sum(s >= 500 for s in drill.bad_statuses)
    poisoned = next((r.observed for r in rows if r.tried.startswith("lone-surrogate")), "not run")
    health = next((r.observed for r in rows if "stalled uploads" in r.tried), "not run")
    jobs = [r for r in rows if r.area == "job" and r.expected.startswith("exit 2")]
    hardening = [r for r in rows if r.area.startswith("hardening")]
    privacy = [r for r in rows if r.area == "privacy"]
    return [
        f"patient values in logs/outputs/replies: {leak.split(';')[0]}",
        f"5xx for bad input: {fives} of {len(drill.bad_statuses)} requests",
        f"poisoned batch: {poisoned}",
        f"/healthz, question while uploads stall: {health}",
        f"job input mistakes exiting 2 with one line: {sum(r.ok for r in jobs)}/{len(jobs)}",
        f"hardening rows passed: {sum(r.ok for r in hardening)}/{len(hardening)}",
        f"privacy rows passed: {sum(r.ok for r in privacy)}/{len(privacy)}",
        f"rows passed: {sum(r.ok for r in rows)}/{len(rows)}; wall time {wall_s:.0f} s",
    ]


def hardening_section(drill: Drill, work: Path, quick: bool) -> None:
    from benchmarks.hardening_drill import hardening_rows

    def add(area: str, tried: str, expected: str, observed: str, ok: bool) -> None:
        number = area.split()[0]  # the finding's number, so that the table says which row is which
        tried = f"#{number} {tried}" if number[0].isdigit() else tried
        drill.add(f"hardening {area}", tried, expected, observed, ok)

    hardening_rows(add, work, quick)


def privacy_section(drill: Drill, work: Path, quick: bool) -> None:
    from benchmarks.privacy_drill import privacy_rows

    privacy_rows(drill.add, work, quick)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer batch-mates, no replica kill, fewer repeated job mistakes, no judge-down job")
    parser.add_argument("--out", type=Path, help="also write the rows and summary here as JSON")
    args = parser.parse_args()
    started = time.perf_counter()
    drill = Drill()
    sections: list[tuple[str, Callable[[Drill, Path, bool], None]]] = [("endpoint", endpoint_rows),
                                                                       ("jobs", job_rows),
                                                                       ("hardening", hardening_section),
                                                                       ("privacy", privacy_section)]
    with tempfile.TemporaryDirectory(prefix="fault-drill-") as tmp:
        for name, section in sections:
            print(f"== {name}", flush=True)
            section(drill, Path(tmp) / name, args.quick)  # a crash ends the drill with its traceback, exit 1
    wall = time.perf_counter() - started
    print()
    print_table(drill.rows)
    print()
    lines = summary_lines(drill, wall)
    print("\n".join(lines))
    if args.out:
        args.out.write_text(json.dumps({"quick": args.quick, "wall_s": round(wall, 1), "summary": lines,
                                        "rows": [asdict(r) for r in drill.rows]}, indent=2) + "\n")
    if not all(r.ok for r in drill.rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
