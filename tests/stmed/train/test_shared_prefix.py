"""Shared-prefix DPO: packed pairs give the log-probs (and gradients) of separate sequences, per family.

Every family runs twice: its tiny preset, and its real-layout checkpoint built from ``../shared/fixtures``
(LLaVA-1.5: a 336-px CLIP tower, 576 image tokens; Qwen2.5-VL: the release's tokenizer and 14-px patches),
which skips cleanly without that folder.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from stmed.config import ModelConfig
from stmed.data.pairs import collate_pairs, collate_shared_pairs, encode_pair
from stmed.data.records import PreferencePair
from stmed.model.build import image_inputs, load_model
from stmed.model.conversation import IGNORE_INDEX, Encoded
from stmed.model.families import family_of
from stmed.model.packing import CHOSEN, PAD, REJECTED, SHARED, block_attention_mask, pack_pair, shared_length
from stmed.train.dpo import DPOLoRAConfig, can_share_prefix, chosen_labels, forward_logps, reference_logps
from stmed.train.stage import make_trainable
from tests.checkpoints import build_llava_hf, build_qwen2_5_vl
from tests.helpers import perturb_trainable

LORA = DPOLoRAConfig(llm_r=4, llm_alpha=8, vit_r=2, vit_alpha=4)
# Answers of different lengths, two that start alike (their common tokens are still each branch's own
# targets), and questions of different lengths so the packed rows pad differently.
PAIRS = [
    ("Is there a lesion?", "Yes, there is a lesion in the left lung.", "No."),
    (
        "What organ is shown in this image?",
        "The lung.",
        "This is a brain MRI with a large lesion on the right.",
    ),
    ("Is the image normal?", "Yes, the image is normal.", "Yes, there is a mass."),
]


def _encoded(ids: list[int], targets_from: int) -> Encoded:
    labels = [IGNORE_INDEX] * targets_from + ids[targets_from:]
    return Encoded(ids, labels, [0] * len(ids))


def test_a_pair_packs_its_common_prompt_once_and_both_branches_after_it():
    chosen, rejected = _encoded([1, 2, 3, 4, 10, 11, 12], 4), _encoded([1, 2, 3, 4, 20, 21], 4)
    packed = pack_pair(chosen, rejected)
    assert shared_length(chosen, rejected) == 4
    assert packed.input_ids == [1, 2, 3, 4, 10, 11, 12, 4, 20, 21]
    assert packed.segments == [SHARED] * 3 + [CHOSEN] * 4 + [REJECTED] * 3
    assert packed.branch_start == 3
    assert packed.chosen_labels == [IGNORE_INDEX] * 4 + [10, 11, 12] + [IGNORE_INDEX] * 3
    assert packed.rejected_labels == [IGNORE_INDEX] * 8 + [20, 21]


def test_the_shared_prefix_stops_before_the_first_target_even_when_answers_start_alike():
    chosen, rejected = _encoded([1, 2, 3, 7, 8, 9], 3), _encoded([1, 2, 3, 7, 8, 5], 3)
    assert shared_length(chosen, rejected) == 3  # 7 and 8 are targets of both: each branch scores its own
    assert pack_pair(chosen, rejected).rejected_labels[-4:] == [IGNORE_INDEX, 7, 8, 5]


def test_the_block_mask_lets_each_branch_see_the_prompt_and_itself_only():
    segments = torch.tensor([[SHARED, SHARED, CHOSEN, CHOSEN, REJECTED, REJECTED, PAD]])
    allowed = block_attention_mask(segments)[0, 0]
    assert allowed[3].tolist() == [True, True, True, True, False, False, False]  # chosen: prompt + itself
    assert allowed[5].tolist() == [True, True, False, False, True, True, False]  # rejected skips chosen
    assert allowed[6].tolist() == [False] * 6 + [True]  # padding sees only itself: no empty softmax row
    additive = block_attention_mask(segments, torch.float32)[0, 0]
    assert additive[5, 2] == torch.finfo(torch.float32).min and additive[5, 1] == 0


def _models():
    yield "tiny", lambda _: ModelConfig(preset="tiny")
    yield "tiny-qwen2.5-vl", lambda _: ModelConfig(preset="tiny-qwen2.5-vl")
    yield "tiny-gemma3", lambda _: ModelConfig(preset="tiny-gemma3")
    yield "tiny-qwen3-vl", lambda _: ModelConfig(preset="tiny-qwen3-vl")
    yield "llava-1.5-7b-hf-shrunk", lambda tmp: ModelConfig(name_or_path=str(build_llava_hf(tmp / "m")))
    yield "qwen2.5-vl-7b-shrunk", lambda tmp: ModelConfig(name_or_path=str(build_qwen2_5_vl(tmp / "m")),
                                                          max_pixels=112 * 112)  # fmt: skip


MODELS = dict(_models())


@pytest.fixture(scope="module", params=list(MODELS))
def policy(request, tmp_path_factory):
    """A LoRA policy with perturbed adapters (so policy and reference differ), its processor and a batch."""
    torch.manual_seed(0)
    model, processor = load_model(MODELS[request.param](tmp_path_factory.mktemp(request.param)))
    peft_model = make_trainable(model, LORA, gradient_checkpointing=False, upcast=False)
    perturb_trainable(peft_model)
    family = family_of(processor)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for size in (64, 80, 96)]
    items = []
    for i, (question, chosen, rejected) in enumerate(PAIRS):
        pair = PreferencePair(pair_id=str(i), image="x.png", question=question, chosen=chosen, rejected=rejected,
                              chosen_score=8.0, rejected_score=3.0, judge_model="judge")  # fmt: skip
        seq_len = family.image_tokens(processor, images[i])
        encoded = encode_pair(pair, processor.tokenizer, seq_len, 2048, chat=family.chat)
        items.append((i, *encoded, image_inputs(processor, [images[i]])))
    pad = processor.tokenizer.pad_token_id
    return request.param, peft_model, collate_pairs(items, pad), collate_shared_pairs(items, pad)


def test_packed_pairs_give_the_separate_sequences_log_probs(policy):
    name, peft_model, separate, packed = policy
    assert can_share_prefix(peft_model) is None
    assert packed["input_ids"].numel() < separate["input_ids"].numel() * 0.75, name
    peft_model.eval()  # no dropout: both layouts see the same function
    with torch.no_grad():
        expected, got = forward_logps(peft_model, separate), forward_logps(peft_model, packed)
        ref_expected, ref_got = reference_logps(peft_model, separate), reference_logps(peft_model, packed)
    assert got.shape == expected.shape == (2 * len(PAIRS),)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref_got, ref_expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, ref_got, atol=1e-3)  # the policy is not the reference: a real check
    assert torch.equal(chosen_labels(packed) != IGNORE_INDEX, packed["labels"] != IGNORE_INDEX)
    assert (chosen_labels(separate) != IGNORE_INDEX).sum() == (chosen_labels(packed) != IGNORE_INDEX).sum()


def test_packed_pairs_give_the_separate_sequences_gradients(policy):
    name, peft_model, separate, packed = policy
    peft_model.eval()
    trainable = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]

    def grads(batch) -> dict[str, torch.Tensor]:
        peft_model.zero_grad(set_to_none=True)
        chosen, rejected = forward_logps(peft_model, batch).chunk(2)
        (chosen - 0.5 * rejected).sum().backward()
        return {n: p.grad.clone() for n, p in trainable if p.grad is not None}

    expected, got = grads(separate), grads(packed)
    assert set(got) == set(expected) and len(got) > 0
    vision = [n for n in got if family_of(peft_model).is_vision(n)]
    assert vision, f"{name}: no ViT LoRA gradient"
    for n in got:
        torch.testing.assert_close(got[n], expected[n], atol=1e-5, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")


def test_a_kernel_without_custom_masks_falls_back_to_separate_sequences(policy):
    _, peft_model, _, _ = policy
    config = peft_model.get_base_model().config
    text = getattr(config, "text_config", config)
    saved = text._attn_implementation
    try:
        text._attn_implementation = "flash_attention_2"
        assert "flash_attention_2" in can_share_prefix(peft_model)
    finally:
        text._attn_implementation = saved


def test_a_family_that_cannot_share_says_so(policy, monkeypatch):
    _, peft_model, _, _ = policy
    family = family_of(peft_model)
    monkeypatch.setattr(
        "stmed.train.dpo.family_of", lambda _: dataclasses.replace(family, shares_prefix=False)
    )
    assert "does not support packed pairs" in can_share_prefix(peft_model)
