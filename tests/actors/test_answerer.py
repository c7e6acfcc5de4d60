"""The Answerer actor called on a batch directly (no Ray): one greedy generate, bad images as rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from actors.answerer import Answerer, vllm_answer
from stmed.model.generate import HFEngine, Sampling, answer


@pytest.fixture(scope="module")
def answerer() -> Answerer:
    return Answerer({"preset": "tiny"}, system="sq", max_new_tokens=5, batch_size=4)


def _batch(paths: list[str]) -> dict[str, np.ndarray]:
    n = len(paths)
    return {"question_id": np.array([f"q{i}" for i in range(n)]), "image_path": np.array(paths),
            "question": np.array(["Is there a lesion?"] * n), "answer_type": np.array(["CLOSED"] * n),
            "position": np.arange(n)}


def test_answers_match_a_direct_call_and_bad_images_become_error_rows(tmp_path: Path, answerer: Answerer):
    good = tmp_path / "good.png"
    Image.new("RGB", (64, 64), (90, 90, 90)).save(good)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not a png at all")
    out = answerer(_batch([str(good), str(tmp_path / "missing.png"), str(corrupt), str(good)]))

    assert list(out["position"]) == [0, 1, 2, 3]  # extra columns pass through
    assert list(out["error"][[0, 3]]) == ["", ""]
    assert "file not found" in out["error"][1] and "missing.png" in out["error"][1]
    assert "corrupt.png" in out["error"][2]
    assert list(out["text"][[1, 2]]) == ["", ""]
    # The same engine asked about the good image alone: batching with failed rows changes nothing.
    direct = answer(answerer.engine, [Image.open(good).convert("RGB")], ["Is there a lesion?"],
                    Sampling(max_new_tokens=5))
    assert out["text"][0] == direct[0] == out["text"][3]
    assert out["gen_s"].shape == (4,) and np.all(out["gen_s"] > 0)


def test_a_batch_of_only_bad_images_generates_nothing(tmp_path: Path, answerer: Answerer):
    out = answerer(_batch([str(tmp_path / "a.png"), str(tmp_path)]))
    assert list(out["text"]) == ["", ""]
    assert "file not found" in out["error"][0] and "directory" in out["error"][1]


def test_missing_column_and_bad_settings_are_named(answerer: Answerer):
    with pytest.raises(ValueError, match="image_path"):
        answerer({"question_id": np.array(["q"]), "question": np.array(["x"]),
                  "answer_type": np.array(["OPEN"])})
    with pytest.raises(ValueError, match="system"):
        Answerer({"preset": "tiny"}, system="vicuna")
    with pytest.raises(ValueError, match="system"):
        vllm_answer(None, "model", system="vicuna")  # refused before Ray Data LLM / vLLM is imported
    assert isinstance(answerer.engine, HFEngine) and answerer.engine.batch_size == 4


def test_a_qwen2_5_vl_answerer_answers_images_of_different_sizes_like_a_direct_call(tmp_path: Path):
    """Evaluation on the other family: one batch holds images of different sizes (different token counts)."""
    qwen = Answerer({"preset": "tiny-qwen2.5-vl"}, system="sq", max_new_tokens=5, batch_size=4)
    assert qwen.engine.chat.name == "chatml"
    paths = []
    for i, size in enumerate(((64, 64), (64, 32), (96, 48))):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    out = qwen(_batch(paths))
    assert list(out["error"]) == ["", "", ""]
    for i, path in enumerate(paths):
        direct = answer(qwen.engine, [Image.open(path).convert("RGB")], ["Is there a lesion?"], Sampling(max_new_tokens=5))
        assert out["text"][i] == direct[0]
