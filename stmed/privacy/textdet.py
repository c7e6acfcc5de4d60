"""Text regions found by a DBNet text detector (PP-OCRv6 "small", the ONNX file inside the ``rapidocr``
wheel, run by ``onnxruntime``): the gate's default detector.

Why this and not Tesseract (``stmed.privacy.ocr``), measured by ``benchmarks/privacy_gate.py`` on the
64-pixel phantoms with 8-14 px burned-in text: Tesseract is a reader that finds words by laying out a
page; on small textured scans it found 40% of the overlays and flagged 40% of the clean phantoms. A
detector is trained to answer "where is text" on scene images, at any contrast and polarity, and needs no
page layout. The weights ship in the PyPI wheel, so nothing is downloaded at run time; only the detection
model is run (recognition is not needed to mask), and the recognised text never exists.

How (PP-OCR's own pre- and post-processing, simplified to rectangles): the grey image is enlarged so its
shorter side is about ``target_side`` pixels (glyphs of a 64-px scan become ~30-50 px, the size DBNet
reads best), framed by replicated edge pixels (a frame of another grey draws an edge through text that
touches the border), normalised to [-1, 1] and run; the probability map is cut at ``threshold`` and each
connected region becomes a rectangle, grown by DBNet's "unclip" (the map marks a shrunk core of each
text line: area x 1.5 / perimeter on every side). Two shape rules drop what is not a line of text: a
region taller than ``max_height_share`` of the image (on these phantoms the detector also lights up the
whole body, a closed outline that reads like one large glyph), or narrower than ``min_aspect`` times its
height (a single character: the harmless "L"/"R" markers are left alone).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from stmed.privacy.ocr import Box

MODEL_FILE = "PP-OCRv6_det_small.onnx"
REC_MODEL_FILE = "PP-OCRv6_rec_small.onnx"
REC_HEIGHT = 48
"""Height of a line as the recogniser reads it (PP-OCR's ``rec_img_shape``)."""
REC_MAX_RATIO = 25
"""Widest line the recogniser is given, in multiples of its height (a longer crop is squeezed)."""
REC_BATCH = 8
PAD = 32
"""Replicated pixels around the enlarged image (DBNet misses text whose line touches the input's edge)."""
UNCLIP = 1.5


class DetectorUnavailable(RuntimeError):
    """onnxruntime or the rapidocr wheel (which holds the model) is not installed; the message says how."""


@dataclass(frozen=True)
class DetectorSettings:
    target_side: int = 256
    """The image is enlarged (never shrunk below its size, at most 4x) until its shorter side is this."""
    max_side: int = 1280
    """Longer side limit of what the detector sees (a large scan is shrunk to it)."""
    threshold: float = 0.5
    """Probability from which a pixel belongs to text (PP-OCR's default is 0.3; 0.5 keeps noise specks out)."""
    max_height_share: float = 0.35
    """A region taller than this share of the image is not a text line."""
    min_aspect: float = 1.2
    """A region narrower than this times its height is not a line of text (a single letter)."""
    min_core_px: float = 2.0
    """A region whose core (before unclip) is less than this many image pixels high is a speck of texture:
    the core of a line of 8-px text is 3-5 px high."""
    text_confidence: float = 0.0
    """From above 0: each region is read by PP-OCRv6's recogniser and kept only when it reads at least
    ``text_min_chars`` letters or digits with a mean confidence of at least this; 0 keeps every region
    unread (no recognition runs)."""
    text_min_chars: int = 1
    """Letters or digits the recogniser must read in a region (with ``text_confidence`` above 0)."""


def model_path(name: str = MODEL_FILE) -> str:
    """A model inside the installed ``rapidocr`` wheel, found without importing the package
    (its ``__init__`` loads the whole OCR pipeline)."""
    spec = importlib.util.find_spec("rapidocr")
    path = os.path.join(next(iter(spec.submodule_search_locations)), "models", name) if spec else ""
    if not path or not os.path.exists(path):
        raise DetectorUnavailable("privacy.detector=dbnet needs the rapidocr wheel (pip install rapidocr==3.10.0 "
                                  "onnxruntime), which ships its text detector; or set privacy.detector=tesseract")
    return path


@lru_cache(maxsize=2)
def _session(name: str = MODEL_FILE):
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise DetectorUnavailable("privacy.detector=dbnet needs onnxruntime (pip install onnxruntime)") from err
    options = ort.SessionOptions()
    # One thread: the gate runs beside the generators and the judge; more threads only contend with them.
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model_path(name), options, providers=["CPUExecutionProvider"])


@lru_cache(maxsize=1)
def _recogniser():
    """The recognition session and, per output class, whether it is a letter or digit. The classes are
    CTC's blank, the model's character list (its ONNX metadata) and a space."""
    session = _session(REC_MODEL_FILE)
    chars = session.get_modelmeta().custom_metadata_map["character"].split("\n")
    alnum = np.array([False] + [c.isalnum() for c in chars] + [False])
    return session, alnum


