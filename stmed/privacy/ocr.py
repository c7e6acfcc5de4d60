"""Text regions found by Tesseract (Debian's ``tesseract-ocr``), called as a program with TSV output.

Why the program and not a Python binding: the TSV gives word boxes and confidences, which is all the
gate needs, with no dependency beyond the package; a process start costs ~40 ms, so every image of a
batch goes into one page (a mosaic) and one call. Why these settings (measured on the synthetic
phantoms, ``benchmarks/privacy_gate.py``): burned-in text on a small scan is a few pixels high, far below
the ~20-pixel characters Tesseract reads best, so each image is upscaled (``upscale``, Lanczos); text may
be light on dark or dark on light, and Tesseract's binarisation follows the page's majority, so each
image is placed twice, as it is and inverted; ``--psm 11`` (sparse text) finds scattered words rather
than paragraphs. A word counts when it holds a letter or digit and its confidence reaches
``min_confidence``. What is returned are boxes only: the recognised text never leaves this module.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from dataclasses import dataclass

from PIL import Image, ImageOps

TESSERACT = "tesseract"
PAD = 16
"""Blank pixels (in the upscaled page) around each tile: Tesseract misses words that touch an edge."""


class OCRUnavailable(RuntimeError):
    """The ``tesseract`` program is not installed; the message says how to install it."""


@dataclass(frozen=True)
class Box:
    """A text region in image pixels, ``x1``/``y1`` exclusive."""

    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    def grown(self, margin: int, width: int, height: int) -> Box:
        return Box(max(0, self.x0 - margin), max(0, self.y0 - margin), min(width, self.x1 + margin),
                   min(height, self.y1 + margin))

    def overlaps(self, other: Box) -> bool:
        return self.x0 < other.x1 and other.x0 < self.x1 and self.y0 < other.y1 and other.y0 < self.y1


def tesseract_available(command: str = TESSERACT) -> bool:
    return shutil.which(command) is not None


def _tile_pages(images: list[Image.Image], upscale: int) -> tuple[Image.Image, list[tuple[int, int, int, int]]]:
    """One grey page: each image (upscaled) and its inverse side by side, one image a row.
    Returns the page and, per tile, ``(image index, x offset, y offset, upscale)``."""
    tiles, width, y = [], 0, 0
    for img in images:
        w, h = img.width * upscale, img.height * upscale
        tiles.append((y, w, h))
        width, y = max(width, 2 * (w + 2 * PAD)), y + h + 2 * PAD
    page = Image.new("L", (width, y), 0)
    placed = []
    for n, (img, (top, w, h)) in enumerate(zip(images, tiles)):
        big = img.convert("L").resize((w, h), Image.Resampling.LANCZOS)
        page.paste(big, (PAD, top + PAD))
        page.paste(ImageOps.invert(big), (w + 3 * PAD, top + PAD))
        placed += [(n, PAD, top + PAD, w, h), (n, w + 3 * PAD, top + PAD, w, h)]
    return page, placed


def _words(tsv: str, min_confidence: float) -> list[tuple[int, int, int, int]]:
    """``(left, top, width, height)`` of every word with a letter or digit and enough confidence."""
    out = []
    for line in tsv.splitlines()[1:]:
        cols = line.split("\t")
        if len(cols) != 12 or not any(ch.isalnum() for ch in cols[11]):
            continue
        if float(cols[10]) >= min_confidence:
            out.append((int(cols[6]), int(cols[7]), int(cols[8]), int(cols[9])))
    return out


def find_text(images: list[Image.Image], upscale: int = 8, min_confidence: float = 0.0,
              command: str = TESSERACT, timeout_s: float = 120.0) -> list[list[Box]]:
    """The text regions of each image (boxes in its own pixels), from one Tesseract call."""
    if not images:
        return []
    if not tesseract_available(command):
        raise OCRUnavailable(f"privacy.burned_in_text needs the '{command}' program (Debian: apt-get install "
                             "tesseract-ocr); or set privacy.burned_in_text=allow to send images unchecked")
    page, placed = _tile_pages(images, upscale)
    buffer = io.BytesIO()
    page.save(buffer, format="PNG", compress_level=1)
    # One thread: the gate runs beside the generators; OpenMP's threads would only contend with them.
    env = {**os.environ, "OMP_THREAD_LIMIT": "1"}
    done = subprocess.run([command, "stdin", "stdout", "--psm", "11", "tsv"], input=buffer.getvalue(),
                          capture_output=True, timeout=timeout_s, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"tesseract exited with {done.returncode}: {done.stderr.decode()[-200:].strip()}")
    found: list[list[Box]] = [[] for _ in images]
    for left, top, w, h in _words(done.stdout.decode("utf-8", "replace"), min_confidence):
        cx, cy = left + w / 2, top + h / 2
        for n, ox, oy, tw, th in placed:
            if ox <= cx < ox + tw and oy <= cy < oy + th:
                img = images[n]
                box = Box(int((left - ox) // upscale), int((top - oy) // upscale),
                          -int(-(left + w - ox) // upscale), -int(-(top + h - oy) // upscale))
                found[n].append(Box(max(0, box.x0), max(0, box.y0), min(img.width, box.x1),
                                    min(img.height, box.y1)))
                break
    return found

