"""Stage-2 DPO without Ray: the data check, the frozen reference, learning, resume (the loss: test_losses)."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from stmed.config import ModelConfig, config_to_dict
from stmed.data.pairs import PreferenceDataset, collate_pairs, load_preference_data
from stmed.data.records import PreferencePair, write_preferences
from stmed.data.synthetic import make_dataset
from stmed.model.build import build_tiny, load_model
from stmed.model.conversation import IGNORE_INDEX
from stmed.model.lora import attach_lora
from stmed.runs import MetricsLog
from stmed.train.dpo import (
    REFERENCE_CACHE_FILE,
    DPOLoopConfig,
    DPOLoRAConfig,
    DPOSettings,
    DPOTrainConfig,
    forward_logps,
    precompute_reference,
    reference_logps,
    train_dpo,
)
from stmed.train.session import LocalSession
from tests.helpers import perturb_trainable

LORA = DPOLoRAConfig(llm_r=4, llm_alpha=8, vit_r=2, vit_alpha=4)
CHOSEN = "Yes, there is a lesion in the left lung."
REJECTED = "No, the image is normal."


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("synthetic"), num_images=8, seed=0)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory) -> Path:
    """A "merged stage-1 model": the tiny model saved as a plain HF checkpoint."""
    out = tmp_path_factory.mktemp("stage1")
    model, processor = build_tiny(seed=3)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _pairs(images: list[str], n: int) -> list[PreferencePair]:
    """A learnable set: the same chosen / rejected answer for every question."""
    questions = ["Is there a lesion?", "Is the image normal?", "What is abnormal in this scan?"]
    return [PreferencePair(pair_id=f"p{i}", image=images[i % len(images)], question=questions[i % 3],
                           chosen=CHOSEN, rejected=REJECTED, chosen_score=8.0, rejected_score=3.0,
                           judge_model="reference-judge", seeds=[i, i + 100])
            for i in range(n)]  # fmt: skip


def _images(synthetic) -> list[str]:
    return sorted(p.name for p in synthetic.images.glob("*.png"))


def _loop_config(stage1: Path, prefs: Path, images: Path, out: Path, dpo: DPOSettings | None = None,
                 **train) -> dict:  # fmt: skip
    base = {"lr_llm": 2e-3, "lr_vit": 1e-3, "lr_projector": 1e-3, "micro_batch_size": 2, "max_length": 256,
            "warmup_ratio": 0.0, "log_every": 100, "checkpoint_every": 100}
    cfg = DPOLoopConfig(model=ModelConfig(name_or_path=str(stage1)), preferences_path=str(prefs),
                        image_root=str(images), output_dir=str(out), lora=LORA,
                        train=DPOTrainConfig(**{**base, **train}), dpo=dpo or DPOSettings(),
                        export_merged=False)  # fmt: skip
    return config_to_dict(cfg, redact=False)


# ----------------------------------------------------------------------------- data


def test_bad_rows_are_rejected_and_counted_by_reason(synthetic, stage1, tmp_path):
    images = _images(synthetic)
    corrupt = tmp_path / "corrupt.png"  # an absolute image path is used as it is
    corrupt.write_bytes(b"not a png at all")
    good = _pairs(images, 3)
    base = good[0]

    def bad(i: int, **kw) -> PreferencePair:
        return PreferencePair(**{**base.to_row(), "pair_id": f"bad{i}", **kw})

    rows = good + [
        bad(0, image="missing.png"), bad(1, image=str(corrupt)), bad(2, chosen=""), bad(3, rejected="   "),
        bad(4, rejected=CHOSEN + "  "), bad(5, question=" "), bad(6, chosen="an answer with </s> inside"),
        bad(7, question="Is there a lesion? " * 200),
    ]
    prefs = write_preferences(tmp_path / "prefs.parquet", rows)
    _, processor = load_model(ModelConfig(name_or_path=str(stage1)))
    data = load_preference_data(prefs, synthetic.images, processor, max_length=256)
    report = data.report()
    assert [p.pair_id for p in data.pairs] == ["p0", "p1", "p2"]
    assert report["pairs_read"] == 11 and report["pairs_used"] == 3 and report["rejected"] == 8
    assert report["rejected_by_reason"] == {"image_missing": 1, "image_unreadable": 1, "empty_answer": 2,
                                            "chosen_equals_rejected": 1, "empty_question": 1, "bad_text": 1,
                                            "too_long": 1}  # fmt: skip
    with pytest.raises(ValueError, match="no usable preference pairs.*image_missing"):
        load_preference_data(write_preferences(tmp_path / "bad.parquet", rows[3:4]), synthetic.images,
                             processor, max_length=256)  # fmt: skip


def test_batch_holds_chosen_then_rejected_with_answer_only_targets(synthetic, stage1, tmp_path):
    _, processor = load_model(ModelConfig(name_or_path=str(stage1)))
    dataset = PreferenceDataset(_pairs(_images(synthetic), 2), synthetic.images, processor, max_length=256)
    batch = collate_pairs([dataset[(0, 0)], dataset[(0, 1)]], processor.tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 4 and batch["pixel_values"].shape == (4, 3, 64, 64)
    assert batch["index"].tolist() == [0, 1]
    decode = processor.tokenizer.decode
    targets = [decode(row[row != IGNORE_INDEX]) for row in batch["labels"]]
    assert targets == [f" {CHOSEN}</s>"] * 2 + [f" {REJECTED}</s>"] * 2
    assert torch.equal(batch["pixel_values"][0], batch["pixel_values"][2])  # a pair shares its image


# ----------------------------------------------------------------------------- the reference policy


def test_reference_is_the_stage1_model_even_after_the_policy_moves(synthetic, stage1, tmp_path):
    stage1_model, processor = load_model(ModelConfig(name_or_path=str(stage1)))  # independent, no LoRA
    policy_base, _ = load_model(ModelConfig(name_or_path=str(stage1)))
    peft_model = attach_lora(policy_base, LORA)
    perturb_trainable(peft_model)  # LoRA B and the projector copy drift, as in training
    peft_model.train()
    dataset = PreferenceDataset(_pairs(_images(synthetic), 3), synthetic.images, processor, max_length=256)
    batch = collate_pairs([dataset[(0, i)] for i in range(3)], processor.tokenizer.pad_token_id)

    with torch.no_grad():
        expected = forward_logps(stage1_model, batch)
        policy = forward_logps(peft_model.eval(), batch)
    peft_model.train()
    got = reference_logps(peft_model, batch)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-5)
    assert (policy - expected).abs().max() > 0.1  # the policy really differs: the check is not vacuous
    assert peft_model.training  # reference_mode restores the caller's mode

    prefs = write_preferences(tmp_path / "prefs.parquet", dataset.pairs)
    cfg = DPOLoopConfig(model=ModelConfig(name_or_path=str(stage1)), preferences_path=str(prefs),
                        image_root=str(synthetic.images), output_dir=str(tmp_path), lora=LORA,
                        train=DPOTrainConfig(micro_batch_size=2, max_length=256))  # fmt: skip
    session = LocalSession(tmp_path / "ckpt")
    table = precompute_reference(cfg, peft_model, dataset, session)
    assert table.shape == (3, 2)
    assert torch.allclose(table.T.reshape(-1), expected, atol=1e-4, rtol=1e-5)
    assert (tmp_path / REFERENCE_CACHE_FILE).is_file()
    # Changed pairs under the same output_dir: the cache no longer fits and is recomputed.
    changed = PreferenceDataset([*dataset.pairs[:2], replace(dataset.pairs[2], chosen="No.")], synthetic.images,
                                processor, max_length=256)  # fmt: skip
    again = precompute_reference(cfg, peft_model, changed, session)
    assert torch.equal(again[:2], table[:2]) and again[2, 0] != table[2, 0] and again[2, 1] == table[2, 1]


# ----------------------------------------------------------------------------- training


def _hf_name(peft_name: str) -> str:
    """``base_model.model.X.base_layer.weight`` / ``….original_module.…`` / ``….modules_to_save.default.…``
    → the plain model's ``X.weight``."""
    name = peft_name.removeprefix("base_model.model.")
    for wrapper in (".base_layer", ".original_module", ".modules_to_save.default"):
        name = name.replace(wrapper, "")
    return name


