"""stmed.serve.errors without Ray: short echoes, and ``JSONErrors`` over real HTTP (uvicorn on 127.0.0.1)
in front of an app that misbehaves the way Ray Serve's proxy does (plain text, or no response at all).

(The middleware inside a real Serve proxy, with a replica killed mid-request: tests/actors/test_serve.py.)
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from stmed.serve.errors import JSONErrors, echo


def test_echo_keeps_a_short_ascii_prefix():
    assert echo("9" * 1_000_000) == "'" + "9" * 23 + "..."
    assert echo("\ud800") == "'\\ud800'"  # a lone surrogate cannot go into a UTF-8 body as it is
    assert echo(10**4000) == "a very large integer" and echo(17) == "17"
    assert echo(float("nan")) == "nan" and echo(None) == "None"
    assert echo({"a": 1}) == "a JSON object" and echo([1]) == "a JSON array"


async def _plain_503(request):
    return PlainTextResponse("Deployment unavailable: abc", status_code=503, headers={"Retry-After": "3"})


async def _nothing(scope, receive, send):  # what Serve's proxy does when the replica died: no response
    return None


async def _raises(request):
    raise RuntimeError("boom")


async def _json_404(request):
    return JSONResponse({"error": {"message": "mine", "type": "invalid_request_error"}}, status_code=404)


async def _ok(request):
    return PlainTextResponse("fine")


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    inner = Starlette(routes=[Route("/plain503", _plain_503), Route("/nothing", _nothing),
                              Route("/raises", _raises), Route("/json404", _json_404), Route("/ok", _ok)])
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = uvicorn.Config(JSONErrors(inner), host="127.0.0.1", port=port, log_level="critical", lifespan="off")
    app_server = uvicorn.Server(config)
    thread = threading.Thread(target=app_server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not app_server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    app_server.should_exit = True
    thread.join(timeout=10)


def test_non_json_errors_and_missing_responses_become_the_json_error_shape(server: str):
    unavailable = httpx.get(f"{server}/plain503")
    assert unavailable.status_code == 503 and unavailable.headers["retry-after"] == "3"
    assert unavailable.json()["error"]["type"] == "unavailable" and "abc" not in unavailable.text
    for path in ("/nothing", "/raises"):
        failed = httpx.get(f"{server}{path}")
        assert failed.status_code == 500 and failed.headers["content-type"] == "application/json"
        assert failed.json()["error"]["type"] == "server_error"
    own = httpx.get(f"{server}/json404")  # JSON errors and successes pass untouched
    assert own.status_code == 404 and own.json()["error"]["message"] == "mine"
    assert httpx.get(f"{server}/ok").text == "fine"
