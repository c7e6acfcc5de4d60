"""The embedded default's data: phantom "scans" with known findings, and templated questions about them.

Each image is a grey phantom (saved as lossless RGB PNG, 64x64 by default) drawn from a few findings:
a modality look (CT: smooth, black background, bright bone; MRI: ringed texture, noisy background,
bright fluid; X-ray: blurred, grainy, grey background with a gradient), an organ outline (brain: oval
head with a skull ring; chest: boxy torso with dark lungs; abdomen: wide oval with a vertebra), and
optionally 1-3 bright round lesions, all on one side (``left`` = the image's left half, no radiological
flip) and all small or all large. Findings are deliberately strong so a tiny LLaVA (64 image tokens)
can learn them in a few hundred CPU steps; presence/modality/organ questions are easy, side/size/count
and combined questions harder, which leaves room for DPO to improve closed accuracy.

``make_dataset`` writes, deterministically from ``seed``:
- ``images/synth_NNNNN.png``;
- ``instruct.json``: LLaVA-Med instruct conversations for the training images (a description turn, then
  four templated Q/A turns: open ones answered with a sentence, closed ones asked with the benchmark's
  suffix and answered "yes"/"no" — see ``SUFFIXED_CLOSED_FRACTION``);
- ``test.json`` / ``test_w_options.json``: LLaVA-Med benchmark files on held-out images (3 CLOSED yes/no
  and 2 OPEN one-word questions per image), the second with the closed-question suffix;
- ``findings.json``: per image file name, its findings, split and ``pixel_digest`` (how the offline
  reference judge recognises an image it is sent);
- ``overlays.json``: per image file name, the burned-in text drawn on it (``overlay_share`` of the
  training and pool images: fake identifiers; ``laterality_share``: "L"/"R" markers), kind, text and box;
- ``unlabelled.json``: the training images (or, with ``pool_images``, images of their own that no
  conversation mentions) as paths relative to the dataset folder (``images/synth_NNNNN.png``, so
  ``stmed.data.records.list_images`` resolves them against the manifest's own folder), the pool that
  self-training generates questions for; never a test image.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from stmed.data.images import pixel_digest
from stmed.data.overlays import add_overlays
from stmed.log import get_logger
from stmed.model import prompts
from stmed.model.prompts import CLOSED_SUFFIX, DESCRIBE_QUESTION, IMAGE_TOKEN
from stmed.model.tokenizer import TINY_TOKENIZER, save_tokenizer, train_tokenizer
from stmed.runs import write_json

log = get_logger(__name__)

MODALITIES = ("ct", "mri", "x-ray")
ORGANS = ("brain", "chest", "abdomen")
SIDES = ("left", "right")
SIZES = ("small", "large")
MAX_COUNT = 3
MODALITY_NAMES = {"ct": "CT", "mri": "MRI", "x-ray": "X-ray"}
COUNT_WORDS = {0: "zero", 1: "one", 2: "two", 3: "three"}

OPEN_TOPICS = ("modality", "organ", "count", "side", "size")
CLOSED_TOPICS = ("presence", "modality", "organ", "side", "size", "count", "combined")
EASY_TOPICS = frozenset({"presence", "modality", "organ"})
LESION_TOPICS = frozenset({"count", "side", "size"})  # open questions that presuppose a lesion
# VQA-RAD's question_type labels, so per-type breakdowns read like the real benchmark's.
QUESTION_TYPES = {"presence": "PRES", "modality": "MODALITY", "organ": "ORGAN", "side": "POS",
                  "size": "SIZE", "count": "COUNT", "combined": "ATTRIB"}
TEST_CLOSED_PER_IMAGE, TEST_OPEN_PER_IMAGE, INSTRUCT_QA_TURNS = 3, 2, 4
SUFFIXED_CLOSED_FRACTION = 1.0
"""Share of instruct closed questions asked the benchmark way (with ``CLOSED_SUFFIX``) and answered a bare
"yes"/"no". At 0.25 the tiny stage-1 model saw too few bare answers to tie them to the image and answered
"yes" to every benchmark closed question (50%, the always-yes floor); at 1.0 it reached 57% on seed 0
(README, "Does self-training help"; 0.75: 54%)."""


@dataclass(frozen=True)
class Findings:
    """What an image shows. Without a lesion, ``side``/``size`` are None and ``count`` is 0."""

    modality: str
    organ: str
    lesion: bool
    side: str | None = None
    count: int = 0
    size: str | None = None

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES or self.organ not in ORGANS:
            raise ValueError(f"findings: modality must be in {MODALITIES}, organ in {ORGANS}; got {self}")
        if self.lesion and not (self.side in SIDES and self.size in SIZES and 1 <= self.count <= MAX_COUNT):
            raise ValueError(f"findings: a lesion needs side in {SIDES}, size in {SIZES}, count 1-3; got {self}")
        if not self.lesion and (self.side is not None or self.size is not None or self.count != 0):
            raise ValueError(f"findings: no lesion means side=None, size=None, count=0; got {self}")

    def to_dict(self) -> dict[str, Any]:
        return {"modality": self.modality, "organ": self.organ, "lesion": self.lesion,
                "side": self.side, "count": self.count, "size": self.size}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Findings:
        """Build from a findings.json entry (extra keys such as ``pixel_digest`` are ignored)."""
        return cls(modality=data["modality"], organ=data["organ"], lesion=bool(data["lesion"]),
                   side=data.get("side"), count=int(data.get("count", 0)), size=data.get("size"))


@dataclass(frozen=True)
class SyntheticPaths:
    """Where ``make_dataset`` wrote each output."""

    root: Path
    images: Path
    instruct: Path
    test: Path
    test_w_options: Path
    findings: Path
    unlabelled: Path
    overlays: Path
    """Ground truth of the burned-in text drawn on some images (``stmed.data.overlays``)."""

    @classmethod
    def under(cls, root: str | os.PathLike) -> SyntheticPaths:
        root = Path(root)
        return cls(root=root, images=root / "images", instruct=root / "instruct.json",
                   test=root / "test.json", test_w_options=root / "test_w_options.json",
                   findings=root / "findings.json", unlabelled=root / "unlabelled.json",
                   overlays=root / "overlays.json")


# ---------------------------------------------------------------------------------------------
# Phantoms. Geometry is in normalised coordinates (u right, v down, both in [-1, 1]) so any image
# size draws the same picture. Grey levels per tissue differ by modality, which is what makes the
# modality visible: e.g. fluid is dark on CT and bright on MRI, bone bright on CT and dark on MRI.
# ---------------------------------------------------------------------------------------------
_GREY = {  # tissue -> grey level for (ct, mri, x-ray)
    "background": (0, 0, 35), "soft": (105, 80, 140), "bone": (215, 25, 210), "air": (10, 8, 55),
    "fluid": (55, 165, 140), "dense": (140, 115, 175), "fat": (70, 150, 130),
}
_LESION_GREY = 252
_LESION_RADIUS = {"small": 0.075, "large": 0.16}  # 2.4 px and 5.1 px at 64x64
_JITTER = 0.025
# Lesion centres on the image's left (u < 0); mirrored for the right. Spaced >= 0.40 apart so even
# three jittered large lesions never touch and the count stays readable.
_SLOTS = {
    "brain": [(-0.38, -0.44), (-0.40, 0.0), (-0.38, 0.44)],
    "chest": [(-0.42, -0.40), (-0.42, 0.02), (-0.42, 0.42)],
    "abdomen": [(-0.32, -0.30), (-0.70, 0.02), (-0.30, 0.20)],
}
Shape = list[tuple[np.ndarray, str]]  # (mask, tissue) painted in order


def _ellipse(u: np.ndarray, v: np.ndarray, cu: float, cv: float, ru: float, rv: float) -> np.ndarray:
    return ((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2 <= 1.0


def _brain(u: np.ndarray, v: np.ndarray) -> Shape:
    head, inner = _ellipse(u, v, 0, 0, 0.80, 0.92), _ellipse(u, v, 0, 0, 0.72, 0.84)
    ventricles = _ellipse(u, v, -0.12, -0.05, 0.07, 0.22) | _ellipse(u, v, 0.12, -0.05, 0.07, 0.22)
    midline = inner & (np.abs(u) < 0.025)
    return [(head, "bone"), (inner, "soft"), (ventricles | midline, "fluid")]


def _chest(u: np.ndarray, v: np.ndarray) -> Shape:
    torso = (np.abs(u / 0.92) ** 4 + np.abs(v / 0.82) ** 4) <= 1.0
    inside = (np.abs(u / 0.86) ** 4 + np.abs(v / 0.76) ** 4) <= 1.0
    lungs = _ellipse(u, v, -0.42, 0.0, 0.30, 0.60) | _ellipse(u, v, 0.42, 0.0, 0.30, 0.60)
    heart, spine = _ellipse(u, v, 0.06, 0.24, 0.22, 0.20), _ellipse(u, v, 0, 0.62, 0.09, 0.09)
    return [(torso, "bone"), (inside, "soft"), (lungs, "air"), (heart, "dense"), (spine, "bone")]


def _abdomen(u: np.ndarray, v: np.ndarray) -> Shape:
    body, inside = _ellipse(u, v, 0, 0.05, 0.95, 0.70), _ellipse(u, v, 0, 0.05, 0.88, 0.63)
    kidneys = _ellipse(u, v, -0.38, 0.38, 0.10, 0.14) | _ellipse(u, v, 0.38, 0.38, 0.10, 0.14)
    liver, aorta = _ellipse(u, v, -0.40, -0.12, 0.36, 0.28), _ellipse(u, v, 0.12, 0.30, 0.06, 0.06)
    vertebra = _ellipse(u, v, 0, 0.48, 0.12, 0.11)
    return [(body, "fat"), (inside, "soft"), (liver, "dense"), (kidneys, "dense"), (aorta, "fluid"),
            (vertebra, "bone")]


_ORGAN_SHAPES: dict[str, Callable[[np.ndarray, np.ndarray], Shape]] = {
    "brain": _brain, "chest": _chest, "abdomen": _abdomen}


def _box_blur(img: np.ndarray) -> np.ndarray:
    padded = np.pad(img, 1, mode="edge")
    h, w = img.shape
    return sum(padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)) / 9.0


def _modality_texture(img: np.ndarray, body: np.ndarray, u: np.ndarray, v: np.ndarray, modality: str,
                      rng: np.random.Generator) -> np.ndarray:
    """The look that tells modalities apart; applied before lesions so lesions stay crisp and bright."""
    if modality == "ct":  # smooth: faint noise inside the body, background exactly black
        return img + body * rng.normal(0.0, 3.0, img.shape)
    if modality == "mri":  # concentric ringing inside the body, noisy (Rician-like) background
        rings = 18.0 * np.sin(28.0 * np.sqrt(u**2 + v**2) + rng.uniform(0, 2 * np.pi))
        return img + body * rings + np.abs(rng.normal(0.0, 7.0, img.shape))
    # x-ray: projection blur, top-to-bottom exposure gradient, film grain
    return _box_blur(_box_blur(img)) + 18.0 * v + rng.normal(0.0, 7.0, img.shape)


def _lesion_mask(u: np.ndarray, v: np.ndarray, findings: Findings, rng: np.random.Generator) -> np.ndarray:
    mask = np.zeros(u.shape, dtype=bool)
    if not findings.lesion:
        return mask
    sign = -1.0 if findings.side == "left" else 1.0
    slots = _SLOTS[findings.organ]
    for index in sorted(rng.choice(len(slots), size=findings.count, replace=False)):
        cu, cv = slots[index]
        radius = _LESION_RADIUS[findings.size] * rng.uniform(0.9, 1.1)
        cu, cv = sign * abs(cu) + rng.uniform(-_JITTER, _JITTER), cv + rng.uniform(-_JITTER, _JITTER)
        mask |= _ellipse(u, v, cu, cv, radius, radius)
    return mask


def render_phantom(findings: Findings, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """Draw one phantom for ``findings``; the same generator state gives the same pixels."""
    if size < 32:
        raise ValueError(f"image_size={size} is too small to draw lesions; use at least 32")
    m = MODALITIES.index(findings.modality)
    # Small per-image pose jitter so no two images with the same findings are identical.
    cx, cy = size / 2 + rng.uniform(-1.5, 1.5), size / 2 + rng.uniform(-1.5, 1.5)
    scale = rng.uniform(0.95, 1.05) * size / 2
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    u, v = (xx - cx) / scale, (yy - cy) / scale
    img = np.full((size, size), float(_GREY["background"][m]))
    shape = _ORGAN_SHAPES[findings.organ](u, v)
    for mask, tissue in shape:
        img[mask] = _GREY[tissue][m]
    img = _modality_texture(img, shape[0][0], u, v, findings.modality, rng) + rng.uniform(-6, 6)
    lesions = _lesion_mask(u, v, findings, rng)
    img[lesions] = _LESION_GREY + rng.normal(0.0, 2.0, int(lesions.sum()))
    grey = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(np.stack([grey] * 3, axis=-1)), mode="RGB")


# ---------------------------------------------------------------------------------------------
# Text. Every sentence comes from the templates below; ``text_corpus`` enumerates them all.
# Answer sentences avoid words containing "no" (not, normal, none...) other than "no" itself,
# because the LLaVA-Med closed-question rule is a substring test and would count them as "no".
# ---------------------------------------------------------------------------------------------
def _a(name: str) -> str:
    return "an" if name in ("MRI", "X-ray") or name[0].lower() in "aeiou" else "a"


def _scan(modality: str) -> str:
    name = MODALITY_NAMES[modality]
    return f"{_a(name)} {name} scan"


def _lesions_phrase(count: int, size: str | None = None, side: str | None = None) -> str:
    """'there is one small lesion on the left side' / 'there are two lesions' / 'there is no lesion'."""
    if count == 0:
        return "there is no lesion"
    noun = "lesion" if count == 1 else "lesions"
    words = [COUNT_WORDS[count], *([size] if size else []), noun]
    where = f" on the {side} side" if side else ""
    return f"there {'is' if count == 1 else 'are'} {' '.join(words)}{where}"


def _they(f: Findings) -> str:
    return "it is" if f.count == 1 else "they are"


def _the_lesion(f: Findings) -> str:
    return "the lesion" if f.count <= 1 else "the lesions"


def describe(f: Findings, rng: random.Random) -> str:
    """The answer to the description question: modality and organ, then the lesions (or none)."""
    first = rng.choice([f"This is {_scan(f.modality)} of the {f.organ}.",
                        f"The image is {_scan(f.modality)} showing the {f.organ}."])
    if not f.lesion:
        return f"{first} {rng.choice(['There is no lesion.', 'No lesion is seen.'])}"
    return f"{first} {_lesions_phrase(f.count, f.size, f.side).capitalize()}."


_OPEN_TEMPLATES = {
    "modality": ["What imaging modality is used?", "What type of scan is this?", "Which imaging modality was used?"],
    "organ": ["Which organ is shown?", "What part of the body is imaged?", "Which organ is imaged?"],
    "count": ["How many lesions are there?", "How many lesions can be seen?"],
    "side": ["On which side {be} {the_lesion}?", "Where {be} {the_lesion} located?"],
    "size": ["How large {be} {the_lesion}?", "What is the size of {the_lesion}?"],
}


def open_question(topic: str, f: Findings, rng: random.Random) -> tuple[str, str, str]:
    """``(question, one-word answer, sentence answer)`` for an OPEN topic; lesion topics need a lesion."""
    if topic in LESION_TOPICS and not f.lesion:
        raise ValueError(f"open topic {topic!r} presupposes a lesion; image has none")
    be = "are" if f.count > 1 else "is"
    question = rng.choice(_OPEN_TEMPLATES[topic]).format(the_lesion=_the_lesion(f), be=be)
    the = _the_lesion(f).capitalize()
    short, sentence = {
        "modality": (MODALITY_NAMES[f.modality], f"This is {_scan(f.modality)}."),
        "organ": (f.organ, f"The image shows the {f.organ}."),
        "count": (COUNT_WORDS[f.count], _lesions_phrase(f.count).capitalize() + "."),
        "side": (str(f.side), f"{the} {be} on the {f.side} side."),
        "size": (str(f.size), f"{the} {be} {f.size}."),
    }[topic]
    return question, short, sentence


def _other(options: tuple[str, ...], value: str | None, rng: random.Random) -> str:
    return rng.choice([o for o in options if o != value])


def closed_question(topic: str, f: Findings, yes: bool, rng: random.Random) -> tuple[str, str] | None:
    """``(question, sentence answer starting Yes/No)`` whose true answer is ``yes``; None if impossible."""
    word = "Yes" if yes else "No"
    if topic == "presence":
        asks_lesion = yes == f.lesion  # "Is there a lesion?" when that is true to the target, else "normal?"
        question = rng.choice(["Is there a lesion?", "Are there any lesions?", "Is there a lesion in this image?"]
                              if asks_lesion else ["Is this image normal?", "Does this scan look normal?"])
        return question, f"{word}, {_lesions_phrase(f.count)}."
    if topic == "modality":
        asked = f.modality if yes else _other(MODALITIES, f.modality, rng)
        question = rng.choice([f"Is this {_scan(asked)}?", f"Was this image taken with {MODALITY_NAMES[asked]}?"])
        return question, f"{word}, this is {_scan(f.modality)}."
    if topic == "organ":
        asked = f.organ if yes else _other(ORGANS, f.organ, rng)
        question = rng.choice([f"Is this an image of the {asked}?", f"Does this image show the {asked}?"])
        return question, f"{word}, it shows the {f.organ}."
    if not f.lesion:  # side/size/count/combined on a lesion-free image: only "no" is possible
        if yes or topic in ("size", "count"):
            return None
        size = f" {rng.choice(SIZES)}" if topic == "combined" else ""
        return f"Is there a{size} lesion on the {rng.choice(SIDES)} side?", "No, there is no lesion."
    return _closed_lesion_question(topic, f, yes, rng)


def _closed_lesion_question(topic: str, f: Findings, yes: bool, rng: random.Random) -> tuple[str, str]:
    word, be = ("Yes" if yes else "No"), ("is" if f.count == 1 else "are")
    if topic == "side":
        side = f.side if yes else _other(SIDES, f.side, rng)
        return f"{be.capitalize()} {_the_lesion(f)} on the {side} side?", f"{word}, {_they(f)} on the {f.side} side."
    if topic == "size":
        size = f.size if yes else _other(SIZES, f.size, rng)
        return f"{be.capitalize()} {_the_lesion(f)} {size}?", f"{word}, {_the_lesion(f)} {be} {f.size}."
    if topic == "count":
        forms = [("Are there multiple lesions?", f.count >= 2), ("Is there only one lesion?", f.count == 1)]
        asked = f.count if yes else rng.choice([c for c in range(1, MAX_COUNT + 1) if c != f.count])
        forms.append((f"Are there {COUNT_WORDS[asked]} lesions?" if asked != 1 else "Is there one lesion?",
                       asked == f.count))
        question = rng.choice([q for q, truth in forms if truth == yes])
        return question, f"{word}, {_lesions_phrase(f.count)}."
    assert topic == "combined", topic
    size, side = f.size, f.side
    if not yes:  # flip one or both attributes, so the question is wrong in a detail
        flip = rng.choice(["size", "side", "both"])
        size = _other(SIZES, f.size, rng) if flip in ("size", "both") else size
        side = _other(SIDES, f.side, rng) if flip in ("side", "both") else side
    return f"Is there a {size} lesion on the {side} side?", f"{word}, {_lesions_phrase(f.count, f.size, f.side)}."


class _EveryChoice:
    """Stands in for ``random.Random`` in ``text_corpus``: replays a path of choice indices, and records
    how wide each choice was, so that a depth-first walk visits every combination the templates allow."""

    def __init__(self, path: list[int]):
        self.path, self.taken, self.widths = path, [], []

    def choice(self, options: list[Any]) -> Any:
        index = self.path[len(self.taken)] if len(self.taken) < len(self.path) else 0
        self.taken.append(index)
        self.widths.append(len(options))
        return options[index]


def _every_output(make: Callable[[Any], Any]) -> list[Any]:
    outputs, stack = [], [[]]
    while stack:
        replay = _EveryChoice(stack.pop())
        outputs.append(make(replay))
        for pos in range(len(replay.path), len(replay.widths)):  # branch on choices first taken as 0
            stack += [replay.taken[:pos] + [alt] for alt in range(1, replay.widths[pos])]
    return outputs


def text_corpus() -> list[str]:
    """Every sentence the templates can produce (for training the tiny tokenizer), sorted."""
    texts = {DESCRIBE_QUESTION, CLOSED_SUFFIX.strip(), "yes", "no", *COUNT_WORDS.values(), *SIDES, *SIZES,
             *ORGANS, *MODALITY_NAMES.values()}
    for f in _all_findings():
        texts.update(_every_output(lambda rng, f=f: describe(f, rng)))
        for topic in OPEN_TOPICS:
            if f.lesion or topic not in LESION_TOPICS:
                for triple in _every_output(lambda rng, f=f, t=topic: open_question(t, f, rng)):
                    texts.update(triple)
        for topic in CLOSED_TOPICS:
            for yes in (True, False):
                if _closed_possible(topic, f, yes):
                    for pair in _every_output(lambda rng, f=f, t=topic, y=yes: closed_question(t, f, y, rng)):
                        texts.update(pair)
    return sorted(texts)


def tiny_tokenizer_corpus() -> list[str]:
    """What the tiny preset's tokenizer is trained on: every text the project renders (the prompt
    templates and this module's sentences), sorted and de-duplicated so the vocabulary never depends on
    list order."""
    return sorted(set(prompts.corpus()) | set(text_corpus()))


def write_tiny_tokenizer(path: str | Path = TINY_TOKENIZER) -> Path:
    """Train the tiny preset's tokenizer on :func:`tiny_tokenizer_corpus` and save it (1024 tokens)."""
    return save_tokenizer(train_tokenizer(tiny_tokenizer_corpus(), vocab_size=1024), path)


