"""Stage: the selection model (METHOD §7) — a head on the policy's frozen features, trained on Ray Train on
judge-scored and clinician answer pairs; it rates a round's pairs and keeps the best for DPO.

    ray job submit --working-dir . -- python -m jobs.select --config jobs/configs/select.yaml \
        model.name_or_path=/mnt/shared/stmed/sft/merged generate_dir=/mnt/shared/stmed/generate1
    python -m jobs.select --config jobs/configs/local/select.yaml output_dir=runs/demo/select1 \
        model.name_or_path=runs/demo/sft/merged generate_dir=runs/demo/generate1 \
        clinician_labels=runs/demo/review/labels.parquet

Inputs: a generate run (``parts/``: every judged answer with its score; ``preferences.parquet``: the pairs
DPO would train on) and, optionally, the clinicians' labels (``jobs.review export``). Outputs under
``output_dir``: ``config.yaml``, ``answers.parquet`` and ``rank_pairs.parquet`` (what the head learns from,
each pair marked held out or not, by image), ``features.safetensors`` (the frozen features, cached),
``checkpoints/``, ``metrics.jsonl``, ``data_report.json``, ``head.safetensors``, ``selected.parquet`` (the
``selection.keep_fraction`` of the pairs with the widest selector margin: pass it to ``jobs.dpo`` as
``preferences``) and ``summary.json`` (held-out agreement and AUC with the judge and with the clinicians,
beside the judge's own agreement with those clinicians; what was kept and why; ``judge_scale``, the line from
head scores to judge scores that selective judging labels pairs with: ``jobs.generate selective.select_dir``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from actors.training import run_training
from jobs.runtime import init_ray, run_job, stage_clock, training_timings
from stmed.config import ConfigError, ModelConfig, RayConfig, build_config, config_to_dict, write_config
from stmed.data.records import DataError, read_preferences, write_preferences
from stmed.log import get_logger
from stmed.review.export import read_labels, verdicts
from stmed.runs import (
    SUMMARY,
    TIMINGS,
    MetricsLog,
    claim_output_dir,
    training_fingerprint,
    training_run_name,
    write_summary,
)
from stmed.selection.head import load_head, rate, save_head
from stmed.selection.keep import keep_by_margin
from stmed.selection.pairs import (
    Answer,
    clinician_pairs,
    held_out,
    judge_agrees,
    judge_pairs,
    judge_scores,
    preference_pairs,
)
from stmed.selection.selective import fit_judge_scale
from stmed.selection.train import (
    FEATURES_FILE,
    HEAD_FILE,
    HeadSettings,
    SelectionLoopConfig,
    SelectorTrainSettings,
    features_key,
    held_out_scores,
    load_features,
    train_selector,
    write_inputs,
)
from stmed.selfplay.preferences import read_parts
from stmed.train.stage import ATTEMPTS_FILE, DATA_REPORT_FILE, METRICS_FILE

log = get_logger("stmed.jobs.select")

SELECTED_FILE = "selected.parquet"
OUTPUTS = ("config.yaml", "run.json", SUMMARY, METRICS_FILE, ATTEMPTS_FILE, DATA_REPORT_FILE, "checkpoints",
           "fingerprint.json", "answers.parquet", "rank_pairs.parquet", FEATURES_FILE, HEAD_FILE, SELECTED_FILE)


@dataclass(frozen=True)
class SelectionSettings:
    """What the selector learns from and what it keeps."""

    keep_fraction: float = 0.5
    """Share of ``preferences.parquet``'s pairs written to ``selected.parquet``, widest selector margin first
    (BioMed-VITAL keeps 10–90%); 1.0 keeps all (rated, ordered as in the file)."""
    clinician_weight: float = 50.0
    """Loss weight of a clinician pair against 1 for a judge pair (BioMed-VITAL sweeps 1–400)."""
    pairs_per_question: int = 6
    """Judge pairs drawn per question across its answers' score levels (the widest gap always)."""
    holdout_fraction: float = 0.2
    """Share of images whose pairs (judge and clinician) are held out for the figures."""
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.keep_fraction <= 1.0:
            raise ConfigError(f"selection.keep_fraction must be in (0, 1], got {self.keep_fraction}")
        if self.clinician_weight <= 0 or self.pairs_per_question < 1:
            raise ConfigError("selection.clinician_weight must be > 0 and selection.pairs_per_question >= 1; got "
                              f"{self.clinician_weight}, {self.pairs_per_question}")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ConfigError(f"selection.holdout_fraction must be in [0, 1), got {self.holdout_fraction}")


