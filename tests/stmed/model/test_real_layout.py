"""The model layer on checkpoints in the published llava-hf/llava-1.5-7b-hf layout: label masks with the
real SentencePiece tokenizer, prompts that are prefixes of the training text, and the snapshots users
actually have (no processor_config.json, SentencePiece only, no pad token), LLaVA-NeXT refused by name.
Skipped when ``../shared/fixtures`` is absent."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml
from PIL import Image

from stmed.config import ConfigError, ModelConfig, build_config
from stmed.model.build import image_seq_len, load_model, load_processor
from stmed.model.conversation import IGNORE_INDEX, collate, describe_targets, encode, render, to_turns
from stmed.model.generate import HFEngine, Sampling, answer
from stmed.model.prompts import SYSTEM_SQ, answer_prompt
from stmed.train.stage import TrainConfig, check_length_budget
from tests.checkpoints import build_llava_hf

REPO = Path(__file__).resolve().parents[3]
CONVERSATION = [
    {"from": "human", "value": "<image>\nWhat modality is this?"},
    {"from": "gpt", "value": "This is a chest X-ray."},
    {"from": "human", "value": "Where is the lesion?"},
    {"from": "gpt", "value": "The lesion is in the left lower lobe."},
    {"from": "human", "value": "Is there an effusion?"},
    {"from": "gpt", "value": "No, the costophrenic angles are sharp."},
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return build_llava_hf(tmp_path_factory.mktemp("llava-hf"))


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load_model(ModelConfig(name_or_path=str(checkpoint)))


def test_label_masks_are_exact_with_the_sentencepiece_tokenizer(loaded):
    _, processor = loaded
    tokenizer = processor.tokenizer
    # Every later user turn becomes a questioner turn, so both target kinds appear.
    turns = to_turns(CONVERSATION, sq_ratio=1.0, rng=random.Random(0))
    encoded = encode(render(turns, SYSTEM_SQ), tokenizer, image_seq_len(processor), max_length=1024)
    assert encoded.input_ids.count(32000) == 576 and not encoded.truncated
    assert _pieces(encoded, tokenizer) == [
        ("qa", " This is a chest X-ray.</s>"),
        ("vq", " Where is the lesion?</s>"),
        ("qa", " The lesion is in the left lower lobe.</s>"),
        ("vq", " Is there an effusion?</s>"),
        ("qa", " No, the costophrenic angles are sharp.</s>"),
    ]
    # Nothing else is a target: the system prompt, role names and image tokens carry IGNORE_INDEX.
    off = [i for i, label in zip(encoded.input_ids, encoded.labels) if label == IGNORE_INDEX]
    text = tokenizer.decode([i for i in off if i != 32000], skip_special_tokens=False)
    assert text.startswith("<s> " + SYSTEM_SQ) and "ASSISTANT:" in text and "lesion" not in text


def _pieces(encoded, tokenizer) -> list[tuple[str, str]]:
    """Each target run as its SentencePiece pieces joined (decode() would drop a run's leading space)."""
    kinds = [kind for kind, _ in describe_targets(encoded, tokenizer)]
    runs, previous = [], 0
    for token_id, kind in zip(encoded.input_ids, encoded.loss_kind):
        if kind and kind != previous:
            runs.append([])
        if kind:
            runs[-1].append(token_id)
        previous = kind
    texts = ["".join(tokenizer.convert_ids_to_tokens(ids)).replace("▁", " ") for ids in runs]
    return list(zip(kinds, texts))


def test_the_answer_prompt_is_a_token_prefix_of_the_training_text(loaded):
    _, processor = loaded
    tokenizer, seq_len = processor.tokenizer, image_seq_len(processor)
    turns = to_turns(CONVERSATION[:2], sq_ratio=0.0, rng=random.Random(0))
    trained = encode(render(turns, SYSTEM_SQ), tokenizer, seq_len, max_length=1024).input_ids
    prompt = tokenizer(answer_prompt("What modality is this?"))["input_ids"]
    prompt = [i for p in prompt for i in ([p] * seq_len if p == 32000 else [p])]
    assert trained[: len(prompt)] == prompt  # generation continues exactly where training text goes on
    assert "".join(tokenizer.convert_ids_to_tokens(trained[len(prompt) :])).replace("▁", " ") == (
        " This is a chest X-ray.</s>"
    )


def test_generation_stops_at_the_eos_and_pads_a_mixed_batch(loaded):
    model, processor = loaded
    engine = HFEngine(model, processor, batch_size=2)
    images = [Image.new("RGB", (64, 48), (90, 90, 90)), Image.new("RGB", (40, 40), (10, 10, 10))]
    texts = answer(
        engine,
        images,
        ["Is there a lesion?", "Which organ is shown in this image, in detail?"],
        Sampling(max_new_tokens=5),
    )
    assert len(texts) == 2 and all("</s>" not in t and "<pad>" not in t for t in texts)


def test_no_processor_config_counts_image_tokens_from_the_model_config(tmp_path):
    """Finding 5: older snapshots have no processor_config.json; the model config says 576."""
    folder = build_llava_hf(tmp_path / "m", drop=("processor_config.json",))
    processor = load_processor(ModelConfig(name_or_path=str(folder)))
    assert image_seq_len(processor) == 576
    batch = processor(
        text=["USER: <image>\nWhat is it? ASSISTANT:"],
        images=[Image.new("RGB", (50, 70))],
        return_tensors="pt",
    )
    assert int((batch["input_ids"] == 32000).sum()) == 576  # expanded, as the model expects


def test_a_sentencepiece_only_checkpoint_loads_and_tokenizes_as_the_fast_one(tmp_path, loaded):
    """Finding 6: tokenizer.model without tokenizer.json needs sentencepiece (a dependency now).

    Text tokenizes as the published tokenizer.json does; right after a special token the converted
    tokenizer writes no "▁" where tokenizer.json writes one (``<image>`` then a newline), so the
    label masks are checked on it too."""
    folder = build_llava_hf(tmp_path / "m", drop=("tokenizer.json",))
    processor = load_processor(ModelConfig(name_or_path=str(folder)))
    fast = loaded[1].tokenizer
    for text in (
        SYSTEM_SQ + " USER: Is there a pneumothorax? ASSISTANT:",
        "The lesion is in the left lower lobe.",
    ):
        assert processor.tokenizer(text)["input_ids"] == fast(text)["input_ids"]
    turns = to_turns(CONVERSATION[:4], sq_ratio=1.0, rng=random.Random(0))
    encoded = encode(render(turns, SYSTEM_SQ), processor.tokenizer, 576, max_length=1024)
    assert _pieces(encoded, processor.tokenizer) == [
        ("qa", " This is a chest X-ray.</s>"),
        ("vq", " Where is the lesion?</s>"),
        ("qa", " The lesion is in the left lower lobe.</s>"),
    ]


def test_a_tokenizer_without_a_pad_token_batches_and_generates(tmp_path):
    """Finding 3: Mistral-based conversions ship no pad token; batching and generation still work."""
    folder = build_llava_hf(tmp_path / "m", no_pad_token=True)
    model, processor = load_model(ModelConfig(name_or_path=str(folder)))
    tokenizer = processor.tokenizer
    assert tokenizer.pad_token_id is not None
    rng = random.Random(0)
    items = [
        encode(render(to_turns(CONVERSATION[:n], 0.0, rng), SYSTEM_SQ), tokenizer, 576, 1024) for n in (2, 4)
    ]
    batch = collate(items, tokenizer.pad_token_id)
    assert batch["attention_mask"].sum(1).tolist() == [len(i) for i in items]
    engine = HFEngine(model, processor, batch_size=2)
    out = answer(
        engine,
        [Image.new("RGB", (40, 40))] * 2,
        ["Is it normal?", "Which organ is it, please?"],
        Sampling(max_new_tokens=3),
    )
    assert len(out) == 2


@pytest.mark.parametrize("model_type", ["llava_next", "llava_onevision"])
def test_llava_next_is_refused_by_name_before_loading(tmp_path, model_type):
    """Finding 7: LLaVA-NeXT tiles images into a variable number of tokens; say so up front."""
    folder = build_llava_hf(tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = model_type
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"model.name_or_path: .*LLaVA-(NeXT|OneVision).*tiles"):
        load_model(ModelConfig(name_or_path=str(folder)))


def test_the_length_budget_names_the_key_and_a_value_that_fits(loaded):
    """Finding 1: 512 tokens cannot hold a 576-token image; the shipped local configs fit it."""
    tokens = image_seq_len(loaded[1])
    with pytest.raises(ConfigError, match=r"train.max_length=512 .* 576 tokens .* train.max_length=1024"):
        check_length_budget(TrainConfig(max_length=512), tokens)
    for stage in ("sft", "dpo"):
        shipped = yaml.safe_load((REPO / "jobs" / "configs" / "local" / f"{stage}.yaml").read_text())["train"]
        check_length_budget(
            build_config(
                TrainConfig, {k: v for k, v in shipped.items() if k in TrainConfig.__dataclass_fields__}
            ),
            tokens,
        )
