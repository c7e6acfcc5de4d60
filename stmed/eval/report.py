"""The run report: one Markdown page with plots, read back from a pipeline directory's stage outputs.

    python -m stmed.eval.report runs/demo          # writes runs/demo/report.md and runs/demo/plots/*.png

A pipeline directory holds one folder per stage (``sft/``, ``generate/``, ``dpo/``, ``evaluate/``), each
with its ``summary.json``. Every number on the page is read from those files — metrics logs, the
preference file, the judge's verdicts, the evaluation summary — never typed in, so the report of a run
is reproducible from its folder alone. A stage that has not run yet gets a line saying so instead of
a section; the report of a half-finished run is still a valid page.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stmed.log import get_logger
from stmed.runs import OVERHEAD, PHASES, TIMINGS, MetricsLog, read_summary

log = get_logger(__name__)

REPORT = "report.md"
PLOTS = "plots"
METRICS = "metrics.jsonl"
PREFERENCES = "preferences.parquet"
FAILURES = "failures.jsonl"  # jobs.generate: every dropped item, judged-but-dropped pairs with their scores
SFT_CURVES = (("loss", "total"), ("loss_qa", "L_qa (answers)"), ("loss_vq", "L_vq (questions)"))
DPO_MARGIN, DPO_ACCURACY = "rewards/margins", "rewards/accuracies"
TABLE_COLUMNS = (("open_recall", "Recall"), ("open_f1", "F1"), ("closed_accuracy", "Closed"),
                 ("closed_accuracy_strict", "Closed strict"))
MODEL_ORDER = ("base", "sft", "dpo")
STAGE_NAMES = ("data", "sft", "generate", "dpo", "evaluate", "serve")
PIPELINE_RECORD = "pipeline.json"  # jobs.pipeline's wall time per stage
ENDPOINT_REQUEST = "request.json"  # jobs.pipeline's request to the served model, with its answers


@dataclass(frozen=True)
class Section:
    """A part of the page: its Markdown and the plot files it refers to."""

    markdown: str
    plots: tuple[Path, ...] = ()


# ----------------------------------------------------------------------------- reading


def _number(value: Any) -> float | None:
    """A finite float, or None (missing, null, NaN — a metric with no tokens in that step)."""
    if value is None or isinstance(value, bool):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(row["step"], _number(row.get(key))) for row in rows]
    points = [(s, v) for s, v in points if v is not None]
    return [s for s, _ in points], [v for _, v in points]


def read_judge_scores(stage_dir: Path) -> list[float]:
    """Every score the judge gave: both answers of each kept pair (``preferences.parquet``) and of each
    judged pair that was dropped — a tie, or inconsistent under position swap (``failures.jsonl``)."""
    import pyarrow.parquet as pq

    scores: list[float | None] = []
    path = stage_dir / PREFERENCES
    if path.is_file():
        table = pq.read_table(path, columns=["chosen_score", "rejected_score"]).to_pydict()
        scores += table["chosen_score"] + table["rejected_score"]
    path = stage_dir / FAILURES
    if path.is_file():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        scores += [s for row in rows if row.get("stage") == "judge" for s in row.get("scores") or ()]
    return [v for v in map(_number, scores) if v is not None]


def judge_counts(summary: dict[str, Any]) -> dict[str, int]:
    """Pairs judged, kept, tied and failed, from the generate summary and its judge statistics."""
    judge = summary.get("judge") or {}
    decisions = judge.get("decisions") or {}
    return {"pairs": int(judge.get("pairs", 0)), "kept": int(summary.get("pairs", 0)),
            "ties": int(summary.get("ties", decisions.get("tie", 0))), "failed": int(judge.get("failed", 0)),
            "inconsistent": int(decisions.get("inconsistent under position swap", 0))}


def spend_line(spend: dict[str, Any]) -> str:
    """The judge's bill from a generate summary's ``spend`` (``stmed.judge.ledger``), in one sentence."""
    def usd(value: Any) -> str:
        return "n/a" if value is None else f"${float(value):.4f}"

    modes = ", ".join(f"{mode} {usd(spend.get(f'{mode}_usd'))}" for mode in ("online", "batch")
                      if spend.get(f"{mode}_usd"))
    budget = f"; budget {usd(spend['budget_usd'])}" if spend.get("budget_usd") is not None else ""
    return (f"Judge spend (ledger, every run of the round): {usd(spend.get('usd'))}"
            f"{f' ({modes})' if modes else ''} over {spend.get('calls', 0)} calls, "
            f"{spend.get('cached_calls', 0)} of them from the cache at $0; "
            f"{usd(spend.get('usd_per_judged_pair'))} per judged pair, "
            f"{usd(spend.get('usd_per_kept_pair'))} per pair kept{budget}.")


# ----------------------------------------------------------------------------- plots


def _figure():
    # The Figure API on an Agg canvas, without pyplot: no global backend or figure state, no display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def plot_sft_loss(rows: list[dict[str, Any]], path: Path) -> Path:
    fig, ax = _figure()
    for key, label in SFT_CURVES:
        steps, values = _series(rows, key)
        if steps:
            ax.plot(steps, values, label=label, marker="." if len(steps) < 60 else None)
    ax.set(xlabel="step", ylabel="cross-entropy", title="Stage 1: training loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.savefig(path)
    return path


def plot_judge_scores(scores: list[float], counts: dict[str, int], path: Path) -> Path:
    fig, ax = _figure()
    ax.hist(scores, bins=[x + 0.5 for x in range(11)], rwidth=0.85, color="tab:blue")
    ax.set_xticks(range(1, 11))
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set(xlabel="judge score (1–10)", ylabel="answers",
           title=f"Judge scores ({counts['ties']} ties, {counts['failed']} failed verdicts)")
    ax.grid(alpha=0.3, axis="y")
    fig.savefig(path)
    return path


def plot_dpo(rows: list[dict[str, Any]], path: Path) -> Path:
    fig, ax = _figure()
    steps, margins = _series(rows, DPO_MARGIN)
    ax.plot(steps, margins, color="tab:blue", label="reward margin")
    ax.set(xlabel="step", ylabel="reward margin (chosen − rejected)", title="Stage 2: DPO rewards")
    ax.grid(alpha=0.3)
    right = ax.twinx()
    steps, accuracies = _series(rows, DPO_ACCURACY)
    right.plot(steps, accuracies, color="tab:orange", label="reward accuracy")
    right.set(ylabel="reward accuracy", ylim=(-0.05, 1.05))
    lines = ax.get_lines() + right.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="lower right")
    fig.savefig(path)
    return path


# ----------------------------------------------------------------------------- sections


def _f(value: Any, digits: int = 4) -> str:
    number = _number(value)
    return "–" if number is None else f"{number:.{digits}f}"


def _missing(title: str, stage: str) -> Section:
    return Section(f"## {title}\n\nNot run yet (no `{stage}/summary.json`).\n")


def sft_section(run_dir: Path, plots: Path) -> Section:
    summary = read_summary(run_dir / "sft")
    if summary is None:
        return _missing("Stage 1 — reasoning and learning to question (SFT)", "sft")
    rows = MetricsLog(run_dir / "sft" / METRICS).read_steps()
    lines = ["## Stage 1 — reasoning and learning to question (SFT)", "",
             f"{len(rows)} logged steps. Loss on answers (L_qa) and on the questioner's questions (L_vq):", "",
             "| | total | L_qa | L_vq |", "|---|---|---|---|"]
    for label, row in (("first step", rows[0] if rows else {}), ("last step", rows[-1] if rows else {})):
        lines.append(f"| {label} | " + " | ".join(_f(row.get(k)) for k, _ in SFT_CURVES) + " |")
    if not rows:
        return Section("\n".join(lines) + "\n")
    path = plot_sft_loss(rows, plots / "sft_loss.png")
    lines += ["", f"![training loss]({PLOTS}/{path.name})"]
    return Section("\n".join(lines) + "\n", (path,))


def round_stages(run_dir: Path) -> list[str]:
    """The self-training rounds' suffixes in order: ``[""]`` for a one-round run's generate/ and dpo/,
    ``["1", "2", …]`` for numbered rounds (generate1/, dpo1/, gate1/ …)."""
    numbered = sorted({int(m.group(1)) for p in run_dir.glob("*") if (m := re.fullmatch(r"(?:generate|dpo)(\d+)", p.name))})
    return [str(r) for r in numbered] or [""]


def _round_title(title: str, suffix: str) -> str:
    return f"{title}, round {suffix}" if suffix else title


def _plot_name(name: str, suffix: str) -> str:
    return f"{name}{'_' + suffix if suffix else ''}.png"


def generate_section(run_dir: Path, plots: Path, suffix: str = "") -> Section:
    stage = run_dir / f"generate{suffix}"
    title = _round_title("Self-generated preferences", suffix)
    summary = read_summary(stage)
    if summary is None:
        return _missing(title, stage.name)
    counts = judge_counts(summary)
    scores = read_judge_scores(stage)
    lines = [f"## {title}", "",
             "| pairs judged | kept | ties (dropped) | inconsistent | judge failures |", "|---|---|---|---|---|",
             (f"| {counts['pairs']} | {counts['kept']} | {counts['ties']} | {counts['inconsistent']} "
             f"| {counts['failed']} |")]
    if summary.get("spend"):
        lines += ["", spend_line(summary["spend"])]
    if not scores:
        return Section("\n".join(lines) + "\n")
    histogram = Counter(round(s) for s in scores)
    lines += ["", f"Scores given, both answers of every judged pair ({len(scores)} answers): "
              + ", ".join(f"{k}: {histogram[k]}" for k in sorted(histogram)) + ".", ""]
    path = plot_judge_scores(scores, counts, plots / _plot_name("judge_scores", suffix))
    lines.append(f"![judge scores]({PLOTS}/{path.name})")
    return Section("\n".join(lines) + "\n", (path,))


def dpo_section(run_dir: Path, plots: Path, suffix: str = "") -> Section:
    stage = run_dir / f"dpo{suffix}"
    title = _round_title("Stage 2 — preference revelation (DPO)", suffix)
    summary = read_summary(stage)
    if summary is None:
        return _missing(title, stage.name)
    rows = [row for row in MetricsLog(stage / METRICS).read_steps() if _number(row.get(DPO_MARGIN)) is not None]
    lines = [f"## {title}", ""]
    if not rows:
        return Section("\n".join(lines + ["No reward metrics were logged."]) + "\n")
    keys = ("loss", "rewards/chosen", "rewards/rejected", DPO_MARGIN, DPO_ACCURACY)
    lines += [f"{len(rows)} logged steps.", "", "| | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for label, row in (("first step", rows[0]), ("last step", rows[-1])):
        lines.append(f"| {label} | " + " | ".join(_f(row.get(k)) for k in keys) + " |")
    path = plot_dpo(rows, plots / _plot_name("dpo_rewards", suffix))
    lines += ["", f"![DPO rewards]({PLOTS}/{path.name})"]
    return Section("\n".join(lines) + "\n", (path,))


def _ordered_models(results: dict[str, Any]) -> list[str]:
    """base, sft, dpo, dpo1, dpo2, … (rounds by number), then any other model."""
    rounds = sorted((m for m in results if re.fullmatch(r"dpo\d+", m)), key=lambda m: int(m[3:]))
    known = [m for m in MODEL_ORDER if m in results] + rounds
    return known + [m for m in results if m not in known]


def _self_training_pairs(results: dict[str, Any]) -> list[tuple[str, str]]:
    """Each round against the one before it (stage 1 first), then the base against the last round."""
    chain = [m for m in _ordered_models(results) if m == "sft" or m == "dpo" or re.fullmatch(r"dpo\d+", m)]
    pairs = list(itertools.pairwise(chain))
    if "base" in results and len(chain) > 1:
        pairs.append(("base", chain[-1]))
    return pairs


def _ci(found: list[dict[str, Any]], bench: str, before: str, after: str, metric: str) -> str:
    for e in found:
        if (e["benchmark"], e["from"], e["to"], e["metric"]) == (bench, before, after, metric):
            return f"{e['delta']:+.2f} [{e['ci95'][0]:+.2f}, {e['ci95'][1]:+.2f}]"
    return "–"


def evaluation_table(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    """Per benchmark, one row per model: Recall / F1 / Closed / Closed strict, in percent."""
    benchmarks = list(dict.fromkeys(b for per_model in results.values() for b in per_model))
    lines = []
    for bench in benchmarks:
        lines += [f"**{bench}**", "", "| model | " + " | ".join(t for _, t in TABLE_COLUMNS) + " |",
                  "|---" * (len(TABLE_COLUMNS) + 1) + "|"]
        for model in _ordered_models(results):
            cells = results[model].get(bench)
            if cells is not None:
                lines.append(f"| {model} | " + " | ".join(_f(cells.get(k), 2) for k, _ in TABLE_COLUMNS) + " |")
        lines.append("")
    return "\n".join(lines)


def _delta(results: dict[str, Any], bench: str, key: str, before: str, after: str) -> str:
    old, new = (_number((results.get(m) or {}).get(bench, {}).get(key)) for m in (before, after))
    if old is None or new is None:
        return "–"
    return f"{old:.2f} → {new:.2f} ({new - old:+.2f})"


def evaluation_sections(run_dir: Path) -> Section:
    summary = read_summary(run_dir / "evaluate")
    if summary is None:
        return _missing("Evaluation", "evaluate")
    results = summary["results"]
    lines = ["## Evaluation (zero-shot, LLaVA-Med v1.0 scorer, %)", "", evaluation_table(results),
             ("Recall / F1: macro-averaged over OPEN questions. Closed: LLaVA-Med's rule (the answer says yes/no "
             "and contains the ground truth). Closed strict: the first yes/no word equals the ground truth."), ""]
    benchmarks = list(dict.fromkeys(b for per_model in results.values() for b in per_model))
    prefs = summary.get("judge_preference") or {}
    found = summary.get("effects") or []
    lines += ["## Self-training effect", "",
              ("| benchmark | change | closed accuracy | Δ closed, 95% CI | closed strict | closed said yes "
               "| open recall | Δ recall, 95% CI | judge W/T/L | judge win rate |"),
              "|---|---|---|---|---|---|---|---|---|---|"]
    for bench in benchmarks:
        for before, after in _self_training_pairs(results):
            cells = [_delta(results, bench, "closed_accuracy", before, after),
                     _ci(found, bench, before, after, "closed_accuracy"),
                     *(_delta(results, bench, k, before, after) for k in ("closed_accuracy_strict", "closed_said_yes",
                                                                          "open_recall")),
                     _ci(found, bench, before, after, "open_recall")]  # fmt: skip
            pref = (prefs.get(bench) or {}).get(f"{after}_vs_{before}")
            cells += ([f"{pref['wins']}/{pref['ties']}/{pref['losses']}", _f(pref["win_rate"], 2)]
                      if pref else ["–", "–"])
            lines.append(f"| {bench} | {before} → {after} | " + " | ".join(cells) + " |")
    lines += ["", ("Stage 2 (DPO on self-generated, judge-ranked answers) against stage 1 shows what "
              "preference revelation adds; against the base model, what the whole self-training did. "
              "Judge: the offline reference judge scores both models' answers to every question of a benchmark "
              "with known findings; W/T/L and the win rate (wins / (wins + losses)) are the later model's. "
              "Closed said yes: the share of closed answers that say yes first; on a benchmark balanced between yes "
              "and no, a change in closed accuracy that comes with a large change here is a bias shift. "
              "95% CI: a paired bootstrap over the benchmark's questions (both models answer the same ones).")]
    return Section("\n".join(lines) + "\n")


def gate_section(run_dir: Path) -> Section:
    """Each round's regression gate: the decision and why (``gate<r>/decision.json``)."""
    found = sorted(run_dir.glob("gate*/decision.json"), key=lambda p: int(p.parent.name[4:] or 0))
    if not found:
        return Section("")
    lines = ["## Regression gate", "",
             "Each round against the one before, on a held-out slice no training or self-play saw:", "",
             "| round | closed accuracy | judge W/T/L | judge win rate | promoted | why |",
             "|---|---|---|---|---|---|"]
    for path in found:
        d = json.loads(path.read_text())
        wtl = "–" if d.get("wins") is None else f"{d['wins']}/{d['ties']}/{d['losses']}"
        lines.append(f"| {d['before']} → {d['after']} | {d['closed_before']:.2f} → {d['closed_after']:.2f} "
                     f"({d['closed_delta']:+.2f}) | {wtl} | {_f(d.get('win_rate'), 2)} | "
                     f"{'yes' if d['promoted'] else '**no**'} | {d['reason']} |")
    return Section("\n".join(lines) + "\n")


