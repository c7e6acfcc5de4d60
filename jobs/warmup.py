"""The general-alignment warm-up (``stmed.train.warmup``): the tiny preset's stand-in for a LLaVA base.

    python -m jobs.warmup --config jobs/configs/local/warmup.yaml output_dir=runs/warmup
    ray job submit --working-dir . -- python -m jobs.warmup --config jobs/configs/local/warmup.yaml

The paper starts stage 1 from a general-purpose aligned model (SQ-LLaVA); the tiny preset starts from
random weights, so this stage first teaches it what such a base knows: to describe a phantom and to
answer open and yes/no questions about its modality and organ, on phantoms of its own (never a
benchmark's or the unlabelled pool's). Lesions are left to stage 1 and self-training. Writes
``merged/`` (the base stage 1 starts from), ``metrics.jsonl``, ``summary.json`` and ``config.yaml``.
One Ray Train worker: the recipe was measured in one process (README, "Does self-training help").
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actors.training import run_training
from jobs.runtime import init_ray, run_job, stage_clock, training_timings
from stmed.config import ConfigError, RayConfig, write_config
from stmed.log import get_logger
from stmed.runs import (
    TIMINGS,
    TRAINING_OUTPUTS,
    MetricsLog,
    claim_output_dir,
    training_run_name,
    write_summary,
)
from stmed.train.sft import train_sft
from stmed.train.stage import ATTEMPTS_FILE, DATA_REPORT_FILE, METRICS_FILE
from stmed.train.warmup import WARMUP_SEED, make_warmup_data, warmup_train_config

log = get_logger("stmed.jobs.warmup")


@dataclass(frozen=True)
class WarmupConfig:
    """Build the generally aligned tiny base that stage 1 starts from."""

    output_dir: str
    images: int = 600
    """Warm-up phantoms, each with a description and open and yes/no questions on modality and organ."""
    steps: int = 600
    """Optimiser steps of 16 conversations (at 600 the base reads 79% of modality, 97% of organ questions)."""
    data_seed: int = WARMUP_SEED
    seed: int = 0
    """Model and training seed."""
    ray: RayConfig = field(default_factory=lambda: RayConfig(num_workers=1))
    run_name: str | None = None
    """Ray Train run name; None resumes the unfinished run of ``output_dir``, else makes a fresh one."""

    def __post_init__(self) -> None:
        if self.images < 16 or self.steps < 1:
            raise ConfigError(f"images must be >= 16 and steps >= 1, got {self.images} and {self.steps}")


def main(cfg: WarmupConfig) -> dict[str, Any]:
    clock = stage_clock()
    started = time.time()
    out = Path(cfg.output_dir).resolve()
    claim_output_dir(out, "warmup", TRAINING_OUTPUTS)  # refuses a folder of files stmed did not write
    write_config(cfg, out)
    with clock.phase("data"):
        conversations = make_warmup_data(out / "data", num_images=cfg.images, seed=cfg.data_seed)
    loop = warmup_train_config(conversations, out, steps=cfg.steps, seed=cfg.seed)
    with clock.phase("ray_init"):
        init_ray(cfg.ray)
    name = training_run_name(out, "warmup", cfg.run_name, (METRICS_FILE, ATTEMPTS_FILE, DATA_REPORT_FILE))
    clock.add_all(training_timings(run_training(train_sft, loop, cfg.ray, name, out / "checkpoints"), out))
    rows = MetricsLog(out / METRICS_FILE).read_steps()
    data = json.loads((out / DATA_REPORT_FILE).read_text())
    summary = {"stage": "warmup", "run_name": name, "images": cfg.images, "steps": rows[-1]["step"],
               "samples_used": data["samples_used"], "first_loss": rows[0]["loss"], "final_loss": rows[-1]["loss"],
               "wall_time_s": time.time() - started, "outputs": {"merged": str(out / "merged")}}  # fmt: skip
    summary[TIMINGS] = clock.block()
    write_summary(out, summary)
    log.info(
        "warm-up done: %d steps, loss %.3f -> %.3f; base in %s",
        summary["steps"],
        summary["first_loss"],
        summary["final_loss"],
        out / "merged",
    )
    return summary


if __name__ == "__main__":
    run_job(main, WarmupConfig)
