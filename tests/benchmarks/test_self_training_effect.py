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
