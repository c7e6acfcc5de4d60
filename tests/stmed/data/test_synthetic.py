"""The synthetic dataset: deterministic, balanced, in LLaVA-Med's formats, and its findings visible."""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path

import numpy as np
import pytest

from stmed.data.images import load_image, pixel_digest
from stmed.data.records import list_images
from stmed.data.synthetic import (
    MODALITIES,
    ORGANS,
    Findings,
    SyntheticPaths,
    dataset_stats,
    load_findings,
    make_dataset,
    render_phantom,
    text_corpus,
    write_tiny_tokenizer,
)
from stmed.model.prompts import CLOSED_SUFFIX, DESCRIBE_QUESTION, IMAGE_TOKEN
from stmed.model.tokenizer import TINY_TOKENIZER


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> SyntheticPaths:
    return make_dataset(tmp_path_factory.mktemp("synth") / "data", num_images=60, seed=3, test_images=12)


@pytest.fixture(scope="module")
def default(tmp_path_factory: pytest.TempPathFactory) -> SyntheticPaths:
    return make_dataset(tmp_path_factory.mktemp("synth_default") / "data")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _load(path: Path) -> list | dict:
    return json.loads(path.read_text())


def test_same_seed_gives_the_same_bytes_and_another_seed_other_images(tmp_path: Path) -> None:
    a = make_dataset(tmp_path / "a", num_images=20, seed=7, test_images=4)
    b = make_dataset(tmp_path / "b", num_images=20, seed=7, test_images=4)
    c = make_dataset(tmp_path / "c", num_images=20, seed=8, test_images=4)
    files_a, files_b = _files(a.root), _files(b.root)
    assert len([f for f in files_a if f.endswith(".png")]) == 20
    assert files_a == files_b
    digests = {r["pixel_digest"] for r in _load(a.findings).values()}
    assert digests.isdisjoint(r["pixel_digest"] for r in _load(c.findings).values())
    assert len(digests) == 20  # no two images alike, even with equal findings


def test_regenerating_a_smaller_dataset_removes_stale_images(tmp_path: Path) -> None:
    make_dataset(tmp_path, num_images=12, seed=0, test_images=2)
    paths = make_dataset(tmp_path, num_images=6, seed=0, test_images=2)
    assert sorted(p.name for p in paths.images.glob("*.png")) == sorted(_load(paths.findings))


def test_saved_pngs_read_back_to_the_recorded_pixel_digest(small: SyntheticPaths) -> None:
    records = _load(small.findings)
    for name, record in records.items():
        img = load_image(small.images / name)
        assert img.mode == "RGB" and img.size == (64, 64)
        pixels = np.asarray(img)
        assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
        assert pixel_digest(img) == record["pixel_digest"]
        assert Findings.from_dict(record) == load_findings(small.findings)[name]


