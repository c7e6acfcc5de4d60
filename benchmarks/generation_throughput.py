"""Self-play generation throughput: batched vs one-at-a-time HF ``generate`` on the tiny model (CPU).

    .venv/bin/python benchmarks/generation_throughput.py
    .venv/bin/python benchmarks/generation_throughput.py --prompts 64 --batch-size 16 --max-new-tokens 32

The workload is the answer step of self-play (METHOD §3: temperature 1.2, top-k 100, top-p 0.95) on
synthetic scans. Three ways to run the same prompts:

- ``one-at-a-time``: batch size 1, per-row seeds;
- ``batched, row seeds``: what ``actors.generator.Generator`` does (``RowSampler``: every row draws
  from its own generator, so its answer does not depend on its batch);
- ``batched, global seed``: HF's own sampler, one RNG for the batch (the cost of ``RowSampler``).

The untrained tiny model rarely writes ``</s>``, so nearly every answer runs to ``--max-new-tokens``.
Tokens are the engine's count of generated tokens (each row up to its ``</s>``).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from stmed.config import ModelConfig
from stmed.data.images import load_image
from stmed.data.records import list_images
from stmed.data.synthetic import make_dataset
from stmed.model import prompts
from stmed.model.build import load_model
from stmed.model.generate import HFEngine, Sampling

QUESTION = "Is there a lesion on the left side?"


def measure(engine: HFEngine, texts: list[str], images: list, sampling: Sampling,
            row_seeds: list[int] | None, repeats: int) -> tuple[float, int]:
    """(seconds, generated tokens) of the fastest of ``repeats`` passes, after a one-batch warm-up.
    The fastest, because on a shared machine the slow passes measure the neighbours."""
    warm = engine.batch_size
    engine.generate(texts[:warm], images[:warm], sampling, row_seeds=row_seeds[:warm] if row_seeds else None)
    best = (float("inf"), 0)
    for _ in range(repeats):
        start, before = time.perf_counter(), engine.generated_tokens
        engine.generate(texts, images, sampling, seed=0, row_seeds=row_seeds)
        best = min(best, (time.perf_counter() - start, engine.generated_tokens - before))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a Ray actor with 1 CPU has 1)")
    parser.add_argument("--repeats", type=int, default=3, help="passes per mode; the fastest is reported")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        data = make_dataset(Path(tmp) / "data", num_images=40, seed=0)
        paths = list_images(data.unlabelled)
        images = [load_image(paths[i % len(paths)]) for i in range(args.prompts)]
    texts = [prompts.answer_prompt(QUESTION)] * args.prompts
    seeds = list(range(args.prompts))
    sampling = Sampling(temperature=1.2, top_k=100, top_p=0.95, max_new_tokens=args.max_new_tokens)
    model, processor = load_model(ModelConfig(preset="tiny"))
    runs = [("one-at-a-time", 1, seeds), ("batched, row seeds", args.batch_size, seeds),
            ("batched, global seed", args.batch_size, None)]
    print(f"tiny model, CPU, {args.threads} torch thread(s), {args.prompts} answer prompts, "
          f"up to {args.max_new_tokens} new tokens each, fastest of {args.repeats} passes")
    print(f"{'mode':<22} | {'batch':>5} | {'seconds':>7} | {'prompts/s':>9} | {'tokens/s':>8}")
    base = None
    for name, batch_size, row_seeds in runs:
        engine = HFEngine(model, processor, batch_size=batch_size)
        seconds, tokens = measure(engine, texts, images, sampling, row_seeds, args.repeats)
        rate = args.prompts / seconds
        base = base or rate
        print(f"{name:<22} | {batch_size:>5} | {seconds:>7.2f} | {rate:>9.2f} | {tokens / seconds:>8.1f}"
              f"   ({rate / base:.1f}x)")


if __name__ == "__main__":
    main()
