"""Gemma 3 (``Gemma3ForConditionalGeneration``, e.g. ``google/medgemma-4b-it``): SigLIP, a pooling projector, Gemma 3.

Differences from LLaVA and Qwen2.5-VL that the rest of the code meets only through this family record:

- **chat format** — Gemma's turns, with the assistant written ``model`` and the questioner a third role;
  Gemma has no system role, so its template writes the system prompt at the start of the first user turn::

      <bos><start_of_turn>user\\n{system}\\n\\n<start_of_image>Q1<end_of_turn>\\n
      <start_of_turn>model\\nA1<end_of_turn>\\n<start_of_turn>questioner\\nQ2<end_of_turn>\\n
      <start_of_turn>model\\nA2<end_of_turn>\\n

  Targets are ``A1<end_of_turn>``, ``Q2<end_of_turn>``, ``A2<end_of_turn>``; a prompt ends with the open
  ``<start_of_turn>model\\n`` (or ``questioner``). ``<end_of_turn>`` is the end-of-turn token (the
  release's tokenizer names ``<eos>`` its eos and lists both in ``generation_config.json``).
- **image tokens** — the processor writes an image placeholder ``<start_of_image>`` as
  ``\\n\\n<start_of_image>`` + ``mm_tokens_per_image`` × ``<image_soft_token>`` + ``<end_of_image>\\n\\n``
  (256 on the release: 896-px images, 14-px patches, pooled 4×4), the same count for every image.
- **attention** — an image's tokens attend to each other both ways (the processor's ``token_type_ids``
  mark them), and every other text layer attends within a sliding window. Training passes
  ``token_type_ids`` itself (``text_inputs``), and packed DPO pairs get both rules in their block mask
  (``packed_mask``), so a packed pair sees exactly what its separate sequences see.
- **modules** — vision tower ``vision_tower`` (SigLIP, blocks ``encoder.layers.N``: ``self_attn.q/k/v/out_proj``,
  ``mlp.fc1/fc2``, all read: the tower's last layer feeds the projector), projector
  ``multi_modal_projector`` (average pooling, RMS norm, one projection matrix), decoder ``language_model``.
  The LM head is tied to the embeddings; the release stores no ``lm_head``.

The ``tiny-gemma3`` preset: seeded random weights, the tiny byte-level BPE with Gemma's special tokens added
(``<bos>`` prepended, ``<end_of_turn>`` the eos, ``<pad>`` the pad), 64-px images in 8-px patches pooled
to 16 image tokens, and one sliding-window layer before one global layer, as the release alternates them.
"""

from __future__ import annotations

import torch
from PIL import Image
from tokenizers import AddedToken, Tokenizer, processors
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessorPil,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers import Gemma3Processor as HFGemma3Processor

from stmed.config import ConfigError
from stmed.log import get_logger
from stmed.model.families.base import Family, hf_model
from stmed.model.prompts import ASSISTANT, QUESTIONER, USER, ChatFormat
from stmed.model.tokenizer import TINY_TOKENIZER

log = get_logger(__name__)

BOS, EOS, PAD = "<bos>", "<eos>", "<pad>"
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
START_OF_IMAGE, END_OF_IMAGE, IMAGE_SOFT = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
SPECIAL_TOKENS = [PAD, EOS, BOS, START_OF_TURN, END_OF_TURN, START_OF_IMAGE, END_OF_IMAGE, IMAGE_SOFT]

GEMMA = ChatFormat(
    name="gemma", names={USER: "user", ASSISTANT: "model", QUESTIONER: "questioner"},
    header=START_OF_TURN + "user\n{system}\n\n", prefix=START_OF_TURN + "{role}\n",
    open_prefix=START_OF_TURN + "{role}\n", eos=END_OF_TURN, user_tail=END_OF_TURN + "\n", answer_tail="\n",
    question_tail="\n", image_token=IMAGE_SOFT, image_block=START_OF_IMAGE,
    image_text=f"\n\n{START_OF_IMAGE}{IMAGE_SOFT}{END_OF_IMAGE}\n\n", system_in_first_turn=True,
)  # fmt: skip
"""Gemma's turns with a third role, ``questioner``; the system prompt opens the first user turn."""

