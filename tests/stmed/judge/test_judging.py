"""The judge: prompt layout, reply parsing, backoff, rate limits, cache, tie policy, position swap, and
whole pairs judged through the real ``openai.AsyncOpenAI`` against a mock HTTP transport."""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from stmed.config import ConfigError, build_config
from stmed.judge.cache import CachedReply, ReplyCache, image_digest
from stmed.judge.judging import (
    JUDGE_SYSTEM_TEXT,
    JudgeSettings,
    JudgeVerdict,
    ScoreParseError,
    build_judge_messages,
    decide,
    judge_pair,
    judge_text,
    make_client,
    make_limiter,
    parse_scores,
    resolve_api_key,
    summarize,
)
from stmed.judge.pacing import RateLimiter, TokenBucket, backoff_delay, retry_after_seconds

IMAGE = "data:image/png;base64,iVBORw0KGgo="
LOCAL = "http://127.0.0.1:9/v1"  # never contacted: every request goes to the mock transport


# ----------------------------------------------------------------------------- prompt


def test_judge_message_is_one_user_message_with_text_then_image():
    messages = build_judge_messages("Is there a lesion?", "Yes, left lung.", "No.", IMAGE)
    assert len(messages) == 1 and messages[0]["role"] == "user"
    text_part, image_part = messages[0]["content"]
    assert text_part == {
        "type": "text",
        "text": "[Question]\nIs there a lesion?\n\n[Answer 1]\nYes, left lung.\n\n[End Answer 1]\n\n"
        "[Answer 2]\nNo.\n\n[End Answer 2]\n\n[System]\n" + JUDGE_SYSTEM_TEXT,
    }
    assert image_part == {"type": "image_url", "image_url": {"url": IMAGE}}


def test_judge_instruction_follows_the_paper():
    for phrase in ("two AI assistants", "observing an image", "helpfulness, relevance, accuracy, level of details",
                   "scale of 1 to 10", "single line containing only two values", "separated by a space",
                   "comprehensive explanation", "order in which the responses were presented"):
        assert phrase in JUDGE_SYSTEM_TEXT


def test_judge_message_rejects_a_path_as_image():
    with pytest.raises(ValueError, match="image_data_url"):
        build_judge_messages("q", "a", "b", "/tmp/x.png")


# ----------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("reply, expected", [
    ("8 6", (8.0, 6.0)),
    ("8 6\nAssistant 1 names 3 lesions, Assistant 2 names 2.", (8.0, 6.0)),
    ("8, 6", (8.0, 6.0)),
    ("8/10 6/10", (8.0, 6.0)),
    ("8 / 10, 6 / 10\nbecause", (8.0, 6.0)),
    ("Assistant 1: 8 Assistant 2: 6", (8.0, 6.0)),
    ("Assistant 1 score: 9, Assistant 2 score: 2", (9.0, 2.0)),
    ("**8 6**", (8.0, 6.0)),
    ("\n\n  7.5 10  \nexplanation", (7.5, 10.0)),
    ("Answer 1 - 3 out of 10; Answer 2 - 10 out of 10", (3.0, 10.0)),
    ("`1 1`", (1.0, 1.0)),
])
def test_parse_scores_reads_the_first_line(reply, expected):
    assert parse_scores(reply) == expected


@pytest.mark.parametrize("reply, reason", [
    ("", "empty"),
    ("   \n  ", "empty"),
    ("Both answers are reasonable.\n8 6", "found 0"),
    ("8", "found 1"),
    ("8 6 4", "found 3"),
    ("0 5", "outside 1..10"),
    ("11 3", "outside 1..10"),
    ("Assistant 1: 8", "found 1"),
])
def test_parse_scores_rejects_garbled_replies(reply, reason):
    with pytest.raises(ScoreParseError, match=reason):
        parse_scores(reply)
    assert issubclass(ScoreParseError, ValueError)


