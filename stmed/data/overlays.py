"""Burned-in text on phantoms: fake patient identifiers and laterality markers drawn into the pixels.

Real scans often carry a name, a birth date or a record number in their pixels (ultrasound frames,
secondary captures, scanned films); ``stmed.privacy`` must find and mask them before an image leaves
for a judge. The synthetic dataset (``stmed.data.synthetic``) gives a configured share of its training
and pool images such text, so the demo exercises that gate, and writes the ground truth of every
overlay beside the images (``overlays.json``) so a benchmark can tell what was planted and where.

An overlay is one line of text: a fake name (``DOE^J``), a birth date (``12.04.61``), an exam date
(``03/11/19``), a record number (``ID482193``), or a harmless laterality marker ("L", "R"). It varies in height (the text's ink, in pixels),
font (PIL's bundled Aileron, the same drawn bold, or PIL's bitmap font scaled with nearest-neighbour
pixels), contrast against the local background (light on dark or dark on light) and position (a
corner or an edge's middle). Everything is drawn from the caller's ``random.Random``: same seed, same
pixels. Nothing here is a real person's data: names and numbers come from small fixed lists and the RNG.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFont

OverlayKind = Literal["name", "birth_date", "exam_date", "record_number", "laterality"]
IDENTIFIER_KINDS: tuple[OverlayKind, ...] = ("name", "birth_date", "exam_date", "record_number")
FONTS = ("sans", "sans-bold", "pixel")
POSITIONS = ("top-left", "top-right", "bottom-left", "bottom-right", "top", "bottom")

_SURNAMES = ("DOE", "SMITH", "GARCIA", "NGUYEN", "MULLER", "ROSSI", "KOWALSKI", "TANAKA", "OKAFOR", "BROWN",
             "LEE", "SILVA", "COHEN", "HANSEN", "MORIN", "PATEL")
_GIVEN = ("JANE", "JOHN", "ANA", "LI", "OMAR", "EVA", "IVAN", "MEI", "ADA", "TOM", "ZOE", "RAJ")
MARGIN = 1
"""Pixels between the text's ink and the image border."""


@dataclass(frozen=True)
class Overlay:
    """One line of burned-in text and where its ink is, as written to ``overlays.json``."""

    kind: str
    text: str
    box: tuple[int, int, int, int]
    """The ink's bounding box ``(x0, y0, x1, y1)``, exclusive of x1/y1, in image pixels."""
    height: int
    """Height of the ink box in pixels (cap height and descenders of this text)."""
    font: str
    position: str
    fill: int
    """Grey level of the text."""
    background: int
    """Mean grey level under the text before it was drawn (contrast = ``|fill - background|``)."""

    @property
    def is_identifier(self) -> bool:
        return self.kind in IDENTIFIER_KINDS

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "box": list(self.box)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Overlay:
        return cls(**{**data, "box": tuple(int(v) for v in data["box"])})


def identifier_text(kind: str, rng: random.Random) -> str:
    """A fake identifier of ``kind``; short enough to fit a 64-pixel-wide phantom at 8 px."""
    if kind == "name":
        return f"{rng.choice(_SURNAMES)}^{rng.choice(_GIVEN)[0]}"
    if kind == "birth_date":
        return f"{rng.randint(1, 28):02d}.{rng.randint(1, 12):02d}.{rng.randint(30, 99)}"
    if kind == "exam_date":
        return f"{rng.randint(1, 28):02d}/{rng.randint(1, 12):02d}/{rng.randint(5, 24):02d}"
    if kind == "record_number":
        return f"ID{rng.randint(100000, 999999)}"
    if kind == "laterality":
        return rng.choice(("L", "R"))
    raise ValueError(f"overlay kind must be one of {IDENTIFIER_KINDS + ('laterality',)}, got {kind!r}")


