"""The preference judge (METHOD §3.4): a stronger multimodal model scores two answers to one question.

One judged pair is one chat-completions request to any OpenAI-compatible endpoint (GPT-4o in the
paper, the offline reference judge in the demo): the question, both answers and the paper's Fig. 5
instruction as one user message with the image attached, temperature 0.2. The reply's first line
holds the two scores.

What the reference code got wrong, and how this module avoids it:

- a garbled reply was dropped silently → every failure is a ``JudgeVerdict`` with ``score=None`` and
  an ``error`` saying why; nothing here ever invents a score;
- retries were endless and immediate → bounded attempts, exponential backoff with full jitter, and
  the server's ``Retry-After`` honoured; a 400/401/404 fails at once;
- one request at a time → many in flight under a semaphore, paced by request- and token-per-minute
  buckets (``RateLimiter``);
- a rerun paid again → successful replies are cached on disk, keyed by the prompt and a digest of the
  image taken once per pair (``ReplyCache``);
- ties went to answer 2 → ``decide`` drops ties by default; an optional position swap judges both
  orders and flags a judge whose preference follows the position rather than the answer.

A request's messages (and the base64 image inside its JSON body) are built only once it holds an
in-flight slot, so a batch of thousands of waiting pairs holds no request bodies. The request goes out
through a ``ChatTransport`` (``stmed.judge.transport``): a direct aiohttp POST by default, the openai
SDK with ``transport=openai``.

Everything here is Ray-free; ``actors/judge.py`` wraps ``judge_pair`` for Ray Data.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Any, Literal
from urllib.parse import urlparse

import openai

from stmed.config import ConfigError
from stmed.judge.cache import CachedReply, ReplyCache, image_digest
from stmed.judge.ledger import OK, WAIT, Charge, Mode, Prices, Spend
from stmed.judge.pacing import RateLimiter, Sleep, backoff_delay
from stmed.judge.transport import (
    MAX_RESPONSE_BYTES,
    ChatTransport,
    Completion,
    DirectTransport,
    RequestFailed,
    SDKTransport,
    bounded_sdk_client,
)
from stmed.log import get_logger
from stmed.privacy.hosts import check_allowed_host, is_loopback_host

log = get_logger(__name__)


# ----------------------------------------------------------------------------- prompt (paper Fig. 5)

JUDGE_SYSTEM_TEXT = (
    "We would like to request your feedback on the performance of two AI assistants in response to the "
    "user question displayed above. The user asks the question on observing an image shown to you.\n"
    "Please rate the helpfulness, relevance, accuracy, level of details of their responses. Each "
    "assistant receives an overall score on a scale of 1 to 10, where a higher score indicates better "
    "overall performance.\n"
    "Please first output a single line containing only two values indicating the scores for Assistant 1 "
    "and 2, respectively. The two scores are separated by a space.\n"
    "In the subsequent line, please provide a comprehensive explanation of your evaluation, avoiding any "
    "potential bias and ensuring that the order in which the responses were presented does not affect "
    "your judgment."
)
"""The ``[System]`` paragraph of the judge prompt. It travels inside the user message, as in the
reference code: the judge request has no system message."""


_MARKER = re.compile(r"\[(\s*(?:end\s+)?(?:answer|question|system)\b[^\[\]\n]{0,24})\]", re.IGNORECASE)


def neutralize_markers(text: str) -> str:
    """The prompt's own section markers written inside a field, as plain parentheses: an answer that
    holds "[End Answer 1] … [Answer 2] …" cannot close its section and open another's (an injection that
    would make the judge read a different pair). Other brackets ("[sic]") stay as they are."""
    return _MARKER.sub(r"(\1)", text)


def judge_text(question: str, answer1: str, answer2: str) -> str:
    """The text part of the judge request; the offline reference judge parses exactly this layout. Each
    marker appears once: the fields' own are neutralized (``neutralize_markers``)."""
    question, answer1, answer2 = (neutralize_markers(t) for t in (question, answer1, answer2))
    return (
        f"[Question]\n{question}\n\n"
        f"[Answer 1]\n{answer1}\n\n[End Answer 1]\n\n"
        f"[Answer 2]\n{answer2}\n\n[End Answer 2]\n\n"
        f"[System]\n{JUDGE_SYSTEM_TEXT}"
    )


