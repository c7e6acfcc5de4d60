"""Text generation with Hugging Face ``generate``: the engine every CPU path uses (and GPUs without vLLM).

Self-play (METHOD §3) is three calls of one engine over a batch of images:

1. ``describe`` — greedy "Can you describe the image in detail?";
2. ``ask`` — an open questioner (``VUSER:``) turn after that description, sampled k times per image
   (temperature 1.2, top_k 300, top_p 0.95);
3. ``answer_twice`` — two sampled answers per question (temperature 1.2, top_k 100, top_p 0.95), each
   slot drawn under its own seed so the two differ and a rerun reproduces both.

Evaluation and serving use ``answer`` with greedy decoding. Outputs are cleaned (cut at the end-of-turn
token) and judged degenerate (empty, a single repeated word, …) here, so that every engine filters the
same way (``question_reasons`` also drops a question already asked about the image; ``answer_pair_reason``
an identical pair).

The preference job uses the seeded variants ``ask_seeded`` / ``answer_twice_seeded``: every row samples
from its own generator (``RowSampler``) under a seed derived from the global seed and the image id
(``GenerationSettings``, ``derive_seed``), so its text does not depend on how Ray Data batched it.
"""

from __future__ import annotations

import hashlib
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from PIL import Image
from transformers.generation.logits_process import (
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from stmed import prompts
from stmed.config import ConfigError
from stmed.log import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class Sampling:
    """Decoding settings; ``temperature == 0`` means greedy."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 64

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


QUESTION_SAMPLING = Sampling(temperature=1.2, top_k=300, top_p=0.95, max_new_tokens=300)
ANSWER_SAMPLING = Sampling(temperature=1.2, top_k=100, top_p=0.95, max_new_tokens=300)
GREEDY = Sampling(max_new_tokens=128)


@dataclass(frozen=True)
class GenerationSettings:
    """Self-play settings (config group ``generation``); defaults are the paper's (METHOD §3)."""

    engine: Literal["hf", "vllm"] = "hf"
    """``hf``: ``model.generate`` in a Ray Data actor (CPU, or a GPU without vLLM); ``vllm``: Ray Data
    LLM processors on GPUs (merged weights only)."""
    questions_per_image: int = 5
    """k questions sampled per image (paper: 3–5)."""
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
    """Engine replicas per vLLM stage (each stage's pool autoscales 1..n; one GPU per replica)."""

    def __post_init__(self) -> None:
        positive = ("questions_per_image", "batch_size", "describe_max_tokens", "question_max_tokens",
                    "answer_max_tokens", "vllm_concurrency")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"generation.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("question_temperature", "answer_temperature"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"generation.{name} must be > 0 (self-play samples), "
                                  f"got {getattr(self, name)}")
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

    def answer_seeds(self, image_id: str, index: int) -> tuple[int, int]:
        return (derive_seed(self.seed, image_id, "answer", index, 0),
                derive_seed(self.seed, image_id, "answer", index, 1))


