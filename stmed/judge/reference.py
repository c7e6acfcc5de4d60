"""The offline reference judge: an OpenAI-compatible server on loopback that plays GPT-4o's part.

In the embedded default there is no GPT-4o, but the images are synthetic phantoms whose findings are
known (``stmed.data.synthetic``). This server receives exactly the request a real judge would (METHOD §3:
one user message, the ``[Question] … [Answer 1] … [End Answer 1] … [Answer 2] … [End Answer 2] …
[System] …`` text and the image as a base64 ``image_url``), recognises the image by its pixel digest,
scores each answer against the findings with deterministic rules (``stmed.judge.grading``) and replies in
chat-completions shape with ``"s1 s2\\n<explanation>"`` on its first lines. So the judge client — async
requests, retries, ``Retry-After``, reply parsing, caching — is the same code that talks to GPT-4o.

Fault injection (``Faults``, changeable while running) makes the client's failure paths testable:
the first N requests get 429 with ``Retry-After``, a deterministic share get 500, every request can
be delayed (``asyncio.sleep``, so many are in flight at once), and a share get a garbled first line.
``RunningServer.stats`` counts requests by outcome and records each request's key, so a test can see
how often a request was re-sent.

The Batch API is served too, in memory: ``POST /v1/files`` (purpose ``batch``), ``POST /v1/batches``,
``GET /v1/batches/{id}`` and ``GET /v1/files/{id}/content``. A batch waits ``batch_delay_s`` (settable
while running), then answers each line as the chat route would (faults included: an injected 429 or 500
becomes a line of the error file) and completes; ``stats.endpoints`` counts the calls of each route.

CLI: ``python -m stmed.judge.reference --findings runs/data/findings.json --port 8011``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import hashlib
import json
import math
import os
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Self

import numpy as np
from fastapi import FastAPI, File, Form, UploadFile
from fastapi.responses import JSONResponse, Response

from stmed.data.images import ImageLoadError, decode_data_url, pixel_digest
from stmed.data.synthetic import Findings
from stmed.judge.grading import judge_answer
from stmed.log import get_logger

log = get_logger(__name__)

MODEL_ID = "stmed-reference-judge"
IMAGE_TOKENS = 85  # what a low-detail image costs at OpenAI; only used to estimate usage

# ----------------------------------------------------------------------------- the request


class BadJudgeRequest(ValueError):
    """A request the judge cannot score: not the judge prompt, no image, or an image it does not know."""


@dataclass(frozen=True)
class JudgeRequest:
    question: str
    answer1: str
    answer2: str
    image_url: str
    text_chars: int


_ANSWER = {n: re.compile(rf"\[Answer {n}\]\s*(.*?)\s*\[End Answer {n}\]", re.DOTALL) for n in (1, 2)}


_SECTIONS = ("[Answer 1]", "[End Answer 1]", "[Answer 2]", "[End Answer 2]")


def _check_sections(text: str) -> None:
    """Each answer marker once, in order, or the request is refused: a marker inside an answer (which
    ``stmed.judge.judging.judge_text`` never writes) would move where one answer ends and the next begins,
    and the judge would score text the pair does not hold."""
    counts = {marker: text.count(marker) for marker in _SECTIONS}
    repeated = {marker: n for marker, n in counts.items() if n > 1}
    if repeated:
        times = ", ".join(f"{marker} {n} times" for marker, n in repeated.items())
        raise BadJudgeRequest(f"ambiguous judge prompt: {times} (an answer holds the prompt's markers)")
    if all(counts.values()) and [text.index(m) for m in _SECTIONS] != sorted(text.index(m) for m in _SECTIONS):
        raise BadJudgeRequest("the judge prompt's answer markers are out of order")


def parse_request(body: Any) -> JudgeRequest:
    """Read the question, both answers and the image from a chat-completions request body."""
    messages = body.get("messages") if isinstance(body, dict) else None
    users = [m for m in messages or [] if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise BadJudgeRequest("the request has no user message")
    content = users[-1].get("content")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content or []
    texts = [p.get("text", "") for p in parts if isinstance(p, dict) and p.get("type") == "text"]
    images = [p.get("image_url") for p in parts if isinstance(p, dict) and p.get("type") == "image_url"]
    text = "\n".join(t for t in texts if isinstance(t, str))
    _check_sections(text)
    matches = {n: pattern.search(text) for n, pattern in _ANSWER.items()}
    if not matches[1] or not matches[2]:
        raise BadJudgeRequest("expected '[Answer 1] … [End Answer 1]' and '[Answer 2] … [End Answer 2]' in the text")
    question = re.sub(r"^\s*\[Question\]\s*", "", text[: matches[1].start()]).strip()
    if len(images) != 1:
        raise BadJudgeRequest(f"expected exactly one image_url part, found {len(images)}")
    url = images[0].get("url") if isinstance(images[0], dict) else images[0]
    if not isinstance(url, str):
        raise BadJudgeRequest("image_url part has no url")
    return JudgeRequest(question, matches[1].group(1), matches[2].group(1), url, len(text))


class DigestIndex(dict[str, Findings]):
    """``{pixel_digest: Findings}``, plus the images themselves for images that arrive masked.

    The privacy gate (``stmed.privacy.gate``) fills text regions with one grey level before an image is
    sent, which changes its digest. ``find_masked`` then takes the phantom of the same size whose pixels
    equal the received ones everywhere except where the received image holds that single fill value."""

    def __init__(self, entries: dict[str, Findings], images: dict[str, Path]):
        super().__init__(entries)
        self.images = images  # digest -> image file
        self._stack: tuple[list[str], np.ndarray] | None = None
        self._masked: dict[str, Findings | None] = {}  # received digest -> match (an image recurs per pair)

    def masked(self, digest: str, url: str) -> Findings | None:
        if digest not in self._masked:
            self._masked[digest] = self.find_masked(np.asarray(decode_data_url(url)))
        return self._masked[digest]

    def find_masked(self, received: np.ndarray) -> Findings | None:
        if self._stack is None:
            from PIL import Image

            loaded = {d: np.asarray(Image.open(p).convert("RGB")) for d, p in self.images.items() if p.is_file()}
            self._stack = (list(loaded), np.stack(list(loaded.values())) if loaded else np.zeros((0, 1, 1, 3)))
        digests, stack = self._stack
        if not digests or stack.shape[1:] != received.shape:
            return None
        differs = (stack != received[None]).any(axis=3)  # (images, H, W)
        best = int(differs.sum(axis=(1, 2)).argmin())
        where = differs[best]
        if where.sum() > where.size // 2 or len(np.unique(received[where].reshape(-1, 3), axis=0)) > 1:
            return None
        return self[digests[best]]


def load_digest_index(findings_path: str | os.PathLike) -> DigestIndex:
    """``{pixel_digest: Findings}`` from a ``findings.json`` written by ``stmed.data.synthetic`` (its images
    are read from the ``images/`` folder beside it, only if a masked image arrives)."""
    records = json.loads(Path(findings_path).read_text())
    index, images = {}, {}
    for name, entry in records.items():
        if "pixel_digest" not in entry:
            raise ValueError(f"{findings_path}: entry {name!r} has no pixel_digest; regenerate the dataset")
        index[entry["pixel_digest"]] = Findings.from_dict(entry)
        images[entry["pixel_digest"]] = Path(findings_path).parent / "images" / name
    return DigestIndex(index, images)


@functools.lru_cache(maxsize=1024)
def _url_digest(url: str) -> str:
    """The pixel digest of a data URL's image, decoded once per distinct URL: a pair is judged in one or
    two requests, with retries, and a dataset's images recur across its questions (a PNG decode is
    most of a request's CPU here). Unreadable images raise, and are not remembered."""
    return pixel_digest(decode_data_url(url))


