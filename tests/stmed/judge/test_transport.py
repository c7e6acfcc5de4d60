"""The chat-completions transports: the direct aiohttp POST and the openai SDK behave alike on the wire
and in every failure the judge handles (scripted on 127.0.0.1), and the direct one judges through the
offline reference judge's injected 429s, 500s and garbled replies."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from stmed.config import ConfigError
from stmed.judge.judging import (
    JudgeSettings,
    JudgeVerdict,
    build_judge_messages,
    decide,
    judge_pair,
    make_limiter,
    make_transport,
)
from stmed.judge.transport import DirectTransport, RequestFailed, SDKTransport, env_proxy

IMAGE = "data:image/png;base64,iVBORw0KGgo="
KEY = "sk-test-never-shown"

Respond = Callable[[dict, int], tuple[int, dict[str, str], bytes]]


def completion(content: str | None, prompt_tokens: int = 900, **extra) -> tuple[int, dict, bytes]:
    body = {"id": "cmpl-1", "object": "chat.completion", "created": 0, "model": "judge",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": extra.pop("finish_reason", "stop")}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 20,
                      "total_tokens": prompt_tokens + 20}, **extra}
    return 200, {"Content-Type": "application/json"}, json.dumps(body).encode()


def error(status: int, message: str, headers: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
    body = json.dumps({"error": {"message": message, "type": "x", "param": None, "code": None}}).encode()
    return status, {"Content-Type": "application/json", **(headers or {})}, body


class Script:
    """One scripted judge endpoint served two ways: as an httpx mock transport for the SDK, and as a
    real HTTP server on 127.0.0.1 for the direct transport. ``respond(body, n)`` answers request n."""

    def __init__(self, respond: Respond):
        self.respond = respond
        self.requests: list[tuple[dict[str, str], dict]] = []  # (headers, JSON body)
        self.lock = threading.Lock()

    def answer(self, headers: dict[str, str], raw: bytes) -> tuple[int, dict, bytes]:
        body = json.loads(raw)
        with self.lock:
            self.requests.append(({k.lower(): v for k, v in headers.items()}, body))
            n = len(self.requests)
        return self.respond(body, n)

    def mock(self, request: httpx.Request) -> httpx.Response:
        status, headers, content = self.answer(dict(request.headers), request.content)
        return httpx.Response(status, headers=headers, content=content)


@pytest.fixture
def loopback() -> Iterator[Callable[[Script], str]]:
    """Serve a ``Script`` over real HTTP/1.1 (keep-alive) on 127.0.0.1; returns its base URL."""
    servers: list[ThreadingHTTPServer] = []

    def serve(script: Script) -> str:
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                status, headers, content = script.answer(dict(self.headers), raw)
                self.send_response(status)
                for name, value in {**headers, "Content-Length": str(len(content))}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(content)

            def log_message(self, *args: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        server.handle_error = lambda request, address: None  # a reply to a client that timed out
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/v1"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


def settings_for(url: str, **kw) -> JudgeSettings:
    base = {"base_url": url, "model": "judge", "max_attempts": 4, "backoff_base_s": 0.5, "backoff_max_s": 8.0,
            "api_key_env": "STMED_TRANSPORT_TEST_KEY"}
    return JudgeSettings(**{**base, **kw})


def run(kind: str, script: Script, loopback: Callable[[Script], str], sleeps: list[float] | None = None,
        **kw) -> JudgeVerdict:
    """Judge one pair through ``kind`` (``direct`` over loopback HTTP, ``openai`` over the SDK's mock
    transport) against ``script``; backoff sleeps are recorded, not slept."""
    if kind == "direct":
        settings = settings_for(loopback(script), **kw)
        transport = make_transport(settings)
    else:
        settings = settings_for("http://127.0.0.1:9/v1", **kw)  # never contacted: the mock answers
        transport = make_transport(settings, httpx.AsyncClient(transport=httpx.MockTransport(script.mock)))

    async def fake_sleep(seconds: float) -> None:
        if sleeps is not None:
            sleeps.append(seconds)

    async def main() -> JudgeVerdict:
        try:
            return await judge_pair(transport, settings, make_limiter(settings), None, "Is there a nodule?",
                                    "Yes, a nodule.", "No.", IMAGE, pair_id="p", sleep=fake_sleep,
                                    rng=random.Random(0))
        finally:
            await transport.close()

    return asyncio.run(main())


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STMED_TRANSPORT_TEST_KEY", KEY)


BOTH = pytest.mark.parametrize("kind", ["direct", "openai"])


# ----------------------------------------------------------------------------- the same on the wire


@BOTH
def test_the_request_is_the_openai_wire_format(kind: str, loopback) -> None:
    script = Script(lambda body, n: completion("9 2\nAnswer 1 sees the nodule."))
    v = run(kind, script, loopback)
    (headers, body), = script.requests
    assert headers["authorization"] == f"Bearer {KEY}" and headers["content-type"] == "application/json"
    assert body == {"model": "judge", "temperature": 0.2, "max_tokens": 512,
                    "messages": build_judge_messages("Is there a nodule?", "Yes, a nodule.", "No.", IMAGE)}
    assert (v.score1, v.score2, v.error, v.attempts, v.prompt_tokens, v.completion_tokens) == (9, 2, None, 1, 900, 20)
    assert v.reply == "9 2\nAnswer 1 sees the nodule."


@BOTH
def test_429_waits_the_retry_after_then_succeeds(kind: str, loopback) -> None:
    script = Script(lambda body, n: error(429, "slow down", {"Retry-After": "7"}) if n == 1 else completion("8 6"))
    sleeps: list[float] = []
    v = run(kind, script, loopback, sleeps)
    assert (v.score1, v.score2, v.attempts, v.error) == (8, 6, 2, None)
    assert len(script.requests) == 2 and sleeps == [7.0]


@BOTH
def test_retry_after_ms_and_5xx_are_retried_with_backoff(kind: str, loopback) -> None:
    def respond(body: dict, n: int) -> tuple[int, dict, bytes]:
        return {1: error(503, "busy", {"retry-after-ms": "1500"}), 2: error(500, "boom")}.get(n) or completion("5 4")

    sleeps: list[float] = []
    v = run(kind, script := Script(respond), loopback, sleeps)
    assert (v.score1, v.attempts) == (5, 3) and len(script.requests) == 3
    assert sleeps[0] == 1.5 and 0 <= sleeps[1] <= 1.0  # the server's wait, then jitter under 0.5 * 2


@BOTH
def test_persistent_500_fails_after_max_attempts(kind: str, loopback) -> None:
    sleeps: list[float] = []
    v = run(kind, Script(lambda body, n: error(500, "boom")), loopback, sleeps, max_attempts=3)
    assert (v.score1, v.score2, v.error, v.attempts) == (None, None, "http 500 after 3 attempts", 3)
    assert len(sleeps) == 2


@BOTH
def test_a_client_error_fails_at_once_with_the_servers_message(kind: str, loopback) -> None:
    sleeps: list[float] = []
    v = run(kind, script := Script(lambda body, n: error(401, "bad key")), loopback, sleeps)
    assert v.error == "http 401: Error code: 401 - bad key"  # word for word what the SDK reports
    assert v.attempts == 1 and len(script.requests) == 1 and sleeps == []
    assert KEY not in v.error


@BOTH
def test_garbled_replies_are_parse_retries(kind: str, loopback) -> None:
    v = run(kind, Script(lambda body, n: completion("I would rate both highly.")), loopback, parse_retries=1)
    assert (v.score1, v.attempts, v.prompt_tokens) == (None, 2, 1800)
    assert v.error == "parse: expected two scores on the first line, found 0: 'I would rate both highly.' " \
        "after 2 attempts"


@BOTH
@pytest.mark.parametrize("reply, reason", [
    ((200, {"Content-Type": "text/html"}, b"<html>proxy page</html>"),
     "parse: the response is not a chat completion: '<html>proxy page</html>'"),
    ((200, {"Content-Type": "application/json"}, b'{"object": "chat.completion", "choices": []}'),
     "parse: the response has no choices"),
    (completion(None, finish_reason="content_filter"), "parse: empty reply (finish_reason=content_filter)"),
])
def test_a_200_that_is_not_a_usable_completion_fails_alike(kind: str, loopback, reply, reason) -> None:
    v = run(kind, Script(lambda body, n: reply), loopback, parse_retries=1)
    assert v.score1 is None and v.attempts == 2 and v.error == f"{reason} after 2 attempts"


@BOTH
def test_a_reply_without_usage_charges_nothing(kind: str, loopback) -> None:
    def respond(body: dict, n: int) -> tuple[int, dict, bytes]:
        status, headers, content = completion("7 3")
        return status, headers, json.dumps({k: v for k, v in json.loads(content).items() if k != "usage"}).encode()

    v = run(kind, Script(respond), loopback)
    assert (v.score1, v.prompt_tokens, v.completion_tokens) == (7, 0, 0)


# ----------------------------------------------------------------------------- direct: the network's failures


def test_direct_timeouts_and_dropped_connections_are_retried(loopback) -> None:
    def respond(body: dict, n: int) -> tuple[int, dict, bytes]:
        if n == 1:
            time.sleep(0.6)  # past the client's timeout
        return completion("3 7")

    v = run("direct", Script(respond), loopback, timeout_s=0.3)
    assert (v.score1, v.score2, v.attempts) == (3, 7, 2)

    with socket_that_hangs_up() as url:  # accepts, reads, closes without a reply
        settings = settings_for(url, max_attempts=2, timeout_s=5)
        transport = make_transport(settings)

        async def main() -> JudgeVerdict:
            try:
                return await judge_pair(transport, settings, make_limiter(settings), None, "q", "a", "b", IMAGE,
                                        sleep=lambda s: asyncio.sleep(0))
            finally:
                await transport.close()

        v = asyncio.run(main())
    assert (v.score1, v.error, v.attempts) == (None, "connection error after 2 attempts", 2)
    v = run("direct", Script(lambda body, n: completion("1 1")), lambda script: "http://127.0.0.1:9/v1",
            max_attempts=2)  # nothing listens on port 9: refused
    assert (v.error, v.attempts) == ("connection error after 2 attempts", 2)


class socket_that_hangs_up:
    def __enter__(self) -> str:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.stop = False

        def serve() -> None:
            while not self.stop:
                try:
                    conn, _ = self.sock.accept()
                except OSError:
                    return
                conn.recv(65536)
                conn.close()

        threading.Thread(target=serve, daemon=True).start()
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"

    def __exit__(self, *exc: object) -> None:
        self.stop = True
        self.sock.close()


def test_direct_transport_serves_a_second_event_loop(loopback) -> None:
    script = Script(lambda body, n: completion("6 2"))
    transport = DirectTransport(loopback(script), KEY, timeout_s=5, max_connections=4)
    body = {"model": "judge", "messages": build_judge_messages("q", "a", "b", IMAGE)}
    first = asyncio.run(transport.complete(body))  # the first loop ends here, its session with it

    async def again():
        try:
            return await transport.complete(body)
        finally:
            await transport.close()

    assert first.text == asyncio.run(again()).text == "6 2" and len(script.requests) == 2


def test_the_key_is_sent_but_never_shown(loopback, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    script = Script(lambda body, n: error(500, "boom") if n == 1 else error(403, "no access"))
    v = run("direct", script, loopback)
    assert all(headers["authorization"] == f"Bearer {KEY}" for headers, _ in script.requests)
    assert v.error == "http 403: Error code: 403 - no access" and KEY not in caplog.text
    transport = DirectTransport("https://api.example.invalid/v1", KEY, timeout_s=5, max_connections=4)
    assert KEY not in repr(transport) and KEY not in str(RequestFailed(v.error, False))


def test_settings_choose_the_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(make_transport(settings_for("http://127.0.0.1:9/v1")), DirectTransport)
    assert isinstance(make_transport(settings_for("http://127.0.0.1:9/v1", transport="openai")), SDKTransport)
    mocked = httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(500)))
    assert isinstance(make_transport(settings_for("http://127.0.0.1:9/v1"), mocked), SDKTransport)
    with pytest.raises(ConfigError, match="judge.transport"):
        settings_for("http://127.0.0.1:9/v1", transport="curl")
    direct = make_transport(settings_for("http://127.0.0.1:9/v1", max_in_flight=64))
    assert direct.max_connections == 64 and direct.url == "http://127.0.0.1:9/v1/chat/completions"


def test_proxy_variables_are_read_once_and_no_proxy_exempts(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert env_proxy("https://api.openai.com/v1/chat/completions") is None
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:3128")
    assert env_proxy("https://api.openai.com/v1/chat/completions") == "http://127.0.0.1:3128"
    assert DirectTransport("https://api.openai.com/v1", KEY, 5, 4).proxy == "http://127.0.0.1:3128"
    monkeypatch.setenv("NO_PROXY", "api.openai.com")
    assert env_proxy("https://api.openai.com/v1/chat/completions") is None


# ----------------------------------------------------------------------------- direct: the reference judge


@pytest.fixture(scope="module")
def reference_judge(tmp_path_factory: pytest.TempPathFactory):
    """The offline reference judge on 127.0.0.1, serving six synthetic images."""
    from stmed.data.images import image_to_data_url, load_image
    from stmed.data.synthetic import load_findings, make_dataset
    from stmed.judge.reference import start_server

    paths = make_dataset(tmp_path_factory.mktemp("data"), num_images=6, test_images=1)
    images = {name: (image_to_data_url(load_image(paths.images / name)), f.lesion)
              for name, f in load_findings(paths.findings).items()}
    server = start_server(paths.findings)
    yield server, images
    server.stop()


def test_direct_transport_through_the_reference_judges_faults(reference_judge, tmp_path: Path) -> None:
    """429 + Retry-After for the first requests, a 500 in four, a garbled reply in four: every pair is
    still judged right, each failure costs exactly one more request, and the wait is real."""
    from stmed.judge.reference import Faults

    server, images = reference_judge
    server.reset_stats()
    server.faults = Faults(rate_limit_first=2, retry_after_s=0.3, error_rate=0.25, garbled_rate=0.25)
    settings = JudgeSettings(base_url=server.url, model="reference", swap_positions=True, max_attempts=6,
                             parse_retries=3, backoff_base_s=0.01, backoff_max_s=0.05, max_in_flight=4)
    assert settings.transport == "direct"
    yes, no = "Yes, there is a lesion.", "No, there is no lesion."

    async def judge_all() -> list[JudgeVerdict]:
        transport, limiter = make_transport(settings), make_limiter(settings)
        try:
            return await asyncio.gather(*(
                judge_pair(transport, settings, limiter, None, "Is there a lesion in the image?", yes, no, url,
                           pair_id=name) for name, (url, _) in images.items()))
        finally:
            await transport.close()

    started = time.monotonic()
    verdicts = asyncio.run(judge_all())
    assert time.monotonic() - started >= 0.3  # the 429s' Retry-After was waited out
    stats = server.stats
    assert stats.outcomes["rate_limited"] == 2 and stats.outcomes["server_error"] >= 2
    assert stats.outcomes["garbled"] >= 2 and stats.outcomes["ok"] == 2 * len(images)
    assert sum(v.attempts for v in verdicts) == stats.total  # every request is counted by a verdict
    for v in verdicts:
        assert v.ok and v.consistent is True
        assert decide(v)[0] == (0 if images[v.pair_id][1] else 1)  # the answer matching the findings wins


def test_judge_actor_uses_the_direct_transport_by_default(reference_judge) -> None:
    import numpy as np

    from actors.judge import Judge
    from stmed.judge.reference import Faults

    server, images = reference_judge
    server.faults = Faults(error_rate=0.5)
    judge = Judge({"base_url": server.url, "model": "reference", "backoff_base_s": 0.01, "backoff_max_s": 0.02})
    assert isinstance(judge.client, DirectTransport)
    names = sorted(images)
    batch = {"pair_id": np.array(names), "question": np.array(["Is there a lesion?"] * len(names)),
             "answer1": np.array(["Yes."] * len(names)), "answer2": np.array(["No."] * len(names)),
             "image_data_url": np.array([images[n][0] for n in names], dtype=object)}

    async def once() -> dict:
        try:
            return await judge(batch)
        finally:
            await judge.client.close()

    before = server.stats.total
    out = asyncio.run(once())
    assert list(out["error"]) == [None] * len(names) and sum(out["attempts"]) == server.stats.total - before
    assert sum(out["attempts"]) > len(names)  # the 500s were retried
    assert [s1 > s2 for s1, s2 in zip(out["score1"], out["score2"])] == [images[n][1] for n in names]


def test_an_actor_teardown_closes_the_session_on_its_running_loop(loopback) -> None:
    """As in a Ray Data judge actor: the loop turns in a thread of its own, the teardown comes from
    another."""
    import threading

    from actors.judge import Judge

    script = Script(lambda body, n: completion("6 2"))
    judge = Judge({"base_url": loopback(script), "model": "judge"})
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        body = {"model": "judge", "messages": build_judge_messages("q", "a", "b", IMAGE)}
        assert asyncio.run_coroutine_threadsafe(judge.client.complete(body), loop).result(10).text == "6 2"
        session = judge.client._session
        assert session is not None and not session.closed
        judge.__del__()
        assert session.closed and judge.client._session is None
        judge.__del__()  # twice, or with nothing open: nothing to do
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
    judge.client.close_from_thread()  # a closed loop: nothing to do either
