"""The template strings and the inference prompt builders, checked character for character."""

from __future__ import annotations

import pytest

from stmed.model import prompts
from stmed.model.prompts import (
    CLOSED_SUFFIX,
    DESCRIBE_QUESTION,
    SYSTEM_PLAIN,
    SYSTEM_SQ,
    answer_prompt,
    corpus,
    describe_prompt,
    image_first,
    preference_prompt,
    question_prompt,
    turn_parts,
)

VICUNA = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


def test_system_prompts():
    assert SYSTEM_PLAIN == VICUNA
    assert SYSTEM_SQ.startswith(VICUNA + " ")
    assert "curious virtual user" in SYSTEM_SQ and "avoids uncertain details" in SYSTEM_SQ
    assert CLOSED_SUFFIX == " Please choose from the following two options: [yes, no]"


def test_turn_parts_per_role():
    assert turn_parts("USER", "Q") == ("USER: ", "Q", " ")
    assert turn_parts("ASSISTANT", "A") == ("ASSISTANT: ", "A</s>", "")
    assert turn_parts("VUSER", "Q") == ("VUSER: ", "Q</s>", " ")
    with pytest.raises(ValueError, match="unknown role"):
        turn_parts("SYSTEM", "x")


@pytest.mark.parametrize(
    "text",
    [
        "<image>\nWhat is shown?",
        "What is shown? <image>",
        "What is shown?\n<image>",
        "  <image> What is shown?  ",
    ],
)
def test_image_first_moves_token_to_start(text):
    assert image_first(text) == "<image>\nWhat is shown?"


@pytest.mark.parametrize(
    "text, reason",
    [
        ("What is shown?", "exactly one"),
        ("<image> What <image>", "exactly one"),
        ("What <image> is shown?", "middle"),
        (" <image>\n ", "empty"),
    ],
)
def test_image_first_rejects(text, reason):
    with pytest.raises(ValueError, match=reason):
        image_first(text)


def test_answer_prompt():
    expected = f"{SYSTEM_SQ} USER: <image>\nIs there a fracture? ASSISTANT:"
    assert answer_prompt("Is there a fracture?") == expected
    # A benchmark question that already carries the token at its end is normalised, not doubled.
    assert answer_prompt("Is there a fracture? <image>") == expected


def test_describe_prompt():
    assert describe_prompt() == f"{SYSTEM_SQ} USER: <image>\n{DESCRIBE_QUESTION} ASSISTANT:"


def test_question_prompt_ends_with_open_questioner_turn():
    text = question_prompt(" A chest X-ray with a left effusion. ")
    assert text == (
        f"{SYSTEM_SQ} USER: <image>\n{DESCRIBE_QUESTION} ASSISTANT: "
        "A chest X-ray with a left effusion.</s>VUSER:"
    )
    with pytest.raises(ValueError, match="empty"):
        question_prompt("  ")


def test_preference_prompt_is_plain_vicuna():
    assert preference_prompt("Is the heart enlarged?") == (
        f"{SYSTEM_PLAIN} USER: <image>\nIs the heart enlarged? ASSISTANT:"
    )
    assert "VUSER" not in preference_prompt("Is the heart enlarged?")


def test_corpus_covers_fixed_texts():
    texts = corpus()
    joined = "\n".join(texts)
    for fixed in (
        SYSTEM_PLAIN,
        SYSTEM_SQ,
        DESCRIBE_QUESTION,
        CLOSED_SUFFIX.strip(),
        "VUSER: ",
        " ASSISTANT:",
    ):
        assert fixed in joined
    # Special tokens are never merged by BPE; keeping them out of the corpus keeps merges meaningful.
    assert prompts.EOS not in joined and prompts.IMAGE_TOKEN not in joined


def test_question_prompt_writes_demonstrations_in_order_as_earlier_turns_in_each_family():
    """Clinicians' demonstrations: questioner turns with their answers between the description and the
    open turn, in the order given, through the family's format; the image stays once, in the first turn."""
    from stmed.model.families.gemma3 import GEMMA
    from stmed.model.families.qwen2_5_vl import CHATML

    shown = [("Is there a lesion in the left lobe?", "Yes."), ("Which organ is shown?", "The liver.")]
    assert question_prompt("A CT scan.", demonstrations=shown) == (
        f"{SYSTEM_SQ} USER: <image>\n{DESCRIBE_QUESTION} ASSISTANT: A CT scan.</s>"
        "VUSER: Is there a lesion in the left lobe?</s> ASSISTANT: Yes.</s>"
        "VUSER: Which organ is shown?</s> ASSISTANT: The liver.</s>VUSER:"
    )
    for chat in (prompts.VICUNA, CHATML, GEMMA):
        plain = question_prompt("A CT scan.", chat=chat)
        text = question_prompt("A CT scan.", chat=chat, demonstrations=shown)
        at = [text.index(s) for s in ("A CT scan.", shown[0][0], shown[0][1], shown[1][0], shown[1][1])]
        assert at == sorted(at), chat.name
        assert text.count(chat.image_block) == plain.count(chat.image_block) == 1
        assert text.endswith(chat.open(prompts.QUESTIONER)) and text.startswith(plain[: plain.index("A CT")])
        assert question_prompt("A CT scan.", chat=chat, demonstrations=()) == plain
    for bad, what in ((("", "Yes."), "demonstration 0 question is empty"),
                      (("Is it?", "Yes.</s>"), "demonstration 0 answer must not contain"),
                      (("<image> Is it?", "Yes."), "demonstration 0 question must not contain")):
        with pytest.raises(ValueError, match=what):
            question_prompt("A CT scan.", demonstrations=[bad])
