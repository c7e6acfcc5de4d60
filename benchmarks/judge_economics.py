"""Online against Batch API judging on the same pairs: are the verdicts the same, and what does each cost?

    .venv/bin/python benchmarks/judge_economics.py                 # seeds 0 1 2, 40 pairs each
    .venv/bin/python benchmarks/judge_economics.py --seeds 0 --pairs 200 --swap

For each seed a synthetic dataset is made and its benchmark questions paired (the right answer against a
wrong one, in alternating positions). The same pairs are judged twice by the offline reference judge over
loopback HTTP: online (``judge_pair``, one request per pair and order) and through the Batch API
(``stmed.judge.batch``: one upload, one batch, polled, results mapped back by custom_id). Each mode has its
own ledger; prices are GPT-4o's list prices (``judge.price_*_per_1k``) and the Batch discount
(``judge.batch_discount``). A row per seed: pairs, identical verdicts, the preferred answer the same,
online and batch USD, their ratio; the last line projects the per-pair figures to one round of
``make demo`` (4,519 judged pairs). The reference judge's token counts are its estimate of a GPT-4o
request (characters / 4 and 85 tokens a low-detail image), so the dollars are indicative, the ratio exact.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

from stmed.data.images import image_to_data_url, load_image
from stmed.data.synthetic import make_dataset
from stmed.judge.batch import judge_in_batches
from stmed.judge.judging import JudgeSettings, decide, judge_pair, make_limiter, make_transport
from stmed.judge.ledger import LocalSpend, SpendLedger
from stmed.judge.reference import start_server

DEMO_PAIRS = 4519


def pairs_of(data, limit: int) -> list[dict]:
    rows = []
    for n, row in enumerate(json.loads(data.test.read_text())):
        if len(rows) == limit:
            break
        question = row["conversations"][0]["value"].removeprefix("<image>\n")
        right = row["conversations"][1]["value"]
        wrong = ("no" if right == "yes" else "yes") if row["answer_type"] == "CLOSED" else "I cannot tell."
        first, second = (right, wrong) if n % 2 else (wrong, right)
        rows.append({"pair_id": f"p{n}", "question": question, "answer1": first, "answer2": second,
                     "image_data_url": image_to_data_url(load_image(data.images / row["image"]))})
    return rows


def run_seed(seed: int, pairs: int, swap: bool, work: Path) -> dict:
    data = make_dataset(work / f"data{seed}", num_images=max(8, pairs // 3 + 4), seed=seed,
                        test_images=max(4, pairs // 3 + 2))
    rows = pairs_of(data, pairs)
    server = start_server(data.findings, batch_delay_s=0.5)
    try:
        cfg = JudgeSettings(base_url=server.url, model="gpt-4o", swap_positions=swap, max_in_flight=16,
                            batch_poll_s=0.2, batch_poll_max_s=1.0)
        online_ledger, batch_ledger = SpendLedger(None), SpendLedger(None)
        limiter, transport = make_limiter(cfg), make_transport(cfg)

        async def online() -> list:
            try:
                return await asyncio.gather(*(judge_pair(
                    transport, cfg, limiter, None, r["question"], r["answer1"], r["answer2"], r["image_data_url"],
                    pair_id=r["pair_id"], spend=LocalSpend(online_ledger)) for r in rows))
            finally:
                await transport.close()

        started = time.perf_counter()
        on = asyncio.run(online())
        online_s = time.perf_counter() - started
        started = time.perf_counter()
        batch = judge_in_batches(rows, cfg, work / f"batch{seed}", None, batch_ledger)
        batch_s = time.perf_counter() - started
        endpoints = server.stats.endpoints
    finally:
        server.stop()
    same = sum((a.score1, a.score2, a.error) == (b.score1, b.score2, b.error) for a, b in zip(on, batch))
    kept = sum(decide(a, cfg.tie_policy)[0] == decide(b, cfg.tie_policy)[0] for a, b in zip(on, batch))
    return {"seed": seed, "pairs": len(rows), "same_verdicts": same, "same_choice": kept,
            "online_usd": online_ledger.state()["usd"], "batch_usd": batch_ledger.state()["usd"],
            "online_s": online_s, "batch_s": batch_s, "batches_created": endpoints.get("POST /v1/batches", 0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pairs", type=int, default=40, help="pairs per seed")
    parser.add_argument("--swap", action="store_true", help="judge.swap_positions (two requests a pair)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = [run_seed(seed, args.pairs, args.swap, Path(tmp)) for seed in args.seeds]
    print("| seed | pairs | same verdicts | same choice | online USD | batch USD | batch / online "
          "| batches created | online s | batch s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['seed']} | {r['pairs']} | {r['same_verdicts']} | {r['same_choice']} | {r['online_usd']:.4f} "
              f"| {r['batch_usd']:.4f} | {r['batch_usd'] / r['online_usd']:.2f} | {r['batches_created']} "
              f"| {r['online_s']:.2f} | {r['batch_s']:.2f} |")
    pairs = sum(r["pairs"] for r in results)
    online, batch = (sum(r[k] for r in results) / pairs for k in ("online_usd", "batch_usd"))
    print(f"\nper judged pair: online ${online:.5f}, batch ${batch:.5f}; a demo round of {DEMO_PAIRS} pairs: "
          f"online ${online * DEMO_PAIRS:.2f}, batch ${batch * DEMO_PAIRS:.2f}")


if __name__ == "__main__":
    main()
