"""The judge through OpenAI's Batch API (``judge.mode=batch``): every pair in one job, at half the price.

    rows → requests.jsonl (custom_id, method, url, body) → POST /v1/files (purpose "batch")
         → POST /v1/batches (endpoint /v1/chat/completions, completion_window 24h) → batch.json
         → GET /v1/batches/{id} until it ends (backoff) → GET /v1/files/{id}/content (output, errors)
         → each line back to its pair by custom_id → verdicts

A request's ``custom_id`` is ``<pair_id>-<order>`` (order 1: the swapped one), so every result finds its
pair whatever order the file holds. An error line (a 4xx/5xx answer, an expired request, a line the
endpoint could not read) and a reply that does not parse become the pair's ``error``, never a score; a
rerun sends the failed pairs in a new batch, as the online mode retries them.

``batch.json`` in the output folder records each batch as soon as it is created (its id, its input file,
its custom ids), so a killed job resumes waiting for the same batch rather than paying for another; only a
kill between the create call and that write (milliseconds) can leave a batch unrecorded. It is removed
once the results are written to ``parts/``.

Cache and ledger are the online mode's: a request whose reply is cached is not sent (a $0 charge), every
result is charged at ``judge.batch_discount`` of the list price, and the budget is reserved for every
request of a batch before it is uploaded (what does not fit is not sent: ``budget`` errors).

The HTTP calls have the online client's bounds: no redirect is followed, a body is read to a bound and
refused past it (an answer to ``max_response_bytes``, a result file to that much per request), no
compression is accepted, and every call ends within ``timeout_s``. Ray-free; ``jobs.generate`` runs it
after generation.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from stmed.judge.cache import CachedReply, ReplyCache, image_digest
from stmed.judge.judging import (
    BUDGET_ERROR,
    JudgeSettings,
    JudgeVerdict,
    OrderOutcome,
    OrderPrompt,
    combine_orders,
    parse_scores,
    read_reply,
    resolve_api_key,
)
from stmed.judge.ledger import OK, Charge, SpendLedger
from stmed.judge.pacing import backoff_delay
from stmed.judge.transport import read_completion, status_failure
from stmed.log import get_logger

log = get_logger(__name__)

STATE_FILE = "batch.json"
REQUESTS_FILE = "batch_requests.jsonl"
ENDPOINT = "/v1/chat/completions"
MAX_REQUESTS = 50_000
"""OpenAI's limit of requests per batch; more pairs are sent as several batches."""
MAX_INPUT_BYTES = 190 << 20
"""Under OpenAI's 200 MB limit of a batch input file."""
TERMINAL = ("completed", "failed", "expired", "cancelled")


class BatchError(RuntimeError):
    """The Batch API refused a call (with the reason), or a batch did not end within ``batch_wait_s``."""


# ----------------------------------------------------------------------------- the HTTP client


