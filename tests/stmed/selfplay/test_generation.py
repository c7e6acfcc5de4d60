"""The self-play additions to stmed.selfplay.generation: per-row seeded sampling, derived seeds, the question
and answer filters, and the settings group."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from stmed.config import ConfigError, ModelConfig
from stmed.model.build import load_model
from stmed.model.generate import HFEngine, Sampling
from stmed.selfplay import generation
from stmed.selfplay.generation import GenerationSettings


@pytest.fixture(scope="module")
def engine() -> HFEngine:
    return HFEngine(*load_model(ModelConfig(preset="tiny")), batch_size=8)


def _images(n: int) -> list[Image.Image]:
    return [Image.fromarray(np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8))
            for i in range(n)]


SAMPLING = Sampling(temperature=1.2, top_k=100, top_p=0.95, max_new_tokens=10)


def test_row_seeded_answers_do_not_depend_on_the_batch(engine: HFEngine):
    images = _images(3)
    questions = ["Is there a lesion?", "Which organ is shown?", "How many lesions are there?"]
    seeds = [(11, 12), (21, 22), (31, 32)]
    together = generation.answer_twice_seeded(engine, images, questions, seeds, SAMPLING)
    alone = generation.answer_twice_seeded(engine, images[1:2], questions[1:2], seeds[1:2], SAMPLING)
    reordered = generation.answer_twice_seeded(engine, images[::-1], questions[::-1], seeds[::-1], SAMPLING)
    assert together[1] == alone[0] == reordered[1]
    assert together[::-1] == reordered
    assert together[1][0] != together[1][1]  # two seeds, two different samples


def test_ask_seeded_gives_one_question_per_seed_and_counts_tokens(engine: HFEngine):
    before = engine.generated_tokens
    questions = generation.ask_seeded(engine, _images(2), ["A scan.", ""], [[1, 2, 3], [4, 5]], SAMPLING)
    assert [len(q) for q in questions] == [3, 2]
    again = generation.ask_seeded(engine, _images(2)[1:], [""], [[5]], SAMPLING)
    assert again[0][0] == questions[1][1]
    # every row generated between 1 and max_new_tokens tokens
    assert 6 <= engine.generated_tokens - before <= 6 * SAMPLING.max_new_tokens


def test_derived_seeds_are_stable_and_distinct():
    settings = GenerationSettings(seed=3, questions_per_image=4)
    seeds = [settings.question_seed("a.png", j) for j in range(4)] + list(settings.answer_seeds("a.png", 0))
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2**31 for s in seeds)
    assert settings.question_seed("a.png", 0) == generation.derive_seed(3, "a.png", "question", 0)
    assert GenerationSettings(seed=4).question_seed("a.png", 0) != seeds[0]


def test_question_and_answer_filters():
    assert generation.question_reasons([
        "Is there a lesion?", "is there a  LESION?", "Lesion?", "What is the organ", "Which side is it on?",
    ]) == [None, "duplicate", "too_short", "not_a_question", None]
    # a rejected question does not make a later copy a duplicate: the copy is judged on its own
    assert generation.question_reasons(["the the the the the the?", "Which side is it on?"]) == [
        "repetitive", None]
    assert generation.answer_pair_reason("Yes.", " yes ") == "identical_answers"
    assert generation.answer_pair_reason("", "No.") == "answer1_empty"
    assert generation.answer_pair_reason("No.", "a a a a a a") == "answer2_repetitive"
    assert generation.answer_pair_reason("Left side.", "Right side.") is None
    assert generation.normalize_text("  Is it  the BRAIN?! ") == "is it the brain"


def test_settings_reject_bad_values_naming_the_key():
    with pytest.raises(ConfigError, match="generation.questions_per_image"):
        GenerationSettings(questions_per_image=0)
    with pytest.raises(ConfigError, match="generation.answer_temperature"):
        GenerationSettings(answer_temperature=0.0)
    with pytest.raises(ConfigError, match="generation.question_top_p"):
        GenerationSettings(question_top_p=1.5)
    assert GenerationSettings().answer_sampling == Sampling(1.2, 100, 0.95, 300)
    assert GenerationSettings().question_sampling == Sampling(1.2, 300, 0.95, 300)


# ----------------------------------------------------------------------------- the Qwen2.5-VL family


def test_qwen2_5_vl_describes_asks_and_answers_in_its_own_chat_format():
    """Self-play on the other family: the prompts are ChatML, the questioner its own role, images of
    different sizes in one batch; row-seeded sampling stays batch-independent."""
    qwen = HFEngine(*load_model(ModelConfig(preset="tiny-qwen2.5-vl")), batch_size=8)
    assert qwen.chat.name == "chatml"
    images = _images(2) + [Image.fromarray(np.random.default_rng(9).integers(0, 256, (40, 64, 3), dtype=np.uint8))]
    descriptions = generation.describe(qwen, images, Sampling(max_new_tokens=8))
    assert len(descriptions) == 3 and all(isinstance(d, str) for d in descriptions)
    questions = generation.ask_seeded(qwen, images, descriptions, [[1, 2], [3], [4]], SAMPLING)
    assert [len(q) for q in questions] == [2, 1, 1]
    flat = [q or "Is there a lesion?" for qs in questions for q in qs]
    pairs = generation.answer_twice_seeded(qwen, [images[0], images[0], images[1], images[2]], flat,
                                           [(11, 12), (13, 14), (21, 22), (31, 32)], SAMPLING)  # fmt: skip
    alone = generation.answer_twice_seeded(qwen, images[2:], flat[3:], [(31, 32)], SAMPLING)
    assert pairs[3] == alone[0] and any(a != b for a, b in pairs)
    assert not any("<|im_" in text for pair in pairs for text in pair)


def test_more_answers_and_the_closed_suffix_are_seeded_settings():
    from stmed.model import prompts

    settings = GenerationSettings(seed=3, answers_per_question=6, closed_suffix_fraction=0.5)
    assert settings.pair_slots == 3
    seeds = [s for slot in range(3) for s in settings.answer_seeds("a.png", 0, slot)]
    assert len(set(seeds)) == 6
    assert settings.answer_seeds("a.png", 0) == GenerationSettings(seed=3).answer_seeds("a.png", 0)
    with pytest.raises(ConfigError, match="answers_per_question must be even"):
        GenerationSettings(answers_per_question=3)
    with pytest.raises(ConfigError, match="closed_suffix_fraction"):
        GenerationSettings(closed_suffix_fraction=1.5)
    suffixed = [settings.closed_suffixed("Is there a lesion?", f"{i}.png", 0) for i in range(200)]
    assert 70 < sum(q.endswith(prompts.CLOSED_SUFFIX) for q in suffixed) < 130
    assert suffixed == [settings.closed_suffixed("Is there a lesion?", f"{i}.png", 0) for i in range(200)]
    always = GenerationSettings(closed_suffix_fraction=1.0)
    asked = always.closed_suffixed("Is there a lesion?", "a.png", 0)
    assert asked == "Is there a lesion?" + prompts.CLOSED_SUFFIX
    assert always.closed_suffixed(asked, "a.png", 0) == asked  # never twice
    assert always.closed_suffixed("Where is the lesion?", "a.png", 0) == "Where is the lesion?"
    assert GenerationSettings().closed_suffixed("Is there a lesion?", "a.png", 0) == "Is there a lesion?"


def _write_demonstrations(path, n: int):
    import json

    rows = [{"pair_id": f"p{i}", "image": f"img{i}.png", "question": f"Is there a finding number {i}?",
             "answer": f"Answer {i}."} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [(r["question"], r["answer"]) for r in rows]


def test_demonstrations_are_drawn_per_image_under_the_seed_and_kept_in_file_order(tmp_path):
    pool = _write_demonstrations(tmp_path / "demonstrations.jsonl", 6)
    settings = GenerationSettings(demonstrations=str(tmp_path / "demonstrations.jsonl"), demonstrations_k=3)
    assert generation.read_demonstrations(settings.demonstrations) == tuple(pool)
    picks = {i: generation.demonstrations_for(settings, i) for i in ("a.png", "b.png", "c.png", "d.png")}
    for image_id, shown in picks.items():
        assert len(shown) == 3 and set(shown) <= set(pool)
        assert [pool.index(d) for d in shown] == sorted(pool.index(d) for d in shown)  # file order
        assert generation.demonstrations_for(settings, image_id) == shown  # a function of seed and image
    assert len(set(picks.values())) > 1  # images see different examples
    other_seed = GenerationSettings(demonstrations=settings.demonstrations, demonstrations_k=3, seed=1)
    assert [generation.demonstrations_for(other_seed, i) for i in picks] != list(picks.values())
    few = GenerationSettings(demonstrations=settings.demonstrations, demonstrations_k=10)
    assert generation.demonstrations_for(few, "a.png") == tuple(pool)  # fewer than k: all of them
    assert generation.demonstrations_for(GenerationSettings(), "a.png") == ()
    # a repeated demonstration is a duplicate of a question already asked about the image
    assert generation.question_reasons(["Is there a FINDING number 2?", "Where is it?"], [pool[2][0]]) == [
        "duplicate", None]


@pytest.mark.parametrize(("text", "message"), [
    ("", "holds no demonstrations"),
    ("not json\n", "line 1 is not JSON"),
    ('{"question": "Is it?"}\n', "line 1 has no question and answer"),
])
def test_a_bad_demonstrations_file_is_refused_naming_it(tmp_path, text, message):
    path = tmp_path / "demonstrations.jsonl"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        generation.read_demonstrations(path)
    with pytest.raises(ConfigError, match="is not a file"):
        generation.read_demonstrations(tmp_path / "missing.jsonl")
    with pytest.raises(ConfigError, match="demonstrations_k must be >= 1"):
        GenerationSettings(demonstrations_k=0)
