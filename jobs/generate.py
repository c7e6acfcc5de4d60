"""Stage: self-generated preference data (METHOD §3) — sample images, self-play, judge, write pairs.

    ray job submit --working-dir . -- python -m jobs.generate --config jobs/configs/generate.yaml
    python -m jobs.generate --config jobs/configs/local/generate.yaml model.preset=null \
        model.name_or_path=runs/demo/sft/merged

Pipeline (Ray Data, streaming): ``from_items(images) → map_batches(Generator, fixed pool) →
map_batches(KeptPairJudge, autoscaling pool)``; the driver writes each finished block to
``parts/`` as it arrives. At the end: ``preferences.parquet``, ``dpo.json`` (reference DPO format),
``failures.jsonl`` (every dropped image, question, answer pair or judgement, with its reason),
``audit.jsonl`` (one line per image sent to the judge: pixel digest, host, gate action, masked regions;
``stmed.privacy.audit``), ``contamination.jsonl`` (pool images removed as copies of benchmark images),
``config.yaml`` and ``summary.json``.

Resume: rerun with the same ``output_dir``. Images whose k question rows are all in ``parts/`` are
skipped; rows already written for a half-done image are generated again but not re-emitted, so never
re-judged; failed judgements are retried. Judge replies are cached on disk
(``judge.cache_dir``, default ``output_dir/judge_cache``), so a request that was answered before the
kill is not paid twice; ``ledger.jsonl`` holds every judge call's tokens and price across reruns, and
``judge.budget_usd`` stops the round (one line, exit 1, parts kept) before a request would pass it: rerun
with a higher budget to go on (``stmed.judge.ledger``). (Ray Data's CheckpointConfig would also do this, but its filter actor takes a
whole CPU, which starves a 2-CPU machine.) On a cluster ``output_dir`` must be on shared storage.
The row schema, the resume bookkeeping and the pair assembly are Ray-free, in ``stmed.selfplay.preferences``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actors.generator import Generator, KeptPairJudge
from jobs.runtime import NothingProduced, init_ray, pass_timings, run_job, stage_clock
from stmed.config import ConfigError, ModelConfig, RayConfig, config_to_dict, write_config
from stmed.data.records import DataError, export_dpo_json, list_images, sample_images, write_preferences
from stmed.judge.cache import ReplyCache
from stmed.judge.judging import BUDGET_ERROR, JudgeSettings
from stmed.judge.ledger import LEDGER_FILE, SpendLedger, ledger_totals, per_pair, read_ledger
from stmed.log import get_logger
from stmed.privacy.audit import audit_lines, audit_totals, write_audit
from stmed.privacy.contamination import ContaminationSettings, remove_benchmark_copies
from stmed.privacy.gate import PrivacySettings
from stmed.privacy.hosts import url_host
from stmed.runs import (
    FINGERPRINT_FILE,
    SUMMARY,
    TIMINGS,
    StageClock,
    claim_output_dir,
    content_digest,
    fingerprint_changes,
    write_fingerprint,
    write_summary,
)
from stmed.selection.selective import SelectiveSettings
from stmed.selfplay.generation import GenerationSettings, read_demonstrations
from stmed.selfplay.preferences import (
    OK,
    assemble,
    awaiting_batch,
    balance_yes_no,
    chosen_at_least,
    plan_resume,
    read_parts,
    summarize_rows,
    write_part,
)

log = get_logger(__name__)


@dataclass(frozen=True)
class JudgeGroup(JudgeSettings):
    reference_findings: str | None = None
    """A synthetic findings.json: start the offline reference judge on loopback and use it."""
    reference_batch_delay_s: float = 1.0
    """With the offline judge and ``mode=batch``: how long its Batch API jobs take."""


@dataclass(frozen=True)
class PoolsConfig:
    generators: int = 1
    """Generator actors (hf engine), each holding a model."""
    generator_cpus: float = 1.0
    generator_gpus: float | None = None
    """GPUs per generator actor (hf engine); None: 1 when ``ray.use_gpu``, else 0."""
    images_per_batch: int = 4
    judge_min: int = 1
    judge_max: int = 4
    """The judge pool autoscales between these; the RPM/TPM budgets are split over judge_max."""
    judge_cpus: float = 0.25
    """Judge actors wait on the network: a fraction of a CPU leaves room for the generators."""
    pairs_per_judge_batch: int = 16


@dataclass(frozen=True)
class GenerateConfig:
    """Generate self-play preference pairs and judge them."""

    output_dir: str
    images: str
    """The image manifest: a folder of images, a JSON/JSONL list of paths, or an instruct file."""
    model: ModelConfig
    image_root: str | None = None
    """Where the manifest's relative paths live (default: the manifest's folder)."""
    num_images: int = 10_000
    sample_seed: int = 0
    """Seed of the image sample."""
    min_chosen_score: float | None = None
    """Keep a pair only when its chosen answer scored at least this (None: any pair the judge decided).
    A pair of two poor answers teaches the model to be less wrong in whatever way the judge pays for:
    an answer that dodges the question can outscore a wrong one."""
    balance_yes_no: bool = False
    """Keep as many yes/no-question pairs whose chosen answer is "yes" as "no" (the surplus is dropped,
    with its reason in failures.jsonl), so that DPO cannot gain by shifting its yes/no bias
    (``stmed.selfplay.preferences.balance_yes_no``)."""
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    judge: JudgeGroup = field(default_factory=JudgeGroup)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    """The burned-in-text gate in front of the judge (``stmed.privacy.gate``)."""
    contamination: ContaminationSettings = field(default_factory=ContaminationSettings)
    """Benchmark images kept out of the self-play pool (``stmed.privacy.contamination``)."""
    pools: PoolsConfig = field(default_factory=PoolsConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    selective: SelectiveSettings = field(default_factory=SelectiveSettings)
    """Selective judging (round 2 on): a jobs.select head rates each pair first; only the uncertain ones go to
    the judge, the others are labelled by it (``labelled_by`` in the rows; ``stmed.selection.selective``)."""

    def __post_init__(self) -> None:
        if self.generation.engine == "vllm" and self.model.name_or_path is None:
            raise ConfigError("generation.engine=vllm needs model.name_or_path (a merged checkpoint)")
        if self.num_images < 1:
            raise ConfigError(f"num_images must be >= 1, got {self.num_images}")
        if self.generation.engine == "hf" and self.generation.device == "cuda" and self.generator_gpus == 0:
            raise ConfigError("generation.device=cuda but the generator actors get no GPU: set ray.use_gpu=true "
                              "or pools.generator_gpus=1")
        if not 1 <= self.pools.judge_min <= self.pools.judge_max:
            raise ConfigError(f"pools: need 1 <= judge_min <= judge_max, got {self.pools.judge_min}, "
                              f"{self.pools.judge_max}")


    @property
    def generator_gpus(self) -> float:
        """GPUs per hf generator actor: as configured, else one per actor on a GPU cluster."""
        if self.pools.generator_gpus is not None:
            return self.pools.generator_gpus
        return 1.0 if self.ray.use_gpu else 0.0


@dataclass(frozen=True)
class GenerateResult:
    output_dir: Path
    summary: dict[str, Any]


def image_root(cfg: GenerateConfig) -> Path:
    manifest = Path(cfg.images)
    return Path(cfg.image_root) if cfg.image_root else manifest if manifest.is_dir() else manifest.parent


def sampled_images(cfg: GenerateConfig) -> list[dict[str, str]]:
    """The reproducible image sample; ``image_id`` is the path relative to the image root, so seeds
    (derived from it) do not depend on where the data is mounted."""
    root = image_root(cfg)
    paths = sample_images(list_images(cfg.images, cfg.image_root), cfg.num_images, cfg.sample_seed)
    return [{"image_id": os.path.relpath(p, root) if Path(p).is_relative_to(root) else p, "image_path": p}
            for p in paths]


class BudgetStopped(NothingProduced):
    """The round reached ``judge.budget_usd``: the rows judged so far are in ``parts/``, no summary is
    written, and a rerun with a higher budget resumes without paying for them again."""


def build_dataset(cfg: GenerateConfig, todo: list[dict], skip: frozenset[str], judge: JudgeSettings,
                  ledger: Any = None):
    import ray
    from ray.data import ActorPoolStrategy

    ds = ray.data.from_items(todo)
    if cfg.generation.engine == "vllm":
        from actors.vllm_generator import vllm_generate  # GPU only; imports ray.data.llm and vLLM

        ds = vllm_generate(ds, cfg.model.name_or_path, cfg.generation, skip)
    else:
        ds = ds.map_batches(
            Generator, fn_constructor_kwargs={"model": cfg.model, "settings": cfg.generation,
                                              "skip_pair_ids": skip, "privacy": cfg.privacy},
            compute=ActorPoolStrategy(size=cfg.pools.generators), batch_size=cfg.pools.images_per_batch,
            num_cpus=cfg.pools.generator_cpus, num_gpus=cfg.generator_gpus, batch_format="numpy")
    if cfg.selective.select_dir:
        from actors.selector import PairSelector  # loads the selector's policy and head once

        ds = ds.map_batches(
            PairSelector, fn_constructor_kwargs={"settings": cfg.selective, "image_root": str(image_root(cfg))},
            compute=ActorPoolStrategy(size=1), batch_size=cfg.selective.pairs_per_batch,
            num_cpus=cfg.selective.selector_cpus, batch_format="numpy")
    return ds.map_batches(
        KeptPairJudge, fn_constructor_kwargs={"settings": judge, "num_actors": cfg.pools.judge_max,
                                              "privacy": cfg.privacy, "ledger": ledger},
        compute=ActorPoolStrategy(min_size=cfg.pools.judge_min, max_size=cfg.pools.judge_max),
        batch_size=cfg.pools.pairs_per_judge_batch, num_cpus=cfg.pools.judge_cpus, batch_format="numpy")


def budget_refused(block: Any) -> bool:
    """Whether a written block holds a pair the ledger refused to pay for."""
    if "error" not in block.column_names:
        return False
    return any(e.startswith(BUDGET_ERROR) for e in block.column("error").to_pylist() if isinstance(e, str))


def run_pipeline(cfg: GenerateConfig, todo: list[dict], skip: frozenset[str], judge: JudgeSettings,
                 parts: Path, clock: StageClock | None = None) -> None:
    """Stream the pipeline, writing each finished block as it arrives (parts sort by run, then block).
    Once the budget refused a request the stream stops: nothing more is generated for a judge that is
    not paid; the blocks still in flight are lost, but their paid replies are in the cache."""
    import ray

    clock = clock or StageClock()
    with clock.phase("ray_init"):
        init_ray(cfg.ray)
    run = time.strftime("%Y%m%d-%H%M%S") + f"-{time.time_ns() % 10**9:09d}"
    rows = 0
    started = time.time()
    from actors.ledger import start_ledger

    ledger = start_ledger(Path(cfg.output_dir) / LEDGER_FILE, judge.budget_usd) if judge.mode == "online" else None
    dataset = build_dataset(cfg, todo, skip, judge, ledger)
    blocks = iter(dataset.iter_batches(batch_size=None, batch_format="pyarrow"))
    try:
        for n, block in enumerate(blocks):
            if block.num_rows:
                write_part(parts, f"part-{run}-{n:06d}", block)
                rows += block.num_rows
                log.info("wrote %d rows (%d this run)", block.num_rows, rows)
            if budget_refused(block):
                log.warning("judge.budget_usd=%s reached: stopping the round", judge.budget_usd)
                break
    finally:  # on an interrupt, stop the streaming executor (and its actors) now, not at GC
        getattr(blocks, "close", lambda: None)()
        if ledger is not None:
            ray.kill(ledger)
    if cfg.generation.engine == "hf":  # the pool start is the generators' (the judges' build takes no model)
        clock.add_all(pass_timings([(started, time.time())], Generator.__name__))


def judge_batch_phase(out: Path, parts: Path, judge: JudgeSettings, wanted: set[str]) -> None:
    """``judge.mode=batch``: every generated pair not judged yet goes to the Batch API after generation
    (one job, or several past OpenAI's per-batch limits; ``stmed.judge.batch``), and the verdicts are one
    more part. Generation and judging do not overlap here, which the 24-hour window makes moot, and the
    whole round's requests are known before the budget is reserved for them."""
    from stmed.judge.batch import BatchError, clear_state, judge_in_batches

    pending = [row for row in read_parts(parts).values() if row["image_id"] in wanted and awaiting_batch(row)]
    if not pending:
        clear_state(out)
        return
    log.info("judging %d pairs through the Batch API at %s", len(pending), judge.base_url)
    cache = ReplyCache(judge.cache_dir) if judge.cache_dir else None
    try:
        verdicts = judge_in_batches(pending, judge, out, cache, SpendLedger(out / LEDGER_FILE, judge.budget_usd))
    except BatchError as err:
        raise NothingProduced(f"judge batch: {err}") from None
    import pyarrow as pa

    # a failed pair keeps its image: the next run sends it in a new batch
    judged = [{**row, **v.to_row(), "image_data_url": row["image_data_url"] if v.error else ""}
              for row, v in zip(pending, verdicts)]
    write_part(parts, f"part-{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**9:09d}-batch",
               pa.Table.from_pylist(judged))
    clear_state(out)


def write_outputs(cfg: GenerateConfig, out: Path, images: list[dict], rows: list[dict], judge: JudgeSettings,
                  extra: dict[str, Any], clock: StageClock | None = None) -> dict[str, Any]:
    """preferences.parquet, dpo.json, failures.jsonl and summary.json from every row written."""
    started = time.perf_counter()
    pairs, failures = assemble(rows, judge)
    if cfg.min_chosen_score is not None:
        pairs, weak = chosen_at_least(pairs, cfg.min_chosen_score)
        failures += weak
    if cfg.balance_yes_no:
        pairs, unbalanced = balance_yes_no(pairs)
        failures += unbalanced
    write_preferences(out / "preferences.parquet", pairs)
    export_dpo_json(pairs, out / "dpo.json", image_root=image_root(cfg))
    tmp = out / "failures.jsonl.tmp"
    tmp.write_text("".join(json.dumps(f) + "\n" for f in failures))
    os.replace(tmp, out / "failures.jsonl")
    audit = audit_lines(rows, url_host(judge.base_url))
    write_audit(out / "audit.jsonl", audit)
    summary = {**summarize_rows(len(images), rows, pairs, failures, judge), "sent_to_judge": audit_totals(audit),
               **extra}
    if cfg.selective.select_dir:  # selective judging: how many pairs each labeller decided
        summary["labelled_by"] = dict(Counter(r.get("labelled_by") or "judge" for r in rows if r["status"] == OK))
    spend = ledger_totals(read_ledger(out / LEDGER_FILE))  # every run of this folder
    judged = summary["judge"]["judged"]
    summary["spend"] = {**spend, "budget_usd": judge.budget_usd, "mode": judge.mode,
                        **per_pair(spend, judged, len(pairs))}
    if not pairs:
        # No summary.json: the stage did not finish, and a pipeline rerun runs it again.
        raise NothingProduced(
            f"no preference pairs from {summary['images']} images: {summary['questions_kept']} of "
            f"{summary['questions']} questions kept, {summary['answer_pairs_judged']} answer pairs sent to "
            f"the judge at {judge.base_url}, failures {summary['failures'] or 'none'} "
            f"(details in {out / 'failures.jsonl'})")
    if clock is not None:
        clock.add("writing", time.perf_counter() - started)
        summary[TIMINGS] = clock.block()
    write_summary(out, summary)
    return summary


SAMPLING_ONLY = frozenset({"batch_size", "device", "vllm_engine_kwargs", "vllm_concurrency", "vllm_bundle",
                           "vllm_stage_cpus"})
"""``generation`` settings that do not change the rows written (how they are computed, not what)."""


JUDGE_ROWS = ("base_url", "model", "temperature", "max_tokens", "swap_positions", "reference_findings")
"""``judge`` settings that change the verdicts in the rows (the rest paces, retries or caches)."""
GENERATE_OUTPUTS = ("config.yaml", SUMMARY, FINGERPRINT_FILE, "parts", "preferences.parquet", "dpo.json",
                    "failures.jsonl", "judge_cache", "audit.jsonl", "contamination.jsonl", LEDGER_FILE, "batch.json")


def fingerprint(cfg: GenerateConfig) -> dict[str, Any]:
    """What makes the rows in ``parts/``: the model (its settings and a content digest of a local
    checkpoint), the judge, the image manifest and the generation settings that change rows (with the
    demonstrations file's content digest)."""
    values = config_to_dict(cfg)
    out: dict[str, Any] = {f"model.{k}": v for k, v in values["model"].items()}
    out["model.content"] = content_digest(cfg.model.name_or_path)
    out |= {f"judge.{k}": values["judge"][k] for k in JUDGE_ROWS}
    if cfg.judge.reference_findings:  # the offline judge: a fresh loopback port each run, its findings count
        out["judge.base_url"] = None
        out["judge.reference_findings.content"] = content_digest(cfg.judge.reference_findings)
    out |= {"images": cfg.images, "image_root": str(image_root(cfg)),
            "images.content": content_digest(cfg.images, folder_listing_only=True)}
    # without a demonstrations file its keys stay out, so folders written before they existed still resume
    unused = set() if cfg.generation.demonstrations else {"demonstrations", "demonstrations_k"}
    out |= {f"generation.{k}": v for k, v in values["generation"].items() if k not in SAMPLING_ONLY | unused}
    if cfg.generation.demonstrations:  # the few-shot examples in every questioner prompt: content counts
        out["generation.demonstrations.content"] = content_digest(cfg.generation.demonstrations)
    out |= {f"privacy.{k}": v for k, v in (values.get("privacy") or {}).items()}
    if cfg.selective.select_dir:  # who labels a pair changes its verdict; without a selector, older folders resume
        out |= {f"selective.{k}": v for k, v in values["selective"].items() if k != "selector_cpus"}
        out["selective.head.content"] = content_digest(Path(cfg.selective.select_dir) / "head.safetensors")
    return out


def check_resume_settings(cfg: GenerateConfig, out: Path) -> None:
    """Refuse to resume rows written under another fingerprint (another model, judge, manifest or
    generation settings: their rows would be mixed with the new ones), naming each key with its old and
    new value; otherwise record this run's fingerprint before any row is written."""
    has_rows = any((out / "parts").glob("part-*.parquet"))
    now = fingerprint(cfg)
    changes = fingerprint_changes(out, now)
    fix = f"use a new output_dir (or delete {out / 'parts'} to start over)"
    if has_rows and changes is None:
        raise ConfigError(f"{out} holds rows without a {FINGERPRINT_FILE} (an older stmed wrote them): what "
                          f"made them is unknown; {fix}")
    if has_rows and changes:
        raise ConfigError(f"{out} holds rows made under other settings: {', '.join(changes)}; {fix}")
    write_fingerprint(out, now)


def check_budget(rows: list[dict], judge: JudgeSettings, out: Path) -> None:
    """End the round in one line when the ledger refused a request: what is judged stays in ``parts/``."""
    refused = sum(isinstance(r.get("error"), str) and r["error"].startswith(BUDGET_ERROR) for r in rows)
    if not refused:
        return
    spend = ledger_totals(read_ledger(out / LEDGER_FILE))
    raise BudgetStopped(
        f"judge budget reached: ${spend['usd']:.4f} of judge.budget_usd={judge.budget_usd} spent over "
        f"{spend['calls']} calls ({out / LEDGER_FILE}); {refused} answer pairs not judged and the rest not "
        "generated; rerun with a higher judge.budget_usd to resume (judged pairs are not paid again)")


def main(cfg: GenerateConfig) -> GenerateResult:
    clock = stage_clock()
    start = time.monotonic()
    out = Path(cfg.output_dir)
    claim_output_dir(out, "generate", GENERATE_OUTPUTS)  # refuses a folder of files stmed did not write
    parts = out / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    if cfg.generation.demonstrations:  # a missing, empty or malformed file stops here, before any model loads
        log.info("%d demonstrations in %s", len(read_demonstrations(cfg.generation.demonstrations)),
                 cfg.generation.demonstrations)
    check_resume_settings(cfg, out)
    write_config(cfg, out)
    images = sampled_images(cfg)
    if not images:
        raise DataError(f"images: the manifest {cfg.images} lists no images")
    with clock.phase("contamination"):
        images, contamination = remove_benchmark_copies(images, cfg.contamination, out / "contamination.jsonl")
    done = read_parts(parts)
    todo, skip = plan_resume(images, done, cfg.generation.questions_per_image, cfg.generation.pair_slots,
                             batch=cfg.judge.mode == "batch")
    log.info("%d images sampled, %d to generate (%d rows already written)", len(images), len(todo), len(done))
    server = None
    if cfg.judge.reference_findings:
        from stmed.judge.reference import start_server

        with clock.phase("judge_start"):
            server = start_server(cfg.judge.reference_findings, batch_delay_s=cfg.judge.reference_batch_delay_s)
    judge_fields = {f.name: getattr(cfg.judge, f.name) for f in dataclasses.fields(JudgeSettings)}
    judge = JudgeSettings(**{**judge_fields, "base_url": server.url if server else cfg.judge.base_url,
                             "cache_dir": cfg.judge.cache_dir or str(out / "judge_cache")})
    wanted = {im["image_id"] for im in images}
    try:
        if todo:
            run_pipeline(cfg, todo, skip, judge, parts, clock)
        if judge.mode == "batch":
            with clock.phase("judge_batch"):
                judge_batch_phase(out, parts, judge, wanted)
    finally:
        if server is not None:
            server.stop()
    rows = [r for r in read_parts(parts).values() if r["image_id"] in wanted]
    check_budget(rows, judge, out)
    extra = {"resumed_rows": len(done), "contamination": contamination,
             "wall_time_s": round(time.monotonic() - start, 2)}
    if server is not None:  # what the offline judge saw in this run (retries and re-sends included)
        stats = server.stats
        extra["reference_judge"] = {"requests": stats.total, "resent": stats.resent,
                                    "outcomes": stats.outcomes, "batch_api": stats.endpoints}
    summary = write_outputs(cfg, out, images, rows, judge, extra, clock)
    log.info("%d preference pairs from %d images in %s", summary["pairs"], len(images), out)
    return GenerateResult(out, summary)


if __name__ == "__main__":
    run_job(main, GenerateConfig)
