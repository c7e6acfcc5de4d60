"""The endpoint's request rules without Ray or HTTP: field checks, image decoding, OpenAI messages, answers.

(The same rules over real HTTP on a Serve replica: tests/actors/test_serve.py.)
"""

from __future__ import annotations

import base64
import io

import pytest
import torch
from PIL import Image

from stmed.model.build import build_tiny, image_seq_len
from stmed.model.generate import HFEngine
from stmed.serve.contract import (
    APIError,
    LimitsConfig,
    VQAItem,
    answer_items,
    chat_parts,
    check_max_tokens,
    check_question,
    image_from_base64,
    parse_json,
)

LIMITS = LimitsConfig(max_upload_bytes=300_000, max_image_pixels=600 * 600, max_question_chars=20,
                      max_tokens=16, default_max_tokens=4)


def png(size: tuple[int, int] = (64, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (40, 90, 140)).save(buffer, format="PNG")
    return buffer.getvalue()


def status_of(call) -> tuple[int, str]:
    with pytest.raises(APIError) as info:
        call()
    return info.value.status, info.value.type


def test_question_is_cleaned_and_checked():
    assert check_question("  Is <image> it\n normal?</s> ", LIMITS, ["<image>", "</s>"]) == "Is it normal?"
    assert status_of(lambda: check_question("<image>", LIMITS, ["<image>"]))[0] == 422
    assert status_of(lambda: check_question("x" * 21, LIMITS, []))[0] == 422
    assert status_of(lambda: check_question(3, LIMITS, []))[0] == 422


def test_max_tokens_default_form_text_and_bounds():
    assert check_max_tokens(None, LIMITS) == 4
    assert check_max_tokens(" 7 ", LIMITS) == 7
    for bad in (0, 17, True, "many", 2.0):
        assert status_of(lambda v=bad: check_max_tokens(v, LIMITS))[0] == 422


def test_base64_and_data_url_decode_the_same_pixels_and_remote_urls_are_refused():
    raw = base64.b64encode(png()).decode()
    bare, url = image_from_base64(raw, LIMITS), image_from_base64("data:image/png;base64," + raw, LIMITS)
    assert bare.size == url.size == (64, 64) and bare.tobytes() == url.tobytes()
    assert status_of(lambda: image_from_base64("https://x/a.png", LIMITS)) == (400, "remote_image_refused")
    assert status_of(lambda: image_from_base64("not base64!!", LIMITS)) == (400, "invalid_image")
    assert status_of(lambda: image_from_base64("data:text/plain;base64," + raw, LIMITS))[0] == 400
    wide = base64.b64encode(png((700, 700))).decode()
    assert status_of(lambda: image_from_base64(wide, LIMITS)) == (413, "image_too_large")


def test_openai_messages_give_the_last_user_text_and_its_one_image():
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "Is it"},
                                             {"type": "image_url", "image_url": {"url": "data:x"}},
                                             {"type": "text", "text": "normal?"}]}]
    assert chat_parts(messages) == ("Is it normal?", "data:x")
    two = [{"role": "user", "content": [{"type": "image_url", "image_url": "a"}, {"type": "image_url",
                                                                                  "image_url": "b"}]}]
    assert status_of(lambda: chat_parts(two))[0] == 400
    assert status_of(lambda: chat_parts([{"role": "assistant", "content": "hi"}]))[0] == 422
    assert status_of(lambda: parse_json(b"{broken")) == (400, "invalid_json")
    assert status_of(lambda: parse_json(b"[1]"))[0] == 422


def test_answer_items_counts_tokens_within_each_requests_budget():
    torch.manual_seed(0)
    model, processor = build_tiny(0)
    engine = HFEngine(model, processor, device="cpu", batch_size=4)
    image = Image.open(io.BytesIO(png())).convert("RGB")
    items = [VQAItem(image, "Is it normal?", 3), VQAItem(image, "Where is the lesion?", 5)]
    results = answer_items(engine, image_seq_len(processor), items)
    assert [r["batch_size"] for r in results] == [2, 2]
    for item, result in zip(items, results):
        assert 0 <= result["completion_tokens"] <= item.max_tokens
        assert result["prompt_tokens"] > image_seq_len(processor)
        assert result["total_tokens"] == result["prompt_tokens"] + result["completion_tokens"]
        assert result["truncated"] == (result["completion_tokens"] >= item.max_tokens)
