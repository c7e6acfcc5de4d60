"""The judge's ledger as one Ray actor, so that ``judge.budget_usd`` holds for the whole judge pool.

    ledger = start_ledger(output_dir / "ledger.jsonl", budget_usd=5.0)
    ds.map_batches(KeptPairJudge, fn_constructor_kwargs={..., "ledger": ledger}, ...)

Judge actors are separate processes: each reserving from a share of the budget would strand the share of
an idle actor and stop the round early. One actor holds the spend instead; it runs one call at a time, so
reserve → record is ordered, and it is the only writer of ``ledger.jsonl`` (no interleaved appends from
several processes, which shared storage does not promise to keep whole). It costs each request two small
actor calls (the reservation and the charge, ~1 ms on loopback), little beside a judge request's latency.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from stmed.judge.ledger import Charge, SpendLedger


def start_ledger(path: str | Path, budget_usd: float | None) -> Any:
    """A ``SpendLedger`` actor (no CPU reserved: it waits far more than it works)."""
    import ray

    return ray.remote(num_cpus=0, max_concurrency=1)(SpendLedger).remote(str(path), budget_usd)


class RemoteSpend:
    """The ``Spend`` calls (``stmed.judge.ledger``) sent to the ledger actor, awaited in any event loop
    (Ray Data runs an async UDF on a loop of its own thread: ``ref.future()`` is loop-agnostic)."""

    def __init__(self, handle: Any):
        self.handle = handle

    async def reserve(self, usd: float) -> str:
        return await asyncio.wrap_future(self.handle.reserve.remote(usd).future())

    async def record(self, charge: Charge, reserved_usd: float = 0.0) -> None:
        await asyncio.wrap_future(self.handle.record.remote(charge, reserved_usd).future())

    async def release(self, reserved_usd: float) -> None:
        await asyncio.wrap_future(self.handle.release.remote(reserved_usd).future())
