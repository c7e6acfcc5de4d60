"""The contamination guard: benchmark images (or near copies of them) removed from the self-play pool.

Self-play pools built from public figures overlap the benchmarks (PMC-derived sets share images with
VQA-RAD, SLAKE, PathVQA); a model trained on a benchmark's images scores better on it for no good
reason. Before self-play, each pool image's perceptual hash is compared with the benchmark images'; one
within ``contamination.max_distance`` bits of any is removed and listed (``contamination.jsonl``).

The hash (a pHash): the grey image resized to 32x32, its 2-D DCT, the 16x16 lowest frequencies less the
constant term, each bit "above the median" (255 bits). Low frequencies survive resizing and JPEG
re-encoding. A crop shifts them, so each benchmark image is hashed whole and at 25 crops (5x5 anchors)
for each of four kept shares of each side, 97.5% to 90% (101 hashes): a pool copy cropped by up to 10%
lands near one of them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from stmed.config import ConfigError
from stmed.data.images import ImageLoadError, load_image
from stmed.data.records import list_images
from stmed.log import get_logger

log = get_logger(__name__)

HASH_SIDE, DCT_LOW = 32, 16
CROP_KEEPS = (0.975, 0.95, 0.925, 0.9)
ANCHORS = (0.0, 0.25, 0.5, 0.75, 1.0)
THUMB_SIDE = 128
"""Benchmark images are shrunk to this longest side before their crops are hashed (the hash reads 32x32)."""


@dataclass(frozen=True)
class ContaminationSettings:
    """Benchmark images to keep out of the self-play pool (config group ``contamination``)."""

    benchmarks: list[str] = field(default_factory=list)
    """Benchmark files or folders whose images the pool must not hold (a LLaVA-Med test file, an image
    folder, a JSON list); empty: no check."""
    benchmark_root: str | None = None
    """Where the benchmark files' relative image paths live (default: each file's folder)."""
    max_distance: int = 44
    """Hamming distance (of 255 bits) at or below which a pool image is a copy of a benchmark image."""
    remove: bool = True
    """Remove the near-duplicates from the pool (false: only list them)."""

    def __post_init__(self) -> None:
        if not 0 <= self.max_distance < 128:
            raise ConfigError(f"contamination.max_distance must be in 0..127 bits, got {self.max_distance}")


def _dct_matrix(n: int) -> np.ndarray:
    k, x = np.arange(n)[:, None], np.arange(n)[None, :]
    return np.cos(np.pi * (2 * x + 1) * k / (2 * n))


_DCT = _dct_matrix(HASH_SIDE)


def phash(img: Image.Image) -> np.ndarray:
    """255 bits (a bool array) of the image's low-frequency structure."""
    grey = np.asarray(img.convert("L").resize((HASH_SIDE, HASH_SIDE), Image.Resampling.LANCZOS), dtype=np.float64)
    low = (_DCT @ grey @ _DCT.T)[:DCT_LOW, :DCT_LOW].ravel()[1:]
    return low > np.median(low)


def crops(img: Image.Image) -> list[Image.Image]:
    """The image whole, then crops keeping ``CROP_KEEPS`` of each side at 5x5 anchors each."""
    if max(img.size) > THUMB_SIDE:
        scale = THUMB_SIDE / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                         Image.Resampling.LANCZOS)
    out = [img]
    for keep in CROP_KEEPS:
        w, h = max(1, round(img.width * keep)), max(1, round(img.height * keep))
        for ay in ANCHORS:
            for ax in ANCHORS:
                x, y = round((img.width - w) * ax), round((img.height - h) * ay)
                out.append(img.crop((x, y, x + w, y + h)))
    return out


@dataclass(frozen=True)
class BenchmarkIndex:
    """Hashes of every benchmark image and its crops; ``owners[i]`` names the image of ``hashes[i]``."""

    hashes: np.ndarray
    owners: list[str]

    @classmethod
    def build(cls, images: dict[str, Image.Image]) -> BenchmarkIndex:
        hashes, owners = [], []
        for name, img in images.items():
            for crop in crops(img):
                hashes.append(phash(crop))
                owners.append(name)
        return cls(np.packbits(np.array(hashes, dtype=bool).reshape(len(hashes), -1), axis=1), owners)

    def nearest(self, img: Image.Image) -> tuple[str, int]:
        """The benchmark image closest to ``img`` and the distance in bits."""
        if not self.owners:
            return "", 256
        probe = np.packbits(phash(img))
        distances = np.unpackbits(self.hashes ^ probe, axis=1).sum(axis=1)
        best = int(distances.argmin())
        return self.owners[best], int(distances[best])


def near_duplicates(pool: dict[str, Image.Image], index: BenchmarkIndex,
                    max_distance: int) -> list[dict[str, object]]:  # fmt: skip
    """``{"image_id", "benchmark_image", "distance"}`` for each pool image within ``max_distance``."""
    found = []
    for image_id, img in pool.items():
        owner, distance = index.nearest(img)
        if distance <= max_distance:
            found.append({"image_id": image_id, "benchmark_image": owner, "distance": distance})
    return found


def benchmark_paths(settings: ContaminationSettings) -> list[str]:
    """Every image path the configured benchmarks list (de-duplicated, in order)."""
    paths: list[str] = []
    for bench in settings.benchmarks:
        if not os.path.exists(bench):
            raise ConfigError(f"contamination.benchmarks: {bench} does not exist; list benchmark files or "
                              "folders that do")
        paths += list_images(bench, settings.benchmark_root)
    return list(dict.fromkeys(paths))


def remove_benchmark_copies(images: list[dict[str, str]], settings: ContaminationSettings,
                            listing: str | os.PathLike) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """The sampled pool (``{"image_id", "image_path"}`` rows) less its copies of benchmark images, which
    are listed in ``listing`` (JSONL); and the counts for the summary. Unreadable images are left to
    the generator, which records them."""
    if not settings.benchmarks:
        return images, {"checked": False}
    bench = {}
    for path in benchmark_paths(settings):
        try:
            bench[path] = load_image(path)
        except ImageLoadError:
            continue
    index = BenchmarkIndex.build(bench)
    pool = {}
    for row in images:
        try:
            pool[row["image_id"]] = load_image(row["image_path"])
        except ImageLoadError:
            continue
    found = near_duplicates(pool, index, settings.max_distance)
    Path(listing).write_text("".join(json.dumps(f) + "\n" for f in found))
    dropped = {f["image_id"] for f in found} if settings.remove else set()
    if found:
        log.warning("%d pool image(s) are near copies of benchmark images (listed in %s)%s", len(found),
                    listing, "; removed from the pool" if settings.remove else "")
    kept = [row for row in images if row["image_id"] not in dropped]
    return kept, {"checked": True, "benchmark_images": len(bench), "pool_images": len(pool),
                  "near_duplicates": len(found), "removed": len(dropped), "max_distance": settings.max_distance}
