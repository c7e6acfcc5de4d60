"""What the judge costs: a line per call in ``ledger.jsonl``, and a budget that stops a round before it is
overspent.

Every judge call (one request of one ordering of a pair, retries each a call of their own; a cache hit
a call that cost nothing) is a ``Charge``: the pair, the attempt, the tokens the server reported, their
price and the mode (``online`` at list price, ``batch`` at ``judge.batch_discount`` of it). Never the
prompt, the answers, the reply or the image: the ledger may be shared as a bill.

``SpendLedger`` owns the file and the budget. Before a request is sent its estimated price is
*reserved* (``reserve``), as the RPM/TPM buckets book a request before it leaves; the answer's charge
replaces the reservation (``record``). The spend counts every run of this output folder (the ledger is
read back on resume). A request is refused (``NO``) when the spend plus its estimate would pass
``judge.budget_usd``; when only the other requests' reservations stand in the way it waits (``WAIT``)
for them to settle, since most requests cost well under their estimate. So the spend never passes the
budget by more than the in-flight requests' actual cost exceeds their estimate: the completion is
capped by ``max_tokens``, which the estimate counts in full, so only a prompt that costs more tokens
than ``estimate_tokens`` guessed (an image over ``judge.image_tokens``) can overshoot, by that
difference, for the requests in flight.

In a Ray run the ledger is one actor (``actors/ledger.py``) that every judge actor reserves from, so the
budget holds for the whole pool; without Ray, ``LocalSpend`` wraps one in the same process.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from stmed.log import get_logger
from stmed.runs import MetricsLog

log = get_logger(__name__)

LEDGER_FILE = "ledger.jsonl"
OK, WAIT, NO = "ok", "wait", "no"
"""``SpendLedger.reserve``'s answers: send it; ask again once requests in flight have settled; never."""
Mode = Literal["online", "batch"]


@dataclass(frozen=True)
class Prices:
    """USD per 1,000 tokens of the judge model, and the share of it a Batch API call costs."""

    prompt_per_1k: float
    completion_per_1k: float
    batch_discount: float = 0.5

    def usd(self, prompt_tokens: int, completion_tokens: int, mode: Mode = "online") -> float:
        price = prompt_tokens / 1000 * self.prompt_per_1k + completion_tokens / 1000 * self.completion_per_1k
        return price * (self.batch_discount if mode == "batch" else 1.0)


@dataclass(frozen=True)
class Charge:
    """One judge call as the ledger records it (no text, no image)."""

    pair_id: str
    order: int
    """0: the pair as generated; 1: the swapped order (``judge.swap_positions``)."""
    attempt: int
    """1-based request number of this order; 0 for a cache hit."""
    mode: Mode
    cached: bool
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usd: float = 0.0
    ok: bool = True
    """False when the call got no reply text (an HTTP error, a timeout, an empty reply); a reply that
    does not parse is a call answered (and paid)."""

    def to_row(self) -> dict[str, Any]:
        return {**asdict(self), "usd": round(self.usd, 8)}