def test_instruct_file_is_llava_med_instruct_format(small: SyntheticPaths) -> None:
    rows = _load(small.instruct)
    assert len(rows) == 48
    for row in rows:
        assert set(row) == {"id", "image", "domain", "conversations"}
        assert (small.images / row["image"]).is_file()
        turns = row["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * 5
        assert turns[0]["value"] == f"{IMAGE_TOKEN}\n{DESCRIBE_QUESTION}"
        assert sum(t["value"].count(IMAGE_TOKEN) for t in turns) == 1
        assert all(t["value"].strip() for t in turns)
        questions = [t["value"] for t in turns[2::2]]
        assert len(set(questions)) == len(questions)


def test_benchmark_files_are_llava_med_format_with_options_on_closed_only(small: SyntheticPaths) -> None:
    plain, options = _load(small.test), _load(small.test_w_options)
    assert len(plain) == len(options) == 12 * 5
    assert [r["id"] for r in plain] == list(range(len(plain)))
    for row, opt in zip(plain, options, strict=True):
        assert {"id", "image", "answer_type", "conversations"} <= set(row)
        question, answer = row["conversations"][0]["value"], row["conversations"][1]["value"]
        assert question.startswith(f"{IMAGE_TOKEN}\n") and question.count(IMAGE_TOKEN) == 1
        assert opt["id"] == row["id"] and opt["conversations"][1] == row["conversations"][1]
        if row["answer_type"] == "CLOSED":
            assert answer in ("yes", "no")
            assert opt["conversations"][0]["value"] == question + CLOSED_SUFFIX
        else:
            assert row["answer_type"] == "OPEN" and len(answer.split()) == 1
            assert opt["conversations"][0]["value"] == question


def test_splits_are_disjoint_and_unlabelled_pool_is_the_training_images(small: SyntheticPaths) -> None:
    records = _load(small.findings)
    test_images = {r["image"] for r in _load(small.test)}
    train_images = {r["image"] for r in _load(small.instruct)}
    assert test_images.isdisjoint(train_images)
    assert test_images | train_images == set(records)
    assert {n for n, r in records.items() if r["split"] == "test"} == test_images
    unlabelled = list_images(small.unlabelled)  # relative to the manifest's folder
    assert {Path(p).name for p in unlabelled} == train_images
    assert all(Path(p).is_file() for p in unlabelled)


def test_a_separate_pool_is_unlabelled_images_no_text_mentions(small: SyntheticPaths, tmp_path: Path) -> None:
    pooled = make_dataset(tmp_path / "data", num_images=60, seed=3, test_images=12, pool_images=24)
    before, after = _files(small.root), _files(pooled.root)
    # every file of the pool-less dataset but the unlabelled list and the findings is the same bytes,
    # and the findings are the same plus the pool's
    changed = ("unlabelled.json", "findings.json")
    assert {k: v for k, v in after.items() if k in before and k not in changed} == {
        k: v for k, v in before.items() if k not in changed}
    records = _load(pooled.findings)
    pool = {n for n, r in records.items() if r["split"] == "pool"}
    assert {n: r for n, r in records.items() if n not in pool} == _load(small.findings)
    assert len(pool) == 24 and {Path(p).name for p in list_images(pooled.unlabelled)} == pool
    mentioned = {r["image"] for r in _load(pooled.instruct)} | {r["image"] for r in _load(pooled.test)}
    assert pool.isdisjoint(mentioned) and all((pooled.images / n).is_file() for n in pool)
    assert sum(r["lesion"] for n, r in records.items() if n in pool) == 12  # balanced like the rest
    with pytest.raises(ValueError, match="pool_images"):
        make_dataset(tmp_path / "bad", num_images=10, pool_images=-1)


def test_default_dataset_stats_are_balanced(default: SyntheticPaths) -> None:
    stats = dataset_stats(default)
    assert stats["images"] == {"total": 300, "test": 60, "train": 240}
    found = stats["findings"]
    assert set(found["modality"]) == set(MODALITIES) and set(found["organ"]) == set(ORGANS)
    for attr in ("modality", "organ"):
        assert max(found[attr].values()) - min(found[attr].values()) <= 2
    assert abs(found["lesion"]["present"] - found["lesion"]["absent"]) <= 2
    for attr in ("side", "size", "count"):
        assert max(found[attr].values()) - min(found[attr].values()) <= 3
    test = stats["test"]
    assert (test["questions"], test["CLOSED"], test["OPEN"]) == (300, 180, 120)
    assert test["yes_no"] == {"no": 90, "yes": 90}
    assert test["closed_difficulty"]["hard"] >= 50  # side/size/count/combined, not just the easy ones
    instruct = stats["instruct"]
    assert instruct["qa_turns"] == 4 * 240 and instruct["closed"] + instruct["open"] == 960
    assert abs(instruct["yes_no"]["yes"] - instruct["yes_no"]["no"]) < 0.1 * instruct["closed"]
    assert stats["unlabelled"] == 240


def _components(mask: np.ndarray) -> list[int]:
    """Sizes of 4-connected components of a boolean mask."""
    seen, sizes = np.zeros_like(mask), []
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        queue, size = deque([start]), 0
        seen[start] = True
        while queue:
            y, x = queue.popleft()
            size += 1
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        sizes.append(size)
    return sizes


@pytest.mark.parametrize("modality", MODALITIES)
@pytest.mark.parametrize("organ", ORGANS)
def test_lesions_are_bright_separate_blobs_on_the_stated_side(modality: str, organ: str) -> None:
    areas = {}
    for size in ("small", "large"):
        for side in ("left", "right"):
            for count in (1, 2, 3):
                lesion = Findings(modality, organ, True, side, count, size)
                # Lesions are drawn last, so the same generator state renders the same scan without them.
                with_l = np.asarray(render_phantom(lesion, np.random.default_rng(count)))[..., 0]
                without = np.asarray(render_phantom(Findings(modality, organ, False),
                                                    np.random.default_rng(count)))[..., 0]
                changed = with_l != without
                assert (with_l[changed] >= 240).all()
                columns = np.nonzero(changed.any(axis=0))[0]
                assert (columns < 32).all() if side == "left" else (columns >= 32).all()
                blobs = _components(changed)
                assert len(blobs) == count, (lesion, blobs)
                areas.setdefault(size, []).extend(blobs)
    assert max(areas["small"]) * 2 < min(areas["large"])


def test_text_corpus_covers_every_dataset_text(small: SyntheticPaths) -> None:
    corpus = set(text_corpus())
    texts = [t["value"] for row in _load(small.instruct) for t in row["conversations"]]
    texts += [t["value"] for row in _load(small.test) for t in row["conversations"]]
    for text in texts:
        body = text.removeprefix(f"{IMAGE_TOKEN}\n").removesuffix(CLOSED_SUFFIX)
        assert body in corpus, body
    assert CLOSED_SUFFIX.strip() in corpus
    assert text_corpus() == sorted(corpus)


def test_bad_arguments_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="test_images"):
        make_dataset(tmp_path, num_images=10, test_images=10)
    with pytest.raises(ValueError, match="image_size"):
        make_dataset(tmp_path, num_images=10, image_size=16)
    with pytest.raises(ValueError, match="lesion"):
        Findings("ct", "brain", True, side=None, count=1, size="small")


def test_shipped_tiny_tokenizer_is_the_one_the_current_templates_train(tmp_path: Path) -> None:
    """The tiny preset loads stmed/model/tiny_tokenizer.json; it must be what training on today's texts
    gives, or a template change would silently tokenize with a stale vocabulary."""
    fresh = json.loads(write_tiny_tokenizer(tmp_path / "tok.json").read_text())
    shipped = json.loads(TINY_TOKENIZER.read_text())
    assert fresh["model"]["vocab"] == shipped["model"]["vocab"], (
        "stale tiny tokenizer: run `python -m stmed.data.synthetic --write-tiny-tokenizer`")
    assert fresh["model"]["merges"] == shipped["model"]["merges"]
    assert fresh["added_tokens"] == shipped["added_tokens"]
    assert len(shipped["model"]["vocab"]) > 500  # the BPE learned merges for the project's words
