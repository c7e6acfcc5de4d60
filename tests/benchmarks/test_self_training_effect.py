"""The self-training benchmark's command line: a recipe is a set of defaults that explicit flags override."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import self_training_effect as ste


def test_aligned_recipe_sets_the_measured_settings() -> None:
    _, s = ste.parse(["--recipe", "aligned"])
    assert (s.warmup_steps, s.num_images, s.test_images, s.pool_images, s.questions) == (600, 660, 100, 480, 5)
    assert (s.suffix_closed, s.answers_per_question, s.labelled) == (1.0, 4, 60)
    assert s.sft_overrides == {"train.lr_llm": 1e-3, "train.lr_projector": 1e-3, "train.lr_vit": 1e-3}
    assert s.dpo_overrides["train.epochs"] == 3 and s.dpo_overrides["dpo.sft_weight"] == 1.0


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
    from stmed.warmup import make_warmup_data

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
