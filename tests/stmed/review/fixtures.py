"""A small generate run for review tests: phantom images with known findings and judged pairs about them."""

from __future__ import annotations

from pathlib import Path

from stmed.data.records import PreferencePair, write_preferences
from stmed.data.synthetic import load_findings, make_dataset
from stmed.review.queue import QueueConfig, draw_from_run
from stmed.review.store import Store


def generate_run(root: Path, images: int = 8) -> Path:
    """``root/generate/preferences.parquet`` with two pairs per image (one closed, one open question); the
    judge prefers the right answer on most, the wrong one on every fifth. Returns the parquet path."""
    paths = make_dataset(root / "data", num_images=images + 2, test_images=2)
    findings = load_findings(paths.findings)
    pairs = []
    for i, (name, f) in enumerate(sorted(findings.items())[:images]):
        image = str(paths.images / name)
        yes, no = ("Yes, there is a lesion.", "No, the scan is normal.")
        right, wrong = (yes, no) if f.lesion else (no, yes)
        flip = i % 5 == 4
        pairs.append(PreferencePair(f"c{i}", image, "Is there a lesion in this image?",
                                    wrong if flip else right, right if flip else wrong, 8.0, 2.0 + i % 3, "ref"))
        other = "mri" if f.modality != "mri" else "ct"
        pairs.append(PreferencePair(f"o{i}", image, "What imaging modality is this?",
                                    f"This is a {f.modality} scan.", f"This is a {other} scan.", 9.0, 3.0, "ref"))
    return write_preferences(root / "generate" / "preferences.parquet", pairs)


def queued_store(root: Path, url: str | None = None, items: int = 10, reviewers_per_item: int = 1) -> Store:
    store = Store(url or f"sqlite:///{root / 'review.db'}")
    store.add_items(draw_from_run(QueueConfig(preferences=str(generate_run(root)), items=items,
                                              reviewers_per_item=reviewers_per_item)))
    return store