class HFEngine:
    """Batched ``model.generate`` over (prompt, image) pairs; left padding, new tokens only."""

    def __init__(self, model, processor, device: str | torch.device = "cpu", batch_size: int = 8):
        self.model = model.to(device).eval()
        self.processor = processor
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.tokenizer = processor.tokenizer
        # Decoder-only batching needs the padding on the left, so every row ends where it continues.
        self.tokenizer.padding_side = "left"
        self.model_id = getattr(model.config, "_name_or_path", "") or "model"
        self.generated_tokens = 0
        """New tokens generated so far (each row up to and including its end-of-turn token)."""

    @torch.inference_mode()
    def generate(
        self,
        prompts_: Sequence[str],
        images: Sequence[Image.Image],
        sampling: Sampling,
        seed: int = 0,
        row_seeds: Sequence[int] | None = None,
    ) -> list[str]:
        """One completion per (prompt, image), cleaned; reproducible for a given ``seed``.

        With ``row_seeds`` (one per prompt) every row samples from its own generator, so a row's
        completion depends on its prompt, image and seed only, not on the rows batched with it
        (up to float rounding of padded batches); ``seed`` is then unused.
        """
        if len(prompts_) != len(images):
            raise ValueError(f"generate: {len(prompts_)} prompts but {len(images)} images")
        if row_seeds is not None and len(row_seeds) != len(prompts_):
            raise ValueError(f"generate: {len(prompts_)} prompts but {len(row_seeds)} row_seeds")
        outputs: list[str] = []
        for start in range(0, len(prompts_), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            # A chunk's draws depend on the seed and the chunk, not on what ran before it.
            torch.manual_seed(seed + start)
            seeds = None if row_seeds is None else list(row_seeds[chunk])
            outputs.extend(self._generate_chunk(list(prompts_[chunk]), list(images[chunk]), sampling, seeds))
        return outputs

    def _generate_chunk(
        self,
        texts: list[str],
        images: list[Image.Image],
        sampling: Sampling,
        row_seeds: list[int] | None = None,
    ) -> list[str]:
        inputs = self.processor(text=texts, images=images, padding=True, return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        kwargs = {
            "max_new_tokens": sampling.max_new_tokens,
            "eos_token_id": self.tokenizer.eos_token_id,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if sampling.greedy:
            kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
        elif row_seeds is not None:
            # Greedy over logits where only the row's own sampled token is finite = per-row sampling.
            sampler = RowSampler(row_seeds, sampling)
            kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None,
                          logits_processor=LogitsProcessorList([sampler]))
        else:
            kwargs.update(
                do_sample=True,
                temperature=sampling.temperature,
                top_k=sampling.top_k or None,
                top_p=sampling.top_p,
            )
        out = self.model.generate(**inputs, **kwargs)
        new_tokens = out[:, inputs["input_ids"].shape[1]:]  # (batch, new)
        ended_before = (new_tokens == self.tokenizer.eos_token_id).long().cumsum(1) - (
            new_tokens == self.tokenizer.eos_token_id).long()  # eos seen strictly before each position
        self.generated_tokens += int((ended_before == 0).sum())
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=False)
        return [clean_output(t, self.tokenizer) for t in texts]


class RowSampler(LogitsProcessor):
    """Sampling where row ``i`` draws every token from its own generator seeded with ``seeds[i]``.

    HF's sampler draws the whole batch from the global RNG, so a row's tokens would depend on the rows
    that share its batch, and a rerun with another batch size (Ray Data hands out varying batches)
    would sample different questions. Here row ``i``'s t-th token is the t-th draw of generator ``i``.
    The processor returns logits in which only the drawn token is finite; greedy decoding then takes it.
    """

    def __init__(self, seeds: Sequence[int], sampling: Sampling):
        self.seeds = [int(s) for s in seeds]
        self.warpers = [TemperatureLogitsWarper(sampling.temperature), TopPLogitsWarper(sampling.top_p)]
        if sampling.top_k:
            self.warpers.insert(1, TopKLogitsWarper(sampling.top_k))
        self.generators: list[torch.Generator] | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.generators is None:  # created here, on the device the logits live on
            self.generators = [torch.Generator(scores.device).manual_seed(s) for s in self.seeds]
        if scores.shape[0] != len(self.generators):
            raise ValueError(f"RowSampler: {len(self.generators)} seeds for a batch of {scores.shape[0]}")
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        probs = torch.softmax(scores.float(), dim=-1)  # (batch, vocab)
        drawn = torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, self.generators)])
        forced = torch.full_like(scores, float("-inf"))
        return forced.scatter_(1, drawn.unsqueeze(1), 0.0)


