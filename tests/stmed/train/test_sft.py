"""Stage-1 training machinery without Ray: loss masks, schedule, data checks, learning, resume."""

from __future__ import annotations

import itertools
import json
import math
import random
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stmed.config import ConfigError, LoRAConfig, ModelConfig, config_to_dict
from stmed.data.sft import SFTDataset, collate_sft, load_sft_data
from stmed.data.synthetic import make_dataset
from stmed.model.build import build_tiny, image_seq_len, load_model
from stmed.model.conversation import LOSS_NONE, LOSS_QA, LOSS_VQ, encode, render, to_turns
from stmed.model.lora import attach_lora
from stmed.model.prompts import SYSTEM_SQ
from stmed.runs import MetricsLog
from stmed.train.losses import token_losses
from stmed.train.session import LocalSession, stored_checkpoints
from stmed.train.sft import SFTLoopConfig, sft_step, train_sft
from stmed.train.stage import (
    TrainConfig,
    build_optimizer,
    check_global_batch,
    lr_factor,
    make_trainable,
    plan_steps,
)

LORA = LoRAConfig(llm_r=4, llm_alpha=8, vit_r=2, vit_alpha=4)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("synthetic"), num_images=12, seed=0)


def _subset(paths, out: Path, n: int) -> Path:
    """An instruct file with the first ``n`` synthetic conversations."""
    rows = json.loads(paths.instruct.read_text())[:n]
    out.write_text(json.dumps(rows))
    return out


def _loop_config(instruct: Path, images: Path, out: Path, preset: str = "tiny", **train) -> dict:
    base = {
        "micro_batch_size": 2,
        "grad_accum_steps": 1,
        "max_length": 512,
        "log_every": 100,
        "checkpoint_every": 100,
    }
    cfg = SFTLoopConfig(model=ModelConfig(preset=preset), lora=LORA, train=TrainConfig(**{**base, **train}),
                        instruct_path=str(instruct), image_root=str(images), output_dir=str(out),
                        export_merged=False)  # fmt: skip
    return config_to_dict(cfg, redact=False)


# ----------------------------------------------------------------------------- loss


def test_loss_counts_exactly_the_encoded_targets(synthetic):
    _, processor = build_tiny(0)
    conv = json.loads(synthetic.instruct.read_text())[0]["conversations"]
    enc = encode(render(to_turns(conv, 1.0, random.Random(0)), SYSTEM_SQ), processor.tokenizer,
                 image_seq_len(processor), 512)  # fmt: skip
    labels, kinds = torch.tensor([enc.labels]), torch.tensor([enc.loss_kind])
    ce, k = token_losses(torch.zeros(1, len(enc), len(processor.tokenizer)), labels, kinds)
    assert ce.numel() == enc.num_targets > 0  # position 0 (<s>) is never a target
    assert int((k == LOSS_VQ).sum()) == enc.loss_kind.count(LOSS_VQ) > 0
    assert int((k == LOSS_QA).sum()) == enc.loss_kind.count(LOSS_QA) > 0
    assert LOSS_NONE not in k.tolist()


# ----------------------------------------------------------------------------- schedule and config