@dataclass(frozen=True)
class SelectConfig:
    """The selection model: train it on Ray Train, report its agreement, keep the best pairs."""

    output_dir: str
    model: ModelConfig
    """The policy whose frozen states are the features: the merged checkpoint that generated the pairs."""
    generate_dir: str
    """A jobs.generate output folder (``parts/``, ``preferences.parquet``)."""
    image_root: str | None = None
    """Folder relative image paths are under (default: generate_dir)."""
    clinician_labels: str | None = None
    """``labels.parquet`` / ``labels.jsonl`` of ``jobs.review export``: clinician pairs, up-weighted."""
    selection: SelectionSettings = field(default_factory=SelectionSettings)
    head: HeadSettings = field(default_factory=HeadSettings)
    train: SelectorTrainSettings = field(default_factory=SelectorTrainSettings)
    ray: RayConfig = field(default_factory=RayConfig)
    run_name: str | None = None
    """Ray Train run name; None resumes the unfinished run of ``output_dir``, else makes a fresh one."""


def _judge_data(gen: Path, cfg: SelectConfig) -> tuple[list[Answer], list, list, dict[str, float]]:
    """Rated answers, judge rank pairs (from ``parts/`` when there, else the assembled pairs), the assembled
    pairs that selection keeps or drops, and each answer's judge score."""
    prefs_path = gen / "preferences.parquet"
    prefs = read_preferences(prefs_path) if prefs_path.is_file() else []
    pref_answers, pref_pairs = preference_pairs(prefs)
    scores = {Answer.of(p.image, p.question, text).answer_id: score for p in prefs
              for text, score in ((p.chosen, p.chosen_score), (p.rejected, p.rejected_score))}  # fmt: skip
    if (gen / "parts").is_dir():
        rows = list(read_parts(gen / "parts").values())
        answers, pairs = judge_pairs(rows, cfg.selection.pairs_per_question, cfg.selection.seed)
        scores = judge_scores(rows)
    else:
        answers, pairs = pref_answers, pref_pairs
    if not pairs:
        raise DataError(f"generate_dir: {gen} holds no judged answers with different scores (run jobs.generate)")
    return answers + pref_answers, pairs, prefs, scores


