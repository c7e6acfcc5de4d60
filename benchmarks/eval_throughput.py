"""Evaluation throughput by batch size: greedy answers per second for the tiny model on CPU.

    .venv/bin/python benchmarks/eval_throughput.py                      # HFEngine directly, no Ray
    .venv/bin/python benchmarks/eval_throughput.py --batch-sizes 1 8 --questions 64 --max-new-tokens 16
    .venv/bin/python benchmarks/eval_throughput.py --ray                # through jobs.evaluate's actors

Questions come from the synthetic benchmark (made in a temporary folder). The untrained tiny model never
emits ``</s>``, so every answer is exactly ``--max-new-tokens`` long and batch sizes are compared on the
same work. Without ``--ray`` the figure is one engine in this process; with ``--ray`` it is the job's
wall clock (actor start-up and model building included) and the per-actor generation rate it reports.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from stmed.config import ModelConfig
from stmed.data.images import load_image
from stmed.data.records import read_benchmark
from stmed.data.synthetic import make_dataset
from stmed.model.build import load_model
from stmed.model.generate import HFEngine, Sampling, answer
from stmed.model.prompts import CLOSED_SUFFIX


def direct(data: Path, batch_sizes: list[int], questions: int,
           max_new_tokens: int) -> list[tuple[int, float, float, float]]:
    """(batch size, wall seconds, questions/s, questions per CPU-second) with one HFEngine, model built
    once, one warm-up batch. CPU time is this process's (all its threads): on a shared machine it moves
    far less than the wall clock does."""
    examples = read_benchmark(data / "test.json")[:questions]
    asked = [e.question + CLOSED_SUFFIX if e.answer_type == "CLOSED" else e.question for e in examples]
    images = [load_image(data / "images" / e.image) for e in examples]
    model, processor = load_model(ModelConfig(preset="tiny"))
    sampling = Sampling(max_new_tokens=max_new_tokens)
    rows = []
    for size in batch_sizes:
        engine = HFEngine(model, processor, batch_size=size)
        answer(engine, images[:size], asked[:size], sampling)  # warm-up: first-call allocations
        start, cpu_start = time.perf_counter(), time.process_time()
        answer(engine, images, asked, sampling)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        rows.append((size, seconds, len(examples) / seconds, len(examples) / cpu))
    return rows


def with_ray(data: Path, out: Path, batch_sizes: list[int], questions: int, max_new_tokens: int,
             workers: int) -> list[tuple[int, float, float, float]]:
    """(batch size, wall seconds, wall questions/s, per-actor generation questions/s) via jobs.evaluate."""
    from jobs.evaluate import EvaluateConfig, main
    from stmed.config import build_config

    rows = []
    for size in batch_sizes:
        cfg = build_config(EvaluateConfig, {
            "output_dir": str(out / f"bs{size}"), "models": {"tiny": {"preset": "tiny"}}, "synthetic": True,
            "data_dir": str(data), "limit": questions, "batch_size": size, "max_new_tokens": max_new_tokens,
            "ray": {"num_workers": workers, "num_cpus": workers},
        })
        summary = main(cfg)
        timing = summary["timing"]["tiny"]
        engine_rate = summary["results"]["tiny"]["synthetic"]["questions_per_s"]
        rows.append((size, timing["wall_s"], timing["questions_per_s_wall"], engine_rate))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads without --ray (Ray gives each 1-CPU actor one thread)")
    parser.add_argument("--ray", action="store_true", help="run through jobs.evaluate on a local Ray")
    parser.add_argument("--workers", type=int, default=2, help="answerer actors with --ray")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        data = make_dataset(Path(tmp) / "data", num_images=100, seed=0).root  # 20 test images, 100 questions
        print(f"tiny model, CPU, {args.questions} questions, {args.max_new_tokens} new tokens each, "
              f"{f'{args.workers} actors' if args.ray else f'{args.threads} torch threads'}")
        if args.ray:
            rows = with_ray(data, Path(tmp), args.batch_sizes, args.questions, args.max_new_tokens,
                            args.workers)
            print(f"{'batch':>5} | {'wall s':>7} | {'wall q/s':>8} | {'q/s per actor (generation)':>26}")
            for size, seconds, wall_rate, engine_rate in rows:
                print(f"{size:>5} | {seconds:>7.2f} | {wall_rate:>8.2f} | {engine_rate:>26.2f}")
        else:
            rows = direct(data, args.batch_sizes, args.questions, args.max_new_tokens)
            print(f"{'batch':>5} | {'seconds':>7} | {'questions/s':>11} | {'ms/question':>11} | {'q/CPU-s':>7}")
            for size, seconds, rate, cpu_rate in rows:
                print(f"{size:>5} | {seconds:>7.2f} | {rate:>11.2f} | {1000 / rate:>11.1f} | {cpu_rate:>7.2f}")


if __name__ == "__main__":
    main()
