"""The endpoint's request rules without Ray or HTTP: field checks, image decoding, OpenAI messages, answers.

(The same rules over real HTTP on a Serve replica: tests/actors/test_serve.py.)
"""

from __future__ import annotations

import asyncio
import base64
import io
import json

import pytest
import torch
from PIL import Image

from stmed.config import ModelConfig
from stmed.model import prompts
from stmed.model.build import build_tiny, image_seq_len, load_model
from stmed.model.generate import HFEngine
from stmed.serve.contract import (
    APIError,
    LimitsConfig,
    VQAItem,
    answer_isolated,
    answer_items,
    api_key_digest,
    authorize,
    chat_item,
    chat_parts,
    check_max_tokens,
    check_question,
    decode_upload,
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


def refusal(call) -> APIError:
    with pytest.raises(APIError) as info:
        call()
    return info.value


@pytest.fixture(scope="module")
def tiny_engine() -> tuple[HFEngine, int]:
    torch.manual_seed(0)
    model, processor = build_tiny(0)
    return HFEngine(model, processor, device="cpu", batch_size=4), image_seq_len(processor)


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


def test_answer_items_counts_tokens_within_each_requests_budget(tiny_engine):
    engine, image_tokens = tiny_engine
    image = Image.open(io.BytesIO(png())).convert("RGB")
    items = [VQAItem(image, "Is it normal?", 3), VQAItem(image, "Where is the lesion?", 5)]
    results = answer_items(engine, image_tokens, items)
    assert [r["batch_size"] for r in results] == [2, 2]
    for item, result in zip(items, results):
        assert 0 <= result["completion_tokens"] <= item.max_tokens
        assert result["prompt_tokens"] > image_tokens
        assert result["total_tokens"] == result["prompt_tokens"] + result["completion_tokens"]
        assert result["truncated"] == (result["completion_tokens"] >= item.max_tokens)


def test_qwen2_5_vl_prompt_tokens_are_counted_per_image():
    """A Qwen2.5-VL image costs what its size makes it; the count is the processor's, token for token."""
    model, processor = load_model(ModelConfig(preset="tiny-qwen2.5-vl"))
    engine = HFEngine(model, processor, device="cpu", batch_size=4)
    small = Image.open(io.BytesIO(png((64, 32)))).convert("RGB")
    large = Image.open(io.BytesIO(png())).convert("RGB")
    items = [VQAItem(small, "Is it normal?", 3), VQAItem(large, "Is it normal?", 3)]
    results = answer_items(engine, None, items)
    for item, result in zip(items, results):
        text = prompts.answer_prompt(item.question, chat=engine.chat)
        expected = processor(text=[text], images=[item.image], return_tensors="pt")["input_ids"].shape[1]
        assert result["prompt_tokens"] == expected
    assert results[1]["prompt_tokens"] - results[0]["prompt_tokens"] == 16 - 8


# ----------------------------------------------------------------------------- hardening


def test_a_lone_surrogate_question_is_refused_before_batching():
    error = refusal(lambda: check_question("Is \ud800 normal?", LIMITS, []))
    assert (error.status, error.param) == (422, "question") and "surrogate" in error.message


def test_a_poisoned_request_fails_alone_and_its_batch_mates_are_answered(tiny_engine):
    """The tokenizer cannot take a lone surrogate: as one batch, every request would fail with it."""
    engine, image_tokens = tiny_engine
    image = Image.open(io.BytesIO(png())).convert("RGB")
    good, poisoned = VQAItem(image, "Is it normal?", 2), VQAItem(image, "Is \ud800 normal?", 2)
    with pytest.raises(TypeError):  # the problem itself: the whole batch fails in the tokenizer
        answer_items(engine, image_tokens, [good, poisoned, good])
    results = answer_isolated(engine, image_tokens, [good, poisoned, good])
    assert isinstance(results[1], APIError) and results[1].status == 422
    assert results[0]["text"] == results[2]["text"] == answer_items(engine, image_tokens, [good])[0]["text"]
    alone = answer_isolated(engine, image_tokens, [poisoned])  # alone: the probe shows the engine is fine
    assert isinstance(alone[0], APIError) and alone[0].status == 422


def test_an_engine_that_answers_nothing_raises(tiny_engine, monkeypatch):
    """A lost GPU fails every request and the probe: that failure is the replica's, so it raises."""
    engine, image_tokens = tiny_engine

    def lost_device(*args, **kwargs):
        raise RuntimeError("CUDA error: device lost")

    monkeypatch.setattr(engine.model, "generate", lost_device)
    image = Image.open(io.BytesIO(png())).convert("RGB")
    with pytest.raises(RuntimeError, match="known-good request"):
        answer_isolated(engine, image_tokens, [VQAItem(image, "Is it normal?", 2)] * 2)


def test_deep_json_and_huge_integers_are_400():
    for body in (b"[" * 100_000 + b"]" * 100_000, b'{"a": ' * 50_000 + b"1" + b"}" * 50_000,
                 b'{"max_tokens": ' + b"9" * 5000 + b"}"):
        error = refusal(lambda b=body: parse_json(b))
        assert (error.status, error.type) == (400, "invalid_json") and len(error.message) < 100
    assert status_of(lambda: parse_json(b"\xff\xfe{")) == (400, "invalid_json")


def test_error_messages_quote_only_a_short_prefix():
    error = refusal(lambda: check_max_tokens("9" * 1_000_000, LIMITS))
    assert error.status == 422 and len(error.message) < 120 and "9" * 30 not in error.message
    huge = refusal(lambda: check_max_tokens(10**4000, LIMITS))
    assert len(huge.message) < 120


def test_extreme_aspect_ratios_are_refused_before_decoding():
    """Under the pixel limit (defaults: 4096 x 4096), yet 1,600,000 x 1 blew up the model's processor."""
    limits = LimitsConfig()

    def thin(width: int, height: int) -> bytes:
        buffer = io.BytesIO()
        Image.new("L", (width, height)).save(buffer, format="PNG")
        return buffer.getvalue()

    for width, height in ((1_600_000, 1), (400_000, 4)):
        error = refusal(lambda w=width, h=height: decode_upload(thin(w, h), "<upload>", limits))
        assert (error.status, error.type) == (413, "image_too_large") and "limits.max_image_side" in error.message
    error = refusal(lambda: decode_upload(thin(2000, 50), "<upload>", limits))
    assert error.status == 422 and "aspect ratio" in error.message and "limits.max_aspect_ratio" in error.message


def chat_body(**fields) -> bytes:
    message = {"role": "user", "content": [{"type": "text", "text": "Is it normal?"},
                                           {"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                                               + base64.b64encode(png()).decode()}}]}
    return json.dumps({"messages": [message], **fields}).encode()  # allow_nan: NaN is written as NaN


def test_chat_checks_model_and_sampling_fields():
    def parse(**fields) -> VQAItem:
        return asyncio.run(chat_item(chat_body(**fields), LIMITS, [], "stmed-tiny"))

    assert parse(model="stmed-tiny", temperature=0.7, top_p=1).question == "Is it normal?"
    assert parse().max_tokens == LIMITS.default_max_tokens  # no model: the one served (as vLLM's server does)
    unknown = refusal(lambda: parse(model="gpt-4o"))
    assert (unknown.status, unknown.code, unknown.param) == (404, "model_not_found", "model")
    assert "stmed-tiny" in unknown.message
    for field, value in (("temperature", float("nan")), ("temperature", -1), ("temperature", "hot"),
                         ("temperature", float("inf")), ("temperature", True), ("top_p", -5), ("top_p", 0)):
        error = refusal(lambda f=field, v=value: parse(**{f: v}))
        assert (error.status, error.param) == (400, field) and field in error.message, (field, value)


def test_n_must_be_the_integer_one():
    def parse(**fields) -> VQAItem:
        return asyncio.run(chat_item(chat_body(**fields), LIMITS, [], "stmed-tiny"))

    assert parse(n=1).question == "Is it normal?"
    for value in (True, 1.0, 2, "1", 0, [1]):
        error = refusal(lambda v=value: parse(n=v))
        assert (error.status, error.param) == (400, "n"), value


class _Headers:
    def __init__(self, authorization: str):
        self.headers = {"authorization": authorization}


def test_the_bearer_scheme_is_case_insensitive_and_the_key_is_not():
    """RFC 9110: the auth scheme is case-insensitive, so ``bearer`` and ``BEARER`` work; the key is exact."""
    digest = api_key_digest("sk-right")
    for scheme in ("Bearer", "bearer", "BEARER"):
        assert authorize(_Headers(f"{scheme} sk-right"), digest) is None
    for header in ("bearer sk-RIGHT", "Basic sk-right", "bearer", "sk-right"):
        with pytest.raises(APIError) as info:
            authorize(_Headers(header), digest)
        assert info.value.status == 401, header
