"""Zero-shot evaluation (METHOD §5): greedy answers over Ray Data, scored with the LLaVA-Med v1.0 scorer.

    ray job submit --working-dir . -- python -m jobs.evaluate --config jobs/configs/evaluate.yaml
    python -m jobs.evaluate --config jobs/configs/local/evaluate.yaml output_dir=runs/eval limit=40

For every model × benchmark: ``output_dir/<model>/<benchmark>/answers.jsonl`` (LLaVA-Med answer file,
the test file's ids in its order) and ``metrics.json``; then ``results.md`` (the paper's table),
``summary.json`` and ``config.yaml``. All benchmarks of a model go through one Ray Data pass, so each
actor loads the model once. A question whose image is missing or unreadable gets an empty answer (scored
as wrong, as the official scorer would) and is counted in ``missing_images``.
"""

from __future__ import annotations

import itertools
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from actors.answerer import Answerer, vllm_answer
from jobs.runtime import init_ray, pass_timings, run_job, stage_clock
from stmed.config import ConfigError, ModelConfig, RayConfig, write_config
from stmed.data.records import (
    DataError,
    Prediction,
    VQAExample,
    read_benchmark,
    read_predictions,
    write_predictions,
)
from stmed.data.synthetic import load_findings, make_dataset
from stmed.eval.effects import effects
from stmed.eval.metrics import CLOSED, score, yes_no_split
from stmed.judge.grading import preference, score_answer
from stmed.log import get_logger
from stmed.model.prompts import CLOSED_SUFFIX
from stmed.runs import TIMINGS, write_json, write_summary

if TYPE_CHECKING:
    import ray.data

log = get_logger("jobs.evaluate")

SYNTHETIC = "synthetic"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # model/benchmark names become directory names
RESULT_KEYS = ("open_recall", "open_f1", "open_precision", "closed_accuracy", "closed_accuracy_strict",
               "closed_said_yes", "closed_accuracy_on_yes", "closed_accuracy_on_no", "num_open", "num_closed",
               "missing_images", "questions_per_s")


@dataclass(frozen=True)
class BenchmarkConfig:
    """One LLaVA-Med format test file."""

    test_file: str
    image_root: str | None = None
    """Folder the test file's ``image`` names are relative to; default ``<test file's folder>/images``."""
    options_suffix: str = CLOSED_SUFFIX
    """Appended to CLOSED questions that do not already carry it; "" asks them bare."""
    limit: int | None = None
    """Only the first N questions (quick runs)."""

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"benchmarks.<name>.limit must be >= 1 or null, got {self.limit}")


@dataclass(frozen=True)
class EvaluateConfig:
    """Zero-shot medical VQA evaluation of one or more models."""

    output_dir: str
    models: dict[str, ModelConfig]
    """Name (e.g. base / sft / dpo) → model; add one with ``models.dpo.name_or_path=DIR``."""
    benchmarks: dict[str, BenchmarkConfig] = field(default_factory=dict)
    synthetic: bool = False
    """Also evaluate on the synthetic benchmark (made by stmed.data.synthetic when ``data_dir`` has none)."""
    data_dir: str | None = None
    """Synthetic dataset folder; default ``output_dir/data``."""
    limit: int | None = None
    """First N questions of every benchmark (on top of a benchmark's own limit)."""
    system: Literal["sq", "plain"] = "sq"
    """System prompt: the self-questioning one the model was tuned with, or plain Vicuna."""
    batch_size: int = 8
    max_new_tokens: int = 128
    engine: Literal["hf", "vllm"] = "hf"
    vllm_engine_kwargs: dict[str, Any] = field(default_factory=dict)
    """engine=vllm: extra engine arguments (max_model_len, gpu_memory_utilization…), over stmed's defaults."""
    vllm_bundle: dict[str, float] | None = None
    """engine=vllm: one replica's placement bundle; None: one GPU. vLLM's CPU backend: ``{"CPU": 1}``."""
    compare: dict[str, str] = field(default_factory=lambda: {"dpo": "sft"})
    """Model → the model its answers are set against: on a benchmark with known findings (the synthetic
    one), the reference judge's rules score both answers to every question and count wins, ties and
    losses. A pair is skipped when either model is not evaluated."""
    ray: RayConfig = field(default_factory=RayConfig)
    """``ray.num_workers`` = answerer actors, each with ``cpus_per_worker`` CPUs (and 1 GPU if use_gpu)."""

    def __post_init__(self) -> None:
        for group, names in (("models", self.models), ("benchmarks", self.benchmarks)):
            bad = [n for n in names if not _NAME.match(n)]
            if bad:
                raise ConfigError(f"{group}: names become folders; use letters, digits, '_', '.', '-': {bad}")
        if not self.models:
            raise ConfigError("models: name at least one model, e.g. models.base.preset=tiny")
        if not self.benchmarks and not self.synthetic:
            raise ConfigError("nothing to evaluate: set benchmarks.<name>.test_file=FILE or synthetic=true")
        if self.synthetic and SYNTHETIC in self.benchmarks:
            raise ConfigError(f"benchmarks.{SYNTHETIC}: that name is reserved for synthetic=true")
        if self.engine == "vllm" and any(m.preset for m in self.models.values()):
            raise ConfigError("engine=vllm needs models.<name>.name_or_path; presets run with engine=hf")
        for name in ("batch_size", "max_new_tokens", "limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")


