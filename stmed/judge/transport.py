"""Sending one chat-completions request to the judge: a direct HTTP transport, and the openai SDK.

Both speak the OpenAI wire format (``POST {base_url}/chat/completions``, ``Authorization: Bearer``,
a JSON body, a chat completion or an ``{"error": {"message": …}}`` body back) and give the judge the
same two things: a ``Completion`` (the reply's text, or why a 200 holds none, and the usage), or a
``RequestFailed`` saying whether to retry and how long the server asked to wait. Retries, pacing and
parsing stay in ``stmed.judge.judging``; neither transport retries on its own.

Why two: at 256 requests in flight the SDK spends about 2.3 ms of CPU per request (its pydantic models,
httpx's connection pool), which caps one judge actor near 300 pairs/s per core whatever the server's
speed. ``DirectTransport`` posts the same JSON with aiohttp, whose pool stays cheap at hundreds of
connections, and reads the reply as a plain dict. ``SDKTransport`` (``judge.transport=openai``) keeps
the SDK for endpoints that need its extras, and for tests that pass an ``httpx`` mock transport.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import urllib.request
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlparse

import aiohttp
import certifi
import openai
from openai.types.chat import ChatCompletion

from stmed.judge.pacing import retry_after_seconds


class RequestFailed(Exception):
    """One request got no usable HTTP answer; ``reason`` is what a verdict's error reports."""

    def __init__(self, reason: str, retryable: bool, retry_after: float | None = None):
        super().__init__(reason)
        self.reason, self.retryable, self.retry_after = reason, retryable, retry_after


@dataclass(frozen=True)
class Completion:
    """A 2xx answer: the reply's text, or (``text=None``) the ``problem`` that makes it unusable."""

    text: str | None
    problem: str | None = None
    usage: tuple[int, int] | None = None
    """(prompt tokens, completion tokens) as the server reported them; None when it did not."""


class ChatTransport(Protocol):
    async def complete(self, body: dict[str, Any]) -> Completion:
        """Send one chat-completions request body; raises ``RequestFailed``."""

    async def close(self) -> None: ...


def status_failure(code: int, message: str, headers: Any) -> RequestFailed:
    """408/409/429 and 5xx are worth retrying (after the server's ``Retry-After``); others are not."""
    if code in (408, 409, 429) or code >= 500:
        return RequestFailed(f"http {code}", True, retry_after_seconds(headers))
    return RequestFailed(f"http {code}: {message[:120]}", False)


def _not_a_completion(what: Any) -> Completion:
    return Completion(None, f"the response is not a chat completion: {str(what)[:80]!r}")


# ----------------------------------------------------------------------------- the openai SDK


def classify_error(err: openai.APIError) -> RequestFailed:
    """Timeouts and connection errors are worth retrying; statuses as ``status_failure`` says."""
    if isinstance(err, openai.APITimeoutError):
        return RequestFailed("timeout", True)
    if isinstance(err, openai.APIConnectionError):
        return RequestFailed("connection error", True)
    if isinstance(err, openai.APIStatusError):
        return status_failure(err.status_code, str(err.message), err.response.headers)
    return RequestFailed(f"bad response: {str(err)[:120]}", False)


class SDKTransport:
    """``openai.AsyncOpenAI.chat.completions.create`` (the client's own retries must be off)."""

    def __init__(self, client: openai.AsyncOpenAI, timeout_s: float):
        self.client, self.timeout_s = client, timeout_s

    async def complete(self, body: dict[str, Any]) -> Completion:
        try:
            response = await self.client.chat.completions.create(**body, timeout=self.timeout_s)
        except openai.APIError as err:
            raise classify_error(err) from err
        if not isinstance(response, ChatCompletion):  # the SDK hands back a body it cannot read as text
            return _not_a_completion(response)
        usage = (response.usage.prompt_tokens, response.usage.completion_tokens) if response.usage else None
        if not response.choices:
            return Completion(None, "the response has no choices", usage)
        choice = response.choices[0]
        if not choice.message.content:
            return Completion(None, f"empty reply (finish_reason={choice.finish_reason})", usage)
        return Completion(choice.message.content, None, usage)

    async def close(self) -> None:
        await self.client.close()


# ----------------------------------------------------------------------------- direct HTTP


