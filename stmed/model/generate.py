"""Text generation with Hugging Face ``generate``: the engine every CPU path uses (and GPUs without vLLM).

:class:`HFEngine` runs batched ``model.generate`` over (prompt, image) pairs; :class:`RowSampler` makes
a row's sampled text depend on its own seed alone, not on the rows batched with it. Evaluation and
serving call :func:`answer` with greedy decoding; self-play (``stmed.selfplay.generation``) builds its
describe / ask / answer-twice calls on the same engine. Outputs are cleaned here (cut at the
end-of-turn token, stray special tokens dropped), so that every engine returns the same text.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from transformers.generation.logits_process import (
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from stmed.log import get_logger
from stmed.model import prompts
from stmed.model.families import family_of

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


GREEDY = Sampling(max_new_tokens=128)


class HFEngine:
    """Batched ``model.generate`` over (prompt, image) pairs; left padding, new tokens only."""

    def __init__(self, model, processor, device: str | torch.device = "cpu", batch_size: int = 8):
        self.model = model.to(device).eval()
        self.processor = processor
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.tokenizer = processor.tokenizer
        self.chat = family_of(processor).chat
        """The model family's chat format: prompts for this engine are rendered in it."""
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


def chat_format(engine) -> prompts.ChatFormat:
    """The chat format prompts for ``engine`` are written in (an engine without one speaks Vicuna)."""
    return getattr(engine, "chat", prompts.VICUNA)


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


def answer(
    engine: HFEngine,
    images: Sequence[Image.Image],
    questions: Sequence[str],
    sampling: Sampling = GREEDY,
    seed: int = 0,
    system: str = prompts.SYSTEM_SQ,
) -> list[str]:
    """One answer per (image, question)."""
    chat = chat_format(engine)
    texts = [prompts.answer_prompt(q, system=system, chat=chat) for q in questions]
    return engine.generate(texts, images, sampling, seed=seed)