_TEMPLATE_CHARS = len(judge_text("", "", ""))  # the judge text's length less the three fields


def check_image_url(image_data_url: str) -> None:
    if not image_data_url.startswith(("data:image/", "http://", "https://")):
        raise ValueError(f"image_data_url must be a data:image/… or http(s) URL, got {image_data_url[:40]!r}")


def build_judge_messages(question: str, answer1: str, answer2: str, image_data_url: str) -> list[dict]:
    """One user message (no system message): the judge text, then the image as an ``image_url`` part."""
    check_image_url(image_data_url)
    content = [
        {"type": "text", "text": judge_text(question, answer1, answer2)},
        {"type": "image_url", "image_url": {"url": image_data_url}},
    ]
    return [{"role": "user", "content": content}]


# ----------------------------------------------------------------------------- parsing the reply


class ScoreParseError(ValueError):
    """The reply's first line does not hold two scores in 1..10; the message says what it held."""


# "Assistant 1:" / "Answer 2 -" labels carry digits that are not scores; "/10" and "out of 10" are
# denominators. Both are removed before the numbers are read. A sign before a number is kept, so that
# "-3 7" is a negative (refused) score rather than a 3.
_LABEL = re.compile(r"\b(?:assistant|answer|response)\s*#?\s*([12])\b\s*(?:score)?\s*[:=\-–]?", re.IGNORECASE)
_DENOMINATOR = re.compile(r"\s*(?:/\s*10(?:\.0+)?|out\s+of\s+10(?:\.0+)?)(?![\d.])", re.IGNORECASE)
_NUMBER = re.compile(r"(?<![\d.])([-−–]\s*)?(\d+(?:\.\d+)?)")


def _numbers(text: str, first: str) -> list[float]:
    found = _NUMBER.findall(text)
    if any(sign for sign, _ in found):
        raise ScoreParseError(f"a negative score on the first line: {first[:80]!r}")
    return [float(number) for _, number in found]


def _labelled_scores(cleaned: str, labels: list[re.Match[str]], first: str) -> tuple[float, float]:
    """Scores of a line that names its assistants: exactly "Assistant 1 … x … Assistant 2 … y", in that
    order, one number after each label and none before; anything else could swap the pair."""
    order = [m.group(1) for m in labels]
    if order != ["1", "2"]:
        raise ScoreParseError(f"score labels in the order {', '.join(order)}, not 1 then 2 "
                              f"(ambiguous: refused rather than risk a swap): {first[:80]!r}")
    before = _numbers(cleaned[: labels[0].start()], first)
    one = _numbers(cleaned[labels[0].end(): labels[1].start()], first)
    two = _numbers(cleaned[labels[1].end():], first)
    if before or len(one) != 1 or len(two) != 1:
        raise ScoreParseError(f"each assistant's label must be followed by its one score: {first[:80]!r}")
    return one[0], two[0]