class SpendLedger:
    """``ledger.jsonl`` and the budget; one instance per run (the Ray actor, or the driver's own)."""

    def __init__(self, path: str | os.PathLike | None, budget_usd: float | None = None):
        self.log = MetricsLog(path) if path is not None else None
        self.budget_usd = budget_usd
        earlier = self.log.read() if self.log is not None else []
        self.earlier_usd = sum(float(row.get("usd") or 0.0) for row in earlier)
        self.spent_usd = 0.0  # this run's
        self.reserved_usd = 0.0
        self.refused = 0
        self.totals = _Totals()

    @property
    def total_usd(self) -> float:
        return self.earlier_usd + self.spent_usd

    def reserve(self, usd: float) -> str:
        """Book ``usd`` for a request about to be sent (``OK``), unless the budget could be passed: ``NO``
        when the spend alone leaves no room for it, else ``WAIT`` for the reservations ahead of it."""
        if self.budget_usd is not None and self.total_usd + self.reserved_usd + usd > self.budget_usd:
            if self.total_usd + usd > self.budget_usd or self.reserved_usd == 0:
                self.refused += 1
                return NO
            return WAIT
        self.reserved_usd += usd
        return OK

    def hold(self, usd: float) -> None:
        """Book ``usd`` for a request already sent (a batch a killed run created), whatever the budget."""
        self.reserved_usd += usd

    def record(self, charge: Charge, reserved_usd: float = 0.0) -> None:
        """A call's charge in place of its reservation (``reserved_usd``, 0 for a cache hit)."""
        self.reserved_usd = max(0.0, self.reserved_usd - reserved_usd)
        self.spent_usd += charge.usd
        self.totals.add(charge)
        if self.log is not None:
            self.log.write(charge.to_row())

    def release(self, reserved_usd: float) -> None:
        """A reservation whose request was never sent."""
        self.reserved_usd = max(0.0, self.reserved_usd - reserved_usd)

    def state(self) -> dict[str, Any]:
        """What a summary holds of this run's spend (and the runs before it in this folder)."""
        return {**self.totals.row(), "usd_this_run": round(self.spent_usd, 8),
                "usd_earlier_runs": round(self.earlier_usd, 8), "usd": round(self.total_usd, 8),
                "budget_usd": self.budget_usd, "refused": self.refused}


@dataclass
class _Totals:
    calls: int = 0
    cached_calls: int = 0
    failed_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    online_usd: float = 0.0
    batch_usd: float = 0.0

    def add(self, charge: Charge) -> None:
        self.calls += 1
        self.cached_calls += int(charge.cached)
        self.failed_calls += int(not charge.ok)
        self.prompt_tokens += charge.prompt_tokens
        self.completion_tokens += charge.completion_tokens
        if charge.mode == "batch":
            self.batch_usd += charge.usd
        else:
            self.online_usd += charge.usd

    def row(self) -> dict[str, Any]:
        return {**asdict(self), "online_usd": round(self.online_usd, 8), "batch_usd": round(self.batch_usd, 8)}


def read_ledger(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every charge written to ``path`` (a torn last line skipped), across every run of the folder."""
    return MetricsLog(path).read()


def ledger_totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Calls, tokens and USD of ledger rows, by mode."""
    totals = _Totals()
    for row in rows:
        totals.add(Charge(**{k: row[k] for k in Charge.__dataclass_fields__ if k in row}))
    out = totals.row()
    out["usd"] = round(totals.online_usd + totals.batch_usd, 8)
    return out


def per_pair(spend: dict[str, Any], judged_pairs: int, kept_pairs: int) -> dict[str, Any]:
    """The spend per judged answer pair and per preference pair kept (None when there are none)."""
    usd = float(spend.get("usd") or 0.0)
    return {"judged_pairs": judged_pairs, "kept_pairs": kept_pairs,
            "usd_per_judged_pair": round(usd / judged_pairs, 8) if judged_pairs else None,
            "usd_per_kept_pair": round(usd / kept_pairs, 8) if kept_pairs else None}


class Spend(Protocol):
    """What the judge asks of a ledger, awaited: the local one or the Ray actor's handle."""

    async def reserve(self, usd: float) -> str: ...

    async def record(self, charge: Charge, reserved_usd: float = 0.0) -> None: ...

    async def release(self, reserved_usd: float) -> None: ...


class LocalSpend:
    """A ``SpendLedger`` in this process behind the awaited ``Spend`` calls."""

    def __init__(self, ledger: SpendLedger):
        self.ledger = ledger

    async def reserve(self, usd: float) -> str:
        return self.ledger.reserve(usd)

    async def record(self, charge: Charge, reserved_usd: float = 0.0) -> None:
        self.ledger.record(charge, reserved_usd)

    async def release(self, reserved_usd: float) -> None:
        self.ledger.release(reserved_usd)


def ledger_path(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / LEDGER_FILE