def _error_message(code: int, raw: bytes) -> str:
    """What the SDK puts in an ``APIStatusError``: ``Error code: N``, then the body's error message."""
    message = f"Error code: {code}"
    try:
        body = json.loads(raw)
    except ValueError:
        return message
    error = body.get("error", body) if isinstance(body, dict) else None
    text = error.get("message") if isinstance(error, dict) else None
    return f"{message} - {text}" if isinstance(text, str) and text else message


def _usage(body: dict[str, Any]) -> tuple[int, int] | None:
    usage = body.get("usage")
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    return (prompt, completion) if isinstance(prompt, int) and isinstance(completion, int) else None


def read_completion(raw: bytes) -> Completion:
    """A 2xx body read as the SDK would: the first choice's message text, or why there is none."""
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return _not_a_completion(raw.decode("utf-8", "replace"))
    usage = _usage(body)
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices:
        return Completion(None, "the response has no choices", usage)
    choice = choices[0]
    message = choice.get("message") if isinstance(choice, dict) else None
    if not isinstance(message, dict):
        return _not_a_completion(choice)
    content = message.get("content")
    if not isinstance(content, str) or not content:
        return Completion(None, f"empty reply (finish_reason={choice.get('finish_reason')})", usage)
    return Completion(content, None, usage)


def env_proxy(url: str) -> str | None:
    """The proxy that ``HTTPS_PROXY`` / ``HTTP_PROXY`` name for ``url``, unless ``NO_PROXY`` exempts it."""
    parts = urlparse(url)
    if urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return urllib.request.getproxies().get(parts.scheme)


class DirectTransport:
    """``POST {base_url}/chat/completions`` with one aiohttp session per event loop.

    The session is opened by the first request (Ray Data builds the actor outside its event loop) and
    belongs to that loop; a request from another loop (a second ``asyncio.run``) closes it and opens a
    new one. The pool holds up to ``max_connections`` keep-alive connections, the judge's in-flight
    cap, so that no request waits for a connection and none is opened twice. The proxy variables are
    read once, here: aiohttp's ``trust_env`` would look them (and ``~/.netrc``) up in a worker thread
    for every request, two thread hops that cost more than the request. The key lives only in the
    request headers, never in ``repr``.
    """

    def __init__(self, base_url: str, api_key: str, timeout_s: float, max_connections: int):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.timeout_s, self.max_connections = timeout_s, max_connections
        self._headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json",
                         "Accept": "application/json", "User-Agent": "stmed-judge"}
        self.proxy = env_proxy(self.url)
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        return f"DirectTransport({self.url!r}, max_connections={self.max_connections})"

    async def _open(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is not None and self._loop is loop and not self._session.closed:
            return self._session
        # A new session before any await, so that the requests arriving meanwhile share it; then the
        # stale one (of a finished loop: its connections died with it) is closed.
        stale = self._session
        connector = aiohttp.TCPConnector(limit=self.max_connections, limit_per_host=0,
                                         ssl=ssl.create_default_context(cafile=certifi.where()))
        self._session = aiohttp.ClientSession(connector=connector,
                                              timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        self._loop = loop
        if stale is not None and not stale.closed:
            await stale.close()
        return self._session

    async def complete(self, body: dict[str, Any]) -> Completion:
        session = await self._open()
        data = json.dumps(body, separators=(",", ":")).encode()
        try:
            async with session.post(self.url, data=data, headers=self._headers, proxy=self.proxy) as response:
                raw = await response.read()
        except TimeoutError as err:  # before ClientError: aiohttp's timeouts are both
            raise RequestFailed("timeout", True) from err
        except aiohttp.ClientError as err:
            raise RequestFailed("connection error", True) from err
        if not 200 <= response.status < 300:
            raise status_failure(response.status, _error_message(response.status, raw), response.headers)
        return read_completion(raw)

    async def close(self) -> None:
        session, self._session, self._loop = self._session, None, None
        if session is not None and not session.closed:
            await session.close()

    def close_from_thread(self, timeout_s: float = 5.0) -> None:
        """Close the session from outside its event loop, e.g. an actor's teardown while the loop Ray
        Data runs the judge on still turns in its own thread (else aiohttp warns of an unclosed session
        when the collector finds it). Inside that loop it is scheduled instead of awaited."""
        session, loop = self._session, self._loop
        if session is None or session.closed or loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            loop.create_task(self.close())
        elif loop.is_running():
            asyncio.run_coroutine_threadsafe(self.close(), loop).result(timeout_s)
        else:
            loop.run_until_complete(self.close())