@pytest.fixture(scope="module")
def trained(synthetic, stage1, tmp_path_factory):
    """30 DPO steps on a learnable set, per-step reference."""
    tmp = tmp_path_factory.mktemp("dpo")
    prefs = write_preferences(tmp / "prefs.parquet", _pairs(_images(synthetic), 8))
    session = LocalSession(tmp / "ckpt")
    train_dpo(_loop_config(stage1, prefs, synthetic.images, tmp / "out", max_steps=30), session)
    return session, MetricsLog(tmp / "out" / "metrics.jsonl").read(), prefs


def test_first_step_is_ln2_then_margin_and_accuracy_rise(trained):
    _, rows, _ = trained
    assert [r["step"] for r in rows] == list(range(1, 31))
    first = rows[0]
    # LoRA B = 0 and the projector copy equals the original: the policy *is* the reference at step 1.
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert first["rewards/accuracies"] == 0.0  # a tie is not a hit
    late = rows[-5:]
    assert min(r["rewards/margins"] for r in late) > 0.5
    assert min(r["rewards/accuracies"] for r in late) == 1.0
    assert max(r["loss"] for r in late) < 0.5 * math.log(2)
    assert all(math.isfinite(r["grad_norm"]) and r["pairs"] == 2 for r in rows)


def test_reference_weights_unchanged_and_lora_trained(trained, stage1):
    session, _, _ = trained
    model = session.model
    stage1_state = load_model(ModelConfig(name_or_path=str(stage1)))[0].state_dict()
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    assert len(frozen) == len(stage1_state)
    for name, param in frozen.items():
        assert torch.equal(param, stage1_state[_hf_name(name)]), name
    lora_b = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert any("vision_tower" in n for n in lora_b) and any("language_model" in n for n in lora_b)
    assert all(p.abs().sum() > 0 for p in lora_b.values())  # every LoRA, LLM and ViT, moved off zero
    projector = {n: p for n, p in model.named_parameters() if "modules_to_save" in n}
    assert projector and all(not torch.equal(p, stage1_state[_hf_name(n)]) for n, p in projector.items())


