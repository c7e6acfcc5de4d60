"""Stage 1: LoRA SFT on answers and questions (METHOD §2), on Ray Train.

    ray job submit --working-dir . -- python -m jobs.sft --config jobs/configs/sft.yaml
    python -m jobs.sft --config jobs/configs/local/sft.yaml output_dir=runs/local/sft   # laptop, no GPU

Outputs under ``output_dir``: ``config.yaml``, ``checkpoints/`` (Ray Train storage: weights, optimiser,
RNG per checkpoint), ``metrics.jsonl`` (one row per step: loss, loss_qa, loss_vq, lr per group,
tokens/s…), ``data_report.json`` (skipped samples and why), ``adapter/`` (final trainable weights),
``merged/`` (a plain HF checkpoint: what the later stages load) and ``summary.json``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actors.training import run_training
from jobs.runtime import init_ray, run_job, stage_clock, training_timings
from stmed.config import (
    ConfigError,
    LoRAConfig,
    ModelConfig,
    RayConfig,
    config_to_dict,
    write_config,
)
from stmed.data.records import DataError, read_instruct
from stmed.data.synthetic import make_dataset
from stmed.log import get_logger
from stmed.model.build import image_seq_len, load_processor
from stmed.runs import (
    TIMINGS,
    TRAINING_OUTPUTS,
    MetricsLog,
    claim_output_dir,
    training_fingerprint,
    training_run_name,
    write_summary,
)
from stmed.train.sft import SFTLoopConfig, train_sft
from stmed.train.stage import (
    ATTEMPTS_FILE,
    DATA_REPORT_FILE,
    METRICS_FILE,
    TrainConfig,
    check_global_batch,
    check_length_budget,
)

log = get_logger("stmed.jobs.sft")


@dataclass(frozen=True)
class SFTDataConfig:
    """Where the instruction data comes from."""

    instruct: str | None = None
    """LLaVA-Med instruct JSON (e.g. llava_med_instruct_60k_inline_mention.json)."""
    image_root: str | None = None
    """Folder the instruct file's image names are relative to (default: the instruct file's folder)."""
    synthetic: bool = False
    """With no data.instruct: generate the synthetic phantom dataset into output_dir/data."""
    synthetic_images: int = 120
    synthetic_seed: int = 0


@dataclass(frozen=True)
class SFTConfig:
    """Stage 1: LoRA SFT with the question loss, on Ray Train."""

    output_dir: str
    model: ModelConfig
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    run_name: str | None = None
    """Ray Train run name; None resumes the unfinished run of ``output_dir`` (its ``run.json``), else
    makes a fresh one. Reuse a name only to resume that run."""

    def __post_init__(self) -> None:
        check_global_batch(self.train, self.ray.num_workers)
        if self.data.instruct is None and not self.data.synthetic:
            raise ConfigError("data.instruct is required (or set data.synthetic=true for the demo data)")


def _resolve_data(cfg: SFTConfig, out: Path) -> tuple[Path, Path]:
    """The instruct file and image folder, generating the synthetic dataset when asked to."""
    if cfg.data.instruct is None:
        paths = make_dataset(out / "data", num_images=cfg.data.synthetic_images, seed=cfg.data.synthetic_seed)
        return paths.instruct, paths.images
    instruct = Path(cfg.data.instruct).resolve()
    image_root = Path(cfg.data.image_root).resolve() if cfg.data.image_root else instruct.parent
    if not instruct.is_file():
        raise ConfigError(f"data.instruct: file not found: {instruct}")
    if not image_root.is_dir():
        raise ConfigError(f"data.image_root: folder not found: {image_root}")
    samples, skips = read_instruct(instruct)  # a parse here, before any worker: a bad file fails fast
    if not samples:
        raise DataError(f"data.instruct: {instruct} holds no usable conversation ({len(skips)} entries skipped)")
    return instruct, image_root


def _summarise(out: Path, run_name: str, checkpoint: str | None, wall_s: float) -> dict[str, Any]:
    """Counts and figures for summary.json, from what the workers wrote."""
    data = json.loads((out / DATA_REPORT_FILE).read_text())
    attempts = MetricsLog(out / ATTEMPTS_FILE).read()
    rows = MetricsLog(out / METRICS_FILE).read_steps()
    last = rows[-1]
    busy = sum(row["step_time_s"] for row in rows)
    return {
        "stage": "sft", "run_name": run_name, **{k: v for k, v in data.items() if k != "skipped_examples"},
        "steps": last["step"], "total_steps": attempts[-1]["total_steps"], "epochs_started": last["epoch"] + 1,
        "attempts": len(attempts), "resumed_from_steps": [a["start_step"] for a in attempts[1:]],
        "final": {k: last[k] for k in ("loss", "loss_qa", "loss_vq")},
        "first": {k: rows[0][k] for k in ("loss", "loss_qa", "loss_vq")},
        "tokens_per_s": sum(row["tokens"] for row in rows) / busy,
        "samples_per_s": sum(row["samples"] for row in rows) / busy,
        "wall_time_s": wall_s,
        "outputs": {"adapter": str(out / "adapter"), "merged": str(out / "merged"), "checkpoint": checkpoint,
                    "metrics": str(out / METRICS_FILE), "data_report": str(out / DATA_REPORT_FILE)},
    }  # fmt: skip


def main(cfg: SFTConfig) -> dict[str, Any]:
    clock = stage_clock()
    started = time.time()
    out = Path(cfg.output_dir).resolve()  # workers resolve paths from their own working directory
    claim_output_dir(out, "sft", TRAINING_OUTPUTS)  # refuses a folder of files stmed did not write
    write_config(cfg, out)
    with clock.phase("data"):
        instruct, image_root = _resolve_data(cfg, out)
    with clock.phase("model_load"):
        processor = load_processor(cfg.model)
    check_length_budget(cfg.train, image_seq_len(processor))  # before any worker starts
    with clock.phase("ray_init"):
        init_ray(cfg.ray)
    loop = SFTLoopConfig(model=cfg.model, lora=cfg.lora, train=cfg.train, instruct_path=str(instruct),
                         image_root=str(image_root), output_dir=str(out))  # fmt: skip
    loop_values = config_to_dict(loop, redact=False)
    name = training_run_name(out, "sft", cfg.run_name, (METRICS_FILE, ATTEMPTS_FILE, DATA_REPORT_FILE),
                             training_fingerprint(loop_values))
    run = run_training(train_sft, loop_values, cfg.ray, name, out / "checkpoints")
    clock.add_all(training_timings(run, out))
    with clock.phase("writing"):
        checkpoint = run.checkpoint.path if run.checkpoint else None
        summary = _summarise(out, name, checkpoint, time.time() - started)
    summary[TIMINGS] = clock.block()
    write_summary(out, summary)
    log.info("sft done: %d steps, loss %.4f (qa %.4f, vq %.4f); merged model in %s", summary["steps"],
             summary["final"]["loss"], summary["final"]["loss_qa"], summary["final"]["loss_vq"],
             summary["outputs"]["merged"])  # fmt: skip
    return summary


if __name__ == "__main__":
    run_job(main, SFTConfig)