@dataclass(frozen=True)
class Benchmark:
    """A resolved benchmark: its questions (limit applied) and the text each is asked with."""

    name: str
    test_file: Path
    examples: list[VQAExample]
    asked: list[str]
    image_root: Path


def _asked(example: VQAExample, suffix: str) -> str:
    """The question as put to the model: CLOSED ones get the options suffix unless the file has it."""
    # Case-insensitive: VQA-RAD's published test_w_options.json writes "[Yes, No]" on 188 of its 272.
    if example.answer_type == CLOSED and suffix and suffix.strip().lower() not in example.question.lower():
        return example.question + suffix
    return example.question


def resolve_benchmarks(cfg: EvaluateConfig) -> list[Benchmark]:
    """The configured benchmarks (plus the synthetic one, made when missing), read and limited."""
    configs = dict(cfg.benchmarks)
    if cfg.synthetic:
        data = Path(cfg.data_dir) if cfg.data_dir else Path(cfg.output_dir) / "data"
        if not (data / "test_w_options.json").is_file():
            make_dataset(data)
        configs[SYNTHETIC] = BenchmarkConfig(test_file=str(data / "test_w_options.json"))
    out = []
    for name, bench in configs.items():
        test_file = Path(bench.test_file)
        if not test_file.is_file():
            raise ConfigError(f"benchmarks.{name}.test_file: {test_file} not found")
        limits = [n for n in (cfg.limit, bench.limit) if n is not None]
        try:
            examples = read_benchmark(test_file)[: min(limits) if limits else None]
        except DataError as err:
            raise ConfigError(f"benchmarks.{name}.test_file: {err} (a LLaVA-Med test file is one JSON array)"
                              ) from None  # fmt: skip
        asked = [_asked(e, bench.options_suffix) for e in examples]
        root = Path(bench.image_root) if bench.image_root else test_file.parent / "images"
        _check_images(name, examples, root)
        out.append(Benchmark(name, test_file, examples, asked, root))
    return out


def _check_images(name: str, examples: list[VQAExample], root: Path) -> None:
    """A wrong image folder is a config mistake, not a benchmark of empty answers: refuse it when none
    of the test file's images is there; warn (each becomes an empty answer) when some are missing."""
    missing = [e.image for e in examples if not (root / e.image).is_file()]
    if examples and len(missing) == len(examples):
        raise ConfigError(f"benchmarks.{name}.image_root: none of the {len(examples)} images the test file "
                          f"names is under {root} (e.g. {missing[0]}); set benchmarks.{name}.image_root to "
                          "the folder that holds them")
    if missing:
        log.warning("%s: %d of %d images are missing under %s (e.g. %s); those questions get an empty answer",
                    name, len(missing), len(examples), root, missing[0])


def answer_plan(cfg: EvaluateConfig, model: ModelConfig, benchmarks: list[Benchmark]) -> ray.data.Dataset:
    """Every question of every benchmark through one engine pool (lazy; rows come back in any order)."""
    import ray

    rows = [{"benchmark": b.name, "position": i, "question_id": str(e.id), "question": q,
             "image_path": str(b.image_root / e.image), "answer_type": e.answer_type}
            for b in benchmarks for i, (e, q) in enumerate(zip(b.examples, b.asked))]
    ds = ray.data.from_items(rows)
    if cfg.engine == "vllm":
        return vllm_answer(ds, str(model.name_or_path), cfg.system, cfg.max_new_tokens, cfg.batch_size,
                           concurrency=cfg.ray.num_workers, carry=("benchmark", "position"),
                           engine_kwargs=cfg.vllm_engine_kwargs, bundle=cfg.vllm_bundle)
    return ds.map_batches(
        Answerer,
        fn_constructor_kwargs={"model": model, "system": cfg.system, "max_new_tokens": cfg.max_new_tokens,
                               "device": "cuda" if cfg.ray.use_gpu else "cpu", "batch_size": cfg.batch_size},
        compute=ray.data.ActorPoolStrategy(size=cfg.ray.num_workers),
        batch_size=cfg.batch_size, num_cpus=cfg.ray.cpus_per_worker, num_gpus=1 if cfg.ray.use_gpu else 0,
    )


