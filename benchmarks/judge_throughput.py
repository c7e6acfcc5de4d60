"""Judge throughput against the offline reference judge with a fixed reply latency.

    .venv/bin/python benchmarks/judge_throughput.py --quick              # 16, 64, 256 in flight, both transports
    .venv/bin/python benchmarks/judge_throughput.py                      # the same, 10 waves x 3 passes each
    .venv/bin/python benchmarks/judge_throughput.py --in-flight 64 --transport direct --waves 20
    .venv/bin/python benchmarks/judge_throughput.py --ray --actors 4     # KeptPairJudge pool in Ray Data

With ``F`` requests in flight and a server that answers each after ``L`` seconds, no client can judge
more than ``F / L`` pairs per second: that is the ideal the measured rate is compared with. The server
runs in its own process (``python -m stmed.judge.reference``) so that it does not share this process's
GIL with the client; on a 2-core machine the two still share the cores, so a client's CPU per pair and
the server's both show in the rate. Without ``--ray`` the client is one ``Judge`` actor called directly
with ``max_in_flight = F`` (the reply cache is off, every pair is a request) over ``waves x F`` pairs;
with ``--ray`` it is the job's ``KeptPairJudge`` under ``ActorPoolStrategy(size=actors)``, ``F / actors``
in flight each, on a local Ray. ``--transport`` picks ``judge.transport``: ``direct`` (aiohttp),
``openai`` (the SDK), or ``both``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from actors.generator import KeptPairJudge, to_columns
from stmed.data.images import image_to_data_url, load_image
from stmed.data.records import list_images
from stmed.data.synthetic import make_dataset
from stmed.judge.judging import JudgeSettings
from stmed.selfplay.preferences import make_row


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_judge(findings: Path, latency_ms: float) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "stmed.judge.reference", "--findings", str(findings),
                             "--port", str(port), "--latency-ms", str(latency_ms)])
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/models", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the reference judge did not start within 60 s")


def pair_rows(data_root: Path, n: int) -> list[dict]:
    """``n`` pairs over the synthetic images; the answers differ so every reply is a real score."""
    urls = [image_to_data_url(load_image(p)) for p in list_images(data_root / "unlabelled.json")]
    return [make_row(f"img{i % len(urls)}", "-", index=i, question="Is there a lesion?", question_seed=i,
                     answers=(f"Yes, one lesion ({i}).", f"No lesion is seen ({i})."), seeds=(i, i + 1),
                     image_data_url=urls[i % len(urls)]) for i in range(n)]


def direct(rows: list[dict], settings: JudgeSettings, repeats: int) -> tuple[float, float]:
    """(wall seconds, client CPU seconds) of the fastest of ``repeats`` passes over ``rows`` with one
    Judge in this process (on a shared machine the slower passes measure the neighbours)."""
    judge = KeptPairJudge(settings)

    async def run() -> tuple[float, float]:  # one event loop: the client's connections belong to it
        await judge(to_columns(rows[: settings.max_in_flight]))  # warm-up: connections, first imports
        best = (float("inf"), 0.0)
        for _ in range(repeats):
            start, cpu = time.perf_counter(), time.process_time()
            out = await judge(to_columns(rows))
            best = min(best, (time.perf_counter() - start, time.process_time() - cpu))
            failed = sum(e is not None for e in out["error"])
            if failed:
                raise RuntimeError(f"{failed} of {len(rows)} judgements failed: {out['error'][0]}")
        await judge.client.close()
        return best

    return asyncio.run(run())


def with_ray(rows: list[dict], settings: JudgeSettings, actors: int) -> tuple[float, int]:
    """(seconds, pairs) from the first judged block to the last: actor start-up is not throughput."""
    import ray
    from ray.data import ActorPoolStrategy

    from jobs.runtime import init_ray
    from stmed.config import RayConfig

    init_ray(RayConfig(num_cpus=2))
    ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows) // settings.max_in_flight))
    ds = ds.map_batches(
        KeptPairJudge, fn_constructor_kwargs={"settings": settings, "num_actors": actors},
        compute=ActorPoolStrategy(size=actors), batch_size=settings.max_in_flight, num_cpus=0.25,
        batch_format="numpy")
    first, counted, failed = None, 0, 0
    for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        failed += block.num_rows - block.column("error").null_count
        if first is None:
            first = time.perf_counter()
        else:
            counted += block.num_rows
    if failed:
        raise RuntimeError(f"{failed} of {len(rows)} judgements failed")
    return time.perf_counter() - first, counted


def server_cpu_seconds(pid: int) -> float | None:
    """The judge process's CPU time so far (Linux /proc), to show where the time per pair goes."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(rows: list[dict], url: str, in_flight: int, transport: str, args: argparse.Namespace,
            server_pid: int) -> dict:
    """One configuration's figures: rate, its share of the ideal, client and server CPU per pair."""
    per_actor = in_flight // args.actors if args.ray else in_flight
    settings = JudgeSettings(base_url=url, model="stmed-reference-judge", max_in_flight=per_actor,
                             timeout_s=30, max_attempts=3, transport=transport)
    rows = rows[: args.waves * in_flight]
    server_before = server_cpu_seconds(server_pid)
    if args.ray:
        (seconds, pairs), client_cpu = with_ray(rows, settings, args.actors), None
    else:
        (seconds, client_cpu), pairs = direct(rows, settings, args.repeats), len(rows)
    server_after = server_cpu_seconds(server_pid)
    ideal = in_flight / (args.latency_ms / 1000) if args.latency_ms else float("inf")
    judged = pairs if args.ray else pairs * args.repeats + in_flight  # every pass and the warm-up
    server_cpu = None if server_before is None or server_after is None else (server_after - server_before) / judged
    return {"transport": transport, "in_flight": in_flight, "rate": pairs / seconds, "ideal": ideal,
            "seconds": seconds, "client_cpu": None if client_cpu is None else client_cpu / pairs,
            "server_cpu": server_cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--in-flight", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--latency-ms", type=float, default=200.0)
    parser.add_argument("--waves", type=int, default=10, help="pairs per pass = waves x in flight")
    parser.add_argument("--repeats", type=int, default=3, help="passes without --ray; the fastest counts")
    parser.add_argument("--transport", choices=["direct", "openai", "both"], default="both")
    parser.add_argument("--quick", action="store_true", help="2 passes, not 3: about a minute")
    parser.add_argument("--ray", action="store_true", help="through a KeptPairJudge pool in Ray Data")
    parser.add_argument("--actors", type=int, default=4, help="judge actors with --ray")
    args = parser.parse_args()
    if args.quick:
        args.repeats = 2
    transports = ["direct", "openai"] if args.transport == "both" else [args.transport]
    with tempfile.TemporaryDirectory() as tmp:
        data = make_dataset(Path(tmp) / "data", num_images=40, seed=0)
        proc, url = start_judge(data.findings, args.latency_ms)
        try:
            rows = pair_rows(data.root, args.waves * max(args.in_flight))
            results = [measure(rows, url, f, t, args, proc.pid) for t in transports for f in args.in_flight]
        finally:
            proc.terminate()
            proc.wait(10)
    how = f"Ray Data, {args.actors} actors" if args.ray else \
        f"one Judge called directly, fastest of {args.repeats} passes of {args.waves} x in-flight pairs"
    print(f"judge throughput: reference judge at {args.latency_ms:g} ms, {how}, {os.cpu_count()} CPUs")
    print(f"{'transport':<10} {'in flight':>9} {'pairs/s':>9} {'ideal':>8} {'of ideal':>9} "
          f"{'client CPU/pair':>16} {'server CPU/pair':>16}")
    for r in results:
        client = "-" if r["client_cpu"] is None else f"{1000 * r['client_cpu']:.2f} ms"
        server = "-" if r["server_cpu"] is None else f"{1000 * r['server_cpu']:.2f} ms"
        print(f"{r['transport']:<10} {r['in_flight']:>9} {r['rate']:>9.1f} {r['ideal']:>8.1f} "
              f"{r['rate'] / r['ideal']:>9.1%} {client:>16} {server:>16}")


if __name__ == "__main__":
    main()