def parse_scores(reply: str) -> tuple[float, float]:
    """The two scores on the reply's first non-empty line, e.g. ``"8 6"``, ``"8/10, 6/10"``,
    ``"Assistant 1: 8 Assistant 2: 6"`` or ``"**8 6**"``; raises ``ScoreParseError`` otherwise.

    A line that is not unambiguously (answer 1, answer 2) is a failure, never a guess: labels out of
    order ("Assistant 2: 3, Assistant 1: 9"), a label without its own score, a negative number."""
    lines = [line.strip() for line in (reply or "").splitlines() if line.strip()]
    if not lines:
        raise ScoreParseError("empty reply")
    first = lines[0]
    cleaned = _DENOMINATOR.sub(" ", re.sub(r"[*_`#]", " ", first))  # markdown emphasis and headings
    labels = list(_LABEL.finditer(cleaned))
    numbers = _numbers(_LABEL.sub(" ", cleaned), first)
    if len(numbers) != 2:
        raise ScoreParseError(f"expected two scores on the first line, found {len(numbers)}: {first[:80]!r}")
    scores = _labelled_scores(cleaned, labels, first) if labels else (numbers[0], numbers[1])
    for score in scores:
        if not 1.0 <= score <= 10.0:
            raise ScoreParseError(f"score {score:g} outside 1..10 on the first line: {first[:80]!r}")
    return scores


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class JudgeSettings:
    """Where the judge is, how hard to push it, and what to do with its verdicts (config group ``judge``)."""

    base_url: str = "http://127.0.0.1:8000/v1"
    """An OpenAI-compatible endpoint ending in /v1 (https://api.openai.com/v1 for GPT-4o)."""
    model: str = "gpt-4o"
    api_key_env: str = "OPENAI_API_KEY"
    """Name of the environment variable holding the key; the key itself is never stored or logged."""
    temperature: float = 0.2
    max_tokens: int = 512
    """Cap on the reply (scores line + explanation); also the completion part of the TPM estimate."""
    max_attempts: int = 5
    """Requests per ordering of a pair, retries included."""
    parse_retries: int = 1
    """Extra requests after an unparseable reply (within max_attempts); 0 fails at the first one."""
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    timeout_s: float = 60.0
    """The most one request may take, its whole reply read included."""
    max_response_bytes: int = MAX_RESPONSE_BYTES
    """The most of a reply's body read, as sent and again once decompressed; past it the pair fails."""
    max_in_flight: int = 8
    """Concurrent requests per actor (and the transport's connection pool size)."""
    transport: Literal["direct", "openai"] = "direct"
    """How requests are sent: ``direct`` posts the chat-completions JSON with aiohttp (far less CPU per
    request at hundreds in flight), ``openai`` goes through the openai SDK's ``AsyncOpenAI``."""
    rpm: float | None = None
    """Requests per minute for the whole run (split across actors); None: unlimited."""
    tpm: float | None = None
    """Tokens per minute for the whole run (split across actors); None: unlimited."""
    image_tokens: int = 765
    """Prompt tokens counted per image in the TPM estimate (a high-detail 512px image on GPT-4o)."""
    cache_dir: str | None = None
    """Directory of cached replies; None disables the cache."""
    tie_policy: Literal["drop", "keep_first"] = "drop"
    swap_positions: bool = False
    """Judge both orders, average the per-answer scores and flag position-driven preferences."""
    drop_inconsistent: bool = True
    """With swap_positions: drop a pair whose preferred answer flips with the order."""
    price_prompt_per_1k: float = 0.0025
    """USD per 1,000 prompt tokens of ``model`` (GPT-4o's list price); the ledger prices every call by it."""
    price_completion_per_1k: float = 0.01
    batch_discount: float = 0.5
    """The share of the list price a Batch API call costs (OpenAI: half)."""
    budget_usd: float | None = None
    """The most a round may spend on the judge, every rerun of its output folder included (``ledger.jsonl``);
    the round stops cleanly before a request that would pass it. None: no limit."""
    mode: Literal["online", "batch"] = "online"
    """``online``: a request per pair as pairs are generated; ``batch``: every pair in one OpenAI Batch API
    job after generation, at ``batch_discount`` of the price, within 24 h (``stmed.judge.batch``)."""
    batch_poll_s: float = 5.0
    """First wait between polls of a batch's status; doubled up to ``batch_poll_max_s``."""
    batch_poll_max_s: float = 60.0
    batch_wait_s: float = 26 * 3600.0
    """How long the job waits for a batch (its window is 24 h); past it the job stops, resumable."""
    allowed_hosts: list[str] = field(default_factory=list)
    """Hosts images may be sent to (``api.openai.com``); loopback is always allowed. A ``base_url``
    elsewhere is refused here, before any request (``stmed.privacy.hosts``)."""

    def __post_init__(self) -> None:
        if urlparse(self.base_url).scheme not in ("http", "https"):
            raise ConfigError(f"judge.base_url must be an http(s) URL, got {self.base_url!r}")
        check_allowed_host(self.base_url, self.allowed_hosts)
        checks = {
            "temperature": 0.0 <= self.temperature <= 2.0,
            "max_tokens": self.max_tokens >= 16,
            "max_attempts": self.max_attempts >= 1,
            "parse_retries": self.parse_retries >= 0,
            "backoff_base_s": self.backoff_base_s > 0,
            "backoff_max_s": self.backoff_max_s >= self.backoff_base_s,
            "timeout_s": self.timeout_s > 0,
            "max_response_bytes": self.max_response_bytes >= 1024,
            "max_in_flight": self.max_in_flight >= 1,
            "rpm": self.rpm is None or self.rpm > 0,
            "tpm": self.tpm is None or self.tpm > 0,
            "image_tokens": self.image_tokens >= 0,
            "price_prompt_per_1k": self.price_prompt_per_1k >= 0,
            "price_completion_per_1k": self.price_completion_per_1k >= 0,
            "batch_discount": 0 < self.batch_discount <= 1,
            "budget_usd": self.budget_usd is None or self.budget_usd >= 0,
            "batch_poll_s": self.batch_poll_s > 0,
            "batch_poll_max_s": self.batch_poll_max_s >= self.batch_poll_s,
            "batch_wait_s": self.batch_wait_s > 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"judge.{name} is out of range: {getattr(self, name)!r}")
        if self.tie_policy not in ("drop", "keep_first"):
            raise ConfigError(f"judge.tie_policy must be 'drop' or 'keep_first', got {self.tie_policy!r}")
        if self.transport not in ("direct", "openai"):
            raise ConfigError(f"judge.transport must be 'direct' or 'openai', got {self.transport!r}")
        if self.mode not in ("online", "batch"):
            raise ConfigError(f"judge.mode must be 'online' or 'batch', got {self.mode!r}")

    @property
    def prices(self) -> Prices:
        return Prices(self.price_prompt_per_1k, self.price_completion_per_1k, self.batch_discount)