def test_precomputed_reference_and_resume_reproduce_the_per_step_run(trained, synthetic, stage1, tmp_path):
    _, rows, prefs = trained
    out, session = tmp_path / "out", LocalSession(tmp_path / "ckpt")
    config = _loop_config(stage1, prefs, synthetic.images, out, dpo=DPOSettings(precompute_reference=True),
                          max_steps=30, checkpoint_every=10, fail_at_step=15)  # fmt: skip
    with pytest.raises(RuntimeError, match="injected failure before step 15"):
        train_dpo(config, session)
    assert session.latest_checkpoint().name == "checkpoint_000010"
    cache = out / REFERENCE_CACHE_FILE
    written = cache.stat().st_mtime_ns
    train_dpo(config, session)
    assert cache.stat().st_mtime_ns == written  # the resumed attempt read the table instead of recomputing
    attempts = MetricsLog(out / "attempts.jsonl").read()
    assert [a["start_step"] for a in attempts] == [0, 10]
    latest = {r["step"]: r for r in MetricsLog(out / "metrics.jsonl").read()}  # a re-run step's last row
    assert sorted(latest) == list(range(1, 31))
    for want in rows:  # same data order, same dropout, same reference: the same run
        got = latest[want["step"]]
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-3, abs=1e-5), want["step"]
        assert got["rewards/margins"] == pytest.approx(want["rewards/margins"], rel=1e-3, abs=1e-5)


# ----------------------------------------------------------------------------- the SFT (RPO) term


def test_sft_weight_adds_the_chosen_mean_token_nll_to_the_first_step_loss(synthetic, stage1, tmp_path):
    """At step 1 the policy is stage 1, so loss = ln2 + w * mean over pairs of the chosen mean NLL."""
    weight = 0.5
    pairs = _pairs(_images(synthetic), 2)
    prefs = write_preferences(tmp_path / "prefs.parquet", pairs)
    train_dpo(_loop_config(stage1, prefs, synthetic.images, tmp_path / "out", max_steps=1,
                           dpo=DPOSettings(sft_weight=weight)), LocalSession(tmp_path / "ckpt"))  # fmt: skip
    row = MetricsLog(tmp_path / "out" / "metrics.jsonl").read()[0]
    model, processor = load_model(ModelConfig(name_or_path=str(stage1)))  # independent stage-1 model
    dataset = PreferenceDataset(pairs, synthetic.images, processor, max_length=256)
    batch = collate_pairs([dataset[(0, 0)], dataset[(0, 1)]], processor.tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       pixel_values=batch["pixel_values"]).logits.float()  # fmt: skip
    logp = torch.log_softmax(logits, dim=-1)
    nlls = []
    for b in range(2):  # chosen rows come first
        steps = [t for t in range(1, batch["labels"].shape[1]) if batch["labels"][b, t] != IGNORE_INDEX]
        nlls.append(-sum(logp[b, t - 1, batch["labels"][b, t]].item() for t in steps) / len(steps))
    assert row["loss"] == pytest.approx(math.log(2) + weight * sum(nlls) / 2, rel=1e-4)
    with pytest.raises(Exception, match="sft_weight"):
        DPOSettings(sft_weight=-0.1)


