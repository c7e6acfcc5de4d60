"""Load test of the VQA endpoint: dynamic batching on (max_batch_size 16) against off (max_batch_size 1).

    .venv/bin/python benchmarks/serve_load.py                      # 16 clients, tiny model, CPU
    .venv/bin/python benchmarks/serve_load.py --clients 32 --requests 4 --max-tokens 32 --out load.json

Starts a local Ray and Serve on 127.0.0.1, deploys the tiny model once per setting (one 1-CPU replica),
and runs N closed-loop clients: each sends its next request as soon as the previous one is answered.
Prints requests/s and p50/p99 latency per setting and the throughput speed-up of batching.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import socket
import statistics
import time
from pathlib import Path

import httpx
from PIL import Image

from jobs.runtime import init_ray, use_local_ray_env

use_local_ray_env()  # before Ray is imported below: loopback only, auth off

from actors.serve import AutoscalingConfig, BatchingConfig, ReplicaConfig, build_app
from stmed.config import ModelConfig, RayConfig
from stmed.serve.contract import LimitsConfig


def _payloads(n: int, max_tokens: int) -> list[dict]:
    """Distinct small scans and questions, so no two requests are the same."""
    out = []
    for i in range(n):
        buffer = io.BytesIO()
        Image.new("RGB", (64, 64), (i * 37 % 256, i * 91 % 256, 120)).save(buffer, format="PNG")
        out.append({"image_base64": base64.b64encode(buffer.getvalue()).decode(),
                    "question": f"Is there a lesion in region {i}?", "max_tokens": max_tokens})
    return out


async def _client(http: httpx.AsyncClient, url: str, payloads: list[dict], latencies: list[float],
                  sizes: list[int]) -> None:
    for payload in payloads:
        start = time.perf_counter()
        response = await http.post(url, json=payload)
        response.raise_for_status()
        latencies.append(time.perf_counter() - start)
        sizes.append(response.json()["usage"]["batch_size"])


async def _load(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    payloads = _payloads(clients * requests, max_tokens)
    latencies: list[float] = []
    sizes: list[int] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        await _client(http, url, payloads[:2], [], [])  # warm-up: first-call costs are not load
        start = time.perf_counter()
        await asyncio.gather(*(_client(http, url, payloads[c::clients], latencies, sizes)
                               for c in range(clients)))
        wall = time.perf_counter() - start
    quantiles = statistics.quantiles(latencies, n=100)
    return {"requests": len(latencies), "seconds": round(wall, 2), "rps": round(len(latencies) / wall, 2),
            "p50_ms": round(quantiles[49] * 1000, 1), "p99_ms": round(quantiles[98] * 1000, 1),
            "mean_batch": round(statistics.mean(sizes), 2), "largest_batch": max(sizes)}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=8, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--batch-wait-s", type=float, default=0.02)
    parser.add_argument("--out", type=Path, help="also write the figures here as JSON")
    args = parser.parse_args()

    init_ray(RayConfig(num_cpus=2))
    from ray import serve

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    results = {}
    try:
        for label, batch in (("batching on", 16), ("batching off", 1)):
            app = build_app(ModelConfig(preset="tiny"), "stmed-tiny", LimitsConfig(),
                            BatchingConfig(max_batch_size=batch, batch_wait_timeout_s=args.batch_wait_s),
                            AutoscalingConfig(), ReplicaConfig(max_ongoing_requests=max(32, args.clients)), None)
            serve.run(app, name="vqa-load", route_prefix="/")
            results[label] = asyncio.run(_load(f"http://127.0.0.1:{port}/v1/vqa", args.clients, args.requests,
                                               args.max_tokens))
            print(f"{label:13s} max_batch_size={batch:2d}: {json.dumps(results[label])}", flush=True)
    finally:
        serve.shutdown()
    speedup = results["batching on"]["rps"] / results["batching off"]["rps"]
    print(f"{args.clients} clients, {args.max_tokens} new tokens: batching speed-up {speedup:.2f}x in throughput")
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                        "results": results, "speedup": round(speedup, 2)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