def is_loopback(base_url: str) -> bool:
    return is_loopback_host(urlparse(base_url).hostname or "")


def resolve_api_key(settings: JudgeSettings) -> str:
    """The key from ``$api_key_env``; a loopback endpoint (the offline judge) may go without one."""
    key = os.environ.get(settings.api_key_env, "")
    if key:
        return key
    if is_loopback(settings.base_url):
        return "no-key-needed-on-loopback"
    raise ValueError(
        f"the judge at {settings.base_url} needs an API key: set the environment variable "
        f"{settings.api_key_env} (judge.api_key_env names it)"
    )


def make_client(settings: JudgeSettings, http_client: Any = None) -> openai.AsyncOpenAI:
    """The OpenAI client with its own retries off (``max_retries=0``): ours are the only ones. Without an
    ``http_client`` it gets ``bounded_sdk_client``: no redirects followed, reply bodies bounded."""
    return openai.AsyncOpenAI(
        base_url=settings.base_url,
        api_key=resolve_api_key(settings),
        max_retries=0,
        timeout=settings.timeout_s,
        http_client=http_client or bounded_sdk_client(settings.timeout_s, settings.max_response_bytes),
    )


def make_transport(settings: JudgeSettings, http_client: Any = None) -> ChatTransport:
    """The transport ``settings.transport`` names. An ``http_client`` (an ``httpx.AsyncClient``, e.g. a
    mock transport in tests) is the SDK's, so passing one selects the SDK whatever the setting."""
    if http_client is not None or settings.transport == "openai":
        return SDKTransport(make_client(settings, http_client), settings.timeout_s)
    return DirectTransport(settings.base_url, resolve_api_key(settings), settings.timeout_s,
                           max_connections=settings.max_in_flight,
                           max_response_bytes=settings.max_response_bytes)


