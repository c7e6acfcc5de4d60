"""Frozen features of a rated answer, from the policy's own checkpoint (METHOD §7).

BioMed-VITAL rates samples from frozen BiomedCLIP embeddings; stmed has a model of its own that has seen the
images and the questions: the policy's merged checkpoint (stage 1's or a round's). An answer is rendered as
DPO renders it (``answer_prompt`` under the plain system prompt + the answer, ``encode_prompt_answer``) and
run once through that model, frozen, in eval mode and without gradients. Its features are

- **image**: the projector's output for the image, mean-pooled over the image tokens — read as the
  language model's input embeddings at the image positions (``hidden_states[0]``), where every family
  has scattered its projector output, so no family-specific call is needed;
- **answer**: the language model's last hidden state (after its final norm), mean-pooled over the answer
  tokens (the ``encode_prompt_answer`` targets: the answer and its end-of-turn token).

Concatenated: ``(2 * hidden_size,)`` per answer. They never change for a given checkpoint, so the stage
computes them once and caches them (``features.safetensors``, keyed by the checkpoint and the answers);
training the head on top then costs seconds.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from stmed.data.images import ImageLoadError, load_image
from stmed.model.build import image_inputs
from stmed.model.conversation import IGNORE_INDEX, collate, encode_prompt_answer
from stmed.model.families import collate_images, family_of, forward_inputs, hf_model
from stmed.model.prompts import SYSTEM_PLAIN, answer_prompt
from stmed.selection.pairs import Answer


def feature_dim(model: nn.Module) -> int:
    """Width of one answer's features: image and answer pools of the language model's hidden size."""
    config = hf_model(model).config
    text = getattr(config, "text_config", config)
    return 2 * int(text.hidden_size)


def _encode(answer: Answer, processor, image_root: Path, max_length: int, system: str):
    """``(encoded, image inputs)`` of one answer, or the reason it cannot be rated."""
    try:
        image = load_image(image_root / answer.image)
    except ImageLoadError as err:
        return f"image: {err.reason}"
    family = family_of(processor)
    prompt = answer_prompt(answer.question, system=system, chat=family.chat)
    try:
        encoded = encode_prompt_answer(prompt, answer.answer, processor.tokenizer,
                                       family.image_tokens(processor, image), max_length, family.chat)  # fmt: skip
    except ValueError as err:
        return f"encode: {err}"
    if encoded.num_targets == 0:
        return f"too_long: no answer token within max_length={max_length}"
    return encoded, image_inputs(processor, [image])


@torch.no_grad()
def extract_features(model: nn.Module, processor, answers: list[Answer], image_root: str | Path,
                     max_length: int = 2048, batch_size: int = 8,
                     system: str = SYSTEM_PLAIN) -> tuple[dict[str, torch.Tensor], dict[str, str]]:  # fmt: skip
    """``({answer_id: (2 * hidden,) float32 features}, {answer_id: why it was skipped})``.

    ``model`` is left exactly as it was (eval mode is restored, nothing is written); batches are cut in
    the order given, right-padded, so an answer's features depend only on its own tokens.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    image_id = hf_model(model).config.image_token_id
    features, skipped, ready = {}, {}, []
    for answer in answers:
        encoded = _encode(answer, processor, Path(image_root), max_length, system)
        if isinstance(encoded, str):
            skipped[answer.answer_id] = encoded
        else:
            ready.append((answer.answer_id, *encoded))
    try:
        for start in range(0, len(ready), batch_size):
            chunk = ready[start : start + batch_size]
            batch = collate([enc for _, enc, _ in chunk], processor.tokenizer.pad_token_id)
            batch.update(collate_images([images for _, _, images in chunk]))
            batch = {k: v.to(device) for k, v in batch.items()}
            out = model(**forward_inputs(model, batch), output_hidden_states=True, logits_to_keep=1)
            embeds, last = out.hidden_states[0].float(), out.hidden_states[-1].float()  # (B, L, H) each
            image_mask = (batch["input_ids"] == image_id).unsqueeze(-1).float()
            answer_mask = (batch["labels"] != IGNORE_INDEX).unsqueeze(-1).float()
            image_pool = (embeds * image_mask).sum(1) / image_mask.sum(1).clamp(min=1)
            answer_pool = (last * answer_mask).sum(1) / answer_mask.sum(1).clamp(min=1)
            for (answer_id, _, _), row in zip(chunk, torch.cat([image_pool, answer_pool], dim=-1).cpu()):
                features[answer_id] = row.clone()
    finally:
        model.train(was_training)
    return features, skipped
