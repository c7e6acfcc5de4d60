"""The selection head's training loop, on one worker of N (Ray Train) or in a plain process (METHOD §7).

Inputs, written by the stage's driver into ``output_dir``: ``answers.parquet`` (:class:`~stmed.selection.pairs.Answer`
rows) and ``rank_pairs.parquet`` (:class:`~stmed.selection.pairs.RankPair` rows plus ``weight`` and
``held_out``). The loop

1. gets every answer's frozen features (``stmed.selection.features``): from ``features.safetensors`` when
   it was computed for this checkpoint and these answers, else each rank computes every N-th answer and
   the ranks share the table (``gather_dicts``); rank 0 caches it. The policy is loaded only then;
2. trains the head (``stmed.selection.head``) on the training pairs: each step draws ``batch_size`` pairs
   (a seeded draw, the same on every rank; each rank takes every N-th), the loss is the weighted ranking
   loss over the whole draw (hence ``x world_size``: DDP averages the ranks' gradients);
3. reports a row per ``log_every`` steps and a checkpoint (head safetensors + optimiser state, read back
   with ``weights_only``) per ``checkpoint_every`` and at the end; rank 0 writes ``head.safetensors``.

A restarted attempt resumes from the last checkpoint with its optimiser state; the steps' draws are a
function of the step, so it continues where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from stmed.config import ConfigError, ModelConfig, build_config, config_to_dict
from stmed.data.records import DataError
from stmed.eval.calibration import agreement as share_of_same
from stmed.eval.calibration import bootstrap
from stmed.log import get_logger
from stmed.model.build import load_model
from stmed.runs import MetricsLog, content_digest, write_json
from stmed.selection.features import extract_features
from stmed.selection.head import (
    LossKind,
    SelectionHead,
    agreement,
    load_head,
    pair_auc,
    ranking_loss,
    rate,
    save_head,
)
from stmed.selection.pairs import Answer, RankPair
from stmed.train.checkpoints import read_trainer_state
from stmed.train.distributed import gather_dicts
from stmed.train.session import TrainSession
from stmed.train.stage import ATTEMPTS_FILE, DATA_REPORT_FILE, METRICS_FILE, check_finite

log = get_logger(__name__)

ANSWERS_FILE, PAIRS_FILE = "answers.parquet", "rank_pairs.parquet"
FEATURES_FILE, HEAD_FILE = "features.safetensors", "head.safetensors"


@dataclass(frozen=True)
class HeadSettings:
    """The MLP on the frozen features (BioMed-VITAL: 4 layers)."""

    hidden: int = 256
    layers: int = 3
    """Linear layers, 1 (a linear scorer) to 4."""
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if not 1 <= self.layers <= 4:
            raise ConfigError(f"head.layers must be in 1..4, got {self.layers}")
        if self.hidden < 1 or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"head.hidden must be >= 1 and head.dropout in [0, 1); got {self.hidden}, {self.dropout}")


@dataclass(frozen=True)
class SelectorTrainSettings:
    """Optimisation of the head (features are frozen: these steps are cheap)."""

    steps: int = 400
    batch_size: int = 256
    """Pairs drawn per step over all workers."""
    lr: float = 1e-3
    weight_decay: float = 1e-4
    margin: float = 1.0
    """The hinge's margin (BioMed-VITAL: 1)."""
    loss: LossKind = "hinge"
    max_length: int = 1024
    """Tokens per rendered answer (image included) for the feature pass."""
    feature_batch_size: int = 8
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 200

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "max_length", "feature_batch_size", "log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.weight_decay < 0 or self.margin <= 0:
            raise ConfigError(f"train.lr and train.margin must be > 0, train.weight_decay >= 0; got "
                              f"{self.lr}, {self.margin}, {self.weight_decay}")


@dataclass(frozen=True)
class SelectionLoopConfig:
    """What one worker needs (a plain dict across the Ray boundary)."""

    model: ModelConfig
    output_dir: str
    image_root: str
    head: HeadSettings = field(default_factory=HeadSettings)
    train: SelectorTrainSettings = field(default_factory=SelectorTrainSettings)
    answers_path: str = ""
    pairs_path: str = ""


