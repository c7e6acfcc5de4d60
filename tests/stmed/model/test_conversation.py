"""Conversations → turns → rendered spans → token labels, on a tokenizer trained in the test."""

from __future__ import annotations

import random

import pytest
import torch

from stmed.model import prompts
from stmed.model.conversation import (
    IGNORE_INDEX,
    LOSS_NONE,
    Encoded,
    Span,
    Turn,
    _target_regions,
    _token_kind,
    collate,
    describe_targets,
    encode,
    encode_prompt_answer,
    render,
    to_turns,
)
from stmed.model.prompts import SYSTEM_SQ
from stmed.model.tokenizer import train_tokenizer

Q1, A1 = "What modality is used?", "This is a chest X-ray."
Q2, A2 = "Where is the lesion?", "The lesion is in the left lower lobe."
Q3, A3 = "Is there an effusion?", "No, the costophrenic angles are sharp."
IMAGE_LEN = 6


def conversation(first: str = f"{Q1}\n<image>") -> list[dict]:
    return [
        {"from": "human", "value": first},
        {"from": "gpt", "value": A1},
        {"from": "human", "value": Q2},
        {"from": "gpt", "value": A2},
        {"from": "human", "value": Q3},
        {"from": "gpt", "value": A3},
    ]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(prompts.corpus() + [Q1, A1, Q2, A2, Q3, A3], vocab_size=600)


def encoded(turns: list[Turn], tokenizer, max_length: int = 1024) -> Encoded:
    return encode(render(turns, SYSTEM_SQ), tokenizer, IMAGE_LEN, max_length)


def test_to_turns_normalises_image_and_keeps_users_at_ratio_zero():
    turns = to_turns(conversation(), sq_ratio=0.0, rng=random.Random(0))
    assert turns == [
        Turn("USER", f"<image>\n{Q1}"),
        Turn("ASSISTANT", A1),
        Turn("USER", Q2),
        Turn("ASSISTANT", A2),
        Turn("USER", Q3),
        Turn("ASSISTANT", A3),
    ]


def test_render_matches_the_template_and_spans():
    turns = to_turns(conversation(), sq_ratio=1.0, rng=random.Random(0))
    rendered = render(turns, SYSTEM_SQ)
    assert rendered.text == (
        f"{SYSTEM_SQ} USER: <image>\n{Q1} ASSISTANT: {A1}</s>VUSER: {Q2}</s> ASSISTANT: {A2}</s>"
        f"VUSER: {Q3}</s> ASSISTANT: {A3}</s>"
    )
    assert [(s.kind, rendered.text[s.start : s.end]) for s in rendered.spans] == [
        ("qa", f"{A1}</s>"),
        ("vq", f"{Q2}</s>"),
        ("qa", f"{A2}</s>"),
        ("vq", f"{Q3}</s>"),
        ("qa", f"{A3}</s>"),
    ]


def test_targets_with_questioner_turns(tokenizer):
    item = encoded(to_turns(conversation(), 1.0, random.Random(0)), tokenizer)
    # Each run starts with the space after the role's colon: the model writes it after "ASSISTANT:".
    assert describe_targets(item, tokenizer) == [
        ("qa", f" {A1}</s>"),
        ("vq", f" {Q2}</s>"),
        ("qa", f" {A2}</s>"),
        ("vq", f" {Q3}</s>"),
        ("qa", f" {A3}</s>"),
    ]
    targets = [i for i, label in enumerate(item.labels) if label != IGNORE_INDEX]
    assert all(item.labels[i] == item.input_ids[i] for i in targets)
    assert [i for i, kind in enumerate(item.loss_kind) if kind != LOSS_NONE] == targets


def test_targets_without_questioner_turns(tokenizer):
    item = encoded(to_turns(conversation(), 0.0, random.Random(0)), tokenizer)
    assert describe_targets(item, tokenizer) == [
        ("qa", f" {A1}</s>"),
        ("qa", f" {A2}</s>"),
        ("qa", f" {A3}</s>"),
    ]


