"""One prompt for every serving engine: the vLLM app's chat template renders a request exactly as the
HF endpoint's path does (``chat_parts`` then ``prompts.answer_prompt``). vLLM is not needed: its engine
arguments are built here and the template rendered the way vLLM renders it, with the tokenizer's
``apply_chat_template`` and the OpenAI content format (image parts become ``{"type": "image"}``)."""

from __future__ import annotations

import pytest

from actors.serve import vllm_engine_kwargs
from jobs.serve import ServeConfig
from stmed.config import build_config, read_yaml
from stmed.model.build import build_tiny
from stmed.model.prompts import answer_prompt
from stmed.serve.contract import chat_parts
from tests.checkpoints import build_llava_hf
from tests.jobs.test_serve import LOCAL

IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
REQUESTS = [
    [{"role": "user", "content": [IMAGE, {"type": "text", "text": "Is there a lesion?"}]}],
    [
        {"role": "system", "content": "You are a radiologist."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "  Which organ"},
                IMAGE,
                {"type": "text", "text": "is shown? "},
            ],
        },
    ],
    [
        {"role": "user", "content": [IMAGE, {"type": "text", "text": "First question?"}]},
        {"role": "assistant", "content": "An answer."},
        {"role": "user", "content": [IMAGE, {"type": "text", "text": 'What\'s the "side"\\n of it?'}]},
    ],
]


def _as_vllm_sends(messages: list[dict]) -> list[dict]:
    """The messages as vLLM hands an "openai"-format template: image parts reduced to their type."""
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            content = [{"type": "image"} if p["type"] == "image_url" else p for p in content]
        out.append({**message, "content": content})
    return out


@pytest.fixture(scope="module", params=["tiny", "llava-hf"])
def tokenizer(request, tmp_path_factory):
    if request.param == "tiny":
        return build_tiny(0)[1].tokenizer
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(build_llava_hf(tmp_path_factory.mktemp("llava-hf")))


@pytest.mark.parametrize("messages", REQUESTS)
def test_vllm_and_hf_build_the_identical_prompt(tokenizer, messages):
    cfg = build_config(ServeConfig, read_yaml(LOCAL), ["output_dir=unused"])
    kwargs = vllm_engine_kwargs("bfloat16", cfg.replica)
    assert kwargs["chat_template_content_format"] == "openai"
    vllm_prompt = tokenizer.apply_chat_template(_as_vllm_sends(messages), chat_template=kwargs["chat_template"],
                                                tokenize=False, add_generation_prompt=True)  # fmt: skip
    hf_prompt = answer_prompt(chat_parts(messages)[0])
    # vLLM's chat endpoint tokenizes the rendered text without special tokens: the template writes <s>.
    assert vllm_prompt == tokenizer.bos_token + hf_prompt
    vllm_ids = tokenizer(vllm_prompt, add_special_tokens=False)["input_ids"]
    assert vllm_ids == tokenizer(hf_prompt)["input_ids"] and vllm_ids[0] == tokenizer.bos_token_id
    assert vllm_prompt.count("<image>") == 1 and vllm_prompt.endswith(" ASSISTANT:")


def test_a_family_without_a_bos_token_gets_none_in_the_served_template():
    from stmed.model.families.qwen2_5_vl import CHATML
    from stmed.model.families.qwen2_5_vl import build_tiny as build_tiny_qwen
    from stmed.model.prompts import serving_chat_template

    tokenizer = build_tiny_qwen(0)[1].tokenizer
    assert tokenizer.bos_token is None
    rendered = tokenizer.apply_chat_template(_as_vllm_sends(REQUESTS[0]), chat_template=serving_chat_template(
        chat=CHATML), tokenize=False, add_generation_prompt=True)  # fmt: skip
    assert rendered == answer_prompt(chat_parts(REQUESTS[0])[0], chat=CHATML)


def test_qwen_served_on_vllm_takes_one_image_no_video_and_a_bounded_length(tmp_path):
    """Without a max_model_len vLLM would profile Qwen2.5-VL's 128k context, and video inputs that never come."""
    from benchmarks.engine_parity import export_preset

    path = str(export_preset("tiny-qwen2.5-vl", tmp_path / "qwen"))
    cfg = build_config(ServeConfig, read_yaml(LOCAL), ["output_dir=unused"])
    kwargs = vllm_engine_kwargs("bfloat16", cfg.replica, model_path=path)
    assert kwargs["limit_mm_per_prompt"] == {"image": 1, "video": 0} and kwargs["max_model_len"] == 4096
    assert kwargs["generation_config"] == "vllm"  # the explicit sampling, not generation_config.json's