def _score_benchmark(out_dir: Path, model_name: str, bench: Benchmark, rows: list[dict[str, Any]]) -> dict:
    """Write answers.jsonl (test-file order) and metrics.json for one model on one benchmark."""
    by_position = {int(r["position"]): r for r in rows}
    if sorted(by_position) != list(range(len(bench.examples))):
        raise RuntimeError(f"{bench.name}: {len(by_position)} answers for {len(bench.examples)} questions")
    ordered = [by_position[i] for i in range(len(bench.examples))]
    preds = [Prediction(question_id=e.id, prompt=q, text=str(r["text"]), answer_type=e.answer_type,
                        model_id=model_name) for e, q, r in zip(bench.examples, bench.asked, ordered)]
    write_predictions(out_dir / "answers.jsonl", preds)
    errors = [{"question_id": e.id, "error": r["error"]}
              for e, r in zip(bench.examples, ordered) if r["error"]]
    engine_s = sum(float(r["gen_s"]) for r in ordered)
    metrics = {**score(bench.examples, preds), **yes_no_split(bench.examples, [p.text for p in preds]),
               "missing_images": len(errors),
               "questions_per_s": len(preds) / engine_s if engine_s > 0 else None}
    write_json(out_dir / "metrics.json", {
        "model": model_name, "benchmark": bench.name, "test_file": str(bench.test_file),
        "num_questions": len(preds), **metrics, "engine_seconds": engine_s,
        "questions_per_s_basis": "per actor, generation time only (model loading excluded)",
        "image_errors": errors,
    })
    return {key: metrics[key] for key in RESULT_KEYS}


def judge_preferences(cfg: EvaluateConfig, benchmarks: list[Benchmark], out: Path) -> dict[str, dict[str, Any]]:
    """``{benchmark: {"<a>_vs_<b>": preference}}`` for each ``compare`` pair, on benchmarks whose folder
    has a ``findings.json`` (the synthetic one); answers are read back from the answer files."""
    found: dict[str, dict[str, Any]] = {}
    for bench in benchmarks:
        findings_path = bench.test_file.parent / "findings.json"
        if not findings_path.is_file():
            continue
        findings = load_findings(findings_path)
        for a, b in cfg.compare.items():
            if a not in cfg.models or b not in cfg.models:
                continue
            texts = {m: [p.text for p in read_predictions(out / m / bench.name / "answers.jsonl")] for m in (a, b)}
            scores = {m: [score_answer(q, t, findings[e.image])
                          for e, q, t in zip(bench.examples, bench.asked, texts[m])] for m in (a, b)}
            found.setdefault(bench.name, {})[f"{a}_vs_{b}"] = {"a": a, "b": b, **preference(scores[a], scores[b])}
    return found


def effect_pairs(cfg: EvaluateConfig) -> list[tuple[str, str]]:
    """(from, to): each model against the one before it in ``models``, the first against the last (the
    whole self-training, base to the last round), and every ``compare`` pair."""
    names = list(cfg.models)
    pairs = list(itertools.pairwise(names)) + ([(names[0], names[-1])] if len(names) > 2 else [])
    pairs += [(b, a) for a, b in cfg.compare.items() if a in cfg.models and b in cfg.models]
    return list(dict.fromkeys(pairs))


def stage_effects(cfg: EvaluateConfig, benchmarks: list[Benchmark], out: Path) -> list[dict[str, Any]]:
    """Every pair's closed-accuracy and open-recall delta per benchmark, with its paired bootstrap 95% CI;
    answers are read back from the answer files."""
    found = []
    for bench in benchmarks:
        texts = {m: [p.text for p in read_predictions(out / m / bench.name / "answers.jsonl")] for m in cfg.models}
        found += effects(bench.name, bench.examples, texts, effect_pairs(cfg))
    return found


