"""The self-training benchmark's command line: a recipe is a set of defaults that explicit flags override."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import self_training_effect as ste

from stmed.data.synthetic import SyntheticPaths


def test_aligned_recipe_sets_the_measured_settings() -> None:
    _, s = ste.parse(["--recipe", "aligned"])
    assert (s.warmup_steps, s.num_images, s.test_images, s.pool_images, s.questions) == (600, 660, 100, 480, 5)
    assert (s.suffix_closed, s.answers_per_question, s.labelled) == (1.0, 4, 60)
    assert s.sft_overrides == {"train.lr_llm": 1e-3, "train.lr_projector": 1e-3, "train.lr_vit": 1e-3}
    assert s.answer_temperature == 2.0 and s.temperature == 1.2 and s.dpo_overrides == {}  # dpo.yaml as it is


def test_explicit_flags_override_the_recipe_and_plain_is_the_default() -> None:
    _, s = ste.parse(["--recipe", "aligned", "--questions", "3", "--dpo", "dpo.beta=0.2"])
    assert s.questions == 3 and s.dpo_overrides == {"dpo.beta": 0.2} and s.warmup_steps == 600
    _, plain = ste.parse([])
    assert (plain.warmup_steps, plain.questions, plain.sft_overrides, plain.base) == (0, 3, {}, None)


def test_contradictory_flags_are_refused(capsys) -> None:
    with pytest.raises(SystemExit):
        ste.parse(["--recipe", "aligned", "--base", "somewhere"])
    assert "--warmup-steps builds the base" in capsys.readouterr().err


def test_replay_mixes_warmup_conversations_into_stage_one(tmp_path: Path, capsys) -> None:
    from stmed.train.warmup import make_warmup_data

    warm = make_warmup_data(tmp_path / "base" / "data", num_images=10)
    _, s = ste.parse(["--recipe", "aligned", "--replay", "6", "--num-images", "30", "--test-images", "6",
                      "--labelled", "4", "--pool-images", "8"])
    s.replay_from = str(warm)
    data = ste.prepare_data(tmp_path / "seed0", 0, s)
    rows = ste.json.loads(data["labelled"].read_text())
    assert len(rows) == 4 + 6 and len(data["pool"]) == 8
    assert all(Path(r["image"]).is_absolute() and Path(r["image"]).is_file() for r in rows[4:])
    assert [r["conversations"] for r in rows[4:]] == [r["conversations"] for r in ste.json.loads(warm.read_text())[:6]]
    with pytest.raises(SystemExit):
        ste.parse(["--replay", "6"])  # nothing to replay without the warm-up
    assert "--replay mixes in warm-up conversations" in capsys.readouterr().err


def _pair(k: int, chosen: str, rejected: str) -> ste.PreferencePair:
    return ste.PreferencePair(pair_id=f"p{k}", image="synth_00001.png", question="Is there a lesion?",
                              chosen=chosen, rejected=rejected, chosen_score=9.0, rejected_score=2.0,
                              judge_model="reference", seeds=[1, 2])


def test_balance_yes_no_keeps_equal_sides_and_every_other_pair() -> None:
    pairs = ([_pair(k, "yes", "no") for k in range(7)] + [_pair(10 + k, "No.", "Yes, there is.") for k in range(3)]
             + [_pair(20, "The image shows the brain.", "It shows the chest.")])
    kept = ste.balance_yes_no(pairs, seed=0)
    firsts = [(ste._yes_no(p.chosen), ste._yes_no(p.rejected)) for p in kept]
    assert firsts.count(("yes", "no")) == 3 and firsts.count(("no", "yes")) == 3
    assert "p20" in {p.pair_id for p in kept} and len(kept) == 7
    assert [p.pair_id for p in ste.balance_yes_no(pairs, seed=0)] == [p.pair_id for p in kept]  # seeded


def test_closed_by_type_scores_closed_questions_per_type(tmp_path: Path) -> None:
    rows = [{"id": i, "image": "a.png", "answer_type": kind, "question_type": qt,
             "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": truth}]}
            for i, (kind, qt, truth) in enumerate([("CLOSED", "PRES", "yes"), ("CLOSED", "PRES", "no"),
                                                   ("CLOSED", "SIZE", "no"), ("OPEN", "SIZE", "large")])]
    path = tmp_path / "test_w_options.json"
    path.write_text(ste.json.dumps(rows))
    assert ste.closed_by_type(path, ["Yes.", "yes", "No, it is small.", "large"]) == {"PRES": 50.0, "SIZE": 100.0}


def test_pair_filters_and_answer_temperature_are_flags() -> None:
    _, s = ste.parse(["--recipe", "aligned", "--answer-temperature", "1.5", "--balance-yes-no", "--min-chosen-score", "8"])
    assert (s.answer_temperature, s.balance_yes_no, s.min_chosen_score, s.temperature) == (1.5, True, 8.0, 1.2)
    _, plain = ste.parse([])
    assert (plain.answer_temperature, plain.balance_yes_no, plain.min_chosen_score) == (None, False, None)


def test_self_play_samples_answers_at_their_own_temperature(tmp_path: Path, monkeypatch) -> None:
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.new("RGB", (64, 64), (40, 40, 40)).save(tmp_path / "images" / "a.png")
    seen: dict[str, float] = {}

    def ask_seeded(engine, images, descriptions, seeds, sampling):
        seen["question"] = sampling.temperature
        return [["Is there a lesion?", "Which organ is shown?"]]

    def sample_answers(engine, images, questions, seeds, sampling):
        seen["answer"] = sampling.temperature
        return [tuple("yes" if k % 2 else "no" for k in range(len(seeds[0]))) for _ in questions]

    monkeypatch.setattr(ste, "describe", lambda engine, images, sampling: ["A CT scan of the brain."])
    monkeypatch.setattr(ste, "ask_seeded", ask_seeded)
    monkeypatch.setattr(ste, "sample_answers", sample_answers)
    _, s = ste.parse(["--recipe", "aligned", "--questions", "2"])
    data = {"pool": ["a.png"], "paths": SyntheticPaths.under(tmp_path)}
    play = ste.self_play(None, data, 0, s)
    assert seen == {"question": 1.2, "answer": 2.0}
    assert [len(a) for a in play["answers"]] == [4, 4] and len(play["flat"]) == 2
