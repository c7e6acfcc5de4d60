"""The tiny LLaVA, loading, LoRA wiring (gradients reach the ViT LoRA), parameter groups and export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from PIL import Image

from stmed.config import ConfigError, LoRAConfig, ModelConfig
from stmed.model.build import PROJECTOR, build_tiny, image_seq_len, load_model, pixel_values
from stmed.model.lora import (
    attach_lora,
    enable_gradient_checkpointing,
    load_trainable,
    merge_and_export,
    param_groups,
    save_trainable,
)
from tests.helpers import perturb_trainable

# Small ranks keep the test fast; the per-module values are what is checked.
LORA = LoRAConfig(llm_r=4, llm_alpha=8, llm_dropout=0.05, vit_r=2, vit_alpha=4, vit_dropout=0.2)
PROMPT = "A chat. USER: <image>\nIs there a nodule in the left lung? ASSISTANT: yes</s>"


@pytest.fixture(scope="module")
def tiny():
    return build_tiny(seed=0)


def _image(seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (72, 80, 3), generator=g, dtype=torch.uint8).numpy())


@pytest.fixture(scope="module")
def inputs(tiny):
    _, processor = tiny
    return dict(processor(text=[PROMPT], images=[_image(0)], return_tensors="pt"))


def _fresh_peft(lora: LoRAConfig = LORA) -> PeftModel:
    model, _ = build_tiny(seed=0)
    return attach_lora(model, lora)


def _logits(model, inputs) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


# ----------------------------------------------------------------------------- tiny model


def test_processor_expands_image_and_forward_runs(tiny, inputs):
    model, processor = tiny
    n_image = (inputs["input_ids"] == model.config.image_token_id).sum().item()
    assert n_image == 64 == image_seq_len(processor) == image_seq_len(model)
    assert inputs["pixel_values"].shape == (1, 3, 64, 64)
    logits = _logits(model, inputs)
    assert logits.shape == (1, inputs["input_ids"].shape[1], len(processor.tokenizer))
    assert torch.isfinite(logits).all()


def test_tiny_sizes_and_token_ids(tiny):
    model, processor = tiny
    tok = processor.tokenizer
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<image>")
    assert model.config.text_config.pad_token_id == tok.pad_token_id
    assert model.config.text_config.vocab_size == len(tok)
    assert model.num_parameters() < 3_000_000


def test_pixel_values_are_normalised(tiny):
    _, processor = tiny
    pv = pixel_values(processor, [_image(0), _image(1).resize((40, 100))])
    assert pv.shape == (2, 3, 64, 64) and pv.dtype == torch.float32
    assert pv.min() < 0 < pv.max()  # CLIP mean/std applied, not just rescaled to [0, 1]
    with pytest.raises(ValueError, match="no images"):
        pixel_values(processor, [])


def test_build_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a, _ = build_tiny(seed=0)
    after = torch.rand(3)
    b, _ = build_tiny(seed=0)
    c, _ = build_tiny(seed=1)
    assert torch.equal(after, expected)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["lm_head.weight"], sc["lm_head.weight"])


def test_save_then_load_model_gives_identical_logits(tiny, inputs, tmp_path: Path):
    model, processor = tiny
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_proc = load_model(ModelConfig(name_or_path=str(tmp_path)))
    assert torch.equal(_logits(loaded, inputs), _logits(model, inputs))
    again = loaded_proc(text=[PROMPT], images=[_image(0)], return_tensors="pt")
    assert torch.equal(again["input_ids"], inputs["input_ids"])
    assert torch.equal(again["pixel_values"], inputs["pixel_values"])


def test_a_bin_only_checkpoint_is_a_one_line_config_error_and_its_pickle_never_runs(tiny, tmp_path: Path):
    import pickle
    import subprocess
    import sys

    model, processor = tiny
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    for weights in tmp_path.glob("*.safetensors"):
        weights.unlink()
    marker = tmp_path / "owned"
    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps(_Planted(marker)))
    with pytest.raises(ConfigError, match=r"only pickled weights \(pytorch_model.bin\).*safetensors") as err:
        load_model(ModelConfig(name_or_path=str(tmp_path)))
    assert "\n" not in str(err.value) and not marker.exists()
    # Through a job's entry point: one stderr line, exit 2, no traceback.
    repo = Path(__file__).resolve().parents[3]
    code = ("import sys; from jobs.runtime import run_job; from jobs.sft import SFTConfig, main;"
            "run_job(main, SFTConfig, sys.argv[1:])")
    proc = subprocess.run([sys.executable, "-c", code, f"output_dir={tmp_path / 'out'}",
                           "data.synthetic=true", "data.synthetic_images=4", "model.preset=null", f"model.name_or_path={tmp_path}"],
                          cwd=repo, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and not marker.exists()
    lines = proc.stderr.strip().splitlines()  # the synthetic data's log line, then the verdict
    verdicts = [line for line in lines if line.startswith(("config error:", "input error:", "failed:"))]
    assert verdicts == [lines[-1]] and "pickled weights" in lines[-1]


class _Planted:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_load_model_preset_honours_dtype():
    model, _ = load_model(ModelConfig(preset="tiny", dtype="bfloat16"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


# ----------------------------------------------------------------------------- LoRA


def test_attach_lora_trains_exactly_lora_and_projector():
    peft_model = _fresh_peft()
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable, "nothing is trainable"
    for name in trainable:
        is_lora = "lora_A" in name or "lora_B" in name
        assert is_lora or "multi_modal_projector.modules_to_save" in name, name
    llm = [n for n in trainable if "lora_" in n and "language_model" in n]
    vit = [n for n in trainable if "lora_" in n and "vision_tower" in n]
    proj = [n for n in trainable if "multi_modal_projector" in n]
    assert len(llm) == 2 * 2 * 7  # 2 layers x 7 linears x (A, B)
    # Only layer 0 of 2 feeds the projector (penultimate-layer features); layer 1 gets no adapter.
    assert len(vit) == 2 * 6 and all(".layers.0." in n for n in vit)
    assert len(proj) == 4  # linear_1/linear_2 weight + bias
    # The frozen original projector is kept for the DPO reference.
    assert any("multi_modal_projector.original_module" in n for n, _ in peft_model.named_parameters())

    base = peft_model.get_base_model()
    q_llm = base.model.language_model.layers[0].self_attn.q_proj
    q_vit = base.model.vision_tower.encoder.layers[0].self_attn.q_proj
    assert q_llm.r["default"] == 4 and q_llm.scaling["default"] == 2.0
    assert q_vit.r["default"] == 2 and q_vit.scaling["default"] == 2.0
    assert q_llm.lora_dropout["default"].p == 0.05 and q_vit.lora_dropout["default"].p == 0.2


def _grads_after_backward(peft_model, inputs) -> dict[str, torch.Tensor | None]:
    peft_model.train()
    peft_model.zero_grad()
    out = peft_model(**inputs, labels=inputs["input_ids"])
    out.loss.backward()
    return {n: p.grad for n, p in peft_model.named_parameters()}


def _nonzero(grads: dict, pred) -> bool:
    selected = [g for n, g in grads.items() if pred(n)]
    return bool(selected) and all(g is not None and g.abs().sum() > 0 for g in selected)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_reach_llm_lora_vit_lora_and_projector_only(inputs, checkpointing: bool):
    peft_model = _fresh_peft()
    if checkpointing:
        enable_gradient_checkpointing(peft_model)
        base = peft_model.get_base_model()
        assert base.model.vision_tower.encoder.gradient_checkpointing
        assert base.model.language_model.gradient_checkpointing
    grads = _grads_after_backward(peft_model, inputs)
    # LoRA B starts at zero, so at step 0 only B (and the projector) receive gradient.
    assert _nonzero(grads, lambda n: "lora_B" in n and "language_model" in n)
    assert _nonzero(grads, lambda n: "lora_B" in n and "vision_tower" in n)
    assert _nonzero(grads, lambda n: "multi_modal_projector.modules_to_save" in n)
    frozen = {n for n, p in peft_model.named_parameters() if not p.requires_grad}
    assert all(grads[n] is None for n in frozen)

    # One optimiser step makes B non-zero; then A gets gradient too, in both towers.
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.1)
    optimizer.step()
    grads = _grads_after_backward(peft_model, inputs)
    assert _nonzero(grads, lambda n: "lora_A" in n and "language_model" in n)
    assert _nonzero(grads, lambda n: "lora_A" in n and "vision_tower" in n)


def test_param_groups_cover_every_trainable_param_once():
    peft_model = _fresh_peft()
    groups = param_groups(peft_model, lr_llm=2e-4, lr_vit=5e-5, lr_projector=2e-5, weight_decay=0.1)
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in groups] == [
        ("llm_lora", 2e-4, 0.1), ("vit_lora", 5e-5, 0.1), ("projector", 2e-5, 0.1),
    ]  # fmt: skip
    grouped = [id(p) for g in groups for p in g["params"]]
    trainable = {id(p) for p in peft_model.parameters() if p.requires_grad}
    assert len(grouped) == len(set(grouped)) and set(grouped) == trainable
    torch.optim.AdamW(groups)  # the groups are valid optimiser input as they are

    no_vit = param_groups(_fresh_peft(LoRAConfig(llm_r=4, llm_alpha=8, train_vit=False)), 1.0, 1.0, 1.0)
    assert [g["name"] for g in no_vit] == ["llm_lora", "projector"]


def test_param_groups_reject_stray_trainable_param():
    peft_model = _fresh_peft()
    peft_model.get_base_model().lm_head.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="lm_head"):
        param_groups(peft_model, 1.0, 1.0, 1.0)


def test_save_and_load_trainable_round_trip(inputs, tmp_path: Path):
    trained = _fresh_peft()
    perturb_trainable(trained)
    save_trainable(trained, tmp_path)
    fresh = _fresh_peft()
    assert not torch.equal(_logits(fresh, inputs), _logits(trained, inputs))
    load_trainable(fresh, tmp_path)
    assert torch.equal(_logits(fresh, inputs), _logits(trained, inputs))

    other_rank = _fresh_peft(LoRAConfig(llm_r=8, llm_alpha=8, vit_r=2, vit_alpha=4))
    with pytest.raises(ValueError, match="does not fit"):
        load_trainable(other_rank, tmp_path)
    with pytest.raises(TypeError):
        load_trainable(build_tiny(0)[0], tmp_path)


def test_merge_and_export_reproduces_peft_logits(tiny, inputs, tmp_path: Path):
    _, processor = tiny
    peft_model = _fresh_peft()
    with peft_model.disable_adapter():
        base_logits = _logits(peft_model, inputs)
    perturb_trainable(peft_model)
    peft_logits = _logits(peft_model, inputs)
    assert not torch.allclose(peft_logits, base_logits, atol=1e-3)

    out = merge_and_export(peft_model, processor, tmp_path / "merged")
    merged, _ = load_model(ModelConfig(name_or_path=str(out)))
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged, inputs), peft_logits, atol=1e-5, rtol=1e-5)

    # The live model was not merged: still a PEFT model with the same outputs, and the adapter-disabled
    # path (frozen LoRA-free weights + original projector: the DPO reference) is untouched.
    assert isinstance(peft_model, PeftModel)
    assert torch.equal(_logits(peft_model, inputs), peft_logits)
    with peft_model.disable_adapter():
        assert torch.equal(_logits(peft_model, inputs), base_logits)


# ----------------------------------------------------------------------------- trainable embeddings


def test_train_embeddings_trains_embeddings_in_llm_group_and_keeps_originals(tiny, inputs, tmp_path: Path):
    _, processor = tiny
    lora = LoRAConfig(llm_r=4, llm_alpha=8, vit_r=2, vit_alpha=4, train_embeddings=True)
    peft_model = _fresh_peft(lora)
    trained = {n for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" not in n
               and PROJECTOR not in n}  # fmt: skip
    assert trained == {"base_model.model.model.language_model.embed_tokens.modules_to_save.default.weight",
                       "base_model.model.lm_head.modules_to_save.default.weight"}  # fmt: skip
    groups = {g["name"]: {id(p) for p in g["params"]} for g in param_groups(peft_model, 1.0, 2.0, 3.0)}
    params = dict(peft_model.named_parameters())
    assert {id(params[n]) for n in trained} <= groups["llm_lora"]
    # They get gradient (and the default config keeps them frozen).
    grads = _grads_after_backward(peft_model, inputs)
    assert all(grads[n] is not None and grads[n].abs().sum() > 0 for n in trained)
    assert not any("embed_tokens.modules_to_save" in n for n, _ in _fresh_peft().named_parameters())

    with peft_model.disable_adapter():
        base_logits = _logits(peft_model, inputs)
    perturb_trainable(peft_model)
    base = peft_model.get_base_model()
    assert not torch.equal(base.lm_head.modules_to_save["default"].weight, base.lm_head.original_module.weight)
    peft_logits = _logits(peft_model, inputs)
    # The DPO reference (adapter disabled) still runs the original embeddings and head.
    with peft_model.disable_adapter():
        assert torch.equal(_logits(peft_model, inputs), base_logits)
    reference, _ = build_tiny(seed=0)
    assert torch.equal(_logits(reference, inputs), base_logits)

    # Export carries the trained embeddings and head.
    merged, _ = load_model(ModelConfig(name_or_path=str(merge_and_export(peft_model, processor, tmp_path / "m"))))
    torch.testing.assert_close(_logits(merged, inputs), peft_logits, atol=1e-5, rtol=1e-5)
    trained_head = base.lm_head.modules_to_save["default"].weight
    assert torch.equal(merged.lm_head.weight, trained_head)