def test_schedule_warms_up_then_decays_per_group():
    factors = [lr_factor(s, warmup_steps=3, total_steps=20) for s in range(21)]
    assert factors[:4] == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0])
    assert all(a >= b for a, b in itertools.pairwise(factors[3:])) and factors[20] == pytest.approx(0.0)
    assert factors[3 + 17 // 2] == pytest.approx(0.5 * (1 + math.cos(math.pi * 8 / 17)))

    model = attach_lora(build_tiny(0)[0], LORA)
    train = TrainConfig(lr_llm=1e-3, lr_vit=5e-4, lr_projector=1e-4, warmup_ratio=0.1)
    optimizer, scheduler = build_optimizer(model, train, total_steps=20)
    peaks = {"llm_lora": 1e-3, "vit_lora": 5e-4, "projector": 1e-4}
    for step in range(20):
        for group in optimizer.param_groups:
            assert group["lr"] == pytest.approx(peaks[group["name"]] * lr_factor(step, 2, 20))
        optimizer.step()
        scheduler.step()
    assert {g["name"] for g in optimizer.param_groups} == set(peaks)


def test_global_batch_mismatch_names_the_keys():
    check_global_batch(TrainConfig(micro_batch_size=2, grad_accum_steps=4, global_batch_size=16), 2)
    with pytest.raises(ConfigError, match=r"train.global_batch_size=32.*ray.num_workers \(2\) = 16"):
        check_global_batch(TrainConfig(micro_batch_size=2, grad_accum_steps=4, global_batch_size=32), 2)
    with pytest.raises(ConfigError, match="train.warmup_ratio"):
        TrainConfig(warmup_ratio=1.5)


def test_a_length_grouped_step_has_the_ungrouped_loss_and_gradient_with_less_padding(synthetic, tmp_path):
    """Grouping moves a step's samples between its micro-batches; the loss is a mean over the step's
    target tokens (not a mean of micro-batch means), so the step's loss and gradient stay the same."""
    rows = json.loads(synthetic.instruct.read_text())[:8]
    for i, row in enumerate(rows):  # 1 to 5 question-answer rounds: ~100 to ~260 tokens
        row["conversations"] = row["conversations"][: 2 * (1 + i % 5)]
    (tmp_path / "varied.json").write_text(json.dumps(rows))
    _, processor = build_tiny(0)
    data = load_sft_data(tmp_path / "varied.json", synthetic.images, processor, max_length=512)
    assert max(data.lengths) - min(data.lengths) > 100
    dataset = SFTDataset(data.samples, synthetic.images, processor, 512, sq_ratio=0.5, seed=0)
    collate_fn = partial(collate_sft, pad_id=processor.tokenizer.pad_token_id)
    train = TrainConfig(micro_batch_size=2, grad_accum_steps=4, max_grad_norm=1e6)  # 8 samples: one step
    keys, stats, norms, grads = {}, {}, {}, {}
    for grouped in (False, True):
        plan, _ = plan_steps(8, replace(train, group_by_length=grouped), 0, 1, lengths=data.lengths)
        keys[grouped] = list(plan.micro_batches(0, 1))
        micro = [collate_fn([dataset[key] for key in batch]) for batch in keys[grouped]]
        torch.manual_seed(0)  # the same LoRA init for both
        model = make_trainable(build_tiny(0)[0], LORA, gradient_checkpointing=False, upcast=False)
        model.eval()  # no dropout, whose draws would follow the micro-batch shapes
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        # Plain SGD at lr 1, unclipped: the update is the gradient itself (Adam's first step, about
        # lr x sign(g), would blow float noise in near-zero gradients up to lr).
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        stats[grouped], norms[grouped] = sft_step(
            model, micro, optimizer, scheduler, train, 1, torch.device("cpu")
        )
        grads[grouped] = {n: before[n] - p.detach() for n, p in model.named_parameters() if p.requires_grad}

    flat = {grouped: sorted(itertools.chain.from_iterable(keys[grouped])) for grouped in keys}
    assert keys[True] != keys[False] and flat[True] == flat[False]  # the same samples, other micro-batches
    plain, grouped = stats[False].tolist(), stats[True].tolist()
    assert grouped[1:8:2] == plain[1:8:2]  # target counts (all, qa, vq) and real tokens
    assert grouped[0] / grouped[1] == pytest.approx(plain[0] / plain[1], rel=1e-6)
    assert norms[True] == pytest.approx(norms[False], rel=1e-5) and norms[True] > 0
    for name, grad in grads[True].items():
        torch.testing.assert_close(grad, grads[False][name], rtol=1e-5, atol=1e-6, msg=name)
    # Positions less real tokens is the padding: grouped pads less than half as much on these lengths.
    pad_plain, pad_grouped = plain[8] - plain[6], grouped[8] - grouped[6]
    assert pad_grouped < 0.5 * pad_plain, (pad_grouped, pad_plain)


# ----------------------------------------------------------------------------- data


def test_data_check_skips_with_reasons_and_refuses_an_empty_set(synthetic, tmp_path):
    rows = json.loads(synthetic.instruct.read_text())[:4]
    rows[1]["image"] = "missing.png"
    rows[2]["conversations"] = rows[2]["conversations"][:1]  # a question with no answer
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows[3]["image"] = str(tmp_path / "broken.png")
    instruct = tmp_path / "instruct.json"
    instruct.write_text(json.dumps(rows))
    _, processor = build_tiny(0)
    data = load_sft_data(instruct, synthetic.images, processor, max_length=512)
    report = data.report()
    assert [s.id for s in data.samples] == [rows[0]["id"]]
    assert report["samples_read"] == 4 and report["skipped"] == 3
    reasons = " | ".join(report["skipped_by_reason"])
    assert "image: file not found" in reasons and "image: unsupported format" in reasons
    assert "unanswered" in reasons or "two turns" in reasons

    # The image alone (64 tokens) does not fit: every sample is skipped, and that is an error.
    with pytest.raises(ValueError, match="no usable training samples"):
        load_sft_data(instruct, synthetic.images, processor, max_length=32)


# ----------------------------------------------------------------------------- the loop


def _groups_that_trained(model, fresh, vision_marker: str, projector_marker: str) -> dict[str, bool]:
    """Which trainable groups moved from ``fresh`` (LoRA B is zero at init; the projector copy equals the
    original), asserting that every frozen base weight is bit for bit ``fresh``'s."""
    changed = {"llm": False, "vit": False, "projector": False}
    for name, param in model.named_parameters():
        if "lora_B" in name:  # zero at init: any non-zero value was learned
            changed["vit" if vision_marker in name else "llm"] |= bool(param.abs().max() > 0)
        elif "modules_to_save" in name:
            assert projector_marker in name
            original = fresh.get_parameter(name.replace("base_model.model.", "").replace(
                ".modules_to_save.default", ""))  # fmt: skip
            changed["projector"] |= not torch.equal(param.detach(), original)
        elif "lora_A" not in name:
            base_name = name.replace("base_model.model.", "").replace(".base_layer", "")
            base_name = base_name.replace(".original_module", "")
            assert torch.equal(param.detach(), fresh.get_parameter(base_name)), f"base weight {name} changed"
    return changed


def test_overfitting_one_batch_trains_every_group_and_nothing_else(synthetic, tmp_path):
    instruct = _subset(synthetic, tmp_path / "two.json", 2)
    # sq_ratio=1: every later question is a target, so the batch (and its targets) is the same each step.
    config = _loop_config(instruct, synthetic.images, tmp_path / "out", max_steps=30, sq_ratio=1.0,
                          lr_llm=1e-2, lr_vit=1e-2, lr_projector=1e-2, warmup_ratio=0.0)  # fmt: skip
    session = LocalSession(tmp_path / "ckpt")
    train_sft(config, session)

    rows = MetricsLog(tmp_path / "out" / "metrics.jsonl").read()
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert all(math.isfinite(r["loss_qa"]) and math.isfinite(r["loss_vq"]) for r in rows)
    # LoRA alone on the tiny model's random base learns slowly (full fine-tuning would memorise the
    # batch); a steady fall of a fifth in 30 steps is what LoRA + projector manage.
    assert rows[-1]["loss"] < 0.85 * rows[0]["loss"], (rows[0]["loss"], rows[-1]["loss"])
    assert all(rows[i + 5]["loss"] < rows[i]["loss"] for i in range(0, 25, 5))
    assert rows[-1]["loss_vq"] < rows[0]["loss_vq"] and rows[-1]["loss_qa"] < rows[0]["loss_qa"]

    changed = _groups_that_trained(session.model, build_tiny(0)[0], "vision_tower", "multi_modal_projector")
    assert changed == {"llm": True, "vit": True, "projector": True}
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()


def test_resume_continues_at_the_saved_step_and_matches_an_unbroken_run(synthetic, tmp_path):
    instruct = _subset(synthetic, tmp_path / "eight.json", 8)
    common = {"max_steps": 6, "grad_accum_steps": 2, "checkpoint_every": 2, "lr_llm": 5e-3}
    train_sft(
        _loop_config(instruct, synthetic.images, tmp_path / "a", **common), LocalSession(tmp_path / "ca")
    )

    broken = _loop_config(instruct, synthetic.images, tmp_path / "b", fail_at_step=5, **common)
    session = LocalSession(tmp_path / "cb")
    with pytest.raises(RuntimeError, match="injected failure before step 5"):
        train_sft(broken, session)
    assert session.latest_checkpoint().name == "checkpoint_000004"
    train_sft(broken, session)  # the marker file makes the fault fire once only

    attempts = MetricsLog(tmp_path / "b" / "attempts.jsonl").read()
    assert [a["start_step"] for a in attempts] == [0, 4]
    assert [r["step"] for r in MetricsLog(tmp_path / "b" / "metrics.jsonl").read()] == [1, 2, 3, 4, 5, 6]
    # Same data order, relabelling, dropout stream and optimiser state: the same weights at the end.
    a = load_file(tmp_path / "a" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    rows_a = MetricsLog(tmp_path / "a" / "metrics.jsonl").read()
    rows_b = MetricsLog(tmp_path / "b" / "metrics.jsonl").read()
    assert rows_b[-1]["loss"] == pytest.approx(rows_a[-1]["loss"], rel=1e-6)
    # checkpoint_every=2 with num_to_keep=2: only the last two checkpoints stay.
    assert [p.name for p in stored_checkpoints(session.checkpoint_root)] == [
        "checkpoint_000004",
        "checkpoint_000006",
    ]


def test_gradient_checkpointing_changes_memory_not_results(synthetic, tmp_path):
    instruct = _subset(synthetic, tmp_path / "four.json", 4)
    adapters = []
    for flag in (False, True):
        out = tmp_path / f"gc{flag}"
        config = _loop_config(
            instruct, synthetic.images, out, max_steps=3, lr_llm=5e-3, gradient_checkpointing=flag
        )
        train_sft(config, LocalSession(tmp_path / f"c{flag}"))
        adapters.append(load_file(out / "adapter" / "adapter_model.safetensors"))
    # Recomputation replays dropout's RNG, so both runs take the same steps; the ViT LoRA is trained in both.
    for key in adapters[0]:
        torch.testing.assert_close(adapters[0][key], adapters[1][key], rtol=1e-5, atol=1e-6, msg=key)
    assert any("vision_tower" in k and "lora_B" in k and adapters[1][k].abs().max() > 0 for k in adapters[1])


def test_a_diverged_loss_stops_the_run_before_a_checkpoint_or_export(synthetic, tmp_path, monkeypatch):
    """Hardening finding 9: a NaN loss from step 2 used to run to the end and export a NaN model."""
    from stmed.train import sft
    from stmed.train.stage import Diverged

    real_step = sft.sft_step
    calls = []

    def step_then_nan(*args, **kwargs):
        stats, grad_norm = real_step(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            stats[0] = float("nan")  # the summed cross-entropy of step 2
        return stats, grad_norm

    monkeypatch.setattr(sft, "sft_step", step_then_nan)
    instruct = _subset(synthetic, tmp_path / "instruct.json", 8)
    session = LocalSession(tmp_path / "ckpt")
    with pytest.raises(Diverged, match=r"step 2: loss is nan.*train.lr_"):
        train_sft(
            _loop_config(instruct, synthetic.images, tmp_path / "out", max_steps=4, checkpoint_every=1),
            session,
        )
    assert [r["step"] for r in session.reports] == [1]  # step 1 reported (and checkpointed), step 2 not
    assert not (tmp_path / "out" / "adapter").exists()


@pytest.mark.parametrize("value", [".inf", ".nan", "-.inf", "inf", "nan"])
def test_non_finite_learning_rates_are_refused(value):
    from stmed.config import ConfigError, build_config

    with pytest.raises(ConfigError, match=r"train.lr_llm: expected a finite number"):
        build_config(
            SFTLoopConfig,
            {
                "model": {"preset": "tiny"},
                "lora": {},
                "instruct_path": "i",
                "image_root": "r",
                "output_dir": "o",
            },
            [f"train.lr_llm={value}"],
        )


def test_qwen2_5_vl_preset_trains_every_group_and_nothing_else(synthetic, tmp_path):
    """The same loop on the other family: per-image token counts, image grids, the merger as projector
    (its merged export: tests/stmed/model/test_families.py)."""
    instruct = _subset(synthetic, tmp_path / "two.json", 2)
    config = _loop_config(instruct, synthetic.images, tmp_path / "out", preset="tiny-qwen2.5-vl",
                          max_steps=15, sq_ratio=1.0, lr_llm=1e-2, lr_vit=1e-2, lr_projector=1e-2,
                          warmup_ratio=0.0)  # fmt: skip
    session = LocalSession(tmp_path / "ckpt")
    train_sft(config, session)
    rows = MetricsLog(tmp_path / "out" / "metrics.jsonl").read()
    assert [r["step"] for r in rows] == list(range(1, 16))
    assert rows[-1]["loss_vq"] < rows[0]["loss_vq"] and rows[-1]["loss_qa"] < rows[0]["loss_qa"]

    fresh, _ = load_model(ModelConfig(preset="tiny-qwen2.5-vl"))
    changed = _groups_that_trained(session.model, fresh, ".visual.", ".merger.")
    assert changed == {"llm": True, "vit": True, "projector": True}
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