def _fit_scale(out: Path, features: dict[str, torch.Tensor], scores: dict[str, float],
               pair_rows: list[dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
    """The line from head scores to judge scores over the training answers (for selective judging), kept in
    the head's file."""
    train = sorted({r[k] for r in pair_rows if r["source"] == "judge" and not r["held_out"] for k in ("better", "worse")}
                   & features.keys() & scores.keys())  # fmt: skip
    if len(train) < 2:
        return {"a": None, "b": None, "answers": len(train)}  # no judge scores to fit: no selective judging
    head = load_head(out / HEAD_FILE)
    rated = rate(head, torch.stack([features[i] for i in train])).tolist()
    a, b = fit_judge_scale(rated, [scores[i] for i in train])
    save_head(head, out / HEAD_FILE, {"judge_scale": [a, b]})
    return {"a": a, "b": b, "answers": len(train)}


def _figures(out: Path, features: dict[str, torch.Tensor], pair_rows: list[dict[str, Any]],
             labels: list[dict], decided: dict[str, str]) -> dict[str, Any]:  # fmt: skip
    """Agreement and AUC on held-out (and training) pairs by source, the judge's own clinician agreement."""
    figures: dict[str, Any] = {}
    for source in ("judge", "clinician"):
        rows = [r for r in pair_rows if r["source"] == source]
        figures[source] = {"held_out": held_out_scores(out / HEAD_FILE, features, [r for r in rows if r["held_out"]]),
                           "train": held_out_scores(out / HEAD_FILE, features, [r for r in rows if not r["held_out"]])}
    held = {r["pair_id"] for r in pair_rows if r["source"] == "clinician" and r["held_out"]}
    if labels:
        figures["judge_vs_clinician"] = {"held_out": judge_agrees(labels, decided, held),
                                         "all": judge_agrees(labels, decided, set(decided))}  # fmt: skip
    return figures


def _select(out: Path, features: dict[str, torch.Tensor], prefs: list, keep_fraction: float) -> dict[str, Any]:
    head, margins = load_head(out / HEAD_FILE), {}
    for p in prefs:
        chosen, rejected = Answer.of(p.image, p.question, p.chosen), Answer.of(p.image, p.question, p.rejected)
        if chosen.answer_id in features and rejected.answer_id in features:
            scores = rate(head, torch.stack([features[chosen.answer_id], features[rejected.answer_id]]))
            margins[p.pair_id] = float(scores[0] - scores[1])
    kept, report = keep_by_margin(prefs, margins, keep_fraction)
    write_preferences(out / SELECTED_FILE, kept)
    return report


def main(cfg: SelectConfig) -> dict[str, Any]:
    clock, started = stage_clock(), time.time()
    out, gen = Path(cfg.output_dir).resolve(), Path(cfg.generate_dir).resolve()
    if not gen.is_dir():
        raise ConfigError(f"generate_dir: folder not found: {gen} (run jobs.generate first)")
    image_root = Path(cfg.image_root).resolve() if cfg.image_root else gen
    claim_output_dir(out, "select", OUTPUTS)
    write_config(cfg, out)
    with clock.phase("data"):
        answers, judged, prefs, scores = _judge_data(gen, cfg)
        labels = read_labels(cfg.clinician_labels) if cfg.clinician_labels else []
        decided = verdicts(labels)
        clinician_answers, reviewed = clinician_pairs(labels, decided)
        unique = list({a.answer_id: a for a in answers + clinician_answers}.values())
        s = cfg.selection
        weighted = [(p, s.clinician_weight if p.source == "clinician" else 1.0,
                     held_out(p.image, s.holdout_fraction, s.seed)) for p in judged + reviewed]  # fmt: skip
        answers_path, pairs_path = write_inputs(out, unique, weighted)
    with clock.phase("ray_init"):
        init_ray(cfg.ray)
    loop = SelectionLoopConfig(model=cfg.model, output_dir=str(out), image_root=str(image_root), head=cfg.head,
                               train=cfg.train, answers_path=str(answers_path), pairs_path=str(pairs_path))
    loop_values = config_to_dict(loop, redact=False)
    name = training_run_name(out, "select", cfg.run_name, (METRICS_FILE, ATTEMPTS_FILE, DATA_REPORT_FILE),
                             training_fingerprint(loop_values))
    run = run_training(train_selector, loop_values, cfg.ray, name, out / "checkpoints")
    clock.add_all(training_timings(run, out))
    with clock.phase("writing"):
        features, _ = load_features(out / FEATURES_FILE, features_key(build_config(SelectionLoopConfig, loop_values),
                                                                      unique))  # fmt: skip
        pair_rows = [{**p.to_row(), "weight": w, "held_out": h} for p, w, h in weighted]
        rows = MetricsLog(out / METRICS_FILE).read_steps()
        scale = _fit_scale(out, features, scores, pair_rows)
        summary = {
            "stage": "select", "run_name": name, "steps": rows[-1]["step"], "final_loss": rows[-1]["loss"],
            "answers": len(unique), "answers_rated": len(features),
            "pairs": {src: {"train": sum(r["source"] == src and not r["held_out"] for r in pair_rows),
                            "held_out": sum(r["source"] == src and r["held_out"] for r in pair_rows)}
                      for src in ("judge", "clinician")},
            "clinician_weight": s.clinician_weight, "figures": _figures(out, features, pair_rows, labels, decided),
            "selection": _select(out, features, prefs, s.keep_fraction), "judge_scale": scale,
            "wall_time_s": time.time() - started,
            "outputs": {"head": str(out / HEAD_FILE), "selected": str(out / SELECTED_FILE),
                        "features": str(out / FEATURES_FILE)},
        }  # fmt: skip
    summary[TIMINGS] = clock.block()
    write_summary(out, summary)
    judge, clin = summary["figures"]["judge"]["held_out"], summary["figures"]["clinician"]["held_out"]
    log.info("select done: held-out agreement with the judge %s (n=%d), with clinicians %s (n=%d); kept %d of %d "
             "pairs in %s", _pct(judge["agreement"]), judge["n"], _pct(clin["agreement"]), clin["n"],
             summary["selection"]["kept"], summary["selection"]["pairs"], out / SELECTED_FILE)  # fmt: skip
    return summary


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


if __name__ == "__main__":
    run_job(main, SelectConfig)
