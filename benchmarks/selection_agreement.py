"""How far does the selection model agree with the judge and with clinicians? jobs.select over seeds and
clinician weights on one finished round, and one table.

    .venv/bin/python benchmarks/selection_agreement.py --policy runs/demo/sft/merged \
        --generate runs/demo/generate1 --labels runs/demo/review/labels.parquet \
        --seeds 0 1 2 --weights 1 50 400 --workdir runs/selection-bench --out runs/selection-bench.json

Each (seed, weight) is one ``jobs.select`` run with ``jobs/configs/local/select.yaml`` as it is, its
``selection.seed`` and ``train.seed`` set to the seed (each seed draws its own held-out images and judge
pairs) and ``selection.clinician_weight`` to the weight. From each run's summary: held-out agreement with
the judge (with its bootstrap 95% interval) and AUC, held-out agreement with the clinicians, the judge's own
agreement with the same clinician pairs, and what ``keep_fraction`` kept. Over seeds, per weight: the mean and
the 95% interval of the mean (t distribution). About a minute a run on 2 cores. What it does not measure:
DPO on the selected pairs, and selective judging (docs/selection.md says how those were measured).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jobs import select
from stmed.config import build_config, read_yaml

CONFIG = REPO / "jobs" / "configs" / "local" / "select.yaml"
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def run_one(args: argparse.Namespace, seed: int, weight: float) -> dict[str, Any]:
    out = Path(args.workdir) / f"seed{seed}-w{weight:g}"
    overrides = [f"output_dir={out}", f"model.name_or_path={args.policy}", f"generate_dir={args.generate}",
                 f"selection.seed={seed}", f"train.seed={seed}", f"selection.clinician_weight={weight}"]
    if args.labels:
        overrides.append(f"clinician_labels={args.labels}")
    summary = select.main(build_config(select.SelectConfig, read_yaml(CONFIG), overrides))
    figures = summary["figures"]
    judge, clinician = figures["judge"]["held_out"], figures["clinician"]["held_out"]
    own = (figures.get("judge_vs_clinician") or {}).get("held_out") or {}
    return {"seed": seed, "weight": weight, "run": str(out), "judge_n": judge["n"],
            "judge_agreement": judge["agreement"], "judge_ci": judge["agreement_ci"], "judge_auc": judge["auc"],
            "clinician_n": clinician["n"], "clinician_agreement": clinician["agreement"],
            "clinician_auc": clinician["auc"], "judge_vs_clinician": own.get("agreement"),
            "kept": summary["selection"]["kept"], "pairs": summary["selection"]["pairs"]}  # fmt: skip


def mean_ci(values: list[float]) -> tuple[float, float, float] | None:
    """Mean and the 95% interval of the mean over seeds (t distribution); None without two values."""
    if len(values) < 2:
        return None
    mean, sd = statistics.mean(values), statistics.stdev(values)
    half = T_975.get(len(values) - 1, 1.96) * sd / math.sqrt(len(values))
    return mean, mean - half, mean + half


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def table(rows: list[dict[str, Any]]) -> str:
    lines = [("| weight | seed | judge pairs held out | agreement with the judge [95% CI] | AUC | clinician pairs "
             "| agreement with clinicians | the judge's own |"), "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ci = f" [{100 * r['judge_ci'][0]:.1f}, {100 * r['judge_ci'][1]:.1f}]" if r["judge_ci"] else ""
        lines.append(f"| {r['weight']:g} | {r['seed']} | {r['judge_n']} | {_pct(r['judge_agreement'])}{ci} | "
                     f"{r['judge_auc']:.2f} | {r['clinician_n']} | {_pct(r['clinician_agreement'])} | "
                     f"{_pct(r['judge_vs_clinician'])} |")  # fmt: skip
    for weight in sorted({r["weight"] for r in rows}):
        for key in ("judge_agreement", "clinician_agreement"):
            values = [r[key] for r in rows if r["weight"] == weight and r[key] is not None]
            summary = mean_ci(values)
            if summary:
                lines.append(f"weight {weight:g}, {key}: mean {_pct(summary[0])} "
                             f"[{_pct(summary[1])}, {_pct(summary[2])}] over {len(values)} seeds")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", required=True, help="the merged checkpoint that generated the pairs")
    parser.add_argument("--generate", required=True, help="a jobs.generate output folder")
    parser.add_argument("--labels", default=None, help="jobs.review export labels (parquet or jsonl)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--weights", type=float, nargs="+", default=[1.0, 50.0])
    parser.add_argument("--workdir", default="runs/selection-bench")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    rows = [run_one(args, seed, weight) for weight in args.weights for seed in args.seeds]
    text = table(rows)
    print(text)
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "table": text}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