def reply_for(request: JudgeRequest, index: dict[str, Findings]) -> str:
    """``"s1 s2\\nexplanation"`` for a parsed request, or ``BadJudgeRequest`` for an unknown image."""
    if not request.image_url.startswith("data:image/"):
        raise BadJudgeRequest("the reference judge only reads base64 data:image/… URLs")
    try:
        digest = _url_digest(request.image_url)
    except ImageLoadError as err:
        raise BadJudgeRequest(f"unreadable image: {err.reason}") from err
    findings = index.get(digest)
    if findings is None and isinstance(index, DigestIndex):  # masked by the privacy gate?
        findings = index.masked(digest, request.image_url)
    if findings is None:
        raise BadJudgeRequest(f"unknown image (pixel digest {digest[:12]}…): not in the findings file")
    v1, v2 = (judge_answer(request.question, a, findings) for a in (request.answer1, request.answer2))
    return f"{v1.score} {v2.score}\nAnswer 1: {v1.reason}. Answer 2: {v2.reason}."


# ----------------------------------------------------------------------------- faults and stats


@dataclass(frozen=True)
class Faults:
    """Injected failures, decided at each request's arrival so the pattern is deterministic."""

    rate_limit_first: int = 0
    """The first N requests (since these faults were set) get 429 with a ``Retry-After`` header."""
    retry_after_s: float = 1.0
    """The wait the 429 asks for (sent as ``Retry-After`` seconds and ``retry-after-ms``)."""
    error_rate: float = 0.0
    """Share of the other requests that get 500, evenly spaced (0.5 → every second one)."""
    latency_ms: float = 0.0
    """Delay before every reply; an ``asyncio.sleep``, so concurrent requests overlap."""
    garbled_rate: float = 0.0
    """Share of successful replies whose first line holds no scores, evenly spaced."""

    def __post_init__(self) -> None:
        for name in ("error_rate", "garbled_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"Faults.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.rate_limit_first < 0 or self.retry_after_s < 0 or self.latency_ms < 0:
            raise ValueError(f"Faults: counts and times must be >= 0, got {self}")


@dataclass(frozen=True)
class JudgeStats:
    """Snapshot of what the server saw: chat requests by outcome, and each request's key in order."""

    total: int
    outcomes: dict[str, int]
    request_keys: tuple[str, ...]
    endpoints: dict[str, int] = field(default_factory=dict)
    """Calls of the Batch API routes, e.g. ``{"POST /v1/batches": 1}``."""

    def key_counts(self) -> Counter[str]:
        return Counter(self.request_keys)

    @property
    def resent(self) -> int:
        """Requests whose exact messages the server had already received (retries, unwanted repeats)."""
        return len(self.request_keys) - len(set(self.request_keys))


def _every(rate: float, index: int) -> bool:
    """True for an evenly spaced ``rate`` share of indices 0, 1, 2, …"""
    return math.floor((index + 1) * rate) > math.floor(index * rate)


@dataclass
class _State:
    index: dict[str, Findings]
    faults: Faults = field(default_factory=Faults)
    lock: threading.Lock = field(default_factory=threading.Lock)
    seen: Counter[str] = field(default_factory=Counter)  # per-fault arrival counters
    outcomes: Counter[str] = field(default_factory=Counter)
    keys: list[str] = field(default_factory=list)
    batch_delay_s: float = 1.0
    files: dict[str, bytes] = field(default_factory=dict)
    batches: dict[str, dict[str, Any]] = field(default_factory=dict)
    endpoints: Counter[str] = field(default_factory=Counter)

    def arrive(self, key: str) -> tuple[Faults, str]:
        """Record a request and decide its fate: rate_limited, server_error, garbled or ok."""
        with self.lock:
            self.keys.append(key)
            faults, n = self.faults, self.seen["arrived"]
            self.seen["arrived"] += 1
            if n < faults.rate_limit_first:
                return faults, "rate_limited"
            self.seen["past_rate_limit"] += 1
            if _every(faults.error_rate, self.seen["past_rate_limit"] - 1):
                return faults, "server_error"
            self.seen["answered"] += 1
            return faults, "garbled" if _every(faults.garbled_rate, self.seen["answered"] - 1) else "ok"

    def record(self, outcome: str) -> None:
        with self.lock:
            self.outcomes[outcome] += 1

    def set_faults(self, faults: Faults) -> None:
        with self.lock:
            self.faults, self.seen = faults, Counter()

    def snapshot(self) -> JudgeStats:
        with self.lock:
            return JudgeStats(len(self.keys), dict(self.outcomes), tuple(self.keys), dict(self.endpoints))


# ----------------------------------------------------------------------------- the server


def _request_key(body: Any) -> str:
    """The request's identity for counting re-sends: a hash of its messages (position swaps differ)."""
    messages = body.get("messages") if isinstance(body, dict) else body
    return hashlib.sha256(json.dumps(messages, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _error(status: int, message: str, code: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": code, "param": None, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _completion(body: dict[str, Any], content: str, prompt_chars: int) -> dict[str, Any]:
    prompt_tokens, completion_tokens = math.ceil(prompt_chars / 4) + IMAGE_TOKENS, math.ceil(len(content) / 4)
    return {
        "id": f"chatcmpl-ref-{hashlib.sha256(content.encode()).hexdigest()[:12]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": str(body.get("model") or MODEL_ID),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                     "finish_reason": "stop", "logprobs": None}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


def create_app(state: _State) -> ASGIApp:
    """The server's ASGI app. ``POST /v1/chat/completions``, the one route that takes load, is a plain
    ASGI handler: FastAPI's middleware and request layers cost as much CPU per request as the judging
    itself, and on a small machine the server shares the cores with the client it is measured against.
    Everything else (``/v1/models``, 404s) is FastAPI's."""
    api = FastAPI(title="stmed reference judge")

    @api.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "stmed"}]}

    _batch_routes(api, state)

    async def chat_completions(scope: dict, receive: Callable[[], Awaitable[dict]],
                               send: Callable[[dict], Awaitable[None]]) -> None:
        raw, more = b"", True
        while more:
            message = await receive()
            raw, more = raw + message.get("body", b""), message.get("more_body", False)
        try:
            body = json.loads(raw)
        except ValueError:  # not JSON, not UTF-8
            body = None
        faults, fate = state.arrive(_request_key(body))
        if faults.latency_ms:
            await asyncio.sleep(faults.latency_ms / 1000)
        outcome, response = _respond(body, fate, faults, state.index)
        state.record(outcome)
        await response(scope, receive, send)

    async def app(scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable[[dict], Awaitable[None]]) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == "/v1/chat/completions":
            await chat_completions(scope, receive, send)
        else:
            await api(scope, receive, send)

    return app


def _batch_routes(api: FastAPI, state: _State) -> None:
    """The Batch API's routes, in memory (``stmed.judge.batch`` is their client)."""

    def new_id(prefix: str) -> str:
        return f"{prefix}-ref-{len(state.files) + len(state.batches):06d}-{os.urandom(4).hex()}"

    @api.post("/v1/files")
    async def upload(purpose: Annotated[str, Form()], file: Annotated[UploadFile, File()]) -> Any:
        state.endpoints["POST /v1/files"] += 1
        if purpose != "batch":
            return _error(400, f"purpose must be 'batch' here, got {purpose!r}", "invalid_request_error")
        file_id = new_id("file")
        state.files[file_id] = await file.read()
        return {"id": file_id, "object": "file", "bytes": len(state.files[file_id]), "created_at": int(time.time()),
                "filename": file.filename, "purpose": purpose}

    @api.get("/v1/files/{file_id}/content")
    async def content(file_id: str) -> Any:
        state.endpoints["GET /v1/files/content"] += 1
        if file_id not in state.files:
            return _error(404, f"no file {file_id!r}", "not_found")
        return Response(state.files[file_id], media_type="application/octet-stream")

    @api.post("/v1/batches")
    async def create(body: dict[str, Any]) -> Any:
        state.endpoints["POST /v1/batches"] += 1
        if body.get("input_file_id") not in state.files:
            return _error(400, "input_file_id names no uploaded file", "invalid_request_error")
        if body.get("endpoint") != "/v1/chat/completions" or body.get("completion_window") != "24h":
            return _error(400, "endpoint must be /v1/chat/completions and completion_window 24h",
                          "invalid_request_error")
        batch = {"id": new_id("batch"), "object": "batch", "endpoint": body["endpoint"], "errors": None,
                 "input_file_id": body["input_file_id"], "completion_window": "24h", "status": "in_progress",
                 "output_file_id": None, "error_file_id": None, "created_at": int(time.time()),
                 "metadata": body.get("metadata"), "request_counts": {"total": 0, "completed": 0, "failed": 0}}
        state.batches[batch["id"]] = batch
        asyncio.get_running_loop().create_task(_run_batch(state, batch))
        return batch

    @api.get("/v1/batches/{batch_id}")
    async def retrieve(batch_id: str) -> Any:
        state.endpoints["GET /v1/batches"] += 1
        if batch_id not in state.batches:
            return _error(404, f"no batch {batch_id!r}", "not_found")
        return state.batches[batch_id]


async def _run_batch(state: _State, batch: dict[str, Any]) -> None:
    """Wait ``batch_delay_s``, answer every line as the chat route would, write the output and error files."""
    await asyncio.sleep(state.batch_delay_s)
    lines = state.files[batch["input_file_id"]].decode("utf-8", "replace").splitlines()
    out, errors = await asyncio.to_thread(_answer_lines, state, [line for line in lines if line.strip()])
    for name, rows in (("output_file_id", out), ("error_file_id", errors)):
        if rows:
            file_id = f"file-ref-{name.split('_')[0]}-{batch['id']}"
            state.files[file_id] = "".join(json.dumps(row) + "\n" for row in rows).encode()
            batch[name] = file_id
    batch["request_counts"] = {"total": len(out) + len(errors), "completed": len(out), "failed": len(errors)}
    batch["status"], batch["completed_at"] = "completed", int(time.time())


def _answer_lines(state: _State, lines: list[str]) -> tuple[list[dict], list[dict]]:
    out, errors = [], []
    for n, line in enumerate(lines):
        try:
            request = json.loads(line)
            custom_id, body = request["custom_id"], request["body"]
        except (ValueError, KeyError, TypeError):
            errors.append({"id": f"batch_req_{n}", "custom_id": None, "response": None,
                           "error": {"code": "invalid_json_line", "message": f"line {n + 1} is not a request"}})
            continue
        faults, fate = state.arrive(_request_key(body))
        outcome, response = _respond(body, fate, faults, state.index)
        state.record(outcome)
        row = {"id": f"batch_req_{n}", "custom_id": custom_id,
               "response": {"status_code": response.status_code, "request_id": f"req_{n}",
                            "body": json.loads(response.body)}, "error": None}
        (out if response.status_code == 200 else errors).append(row)
    return out, errors


def _respond(body: Any, fate: str, faults: Faults, index: dict[str, Findings]) -> tuple[str, JSONResponse]:
    if fate == "rate_limited":
        wait = f"{faults.retry_after_s:g}"
        headers = {"Retry-After": wait, "retry-after-ms": str(round(faults.retry_after_s * 1000))}
        return fate, _error(429, f"rate limit reached (injected); retry after {wait} s", "rate_limit_exceeded",
                            headers)
    if fate == "server_error":
        return fate, _error(500, "internal error (injected)", "server_error")
    try:
        request = parse_request(body)
        content = reply_for(request, index)
    except BadJudgeRequest as err:
        return "bad_request", _error(400, str(err), "invalid_request_error")
    if fate == "garbled":  # a first line with no numbers at all: what an unruly judge writes
        content = "Both assistants offer answers worth discussing.\n" + content.replace("\n", " ")
    return fate, JSONResponse(_completion(body, content, request.text_chars))


class RunningServer:
    """A reference judge serving in a background thread; ``url`` is the OpenAI ``base_url``."""

    def __init__(self, server: Any, thread: threading.Thread, state: _State, host: str, port: int):
        self._server, self._thread, self._state = server, thread, state
        self.host, self.port = host, port
        self.url = f"http://{host}:{port}/v1"

    @property
    def stats(self) -> JudgeStats:
        return self._state.snapshot()

    @property
    def faults(self) -> Faults:
        return self._state.faults

    @faults.setter
    def faults(self, faults: Faults) -> None:
        """Swap the faults while serving; their counters start again (the next N requests get 429)."""
        self._state.set_faults(faults)

    @property
    def batch_delay_s(self) -> float:
        return self._state.batch_delay_s

    @batch_delay_s.setter
    def batch_delay_s(self, seconds: float) -> None:
        """How long a batch created from now on waits before it is answered."""
        self._state.batch_delay_s = seconds

    def reset_stats(self) -> None:
        with self._state.lock:
            self._state.outcomes.clear()
            self._state.keys.clear()
            self._state.endpoints.clear()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise RuntimeError(f"reference judge on {self.url} did not stop within {timeout_s} s")

    def wait(self) -> None:
        """Block until the server stops (the CLI's foreground loop; Ctrl-C lands here)."""
        while self._thread.is_alive():
            self._thread.join(0.5)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_server(findings_path: str | os.PathLike, port: int = 0, faults: Faults | None = None,
                 host: str = "127.0.0.1", start_timeout_s: float = 20.0, batch_delay_s: float = 1.0) -> RunningServer:
    """Serve the judge for the images in ``findings_path`` on ``host:port`` (0 = any free port)."""
    import uvicorn  # deferred: only a process that serves pays for it

    state = _State(index=load_digest_index(findings_path), faults=faults or Faults(), batch_delay_s=batch_delay_s)
    # Bind here rather than in uvicorn: a taken port fails in the caller, and port 0's pick is known.
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise RuntimeError(f"reference judge cannot bind {host}:{port}: {err.strerror or err}") from err
    bound = sock.getsockname()[1]
    config = uvicorn.Config(create_app(state), host=host, port=bound, log_level="warning", access_log=False,
                            lifespan="off")
    server = uvicorn.Server(config)
    # uvicorn installs no signal handlers outside the main thread, so it runs fine in this one.
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="reference-judge", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError(f"reference judge on {host}:{bound} did not start within {start_timeout_s} s")
        time.sleep(0.01)
    running = RunningServer(server, thread, state, host, bound)
    log.info("reference judge serving %d images on %s", len(state.index), running.url)
    return running


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stmed.judge.reference",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--findings", required=True, help="findings.json written by stmed.data.synthetic")
    parser.add_argument("--port", type=int, default=8011, help="port on 127.0.0.1 (0 = any free port)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="delay before every reply")
    parser.add_argument("--rate-limit-first", type=int, default=0, help="answer the first N requests with 429")
    parser.add_argument("--retry-after", type=float, default=1.0, help="Retry-After seconds sent with 429")
    parser.add_argument("--error-rate", type=float, default=0.0, help="share of requests answered with 500")
    parser.add_argument("--garbled-rate", type=float, default=0.0, help="share of replies with no scores")
    parser.add_argument("--batch-delay", type=float, default=1.0, help="seconds a Batch API job waits")
    args = parser.parse_args(argv)
    faults = Faults(rate_limit_first=args.rate_limit_first, retry_after_s=args.retry_after,
                    error_rate=args.error_rate, latency_ms=args.latency_ms, garbled_rate=args.garbled_rate)
    server = start_server(args.findings, port=args.port, faults=faults, batch_delay_s=args.batch_delay)
    # Everything imported so far lives as long as the process: keep the collector from re-scanning it
    # (a full collection of FastAPI's and PIL's objects takes ~70 ms, a stall for every request in flight).
    gc.freeze()
    try:
        server.wait()
    except KeyboardInterrupt:
        log.info("stopping the reference judge")
        server.stop()


if __name__ == "__main__":
    main()
