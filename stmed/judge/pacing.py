"""Pacing and retry timing for calls to a remote API: backoff, ``Retry-After``, RPM/TPM budgets.

Used by the judge (``stmed.judge.judging``), whose endpoint (GPT-4o or any OpenAI-compatible server)
rate-limits by requests and by tokens per minute and says how long to wait when it is overloaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC
from typing import Any

from stmed.log import get_logger

log = get_logger(__name__)

Sleep = Callable[[float], Awaitable[None]]

def retry_after_seconds(headers: Any, now: float | None = None) -> float | None:
    """Seconds the server asked us to wait: ``retry-after-ms``, or ``Retry-After`` as seconds or an
    HTTP date; None when absent or unreadable."""
    millis = headers.get("retry-after-ms")
    if millis:
        with contextlib.suppress(ValueError):
            return max(0.0, float(millis) / 1000)
    value = headers.get("retry-after")
    if not value:
        return None
    with contextlib.suppress(ValueError):
        return max(0.0, float(value))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        log.warning("ignoring an unreadable Retry-After header: %r", value)
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


def backoff_delay(attempt: int, base_s: float, max_s: float, retry_after: float | None = None,
                  rng: random.Random | None = None) -> float:
    """Full-jitter exponential backoff after failed attempt ``attempt`` (1-based), never shorter
    than the server's ``Retry-After``."""
    ceiling = min(max_s, base_s * 2 ** (attempt - 1))
    jitter = (rng or random).uniform(0.0, ceiling)
    return jitter if retry_after is None else max(retry_after, jitter)


class TokenBucket:
    """Paces a cost (requests or tokens) to ``per_minute`` by reservation.

    Each caller books its cost at once and sleeps until its turn, so concurrent callers queue in
    order without a lock (booking has no ``await`` inside). Admitted cost over any interval T never
    exceeds ``per_minute * T / 60`` plus one request: the bucket holds no saved-up credit, so idle
    time never turns into a burst.
    """

    def __init__(self, per_minute: float, clock: Callable[[], float] = time.monotonic):
        if per_minute <= 0:
            raise ValueError(f"a rate must be > 0 per minute, got {per_minute}")
        self.rate = per_minute / 60.0
        self.clock = clock
        self.free_at = clock()  # when the budget booked so far has been earned

    def book(self, start: float, cost: float) -> None:
        """Record ``cost`` as spent from ``start`` (not before ``free_at``)."""
        assert start >= self.free_at, "booking before the budget is earned"
        self.free_at = start + cost / self.rate

    def reserve(self, cost: float) -> float:
        """Book ``cost`` as early as possible and return how long to wait before using it."""
        now = self.clock()
        start = max(now, self.free_at)
        self.book(start, cost)
        return start - now

    def refund(self, cost: float) -> None:
        """Correct a booking (negative ``cost`` charges more), e.g. estimated vs. actual tokens."""
        self.free_at -= cost / self.rate


class RateLimiter:
    """Per-actor pacing: max requests in flight, requests/min and tokens/min.

    The run-wide RPM/TPM budgets are split evenly over ``num_actors`` (the actor pool's max size):
    actors never talk to each other, so each keeps to its share. An autoscaling pool that runs
    fewer actors than that leaves budget unused, but never exceeds it.
    """

    def __init__(self, max_in_flight: int, rpm: float | None = None, tpm: float | None = None,
                 num_actors: int = 1, clock: Callable[[], float] = time.monotonic, sleep: Sleep = asyncio.sleep):
        if num_actors < 1:
            raise ValueError(f"num_actors must be >= 1, got {num_actors}")
        self.requests = TokenBucket(rpm / num_actors, clock) if rpm else None
        self.tokens = TokenBucket(tpm / num_actors, clock) if tpm else None
        # Bound lazily to the running loop (Python >= 3.10), so creating it outside a loop is fine.
        self.in_flight = asyncio.Semaphore(max_in_flight)
        self.clock, self.sleep = clock, sleep

    def _reserve(self, tokens: int) -> float:
        """Book one request in both buckets at the same start time; returns the wait. (Booking each
        as early as it allows would let a request held back by TPM leave right after an earlier one
        held back too, breaking the RPM spacing.)"""
        costs = [(b, c) for b, c in ((self.requests, 1), (self.tokens, tokens)) if b is not None]
        now = self.clock()
        start = max([now] + [bucket.free_at for bucket, _ in costs])
        for bucket, cost in costs:
            bucket.book(start, cost)
        return start - now

    @contextlib.asynccontextmanager
    async def slot(self, tokens: int) -> AsyncIterator[None]:
        """Hold one in-flight slot, then wait for the rate budget. The slot is taken first so that a
        request leaves at its booked time rather than in a burst when a slot frees up."""
        async with self.in_flight:
            wait = self._reserve(tokens)
            if wait > 0:
                await self.sleep(wait)
            yield

    def settle(self, estimated_tokens: int, actual_tokens: int) -> None:
        if self.tokens is not None:
            self.tokens.refund(estimated_tokens - actual_tokens)