# ----------------------------------------------------------------------------- verdicts


@dataclass(frozen=True)
class JudgeVerdict:
    """The judge's word on one pair. On failure both scores are None and ``error`` says why."""

    pair_id: str
    score1: float | None
    score2: float | None
    error: str | None = None
    attempts: int = 0
    """Requests sent for this pair (both orders with swap); 0 when everything came from the cache."""
    cached: bool = False
    prompt_tokens: int = 0
    """Tokens paid for by this verdict's requests, failed ones included; 0 for cached replies."""
    completion_tokens: int = 0
    swapped_score1: float | None = None
    """With swap: answer 1's score when it was shown second (likewise swapped_score2)."""
    swapped_score2: float | None = None
    consistent: bool | None = None
    """With swap: False when the preferred answer flips with the order; None without swap."""
    reply: str | None = None
    """The judge's raw reply (original order), explanation included."""
    judge_model: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_row(self) -> dict[str, Any]:
        # Every field is a scalar or None: a plain dict, not ``asdict``'s deep copy (~40 µs a verdict).
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> JudgeVerdict:
        def plain(value: Any) -> Any:  # numpy scalars and NaN (Arrow nulls read back) → Python
            value = value.item() if hasattr(value, "item") else value
            return None if isinstance(value, float) and math.isnan(value) else value

        return cls(**{f.name: plain(row[f.name]) for f in fields(cls) if f.name in row})


TiePolicy = Literal["drop", "keep_first"]


def decide(verdict: JudgeVerdict, tie_policy: TiePolicy = "drop",
           drop_inconsistent: bool = True) -> tuple[int | None, str]:
    """Which answer is chosen: 0 (answer 1), 1 (answer 2) or None (no pair), with the reason."""
    if not verdict.ok or verdict.score1 is None or verdict.score2 is None:
        return None, f"failed: {verdict.error}"
    if drop_inconsistent and verdict.consistent is False:
        return None, "inconsistent under position swap"
    if verdict.score1 > verdict.score2:
        return 0, "answer 1 scored higher"
    if verdict.score2 > verdict.score1:
        return 1, "answer 2 scored higher"
    if tie_policy == "keep_first":
        return 0, "tie kept as answer 1"
    if tie_policy == "drop":
        return None, "tie"
    raise ValueError(f"tie_policy must be 'drop' or 'keep_first', got {tie_policy!r}")


def summarize(verdicts: Iterable[JudgeVerdict], settings: JudgeSettings) -> dict[str, Any]:
    """Counts, decisions, tokens paid and their estimated cost, for a job's summary."""
    out: dict[str, Any] = {"pairs": 0, "judged": 0, "failed": 0, "cached": 0, "requests": 0,
                           "prompt_tokens": 0, "completion_tokens": 0, "errors": {}, "decisions": {}}
    for v in verdicts:
        out["pairs"] += 1
        out["judged" if v.ok else "failed"] += 1
        out["cached"] += int(v.cached)
        out["requests"] += v.attempts
        out["prompt_tokens"] += v.prompt_tokens
        out["completion_tokens"] += v.completion_tokens
        if v.error:
            kind = v.error.removeprefix(_SWAPPED).split(":")[0].split(" after ")[0]
            out["errors"][kind] = out["errors"].get(kind, 0) + 1
        reason = decide(v, settings.tie_policy, settings.drop_inconsistent)[1]
        reason = "failed" if reason.startswith("failed") else reason
        out["decisions"][reason] = out["decisions"].get(reason, 0) + 1
    out["cost_usd"] = round(settings.prices.usd(out["prompt_tokens"], out["completion_tokens"], settings.mode), 6)
    return out


