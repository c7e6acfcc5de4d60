"""The selection model without Ray: frozen features, pairs from judged rows and labels, the head's loop on a
planted ranking (through the real loop and a LocalSession), the clinician weight, and keep_fraction."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stmed.config import ModelConfig, config_to_dict
from stmed.data.records import PreferencePair
from stmed.data.synthetic import make_dataset
from stmed.model.build import build_tiny
from stmed.selection.features import extract_features, feature_dim
from stmed.selection.head import load_head, rate
from stmed.selection.keep import keep_by_margin
from stmed.selection.pairs import Answer, RankPair, clinician_pairs, judge_pairs
from stmed.selection.train import (
    FEATURES_FILE,
    HEAD_FILE,
    SelectionLoopConfig,
    SelectorTrainSettings,
    features_key,
    held_out_scores,
    save_features,
    train_selector,
    write_inputs,
)
from stmed.train.session import LocalSession


def test_features_are_deterministic_and_leave_the_policy_unchanged(tmp_path: Path):
    data = make_dataset(tmp_path / "data", num_images=4, seed=0)
    images = sorted(p.name for p in data.images.glob("*.png"))
    model, processor = build_tiny(seed=0)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    answers = [Answer.of(images[0], "Is there a lesion?", "Yes, in the left lung."),
               Answer.of(images[0], "Is there a lesion?", "No."),
               Answer.of(images[1], "Which organ is shown?", "The liver."),
               Answer.of("missing.png", "Is there a lesion?", "No.")]  # fmt: skip
    first, skipped = extract_features(model, processor, answers, data.images, batch_size=2)
    again, _ = extract_features(model, processor, answers, data.images, batch_size=2)
    assert set(skipped) == {answers[3].answer_id} and skipped[answers[3].answer_id].startswith("image:")
    assert set(first) == {a.answer_id for a in answers[:3]}
    half = feature_dim(model) // 2
    for a in answers[:3]:
        assert first[a.answer_id].shape == (2 * half,) and torch.equal(first[a.answer_id], again[a.answer_id])
    one, two, other = (first[a.answer_id] for a in answers[:3])
    assert torch.equal(one[:half], two[:half])  # the image pool: the same image, whatever the answer
    assert not torch.equal(one[:half], other[:half])
    assert not torch.allclose(one[half:], two[half:])  # the answer pool tells the answers apart
    assert model.training  # its mode restored, its weights untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _row(image: str, q: int, slot: int, a1: str, a2: str, s1, s2, error=None) -> dict:
    return {"pair_id": f"{image}-{q}-{slot}", "image_id": image, "image_path": image, "question_index": q,
            "question": f"question {q}?", "pair_slot": slot, "answer1": a1, "answer2": a2, "status": "ok",
            "score1": s1, "score2": s2, "error": error, "consistent": None}  # fmt: skip


def test_judge_pairs_span_score_levels_and_skip_ties_and_failures():
    rows = [_row("a.png", 0, 0, "best", "mid", 9.0, 5.0), _row("a.png", 0, 1, "low", "also mid", 1.0, 5.0),
            _row("a.png", 0, 2, "x", "y", None, None, error="failed: http 500"),
            _row("b.png", 0, 0, "same", "Same.", 4.0, 4.0)]  # fmt: skip
    answers, pairs = judge_pairs(rows, pairs_per_question=10)
    text = {a.answer_id: a.answer for a in answers}
    ordered = {(text[p.better], text[p.worse]) for p in pairs}
    assert ordered == {("best", "mid"), ("best", "low"), ("best", "also mid"), ("mid", "low"), ("also mid", "low")}
    assert all(p.source == "judge" and p.gap > 0 for p in pairs)
    _, few = judge_pairs(rows, pairs_per_question=2)
    assert len(few) == 2 and max(p.gap for p in few) == 8.0  # the widest gap is always drawn


def test_clinician_pairs_follow_the_reviewers_verdict():
    labels = [{"pair_id": "p1", "image": "a.png", "question": "q?", "chosen": "judge's", "rejected": "other"},
              {"pair_id": "p2", "image": "a.png", "question": "q?", "chosen": "c", "rejected": "r"},
              {"pair_id": "p3", "image": "a.png", "question": "q?", "chosen": "c3", "rejected": "r3"}]
    answers, pairs = clinician_pairs(labels, {"p1": "rejected", "p2": "chosen", "p3": "drop"})
    text = {a.answer_id: a.answer for a in answers}
    assert [(p.pair_id, text[p.better], text[p.worse]) for p in pairs] == [("p1", "other", "judge's"), ("p2", "c", "r")]


def _planted(tmp_path: Path, clinician_weight: float, steps: int = 150):
    """Answers with random 16-d features; the judge ranks by w1, clinicians by w2 (a conflicting rater)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 16, generator=gen)
    w1, w2 = torch.randn(16, generator=gen), torch.randn(16, generator=gen)
    answers = [Answer.of(f"im{i % 100}.png", "q?", f"answer {i}") for i in range(len(x))]
    pairs = []
    for n in range(1200):
        i, j = torch.randint(len(x), (2,), generator=gen).tolist()
        source, w = ("clinician", w2) if n % 4 == 0 else ("judge", w1)
        if i == j:
            continue
        b, c = (i, j) if float(x[i] @ w) > float(x[j] @ w) else (j, i)
        weight = clinician_weight if source == "clinician" else 1.0
        pairs.append((RankPair(answers[b].answer_id, answers[c].answer_id, source, answers[b].image, f"p{n}"),
                      weight, n % 5 == 0))  # fmt: skip
    out = tmp_path / f"w{clinician_weight}"
    answers_path, pairs_path = write_inputs(out, answers, pairs)
    cfg = SelectionLoopConfig(model=ModelConfig(preset="tiny"), output_dir=str(out), image_root=str(tmp_path),
                              train=SelectorTrainSettings(steps=steps, batch_size=128, lr=3e-3, log_every=50,
                                                          checkpoint_every=100),
                              answers_path=str(answers_path), pairs_path=str(pairs_path))  # fmt: skip
    features = {a.answer_id: x[n] for n, a in enumerate(answers)}
    save_features(out / FEATURES_FILE, features_key(cfg, answers), features, {})  # the policy is never loaded
    session = LocalSession(out / "checkpoints")
    train_selector(config_to_dict(cfg, redact=False), session)
    rows = [{**p.to_row(), "weight": w, "held_out": h} for p, w, h in pairs]
    held = {s: held_out_scores(out / HEAD_FILE, features, [r for r in rows if r["held_out"] and r["source"] == s])
            for s in ("judge", "clinician")}  # fmt: skip
    return held, session, out