def test_system_option_renders_pairs_under_the_chosen_system_prompt(synthetic, stage1):
    from stmed.model.prompts import SYSTEM_PLAIN, SYSTEM_SQ, preference_prompt

    _, processor = load_model(ModelConfig(name_or_path=str(stage1)))
    pairs = _pairs(_images(synthetic), 1)
    texts = {}
    for name in ("plain", "sq"):
        dataset = PreferenceDataset(pairs, synthetic.images, processor, 256, DPOSettings(system=name).system_prompt)
        _, chosen, _, _ = dataset[(0, 0)]
        texts[name] = processor.tokenizer.decode(chosen.input_ids)
    assert SYSTEM_SQ in texts["sq"] and SYSTEM_SQ not in texts["plain"] and SYSTEM_PLAIN in texts["plain"]
    plain_default = PreferenceDataset(pairs, synthetic.images, processor, 256)[(0, 0)][1]
    assert processor.tokenizer.decode(plain_default.input_ids) == texts["plain"]  # default = METHOD's plain
    assert preference_prompt(pairs[0].question).split(" USER:")[0] == SYSTEM_PLAIN
    with pytest.raises(Exception, match="dpo.system"):
        DPOSettings(system="vuser")


def test_bf16_weights_train_without_autocast(synthetic, stage1, tmp_path):
    """A bf16 checkpoint on a device without autocast (CPU here): the trainable weights stay bf16
    instead of being upcast to fp32 and meeting bf16 activations (a dtype mismatch before)."""
    prefs = write_preferences(tmp_path / "prefs.parquet", _pairs(_images(synthetic), 4))
    cfg = _loop_config(stage1, prefs, synthetic.images, tmp_path / "out", max_steps=2)
    cfg["model"]["dtype"] = "bfloat16"
    session = LocalSession(tmp_path / "ckpt")
    train_dpo(cfg, session)
    rows = MetricsLog(tmp_path / "out" / "metrics.jsonl").read()
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=2e-2)  # bf16 rounding, same start
    projector = [p for n, p in session.model.named_parameters() if p.requires_grad and "projector" in n]
    assert projector and all(p.dtype == torch.bfloat16 for p in projector)  # fp32 here met bf16 features


# ----------------------------------------------------------------------------- the Qwen2.5-VL family


def test_qwen2_5_vl_first_step_is_ln2_and_its_reference_stays_exact(synthetic, tmp_path):
    """DPO on the other family: the policy starts as the reference, and the reference's weights are the
    stage-1 model's to the bit after training (merger included)."""
    stage1 = tmp_path / "stage1"
    model, processor = load_model(ModelConfig(preset="tiny-qwen2.5-vl", seed=3))
    model.save_pretrained(stage1)
    processor.save_pretrained(stage1)
    prefs = write_preferences(tmp_path / "prefs.parquet", _pairs(_images(synthetic), 4))
    session = LocalSession(tmp_path / "ckpt")
    train_dpo(_loop_config(stage1, prefs, synthetic.images, tmp_path / "out", max_steps=4), session)
    rows = MetricsLog(tmp_path / "out" / "metrics.jsonl").read()
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert all(math.isfinite(r["loss"]) for r in rows)

    trained = session.model
    stage1_state = load_model(ModelConfig(name_or_path=str(stage1)))[0].state_dict()
    frozen = {n: p for n, p in trained.named_parameters() if not p.requires_grad}
    assert len(frozen) == len(stage1_state)
    for name, param in frozen.items():
        assert torch.equal(param, stage1_state[_hf_name(name)]), name
    lora_b = {n: p for n, p in trained.named_parameters() if "lora_B" in n}
    assert any(".visual." in n for n in lora_b) and any("language_model" in n for n in lora_b)
    assert all(p.abs().sum() > 0 for p in lora_b.values())
    batch = collate_pairs([PreferenceDataset(_pairs(_images(synthetic), 2), synthetic.images, processor, 256)[(0, i)]
                           for i in range(2)], processor.tokenizer.pad_token_id)  # fmt: skip
    assert batch["image_grid_thw"].shape == (4, 3) and batch["input_ids"].shape[0] == 4
    # The reference pass of the trained policy is the stage-1 model's forward, exactly.
    fresh = load_model(ModelConfig(name_or_path=str(stage1)))[0].eval()
    with torch.no_grad():
        torch.testing.assert_close(reference_logps(trained, batch), forward_logps(fresh, batch), rtol=0, atol=1e-5)