def _all_findings() -> list[Findings]:
    out = []
    for modality in MODALITIES:
        for organ in ORGANS:
            out.append(Findings(modality, organ, False))
            out += [Findings(modality, organ, True, side, count, size)
                    for side in SIDES for size in SIZES for count in range(1, MAX_COUNT + 1)]
    return out


def _closed_possible(topic: str, f: Findings, yes: bool) -> bool:
    if topic in EASY_TOPICS or f.lesion:
        return True
    return not yes and topic in ("side", "combined")


# ---------------------------------------------------------------------------------------------
# The dataset.
# ---------------------------------------------------------------------------------------------
def _balanced(cells: list[Any], n: int, rng: random.Random) -> list[Any]:
    """``n`` cells, each equally often (the remainder spread at random), in random order."""
    picks = cells * (n // len(cells)) + rng.sample(cells, n % len(cells))
    rng.shuffle(picks)
    return picks


def _sample_findings(num_images: int, rng: random.Random) -> list[Findings]:
    """Balanced over modality x organ x lesion, and lesions balanced over side x size x count."""
    cells = _balanced([(m, o, lesion) for m in MODALITIES for o in ORGANS for lesion in (False, True)],
                      num_images, rng)
    n_lesions = sum(lesion for _, _, lesion in cells)
    attrs = iter(_balanced([(side, count, size) for side in SIDES for size in SIZES
                            for count in range(1, MAX_COUNT + 1)], n_lesions, rng))  # Findings' field order
    return [Findings(m, o, True, *next(attrs)) if lesion else Findings(m, o, False) for m, o, lesion in cells]


def _pick_topic(f: Findings, closed: bool, yes: bool, used: set[str], rng: random.Random) -> str | None:
    if closed:
        options = [t for t in CLOSED_TOPICS if f"c:{t}" not in used and _closed_possible(t, f, yes)]
    else:
        options = [t for t in OPEN_TOPICS if f"o:{t}" not in used and (f.lesion or t not in LESION_TOPICS)]
    return rng.choice(options) if options else None


def _instruct_conversation(f: Findings, rng: random.Random) -> list[dict[str, str]]:
    turns = [("human", f"{IMAGE_TOKEN}\n{DESCRIBE_QUESTION}"), ("gpt", describe(f, rng))]
    used: set[str] = set()
    while len(turns) < 2 + 2 * INSTRUCT_QA_TURNS:
        want_closed, want_yes = rng.random() < 0.5, rng.random() < 0.5
        # A lesion-free image has only two open topics and three closed ones that can be "yes":
        # fall back to the other kind / answer rather than repeat a topic.
        tries = [(want_closed, want_yes), (True, want_yes), (True, not want_yes)]
        closed, yes, topic = next((c, y, t) for c, y in tries if (t := _pick_topic(f, c, y, used, rng)))
        used.add(f"{'c' if closed else 'o'}:{topic}")
        if not closed:
            question, _, answer = open_question(topic, f, rng)
        else:
            question, answer = closed_question(topic, f, yes, rng)  # type: ignore[misc]
            if rng.random() < SUFFIXED_CLOSED_FRACTION:  # the benchmark's way of asking: bare yes/no
                question, answer = question + CLOSED_SUFFIX, "yes" if yes else "no"
        turns += [("human", question), ("gpt", answer)]
    return [{"from": who, "value": text} for who, text in turns]


def _test_questions(f: Findings, targets: Iterator[bool], rng: random.Random) -> list[tuple[str, str, str, str]]:
    """``(topic, answer_type, question, answer)``: closed answers "yes"/"no", open ones a single word.

    ``targets`` are the intended closed answers (balanced over the whole test set); a lesion-free image
    that has used up its "yes"-able topics gets a "no" instead.
    """
    used: set[str] = set()
    out = []
    for _ in range(TEST_CLOSED_PER_IMAGE):
        yes = next(targets)
        topic = _pick_topic(f, True, yes, used, rng) or _pick_topic(f, True, not yes, used, rng)
        yes = yes if _closed_possible(str(topic), f, yes) else not yes
        used.add(f"c:{topic}")
        question, _ = closed_question(str(topic), f, yes, rng)  # type: ignore[misc]
        out.append((str(topic), "CLOSED", question, "yes" if yes else "no"))
    for _ in range(TEST_OPEN_PER_IMAGE):
        topic = _pick_topic(f, False, True, used, rng)
        assert topic is not None, "every image has two open topics (modality, organ)"
        used.add(f"o:{topic}")
        question, short, _ = open_question(topic, f, rng)
        out.append((topic, "OPEN", question, short))
    rng.shuffle(out)
    return out


def _domain(f: Findings) -> dict[str, bool]:
    return {"chest_xray": f.organ == "chest" and f.modality == "x-ray", "mri": f.modality == "mri",
            "ct_scan": f.modality == "ct", "histology": False, "gross": False}


def _benchmark_row(qid: int, image: str, f: Findings, item: tuple[str, str, str, str], suffix: str) -> dict:
    topic, answer_type, question, answer = item
    asked = question + suffix if answer_type == "CLOSED" else question
    return {"id": qid, "image": image, "answer_type": answer_type,
            "conversations": [{"from": "human", "value": f"{IMAGE_TOKEN}\n{asked}"},
                              {"from": "gpt", "value": answer}],
            "question_type": QUESTION_TYPES[topic], "image_organ": f.organ.upper(),
            "difficulty": "easy" if topic in EASY_TOPICS else "hard"}


def _burn_in(img: Image.Image, seed: int, index: int, overlay_share: float,
             laterality_share: float) -> tuple[Image.Image, list[dict[str, Any]]]:
    """Fake identifiers on an ``overlay_share`` of images (one, or two on a fifth of them) and an "L"/"R"
    marker on a ``laterality_share``; each image draws from its own RNG, so the others keep their bytes."""
    rng = random.Random(f"stmed-overlay:{seed}:{index}")
    identifiers = (2 if rng.random() < 0.2 else 1) if rng.random() < overlay_share else 0
    laterality = rng.random() < laterality_share
    if not identifiers and not laterality:
        return img, []
    img, overlays = add_overlays(img, rng, identifiers, laterality)
    return img, [o.to_dict() for o in overlays]


def make_dataset(out_dir: str | os.PathLike, num_images: int = 300, seed: int = 0, image_size: int = 64,
                 test_images: int | None = None, pool_images: int = 0, overlay_share: float = 0.0,
                 laterality_share: float = 0.0) -> SyntheticPaths:
    """Write the synthetic dataset under ``out_dir`` (see the module docstring); same arguments, same bytes.

    ``test_images`` held-out images (default a fifth of ``num_images``) get benchmark questions; the
    rest get instruction conversations and form the unlabelled pool. ``pool_images`` > 0 adds that many
    images with findings but no text (split ``pool``) and makes *them* the unlabelled pool, so self-play
    never sees an image stage 1 was told about; the other images are the same bytes either way.
    ``overlay_share`` of the training and pool images (never a test image) get fake identifiers burned
    in, ``laterality_share`` an "L"/"R" marker; ``overlays.json`` holds each one's text and box.
    """
    if not (0.0 <= overlay_share <= 1.0 and 0.0 <= laterality_share <= 1.0):
        raise ValueError(f"make_dataset: overlay_share and laterality_share must be in [0, 1], got "
                         f"{overlay_share}, {laterality_share}")
    test_images = max(1, num_images // 5) if test_images is None else test_images
    if num_images < 2 or not 0 < test_images < num_images:
        raise ValueError(f"make_dataset: need num_images >= 2 and 0 < test_images < num_images; "
                         f"got num_images={num_images}, test_images={test_images}")
    if image_size < 32:
        raise ValueError(f"make_dataset: image_size={image_size} is too small to draw lesions; use at least 32")
    if pool_images < 0:
        raise ValueError(f"make_dataset: pool_images must be >= 0, got {pool_images}")
    paths = SyntheticPaths.under(out_dir)
    paths.images.mkdir(parents=True, exist_ok=True)
    for stale in paths.images.glob("synth_*.png"):  # a previous, larger run must not leave extras
        stale.unlink()
    rng = random.Random(f"stmed-synthetic:{seed}")
    findings = _sample_findings(num_images, rng)
    test_ids = set(rng.sample(range(num_images), test_images))
    targets = iter(_balanced([True, False], test_images * TEST_CLOSED_PER_IMAGE, rng))
    records, instruct, test, test_opts, unlabelled, burned = {}, [], [], [], [], {}
    for index, f in enumerate(findings):
        name = f"synth_{index:05d}.png"
        img = render_phantom(f, np.random.default_rng([seed, index]), image_size)
        split = "test" if index in test_ids else "train"
        if split == "train":
            img, burned[name] = _burn_in(img, seed, index, overlay_share, laterality_share)
        img.save(paths.images / name, format="PNG")
        records[name] = {**f.to_dict(), "split": split, "pixel_digest": pixel_digest(img)}
        text_rng = random.Random(f"stmed-synthetic:{seed}:{index}")
        if split == "train":
            instruct.append({"id": f"synth_{index:05d}", "image": name, "domain": _domain(f),
                             "conversations": _instruct_conversation(f, text_rng)})
            unlabelled.append(f"{paths.images.name}/{name}")
            continue
        for item in _test_questions(f, targets, text_rng):
            test.append(_benchmark_row(len(test), name, f, item, ""))
            test_opts.append(_benchmark_row(len(test_opts), name, f, item, CLOSED_SUFFIX))
    if pool_images:
        unlabelled = []
        pool_findings = _sample_findings(pool_images, random.Random(f"stmed-synthetic-pool:{seed}"))
        for index, f in enumerate(pool_findings, start=num_images):
            name = f"synth_{index:05d}.png"
            img = render_phantom(f, np.random.default_rng([seed, index]), image_size)
            img, burned[name] = _burn_in(img, seed, index, overlay_share, laterality_share)
            img.save(paths.images / name, format="PNG")
            records[name] = {**f.to_dict(), "split": "pool", "pixel_digest": pixel_digest(img)}
            unlabelled.append(f"{paths.images.name}/{name}")
    for path, data in ((paths.findings, records), (paths.instruct, instruct), (paths.test, test),
                       (paths.test_w_options, test_opts), (paths.unlabelled, unlabelled),
                       (paths.overlays, {name: found for name, found in burned.items() if found})):
        write_json(path, data)
    log.info("synthetic dataset: %d images (%d test), %d instruct conversations, %d test questions, "
             "%d unlabelled images in %s", num_images + pool_images, test_images, len(instruct), len(test),
             len(unlabelled), paths.root)
    return paths


def load_findings(path: str | os.PathLike) -> dict[str, Findings]:
    """``findings.json`` as ``{image file name: Findings}``."""
    return {name: Findings.from_dict(entry) for name, entry in json.loads(Path(path).read_text()).items()}


def dataset_stats(paths: SyntheticPaths) -> dict[str, Any]:
    """Counts by finding and split, open/closed questions and yes/no balance, read back from the files."""
    records = json.loads(paths.findings.read_text())
    instruct, test = json.loads(paths.instruct.read_text()), json.loads(paths.test.read_text())
    found = [Findings.from_dict(r) for r in records.values()]
    lesions = [f for f in found if f.lesion]
    answers = [c["value"] for row in instruct for c in row["conversations"][3::2]]  # after the description
    closed_answers = [a.split(",")[0].rstrip(".").lower() for a in answers
                      if a.lower().startswith(("yes", "no"))]
    test_closed = [row["conversations"][1]["value"] for row in test if row["answer_type"] == "CLOSED"]

    def counts(values: Any) -> dict[str, int]:
        return dict(sorted(Counter(str(v) for v in values).items()))

    return {
        "images": {"total": len(records), **counts(r["split"] for r in records.values())},
        "findings": {"modality": counts(f.modality for f in found), "organ": counts(f.organ for f in found),
                     "lesion": {"present": len(lesions), "absent": len(found) - len(lesions)},
                     "side": counts(f.side for f in lesions), "size": counts(f.size for f in lesions),
                     "count": counts(f.count for f in lesions)},
        "instruct": {"conversations": len(instruct), "qa_turns": len(answers),
                     "closed": len(closed_answers), "open": len(answers) - len(closed_answers),
                     "yes_no": counts(closed_answers)},
        "test": {"questions": len(test), **counts(row["answer_type"] for row in test),
                 "yes_no": counts(test_closed), "question_type": counts(row["question_type"] for row in test),
                 "closed_difficulty": counts(r["difficulty"] for r in test if r["answer_type"] == "CLOSED")},
        "unlabelled": len(json.loads(paths.unlabelled.read_text())),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stmed.data.synthetic",
                                     description="Write the tiny preset's tokenizer from today's templates.")
    parser.add_argument("--write-tiny-tokenizer", metavar="PATH", nargs="?", const=str(TINY_TOKENIZER),
                        required=True, help=f"where to write it (default: {TINY_TOKENIZER})")
    args = parser.parse_args(argv)
    log.info("wrote %s", write_tiny_tokenizer(args.write_tiny_tokenizer))


if __name__ == "__main__":
    main()
