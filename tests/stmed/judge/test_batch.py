"""The Batch API against the offline reference judge over real HTTP: the same verdicts as the online mode,
at the batch price, errors mapped back to their pairs, and a killed job that resumes its recorded batch
instead of paying for another."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from stmed.data.images import image_to_data_url, load_image
from stmed.data.synthetic import SyntheticPaths, make_dataset
from stmed.judge.batch import STATE_FILE, BatchClient, judge_in_batches, read_results
from stmed.judge.cache import ReplyCache
from stmed.judge.judging import JudgeSettings, judge_pair, make_limiter, make_transport
from stmed.judge.ledger import LocalSpend, SpendLedger, read_ledger
from stmed.judge.reference import Faults, RunningServer, start_server


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> SyntheticPaths:
    return make_dataset(tmp_path_factory.mktemp("batch") / "data", num_images=8, seed=2, test_images=6)


@pytest.fixture(scope="module")
def rows(data: SyntheticPaths) -> list[dict]:
    """A right and a wrong answer to each test question, in both positions."""
    out = []
    for n, row in enumerate(r for r in json.loads(data.test.read_text()) if r["answer_type"] == "CLOSED"):
        right = row["conversations"][1]["value"]
        wrong = "no" if right == "yes" else "yes"
        pair = (right, wrong) if n % 2 else (wrong, right)
        out.append({"pair_id": f"p{n}", "question": row["conversations"][0]["value"].removeprefix("<image>\n"),
                    "answer1": pair[0], "answer2": pair[1],
                    "image_data_url": image_to_data_url(load_image(data.images / row["image"]))})
    return out[:6]


@pytest.fixture()
def server(data: SyntheticPaths) -> Iterator[RunningServer]:
    running = start_server(data.findings, batch_delay_s=0.2)
    yield running
    running.stop()


def settings(server: RunningServer, **overrides) -> JudgeSettings:
    return JudgeSettings(**{"base_url": server.url, "model": "stmed-reference-judge", "batch_poll_s": 0.05,
                            "batch_poll_max_s": 0.2, "backoff_base_s": 0.01, "backoff_max_s": 0.05,
                            "swap_positions": True, **overrides})


def test_batch_verdicts_equal_the_online_ones_at_the_batch_price(server, rows, tmp_path: Path):
    cfg = settings(server)
    online_ledger, batch_ledger = SpendLedger(tmp_path / "online.jsonl"), SpendLedger(tmp_path / "batch.jsonl")
    limiter, transport = make_limiter(cfg), make_transport(cfg)

    async def online() -> list:
        return [await judge_pair(transport, cfg, limiter, None, r["question"], r["answer1"], r["answer2"],
                                 r["image_data_url"], pair_id=r["pair_id"], spend=LocalSpend(online_ledger))
                for r in rows]

    expected = asyncio.run(online())
    server.reset_stats()
    got = judge_in_batches(rows, cfg, tmp_path, None, batch_ledger)
    strip = ("attempts",)
    assert [{k: v for k, v in g.to_row().items() if k not in strip} for g in got] == \
           [{k: v for k, v in e.to_row().items() if k not in strip} for e in expected]
    assert all(v.ok for v in got) and len(rows) >= 4
    stats = server.stats
    assert stats.endpoints["POST /v1/files"] == stats.endpoints["POST /v1/batches"] == 1
    assert stats.total == 2 * len(rows)  # both orders of every pair, once each, inside the batch
    online_usd, batch_usd = online_ledger.state()["usd"], batch_ledger.state()["usd"]
    assert batch_usd == pytest.approx(online_usd * 0.5) and batch_usd > 0
    assert {r["mode"] for r in read_ledger(tmp_path / "batch.jsonl")} == {"batch"}
    assert not (tmp_path / STATE_FILE).exists() or json.loads((tmp_path / STATE_FILE).read_text())


def test_errors_map_back_to_their_pairs_as_failures_never_scores(server, rows, tmp_path: Path):
    server.faults = Faults(error_rate=0.5)  # every second line of the batch gets a 500
    verdicts = judge_in_batches(rows, settings(server, swap_positions=False), tmp_path, None, SpendLedger(None))
    failed = [v for v in verdicts if not v.ok]
    assert len(failed) == len(rows) // 2 and all(v.score1 is None and v.score2 is None for v in failed)
    assert all(v.error.startswith("batch: http 500") for v in failed)
    assert read_results(b'not json\n{"custom_id": "x", "response": null, "error": {"code": "expired", '
                        b'"message": "window"}}\n') == {"x": (None, "batch: expired: window")}


def test_a_killed_job_resumes_its_recorded_batch_and_pays_once(server, rows, tmp_path: Path):
    cfg = settings(server)
    cache, ledger_path = ReplyCache(tmp_path / "cache"), tmp_path / "ledger.jsonl"
    server.batch_delay_s = 1.0

    class Killed(BaseException): ...

    def killed(_: float) -> None:  # the job dies while it waits for its batch
        raise Killed

    with pytest.raises(Killed):
        judge_in_batches(rows, cfg, tmp_path, cache, SpendLedger(ledger_path), BatchClient(cfg, killed), killed)
    recorded = json.loads((tmp_path / STATE_FILE).read_text())["batches"]
    assert len(recorded) == 1 and server.stats.endpoints["POST /v1/batches"] == 1

    verdicts = judge_in_batches(rows, cfg, tmp_path, cache, SpendLedger(ledger_path))
    assert all(v.ok for v in verdicts)
    assert server.stats.endpoints["POST /v1/batches"] == 1  # the same batch, not a second one
    assert server.stats.total == 2 * len(rows) and server.stats.resent == 0
    again = judge_in_batches(rows, cfg, tmp_path / "next", cache, SpendLedger(ledger_path))
    assert [v.to_row()["score1"] for v in again] == [v.score1 for v in verdicts] and all(v.cached for v in again)
    assert server.stats.endpoints["POST /v1/batches"] == 1
    paid = [r for r in read_ledger(ledger_path) if not r["cached"]]
    assert len(paid) == 2 * len(rows)  # each request charged once, across the kill and the rerun