def write_inputs(out: Path, answers: list[Answer], pairs: list[tuple[RankPair, float, bool]]) -> tuple[Path, Path]:
    """The loop's inputs: ``answers.parquet`` and ``rank_pairs.parquet`` (each pair with weight, held_out)."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [{**p.to_row(), "weight": w, "held_out": h} for p, w, h in pairs]
    pq.write_table(pa.Table.from_pylist([a.to_row() for a in answers]), out / ANSWERS_FILE)
    pq.write_table(pa.Table.from_pylist(rows), out / PAIRS_FILE)
    return out / ANSWERS_FILE, out / PAIRS_FILE


def read_inputs(answers_path: str | Path, pairs_path: str | Path) -> tuple[list[Answer], list[dict[str, Any]]]:
    return ([Answer.from_row(r) for r in pq.read_table(answers_path).to_pylist()],
            pq.read_table(pairs_path).to_pylist())  # fmt: skip


def features_key(cfg: SelectionLoopConfig, answers: list[Answer]) -> str:
    """What the cached features depend on: the checkpoint's content, the answers, the rendering length."""
    digest = hashlib.sha256(json.dumps([config_to_dict(cfg.model), content_digest(cfg.model.name_or_path),
                                        cfg.train.max_length]).encode())  # fmt: skip
    for a in answers:
        digest.update(a.answer_id.encode())
    return digest.hexdigest()


def load_features(path: Path, key: str) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """The cached ``({answer_id: features}, {answer_id: why skipped})`` when made under ``key``, else None."""
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    if meta.get("key") != key:
        return None
    table, ids = load_file(str(path))["features"], json.loads(meta["ids"])
    return {i: table[n] for n, i in enumerate(ids)}, json.loads(meta["skipped"])


def save_features(path: Path, key: str, features: dict[str, torch.Tensor], skipped: dict[str, str]) -> None:
    ids = sorted(features)
    table = torch.stack([features[i] for i in ids]) if ids else torch.zeros(0)
    tmp = path.with_name(path.name + ".tmp")
    save_file({"features": table.contiguous()}, str(tmp),
              metadata={"key": key, "ids": json.dumps(ids), "skipped": json.dumps(skipped)})  # fmt: skip
    tmp.replace(path)


def answer_features(cfg: SelectionLoopConfig, answers: list[Answer], session: TrainSession,
                    ) -> tuple[dict[str, torch.Tensor], dict[str, str], float]:  # fmt: skip
    """Every answer's features (cached, or computed by rank slices and shared), and the seconds spent."""
    started, path = time.perf_counter(), Path(cfg.output_dir) / FEATURES_FILE
    key = features_key(cfg, answers)
    cached = load_features(path, key)  # every rank reads the same file: every rank takes the same branch
    if cached is not None:
        return *cached, 0.0
    model, processor = load_model(cfg.model)
    model.requires_grad_(False)
    model.to(session.device)
    mine = answers[session.world_rank :: session.world_size]
    features, skipped = extract_features(model, processor, mine, cfg.image_root, cfg.train.max_length,
                                         cfg.train.feature_batch_size)  # fmt: skip
    merged = gather_dicts({i: ("ok", f) for i, f in features.items()} | {i: ("skip", s) for i, s in skipped.items()},
                          session.world_size)  # fmt: skip
    features = {i: v for i, (kind, v) in merged.items() if kind == "ok"}
    skipped = {i: v for i, (kind, v) in merged.items() if kind == "skip"}
    if session.world_rank == 0:
        save_features(path, key, features, skipped)
    del model
    return features, skipped, time.perf_counter() - started


def _restore(session: TrainSession, head: SelectionHead, optimizer: torch.optim.Optimizer) -> int:
    ckpt = session.latest_checkpoint()
    if ckpt is None:
        return 0
    head.load_state_dict(load_file(str(ckpt / HEAD_FILE)))
    state = read_trainer_state(ckpt)
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"])


def _report(session: TrainSession, row: dict[str, Any], head: SelectionHead, optimizer, final: bool,
            train: SelectorTrainSettings) -> None:  # fmt: skip
    step = row["step"]
    if final or step % train.checkpoint_every == 0:
        with tempfile.TemporaryDirectory(prefix="stmed-select-ckpt-") as tmp:
            if session.world_rank == 0:
                save_head(head, Path(tmp) / HEAD_FILE)
                torch.save({"optimizer": optimizer.state_dict(), "scheduler": {}, "step": step},
                           Path(tmp) / "trainer_state.pt")  # fmt: skip
            session.report(row, Path(tmp) if session.world_rank == 0 else None)
    elif step % train.log_every == 0:
        session.report(row, None)


