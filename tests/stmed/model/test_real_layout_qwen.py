"""The Qwen2.5-VL family on a checkpoint in the published Qwen/Qwen2.5-VL-7B-Instruct layout: the real
byte-level BPE tokenizer, chat template and processor. Label masks exact, our ChatML equal to what the
release's own template renders, image tokens as its processor expands them, LoRA on the published module
names, and a merged export in the published layout. Skipped when ``../shared/fixtures`` is absent."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from stmed.config import LoRAConfig, ModelConfig
from stmed.model.build import image_inputs, image_tokens, load_model
from stmed.model.conversation import IGNORE_INDEX, describe_targets, encode, render, to_turns
from stmed.model.families import QWEN2_5_VL, family_of, image_kwargs
from stmed.model.lora import attach_lora, lora_targets, merge_and_export
from stmed.model.prompts import SYSTEM_SQ, answer_prompt
from tests.checkpoints import build_qwen2_5_vl
from tests.helpers import perturb_trainable

CONVERSATION = [
    {"from": "human", "value": "<image>\nWhat modality is this?"},
    {"from": "gpt", "value": "This is a chest X-ray."},
    {"from": "human", "value": "Where is the lesion?"},
    {"from": "gpt", "value": "The lesion is in the left lower lobe."},
    {"from": "human", "value": "Is there an effusion?"},
    {"from": "gpt", "value": "No, the costophrenic angles are sharp."},
]
IMAGE = Image.new("RGB", (112, 84), (90, 120, 150))  # 112x84 px in 28-px merged patches: 4 x 3 = 12 tokens


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return build_qwen2_5_vl(tmp_path_factory.mktemp("qwen2.5-vl"))


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load_model(ModelConfig(name_or_path=str(checkpoint)))


def _encoded(processor):
    turns = to_turns(CONVERSATION, sq_ratio=1.0, rng=random.Random(0))
    rendered = render(turns, SYSTEM_SQ, QWEN2_5_VL.chat)
    return rendered, encode(rendered, processor.tokenizer, image_tokens(processor, IMAGE), 1024, QWEN2_5_VL.chat)


def test_the_published_checkpoint_is_the_qwen_family(loaded):
    model, processor = loaded
    assert family_of(model) is family_of(processor) is QWEN2_5_VL
    assert processor.tokenizer.convert_tokens_to_ids("<|image_pad|>") == 151655 == model.config.image_token_id
    assert processor.tokenizer.eos_token == "<|im_end|>" and processor.tokenizer.pad_token == "<|endoftext|>"


def test_label_masks_are_exact_with_the_released_tokenizer(loaded):
    _, processor = loaded
    _, encoded = _encoded(processor)
    assert image_tokens(processor, IMAGE) == 12 and encoded.input_ids.count(151655) == 12
    assert describe_targets(encoded, processor.tokenizer) == [
        ("qa", "This is a chest X-ray.<|im_end|>"),
        ("vq", "Where is the lesion?<|im_end|>"),
        ("qa", "The lesion is in the left lower lobe.<|im_end|>"),
        ("vq", "Is there an effusion?<|im_end|>"),
        ("qa", "No, the costophrenic angles are sharp.<|im_end|>"),
    ]
    # Everything else is context: system prompt, role headers (questioner's too), image, first question.
    off = processor.tokenizer.decode([t for t, label in zip(encoded.input_ids, encoded.labels)
                                      if label == IGNORE_INDEX])  # fmt: skip
    assert off.count("<|im_start|>questioner\n") == 2 and off.count("<|im_start|>assistant\n") == 3
    assert off.count("<|image_pad|>") == 12 and SYSTEM_SQ in off and "What modality is this?" in off


def test_our_chatml_is_what_the_releases_template_renders(loaded):
    """The answer prompt, with our system prompt, is the release's own chat template with a generation prompt."""
    _, processor = loaded
    question = "Is there a nodule?"
    messages = [{"role": "system", "content": SYSTEM_SQ},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]  # fmt: skip
    theirs = processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert answer_prompt(question, chat=QWEN2_5_VL.chat) == theirs


def test_image_expansion_matches_the_released_processor(loaded):
    _, processor = loaded
    rendered, encoded = _encoded(processor)
    ids = processor(text=[rendered.text], images=[IMAGE], return_tensors="pt")["input_ids"][0].tolist()
    assert ids == encoded.input_ids


def test_lora_groups_use_the_published_module_names_and_the_export_keeps_the_layout(checkpoint, loaded,
                                                                                   tmp_path: Path):  # fmt: skip
    model, processor = load_model(ModelConfig(name_or_path=str(checkpoint)))
    lora = LoRAConfig(llm_r=2, llm_alpha=4, vit_r=2, vit_alpha=4)
    llm, vit = lora_targets(model, lora)
    assert len(llm) == 2 * 7 and len(vit) == 2 * 5  # 2 decoder layers x 7 linears, 2 ViT blocks x 5
    peft_model = attach_lora(model, lora)
    perturb_trainable(peft_model)
    _, encoded = _encoded(processor)
    ids = torch.tensor([encoded.input_ids])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), **image_inputs(processor, [IMAGE])}
    peft_model.eval()
    with torch.no_grad():
        want = peft_model(**batch).logits
    out = merge_and_export(peft_model, processor, tmp_path / "merged")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        exported = set(f.keys())
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as f:
        assert exported == set(f.keys())  # the published names: transformers and vLLM load it as a release
    merged, reloaded = load_model(ModelConfig(name_or_path=str(out)))
    with torch.no_grad():
        got = merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     **image_kwargs(batch)).logits  # fmt: skip
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert reloaded.image_processor.size["longest_edge"] == processor.image_processor.size["longest_edge"]
