"""Stage 2: DPO on the self-generated preference pairs (METHOD §4), on Ray Train.

    ray job submit --working-dir . -- python -m jobs.dpo --config jobs/configs/dpo.yaml \
        model.name_or_path=/mnt/shared/stmed/sft/merged preferences=/mnt/shared/stmed/generate/preferences.parquet
    python -m jobs.dpo --config jobs/configs/local/dpo.yaml output_dir=runs/local/dpo \
        model.preset=null model.name_or_path=runs/local/sft/merged preferences=runs/local/generate/preferences.parquet

The policy is a fresh LoRA on the merged stage-1 checkpoint; the reference is that checkpoint, frozen
(``stmed.train.dpo``). Outputs under ``output_dir``: ``config.yaml``, ``checkpoints/`` (Ray Train storage),
``metrics.jsonl`` (one row per step: loss, rewards/chosen, rewards/rejected, rewards/accuracies,
rewards/margins, lr per group, pairs/s…), ``data_report.json`` (pairs rejected and why), ``adapter/``,
``merged/`` (a plain HF checkpoint: what evaluation and serving load) and ``summary.json``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actors.training import run_training
from jobs.runtime import init_ray, run_job, stage_clock, training_timings
from stmed.config import ConfigError, ModelConfig, RayConfig, config_to_dict, write_config
from stmed.data.records import DataError, read_preferences, write_preferences
from stmed.log import get_logger
from stmed.model.build import image_seq_len, load_processor
from stmed.review.export import apply_labels, read_labels
from stmed.runs import (
    TIMINGS,
    TRAINING_OUTPUTS,
    MetricsLog,
    claim_output_dir,
    training_fingerprint,
    training_run_name,
    write_summary,
)
from stmed.train.dpo import DPOLoopConfig, DPOLoRAConfig, DPOSettings, DPOTrainConfig, train_dpo
from stmed.train.stage import (
    ATTEMPTS_FILE,
    DATA_REPORT_FILE,
    METRICS_FILE,
    check_global_batch,
    check_length_budget,
)

log = get_logger("stmed.jobs.dpo")

FINAL_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")


@dataclass(frozen=True)
class DPOConfig:
    """Stage 2: DPO of the stage-1 model on its judged answer pairs, on Ray Train."""

    output_dir: str
    model: ModelConfig
    """The merged stage-1 checkpoint (``<sft output_dir>/merged``): the policy's start and the reference."""
    preferences: str
    """The preference pairs (``<generate output_dir>/preferences.parquet``)."""
    image_root: str | None = None
    """Folder that relative image paths in the pairs are under (default: the parquet file's folder)."""
    clinician_labels: str | None = None
    """Clinicians' labels (``jobs.review export``: ``labels.parquet`` or ``labels.jsonl``): where reviewers
    decided a pair, their decision overrides the judge's (the other answer preferred: swapped; a tie or
    both wrong: dropped). The counts go to the summary under ``clinician_labels``."""
    lora: DPOLoRAConfig = field(default_factory=DPOLoRAConfig)
    """Use the stage-1 ranks; ViT LoRA dropout 0.1 in DPO."""
    train: DPOTrainConfig = field(default_factory=DPOTrainConfig)
    dpo: DPOSettings = field(default_factory=DPOSettings)
    ray: RayConfig = field(default_factory=RayConfig)
    run_name: str | None = None
    """Ray Train run name; None resumes the unfinished run of ``output_dir`` (its ``run.json``), else
    makes a fresh one. Reuse a name only to resume that run."""

    def __post_init__(self) -> None:
        check_global_batch(self.train, self.ray.num_workers)


