"""DPO training throughput: precomputed or per-step reference, shared-prefix or separate sequences; CPU, no Ray.

    .venv/bin/python benchmarks/dpo_throughput.py
    .venv/bin/python benchmarks/dpo_throughput.py --pairs 64 --steps 24 --micro-batch-size 4 --threads 2

Both runs train the same fresh LoRA on the same pairs with ``stmed.train.dpo.train_dpo`` in a
``LocalSession``.
Per-step reference: every step runs the frozen stage-1 model (adapters off) on the batch before the
policy pass. Precomputed: one reference pass over all pairs before training, then a table look-up per
step. Reported per mode: training pairs/s (pairs over the summed wall-clock step times), the same per
second of this process's CPU time (steady on a shared, busy machine), the one-off precompute time,
and pairs/s over steps + precompute — the figure that decides whether precomputing pays for a run
of this many steps (it pays more the more epochs a run makes over its pairs).
Each reference mode runs twice: with ``dpo.shared_prefix`` (each pair's image and prompt once, both
answers packed on top) and with chosen and rejected as separate sequences.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable as a plain script from anywhere

import torch

from stmed.config import ModelConfig, config_to_dict
from stmed.data.records import PreferencePair, write_preferences
from stmed.data.synthetic import make_dataset
from stmed.model.build import build_tiny
from stmed.runs import MetricsLog
from stmed.train.dpo import DPOLoopConfig, DPOLoRAConfig, DPOSettings, DPOTrainConfig, train_dpo
from stmed.train.session import LocalSession

CHOSEN = ("Yes, there is a round lesion in the {side} lung, about {size} cm across, with smooth margins "
          "and no surrounding effusion.")  # fmt: skip
REJECTED = "No, the scan looks normal, with no visible abnormality in either lung."


def _pairs(images: list[str], n: int) -> list[PreferencePair]:
    return [PreferencePair(pair_id=f"p{i}", image=images[i % len(images)], question="Is there a lesion?",
                           chosen=CHOSEN.format(side=("left", "right")[i % 2], size=1 + i % 4),
                           rejected=REJECTED, chosen_score=8.0, rejected_score=3.0, judge_model="bench")
            for i in range(n)]  # fmt: skip


class CPUTimedSession(LocalSession):
    """A LocalSession that notes this process's CPU time at every report (once per step with log_every=1).

    On a shared machine wall-clock step times swing with other people's load; CPU time does not.
    """

    def __init__(self, checkpoint_root: Path):
        super().__init__(checkpoint_root)
        self.cpu_at_report: list[float] = []

    def report(self, metrics: dict, checkpoint_dir: Path | None = None) -> None:
        self.cpu_at_report.append(time.process_time())
        super().report(metrics, checkpoint_dir)


def run(out: Path, stage1: Path, prefs: Path, images: Path, precompute: bool, shared: bool,
        args) -> dict[str, float]:  # fmt: skip
    """One training run; its per-step and precompute timings from metrics.jsonl / attempts.jsonl."""
    train = DPOTrainConfig(micro_batch_size=args.micro_batch_size, max_steps=args.steps, max_length=256,
                           log_every=1, checkpoint_every=10_000, lr_llm=1e-3)  # fmt: skip
    cfg = DPOLoopConfig(model=ModelConfig(name_or_path=str(stage1)), preferences_path=str(prefs),
                        image_root=str(images), output_dir=str(out), train=train, export_merged=False,
                        lora=DPOLoRAConfig(llm_r=8, llm_alpha=16, vit_r=4, vit_alpha=8),
                        dpo=DPOSettings(precompute_reference=precompute, shared_prefix=shared))  # fmt: skip
    session = CPUTimedSession(out / "ckpt")
    start = time.perf_counter()
    train_dpo(config_to_dict(cfg, redact=False), session)
    wall = time.perf_counter() - start
    rows = MetricsLog(out / "metrics.jsonl").read()[1:]  # step 1 pays first-call allocations: left out
    pairs, busy = sum(r["pairs"] for r in rows), sum(r["step_time_s"] for r in rows)
    pre = MetricsLog(out / "attempts.jsonl").read()[0]["reference_precompute_s"] or 0.0
    cpu = session.cpu_at_report[-1] - session.cpu_at_report[0]  # steps 2..N
    return {"train_pairs_per_s": pairs / busy, "train_pairs_per_cpu_s": pairs / cpu, "precompute_s": pre,
            "pairs_per_s_with_precompute": pairs / (busy + pre), "wall_s": wall}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=32, help="distinct pairs (the precompute pass covers them all)")
    parser.add_argument("--steps", type=int, default=17, help="optimiser steps per run (the first is not timed)")
    parser.add_argument("--micro-batch-size", type=int, default=2, help="pairs per step")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=3, help="runs per mode, interleaved; medians are shown")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="stmed-dpo-bench-") as tmp:
        root = Path(tmp)
        data = make_dataset(root / "data", num_images=8, seed=0)
        model, processor = build_tiny(seed=0)
        model.save_pretrained(root / "stage1")
        processor.save_pretrained(root / "stage1")
        prefs = write_preferences(root / "prefs.parquet", _pairs(sorted(p.name for p in data.images.glob("*.png")),
                                                                 args.pairs))  # fmt: skip
        runs: dict[str, list[dict[str, float]]] = {f"{ref}/{layout}": [] for ref in ("per_step", "precomputed")
                                                   for layout in ("separate", "shared")}  # fmt: skip
        for repeat in range(args.repeats):  # interleaved, so a busy spell on a shared box hits every mode
            for mode, done in runs.items():
                out = root / f"{mode.replace('/', '-')}{repeat}"
                done.append(run(out, root / "stage1", prefs, data.images, mode.startswith("precomputed"),
                                mode.endswith("shared"), args))  # fmt: skip
    results = {mode: {key: statistics.median([r[key] for r in rs]) for key in rs[0]} for mode, rs in runs.items()}
    print(f"tiny LLaVA, CPU, {args.threads} thread(s), {args.pairs} pairs, {args.steps} steps x "
          f"{args.micro_batch_size} pairs (step 1 not timed), median of {args.repeats} runs per mode")
    print(f"{'reference/layout':<22} {'train pairs/s':>14} {'train pairs/CPU-s':>18} {'precompute s':>13} "
          f"{'pairs/s incl. precompute':>25} {'run wall s':>11}")
    for mode, r in results.items():
        print(f"{mode:<22} {r['train_pairs_per_s']:>14.2f} {r['train_pairs_per_cpu_s']:>18.2f} "
              f"{r['precompute_s']:>13.2f} {r['pairs_per_s_with_precompute']:>25.2f} {r['wall_s']:>11.1f}")
    for key, label in (("train_pairs_per_s", "wall clock"), ("train_pairs_per_cpu_s", "CPU time")):
        for layout in ("separate", "shared"):
            ratio = results[f"precomputed/{layout}"][key] / results[f"per_step/{layout}"][key]
            print(f"precomputed / per-step training throughput, {layout} ({label}): {ratio:.2f}x")
        for ref in ("per_step", "precomputed"):
            ratio = results[f"{ref}/shared"][key] / results[f"{ref}/separate"][key]
            print(f"shared prefix / separate sequences, reference {ref} ({label}): {ratio:.2f}x")


if __name__ == "__main__":
    main()