def train_selector(config: dict[str, Any], session: TrainSession) -> None:
    """Train the selection head on one worker; resumes from ``session.latest_checkpoint()``."""
    cfg = build_config(SelectionLoopConfig, config)
    train, out, rank, world = cfg.train, Path(cfg.output_dir), session.world_rank, session.world_size
    answers, pair_rows = read_inputs(cfg.answers_path, cfg.pairs_path)
    features, skipped, feature_s = answer_features(cfg, answers, session)
    index = {i: n for n, i in enumerate(sorted(features))}
    usable = [r for r in pair_rows if r["better"] in index and r["worse"] in index]
    fit = [r for r in usable if not r["held_out"]]
    if not fit:
        raise DataError(f"no training pairs: {len(pair_rows)} pairs, {len(usable)} with features for both "
                        f"answers ({len(skipped)} answers skipped), all held out; lower selection.holdout_fraction")
    table = torch.stack([features[i] for i in sorted(features)]).to(session.device)  # (answers, dim)
    better = torch.tensor([index[r["better"]] for r in fit], device=session.device)
    worse = torch.tensor([index[r["worse"]] for r in fit], device=session.device)
    weight = torch.tensor([float(r["weight"]) for r in fit], device=session.device)

    torch.manual_seed(train.seed)  # the same initial head on every rank
    head = SelectionHead(table.shape[1], cfg.head.hidden, cfg.head.layers, cfg.head.dropout).to(session.device)
    head.set_scale(table[torch.cat([better, worse]).unique()])
    optimizer = torch.optim.AdamW(head.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    start = _restore(session, head, optimizer)
    model = session.prepare_model(head)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / DATA_REPORT_FILE, {
            "answers": len(answers), "answers_skipped": len(skipped), "skipped_examples": dict(list(skipped.items())[:20]),
            "pairs": len(pair_rows), "pairs_usable": len(usable), "pairs_train": len(fit),
            "pairs_train_by_source": {s: sum(r["source"] == s for r in fit) for s in ("judge", "clinician")},
            "feature_dim": table.shape[1], "feature_s": feature_s})  # fmt: skip
        MetricsLog(out / ATTEMPTS_FILE).write({"start_step": start, "total_steps": train.steps, "world_size": world,
                                               "time": time.time(), "reference_precompute_s": feature_s})  # fmt: skip
        log.info("selector: %d answers (%d skipped), %d training pairs, head on %d features, steps %d..%d",
                 len(features), len(skipped), len(fit), table.shape[1], start + 1, train.steps)  # fmt: skip
    metrics_log = MetricsLog(out / METRICS_FILE)
    model.train()
    for step in range(start + 1, train.steps + 1):
        started = time.perf_counter()
        draw = torch.randint(len(fit), (train.batch_size,),
                             generator=torch.Generator().manual_seed(train.seed * 1_000_003 + step))  # fmt: skip
        total = float(weight[draw.to(weight.device)].sum())
        mine = draw[rank::world].to(session.device)
        scores = model(torch.cat([table[better[mine]], table[worse[mine]]]))  # (2 * shard,): one forward for DDP
        s_better, s_worse = scores.chunk(2)
        loss = ranking_loss(s_better, s_worse, weight[mine], total, train.margin, train.loss) * world
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        stats = torch.tensor([loss.item() / world, (s_better > s_worse).float().sum().item(), len(mine)])
        stats = gather_dicts({rank: stats}, world)
        total_stats = torch.stack(list(stats.values())).sum(0)
        row = {"step": step, "loss": float(total_stats[0]), "agreement": float(total_stats[1] / total_stats[2]),
               "pairs": int(total_stats[2]), "step_time_s": time.perf_counter() - started}  # fmt: skip
        if rank == 0:
            metrics_log.write(row)
            if step % train.log_every == 0 or step == train.steps:
                log.info("step %d/%d loss %.4f agreement %.3f", step, train.steps, row["loss"], row["agreement"])
        check_finite(row)
        _report(session, row, head, optimizer, step == train.steps, train)
    if rank == 0:
        save_head(head, out / HEAD_FILE, {"feature_key": features_key(cfg, answers)})


def held_out_scores(head_path: Path, features: dict[str, torch.Tensor], rows: list[dict[str, Any]],
                    ) -> dict[str, float | int | None]:  # fmt: skip
    """Agreement (with a percentile bootstrap 95% interval, ``stmed.eval.calibration``) and AUC of a saved
    head on ``rows`` (rank pairs whose answers have features)."""
    rows = [r for r in rows if r["better"] in features and r["worse"] in features]
    if not rows:
        return {"n": 0, "agreement": None, "agreement_ci": None, "auc": None}
    head = load_head(head_path)
    b = rate(head, torch.stack([features[r["better"]] for r in rows]))
    w = rate(head, torch.stack([features[r["worse"]] for r in rows]))
    marks = [("y", "y" if x > y else "n") for x, y in zip(b.tolist(), w.tolist())]  # a rater pair per pair
    return {"n": len(rows), "agreement": agreement(b, w), "agreement_ci": bootstrap(marks, share_of_same),
            "auc": pair_auc(b, w)}