# The tiny preset: 64-px images in 8-px patches (8 x 8), average-pooled 2 x 2 -> 16 image tokens.
TINY_IMAGE_SIZE, TINY_PATCH_SIZE, TINY_IMAGE_TOKENS = 64, 8, 16
TINY_SLIDING_WINDOW = 24
"""Shorter than a tiny conversation, so the sliding-window layer really cuts (the release's: 1024)."""
SIGLIP_MEAN = SIGLIP_STD = [0.5, 0.5, 0.5]


class Gemma3Processor(HFGemma3Processor):
    """Transformers' Gemma 3 processor taking one image per text from a flat list, as every stmed engine passes
    them (the stock one reads a flat list as all images of the first text).

    Named like the stock class on purpose: ``save_pretrained`` writes ``"processor_class"`` from the class
    name, and an export must name the stock class so that transformers and vLLM load it as a release.
    """

    def __call__(self, images=None, text=None, **kwargs):
        if isinstance(text, list) and isinstance(images, list) and len(images) == len(text) \
                and all(isinstance(image, Image.Image) for image in images):  # fmt: skip
            images = [[image] for image in images]
        return super().__call__(images=images, text=text, **kwargs)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny preset's byte-level BPE with Gemma's special tokens added and ``<bos>`` prepended."""
    bpe = Tokenizer.from_file(str(TINY_TOKENIZER))
    bpe.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])
    bos_id = bpe.token_to_id(BOS)
    # Offsets must cover every character, leading spaces included (see stmed.model.tokenizer); <bos>'s is empty.
    bpe.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]),
    ])  # fmt: skip
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=BOS, eos_token=END_OF_TURN, pad_token=PAD,
        extra_special_tokens={"boi_token": START_OF_IMAGE, "eoi_token": END_OF_IMAGE, "image_token": IMAGE_SOFT},
        padding_side="right", model_max_length=4096, clean_up_tokenization_spaces=False,
    )  # fmt: skip


def build_tiny(seed: int = 0) -> tuple[Gemma3ForConditionalGeneration, Gemma3Processor]:
    """A sub-million-parameter Gemma 3 with seeded random weights and the tiny tokenizer."""
    tokenizer = tiny_tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    text = {
        "vocab_size": len(tokenizer), "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "max_position_embeddings": 4096,
        "sliding_window": TINY_SLIDING_WINDOW, "layer_types": ["sliding_attention", "full_attention"],
        "bos_token_id": ids[BOS], "eos_token_id": ids[END_OF_TURN], "pad_token_id": ids[PAD],
    }  # fmt: skip
    vision = {
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "image_size": TINY_IMAGE_SIZE, "patch_size": TINY_PATCH_SIZE, "vision_use_head": False,
    }  # fmt: skip
    config = Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=TINY_IMAGE_TOKENS,
        boi_token_index=ids[START_OF_IMAGE], eoi_token_index=ids[END_OF_IMAGE], image_token_index=ids[IMAGE_SOFT],
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Gemma3ForConditionalGeneration(config)
    model.generation_config.bos_token_id = ids[BOS]
    model.generation_config.eos_token_id = ids[END_OF_TURN]
    model.generation_config.pad_token_id = ids[PAD]
    model.eval()
    image_processor = Gemma3ImageProcessorPil(
        size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}, image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD,
    )  # fmt: skip
    return model, Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                  image_seq_length=TINY_IMAGE_TOKENS)  # fmt: skip


def load_processor(name_or_path: str) -> Gemma3Processor:
    """The checkpoint's processor with the PIL image processor, whether or not torchvision is installed."""
    return Gemma3Processor.from_pretrained(name_or_path, trust_remote_code=False, backend="pil")


def complete_processor(processor: HFGemma3Processor, raw: dict, where: str) -> None:
    """Gemma releases name ``<eos>`` their tokenizer's eos; a turn ends with ``<end_of_turn>``, which is
    what the chat format trains and what generation must stop on."""
    tokenizer = processor.tokenizer
    if tokenizer.eos_token != END_OF_TURN:
        log.info("%s: eos %s -> %s (the end of a Gemma turn)", where, tokenizer.eos_token, END_OF_TURN)
        tokenizer.eos_token = END_OF_TURN
    if tokenizer.pad_token is None:
        tokenizer.pad_token = PAD
        log.info("%s has no pad token: padding with %s", where, PAD)


