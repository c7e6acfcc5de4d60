"""Every model family through the same code: label masks, image tokens, LoRA groups, merged export.

Each test runs once per family's tiny preset (LLaVA-1.5 ``tiny``, Qwen2.5-VL ``tiny-qwen2.5-vl``, Gemma 3
``tiny-gemma3``, Qwen3-VL ``tiny-qwen3-vl``);
what a family renders differently is spelled out per family, what must hold for all is asserted alike.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from stmed.config import ConfigError, LoRAConfig, ModelConfig
from stmed.model.build import image_inputs, image_seq_len, image_tokens, load_model
from stmed.model.conversation import IGNORE_INDEX, LOSS_NONE, describe_targets, encode, render, to_turns
from stmed.model.families import FAMILIES, PRESETS, collate_images, family_of, forward_inputs
from stmed.model.lora import attach_lora, lora_targets, merge_and_export, param_groups
from stmed.model.prompts import DESCRIBE_QUESTION, SYSTEM_SQ, answer_prompt, question_prompt
from tests.helpers import perturb_trainable

PRESET_NAMES = ["tiny", "tiny-qwen2.5-vl", "tiny-gemma3", "tiny-qwen3-vl"]
LORA = LoRAConfig(llm_r=4, llm_alpha=8, vit_r=2, vit_alpha=4)
Q1, A1 = "What modality is used?", "This is a chest X-ray."
Q2, A2 = "Where is the lesion?", "The lesion is in the left lower lobe."
Q3, A3 = "Is there an effusion?", "No, the costophrenic angles are sharp."
CONVERSATION = [{"from": "human", "value": f"{Q1}\n<image>"}, {"from": "gpt", "value": A1},
                {"from": "human", "value": Q2}, {"from": "gpt", "value": A2},
                {"from": "human", "value": Q3}, {"from": "gpt", "value": A3}]  # fmt: skip
# Every decoded target run, per family: the answers and questions with their end-of-turn token; Vicuna's
# runs start with the space the model writes after "ASSISTANT:" / "VUSER:", ChatML's right after "\n".
TARGETS = {
    "tiny": [("qa", f" {A1}</s>"), ("vq", f" {Q2}</s>"), ("qa", f" {A2}</s>"), ("vq", f" {Q3}</s>"),
             ("qa", f" {A3}</s>")],
    "tiny-qwen2.5-vl": [("qa", f"{A1}<|im_end|>"), ("vq", f"{Q2}<|im_end|>"), ("qa", f"{A2}<|im_end|>"),
                        ("vq", f"{Q3}<|im_end|>"), ("qa", f"{A3}<|im_end|>")],
    "tiny-qwen3-vl": [("qa", f"{A1}<|im_end|>"), ("vq", f"{Q2}<|im_end|>"), ("qa", f"{A2}<|im_end|>"),
                      ("vq", f"{Q3}<|im_end|>"), ("qa", f"{A3}<|im_end|>")],
    "tiny-gemma3": [("qa", f"{A1}<end_of_turn>"), ("vq", f"{Q2}<end_of_turn>"), ("qa", f"{A2}<end_of_turn>"),
                    ("vq", f"{Q3}<end_of_turn>"), ("qa", f"{A3}<end_of_turn>")],
}  # fmt: skip
RENDERED = {
    "tiny": f"{SYSTEM_SQ} USER: <image>\n{Q1} ASSISTANT: {A1}</s>VUSER: {Q2}</s> ASSISTANT: {A2}</s>"
            f"VUSER: {Q3}</s> ASSISTANT: {A3}</s>",
    "tiny-qwen2.5-vl": f"<|im_start|>system\n{SYSTEM_SQ}<|im_end|>\n<|im_start|>user\n"
                       f"<|vision_start|><|image_pad|><|vision_end|>{Q1}<|im_end|>\n"
                       f"<|im_start|>assistant\n{A1}<|im_end|>\n<|im_start|>questioner\n{Q2}<|im_end|>\n"
                       f"<|im_start|>assistant\n{A2}<|im_end|>\n<|im_start|>questioner\n{Q3}<|im_end|>\n"
                       f"<|im_start|>assistant\n{A3}<|im_end|>\n",
    "tiny-qwen3-vl": f"<|im_start|>system\n{SYSTEM_SQ}<|im_end|>\n<|im_start|>user\n"
                     f"<|vision_start|><|image_pad|><|vision_end|>{Q1}<|im_end|>\n"
                     f"<|im_start|>assistant\n{A1}<|im_end|>\n<|im_start|>questioner\n{Q2}<|im_end|>\n"
                     f"<|im_start|>assistant\n{A2}<|im_end|>\n<|im_start|>questioner\n{Q3}<|im_end|>\n"
                     f"<|im_start|>assistant\n{A3}<|im_end|>\n",
    # Gemma has no system role: the system prompt opens the first user turn, which holds the image.
    "tiny-gemma3": f"<start_of_turn>user\n{SYSTEM_SQ}\n\n<start_of_image>{Q1}<end_of_turn>\n"
                   f"<start_of_turn>model\n{A1}<end_of_turn>\n<start_of_turn>questioner\n{Q2}<end_of_turn>\n"
                   f"<start_of_turn>model\n{A2}<end_of_turn>\n<start_of_turn>questioner\n{Q3}<end_of_turn>\n"
                   f"<start_of_turn>model\n{A3}<end_of_turn>\n",
}  # fmt: skip
OPEN_ANSWER = {"tiny": "ASSISTANT:", "tiny-qwen2.5-vl": "<|im_start|>assistant\n",
               "tiny-gemma3": "<start_of_turn>model\n", "tiny-qwen3-vl": "<|im_start|>assistant\n"}  # fmt: skip


@pytest.fixture(scope="module", params=PRESET_NAMES)
def tiny(request):
    model, processor = load_model(ModelConfig(preset=request.param))
    return request.param, model, processor


def _image(seed: int, size: tuple[int, int] = (64, 64)) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def _encoded(processor, image: Image.Image, sq_ratio: float = 1.0):
    family = family_of(processor)
    turns = to_turns(CONVERSATION, sq_ratio, random.Random(0))
    rendered = render(turns, SYSTEM_SQ, family.chat)
    return rendered, encode(rendered, processor.tokenizer, image_tokens(processor, image), 1024, family.chat)


def _logits(model, batch) -> torch.Tensor:
    """Logits as training computes them: the family's positions and per-token inputs (Qwen3-VL refuses an
    image batch without them)."""
    model.eval()
    with torch.no_grad():
        return model(**forward_inputs(model, batch)).logits


def _batch(processor, image: Image.Image) -> dict[str, torch.Tensor]:
    _, item = _encoded(processor, image)
    ids = torch.tensor([item.input_ids])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), **image_inputs(processor, [image])}


# ----------------------------------------------------------------------------- selection


def test_every_family_has_a_preset_and_is_selected_by_model_type(tiny):
    preset, model, processor = tiny
    family = PRESETS[preset]
    assert family_of(model) is family_of(processor) is family is FAMILIES[model.config.model_type]
    assert isinstance(model, family.model_class)
    assert family_of(attach_lora(load_model(ModelConfig(preset=preset))[0], LORA)) is family  # through PEFT


def test_unknown_preset_and_model_type_are_refused_by_name():
    with pytest.raises(ConfigError, match="tiny-qwen2.5-vl"):
        load_model(ModelConfig(preset="nope"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a supported family"):
        family_of({"model_type": "paligemma"})


# ----------------------------------------------------------------------------- label masks


def test_rendering_with_the_three_roles(tiny):
    preset, _, processor = tiny
    rendered, _ = _encoded(processor, _image(0))
    assert rendered.text == RENDERED[preset]


def test_label_mask_decodes_to_every_answer_and_question_exactly(tiny):
    preset, _, processor = tiny
    image = _image(0)
    _, item = _encoded(processor, image)
    assert describe_targets(item, processor.tokenizer) == TARGETS[preset]
    targets = [i for i, label in enumerate(item.labels) if label != IGNORE_INDEX]
    assert all(item.labels[i] == item.input_ids[i] for i in targets)
    assert [i for i, kind in enumerate(item.loss_kind) if kind != LOSS_NONE] == targets
    image_id = processor.tokenizer.convert_tokens_to_ids(family_of(processor).chat.image_token)
    assert item.input_ids.count(image_id) == image_tokens(processor, image)
    assert all(item.labels[i] == IGNORE_INDEX for i, t in enumerate(item.input_ids) if t == image_id)


def test_encoded_ids_equal_what_the_processor_makes_of_the_same_text(tiny):
    """Our image expansion and the family's processor agree token for token (HF inference uses the latter)."""
    _, _, processor = tiny
    image = _image(1, (64, 48))
    rendered, item = _encoded(processor, image)
    ids = processor(text=[rendered.text], images=[image], return_tensors="pt")["input_ids"][0].tolist()
    assert ids == item.input_ids


