"""Checkpoint folders: a resume restores weights, optimiser, schedule and RNG, and never runs code."""

from __future__ import annotations

import json
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from stmed.config import LoRAConfig
from stmed.data.records import DataError
from stmed.model.build import build_tiny
from stmed.model.lora import attach_lora
from stmed.train.checkpoints import load_checkpoint, save_checkpoint
from stmed.train.stage import TrainConfig, build_optimizer

LORA = LoRAConfig(llm_r=4, llm_alpha=8, vit_r=2, vit_alpha=4)


class Planted:
    """A pickle whose loading writes ``marker``: what an attacker plants in shared checkpoint storage."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _prepared():
    model = attach_lora(build_tiny(0)[0], LORA)
    optimizer, scheduler = build_optimizer(model, TrainConfig(lr_llm=1e-3), total_steps=10)
    return model, optimizer, scheduler


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    model, optimizer, scheduler = _prepared()
    loss = sum(p.sum() for p in model.parameters() if p.requires_grad)
    loss.backward()
    optimizer.step()
    scheduler.step()
    ckpt = tmp_path_factory.mktemp("ckpt")
    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)
    save_checkpoint(ckpt, model, optimizer, scheduler, step=3, rank=0)
    return ckpt


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_resume_restores_the_step_and_every_random_stream(saved):
    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    model, optimizer, scheduler = _prepared()
    assert load_checkpoint(saved, model, optimizer, scheduler, rank=0) == 3
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert scheduler.last_epoch == 1
    assert sorted(p.name for p in saved.iterdir()) == ["adapter", "rng_rank0.json", "trainer_state.pt"]
    assert json.loads((saved / "rng_rank0.json").read_text())["numpy"][0] == "MT19937"


def test_a_pickle_planted_as_trainer_state_is_refused_and_never_run(saved, tmp_path):
    ckpt = _copy(saved, tmp_path / "ckpt")
    marker = tmp_path / "owned"
    torch.save({"optimizer": Planted(marker), "scheduler": {}, "step": 1}, ckpt / "trainer_state.pt")
    model, optimizer, scheduler = _prepared()
    with pytest.raises(DataError, match="not a checkpoint stmed wrote.*nothing was run") as err:
        load_checkpoint(ckpt, model, optimizer, scheduler, rank=0)
    assert not marker.exists()
    assert "\n" not in str(err.value) and str(ckpt) in str(err.value)


def test_planted_rng_pickles_and_other_files_are_never_opened(saved, tmp_path):
    ckpt = _copy(saved, tmp_path / "ckpt")
    marker = tmp_path / "owned"
    for name in ("rng_rank0.pt", "rng_rank1.pt", "extra.pkl"):  # what an older stmed wrote, or anyone
        (ckpt / name).write_bytes(pickle.dumps(Planted(marker)))
    model, optimizer, scheduler = _prepared()
    assert load_checkpoint(ckpt, model, optimizer, scheduler, rank=1) == 3  # rank 1: no JSON → reseeded
    assert not marker.exists()


def test_an_adapter_without_safetensors_is_refused(saved, tmp_path):
    ckpt = _copy(saved, tmp_path / "ckpt")
    (ckpt / "adapter" / "adapter_model.safetensors").unlink()
    (ckpt / "adapter" / "adapter_model.bin").write_bytes(pickle.dumps(Planted(tmp_path / "owned")))
    model, optimizer, scheduler = _prepared()
    with pytest.raises(DataError, match="safetensors weights only"):
        load_checkpoint(ckpt, model, optimizer, scheduler, rank=0)
    assert not (tmp_path / "owned").exists()
