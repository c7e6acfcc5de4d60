"""How far the judge can be trusted on this data: its agreement with clinicians (METHOD §7).

Inputs are the review app's labels (``stmed.review.store.label_row``: one row per decision) and, where the
generate run judged each pair in both orders, its ``parts/``. Everything is compared in display terms —
which of the two answers, as shown to the reviewer (A or B, drawn at random per pair), is better, or
neither (a tie or both wrong) — so that both raters use the same categories with balanced marginals:

- **judge vs clinicians**: per decision, the judge's pick (the answer it scored higher) against the
  reviewer's (A, B, or none); the share that agree and Cohen's κ, each with a percentile bootstrap 95%
  interval over decisions, overall and per question kind;
- **position bias** of the judge, where it saw both orders: how often it preferred the answer shown first
  (0.5 is none) and how often its preference flipped with the order;
- **inter-reviewer κ**, on items two or more reviewers decided (the first two decisions of each);
- a **verdict** in one line: fit when the lower end of κ's interval reaches ``kappa_threshold``, not fit
  when its upper end is below, otherwise undecided (more reviews needed).
"""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

CATEGORIES = ("A", "B", "none")
BOOTSTRAP = 1000


def cohen_kappa(a: Sequence[str], b: Sequence[str]) -> float | None:
    """Cohen's κ of two raters over the same items; None when chance agreement is total (undefined)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"cohen_kappa: two equal, non-empty label lists needed, got {len(a)} and {len(b)}")
    n = len(a)
    observed = sum(x == y for x, y in zip(a, b)) / n
    ca, cb = Counter(a), Counter(b)
    expected = sum(ca[c] * cb[c] for c in set(ca) | set(cb)) / (n * n)
    return None if expected >= 1.0 else (observed - expected) / (1.0 - expected)


def bootstrap(pairs: list[tuple[str, str]], stat: Callable[[list[str], list[str]], float | None],
              reps: int = BOOTSTRAP, seed: int = 0) -> tuple[float, float] | None:
    """A percentile 95% interval of ``stat`` over ``pairs`` resampled with replacement."""
    if len(pairs) < 2:
        return None
    rng, values = random.Random(seed), []
    for _ in range(reps):
        sample = [pairs[rng.randrange(len(pairs))] for _ in pairs]
        value = stat([x for x, _ in sample], [y for _, y in sample])
        if value is not None:
            values.append(value)
    if len(values) < reps // 2:
        return None
    values.sort()
    return values[int(0.025 * (len(values) - 1))], values[math.ceil(0.975 * (len(values) - 1))]


def agreement(a: Sequence[str], b: Sequence[str]) -> float:
    return sum(x == y for x, y in zip(a, b)) / len(a)


def _shown(row: dict[str, Any]) -> str:
    return row["shown"] if row["shown"] in ("A", "B") else "none"


def _judge(row: dict[str, Any]) -> str:
    return "A" if row["chosen_first"] else "B"


def rater_agreement(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """Agreement and κ with their intervals for ``(rater 1, rater 2)`` label pairs."""
    if not pairs:
        return {"n": 0, "agreement": None, "agreement_ci": None, "kappa": None, "kappa_ci": None}
    a, b = [x for x, _ in pairs], [y for _, y in pairs]
    return {"n": len(pairs), "agreement": agreement(a, b), "agreement_ci": bootstrap(pairs, agreement),
            "kappa": cohen_kappa(a, b), "kappa_ci": bootstrap(pairs, cohen_kappa)}


def judge_vs_clinicians(labels: list[dict[str, Any]]) -> dict[str, Any]:
    pairs = [(_judge(row), _shown(row)) for row in labels]
    by_kind: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for row, pair in zip(labels, pairs):
        by_kind[row["kind"]].append(pair)
    decided = [p for p in pairs if p[1] != "none"]
    return {**rater_agreement(pairs),
            "no_preference_share": (len(pairs) - len(decided)) / len(pairs) if pairs else None,
            "agreement_when_decided": agreement(*zip(*decided)) if decided else None,
            "reviewers_chose_a_share": sum(p[1] == "A" for p in decided) / len(decided) if decided else None,
            "per_kind": {kind: rater_agreement(kind_pairs) for kind, kind_pairs in sorted(by_kind.items())}}


def inter_reviewer(labels: list[dict[str, Any]]) -> dict[str, Any]:
    """κ between the first two reviewers of every item that has two."""
    by_pair: dict[str, list[str]] = defaultdict(list)
    for row in sorted(labels, key=lambda r: r["decided_at"]):
        by_pair[row["pair_id"]].append(_shown(row))
    return rater_agreement([(v[0], v[1]) for v in by_pair.values() if len(v) >= 2])


def position_bias(generate_dir: Path | None) -> dict[str, Any] | None:
    """The judge's preference for the first-shown answer, from rows judged in both orders; None without."""
    if generate_dir is None or not (generate_dir / "parts").is_dir():
        return None
    first, flips, n = [], 0, 0
    for path in sorted((generate_dir / "parts").glob("part-*.parquet")):
        table = pq.read_table(path)
        if "swapped_score1" not in table.column_names:
            continue
        for row in table.select(["score1", "score2", "swapped_score1", "swapped_score2", "consistent"]).to_pylist():
            if None in (row["score1"], row["score2"], row["swapped_score1"], row["swapped_score2"]):
                continue
            t1, t2 = row["swapped_score1"], row["swapped_score2"]
            s1, s2 = 2 * row["score1"] - t1, 2 * row["score2"] - t2  # the averaged score less its swapped half
            n += 1
            flips += row["consistent"] is False
            first += [s1 > s2] if s1 != s2 else []
            first += [t2 > t1] if t1 != t2 else []  # swapped: answer 2 was shown first
    if not n:
        return None
    return {"pairs_judged_both_orders": n, "first_shown_preferred": sum(first) / len(first) if first else None,
            "flip_rate": flips / n}