def test_prompts_end_where_the_model_continues_like_training_text(tiny):
    preset, _, processor = tiny
    chat = family_of(processor).chat
    described = [{"from": "human", "value": f"<image>\n{DESCRIBE_QUESTION}"}, *CONVERSATION[1:]]
    rendered = render(to_turns(described, 1.0, random.Random(0)), SYSTEM_SQ, chat)
    prompt = question_prompt(A1, chat=chat)
    assert rendered.text.startswith(prompt) and rendered.text[len(prompt):].startswith(chat.lead + Q2)
    assert answer_prompt(Q1, chat=chat).endswith(OPEN_ANSWER[preset])


def test_image_token_count_follows_the_processor(tiny):
    preset, model, processor = tiny
    small, large = image_tokens(processor, _image(0, (64, 32))), image_tokens(processor, _image(0, (96, 96)))
    if preset == "tiny":  # LLaVA crops every image to one size
        assert small == large == image_seq_len(processor) == image_seq_len(model) == 64
    elif preset == "tiny-gemma3":  # Gemma 3 resizes to one square and pools to mm_tokens_per_image
        assert small == large == image_seq_len(processor) == image_seq_len(model) == 16
    else:  # Qwen2.5-VL: 16 px per token side within [min_pixels, max_pixels]
        assert (small, large) == (8, 16) and image_seq_len(processor) == 16
        grid = image_inputs(processor, [_image(0, (64, 32))])["image_grid_thw"]
        assert grid.tolist() == [[1, 4, 8]]