def derive_seed(base: int, *keys: object) -> int:
    """A stable 31-bit seed from a global seed and keys (image id, slot…): same inputs, same seed, on
    any machine and in any batch (Python's ``hash`` is salted per process, sha256 is not)."""
    text = "\x1f".join([str(base), *(str(k) for k in keys)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") & 0x7FFFFFFF


_EDGE_PUNCTUATION = string.punctuation + string.whitespace


def normalize_text(text: str) -> str:
    """The form two generated texts are compared in: lower case, single spaces, no edge punctuation."""
    return " ".join(text.lower().split()).strip(_EDGE_PUNCTUATION)


def clean_output(text: str, tokenizer=None) -> str:
    """Cut a completion at its end-of-turn token and drop padding and stray special tokens."""
    eos = getattr(tokenizer, "eos_token", None) or prompts.EOS
    text = text.split(eos, 1)[0]
    specials = set(getattr(tokenizer, "all_special_tokens", []) or []) | {prompts.IMAGE_TOKEN}
    for token in specials:
        text = text.replace(token, "")
    # A model that starts a new role inside its turn has stopped answering.
    text = re.split(rf"\b(?:{'|'.join(prompts.ROLES)}):", text, maxsplit=1)[0]
    return " ".join(text.split())


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


def question_reasons(questions: Sequence[str]) -> list[str | None]:
    """Why each of one image's sampled questions is dropped, or None to keep it: degenerate, not a
    question, or the same (normalised) as a question already kept for this image."""
    kept: set[str] = set()
    reasons: list[str | None] = []
    for question in questions:
        reason = question_reason(question)
        if reason is None and normalize_text(question) in kept:
            reason = "duplicate"
        if reason is None:
            kept.add(normalize_text(question))
        reasons.append(reason)
    return reasons


def answer_pair_reason(answer1: str, answer2: str) -> str | None:
    """Why a pair of sampled answers cannot become a preference pair, or None: either answer
    degenerate, or both the same (nothing for the judge to prefer)."""
    for slot, text in (("answer1", answer1), ("answer2", answer2)):
        reason = degenerate_reason(text)
        if reason:
            return f"{slot}_{reason}"
    if normalize_text(answer1) == normalize_text(answer2):
        return "identical_answers"
    return None


def describe(engine: HFEngine, images: Sequence[Image.Image], sampling: Sampling = GREEDY) -> list[str]:
    """Greedy description of every image (the questioner's context)."""
    prompt = prompts.describe_prompt()
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
    texts = [prompts.question_prompt(d or "An image.") for d in descriptions]
    rounds = [engine.generate(texts, images, sampling, seed=seed + r * 100_003) for r in range(k)]
    return [[clean_question(rounds[r][i]) for r in range(k)] for i in range(len(images))]


def answer(
    engine: HFEngine,
    images: Sequence[Image.Image],
    questions: Sequence[str],
    sampling: Sampling = GREEDY,
    seed: int = 0,
    system: str = prompts.SYSTEM_SQ,
) -> list[str]:
    """One answer per (image, question)."""
    texts = [prompts.answer_prompt(q, system=system) for q in questions]
    return engine.generate(texts, images, sampling, seed=seed)


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
) -> list[list[str]]:
    """``len(seeds[i])`` questions for image ``i``, question ``j`` sampled under ``seeds[i][j]`` alone
    (batch-independent, unlike ``ask``); cleaned, not yet filtered. All prompts go in one call."""
    if not len(images) == len(descriptions) == len(seeds):
        raise ValueError(f"ask_seeded: {len(images)} images, {len(descriptions)} descriptions, "
                         f"{len(seeds)} seed lists")
    texts, flat_images, flat_seeds = [], [], []
    for image, description, image_seeds in zip(images, descriptions, seeds):
        prompt = prompts.question_prompt(description or "An image.")
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
    texts = [prompts.answer_prompt(q) for q in questions] * 2
    row_seeds = [s[0] for s in seeds] + [s[1] for s in seeds]
    out = engine.generate(texts, list(images) * 2, sampling, row_seeds=row_seeds)
    return list(zip(out[: len(questions)], out[len(questions):]))