def stage_times(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Each stage's wall time, in the order the stages ran: the pipeline's record of it (submission to the
    job's end, with its ``timings``), else the stage's own ``wall_time_s``."""
    path = run_dir / PIPELINE_RECORD
    measured = json.loads(path.read_text()).get("stages", {}) if path.is_file() else {}
    found = {}
    for stage in dict.fromkeys(["data", *measured, *STAGE_NAMES]):  # the order they ran in
        timings = (measured.get(stage) or {}).get(TIMINGS)
        wall = _number((measured.get(stage) or {}).get("wall_s"))
        wall = wall if wall is not None else _number((read_summary(run_dir / stage) or {}).get("wall_time_s"))
        if timings:
            found[stage] = timings
        elif wall is not None:
            found[stage] = {"total_s": wall}
    return found


def _s(value: Any) -> str:
    number = _number(value)
    return "–" if number is None else f"{number:.1f}"


def overhead_table(run_dir: Path) -> str:
    """Where each stage's wall time went: total, fixed overhead, work, the rest, and the overhead phases."""
    times = stage_times(Path(run_dir))
    if not times:
        return ""
    split = {stage: t for stage, t in times.items() if "overhead_s" in t}
    totals = {key: sum(t.get(key) or 0.0 for t in times.values())
              for key in ("total_s", "overhead_s", "work_s")}  # fmt: skip
    lines = ["| stage | total s | fixed overhead s | work s | writing and other s | overhead share |",
             "|---|---|---|---|---|---|"]
    for stage, t in [*times.items(), ("total", totals)]:
        split_known = stage == "total" or stage in split
        rest = t["total_s"] - t.get("overhead_s", 0.0) - t.get("work_s", 0.0)
        share = t.get("overhead_s", 0.0) / t["total_s"] if t["total_s"] > 0 else None
        cells = [_s(t.get("overhead_s")), _s(t.get("work_s")), _s(rest), f"{_f(share and 100 * share, 0)}%"]
        cells = cells if split_known else ["–"] * 4
        lines.append(f"| {stage} | {_s(t['total_s'])} | " + " | ".join(cells) + " |")
    if totals["total_s"] > sum(t["total_s"] for t in split.values()):
        lines += ["", "The total's overhead and work count only the stages whose time is split."]
    phases = [name for name, (kind, _) in PHASES.items()
              if kind == OVERHEAD and any(name in t.get("phases_s", {}) for t in split.values())]
    if phases:
        lines += ["", "Fixed overhead by phase, in seconds:", "",
                  "| stage | " + " | ".join(phases) + " |", "|---" * (len(phases) + 1) + "|"]
        lines += [f"| {stage} | " + " | ".join(_s(t["phases_s"].get(name)) for name in phases) + " |"
                  for stage, t in split.items()]
        lines += ["", ("What each number measures (wall-clock time; a stage's total runs from the pipeline's "
                  "submit call until it saw the job end and had its log):"), ""]
        lines += [f"- `{name}` ({kind}): {what}" for name, (kind, what) in PHASES.items()
                  if any(name in t.get("phases_s", {}) for t in split.values())]
        lines += [("- writing and other: the output files and exports, and whatever no phase names (config "
                  "and input checks in the job)")]
    return "\n".join(lines) + "\n"


def timing_section(run_dir: Path) -> Section:
    """Each stage's wall time as the pipeline measured it (job start-up included), else the stage's own,
    split into fixed overhead and work where the stage's summary has its ``timings``."""
    table = overhead_table(run_dir)
    return Section("## Wall time per stage\n\n" + table) if table else Section("")


def endpoint_section(run_dir: Path) -> Section:
    path = run_dir / "serve" / ENDPOINT_REQUEST
    if not path.is_file():
        return Section("")
    request = {k: "–" if v is None else str(v).replace("|", "\\|")  # table-safe
               for k, v in json.loads(path.read_text()).items()}
    return Section("\n".join([
        "## Served model", "", f"`{request['model']}` at {request['url']} answered a request:", "",
        "| question | ground truth | /v1/vqa | /v1/chat/completions |", "|---|---|---|---|",
        (f"| {request['question']} | {request.get('ground_truth', '–')} | {request['vqa_answer']} "
        f"| {request['chat_answer']} |")]) + "\n")


# ----------------------------------------------------------------------------- the page


def review_section(run_dir: Path) -> Section:
    """The judge's calibration against clinicians, when a review stage exported labels."""
    path = run_dir / "review" / "calibration.json"
    if not path.is_file():
        return Section("")
    from stmed.eval.calibration import markdown

    return Section(markdown(json.loads(path.read_text())))


def write_report(run_dir: str | Path) -> Path:
    """Write ``run_dir/report.md`` and its plots under ``run_dir/plots/``; returns the report's path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"report: {run_dir} is not a directory (pass a pipeline output_dir)")
    plots = run_dir / PLOTS
    plots.mkdir(exist_ok=True)
    rounds = [section for suffix in round_stages(run_dir)
              for section in (generate_section(run_dir, plots, suffix), dpo_section(run_dir, plots, suffix))]
    sections = [sft_section(run_dir, plots), *rounds, gate_section(run_dir), review_section(run_dir),
                evaluation_sections(run_dir), endpoint_section(run_dir), timing_section(run_dir)]
    header = (f"# stmed self-training report\n\nRun directory: `{run_dir.resolve()}`. Every figure below is "
              "read from the stages' output files.\n")
    path = run_dir / REPORT
    path.write_text("\n".join([header, *(s.markdown for s in sections if s.markdown)]))
    log.info("report: %s (%d plots)", path, sum(len(s.plots) for s in sections))
    return path


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m stmed.eval.report",
                                     description="Write report.md (with plots) for a pipeline output directory.")
    parser.add_argument("run_dir", help="the pipeline's output_dir (holds sft/, generate/, dpo/, evaluate/)")
    try:
        return write_report(parser.parse_args(argv).run_dir)
    except ValueError as err:  # a wrong path is a usage mistake: one line and exit code 2, no traceback
        parser.error(str(err))


if __name__ == "__main__":
    main()