def test_pixel_bounds_set_the_image_token_budget():
    _, processor = load_model(ModelConfig(preset="tiny-qwen2.5-vl", max_pixels=32 * 32))
    assert image_seq_len(processor) == 4 == image_tokens(processor, _image(0, (96, 96)))
    with pytest.raises(ConfigError, match="LLaVA-1.5 resizes and crops"):
        load_model(ModelConfig(preset="tiny", max_pixels=64 * 64))
    with pytest.raises(ConfigError, match="Gemma 3 resizes every image"):
        load_model(ModelConfig(preset="tiny-gemma3", min_pixels=32 * 32))
    with pytest.raises(ConfigError, match="model.min_pixels"):
        ModelConfig(preset="tiny-qwen2.5-vl", min_pixels=64 * 64, max_pixels=32 * 32)
    with pytest.raises(ConfigError, match="one merged patch"):
        load_model(ModelConfig(preset="tiny-qwen2.5-vl", min_pixels=8, max_pixels=8))


def test_images_of_different_sizes_batch(tiny):
    """Two images of different sizes in one forward pass (per-image token counts, Qwen's grids)."""
    _, model, processor = tiny
    images = [_image(0, (64, 64)), _image(1, (64, 32))]
    rows = [_encoded(processor, image)[1] for image in images]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r.input_ids + [processor.tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    batch = {"input_ids": ids, "attention_mask": mask,
             **collate_images([image_inputs(processor, [image]) for image in images])}  # fmt: skip
    logits = _logits(model, batch)
    alone = _logits(model, _batch(processor, images[1]))
    torch.testing.assert_close(logits[1, : len(rows[1])], alone[0], atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- LoRA groups and export


def test_lora_groups_are_the_llm_linears_the_vision_blocks_and_the_projector(tiny):
    preset, _, _ = tiny
    model, _ = load_model(ModelConfig(preset=preset))
    family = family_of(model)
    llm, vit = lora_targets(model, LORA)
    assert llm and all(".language_model." in name for name in llm)
    assert vit and all(family.is_vision(name) and f".{family.vision_blocks}." in name for name in vit)
    assert {name.split(".")[-1] for name in vit} == set(family.vit_targets)
    peft_model = attach_lora(model, LORA)
    groups = {g["name"]: sum(p.numel() for p in g["params"]) for g in param_groups(peft_model, 1.0, 2.0, 3.0)}
    assert set(groups) == {"llm_lora", "vit_lora", "projector"}
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert all("lora_" in n or f".{family.projector}." in n for n in trainable)


def test_gradients_reach_every_group(tiny):
    preset, _, processor = tiny
    peft_model = attach_lora(load_model(ModelConfig(preset=preset))[0], LORA)
    perturb_trainable(peft_model)  # LoRA B starts at zero: A would get no gradient
    batch = _batch(processor, _image(0))
    peft_model.train()
    out = peft_model(**forward_inputs(peft_model, batch), labels=batch["input_ids"])
    out.loss.backward()
    got = {g["name"]: any(p.grad is not None and p.grad.abs().sum() > 0 for p in g["params"])
           for g in param_groups(peft_model, 1.0, 1.0, 1.0)}  # fmt: skip
    assert got == {"llm_lora": True, "vit_lora": True, "projector": True}


def test_merged_export_loads_back_with_logits_of_base_plus_adapter(tiny, tmp_path: Path):
    preset, _, processor = tiny
    peft_model = attach_lora(load_model(ModelConfig(preset=preset))[0], LORA)
    batch = _batch(processor, _image(2, (64, 48)))
    with peft_model.disable_adapter():
        base_logits = _logits(peft_model, batch)
    perturb_trainable(peft_model)
    peft_logits = _logits(peft_model, batch)
    assert not torch.allclose(peft_logits, base_logits, atol=1e-3)
    out = merge_and_export(peft_model, processor, tmp_path / "merged")
    merged, loaded_processor = load_model(ModelConfig(name_or_path=str(out)))
    assert family_of(merged) is family_of(loaded_processor) is PRESETS[preset]
    assert not any("lora" in n or "modules_to_save" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged, batch), peft_logits, atol=1e-5, rtol=1e-5)
    # The reloaded processor encodes exactly as the original one.
    assert _encoded(loaded_processor, _image(2, (64, 48)))[1] == _encoded(processor, _image(2, (64, 48)))[1]


def test_training_positions_are_the_ones_the_processor_path_uses(tiny):
    """A training batch built from our own encoding carries no ``mm_token_type_ids``; with the family's
    explicit positions its logits equal those of the processor's inputs (M-RoPE for Qwen2.5-VL)."""
    name, model, processor = tiny
    image, prompt = _image(4, (64, 48)), answer_prompt(Q1, chat=family_of(processor).chat)
    reference = processor(text=[prompt], images=[image], return_tensors="pt")
    model.eval()
    with torch.no_grad():
        expected = model(**reference).logits
        # What collate() builds: no mm_token_type_ids (Qwen), no token_type_ids (Gemma 3).
        batch = {k: v for k, v in reference.items() if k not in ("mm_token_type_ids", "token_type_ids")}
        got = model(**forward_inputs(model, batch)).logits
        if name == "tiny-qwen3-vl":  # Qwen3-VL refuses to guess its positions
            with pytest.raises(ValueError, match="mm_token_type_ids"):
                model(**batch)
            return
        implicit = model(**batch).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    if name != "tiny":  # Qwen without explicit positions: 1D, not M-RoPE; Gemma 3 without token types:
        assert not torch.allclose(implicit, expected, atol=1e-4)  # its image tokens attend causally only