@pytest.mark.parametrize("reply, reason", [
    ("Assistant 2: 3, Assistant 1: 9", "order 2, 1"),
    ("Assistant 2 gets 2 and Assistant 1 gets 9", "order 2, 1"),
    ("Answer 2 - 4; Answer 1 - 8", "order 2, 1"),
    ("-3 7", "negative"),
    ("3 −7", "negative"),
    ("Assistant 1: -3, Assistant 2: 7", "negative"),
    ("9 for Assistant 2, 3 for Assistant 1", "order 2, 1"),
    ("3 for Assistant 1, 9 for Assistant 2", "followed by its one score"),
    ("Assistant 1 and Assistant 2 get 3 and 9", "followed by its one score"),
    ("Assistant 1: 3, Assistant 1: 9", "order 1, 1"),
])
def test_a_score_line_that_could_swap_the_pair_is_a_parse_failure(reply, reason):
    """Not unambiguously (answer 1, answer 2): refused, never read as some pair of its numbers."""
    with pytest.raises(ScoreParseError, match=reason):
        parse_scores(reply)


@pytest.mark.parametrize("reply, expected", [
    ("Assistant 1: 7, Assistant 2: 9", (7.0, 9.0)),
    ("7 9", (7.0, 9.0)),
    ("Assistant 1 - 7/10; Assistant 2 - 9/10", (7.0, 9.0)),
    ("8-6", (8.0, 6.0)),
])
def test_labelled_in_order_and_plain_lines_still_parse(reply, expected):
    assert parse_scores(reply) == expected


# ----------------------------------------------------------------------------- settings and key


def test_settings_name_the_bad_key():
    with pytest.raises(ConfigError, match="judge.tie_policy"):
        JudgeSettings(tie_policy="second")
    with pytest.raises(ConfigError, match="judge.rpm"):
        JudgeSettings(rpm=0)
    with pytest.raises(ConfigError, match="judge.backoff_max_s"):
        JudgeSettings(backoff_base_s=10, backoff_max_s=1)


def test_settings_build_from_config_overrides():
    settings = build_config(JudgeSettings, {"model": "gpt-4o"},
                            ["rpm=600", "tpm=30000", "tie_policy=keep_first", "swap_positions=true"])
    assert (settings.rpm, settings.tpm, settings.tie_policy, settings.swap_positions) == (600.0, 30000.0,
                                                                                      "keep_first", True)
    with pytest.raises(ConfigError, match="unknown key 'api_key'"):
        build_config(JudgeSettings, {"api_key": "sk-never-in-config"})


def test_api_key_comes_from_the_named_env_var(monkeypatch):
    monkeypatch.delenv("STMED_TEST_KEY", raising=False)
    remote = JudgeSettings(base_url="https://api.openai.com/v1", api_key_env="STMED_TEST_KEY",
                           allowed_hosts=["api.openai.com"])
    with pytest.raises(ValueError, match="STMED_TEST_KEY"):
        resolve_api_key(remote)
    assert resolve_api_key(JudgeSettings(base_url=LOCAL, api_key_env="STMED_TEST_KEY"))  # loopback: dummy
    assert resolve_api_key(JudgeSettings(base_url="http://localhost:8000/v1", api_key_env="STMED_TEST_KEY"))
    monkeypatch.setenv("STMED_TEST_KEY", "sk-test")
    assert resolve_api_key(remote) == "sk-test"
    client = make_client(remote)
    assert client.max_retries == 0 and client.api_key == "sk-test"


# ----------------------------------------------------------------------------- backoff


def test_retry_after_as_seconds_millis_or_http_date():
    assert retry_after_seconds(httpx.Headers({"Retry-After": "3"})) == 3.0
    assert retry_after_seconds(httpx.Headers({"retry-after-ms": "250", "Retry-After": "9"})) == 0.25
    now = 1_700_000_000.0
    date = email.utils.formatdate(now + 7, usegmt=True)
    assert retry_after_seconds(httpx.Headers({"Retry-After": date}), now=now) == pytest.approx(7.0)
    assert retry_after_seconds(httpx.Headers({"Retry-After": email.utils.formatdate(now - 60)}), now=now) == 0.0
    assert retry_after_seconds(httpx.Headers({})) is None
    assert retry_after_seconds(httpx.Headers({"Retry-After": "soon"})) is None


def test_backoff_is_full_jitter_capped_and_respects_retry_after():
    rng = random.Random(0)
    for attempt in range(1, 8):
        delays = [backoff_delay(attempt, 0.5, 4.0, rng=rng) for _ in range(200)]
        ceiling = min(4.0, 0.5 * 2 ** (attempt - 1))
        assert 0.0 <= min(delays) and max(delays) <= ceiling
        assert max(delays) > 0.8 * ceiling  # jitter spans the whole range, not a fixed value
    assert backoff_delay(1, 0.5, 4.0, retry_after=30.0, rng=rng) == 30.0


