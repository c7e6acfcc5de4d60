"""The judge's ledger: a charge per call at the configured prices (the Batch discount too), cache hits
counted at zero, and a budget that refuses requests before they are sent and is read back on resume."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from stmed.judge.cache import ReplyCache
from stmed.judge.judging import BUDGET_ERROR, JudgeSettings, judge_pair, make_limiter
from stmed.judge.ledger import LocalSpend, Prices, SpendLedger, ledger_totals, per_pair, read_ledger
from stmed.judge.transport import Completion, RequestFailed

IMAGE = "data:image/png;base64,iVBORw0KGgo="
LOCAL = "http://127.0.0.1:9/v1"  # never contacted: the fake transport answers


class FakeTransport:
    """Answers "8 6" with 1,000 prompt and 100 completion tokens; the first ``fail_first`` calls get 500."""

    def __init__(self, fail_first: int = 0):
        self.calls, self.fail_first = 0, fail_first

    async def complete(self, body: dict) -> Completion:
        self.calls += 1
        number = self.calls
        await asyncio.sleep(0.001)
        if number <= self.fail_first:
            raise RequestFailed("http 500", True)
        return Completion("8 6\nreasons", usage=(1000, 100))

    async def close(self) -> None: ...


def settings(**overrides) -> JudgeSettings:
    values = {"base_url": LOCAL, "model": "judge", "backoff_base_s": 0.001, "backoff_max_s": 0.002,
              "price_prompt_per_1k": 0.0025, "price_completion_per_1k": 0.01, "max_tokens": 100} | overrides
    return JudgeSettings(**values)


def judge_all(cfg: JudgeSettings, transport: FakeTransport, ledger: SpendLedger, pairs: int,
              cache: ReplyCache | None = None) -> list:
    limiter = make_limiter(cfg)

    async def run() -> list:
        return await asyncio.gather(*(judge_pair(transport, cfg, limiter, cache, f"q{i}?", "a", "b", IMAGE,
                                                 pair_id=f"p{i}", spend=LocalSpend(ledger)) for i in range(pairs)))
    return asyncio.run(run())


def test_prices_list_and_batch():
    prices = Prices(prompt_per_1k=0.0025, completion_per_1k=0.01, batch_discount=0.5)
    assert prices.usd(1000, 100) == pytest.approx(0.0035)
    assert prices.usd(1000, 100, "batch") == pytest.approx(0.00175)


def test_every_call_is_charged_and_a_cache_hit_costs_nothing(tmp_path: Path):
    path, cache = tmp_path / "ledger.jsonl", ReplyCache(tmp_path / "cache")
    cfg = settings(swap_positions=True)
    ledger = SpendLedger(path)
    verdicts = judge_all(cfg, FakeTransport(fail_first=1), ledger, pairs=2, cache=cache)
    assert all(v.ok for v in verdicts)
    rows = read_ledger(path)
    # 2 pairs x 2 orders = 4 answered calls, plus the one that got a 500 (unpaid: no usage)
    assert len(rows) == 5 and sum(not r["ok"] for r in rows) == 1
    assert {(r["pair_id"], r["order"]) for r in rows} == {("p0", 0), ("p0", 1), ("p1", 0), ("p1", 1)}
    assert not any("q0" in json.dumps(r) or "iVBOR" in json.dumps(r) for r in rows)  # no prompt, no image
    assert sum(r["usd"] for r in rows) == pytest.approx(4 * 0.0035)
    assert ledger.state()["usd_this_run"] == pytest.approx(4 * 0.0035)

    again = SpendLedger(path)  # a rerun reads what was spent before and pays nothing for cached replies
    assert again.earlier_usd == pytest.approx(4 * 0.0035)
    judge_all(cfg, FakeTransport(), again, pairs=2, cache=cache)
    totals = ledger_totals(read_ledger(path))
    assert totals["calls"] == 9 and totals["cached_calls"] == 4 and totals["usd"] == pytest.approx(0.014)
    assert per_pair(totals, judged_pairs=2, kept_pairs=1)["usd_per_kept_pair"] == pytest.approx(0.014)


def test_the_budget_refuses_requests_before_they_are_sent_and_holds_across_reruns(tmp_path: Path):
    cfg = settings(max_in_flight=4)
    transport, path = FakeTransport(), tmp_path / "ledger.jsonl"
    # a request's reservation: its prompt estimate (chars/4 + image_tokens) and the full max_tokens
    # a request costs 0.0035 (1,000 + 100 tokens) and is estimated at ~0.0035 (the template's ~900
    # characters and 765 image tokens, 100 completion tokens): the 4th would pass 0.012
    budget = 0.012
    ledger = SpendLedger(path, budget_usd=budget)
    verdicts = judge_all(cfg, transport, ledger, pairs=8)
    sent = transport.calls
    refused = [v for v in verdicts if v.error and v.error.startswith(BUDGET_ERROR)]
    # 4 in flight at a time: they waited for the reservations ahead rather than being refused early
    assert sent == 3 and len(refused) == 5 and all(v.attempts == 0 for v in refused)
    assert ledger.total_usd == pytest.approx(3 * 0.0035)
    assert ledger.total_usd <= budget and ledger.reserved_usd == pytest.approx(0.0)
    # a rerun under the same budget pays for nothing more: what was spent is read back
    rerun = SpendLedger(path, budget_usd=budget)
    judge_all(cfg, transport, rerun, pairs=2)
    assert transport.calls == sent and rerun.refused == 2