def test_system_first_question_prefixes_and_image_are_never_targets(tokenizer):
    item = encoded(to_turns(conversation(), 1.0, random.Random(0)), tokenizer)
    untargeted = [t for t, label in zip(item.input_ids, item.labels) if label == IGNORE_INDEX]
    text = tokenizer.decode(untargeted, skip_special_tokens=False)
    image = prompts.IMAGE_TOKEN * IMAGE_LEN
    assert text == f"<s>{SYSTEM_SQ} USER: {image}\n{Q1} ASSISTANT:VUSER: ASSISTANT:VUSER: ASSISTANT:"


def test_image_is_expanded(tokenizer):
    item = encoded(to_turns(conversation(), 0.5, random.Random(1)), tokenizer)
    image_id = tokenizer.convert_tokens_to_ids(prompts.IMAGE_TOKEN)
    positions = [i for i, t in enumerate(item.input_ids) if t == image_id]
    assert len(positions) == IMAGE_LEN
    assert positions == list(range(positions[0], positions[0] + IMAGE_LEN))  # one contiguous block
    assert all(item.labels[i] == IGNORE_INDEX for i in positions)
    plain = tokenizer(render(to_turns(conversation(), 0.0, random.Random(0)), SYSTEM_SQ).text)["input_ids"]
    assert (
        len(encoded(to_turns(conversation(), 0.0, random.Random(0)), tokenizer)) == len(plain) + IMAGE_LEN - 1
    )


def test_sq_ratio_is_seeded_and_redrawn():
    long = [{"from": "human", "value": "<image>\nQ0"}, {"from": "gpt", "value": "A0"}]
    for i in range(1, 13):
        long += [{"from": "human", "value": f"Q{i}"}, {"from": "gpt", "value": f"A{i}"}]

    def roles(rng: random.Random) -> list[str]:
        return [t.role for t in to_turns(long, 0.5, rng)[2::2]]

    assert roles(random.Random(7)) == roles(random.Random(7))
    rng = random.Random(7)
    first, second = roles(rng), roles(rng)
    assert first != second  # the same sample loaded twice is re-labelled
    drawn = first + second
    assert {"USER", "VUSER"} == set(drawn)
    assert {t.role for t in to_turns(long, 1.0, random.Random(0))[2::2]} == {"VUSER"}
    assert {t.role for t in to_turns(long, 0.0, random.Random(0))[2::2]} == {"USER"}