class BatchClient:
    """The four Batch API calls, bounded as the online transports are, with bounded retries on 408/409/
    429/5xx and connection errors (the server's ``Retry-After`` honoured)."""

    def __init__(self, settings: JudgeSettings, sleep: Callable[[float], None] = time.sleep):
        self.settings, self.sleep = settings, sleep
        self.base = settings.base_url.rstrip("/")
        self.http = httpx.Client(follow_redirects=False, timeout=settings.timeout_s,
                                 headers={"Authorization": f"Bearer {resolve_api_key(settings)}",
                                          "Accept-Encoding": "identity", "User-Agent": "stmed-judge"})

    def __repr__(self) -> str:
        return f"BatchClient({self.base!r})"

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, path: str, limit: int, **kwargs: Any) -> bytes:
        for attempt in range(1, self.settings.max_attempts + 1):
            try:
                raw, code, headers = self._once(method, path, limit, **kwargs)
            except (httpx.TimeoutException, httpx.TransportError) as err:
                failure, raw = None, str(type(err).__name__)
            else:
                if 200 <= code < 300:
                    return raw
                failure = status_failure(code, raw.decode("utf-8", "replace")[:200], headers)
                if not failure.retryable:
                    raise BatchError(f"{method} {path}: {failure.reason}")
            if attempt == self.settings.max_attempts:
                raise BatchError(f"{method} {path}: {failure.reason if failure else raw} after {attempt} attempts")
            self.sleep(backoff_delay(attempt, self.settings.backoff_base_s, self.settings.backoff_max_s,
                                     failure.retry_after if failure else None))
        raise AssertionError("unreachable")

    def _once(self, method: str, path: str, limit: int, **kwargs: Any) -> tuple[bytes, int, httpx.Headers]:
        deadline = time.monotonic() + self.settings.timeout_s  # the whole exchange, a trickled body too
        with self.http.stream(method, self.base + path, **kwargs) as response:
            encoding = response.headers.get("content-encoding", "identity").strip().lower()
            if encoding not in ("", "identity"):
                raise BatchError(f"{method} {path}: content-encoding {encoding[:20]!r} refused")
            chunks, size = [], 0
            for chunk in response.iter_raw():
                size += len(chunk)
                if size > limit:
                    raise BatchError(f"{method} {path}: response body over {limit} bytes (not read further)")
                if time.monotonic() > deadline:
                    raise httpx.ReadTimeout("the response took longer than judge.timeout_s")
                chunks.append(chunk)
            return b"".join(chunks), response.status_code, response.headers

    def _json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        raw = self._call(method, path, self.settings.max_response_bytes, **kwargs)
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("id"), str):
            raise BatchError(f"{method} {path}: the answer is not an object with an id: {raw[:80]!r}")
        return body

    def upload(self, content: bytes) -> str:
        files = {"file": (REQUESTS_FILE, content, "application/jsonl")}
        return self._json("POST", "/files", data={"purpose": "batch"}, files=files)["id"]

    def create(self, input_file_id: str) -> dict[str, Any]:
        return self._json("POST", "/batches", json={"input_file_id": input_file_id, "endpoint": ENDPOINT,
                                                    "completion_window": "24h",
                                                    "metadata": {"source": "stmed jobs.generate"}})

    def retrieve(self, batch_id: str) -> dict[str, Any]:
        return self._json("GET", f"/batches/{batch_id}")

    def content(self, file_id: str, limit: int) -> bytes:
        return self._call("GET", f"/files/{file_id}/content", limit)


# ----------------------------------------------------------------------------- requests and results


@dataclass(frozen=True)
class Request:
    custom_id: str
    pair_id: str
    order: int
    prompt: OrderPrompt
    cache_key: str | None


def requests_of(rows: list[dict[str, Any]], settings: JudgeSettings, cache: ReplyCache | None) -> list[Request]:
    """Every ordering of every row as a request (both orders with ``swap_positions``)."""
    out = []
    for row in rows:
        q, a1, a2, url = (str(row[k]) for k in ("question", "answer1", "answer2", "image_data_url"))
        prompts = [OrderPrompt(q, a1, a2, url)] + ([OrderPrompt(q, a2, a1, url)] if settings.swap_positions else [])
        image_key = image_digest(url) if cache is not None else None
        for order, prompt in enumerate(prompts):
            key = ReplyCache.key(settings.model, prompt.text(), settings.temperature, image_key) if cache else None
            out.append(Request(f"{row['pair_id']}-{order}", str(row["pair_id"]), order, prompt, key))
    return out


def request_line(request: Request, settings: JudgeSettings) -> bytes:
    return (json.dumps({"custom_id": request.custom_id, "method": "POST", "url": ENDPOINT,
                        "body": request.prompt.body(settings)}, separators=(",", ":")) + "\n").encode()


def read_results(raw: bytes) -> dict[str, tuple[dict[str, Any] | None, str | None]]:
    """``{custom_id: (chat completion body, None) or (None, error)}`` from an output or error file."""
    results: dict[str, tuple[dict[str, Any] | None, str | None]] = {}
    for line in raw.decode("utf-8", "replace").splitlines():
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if not isinstance(row, dict) or not isinstance(row.get("custom_id"), str):
            continue
        response, error = row.get("response"), row.get("error")
        code = response.get("status_code") if isinstance(response, dict) else None
        body = response.get("body") if isinstance(response, dict) else None
        if code == 200 and isinstance(body, dict) and not error:
            results[row["custom_id"]] = (body, None)
            continue
        if isinstance(code, int):
            message = body.get("error", {}).get("message", "") if isinstance(body, dict) and isinstance(
                body.get("error"), dict) else ""
            results[row["custom_id"]] = (None, f"batch: http {code}: {str(message)[:120]}")
        else:
            what = error if isinstance(error, dict) else {}
            results[row["custom_id"]] = (None, f"batch: {str(what.get('code'))[:40]}: {str(what.get('message'))[:120]}")
    return results


