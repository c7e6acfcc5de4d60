"""A judge endpoint that answers with a bomb, an endless body, a redirect or a body of the wrong shape:
both transports record a failure for that pair, read a bounded amount, never follow the redirect and
never raise (real HTTP on 127.0.0.1, ``tests.hostile``)."""

from __future__ import annotations

import asyncio
import time

import pytest

from stmed.judge.judging import JudgeSettings, JudgeVerdict, judge_pair, make_limiter, make_transport
from stmed.judge.transport import decode_body, read_completion
from tests.hostile import HostileServer, gzip_bomb

IMAGE = "data:image/png;base64,iVBORw0KGgo="
BOTH = pytest.mark.parametrize("kind", ["direct", "openai"])


def judge_once(url: str, kind: str, **kw) -> tuple[JudgeVerdict, float]:
    base = {"model": "judge", "max_attempts": 3, "backoff_base_s": 0.01, "backoff_max_s": 0.02}
    settings = JudgeSettings(base_url=url, transport=kind, **{**base, **kw})
    transport = make_transport(settings)

    async def main() -> JudgeVerdict:
        try:
            return await judge_pair(transport, settings, make_limiter(settings), None, "Is there a lesion?",
                                    "Yes.", "No.", IMAGE, pair_id="p")
        finally:
            await transport.close()

    start = time.perf_counter()
    verdict = asyncio.run(main())
    return verdict, time.perf_counter() - start


@BOTH
def test_a_gzip_bomb_is_refused_within_the_bound(kind):
    with HostileServer("gzip_bomb") as url:
        verdict, _ = judge_once(url, kind, max_response_bytes=1 << 20)
    assert verdict.score1 is None and verdict.attempts == 1
    expected = "once decompressed" if kind == "direct" else "content-encoding 'gzip' refused"
    assert expected in verdict.error


@BOTH
def test_an_endless_chunked_body_stops_at_the_size_bound(kind):
    server = HostileServer("endless_chunked")
    with server as url:
        verdict, seconds = judge_once(url, kind, max_response_bytes=1 << 20, timeout_s=20)
    assert verdict.score1 is None and verdict.attempts == 1
    assert "response body over 1048576 bytes" in verdict.error and seconds < 10


@BOTH
def test_a_trickled_body_ends_at_the_timeout(kind):
    with HostileServer("trickle") as url:
        verdict, seconds = judge_once(url, kind, timeout_s=0.5, max_attempts=2)
    assert verdict.error == "timeout after 2 attempts" and seconds < 5


@BOTH
def test_a_redirect_is_a_failure_naming_the_status_and_is_never_followed(kind):
    server = HostileServer("redirect")
    with server as url:
        verdict, _ = judge_once(url, kind)
    assert verdict.score1 is None and verdict.attempts == 1 and verdict.error.startswith("http 307")
    assert server.requests == 1 and not server.redirect_followed


@BOTH
@pytest.mark.parametrize("shape", ["deep_json", "not_a_dict", "wrong_types", "null_choice"])
def test_a_body_of_any_shape_is_a_recorded_failure(kind, shape):
    with HostileServer(shape) as url:
        verdict, _ = judge_once(url, kind, parse_retries=0)
    assert verdict.score1 is None and verdict.score2 is None
    assert verdict.error.startswith(("parse:", "malformed response:")), verdict.error


def test_read_completion_and_decode_body_never_raise_past_their_contract():
    assert read_completion(b"[" * 100_000 + b"]" * 100_000).problem.startswith("the response is not")
    assert read_completion(b'{"choices": [{"message": {"content": "8 6"}}]}').text == "8 6"
    bomb = gzip_bomb(64 << 20)
    with pytest.raises(Exception, match="over 4096 bytes once decompressed"):
        decode_body(bomb, "gzip", 4096)
    with pytest.raises(Exception, match="not supported"):
        decode_body(b"x", "br", 4096)