def line_evidence(img: Image.Image, boxes: list[Box]) -> list[tuple[int, float]]:
    """For each box, what PP-OCRv6's recogniser makes of the crop: ``(letters and digits read, mean
    confidence of the characters read)``; ``(0, 0.0)`` when it reads nothing. Only counts and
    probabilities leave this function: the characters are never decoded into text."""
    if not boxes:
        return []
    session, alnum = _recogniser()
    grey = img.convert("L")
    crops = []
    for box in boxes:
        pad = max(1, round(0.15 * box.height))
        g = box.grown(pad, img.width, img.height)
        crop = grey.crop((g.x0, g.y0, g.x1, g.y1))
        w = max(1, min(REC_HEIGHT * REC_MAX_RATIO, round(crop.width * REC_HEIGHT / max(1, crop.height))))
        crops.append(np.asarray(crop.resize((w, REC_HEIGHT), Image.Resampling.BICUBIC), np.float32))
    out: list[tuple[int, float]] = [(0, 0.0)] * len(crops)
    order = sorted(range(len(crops)), key=lambda n: crops[n].shape[1])  # similar widths share a batch
    for start in range(0, len(order), REC_BATCH):
        chunk = order[start:start + REC_BATCH]
        batch = np.zeros((len(chunk), 3, REC_HEIGHT, crops[chunk[-1]].shape[1]), np.float32)
        for row, n in enumerate(chunk):  # padding stays 0: mid-grey after normalisation, as PP-OCR pads
            batch[row, :, :, :crops[n].shape[1]] = crops[n] / 127.5 - 1.0
        probs = session.run(None, {"x": batch})[0]
        for n, best, idx in zip(chunk, probs.max(axis=2), probs.argmax(axis=2)):
            keep = idx != 0  # CTC: drop blanks and repeats
            keep[1:] &= idx[1:] != idx[:-1]
            out[n] = (int(alnum[idx[keep]].sum()), float(best[keep].mean()) if keep.any() else 0.0)
    return out


def detector_available() -> bool:
    try:
        _session()
    except DetectorUnavailable:
        return False
    return True


def _scale(width: int, height: int, settings: DetectorSettings) -> float:
    scale = min(4.0, max(1.0, settings.target_side / min(width, height)))
    return min(scale, settings.max_side / max(width, height))


def _input(img: Image.Image, scale: float) -> tuple[np.ndarray, tuple[int, int]]:
    """``(1, 3, H, W)`` float32 in [-1, 1], H and W multiples of 32, the image at ``(PAD, PAD)``."""
    w, h = max(1, round(img.width * scale)), max(1, round(img.height * scale))
    big = np.asarray(img.convert("L").resize((w, h), Image.Resampling.BICUBIC))
    ph, pw = -(-(h + 2 * PAD) // 32) * 32, -(-(w + 2 * PAD) // 32) * 32
    page = np.pad(big, ((PAD, ph - h - PAD), (PAD, pw - w - PAD)), mode="edge")
    x = page.astype(np.float32) / 127.5 - 1.0
    return np.repeat(x[None, None], 3, axis=1), (h, w)


def _regions(prob: np.ndarray, scale: float, img: Image.Image, settings: DetectorSettings) -> list[Box]:
    import cv2  # opencv-python-headless, a dependency of rapidocr

    text = (prob > settings.threshold).astype(np.uint8)
    _, _, stats, _ = cv2.connectedComponentsWithStats(text, connectivity=8)
    boxes = []
    for x0, y0, w, h, _ in stats[1:]:
        if (h > settings.max_height_share * img.height * scale or w < settings.min_aspect * h
                or h < settings.min_core_px * scale):
            continue
        grow = w * h * UNCLIP / (2 * (w + h))
        boxes.append(Box(max(0, int((x0 - grow) / scale)), max(0, int((y0 - grow) / scale)),
                         min(img.width, -int(-(x0 + w + grow) // scale)),
                         min(img.height, -int(-(y0 + h + grow) // scale))))
    return boxes


def find_text_regions(images: list[Image.Image], settings: DetectorSettings | None = None) -> list[list[Box]]:
    """The text regions of each image (boxes in its own pixels). One model call per image: on one thread
    a batch of sixteen 64-px phantoms took longer than sixteen calls (77 against 45 ms an image)."""
    settings = settings or DetectorSettings()
    session = _session()
    found = []
    for img in images:
        scale = _scale(img.width, img.height, settings)
        x, (h, w) = _input(img, scale)
        prob = session.run(None, {"x": x})[0][0, 0]
        boxes = _regions(prob[PAD:PAD + h, PAD:PAD + w], scale, img, settings)
        if settings.text_confidence > 0:
            boxes = [box for box, (chars, conf) in zip(boxes, line_evidence(img, boxes))
                     if chars >= settings.text_min_chars and conf >= settings.text_confidence]
        found.append(boxes)
    return found