def _summarise(out: Path, run_name: str, checkpoint: str | None, wall_s: float) -> dict[str, Any]:
    """Counts and figures for summary.json, from what the workers wrote."""
    data = json.loads((out / DATA_REPORT_FILE).read_text())
    attempts = MetricsLog(out / ATTEMPTS_FILE).read()
    rows = MetricsLog(out / METRICS_FILE).read_steps()
    busy = sum(row["step_time_s"] for row in rows)
    precompute = [a["reference_precompute_s"] for a in attempts if a.get("reference_precompute_s") is not None]
    return {
        "stage": "dpo", "run_name": run_name,
        **{k: v for k, v in data.items() if k != "rejected_examples"},
        "steps": rows[-1]["step"], "total_steps": attempts[-1]["total_steps"],
        "attempts": len(attempts), "resumed_from_steps": [a["start_step"] for a in attempts[1:]],
        "first": {k: rows[0][k] for k in FINAL_KEYS}, "final": {k: rows[-1][k] for k in FINAL_KEYS},
        "pairs_trained": sum(row["pairs"] for row in rows), "pairs_per_s": sum(row["pairs"] for row in rows) / busy,
        "reference_precompute_s": sum(precompute) if precompute else None, "wall_time_s": wall_s,
        "outputs": {"adapter": str(out / "adapter"), "merged": str(out / "merged"), "checkpoint": checkpoint,
                    "metrics": str(out / METRICS_FILE), "data_report": str(out / DATA_REPORT_FILE)},
    }  # fmt: skip


def apply_clinician_labels(preferences: Path, labels: Path, out: Path) -> tuple[Path, dict[str, int]]:
    """The pairs with the clinicians' decisions applied, as ``out/preferences_reviewed.parquet``."""
    kept, counts = apply_labels(read_preferences(preferences), read_labels(labels))
    if not kept:
        raise DataError(f"clinician_labels: {labels} drops every pair of {preferences}; nothing to train on")
    log.info("clinician labels: %d pairs reviewed (%d confirmed, %d swapped, %d dropped)", counts["reviewed"],
             counts["confirmed"], counts["swapped"], counts["dropped"])
    return write_preferences(out / "preferences_reviewed.parquet", kept), counts


def main(cfg: DPOConfig) -> dict[str, Any]:
    clock = stage_clock()
    started = time.time()
    out = Path(cfg.output_dir).resolve()  # workers resolve paths from their own working directory
    preferences = Path(cfg.preferences).resolve()
    if not preferences.is_file():
        raise ConfigError(f"preferences: file not found: {preferences} (run jobs.generate first)")
    image_root = Path(cfg.image_root).resolve() if cfg.image_root else preferences.parent
    if not image_root.is_dir():
        raise ConfigError(f"image_root: folder not found: {image_root}")
    if not read_preferences(preferences):  # a parse here, before any worker: a bad file fails fast
        raise DataError(f"preferences: {preferences} holds no pairs (did jobs.generate finish?)")
    claim_output_dir(out, "dpo", TRAINING_OUTPUTS)  # refuses a folder of files stmed did not write
    write_config(cfg, out)
    reviewed = None
    if cfg.clinician_labels:
        preferences, reviewed = apply_clinician_labels(preferences, Path(cfg.clinician_labels), out)
    with clock.phase("model_load"):
        processor = load_processor(cfg.model)
    check_length_budget(cfg.train, image_seq_len(processor))  # before any worker starts
    with clock.phase("ray_init"):
        init_ray(cfg.ray)
    loop = DPOLoopConfig(model=cfg.model, preferences_path=str(preferences), image_root=str(image_root),
                         output_dir=str(out), lora=cfg.lora, train=cfg.train, dpo=cfg.dpo)  # fmt: skip
    loop_values = config_to_dict(loop, redact=False)
    name = training_run_name(out, "dpo", cfg.run_name, (METRICS_FILE, ATTEMPTS_FILE, DATA_REPORT_FILE),
                             training_fingerprint(loop_values))
    run = run_training(train_dpo, loop_values, cfg.ray, name, out / "checkpoints")
    clock.add_all(training_timings(run, out))
    with clock.phase("writing"):
        checkpoint = run.checkpoint.path if run.checkpoint else None
        summary = _summarise(out, name, checkpoint, time.time() - started)
        summary["clinician_labels"] = reviewed
    summary[TIMINGS] = clock.block()
    write_summary(out, summary)
    final = summary["final"]
    log.info("dpo done: %d pairs (%d rejected), %d steps, loss %.4f, margin %.4f, accuracy %.2f; merged model in %s",
             summary["pairs_used"], summary["rejected"], summary["steps"], final["loss"],
             final["rewards/margins"], final["rewards/accuracies"], summary["outputs"]["merged"])  # fmt: skip
    return summary


if __name__ == "__main__":
    run_job(main, DPOConfig)