def max_image_tokens(processor_or_model) -> int:
    """``mm_tokens_per_image``: every image is resized to one square and pooled to the same count."""
    if isinstance(processor_or_model, HFGemma3Processor):
        return processor_or_model.image_seq_length
    return hf_model(processor_or_model).config.mm_tokens_per_image


def image_inputs(processor: Gemma3Processor, images: list[Image.Image]) -> dict[str, torch.Tensor]:
    """``pixel_values`` (batch, 3, H, W) float32: resized to the square, rescaled, normalised (no pan-and-scan)."""
    if not images:
        raise ValueError("pixel_values: no images given")
    out = processor.image_processor(images=images, do_pan_and_scan=False, return_tensors="pt")
    return {"pixel_values": out["pixel_values"]}


def set_pixel_bounds(processor: Gemma3Processor, min_pixels: int | None, max_pixels: int | None) -> None:
    if min_pixels is not None or max_pixels is not None:
        raise ConfigError("model.min_pixels / model.max_pixels: Gemma 3 resizes every image to one square "
                          "(896 px on the release) and pools it to a fixed token count, so it has no pixel "
                          "bounds; leave both unset")  # fmt: skip


def text_positions(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   images: dict[str, torch.Tensor]) -> torch.Tensor:  # fmt: skip
    """``(B, L)``: Gemma 3 numbers every token of a right-padded row 0, 1, 2, … (image tokens included)."""
    return torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape[0], -1)


def text_inputs(model: PreTrainedModel, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """``token_type_ids``: 1 on image tokens, as the processor marks them. Without them Gemma 3 runs its
    image tokens causally, which is not the model the release was trained as."""
    return {"token_type_ids": (input_ids == hf_model(model).config.image_token_id).long()}


def packed_mask(model: PreTrainedModel, allowed: torch.Tensor, input_ids: torch.Tensor,
                positions: torch.Tensor) -> dict[str, torch.Tensor]:  # fmt: skip
    """The block mask with Gemma 3's two rules, per layer type (what its forward takes as a dict).

    ``full_attention``: the block mask, plus image token to image token both ways (one image per row, in
    the shared prompt, so no branch sees another's tokens through it). ``sliding_attention``: that, and a
    key at most ``sliding_window - 1`` positions back — counted in positions, not row indices, so the
    rejected branch's window is the one of its own unpacked sequence.
    """
    text = hf_model(model).config.get_text_config()
    image = input_ids == hf_model(model).config.image_token_id  # (B, L)
    full = allowed | (image[:, None, :, None] & image[:, None, None, :])
    distance = positions[:, :, None] - positions[:, None, :]  # (B, Lq, Lk)
    sliding = full & (distance < text.sliding_window)[:, None]
    return {"full_attention": full, "sliding_attention": sliding}


PUBLISHED_NAMES = (
    ("model.language_model.", "language_model.model."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "language_model.lm_head."),
)
"""The names of ``google/medgemma-4b-it``'s (and ``google/gemma-3-4b-it``'s) release, which vLLM reads; the
tied ``lm_head`` is not stored there."""

GEMMA3 = Family(
    name="gemma3", model_type="gemma3", model_class=Gemma3ForConditionalGeneration, processor_class=HFGemma3Processor,
    load_processor=load_processor, chat=GEMMA, preset="tiny-gemma3", build_tiny=build_tiny,
    complete_processor=complete_processor, image_tokens=lambda processor, _image: max_image_tokens(processor),
    max_image_tokens=max_image_tokens, image_inputs=image_inputs, vision_tower="vision_tower",
    vision_blocks="layers", projector="multi_modal_projector",
    # Gemma 3 reads the tower's last layer: every block feeds the projector.
    vision_blocks_used=lambda model: range(hf_model(model).config.vision_config.num_hidden_layers),
    vit_targets=("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"), set_pixel_bounds=set_pixel_bounds,
    text_positions=text_positions, published_names=PUBLISHED_NAMES, text_inputs=text_inputs,
    packed_mask=packed_mask,
)  # fmt: skip