@pytest.mark.parametrize(
    "conv, reason",
    [
        ([], "empty"),
        ({"from": "human"}, "expected a list"),
        ([{"from": "human", "value": "<image>\nQ"}, {"from": "human", "value": "Q"}], "alternate"),
        ([{"from": "gpt", "value": "A"}, {"from": "human", "value": "<image>\nQ"}], "alternate"),
        ([{"from": "human", "value": "<image>\nQ"}], "no answer"),
        ([{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}], "exactly one <image>"),
        ([{"from": "human", "value": "Q <image> more"}, {"from": "gpt", "value": "A"}], "middle"),
        (
            [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A <image>"}],
            "turn 1 contains <image>",
        ),
        (
            [
                {"from": "human", "value": "<image>\nQ"},
                {"from": "gpt", "value": "A"},
                {"from": "human", "value": "<image> Q2"},
                {"from": "gpt", "value": "A2"},
            ],
            "turn 2 contains <image>",
        ),
        ([{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "  "}], "turn 1 has empty text"),
        ([{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "A"}], "first question is empty"),
        ([{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A</s>B"}], "end-of-turn"),
        (["<image> Q", "A"], "not an object"),
    ],
)
def test_malformed_conversations(conv, reason):
    with pytest.raises(ValueError, match=reason):
        to_turns(conv, 0.5, random.Random(0))


def test_sq_ratio_out_of_range():
    with pytest.raises(ValueError, match="sq_ratio"):
        to_turns(conversation(), 1.5, random.Random(0))


def test_render_rejects_bad_order():
    with pytest.raises(ValueError, match="first turn"):
        render([Turn("VUSER", "<image>\nQ"), Turn("ASSISTANT", "A")], SYSTEM_SQ)
    with pytest.raises(ValueError, match="alternation"):
        render([Turn("USER", "<image>\nQ"), Turn("USER", "Q")], SYSTEM_SQ)


def test_truncation_keeps_prefix_of_targets(tokenizer):
    turns = to_turns(conversation(), 1.0, random.Random(0))
    full = encoded(turns, tokenizer)
    # Cut in the middle of the first answer: only its head stays a target.
    first_target = next(i for i, label in enumerate(full.labels) if label != IGNORE_INDEX)
    cut = encoded(turns, tokenizer, max_length=first_target + 3)
    assert cut.truncated and len(cut) == first_target + 3
    assert cut.input_ids == full.input_ids[: first_target + 3]
    runs = describe_targets(cut, tokenizer)
    assert len(runs) == 1 and runs[0][0] == "qa" and f" {A1}</s>".startswith(runs[0][1])
    assert not encoded(turns, tokenizer, max_length=len(full)).truncated


def test_truncation_never_cuts_the_image(tokenizer):
    turns = to_turns(conversation(), 0.0, random.Random(0))
    full = encoded(turns, tokenizer)
    image_id = tokenizer.convert_tokens_to_ids(prompts.IMAGE_TOKEN)
    image_end = max(i for i, t in enumerate(full.input_ids) if t == image_id) + 1
    assert len(encoded(turns, tokenizer, max_length=image_end)) == image_end
    with pytest.raises(ValueError, match="image does not fit"):
        encoded(turns, tokenizer, max_length=image_end - 1)


def test_encode_prompt_answer_targets_only_the_answer(tokenizer):
    prompt = prompts.preference_prompt(Q3)
    item = encode_prompt_answer(prompt, f" {A3} ", tokenizer, IMAGE_LEN, 1024)
    assert describe_targets(item, tokenizer) == [("qa", f" {A3}</s>")]
    assert item.input_ids[-1] == tokenizer.eos_token_id
    with pytest.raises(ValueError, match="empty"):
        encode_prompt_answer(prompt, " ", tokenizer, IMAGE_LEN, 1024)


def test_question_prompt_continues_like_training_text(tokenizer):
    # A questioner turn in training reads exactly as question_prompt + " question</s>".
    prompt = prompts.question_prompt(A1)
    turns = [Turn("USER", f"<image>\n{prompts.DESCRIBE_QUESTION}"), Turn("ASSISTANT", A1)]
    training = render(turns + [Turn("VUSER", Q2), Turn("ASSISTANT", A2)], SYSTEM_SQ).text
    assert training.startswith(prompt + f" {Q2}</s>")


def test_token_rule_at_boundaries():
    text = "ASSISTANT: Yes.</s>"
    regions = _target_regions(text, [Span(11, len(text), "qa")])
    assert _token_kind(10, 14, regions) == 1  # " Yes": the space the model writes is included
    assert _token_kind(10, 11, regions) == 1  # a lone separator space too
    assert _token_kind(9, 12, regions) == LOSS_NONE  # straddles the colon
    assert _token_kind(0, 0, regions) == LOSS_NONE  # <s> has an empty span


def test_collate_pads_right(tokenizer):
    turns = to_turns(conversation(), 1.0, random.Random(0))
    long = encoded(turns, tokenizer)
    cut = len(long) - 10
    short = encoded(turns, tokenizer, max_length=cut)
    batch = collate([short, long], pad_id=tokenizer.pad_token_id)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "loss_kind"}
    assert batch["input_ids"].shape == (2, len(long)) and batch["input_ids"].dtype == torch.long
    assert batch["input_ids"][0, :cut].tolist() == short.input_ids
    assert batch["input_ids"][0, cut:].eq(tokenizer.pad_token_id).all()
    assert batch["attention_mask"][0].sum() == cut and batch["attention_mask"][1].all()
    assert batch["labels"][0, cut:].eq(IGNORE_INDEX).all() and batch["loss_kind"][0, cut:].eq(0).all()
    assert batch["labels"][1].tolist() == long.labels and batch["loss_kind"][1].tolist() == long.loss_kind