def test_the_head_learns_a_planted_ranking_and_the_clinician_weight_moves_it(tmp_path: Path):
    light, session, out = _planted(tmp_path, clinician_weight=1.0)
    assert light["judge"]["n"] > 150 and light["judge"]["agreement"] > 0.8 and light["judge"]["auc"] > 0.6
    assert [r["step"] for r in session.reports] == [50, 100, 150]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in session.reports)
    assert (out / "checkpoints" / "checkpoint_000150" / HEAD_FILE).is_file()
    heavy, _, _ = _planted(tmp_path, clinician_weight=50.0)
    # Up-weighted, the conflicting clinician ranking wins held-out clinician agreement from the judge's.
    assert heavy["clinician"]["agreement"] > light["clinician"]["agreement"] + 0.1
    assert heavy["judge"]["agreement"] < light["judge"]["agreement"]


def test_a_restarted_loop_resumes_from_its_checkpoint(tmp_path: Path):
    _, _, out = _planted(tmp_path, clinician_weight=1.0, steps=100)
    head = rate(load_head(out / HEAD_FILE), torch.zeros(1, 16))
    cfg = {**config_to_dict(SelectionLoopConfig(model=ModelConfig(preset="tiny"), output_dir=str(out),
                                                image_root=str(tmp_path)), redact=False)}  # fmt: skip
    cfg.update(answers_path=str(out / "answers.parquet"), pairs_path=str(out / "rank_pairs.parquet"),
               train={**cfg["train"], "steps": 150, "batch_size": 128, "lr": 3e-3, "log_every": 50,
                      "checkpoint_every": 100})  # fmt: skip
    again = LocalSession(out / "checkpoints")
    train_selector(cfg, again)  # picks up the step-100 checkpoint: only steps 101..150 run
    assert [r["step"] for r in again.reports] == [150]
    assert not torch.equal(rate(load_head(out / HEAD_FILE), torch.zeros(1, 16)), head)


def _pair(pair_id: str, gap: float) -> PreferencePair:
    return PreferencePair(pair_id=pair_id, image="a.png", question="q?", chosen="c", rejected="r",
                          chosen_score=5.0 + gap, rejected_score=5.0, judge_model="j", seeds=[0, 1])


def test_keep_fraction_keeps_the_widest_margins_in_file_order():
    pairs = [_pair(f"p{i}", 1.0) for i in range(5)]
    margins = {"p0": 0.5, "p1": -2.0, "p2": 3.0, "p3": 1.5}  # p4 unrated: last
    kept, report = keep_by_margin(pairs, margins, 0.5)
    assert [p.pair_id for p in kept] == ["p0", "p2", "p3"]
    assert report["kept"] == 3 and report["dropped"] == 2 and report["unrated"] == 1
    assert report["lowest_kept_margin"] == 0.5 and report["selector_disagrees"] == {"kept": 0, "dropped": 1}
    assert [p.pair_id for p in keep_by_margin(pairs, margins, 1.0)[0]] == [f"p{i}" for i in range(5)]
    with pytest.raises(ValueError, match="keep_fraction"):
        keep_by_margin(pairs, margins, 0.0)
