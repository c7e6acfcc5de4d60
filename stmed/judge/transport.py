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

What a judge endpoint sends back is bounded whatever it is: the body is read to at most
``max_response_bytes`` as sent and again once decompressed (a gzip bomb stops there), the whole exchange
ends within ``timeout_s`` (an endless chunked body too), and a redirect is never followed (it would
re-send the prompt, the answers and the image to another origin): a 3xx is a failure naming the status.
Each is a non-retryable ``RequestFailed`` for that pair; so is a body of any shape that is not a chat
completion (``read_completion`` never raises).
"""

from __future__ import annotations

import asyncio
import json
import ssl
import urllib.request
import zlib
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlparse

import aiohttp
import certifi
import httpx
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


MAX_RESPONSE_BYTES = 1 << 20
"""A judge reply (scores and an explanation in at most ``max_tokens``) is a few KB; 1 MiB is generous."""


class ResponseRefused(openai.OpenAIError):
    """A response the transport stopped reading: over the size bound, or in an encoding it did not ask
    for. An ``OpenAIError``, so that the SDK passes it through as it is rather than as a connection error
    (which would be retried)."""


def status_failure(code: int, message: str, headers: Any) -> RequestFailed:
    """408/409/429 and 5xx are worth retrying (after the server's ``Retry-After``); others are not.
    A 3xx is a redirect that was not followed."""
    if 300 <= code < 400:
        location = str(headers.get("Location") or headers.get("location") or "?") if headers else "?"
        return RequestFailed(f"http {code}: redirect to {location[:100]!r} not followed", False)
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
    if isinstance(err, openai.APIConnectionError) and isinstance(err.__cause__, ResponseRefused):
        return RequestFailed(str(err.__cause__), False)
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
            async with asyncio.timeout(self.timeout_s):  # the body read included
                response = await self.client.chat.completions.create(**body, timeout=self.timeout_s)
        except ResponseRefused as err:
            raise RequestFailed(str(err), False) from err
        except TimeoutError as err:
            raise RequestFailed("timeout", True) from err
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


class _CappedStream(httpx.AsyncByteStream):
    """A response body that raises ``ResponseRefused`` past ``limit`` bytes."""

    def __init__(self, stream: Any, limit: int):
        self.stream, self.limit = stream, limit

    async def __aiter__(self):
        size = 0
        async for chunk in self.stream:
            size += len(chunk)
            if size > self.limit:
                raise ResponseRefused(f"response body over {self.limit} bytes (not read further)")
            yield chunk

    async def aclose(self) -> None:
        await self.stream.aclose()


class BoundedHTTPTransport(httpx.AsyncHTTPTransport):
    """The SDK's HTTP transport with a bounded body: it asks for ``identity`` (``bounded_sdk_client``), so
    an encoded body is refused rather than decompressed without a bound."""

    def __init__(self, max_response_bytes: int = MAX_RESPONSE_BYTES, **kwargs: Any):
        super().__init__(**kwargs)
        self.max_response_bytes = max_response_bytes

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await super().handle_async_request(request)
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            await response.aclose()
            raise ResponseRefused(f"response content-encoding {encoding[:20]!r} refused "
                                  "(identity was asked for)")
        return httpx.Response(response.status_code, headers=response.headers, extensions=response.extensions,
                              stream=_CappedStream(response.stream, self.max_response_bytes))


def bounded_sdk_client(timeout_s: float, max_response_bytes: int = MAX_RESPONSE_BYTES) -> httpx.AsyncClient:
    """The ``httpx`` client the SDK transport uses: no redirects followed, bodies bounded, no compression."""
    return httpx.AsyncClient(transport=BoundedHTTPTransport(max_response_bytes), follow_redirects=False,
                             timeout=timeout_s, headers={"Accept-Encoding": "identity"})


# ----------------------------------------------------------------------------- direct HTTP


def _error_message(code: int, raw: bytes) -> str:
    """What the SDK puts in an ``APIStatusError``: ``Error code: N``, then the body's error message."""
    message = f"Error code: {code}"
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
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
    """A 2xx body read as the SDK would: the first choice's message text, or why there is none.
    Never raises: a body of any shape (deeply nested JSON included) is a ``Completion`` with a problem."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, nested past the parser's depth
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
        reason = choice.get("finish_reason")
        return Completion(None, f"empty reply (finish_reason={reason if isinstance(reason, str) else None})",
                          usage)
    return Completion(content, None, usage)


async def read_bounded(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body as sent (still compressed), refused past ``limit`` bytes."""
    declared = response.content_length
    if declared is not None and declared > limit:
        raise RequestFailed(f"response body of {declared} bytes over the {limit}-byte bound", False)
    chunks, size = [], 0
    async for chunk in response.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > limit:
            raise RequestFailed(f"response body over {limit} bytes (not read further)", False)
        chunks.append(chunk)
    return b"".join(chunks)


def decode_body(raw: bytes, encoding: str | None, limit: int) -> bytes:
    """``raw`` decompressed as its Content-Encoding says, to at most ``limit`` bytes (a bomb stops there)."""
    encoding = (encoding or "identity").strip().lower()
    if encoding == "identity":
        return raw
    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise RequestFailed(f"response content-encoding {encoding[:20]!r} not supported", False)
    inflater = zlib.decompressobj(wbits=47)  # 32 + 15: a gzip or a zlib header, detected
    try:
        out = inflater.decompress(raw, limit + 1)
    except zlib.error as err:
        raise RequestFailed(f"response body not decodable as {encoding} ({err})", False) from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise RequestFailed(f"response body over {limit} bytes once decompressed ({len(raw)} sent)", False)
    return out


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

    def __init__(self, base_url: str, api_key: str, timeout_s: float, max_connections: int,
                 max_response_bytes: int = MAX_RESPONSE_BYTES):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.timeout_s, self.max_connections = timeout_s, max_connections
        self.max_response_bytes = max_response_bytes
        self._headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json",
                         "Accept": "application/json", "Accept-Encoding": "gzip, deflate",
                         "User-Agent": "stmed-judge"}
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
        # auto_decompress off: ``decode_body`` decompresses within the bound, aiohttp would not.
        self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                              timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        self._loop = loop
        if stale is not None and not stale.closed:
            await stale.close()
        return self._session

    async def complete(self, body: dict[str, Any]) -> Completion:
        session = await self._open()
        data = json.dumps(body, separators=(",", ":")).encode()
        try:
            async with asyncio.timeout(self.timeout_s):  # the whole exchange, a trickled body included
                async with session.post(self.url, data=data, headers=self._headers, proxy=self.proxy,
                                        allow_redirects=False) as response:
                    if 300 <= response.status < 400:
                        raise status_failure(response.status, "", response.headers)
                    raw = await read_bounded(response, self.max_response_bytes)
        except TimeoutError as err:  # before ClientError: aiohttp's timeouts are both
            raise RequestFailed("timeout", True) from err
        except aiohttp.ClientError as err:
            raise RequestFailed("connection error", True) from err
        raw = decode_body(raw, response.headers.get("Content-Encoding"), self.max_response_bytes)
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