def effects_table(found: list[dict[str, Any]]) -> str:
    lines = ["## Stage to stage, with paired bootstrap 95% intervals", "",
             "| benchmark | from → to | metric | Δ (points) | 95% CI | questions |", "|---|---|---|---|---|---|"]
    for e in found:
        lines.append(f"| {e['benchmark']} | {e['from']} → {e['to']} | {e['metric']} | {e['delta']:+.2f} "
                     f"| [{e['ci95'][0]:+.2f}, {e['ci95'][1]:+.2f}] | {e['n']} |")
    return "\n".join(lines + [""])


def preference_table(prefs: dict[str, dict[str, Any]]) -> str:
    lines = ["## Reference judge, head to head", "",
             "| benchmark | models | wins | ties | losses | win rate | mean score |", "|---|---|---|---|---|---|---|"]
    for bench, pairs in prefs.items():
        for p in pairs.values():
            lines.append(f"| {bench} | {p['a']} vs {p['b']} | {p['wins']} | {p['ties']} | {p['losses']} "
                         f"| {_fmt(p['win_rate'])} | {p['mean_score_a']:.2f} vs {p['mean_score_b']:.2f} |")
    lines += ["", ("Win rate: wins / (wins + losses) of the first model; every answer is scored 1-10 against "
                   "the image's findings by the offline reference judge's rules."), ""]
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def results_table(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    """The paper's table: per benchmark Recall / F1 / Closed, plus strict closed; one row per model."""
    benches = list(next(iter(results.values())))
    head = ["model"] + [f"{b} {col}" for b in benches for col in ("Recall", "F1", "Closed", "Closed strict")]
    lines = ["# Zero-shot medical VQA (LLaVA-Med v1.0 scorer, %)", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for model, per_bench in results.items():
        cells = [_fmt(per_bench[b][k]) for b in benches
                 for k in ("open_recall", "open_f1", "closed_accuracy", "closed_accuracy_strict")]
        lines.append("| " + " | ".join([model, *cells]) + " |")
    lines += ["", "Recall / F1: macro-averaged unigram scores over OPEN questions.",
              "Closed: LLaVA-Med's rule (says yes/no and contains the answer).",
              "Closed strict: the first yes/no word equals the answer.", ""]
    return "\n".join(lines)


def main(cfg: EvaluateConfig) -> dict[str, Any]:
    clock = stage_clock()
    out = Path(cfg.output_dir)
    write_config(cfg, out)
    with clock.phase("data"):
        benchmarks = resolve_benchmarks(cfg)
    with clock.phase("ray_init"):
        init_ray(cfg.ray)
    results: dict[str, dict[str, dict[str, Any]]] = {}
    timing: dict[str, dict[str, float]] = {}
    passes: list[tuple[float, float]] = []
    for model_name, model in cfg.models.items():
        log.info("evaluating %s on %s", model_name,
                 ", ".join(f"{b.name} ({len(b.examples)})" for b in benchmarks))
        start, started_at = time.perf_counter(), time.time()
        rows = answer_plan(cfg, model, benchmarks).take_all()
        wall = time.perf_counter() - start
        passes.append((started_at, time.time()))
        scoring = time.perf_counter()
        results[model_name] = {
            b.name: _score_benchmark(out / model_name / b.name, model_name, b,
                                     [r for r in rows if r["benchmark"] == b.name])
            for b in benchmarks}
        timing[model_name] = {"wall_s": wall, "questions": len(rows),
                              "questions_per_s_wall": len(rows) / wall}
        clock.add("writing", time.perf_counter() - scoring)
    if cfg.engine == "hf":  # vLLM's engine actors are Ray Data LLM's own
        clock.add_all(pass_timings(passes, Answerer.__name__))
    with clock.phase("writing"):
        prefs = judge_preferences(cfg, benchmarks, out)
        found = stage_effects(cfg, benchmarks, out)
        tables = [results_table(results), *([preference_table(prefs)] if prefs else []), effects_table(found)]
        (out / "results.md").write_text("\n".join(tables))
    summary = {"stage": "evaluate", "results": results, "effects": found, "judge_preference": prefs,
               "timing": timing,
               "benchmarks": {b.name: {"test_file": str(b.test_file), "questions": len(b.examples)}
                              for b in benchmarks}, TIMINGS: clock.block()}
    write_summary(out, summary)
    log.info("results:\n%s", results_table(results))
    return summary


if __name__ == "__main__":
    run_job(main, EvaluateConfig)
