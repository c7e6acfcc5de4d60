"""The burned-in-text gate: what a judge receives of an image, decided before any request is built.

``privacy.burned_in_text`` chooses what happens to an image with text in its pixels (found by a DBNet text
detector, ``stmed.privacy.textdet``, or by Tesseract, ``stmed.privacy.ocr``, as ``privacy.detector`` says;
or declared by DICOM's Burned In Annotation (0028,0301) = YES):

- ``mask`` (the default, for every judge including the offline reference judge): each text region is
  filled with one grey level, ``mask_margin_px`` wider on every side, and the masked pixels are sent; a
  DICOM that declares burned-in text where OCR locates none is refused (the text cannot be masked);
- ``refuse``: the image leaves self-play with the reason recorded (``failures.jsonl``);
- ``allow``: the image is sent as it is, unchecked.

The gate runs once per image (the generator gates an image before its questions are asked; its pairs
share the result), and ``TextGate`` keeps each result by pixel digest, so an image seen again costs a
dictionary lookup. A ``GateResult`` holds counts and digests, never the recognised text.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

from stmed.config import ConfigError
from stmed.data.images import decode_data_url, image_to_data_url, pixel_digest
from stmed.privacy.ocr import Box, find_text
from stmed.privacy.textdet import DetectorSettings, find_text_regions

GateMode = Literal["mask", "refuse", "allow"]
Detector = Callable[[list[Image.Image]], list[list[Box]]]
PASSED, MASKED, REFUSED, ALLOWED = "passed", "masked", "refused", "allowed"
"""Gate actions: no text found / text masked / image not sent / sent unchecked (``allow``)."""


@dataclass(frozen=True)
class PrivacySettings:
    """What may leave for a judge (config group ``privacy``)."""

    burned_in_text: GateMode = "mask"
    """``mask`` text regions, ``refuse`` images with text (dropped from self-play, reason recorded), or
    ``allow`` every image unchecked."""
    mask_margin_px: int = 2
    """Pixels added on every side of a found text region before it is filled."""
    mask_fill: int = 0
    """Grey level of the fill (0: black)."""
    detector: Literal["dbnet", "tesseract"] = "dbnet"
    """What finds text: ``dbnet`` (PP-OCRv6's text detector on onnxruntime, its model in the rapidocr
    wheel; ``stmed.privacy.textdet``) or ``tesseract`` (Debian's tesseract-ocr; ``stmed.privacy.ocr``).
    docs/medical-data.md has both measured."""
    detector_threshold: float = 0.5
    """``dbnet``: text probability from which a pixel is text."""
    detector_target_side: int = 256
    """``dbnet``: a small image is enlarged (at most 4x) until its shorter side is this many pixels."""
    text_confidence: float = 0.0
    """``dbnet``: above 0, each found region is read by PP-OCRv6's recogniser (in the same wheel) and masked
    only when it reads ``text_min_chars`` letters or digits with at least this mean confidence (0-1); only
    counts and confidences are used, the text is never decoded. 0 (default): every region is masked, no
    recognition runs (on VQA-RAD every found region is real text or a marker: docs/medical-data.md)."""
    text_min_chars: int = 1
    """``dbnet`` with ``text_confidence`` above 0: letters or digits a region must read as."""
    ocr_upscale: int = 8
    """``tesseract``: factor the image is enlarged by (burned-in text on a small scan is a few pixels high)."""
    ocr_min_confidence: float = 0.0
    """``tesseract``: word confidence (0-100) from which a word counts as text."""
    ocr_images_per_call: int = 16
    """Images given to one detector call (``tesseract``: tiled into one page, as a process start is ~40 ms;
    ``dbnet``: one model call an image)."""

    def __post_init__(self) -> None:
        if self.burned_in_text not in ("mask", "refuse", "allow"):
            raise ConfigError(f"privacy.burned_in_text must be 'mask', 'refuse' or 'allow', "
                              f"got {self.burned_in_text!r}")
        if not 0 <= self.mask_margin_px <= 64:
            raise ConfigError(f"privacy.mask_margin_px must be in 0..64, got {self.mask_margin_px}")
        if not 0 <= self.mask_fill <= 255:
            raise ConfigError(f"privacy.mask_fill must be a grey level 0..255, got {self.mask_fill}")
        if self.detector not in ("dbnet", "tesseract"):
            raise ConfigError(f"privacy.detector must be 'dbnet' or 'tesseract', got {self.detector!r}")
        if not 0.0 < self.detector_threshold < 1.0:
            raise ConfigError(f"privacy.detector_threshold must be in (0, 1), got {self.detector_threshold}")
        if not 16 <= self.detector_target_side <= 2048:
            raise ConfigError(f"privacy.detector_target_side must be in 16..2048, got {self.detector_target_side}")
        if not 0.0 <= self.text_confidence < 1.0:
            raise ConfigError(f"privacy.text_confidence must be in [0, 1), got {self.text_confidence}")
        if self.text_min_chars < 1:
            raise ConfigError(f"privacy.text_min_chars must be >= 1, got {self.text_min_chars}")
        if not 1 <= self.ocr_upscale <= 16:
            raise ConfigError(f"privacy.ocr_upscale must be in 1..16, got {self.ocr_upscale}")
        if not 0.0 <= self.ocr_min_confidence <= 100.0:
            raise ConfigError(f"privacy.ocr_min_confidence must be in 0..100, got {self.ocr_min_confidence}")
        if self.ocr_images_per_call < 1:
            raise ConfigError(f"privacy.ocr_images_per_call must be >= 1, got {self.ocr_images_per_call}")


@dataclass(frozen=True)
class GateResult:
    """The gate's decision on one image: what is sent (``data_url``, None when refused) and its audit."""

    action: str
    regions: int
    """Text regions found (masked ones under ``mask``); 0 under ``allow``."""
    data_url: str | None
    sent_digest: str
    """Pixel digest of what is sent (``stmed.data.images.pixel_digest``); "" when refused."""
    reason: str = ""
    """Why an image was refused (counts only, never text)."""


def mask_regions(img: Image.Image, boxes: list[Box], margin: int, fill: int) -> Image.Image:
    """A copy of ``img`` with every box, grown by ``margin``, filled with grey level ``fill``."""
    pixels = np.asarray(img.convert("RGB")).copy()
    for box in boxes:
        g = box.grown(margin, img.width, img.height)
        pixels[g.y0:g.y1, g.x0:g.x1] = fill
    return Image.fromarray(pixels, mode="RGB")


def _decide(settings: PrivacySettings, img: Image.Image, boxes: list[Box], declared: bool) -> GateResult:
    if settings.burned_in_text == "refuse" and (boxes or declared):
        why = f"{len(boxes)} text region(s) found" if boxes else "DICOM Burned In Annotation = YES"
        return GateResult(REFUSED, len(boxes), None, "", f"burned_in_text: {why} (privacy.burned_in_text=refuse)")
    if declared and not boxes:
        return GateResult(REFUSED, 0, None, "", "burned_in_text: DICOM Burned In Annotation = YES but no text "
                          "region located to mask")
    if not boxes:
        return GateResult(PASSED, 0, image_to_data_url(img), pixel_digest(img))
    masked = mask_regions(img, boxes, settings.mask_margin_px, settings.mask_fill)
    return GateResult(MASKED, len(boxes), image_to_data_url(masked), pixel_digest(masked))


def make_detector(settings: PrivacySettings) -> Detector:
    """The text finder ``privacy.detector`` names, with its settings bound."""
    if settings.detector == "tesseract":
        return lambda images: find_text(images, upscale=settings.ocr_upscale,
                                        min_confidence=settings.ocr_min_confidence)
    det = DetectorSettings(target_side=settings.detector_target_side, threshold=settings.detector_threshold,
                           text_confidence=settings.text_confidence, text_min_chars=settings.text_min_chars)
    return lambda images: find_text_regions(images, det)


class TextGate:
    """Applies ``PrivacySettings`` to images, one detector call per ``ocr_images_per_call`` images, each
    image's result kept by its pixel digest (and DICOM flag)."""

    def __init__(self, settings: PrivacySettings | None = None, detect: Detector | None = None):
        """``detect``: images -> their text boxes; by default the one ``settings.detector`` names."""
        self.settings = settings or PrivacySettings()
        self.detect = detect or make_detector(self.settings)
        self.results: dict[tuple[str, bool], GateResult] = {}

    def check(self, images: list[Image.Image], declared: list[bool] | None = None) -> list[GateResult]:
        """A result per image; ``declared[i]``: the file says it has burned-in text (DICOM 0028,0301)."""
        declared = declared or [False] * len(images)
        keys = [(pixel_digest(img), flag) for img, flag in zip(images, declared)]
        if self.settings.burned_in_text == "allow":
            return [GateResult(ALLOWED, 0, image_to_data_url(img), key[0]) for img, key in zip(images, keys)]
        todo = [n for n, key in enumerate(keys) if key not in self.results]
        todo = [n for i, n in enumerate(todo) if keys[n] not in {keys[m] for m in todo[:i]}]  # once per image
        step = self.settings.ocr_images_per_call
        for start in range(0, len(todo), step):
            chunk = todo[start:start + step]
            found = self.detect([images[n] for n in chunk])
            for n, boxes in zip(chunk, found):
                self.results[keys[n]] = _decide(self.settings, images[n], boxes, declared[n])
        return [self.results[key] for key in keys]

    def check_data_url(self, url: str) -> GateResult:
        """The gate for an image that arrives as a data URL (a stream that was not gated upstream)."""
        return self.check([decode_data_url(url)])[0]