def verdict(kappa: float | None, ci: tuple[float, float] | None, n: int, threshold: float) -> str:
    if not n or kappa is None:
        return "judge calibration: no clinician labels yet"
    shown = f"κ {kappa:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "") + f" over {n} decisions"
    if ci and ci[0] >= threshold:
        return f"judge fit for this data: {shown}, above the threshold {threshold:.2f}"
    if (ci and ci[1] < threshold) or (not ci and kappa < threshold):
        return f"judge NOT fit for this data: {shown}, below the threshold {threshold:.2f}"
    return f"judge fitness undecided: {shown} straddles the threshold {threshold:.2f}; review more pairs"


def calibrate(labels: list[dict[str, Any]], kappa_threshold: float,
              generate_dir: Path | None = None) -> dict[str, Any]:
    """Everything above as one JSON-ready dict (``calibration.json``, the report's section)."""
    judge = judge_vs_clinicians(labels)
    return {"decisions": len(labels), "items": len({row["pair_id"] for row in labels}),
            "reviewers": len({row["reviewer"] for row in labels}), "judge_vs_clinicians": judge,
            "inter_reviewer": inter_reviewer(labels), "position_bias": position_bias(generate_dir),
            "ill_formed_share": sum(r["ill_formed"] for r in labels) / len(labels) if labels else None,
            "kappa_threshold": kappa_threshold,
            "verdict": verdict(judge["kappa"], judge["kappa_ci"], judge["n"], kappa_threshold)}


def _ci_text(ci: tuple[float, float] | list[float] | None) -> str:
    return f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def markdown(cal: dict[str, Any]) -> str:
    """The report's section: the verdict line, then the figures behind it."""
    judge = cal["judge_vs_clinicians"]
    lines = ["## Judge calibration against clinicians", "", f"**{cal['verdict']}**", "",
             (f"{cal['decisions']} decisions on {cal['items']} pairs by {cal['reviewers']} reviewer(s); each "
             "decision compared with the judge's pick (A, B, or no preference for a tie or both wrong)."), "",
             "| Questions | Decisions | Agreement [95% CI] | Cohen's κ [95% CI] |", "|---|---|---|---|"]
    for name, part in [("all", judge), *judge["per_kind"].items()]:
        lines.append(f"| {name} | {part['n']} | {_num(part['agreement'])}{_ci_text(part['agreement_ci'])} | "
                     f"{_num(part['kappa'])}{_ci_text(part['kappa_ci'])} |")
    lines += ["", (f"Reviewers saw no better answer (tie or both wrong) in {_num(judge['no_preference_share'])} "
              f"of decisions; where they picked one, the judge agreed in {_num(judge['agreement_when_decided'])}"
              f" (reviewers picked the answer shown first in {_num(judge['reviewers_chose_a_share'])}).")]
    bias = cal.get("position_bias")
    if bias:
        lines.append(f"Position bias of the judge over {bias['pairs_judged_both_orders']} pairs judged in both "
                     f"orders: it preferred the answer shown first in {_num(bias['first_shown_preferred'])} "
                     f"(0.50 is none); its preference flipped with the order in {_num(bias['flip_rate'])}.")
    inter = cal["inter_reviewer"]
    if inter["n"]:
        lines.append(f"Inter-reviewer κ over {inter['n']} doubly reviewed pairs: {_num(inter['kappa'])}"
                     f"{_ci_text(inter['kappa_ci'])}.")
    return "\n".join(lines) + "\n"