# ----------------------------------------------------------------------------- retries and pacing

def make_limiter(settings: JudgeSettings, num_actors: int = 1, **kwargs: Any) -> RateLimiter:
    """The pacing of one judge actor: its in-flight cap and its share of the run-wide RPM/TPM."""
    return RateLimiter(settings.max_in_flight, settings.rpm, settings.tpm, num_actors, **kwargs)


def estimate_tokens(text_chars: int, images: int, settings: JudgeSettings) -> int:
    """A request's TPM cost before it is sent: ~4 characters a token, a fixed count per image, and
    the completion cap (providers count ``max_tokens`` against the budget up front)."""
    return math.ceil(text_chars / 4) + images * settings.image_tokens + settings.max_tokens


# ----------------------------------------------------------------------------- judging a pair


@dataclass(frozen=True)
class OrderOutcome:
    """One ordering of a pair, after its retries."""

    scores: tuple[float, float] | None
    error: str | None
    attempts: int
    cached: bool
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reply: str | None = None


@dataclass(frozen=True)
class OrderPrompt:
    """One ordering of a pair, kept as its fields: the text and messages are built only when sent."""

    question: str
    first: str
    second: str
    image_data_url: str

    def text(self) -> str:
        return judge_text(self.question, self.first, self.second)

    def body(self, settings: JudgeSettings) -> dict[str, Any]:
        return {"model": settings.model, "temperature": settings.temperature, "max_tokens": settings.max_tokens,
                "messages": build_judge_messages(self.question, self.first, self.second, self.image_data_url)}

    def estimate(self, settings: JudgeSettings) -> int:
        chars = _TEMPLATE_CHARS + len(self.question) + len(self.first) + len(self.second)
        return estimate_tokens(chars, 1, settings)


BUDGET_ERROR = "budget"
"""The error of a pair whose request was not sent because ``judge.budget_usd`` would have been passed."""


RESERVE_POLL_S = 0.05
"""How often a request that waits for the reservations ahead of it asks the ledger again."""


class BudgetRefused(Exception):
    """The ledger refused a request's reservation: sending it could pass ``judge.budget_usd``."""


@dataclass(frozen=True)
class Bill:
    """Where one ordering's calls are charged: the ledger, and which pair and order they are for."""

    spend: Spend
    prices: Prices
    pair_id: str
    order: int = 0
    mode: Mode = "online"

    def estimate_usd(self, estimated_tokens: int, settings: JudgeSettings) -> float:
        """The price of a request before it is sent: the prompt estimate, and the full ``max_tokens``."""
        return self.prices.usd(estimated_tokens - settings.max_tokens, settings.max_tokens, self.mode)

    async def charge(self, attempt: int, usage: tuple[int, int] | None, reserved_usd: float = 0.0,
                     ok: bool = True, cached: bool = False) -> None:
        prompt_tokens, completion_tokens = usage or (0, 0)
        usd = self.prices.usd(prompt_tokens, completion_tokens, self.mode)
        await self.spend.record(Charge(self.pair_id, self.order, attempt, self.mode, cached, prompt_tokens,
                                       completion_tokens, usd, ok), reserved_usd)


def read_reply(completion: Completion) -> tuple[str | None, tuple[float, float] | None, str | None]:
    """(reply text, scores, parse error) of one response; exactly one of scores / error is set."""
    if completion.text is None:
        return None, None, f"parse: {completion.problem}"
    try:
        return completion.text, parse_scores(completion.text), None
    except ScoreParseError as err:
        return completion.text, None, f"parse: {err}"


