"""The locally trained byte-level BPE tokenizer: special tokens, offsets, round trips."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from stmed.model.tokenizer import SPECIAL_TOKENS, train_tokenizer

CORPUS = [
    "A chat between a curious human and an artificial intelligence assistant.",
    "USER: <image>\nWhat is shown in the image? ASSISTANT: A chest x-ray with a nodule.</s>",
    "VUSER: Is there a mass in the left lung?</s> ASSISTANT: yes</s>",
    "The lungs are clear. There is no pleural effusion. The heart size is normal.",
]
TEMPLATE = (
    "SYS USER: <image>\nWhat is seen? ASSISTANT: A nodule.</s>VUSER: Where?</s> ASSISTANT: Left lung.</s>"
)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, vocab_size=400)


def test_special_tokens_have_fixed_ids(tok):
    assert tok.convert_tokens_to_ids(SPECIAL_TOKENS) == [0, 1, 2, 3, 4]
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    assert tok.image_token == "<image>"


def test_eos_and_image_in_text_are_single_ids(tok):
    ids = tok("answer</s>VUSER: x<image>y", add_special_tokens=False).input_ids
    assert ids.count(tok.eos_token_id) == 1
    assert ids.count(4) == 1
    # no piece of "</s>" or "<image>" leaks into ordinary tokens
    pieces = tok.convert_ids_to_tokens(ids)
    assert not any(("</" in p or "image" in p) and p not in ("</s>", "<image>") for p in pieces)


def test_bos_is_prepended_only_with_special_tokens(tok):
    with_bos = tok("hello there").input_ids
    without = tok("hello there", add_special_tokens=False).input_ids
    assert with_bos[0] == tok.bos_token_id
    assert with_bos[1:] == without
    assert tok.bos_token_id not in without


def test_offsets_tile_the_text_exactly(tok):
    enc = tok(TEMPLATE, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    assert offsets[0] == (0, 0)  # <s> covers no characters
    # consecutive, gap-free spans whose text concatenates back to the input (ASCII: one token per span)
    assert offsets[1][0] == 0 and offsets[-1][1] == len(TEMPLATE)
    for (_, end), (start, _) in itertools.pairwise(offsets[1:]):
        assert end == start
    assert "".join(TEMPLATE[a:b] for a, b in offsets[1:]) == TEMPLATE
    # the eos tokens sit exactly on the "</s>" characters
    eos_spans = [TEMPLATE[a:b] for i, (a, b) in zip(enc.input_ids, offsets) if i == tok.eos_token_id]
    assert eos_spans == ["</s>"] * 3


def test_decode_round_trips_unseen_and_unicode_text(tok):
    text = "Ünïcode 漢字 never seen: 42% <image> of cases</s>"
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.unk_token_id not in ids  # byte-level: nothing is unknown
    assert tok.decode(ids) == text


def test_training_is_deterministic_and_saves(tok, tmp_path: Path):
    again = train_tokenizer(CORPUS, vocab_size=400)
    assert again.get_vocab() == tok.get_vocab()
    assert len(tok) <= 400
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(TEMPLATE).input_ids == tok(TEMPLATE).input_ids
    assert loaded.pad_token_id == tok.pad_token_id and loaded.image_token == "<image>"


def test_padding_is_right_with_pad_id(tok):
    batch = tok(["a b c", "a"], padding=True)
    assert batch.input_ids[1][-1] == tok.pad_token_id
    assert batch.attention_mask[1][-1] == 0


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="corpus is empty"):
        train_tokenizer([])
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(CORPUS, vocab_size=100)
