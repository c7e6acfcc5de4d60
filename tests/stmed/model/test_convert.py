"""stmed.model.convert: an original-layout LLaVA-Med v1.5 checkpoint to the llava-hf layout, checked
against an independent forward pass over the original weights (the way the LLaVA code computes it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPVisionConfig, CLIPVisionModel, MistralConfig, MistralForCausalLM

from stmed.config import ConfigError, ModelConfig
from stmed.model.build import load_model
from stmed.model.convert import convert
from stmed.model.export import published_name
from stmed.model.families import LLAVA
from tests.checkpoints import ORIGINAL_TEXT, ORIGINAL_VISION, build_llava_med_original

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> Path:
    return build_llava_med_original(tmp_path_factory.mktemp("llava-med-original"))


@pytest.fixture(scope="module")
def converted(original, tmp_path_factory) -> Path:
    return convert(original, tmp_path_factory.mktemp("llava-med-hf"))


def reference_logits(
    original: Path, before: list[int], pixels: torch.Tensor, after: list[int]
) -> torch.Tensor:
    """The LLaVA code's forward: CLIP read at layer -2 without CLS, the mlp2x_gelu projector, its output
    spliced into the text embeddings where the prompt's image sits, the Mistral decoder on top."""
    weights = load_file(str(original / "model.safetensors"))
    config = json.loads((original / "config.json").read_text())
    text = MistralForCausalLM(
        MistralConfig(**{k: config[k] for k in (*ORIGINAL_TEXT, "vocab_size", "rms_norm_eps", "rope_theta")})
    )
    text.load_state_dict(
        {k: v for k, v in weights.items() if not k.startswith(("model.mm_", "model.vision"))}
    )
    tower = CLIPVisionModel(CLIPVisionConfig(**ORIGINAL_VISION))
    prefix = "model.vision_tower.vision_tower.vision_model."
    tower.load_state_dict({k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)})
    text.eval(), tower.eval()
    with torch.no_grad():
        features = tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        hidden = torch.nn.functional.gelu(
            features @ weights["model.mm_projector.0.weight"].T + weights["model.mm_projector.0.bias"]
        )
        image = hidden @ weights["model.mm_projector.2.weight"].T + weights["model.mm_projector.2.bias"]
        embed = text.get_input_embeddings()
        inputs = torch.cat([embed(torch.tensor([before])), image, embed(torch.tensor([after]))], dim=1)
        return text(inputs_embeds=inputs).logits[0]


def test_converted_logits_equal_the_original_forward_pass(original, converted):
    model, processor = load_model(ModelConfig(name_or_path=str(converted)))
    tokenizer = processor.tokenizer
    vocab = json.loads((original / "config.json").read_text())["vocab_size"]
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert image_id == vocab and tokenizer.pad_token_id == vocab + 1  # both added after the original vocab
    assert model.config.image_seq_length == 16 and model.config.vision_feature_layer == -2
    before = tokenizer("USER: ")["input_ids"]
    after = tokenizer(" Is there a lesion in the left lung? ASSISTANT:", add_special_tokens=False)[
        "input_ids"
    ]
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([before + [image_id] * 16 + after])
    with torch.no_grad():
        got = model(input_ids=ids, pixel_values=pixels).logits[0, :, :vocab]
    want = reference_logits(original, before, pixels, after)
    assert got.shape == want.shape == (len(before) + 16 + len(after), vocab)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert want.abs().max() > 0.1  # the check compares real signal, not zeros


def test_converted_processor_expands_the_image_and_loads_without_warnings_of_missing_weights(converted):
    model, processor = load_model(ModelConfig(name_or_path=str(converted)))
    from PIL import Image

    batch = processor(
        text=["USER: <image>\nWhat is it? ASSISTANT:"],
        images=[Image.new("RGB", (80, 60))],
        return_tensors="pt",
    )
    assert (batch["input_ids"] == model.config.image_token_index).sum() == 16
    assert batch["pixel_values"].shape == (1, 3, 56, 56)
    names = set(load_file(str(converted / "model.safetensors")))
    # every weight written under llava-hf's published name for it (what vLLM reads), and loaded back
    assert names == {published_name(LLAVA, k) for k in model.state_dict()}
    assert "vision_tower.vision_model.embeddings.patch_embedding.weight" in names


def test_original_layout_is_refused_with_the_convert_command(original):
    with pytest.raises(ConfigError, match=r"original-layout LLaVA.*python -m stmed.convert"):
        load_model(ModelConfig(name_or_path=str(original)))


def test_other_projectors_are_refused_by_name(original, tmp_path):
    config = json.loads((original / "config.json").read_text())
    config["mm_projector_type"] = "mlp3x_gelu"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(config))
    proc = subprocess.run(
        [sys.executable, "-m", "stmed.convert", str(bad), str(tmp_path / "out")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "mlp3x_gelu" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