def outcome_of(result: tuple[dict[str, Any] | None, str | None], request: Request, settings: JudgeSettings,
               cache: ReplyCache | None, ledger: SpendLedger, reserved_usd: float) -> OrderOutcome:
    """One result as the ordering's outcome, charged to the ledger at the batch price; a parsed reply
    goes to the cache."""
    body, error = result
    completion = read_completion(json.dumps(body).encode()) if body is not None else None
    usage = completion.usage if completion is not None else None
    prompt_tokens, completion_tokens = usage or (0, 0)
    usd = settings.prices.usd(prompt_tokens, completion_tokens, "batch")
    ledger.record(Charge(request.pair_id, request.order, 1, "batch", False, prompt_tokens, completion_tokens, usd,
                         completion is not None and completion.text is not None), reserved_usd)
    if completion is None:
        return OrderOutcome(None, error, 1, False)
    reply, scores, error = read_reply(completion)
    if scores is not None and cache is not None and request.cache_key is not None:
        cache.put(request.cache_key, CachedReply(reply, prompt_tokens, completion_tokens))
    return OrderOutcome(scores, error, 1, False, prompt_tokens, completion_tokens, reply)


# ----------------------------------------------------------------------------- the phase


def judge_in_batches(rows: list[dict[str, Any]], settings: JudgeSettings, out: Path, cache: ReplyCache | None,
                     ledger: SpendLedger, client: BatchClient | None = None,
                     sleep: Callable[[float], None] = time.sleep) -> list[JudgeVerdict]:
    """A verdict for each row (``pair_id``, ``question``, ``answer1``, ``answer2``, ``image_data_url``):
    cached replies first, then the batches recorded in ``out/batch.json`` by a killed run, then new
    batches for the rest. Raises ``BatchError`` when a call is refused or a batch outlasts ``batch_wait_s``
    (the batch stays recorded: a rerun waits for it again)."""
    requests = requests_of(rows, settings, cache)
    outcomes: dict[str, OrderOutcome] = {}
    for request in requests:
        hit = cache.get(request.cache_key) if cache is not None and request.cache_key else None
        if hit is not None:
            try:
                outcomes[request.custom_id] = OrderOutcome(parse_scores(hit.reply), None, 0, True, reply=hit.reply)
                ledger.record(Charge(request.pair_id, request.order, 0, "batch", True))
            except ValueError:
                pass  # an edited entry: requested again
    todo = [r for r in requests if r.custom_id not in outcomes]
    client = client or BatchClient(settings, sleep)
    try:
        outcomes |= _send_and_collect(todo, settings, out, cache, ledger, client, sleep)
    finally:
        client.close()
    verdicts = []
    for row in rows:
        orders = [outcomes[r.custom_id] for r in requests if r.pair_id == str(row["pair_id"])]
        verdicts.append(combine_orders(str(row["pair_id"]), settings, orders))
    return verdicts


