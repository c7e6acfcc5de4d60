"""Self-play generation (METHOD §3): the questions and answers a model makes about its own images.

Self-play is three calls of one engine (``stmed.model.generate.HFEngine``) over a batch of images:

1. ``describe`` — greedy "Can you describe the image in detail?";
2. ``ask`` — an open questioner (``VUSER:``) turn after that description, sampled k times per image
   (temperature 1.2, top_k 300, top_p 0.95);
3. ``answer_twice`` — two sampled answers per question (temperature 1.2, top_k 100, top_p 0.95), each
   slot drawn under its own seed so the two differ and a rerun reproduces both. With
   ``answers_per_question: n`` (even) a question gets n answers, sampled and judged two at a time
   (``n / 2`` sub-pairs); its preference pair is then its best- against its worst-scored answer.

Outputs are judged degenerate (empty, a single repeated word, …) here, so that every engine filters the
same way (``question_reasons`` also drops a question already asked about the image; ``answer_pair_reason``
an identical pair).

Demonstrations (BioMed-VITAL's generation stage, METHOD §7): ``generation.demonstrations`` names the
``demonstrations.jsonl`` that ``python -m jobs.review export`` writes (clinician-starred question-answers);
each image's questioner prompt then carries ``demonstrations_k`` of them, drawn under a seed derived from
the global seed and the image id (``demonstrations_for``), as earlier questioner turns with their answers
(``prompts.question_prompt``). A sampled question that repeats one of them counts as a ``duplicate``.

The preference job uses the seeded variants ``ask_seeded`` / ``answer_twice_seeded``: every row samples
from its own generator (``RowSampler``) under a seed derived from the global seed and the image id
(``GenerationSettings``, ``derive_seed``), so its text does not depend on how Ray Data batched it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from stmed.config import ConfigError
from stmed.model import prompts
from stmed.model.generate import GREEDY, HFEngine, Sampling, answer, chat_format

QUESTION_SAMPLING = Sampling(temperature=1.2, top_k=300, top_p=0.95, max_new_tokens=300)
ANSWER_SAMPLING = Sampling(temperature=1.2, top_k=100, top_p=0.95, max_new_tokens=300)


@dataclass(frozen=True)
class GenerationSettings:
    """Self-play settings (config group ``generation``); defaults are the paper's (METHOD §3)."""

    engine: Literal["hf", "vllm"] = "hf"
    """``hf``: ``model.generate`` in a Ray Data actor (CPU, or a GPU without vLLM); ``vllm``: Ray Data
    LLM processors on GPUs (merged weights only)."""
    questions_per_image: int = 5
    """k questions sampled per image (paper: 3–5)."""
    answers_per_question: int = 2
    """Answers sampled per question (even; paper: 2). Above 2 the judge scores them two at a time and
    the pair is the best- against the worst-scored answer: more pairs that disagree on the facts."""
    closed_suffix_fraction: float = 0.0
    """Share of the sampled yes/no questions asked with the benchmark's closed-question suffix
    (``prompts.CLOSED_SUFFIX``), so that pairs also teach the bare yes/no answer format. 0: as asked."""
    seed: int = 0
    """Global seed; every sampling seed derives from it and the image id, so batching never matters."""
    batch_size: int = 8
    """Prompts per ``generate`` call (hf) or rows per engine batch (vllm)."""
    describe_max_tokens: int = 128
    question_max_tokens: int = 300
    answer_max_tokens: int = 300
    question_temperature: float = 1.2
    question_top_k: int = 300
    question_top_p: float = 0.95
    answer_temperature: float = 1.2
    answer_top_k: int = 100
    answer_top_p: float = 0.95
    device: str = "auto"
    """hf engine device: ``auto`` = cuda when available, else cpu."""
    vllm_engine_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra vLLM engine arguments (max_model_len, gpu_memory_utilization, tensor_parallel_size…)."""
    vllm_concurrency: int = 1
    """Engine replicas (GPUs, at one a replica) the vLLM path may use at once. The describe and ask stages
    run together and share them; the answer stage, after the questions' barrier, gets all of them."""
    vllm_bundle: dict[str, float] | None = None
    """One vLLM replica's placement bundle; None: one GPU (Ray's default). vLLM's CPU backend: ``{"CPU": 1}``."""
    vllm_stage_cpus: float | None = None
    """CPUs of each host-side worker of a vLLM stage (image preparation, pre- and post-processing); None:
    Ray's default of 1. A fraction lets the stages of a small (CPU-only) node run side by side."""
    demonstrations: str | None = None
    """A ``demonstrations.jsonl`` (``python -m jobs.review export``: one ``{"question", "answer", …}`` a
    line): few-shot examples in the questioner's prompt. None: none (the paper's prompt)."""
    demonstrations_k: int = 3
    """Demonstrations per image (all of them when the file has fewer), drawn under a seed derived from
    ``seed`` and the image id, written in the file's order."""

    def __post_init__(self) -> None:
        positive = ("questions_per_image", "answers_per_question", "batch_size", "describe_max_tokens",
                    "question_max_tokens", "answer_max_tokens", "vllm_concurrency", "demonstrations_k")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"generation.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("question_temperature", "answer_temperature"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"generation.{name} must be > 0 (self-play samples), "
                                  f"got {getattr(self, name)}")
        if self.answers_per_question % 2:
            raise ConfigError(f"generation.answers_per_question must be even (answers are judged two at a "
                              f"time), got {self.answers_per_question}")
        if not 0.0 <= self.closed_suffix_fraction <= 1.0:
            raise ConfigError(f"generation.closed_suffix_fraction must be in [0, 1], "
                              f"got {self.closed_suffix_fraction}")
        for name in ("question_top_p", "answer_top_p"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ConfigError(f"generation.{name} must be in (0, 1], got {getattr(self, name)}")

    @property
    def describe_sampling(self) -> Sampling:
        return Sampling(max_new_tokens=self.describe_max_tokens)

    @property
    def question_sampling(self) -> Sampling:
        return Sampling(self.question_temperature, self.question_top_k, self.question_top_p,
                        self.question_max_tokens)

    @property
    def answer_sampling(self) -> Sampling:
        return Sampling(self.answer_temperature, self.answer_top_k, self.answer_top_p, self.answer_max_tokens)

    def question_seed(self, image_id: str, index: int) -> int:
        return derive_seed(self.seed, image_id, "question", index)

    @property
    def pair_slots(self) -> int:
        """Sub-pairs per question: the answers are sampled and judged two at a time."""
        return self.answers_per_question // 2

    def answer_seeds(self, image_id: str, index: int, slot: int = 0) -> tuple[int, int]:
        """The seeds of sub-pair ``slot``'s two answers: answers ``2 slot`` and ``2 slot + 1``."""
        return (derive_seed(self.seed, image_id, "answer", index, 2 * slot),
                derive_seed(self.seed, image_id, "answer", index, 2 * slot + 1))

    def closed_suffixed(self, question: str, image_id: str, index: int) -> str:
        """``question``, asked with the closed suffix if it is a yes/no one and its seeded draw falls
        within ``closed_suffix_fraction`` (a fixed function of the seed, image and slot)."""
        suffix = prompts.CLOSED_SUFFIX
        if self.closed_suffix_fraction <= 0 or not is_yes_no(question) or suffix.strip() in question:
            return question
        draw = derive_seed(self.seed, image_id, "closed_suffix", index) / 0x80000000
        return question.rstrip() + suffix if draw < self.closed_suffix_fraction else question


Demonstration = tuple[str, str]
"""A few-shot example for the questioner: ``(question, answer)``."""


def read_demonstrations(path: str | os.PathLike) -> tuple[Demonstration, ...]:
    """The question-answers of a ``demonstrations.jsonl``, in file order; ``ConfigError`` naming the file
    and line for a missing or empty file or a line without a question and an answer."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"generation.demonstrations: {path} is not a file (python -m jobs.review export "
                          "writes demonstrations.jsonl)")
    stat = path.stat()
    return _read_demonstrations(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _read_demonstrations(path: str, mtime_ns: int, size: int) -> tuple[Demonstration, ...]:
    out = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise ConfigError(f"generation.demonstrations: {path} line {number} is not JSON") from None
        question, answer = (row.get(k) if isinstance(row, dict) else None for k in ("question", "answer"))
        if not all(isinstance(text, str) and text.strip() for text in (question, answer)):
            raise ConfigError(f"generation.demonstrations: {path} line {number} has no question and answer")
        out.append((" ".join(question.split()), answer.strip()))
    if not out:
        raise ConfigError(f"generation.demonstrations: {path} holds no demonstrations (star question-answers "
                          "in the review app, or leave generation.demonstrations unset)")
    return tuple(out)


def demonstrations_for(settings: GenerationSettings, image_id: str) -> tuple[Demonstration, ...]:
    """The demonstrations in image ``image_id``'s questioner prompt: ``demonstrations_k`` of the file's,
    drawn under ``derive_seed(seed, image_id, "demonstrations")`` and kept in file order; () without a file.
    Both engines call this, so they write the same prompt."""
    if not settings.demonstrations:
        return ()
    pool = read_demonstrations(settings.demonstrations)
    k = min(settings.demonstrations_k, len(pool))
    picked = random.Random(derive_seed(settings.seed, image_id, "demonstrations")).sample(range(len(pool)), k)
    return tuple(pool[i] for i in sorted(picked))


def derive_seed(base: int, *keys: object) -> int:
    """A stable 31-bit seed from a global seed and keys (image id, slot…): same inputs, same seed, on
    any machine and in any batch (Python's ``hash`` is salted per process, sha256 is not)."""
    text = "\x1f".join([str(base), *(str(k) for k in keys)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") & 0x7FFFFFFF


_EDGE_PUNCTUATION = string.punctuation + string.whitespace


def normalize_text(text: str) -> str:
    """The form two generated texts are compared in: lower case, single spaces, no edge punctuation."""
    return " ".join(text.lower().split()).strip(_EDGE_PUNCTUATION)


def clean_question(text: str) -> str:
    """A sampled question up to and including its first ``?`` (the rest is rambling)."""
    text = " ".join(text.split())
    mark = text.find("?")
    return text[: mark + 1] if mark >= 0 else text


def degenerate_reason(text: str, min_words: int = 1) -> str | None:
    """Why a generated text is unusable, or None: empty, too short, or one word repeated."""
    words = text.split()
    if not words:
        return "empty"
    if len(words) < min_words:
        return "too_short"
    if len(words) >= 6 and max(words.count(w) for w in set(words)) / len(words) > 0.5:
        return "repetitive"
    return None


def question_reason(text: str) -> str | None:
    """Why a generated question is unusable: degenerate, or not a question at all."""
    reason = degenerate_reason(text, min_words=3)
    if reason:
        return reason
    if not text.endswith("?"):
        return "not_a_question"
    return None


def question_reasons(questions: Sequence[str], asked: Sequence[str] = ()) -> list[str | None]:
    """Why each of one image's sampled questions is dropped, or None to keep it: degenerate, not a
    question, or the same (normalised) as a question already kept for this image or in ``asked`` (the
    prompt's demonstrations)."""
    kept: set[str] = {normalize_text(q) for q in asked}
    reasons: list[str | None] = []
    for question in questions:
        reason = question_reason(question)
        if reason is None and normalize_text(question) in kept:
            reason = "duplicate"
        if reason is None:
            kept.add(normalize_text(question))
        reasons.append(reason)
    return reasons


_YES_NO_OPENERS = ("is ", "are ", "does ", "do ", "was ", "were ", "can ", "has ", "have ")


def is_yes_no(question: str) -> bool:
    """A question a bare yes or no answers (by its opening word)."""
    return question.strip().lower().startswith(_YES_NO_OPENERS)


def answer_pair_reason(answer1: str, answer2: str, identical_ok: bool = False) -> str | None:
    """Why a pair of sampled answers cannot be judged, or None: either answer degenerate, or both the
    same (nothing for the judge to prefer) unless ``identical_ok`` (a sub-pair of a question with more
    answers, whose scores are compared with the other sub-pairs')."""
    for slot, text in (("answer1", answer1), ("answer2", answer2)):
        reason = degenerate_reason(text)
        if reason:
            return f"{slot}_{reason}"
    if not identical_ok and normalize_text(answer1) == normalize_text(answer2):
        return "identical_answers"
    return None


def describe(engine: HFEngine, images: Sequence[Image.Image], sampling: Sampling = GREEDY) -> list[str]:
    """Greedy description of every image (the questioner's context)."""
    prompt = prompts.describe_prompt(chat=chat_format(engine))
    return engine.generate([prompt] * len(images), images, sampling)


def ask(
    engine: HFEngine,
    images: Sequence[Image.Image],
    descriptions: Sequence[str],
    k: int,
    seed: int,
    sampling: Sampling = QUESTION_SAMPLING,
) -> list[list[str]]:
    """``k`` sampled questions per image, cleaned (not yet filtered); round ``r`` uses ``seed + r``."""
    chat = chat_format(engine)
    texts = [prompts.question_prompt(d or "An image.", chat=chat) for d in descriptions]
    rounds = [engine.generate(texts, images, sampling, seed=seed + r * 100_003) for r in range(k)]
    return [[clean_question(rounds[r][i]) for r in range(k)] for i in range(len(images))]


def answer_twice(
    engine: HFEngine,
    images: Sequence[Image.Image],
    questions: Sequence[str],
    seed: int,
    sampling: Sampling = ANSWER_SAMPLING,
) -> tuple[list[str], list[str], tuple[int, int]]:
    """Two sampled answers per question, slot 1 under ``seed`` and slot 2 under ``seed + 1``."""
    seeds = (seed, seed + 1)
    first = answer(engine, images, questions, sampling, seed=seeds[0])
    second = answer(engine, images, questions, sampling, seed=seeds[1])
    return first, second, seeds


def ask_seeded(
    engine: HFEngine,
    images: Sequence[Image.Image],
    descriptions: Sequence[str],
    seeds: Sequence[Sequence[int]],
    sampling: Sampling = QUESTION_SAMPLING,
    demonstrations: Sequence[Sequence[Demonstration]] | None = None,
) -> list[list[str]]:
    """``len(seeds[i])`` questions for image ``i``, question ``j`` sampled under ``seeds[i][j]`` alone
    (batch-independent, unlike ``ask``); cleaned, not yet filtered. All prompts go in one call.
    ``demonstrations[i]``: image ``i``'s few-shot question-answers (``demonstrations_for``)."""
    demonstrations = demonstrations if demonstrations is not None else [()] * len(images)
    if not len(images) == len(descriptions) == len(seeds) == len(demonstrations):
        raise ValueError(f"ask_seeded: {len(images)} images, {len(descriptions)} descriptions, "
                         f"{len(seeds)} seed lists, {len(demonstrations)} demonstration lists")
    texts, flat_images, flat_seeds, chat = [], [], [], chat_format(engine)
    for image, description, image_seeds, shown in zip(images, descriptions, seeds, demonstrations):
        prompt = prompts.question_prompt(description or "An image.", chat=chat, demonstrations=shown)
        texts += [prompt] * len(image_seeds)
        flat_images += [image] * len(image_seeds)
        flat_seeds += list(image_seeds)
    flat = iter(engine.generate(texts, flat_images, sampling, row_seeds=flat_seeds))
    return [[clean_question(next(flat)) for _ in image_seeds] for image_seeds in seeds]


def answer_twice_seeded(
    engine: HFEngine,
    images: Sequence[Image.Image],
    questions: Sequence[str],
    seeds: Sequence[tuple[int, int]],
    sampling: Sampling = ANSWER_SAMPLING,
) -> list[tuple[str, str]]:
    """Two answers per question, answer ``s`` under ``seeds[i][s]`` alone; both slots in one call."""
    if not len(images) == len(questions) == len(seeds):
        raise ValueError(f"answer_twice_seeded: {len(images)} images, {len(questions)} questions, "
                         f"{len(seeds)} seed pairs")
    chat = chat_format(engine)
    texts = [prompts.answer_prompt(q, chat=chat) for q in questions] * 2
    row_seeds = [s[0] for s in seeds] + [s[1] for s in seeds]
    out = engine.generate(texts, list(images) * 2, sampling, row_seeds=row_seeds)
    return list(zip(out[: len(questions)], out[len(questions):]))