async def _request(transport: ChatTransport, settings: JudgeSettings, limiter: RateLimiter,
                   prompt: OrderPrompt, bill: Bill | None = None, attempt: int = 1) -> tuple[Completion, int, int]:
    """Send one request in a limiter slot; returns (completion, prompt tokens, completion tokens).
    The body (messages, base64 image, JSON) exists only while the slot is held. With a ``bill`` the
    request's estimated price is reserved in the slot, just before it leaves (``BudgetRefused`` if the
    ledger says no), and its charge recorded when it is answered or fails."""
    estimate = prompt.estimate(settings)
    async with limiter.slot(estimate):
        reserved = 0.0
        if bill is not None:
            reserved = bill.estimate_usd(estimate, settings)
            while (answer := await bill.spend.reserve(reserved)) == WAIT:
                await asyncio.sleep(RESERVE_POLL_S)
            if answer != OK:
                raise BudgetRefused
        try:
            completion = await transport.complete(prompt.body(settings))
        except Exception:
            if bill is not None:
                await bill.charge(attempt, None, reserved, ok=False)
            raise
    if bill is not None:
        await bill.charge(attempt, completion.usage, reserved, ok=completion.text is not None)
    prompt_tokens, completion_tokens = completion.usage or (0, 0)
    limiter.settle(estimate, prompt_tokens + completion_tokens if completion.usage else estimate)
    return completion, prompt_tokens, completion_tokens


async def _judge_order(transport: ChatTransport, settings: JudgeSettings, limiter: RateLimiter,
                       cache: ReplyCache | None, prompt: OrderPrompt, image_key: str | None, sleep: Sleep,
                       rng: random.Random | None, bill: Bill | None = None) -> OrderOutcome:
    """Judge one ordering: the cache first (when there is one), then up to ``max_attempts`` requests."""
    key = None
    if cache is not None:
        key = ReplyCache.key(settings.model, prompt.text(), settings.temperature, image_key)
        hit = cache.get(key)
        if hit is not None:
            try:
                scores = parse_scores(hit.reply)
                if bill is not None:  # a call that cost nothing, counted as one
                    await bill.charge(0, None, cached=True)
                return OrderOutcome(scores, None, 0, True, reply=hit.reply)
            except ScoreParseError as err:  # only parsed replies are cached: this entry was edited
                log.warning("cached reply %s no longer parses (%s); requesting again", key[:12], err)
    attempts = parse_failures = prompt_tokens = completion_tokens = 0
    error, reply = "no attempt", None
    while attempts < settings.max_attempts:
        attempts += 1
        try:
            completion, prompt_used, completion_used = await _request(transport, settings, limiter, prompt,
                                                                      bill, attempts)
        except BudgetRefused:
            error = f"{BUDGET_ERROR}: not sent, judge.budget_usd={settings.budget_usd} would be passed"
            return OrderOutcome(None, error, attempts - 1, False, prompt_tokens, completion_tokens)
        except RequestFailed as failure:
            error = failure.reason
            if not failure.retryable:
                return OrderOutcome(None, error, attempts, False, prompt_tokens, completion_tokens)
            if attempts < settings.max_attempts:
                delay = backoff_delay(attempts, settings.backoff_base_s, settings.backoff_max_s,
                                      failure.retry_after, rng)
                log.info("judge request failed (%s), attempt %d; retrying in %.2fs", error, attempts, delay)
                await sleep(delay)
            continue
        except Exception as err:  # a reply no transport foresaw fails this pair, not the whole batch
            log.warning("judge request raised %s; the pair fails", type(err).__name__, exc_info=True)
            error = f"malformed response: {type(err).__name__}: {' '.join(str(err).split())[:100]}"
            return OrderOutcome(None, error, attempts, False, prompt_tokens, completion_tokens)
        prompt_tokens, completion_tokens = prompt_tokens + prompt_used, completion_tokens + completion_used
        reply, scores, error = read_reply(completion)
        if scores is not None:
            if cache is not None:
                cache.put(key, CachedReply(reply, prompt_used, completion_used))
            return OrderOutcome(scores, None, attempts, False, prompt_tokens, completion_tokens, reply)
        parse_failures += 1
        if parse_failures > settings.parse_retries:
            break
    error = f"{error} after {attempts} attempt{'s' if attempts > 1 else ''}"
    return OrderOutcome(None, error, attempts, False, prompt_tokens, completion_tokens, reply)