# ----------------------------------------------------------------------------- rate limiting


class FakeClock:
    """Time that stands still; sleeps are recorded instead of slept."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)


def test_token_bucket_paces_requests_and_tokens():
    clock = FakeClock()
    rpm = TokenBucket(60, clock)  # one a second
    assert [rpm.reserve(1) for _ in range(4)] == [0.0, 1.0, 2.0, 3.0]
    tpm = TokenBucket(600, clock)  # ten tokens a second
    assert tpm.reserve(50) == 0.0 and tpm.reserve(10) == pytest.approx(5.0)
    tpm.refund(20)  # the first request used fewer tokens than reserved
    assert tpm.reserve(1) == pytest.approx(4.0)


def test_limiter_admits_at_the_paced_times_and_splits_the_budget_over_actors():
    clock = FakeClock()
    limiter = RateLimiter(max_in_flight=10, rpm=240, tpm=60_000, num_actors=2, clock=clock, sleep=clock.sleep)

    async def one(tokens: int) -> None:
        async with limiter.slot(tokens):
            pass

    async def burst(tokens: int) -> None:
        await asyncio.gather(*(one(tokens) for _ in range(5)))

    # 240 rpm over 2 actors = 2 requests a second for this one; the first goes at once.
    asyncio.run(burst(tokens=10))
    assert clock.slept == pytest.approx([0.5, 1.0, 1.5, 2.0])
    # Idle time earns no burst: an hour later the next five are paced again.
    clock.now, clock.slept = 3600.0, []
    asyncio.run(burst(tokens=10))
    assert clock.slept == pytest.approx([0.5, 1.0, 1.5, 2.0])
    # Token-heavy requests: 60k tpm over 2 actors = 500 tokens a second, so 1000 tokens wait 2 s each.
    clock.now, clock.slept = 7200.0, []
    asyncio.run(burst(tokens=1000))
    assert clock.slept == pytest.approx([2.0, 4.0, 6.0, 8.0])
    limiter.settle(estimated_tokens=1000, actual_tokens=500)  # the last used half its estimate
    assert limiter.tokens.reserve(1) == pytest.approx(9.0)


def test_limiter_keeps_rpm_spacing_when_tpm_holds_requests_back():
    clock = FakeClock()
    limiter = RateLimiter(max_in_flight=10, rpm=60, tpm=600, clock=clock, sleep=clock.sleep)  # 1 req/s, 10 tok/s

    async def main() -> None:
        for tokens in (50, 1, 1):  # sequential bookings: the first costs 5 s of token budget
            async with limiter.slot(tokens):
                pass

    asyncio.run(main())
    # The second waits for the token budget (5 s); the third must still leave 1 s after it.
    assert clock.slept == pytest.approx([5.0, 6.0])


def test_limiter_bounds_requests_in_flight():
    limiter = RateLimiter(max_in_flight=3)
    active, peak = 0, 0

    async def one() -> None:
        nonlocal active, peak
        async with limiter.slot(tokens=1):
            active += 1
            peak = max(peak, active)
            await asyncio.sleep(0.01)
            active -= 1

    async def main() -> None:
        await asyncio.gather(*(one() for _ in range(12)))

    asyncio.run(main())
    assert peak == 3


# ----------------------------------------------------------------------------- cache


def test_cache_round_trip_and_key(tmp_path: Path):
    cache = ReplyCache(tmp_path / "cache")
    text, image = judge_text("q", "a", "b"), image_digest(IMAGE)
    key = ReplyCache.key("gpt-4o", text, 0.2, image)
    assert cache.get(key) is None
    cache.put(key, CachedReply("8 6\nfine", 100, 12))
    assert ReplyCache(tmp_path / "cache").get(key) == CachedReply("8 6\nfine", 100, 12)
    assert key != ReplyCache.key("gpt-4o-mini", text, 0.2, image)
    assert key != ReplyCache.key("gpt-4o", text, 0.0, image)
    assert key != ReplyCache.key("gpt-4o", judge_text("q", "b", "a"), 0.2, image)
    assert key != ReplyCache.key("gpt-4o", text, 0.2, image_digest(IMAGE + "AAAA"))
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_cache_survives_concurrent_writers_and_readers(tmp_path: Path):
    cache = ReplyCache(tmp_path)
    key = "ab" * 32
    seen: list[CachedReply | None] = []

    def write(i: int) -> None:
        for _ in range(20):
            cache.put(key, CachedReply("7 5\n" + "x" * 5000, i, i))
            seen.append(cache.get(key))

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 80 and all(entry is not None and entry.reply.startswith("7 5") for entry in seen)
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == [f"{key}.json"]


@pytest.mark.parametrize("content", [b"\xff\xfe\x00garbage", b"[1, 2]", b"{\"reply\": 7}", b"{truncated",
                                     b'{"reply": null, "prompt_tokens": 1, "completion_tokens": 1}'])
def test_a_corrupt_cache_entry_is_a_miss_not_a_crash(tmp_path: Path, content: bytes):
    """A damaged file in the reply cache (disk trouble, a killed writer) is re-requested, never fatal."""
    cache = ReplyCache(tmp_path)
    key = "cd" * 32
    cache.put(key, CachedReply("8 6", 1, 1))
    (tmp_path / key[:2] / f"{key}.json").write_bytes(content)
    assert cache.get(key) is None
    cache.put(key, CachedReply("7 5", 2, 3))  # the re-requested reply replaces it
    assert cache.get(key) == CachedReply("7 5", 2, 3)


# ----------------------------------------------------------------------------- verdicts and decisions


def verdict(s1: float | None, s2: float | None, **kw) -> JudgeVerdict:
    return JudgeVerdict(pair_id="p", score1=s1, score2=s2, **kw)


def test_decide_tie_policy_failures_and_inconsistency():
    assert decide(verdict(8, 6)) == (0, "answer 1 scored higher")
    assert decide(verdict(4, 6)) == (1, "answer 2 scored higher")
    assert decide(verdict(6, 6)) == (None, "tie")
    assert decide(verdict(6, 6), "keep_first") == (0, "tie kept as answer 1")
    assert decide(verdict(None, None, error="timeout after 5 attempts")) == (None, "failed: timeout after 5 attempts")
    assert decide(verdict(8, 6, consistent=False)) == (None, "inconsistent under position swap")
    assert decide(verdict(8, 6, consistent=False), drop_inconsistent=False)[0] == 0
    with pytest.raises(ValueError, match="tie_policy"):
        decide(verdict(6, 6), "second")


def test_verdict_row_round_trip_through_numpy_and_arrow_nulls():
    v = verdict(7.5, 3.0, attempts=2, prompt_tokens=900, completion_tokens=40, reply="7.5 3\nok", judge_model="m")
    assert JudgeVerdict.from_row(v.to_row()) == v
    row = {k: (np.float64(val) if isinstance(val, float) else val) for k, val in v.to_row().items()}
    row["error"], row["swapped_score1"] = None, float("nan")
    back = JudgeVerdict.from_row(row)
    assert back == v and type(back.score1) is float


def test_summary_counts_decisions_errors_and_cost():
    settings = JudgeSettings(base_url=LOCAL, price_prompt_per_1k=1.0, price_completion_per_1k=2.0)
    verdicts = [
        verdict(8, 6, attempts=1, prompt_tokens=1000, completion_tokens=500),
        verdict(6, 6, attempts=0, cached=True),
        verdict(None, None, error="http 500 after 3 attempts", attempts=3),
        verdict(None, None, error="swapped order: parse: empty reply after 2 attempts", attempts=3),
    ]
    summary = summarize(verdicts, settings)
    assert summary["pairs"] == 4 and summary["judged"] == 2 and summary["failed"] == 2
    assert summary["requests"] == 7 and summary["cached"] == 1
    assert summary["errors"] == {"http 500": 1, "parse": 1}
    assert summary["decisions"] == {"answer 1 scored higher": 1, "tie": 1, "failed": 2}
    assert summary["cost_usd"] == pytest.approx(1.0 + 1.0)


# ----------------------------------------------------------------------------- judging through the client


def completion(content: str, model: str = "judge", prompt_tokens: int = 900) -> httpx.Response:
    return httpx.Response(200, json={
        "id": "cmpl-1", "object": "chat.completion", "created": 0, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 20, "total_tokens": prompt_tokens + 20},
    })


class Server:
    """A scripted judge endpoint: ``respond(request, n)`` answers the n-th request (1-based)."""

    def __init__(self, respond: Callable[[httpx.Request, int], httpx.Response]):
        self.respond = respond
        self.requests: list[httpx.Request] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.respond(request, len(self.requests))

    def client(self, settings: JudgeSettings) -> openai.AsyncOpenAI:
        return make_client(settings, httpx.AsyncClient(transport=httpx.MockTransport(self.handler)))


def settings_for(tmp_path: Path | None = None, **kw) -> JudgeSettings:
    base = {"base_url": LOCAL, "model": "judge", "max_attempts": 4, "backoff_base_s": 0.5,
            "backoff_max_s": 8.0, "cache_dir": str(tmp_path / "cache") if tmp_path else None}
    return JudgeSettings(**{**base, **kw})


def run_pair(server: Server, settings: JudgeSettings, sleeps: list[float] | None = None,
             answers: tuple[str, str] = ("Yes, a nodule.", "No."), calls: int = 1) -> list[JudgeVerdict]:
    """Judge the same pair ``calls`` times with one client; backoff sleeps are recorded, not slept."""

    async def fake_sleep(seconds: float) -> None:
        if sleeps is not None:
            sleeps.append(seconds)

    async def main() -> list[JudgeVerdict]:
        client = server.client(settings)
        limiter = make_limiter(settings)
        cache = ReplyCache(settings.cache_dir) if settings.cache_dir else None
        return [await judge_pair(client, settings, limiter, cache, "Is there a nodule?", *answers, IMAGE,
                                 pair_id="pair-1", sleep=fake_sleep, rng=random.Random(0))
                for _ in range(calls)]

    return asyncio.run(main())


def test_request_body_is_the_judge_prompt_at_temperature_0_2():
    server = Server(lambda request, n: completion("9 2\nAnswer 1 sees the nodule."))
    (v,) = run_pair(server, settings_for())
    body = json.loads(server.requests[0].content)
    assert body["model"] == "judge" and body["temperature"] == 0.2
    assert body["messages"] == build_judge_messages("Is there a nodule?", "Yes, a nodule.", "No.", IMAGE)
    assert (v.score1, v.score2, v.error, v.attempts, v.cached) == (9.0, 2.0, None, 1, False)
    assert (v.pair_id, v.judge_model, v.prompt_tokens, v.completion_tokens) == ("pair-1", "judge", 900, 20)
    assert v.reply == "9 2\nAnswer 1 sees the nodule."


def test_429_with_retry_after_is_waited_out_then_succeeds():
    def respond(request: httpx.Request, n: int) -> httpx.Response:
        if n == 1:
            return httpx.Response(429, headers={"Retry-After": "7"}, json={"error": {"message": "slow down"}})
        return completion("8 6")

    server, sleeps = Server(respond), []
    (v,) = run_pair(server, settings_for(), sleeps)
    assert (v.score1, v.score2, v.attempts, v.error) == (8.0, 6.0, 2, None)
    assert len(server.requests) == 2 and sleeps == [7.0]  # the server's wait, not our 0..0.5 s jitter


def test_retry_after_is_honoured_in_real_time():
    def respond(request: httpx.Request, n: int) -> httpx.Response:
        return httpx.Response(503, headers={"Retry-After": "0.3"}) if n == 1 else completion("5 4")

    server = Server(respond)
    settings = settings_for(backoff_base_s=0.001, backoff_max_s=0.001)

    async def main() -> JudgeVerdict:
        return await judge_pair(server.client(settings), settings, make_limiter(settings), None,
                                "q", "a", "b", IMAGE)

    started = time.monotonic()
    v = asyncio.run(main())
    assert time.monotonic() - started >= 0.3 and v.attempts == 2 and v.score1 == 5.0


def test_persistent_500_fails_after_max_attempts_without_a_score(tmp_path: Path):
    server, sleeps = Server(lambda request, n: httpx.Response(500, json={"error": {"message": "boom"}})), []
    (v,) = run_pair(server, settings_for(tmp_path, max_attempts=3), sleeps)
    assert (v.score1, v.score2, v.error, v.attempts) == (None, None, "http 500 after 3 attempts", 3)
    assert len(server.requests) == 3 and len(sleeps) == 2  # no sleep after the last attempt
    assert sleeps[0] <= 0.5 and sleeps[1] <= 1.0  # full jitter under 0.5 * 2**(n-1)
    assert not list((tmp_path / "cache").rglob("*.json"))  # failures are never cached


def test_client_errors_fail_at_once_with_the_reason():
    server, sleeps = Server(lambda request, n: httpx.Response(401, json={"error": {"message": "bad key"}})), []
    (v,) = run_pair(server, settings_for(), sleeps)
    assert v.score1 is None and v.attempts == 1 and len(server.requests) == 1 and sleeps == []
    assert v.error.startswith("http 401") and "bad key" in v.error


def test_timeouts_and_connection_errors_are_retried():
    def respond(request: httpx.Request, n: int) -> httpx.Response:
        if n == 1:
            raise httpx.ReadTimeout("read timed out", request=request)
        if n == 2:
            raise httpx.ConnectError("connection refused", request=request)
        return completion("3 7")

    (v,) = run_pair(Server(respond), settings_for())
    assert (v.score1, v.score2, v.attempts) == (3.0, 7.0, 3)

    def always_slow(request: httpx.Request, n: int) -> httpx.Response:
        raise httpx.ReadTimeout("read timed out", request=request)

    (v,) = run_pair(Server(always_slow), settings_for(max_attempts=2))
    assert (v.score1, v.error, v.attempts) == (None, "timeout after 2 attempts", 2)


def test_garbled_reply_is_a_parse_failure_retried_a_bounded_number_of_times(tmp_path: Path):
    server = Server(lambda request, n: completion("I would rate both answers highly."))
    (v,) = run_pair(server, settings_for(tmp_path, parse_retries=1))
    assert v.score1 is None and v.score2 is None and v.attempts == 2 and len(server.requests) == 2
    assert v.error.startswith("parse: expected two scores") and v.error.endswith("after 2 attempts")
    assert v.reply == "I would rate both answers highly."
    assert v.prompt_tokens == 1800  # both garbled replies were paid for

    server = Server(lambda request, n: completion("nonsense") if n == 1 else completion("6 2"))
    (v,) = run_pair(server, settings_for(parse_retries=1))
    assert (v.score1, v.score2, v.attempts) == (6.0, 2.0, 2)

    server = Server(lambda request, n: completion("nonsense"))
    (v,) = run_pair(server, settings_for(parse_retries=0))
    assert v.attempts == 1 and v.error == "parse: expected two scores on the first line, found 0: " \
        "'nonsense' after 1 attempt"


@pytest.mark.parametrize("response, reason", [
    (httpx.Response(200, text="<html>proxy page</html>"),
     "parse: the response is not a chat completion: '<html>proxy page</html>'"),
    (httpx.Response(200, json={"object": "chat.completion", "choices": []}), "parse: the response has no choices"),
    (httpx.Response(200, json={"choices": [{"index": 0, "finish_reason": "content_filter",
                                            "message": {"role": "assistant", "content": None}}]}),
     "parse: empty reply (finish_reason=content_filter)"),
])
def test_a_200_that_is_not_a_usable_completion_is_a_failure(response, reason):
    (v,) = run_pair(Server(lambda request, n: response), settings_for(parse_retries=1))
    assert v.score1 is None and v.score2 is None and v.attempts == 2
    assert v.error.startswith(reason) and v.error.endswith(" after 2 attempts")


def test_a_second_call_hits_the_cache_with_zero_new_requests(tmp_path: Path):
    server = Server(lambda request, n: completion("9 3\nreason"))
    first, second = run_pair(server, settings_for(tmp_path), calls=2)
    assert len(server.requests) == 1
    assert (first.cached, first.attempts) == (False, 1)
    assert (second.cached, second.attempts, second.score1, second.score2) == (True, 0, 9.0, 3.0)
    assert (first.prompt_tokens, second.prompt_tokens, second.completion_tokens) == (900, 0, 0)  # nothing paid
    assert second.reply == "9 3\nreason"
    (third,) = run_pair(server, settings_for(tmp_path))  # a rerun: new process state, same directory
    assert third.cached and len(server.requests) == 1
    (other,) = run_pair(server, settings_for(tmp_path), answers=("No.", "Yes, a nodule."))
    assert not other.cached and len(server.requests) == 2


def scores_by_content(request: httpx.Request, n: int) -> httpx.Response:
    """A fair judge: 'nodule' answers get 8, others 3, wherever they are shown."""
    text = json.loads(request.content)["messages"][0]["content"][0]["text"]
    first = text.split("[Answer 1]\n")[1].split("\n\n[End Answer 1]")[0]
    second = text.split("[Answer 2]\n")[1].split("\n\n[End Answer 2]")[0]
    return completion(" ".join("8" if "nodule" in a else "3" for a in (first, second)))


def test_position_swap_averages_per_answer_scores():
    server = Server(scores_by_content)
    (v,) = run_pair(server, settings_for(swap_positions=True))
    assert len(server.requests) == 2 and v.attempts == 2
    assert (v.score1, v.score2, v.swapped_score1, v.swapped_score2, v.consistent) == (8.0, 3.0, 8.0, 3.0, True)


def test_position_swap_flags_a_judge_that_prefers_a_position():
    server = Server(lambda request, n: completion("9 5"))  # always prefers whatever is shown first
    (v,) = run_pair(server, settings_for(swap_positions=True))
    assert (v.score1, v.score2, v.swapped_score1, v.swapped_score2) == (7.0, 7.0, 5.0, 9.0)
    assert v.consistent is False and decide(v) == (None, "inconsistent under position swap")


def test_position_swap_fails_the_pair_when_one_order_fails():
    def respond(request: httpx.Request, n: int) -> httpx.Response:
        text = json.loads(request.content)["messages"][0]["content"][0]["text"]
        return completion("8 3") if text.startswith("[Question]\nIs there a nodule?\n\n[Answer 1]\nYes") \
            else completion("garbled")

    (v,) = run_pair(Server(respond), settings_for(swap_positions=True, parse_retries=0))
    assert v.score1 is None and v.score2 is None and v.swapped_score1 is None
    assert v.error.startswith("swapped order: parse:")


def test_requests_through_judge_pair_respect_rpm_in_real_time():
    stamps: list[float] = []

    def respond(request: httpx.Request, n: int) -> httpx.Response:
        stamps.append(time.monotonic())
        return completion("7 2")

    server = Server(respond)
    settings = settings_for(rpm=600)  # one request every 0.1 s

    start: list[float] = []

    async def main() -> list[JudgeVerdict]:
        client, limiter = server.client(settings), make_limiter(settings)
        start.append(time.monotonic())
        return await asyncio.gather(*(judge_pair(client, settings, limiter, None, f"q{i}", "a", "b", IMAGE)
                                      for i in range(4)))

    verdicts = asyncio.run(main())
    assert all(v.score1 == 7.0 for v in verdicts) and len(stamps) == 4
    # Pacing can only be late, never early: the k-th request leaves no sooner than k/10 s after the
    # start, whatever else the machine is doing (a delayed first request must not let the rest burst).
    for k, stamp in enumerate(sorted(stamps)):
        assert stamp - start[0] >= 0.1 * k - 0.005


# ----------------------------------------------------------------------------- end to end over real HTTP


@pytest.fixture(scope="module")
def reference_judge(tmp_path_factory):
    """The offline reference judge on loopback, serving four synthetic images."""
    from stmed.data.images import image_to_data_url, load_image
    from stmed.data.synthetic import load_findings, make_dataset
    from stmed.judge.reference import start_server

    paths = make_dataset(tmp_path_factory.mktemp("data"), num_images=4, test_images=1)
    images = {name: (image_to_data_url(load_image(paths.images / name)), f.lesion)
              for name, f in load_findings(paths.findings).items()}
    server = start_server(paths.findings)
    yield server, images
    server.stop()


def test_end_to_end_against_the_reference_judge(reference_judge, tmp_path: Path):
    from stmed.judge.reference import Faults

    server, images = reference_judge
    server.faults = Faults(rate_limit_first=1, retry_after_s=0.2)
    settings = JudgeSettings(base_url=server.url, model="reference", cache_dir=str(tmp_path), swap_positions=True,
                             backoff_base_s=0.01)
    yes, no = "Yes, there is a lesion.", "No, there is no lesion."

    async def judge_all() -> list[JudgeVerdict]:
        client, limiter = make_client(settings), make_limiter(settings)
        cache = ReplyCache(settings.cache_dir)
        return await asyncio.gather(*(
            judge_pair(client, settings, limiter, cache, "Is there a lesion in the image?", yes, no, url,
                       pair_id=name)
            for name, (url, _) in images.items()))

    started, before = time.monotonic(), server.stats.total
    verdicts = asyncio.run(judge_all())
    assert time.monotonic() - started >= 0.2  # the one 429's Retry-After was waited out
    assert server.stats.total - before == 2 * len(images) + 1
    for v in verdicts:
        lesion = images[v.pair_id][1]
        assert v.ok and v.consistent is True and v.prompt_tokens > 0
        assert decide(v)[0] == (0 if lesion else 1)  # the answer that matches the findings is chosen
    assert sum(v.attempts for v in verdicts) == 2 * len(images) + 1

    rerun = asyncio.run(judge_all())  # a rerun pays nothing: every reply comes from the cache
    assert server.stats.total - before == 2 * len(images) + 1
    assert all(v.cached and v.attempts == 0 for v in rerun)
    assert [(v.score1, v.score2) for v in rerun] == [(v.score1, v.score2) for v in verdicts]


# ----------------------------------------------------------------------------- what a waiting pair costs


BIG_IMAGE = "data:image/png;base64," + "A" * 7000  # the size of a phantom scan's data URL


def test_no_hashing_without_a_cache_and_the_image_hashed_once_per_pair_with_one(tmp_path: Path, monkeypatch):
    """The cache key is only computed with a cache, and from a digest of the image taken once per pair:
    the 7 KB data URL is not hashed again with each request (both orders under swap)."""
    import hashlib

    hashed: list[int] = []
    real_sha256 = hashlib.sha256

    class CountingSha256:
        def __init__(self, data: bytes = b"") -> None:
            hashed.append(len(data))
            self._hash = real_sha256(data)

        def update(self, data: bytes) -> None:
            hashed.append(len(data))
            self._hash.update(data)

        def hexdigest(self) -> str:
            return self._hash.hexdigest()

    monkeypatch.setattr(hashlib, "sha256", CountingSha256)
    server = Server(lambda request, n: completion("7 3"))

    def judge(settings: JudgeSettings, cache: ReplyCache | None) -> JudgeVerdict:
        async def main() -> JudgeVerdict:
            return await judge_pair(server.client(settings), settings, make_limiter(settings), cache,
                                    "Is there a nodule?", "Yes.", "No.", BIG_IMAGE)
        return asyncio.run(main())

    assert judge(settings_for(swap_positions=True), None).ok
    assert sum(hashed) == 0  # caching off: nothing hashed at all
    settings = settings_for(tmp_path, swap_positions=True)
    cache = ReplyCache(settings.cache_dir)
    hashed.clear()
    assert judge(settings, cache).ok and len(server.requests) == 4
    assert len(BIG_IMAGE) <= sum(hashed) < len(BIG_IMAGE) + 8000  # the image once, two small keys
    hashed.clear()
    assert judge(settings, cache).cached and len(server.requests) == 4  # same keys: both orders cached
    assert sum(hashed) < len(BIG_IMAGE) + 8000


def test_request_bodies_exist_only_for_requests_in_flight(monkeypatch):
    """With 3 in flight and 12 pairs waiting, at most 3 sets of messages (each carrying the base64
    image) exist at once: a pair's messages are built when it gets a slot, not when it starts waiting."""
    from stmed.judge import judging

    live, peak = 0, 0
    build = judging.build_judge_messages

    def counting_build(*args):
        nonlocal live, peak
        live += 1
        peak = max(peak, live)
        return build(*args)

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal live
        await asyncio.sleep(0.01)
        live -= 1  # answered: the request's body is done with
        return completion("7 3")

    monkeypatch.setattr(judging, "build_judge_messages", counting_build)
    settings = settings_for(max_in_flight=3)

    async def main() -> list[JudgeVerdict]:
        client = make_client(settings, httpx.AsyncClient(transport=httpx.MockTransport(handler)))
        limiter = make_limiter(settings)
        return await asyncio.gather(*(judge_pair(client, settings, limiter, None, f"q{i}", "a", "b", BIG_IMAGE)
                                      for i in range(12)))

    verdicts = asyncio.run(main())
    assert all(v.ok for v in verdicts) and live == 0
    assert peak <= 3