def _send_and_collect(todo: list[Request], settings: JudgeSettings, out: Path, cache: ReplyCache | None,
                      ledger: SpendLedger, client: BatchClient, sleep: Callable[[float], None]
                      ) -> dict[str, OrderOutcome]:
    by_id = {r.custom_id: r for r in todo}
    estimates = {r.custom_id: _estimate(r, settings) for r in todo}
    state = read_state(out)
    recorded = {cid for batch in state for cid in batch["custom_ids"] if cid in by_id}
    for cid in recorded:  # sent already: its price is coming whatever the budget says now
        ledger.hold(estimates[cid])
    outcomes: dict[str, OrderOutcome] = {}
    fresh = []
    for request in (r for r in todo if r.custom_id not in recorded):
        if ledger.reserve(estimates[request.custom_id]) == OK:
            fresh.append(request)
        else:
            outcomes[request.custom_id] = OrderOutcome(
                None, f"{BUDGET_ERROR}: not sent, judge.budget_usd={settings.budget_usd} would be passed", 0, False)
    if recorded:
        log.info("resuming %d recorded batch(es) for %d requests", len(state), len(recorded))
    for chunk in _chunks(fresh, settings):
        input_file = client.upload(b"".join(request_line(r, settings) for r in chunk))
        batch = client.create(input_file)
        state.append({"id": batch["id"], "input_file_id": input_file, "custom_ids": [r.custom_id for r in chunk]})
        write_state(out, state)
        log.info("batch %s created: %d requests", batch["id"], len(chunk))
    for entry in state:
        mine = [cid for cid in entry["custom_ids"] if cid in by_id]
        if not mine:
            continue
        results = _wait_and_download(client, entry["id"], len(entry["custom_ids"]), settings, sleep)
        for cid in mine:
            result = results.get(cid, (None, "batch: no result for this request (the batch ended without it)"))
            outcomes[cid] = outcome_of(result, by_id[cid], settings, cache, ledger, estimates[cid])
    return outcomes


def _estimate(request: Request, settings: JudgeSettings) -> float:
    tokens = request.prompt.estimate(settings)
    return settings.prices.usd(tokens - settings.max_tokens, settings.max_tokens, "batch")


def _chunks(requests: list[Request], settings: JudgeSettings) -> list[list[Request]]:
    """Requests in batches within OpenAI's limits (requests and input bytes per batch)."""
    chunks: list[list[Request]] = [[]]
    size = 0
    for request in requests:
        line = len(request_line(request, settings))
        if chunks[-1] and (len(chunks[-1]) >= MAX_REQUESTS or size + line > MAX_INPUT_BYTES):
            chunks.append([])
            size = 0
        chunks[-1].append(request)
        size += line
    return [chunk for chunk in chunks if chunk]


def _wait_and_download(client: BatchClient, batch_id: str, n: int, settings: JudgeSettings,
                       sleep: Callable[[float], None]) -> dict[str, tuple[dict[str, Any] | None, str | None]]:
    """Poll the batch with backoff (``batch_poll_s`` doubling to ``batch_poll_max_s``) until it ends,
    then read its output and error files."""
    started, delay = time.monotonic(), settings.batch_poll_s
    while (batch := client.retrieve(batch_id))["status"] not in TERMINAL:
        if time.monotonic() - started > settings.batch_wait_s:
            raise BatchError(f"batch {batch_id} still {batch['status']!r} after judge.batch_wait_s="
                             f"{settings.batch_wait_s:g} s; rerun to keep waiting for it (it is in batch.json)")
        sleep(delay * random.uniform(0.8, 1.0))
        delay = min(delay * 2, settings.batch_poll_max_s)
    limit = settings.max_response_bytes * (n + 1)  # every answer at the online bound, and its line
    results: dict[str, tuple[dict[str, Any] | None, str | None]] = {}
    for name in ("error_file_id", "output_file_id"):  # an output line wins over an error line
        if isinstance(batch.get(name), str):
            results |= read_results(client.content(batch[name], limit))
    if batch["status"] != "completed":
        log.warning("batch %s ended %s: %d of %d requests answered", batch_id, batch["status"], len(results), n)
        errors = (batch.get("errors") or {}).get("data") if isinstance(batch.get("errors"), dict) else None
        if errors:
            log.warning("batch %s errors: %s", batch_id, str(errors)[:300])
    return results


def read_state(out: Path) -> list[dict[str, Any]]:
    path = out / STATE_FILE
    if not path.is_file():
        return []
    state = json.loads(path.read_text())
    return state.get("batches", []) if isinstance(state, dict) else []


def write_state(out: Path, batches: list[dict[str, Any]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps({"batches": batches}))
    os.replace(tmp, out / STATE_FILE)


def clear_state(out: Path) -> None:
    """Once the results are in ``parts/``: the recorded batches are done with."""
    (out / STATE_FILE).unlink(missing_ok=True)