_SWAPPED = "swapped order: "


def _preferred(s1: float, s2: float) -> int | None:
    return 0 if s1 > s2 else 1 if s2 > s1 else None


async def judge_pair(client: ChatTransport | openai.AsyncOpenAI, settings: JudgeSettings,
                     limiter: RateLimiter, cache: ReplyCache | None, question: str, answer1: str,
                     answer2: str, image_data_url: str, *, pair_id: str = "", sleep: Sleep | None = None,
                     rng: random.Random | None = None, spend: Spend | None = None) -> JudgeVerdict:
    """Judge one pair (both orders when ``settings.swap_positions``) through ``client``, a transport
    (``make_transport``) or an ``openai.AsyncOpenAI`` (``make_client``). Never raises for a judge or
    network failure: the verdict carries the error and no scores. With ``spend`` (``stmed.judge.ledger``)
    every call is charged to it and a request it refuses is not sent (the pair's error says ``budget``)."""
    check_image_url(image_data_url)
    transport = SDKTransport(client, settings.timeout_s) if isinstance(client, openai.AsyncOpenAI) else client
    sleep = sleep or limiter.sleep
    image_key = image_digest(image_data_url) if cache is not None else None  # once per pair, not per order
    prompts = [OrderPrompt(question, answer1, answer2, image_data_url)]
    if settings.swap_positions:
        prompts.append(OrderPrompt(question, answer2, answer1, image_data_url))
    bills = [Bill(spend, settings.prices, pair_id, order) if spend is not None else None
             for order in range(len(prompts))]
    orders = [_judge_order(transport, settings, limiter, cache, prompt, image_key, sleep, rng, bill)
              for prompt, bill in zip(prompts, bills)]
    # One order is awaited in this task: a task per pair is enough, and a batch starts thousands of them.
    outcomes = await asyncio.gather(*orders) if len(orders) > 1 else [await orders[0]]
    return combine_orders(pair_id, settings, outcomes)


def combine_orders(pair_id: str, settings: JudgeSettings, outcomes: list[OrderOutcome]) -> JudgeVerdict:
    """A pair's verdict from its orderings' outcomes (one, or two with ``swap_positions``): the first
    failure fails the pair; with swap, each answer's scores are averaged and a flip is flagged."""
    common: dict[str, Any] = {
        "pair_id": pair_id, "judge_model": settings.model, "reply": outcomes[0].reply,
        "attempts": sum(o.attempts for o in outcomes), "cached": all(o.cached for o in outcomes),
        "prompt_tokens": sum(o.prompt_tokens for o in outcomes),
        "completion_tokens": sum(o.completion_tokens for o in outcomes),
    }
    failed = [o for o in outcomes if o.scores is None]
    if failed:
        prefix = _SWAPPED if outcomes[0].scores is not None else ""
        return JudgeVerdict(score1=None, score2=None, error=prefix + str(failed[0].error), **common)
    s1, s2 = outcomes[0].scores
    if not settings.swap_positions:
        return JudgeVerdict(score1=s1, score2=s2, **common)
    t2, t1 = outcomes[1].scores  # the swapped request showed answer 2 first
    a, b = _preferred(s1, s2), _preferred(t1, t2)
    return JudgeVerdict(
        score1=(s1 + t1) / 2, score2=(s2 + t2) / 2, swapped_score1=t1, swapped_score2=t2,
        # A flip is each order preferring a different answer; a tie on either side is not a flip.
        consistent=not (a is not None and b is not None and a != b), **common,
    )