def _text_mask(text: str, font: str, height: int) -> np.ndarray:
    """A boolean ink mask of ``text`` whose ink is ``height`` pixels high (cropped to the ink)."""
    if font == "pixel":  # the bitmap font, scaled so its ink is `height` high, pixels kept square
        face = ImageFont.load_default_imagefont()
        _, _, right, bottom = face.getbbox(text)
        canvas = Image.new("L", (right + 2, bottom + 2), 0)
        ImageDraw.Draw(canvas).text((0, 0), text, fill=255, font=face)
        ink = canvas.crop(canvas.getbbox())
        scale = height / ink.height
        ink = ink.resize((max(1, round(ink.width * scale)), height), Image.Resampling.NEAREST)
        return np.asarray(ink) > 127
    stroke = 1 if font == "sans-bold" and height >= 10 else 0
    size = height  # first guess; the ink of caps and digits is ~0.72 of the font size
    for _ in range(6):
        face = ImageFont.load_default(size=size)
        _, _, right, bottom = face.getbbox(text, stroke_width=stroke)
        canvas = Image.new("L", (right + 4, bottom + 4), 0)
        ImageDraw.Draw(canvas).text((2, 2), text, fill=255, font=face, stroke_width=stroke, stroke_fill=255)
        ink = canvas.crop(canvas.getbbox())
        if ink.height == height:
            break
        size = max(4, size + (height - ink.height))
    return np.asarray(ink) > 96


def _place(position: str, width: int, height: int, size: tuple[int, int], rng: random.Random) -> tuple[int, int]:
    """Top-left corner of a ``width`` x ``height`` box at ``position`` (an edge's middle varies a little)."""
    w, h = size
    right, bottom = w - MARGIN - width, h - MARGIN - height
    x = {"left": MARGIN, "right": right}.get(position.split("-")[-1], (w - width) // 2 + rng.randint(-3, 3))
    y = MARGIN if position.startswith("top") else bottom
    return max(MARGIN, min(x, right)), y


def draw_overlay(img: Image.Image, kind: str, rng: random.Random, height: int | None = None,
                 font: str | None = None, position: str | None = None, contrast: int | None = None,
                 text: str | None = None) -> tuple[Image.Image, Overlay]:
    """``img`` with one line of text burned in, and its ground truth. Unset choices are drawn from
    ``rng``: height 8-14 px (laterality 8-12), a font, a position, a contrast of 70-200 grey levels.
    A text wider than the image is drawn smaller until it fits."""
    grey = np.asarray(img.convert("L"), dtype=np.float64)
    text = text or identifier_text(kind, rng)
    height = height or (rng.randint(8, 12) if kind == "laterality" else rng.randint(8, 14))
    font = font or rng.choice(FONTS)
    position = position or rng.choice(POSITIONS)
    contrast = contrast or rng.randint(70, 200)
    ink = _text_mask(text, font, height)
    while ink.shape[1] > img.width - 2 * MARGIN and height > 5:  # too wide: a smaller line
        height -= 1
        ink = _text_mask(text, font, height)
    h, w = ink.shape
    x, y = _place(position, w, h, img.size, rng)
    background = round(float(grey[y:y + h, x:x + w].mean()))
    # Light text on a dark background, dark on a light one, `contrast` levels apart (within 0..255).
    fill = background + contrast if background + contrast <= 255 else max(0, background - contrast)
    out = np.asarray(img.convert("RGB")).copy()
    region = out[y:y + h, x:x + w]
    region[ink[:, :, None].repeat(3, axis=2)] = fill
    ys, xs = np.nonzero(ink)
    box = (x + int(xs.min()), y + int(ys.min()), x + int(xs.max()) + 1, y + int(ys.max()) + 1)
    overlay = Overlay(kind, text, box, box[3] - box[1], font, position, int(fill), background)
    return Image.fromarray(out, mode="RGB"), overlay


def add_overlays(img: Image.Image, rng: random.Random, identifiers: int = 1,
                 laterality: bool = False) -> tuple[Image.Image, list[Overlay]]:
    """Burn ``identifiers`` (0-2) fake identifiers, one to an edge (top, bottom), and an "L"/"R" marker
    in a corner of an edge left free (or beside the identifiers' edge when both are taken)."""
    if not 0 <= identifiers <= 2:
        raise ValueError(f"add_overlays: identifiers must be 0, 1 or 2, got {identifiers}")
    edges = rng.sample(("top", "bottom"), k=2)
    overlays = []
    for edge in edges[:identifiers]:
        img, overlay = draw_overlay(img, rng.choice(IDENTIFIER_KINDS), rng,
                                    position=rng.choice((f"{edge}-left", f"{edge}-right", edge)))
        overlays.append(overlay)
    if laterality:
        edge = edges[identifiers % 2]
        img, overlay = draw_overlay(img, "laterality", rng, position=rng.choice((f"{edge}-left", f"{edge}-right")))
        overlays.append(overlay)
    return img, overlays
