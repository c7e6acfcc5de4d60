"""A conversation as training tokens: turns, rendered text with target spans, ids with label masks.

Stage 1 trains on answers (``qa``) and on questions (``vq``) at once (METHOD §2). A LLaVA-Med
conversation becomes :class:`Turn` s (:func:`to_turns`, which re-labels later user turns as questioner
turns with probability ``sq_ratio``), then text with the character spans that are targets
(:func:`render`), then token ids whose labels come from the tokenizer's offsets (:func:`encode`).

Which tokens are targets. A span holds the answer (or question) text and its ``</s>``; the space
between the role's colon and that text belongs to the prefix in the rendered string, but the prompt
builders stop at the colon (``"… ASSISTANT:"``), so at inference the model writes that space itself.
The rule is therefore: a token is a target iff its character span is non-empty and lies inside the
target span *extended left by that one separator space*. Byte-level BPE merges the space into the first
word (``" The"``) or keeps it alone (``" "``); either way the tokens that follow the colon are targets,
whatever the merges, and every decoded target run reads ``" <text></s>"``. A token that straddles the
colon itself (``": "``) or the end of a span is not a target. The ``VUSER`` prefix, the first user turn,
the system prompt, ``<s>`` and the image tokens never are.

``labels`` and ``loss_kind`` are aligned with ``input_ids`` (not shifted): the model shifts them.

All of this is family-agnostic: the chat format (``chat=``, a ``stmed.model.prompts.ChatFormat``, Vicuna
by default) says how the roles, the end-of-turn token and the image are written. In ChatML the text
follows the role's newline directly, so no separator space is there to widen a span over.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

import torch

from stmed.model.prompts import (
    ASSISTANT,
    EOS,
    IMAGE_TOKEN,
    QUESTIONER,
    ROLES,
    USER,
    VICUNA,
    ChatFormat,
    image_first,
)  # fmt: skip

IGNORE_INDEX = -100
LOSS_NONE, LOSS_QA, LOSS_VQ = 0, 1, 2
KIND_CODES = {"qa": LOSS_QA, "vq": LOSS_VQ}
KIND_NAMES = {code: name for name, code in KIND_CODES.items()}
_TURN_KINDS = {ASSISTANT: "qa", QUESTIONER: "vq"}

SpanKind = Literal["qa", "vq"]


@dataclass(frozen=True)
class Turn:
    """One turn of a conversation; ``role`` is USER, ASSISTANT or QUESTIONER (``VUSER``)."""

    role: str
    text: str


@dataclass(frozen=True)
class Span:
    """Characters ``text[start:end]`` of a rendered conversation that are targets of loss ``kind``."""

    start: int
    end: int
    kind: SpanKind


@dataclass(frozen=True)
class Rendered:
    """A conversation's template text and its target spans, in order."""

    text: str
    spans: list[Span]


@dataclass(frozen=True)
class Encoded:
    """One training sequence. ``labels`` is -100 off-target; ``loss_kind`` is 0 none, 1 qa, 2 vq."""

    input_ids: list[int]
    labels: list[int]
    loss_kind: list[int]
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_targets(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def _turn_text(index: int, message: object) -> tuple[str, str]:
    """``(from, value)`` of one LLaVA-Med message, validated."""
    if not isinstance(message, dict):
        # ValueError, not TypeError: callers count and skip every malformed record the same way.
        raise ValueError(f"turn {index} is not an object")  # noqa: TRY004
    speaker, value = message.get("from"), message.get("value")
    expected = "human" if index % 2 == 0 else "gpt"
    if speaker != expected:
        raise ValueError(f"turns do not alternate: turn {index} is from {speaker!r}, expected {expected!r}")
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"turn {index} has empty text")
    if EOS in value:
        raise ValueError(f"turn {index} contains the end-of-turn marker {EOS}")
    if index > 0 and IMAGE_TOKEN in value:
        raise ValueError(f"turn {index} contains {IMAGE_TOKEN}; it may only appear in the first question")
    return speaker, value.strip()


def to_turns(conversations: list[dict], sq_ratio: float, rng: random.Random) -> list[Turn]:
    """LLaVA-Med ``conversations`` → turns, each later human turn a questioner turn w.p. ``sq_ratio``.

    Raises ``ValueError`` with the reason for a malformed conversation (callers count and skip it).
    One ``rng.random()`` is drawn per later human turn, whatever ``sq_ratio``, so a seeded ``rng``
    replays the same choice and every fresh draw re-labels anew (METHOD §2: re-drawn at each load).
    """
    if not 0.0 <= sq_ratio <= 1.0:
        raise ValueError(f"sq_ratio must be in [0, 1], got {sq_ratio}")
    if not isinstance(conversations, list):
        raise ValueError(f"conversations is a {type(conversations).__name__}, expected a list")  # noqa: TRY004
    if not conversations:
        raise ValueError("conversation is empty")
    if len(conversations) % 2:
        raise ValueError(
            f"conversation ends with a human turn that has no answer ({len(conversations)} turns)"
        )
    turns = []
    for index, message in enumerate(conversations):
        speaker, text = _turn_text(index, message)
        if index == 0:
            turns.append(Turn(USER, image_first(text)))
        elif speaker == "gpt":
            turns.append(Turn(ASSISTANT, text))
        else:
            turns.append(Turn(QUESTIONER if rng.random() < sq_ratio else USER, text))
    return turns


def _check_order(turns: list[Turn]) -> None:
    if not turns:
        raise ValueError("no turns to render")
    for index, turn in enumerate(turns):
        if turn.role not in ROLES:
            raise ValueError(f"turn {index} has unknown role {turn.role!r}")
        asks = turn.role in (USER, QUESTIONER)
        if asks != (index % 2 == 0):
            raise ValueError(f"turn {index} ({turn.role}) breaks the question/answer alternation")
    if turns[0].role != USER or IMAGE_TOKEN not in turns[0].text:
        raise ValueError(f"the first turn must be a USER turn holding {IMAGE_TOKEN}")


def render(turns: list[Turn], system: str, chat: ChatFormat = VICUNA) -> Rendered:
    """The text of ``turns`` in ``chat``'s template and the character spans that are ``qa``/``vq`` targets."""
    _check_order(turns)
    header = chat.render_header(system)
    parts, spans = [header], []
    offset = len(header)
    for turn in turns:
        prefix, body, tail = chat.turn_parts(turn.role, turn.text)
        kind = _TURN_KINDS.get(turn.role)
        if kind is not None:
            start = offset + len(prefix)
            spans.append(Span(start, start + len(body), kind))
        parts += [prefix, body, tail]
        offset += len(prefix) + len(body) + len(tail)
    text = "".join(parts)
    assert offset == len(text), "span bookkeeping drifted from the rendered text"
    return Rendered(text, spans)


def _target_regions(text: str, spans: list[Span]) -> list[tuple[int, int, int]]:
    """``(start, end, loss kind)`` of each span, widened left over the space the model writes itself."""
    regions = []
    for span in spans:
        start = span.start - 1 if span.start > 0 and text[span.start - 1] == " " else span.start
        regions.append((start, span.end, KIND_CODES[span.kind]))
    return regions


def _token_kind(start: int, end: int, regions: list[tuple[int, int, int]]) -> int:
    """Loss kind of the token covering characters ``[start, end)`` (rule in the module docstring)."""
    if end <= start:  # added tokens such as <s> have empty spans
        return LOSS_NONE
    for region_start, region_end, kind in regions:
        if region_start <= start and end <= region_end:
            return kind
    return LOSS_NONE


def _special_id(tokenizer, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"tokenizer has no {token} token; add it as a special token")
    return token_id


def _processor_text(rendered: Rendered, chat: ChatFormat) -> Rendered:
    """``rendered`` with its image placeholder written as the processor writes it (``chat.image_text``),
    every span after it moved along; unchanged for a format whose processor expands the token in place."""
    at = rendered.text.find(chat.image_block)
    if not chat.image_text or at < 0:
        return rendered
    end, shift = at + len(chat.image_block), len(chat.image_text) - len(chat.image_block)
    spans = [Span(s.start + shift, s.end + shift, s.kind) if s.start >= end else s for s in rendered.spans]
    return Rendered(rendered.text[:at] + chat.image_text + rendered.text[end:], spans)


def encode(rendered: Rendered, tokenizer, image_seq_len: int, max_length: int,
           chat: ChatFormat = VICUNA) -> Encoded:  # fmt: skip
    """Token ids, labels and loss kinds of ``rendered``, the image token expanded to ``image_seq_len``
    (what this image becomes: fixed for LLaVA, size-dependent for Qwen2.5-VL).

    Truncated from the right to ``max_length``; raises ``ValueError`` if the image tokens themselves
    would be cut.
    """
    if image_seq_len < 1 or max_length < 1:
        raise ValueError(f"image_seq_len and max_length must be >= 1, got {image_seq_len}, {max_length}")
    image_token, eos = chat.image_token, chat.eos
    image_id, eos_id = _special_id(tokenizer, image_token), _special_id(tokenizer, eos)
    rendered = _processor_text(rendered, chat)
    batch = tokenizer(rendered.text, return_offsets_mapping=True, add_special_tokens=True)
    ids, offsets = list(batch["input_ids"]), batch["offset_mapping"]
    # The template writes </s> as text; a tokenizer that splits it would train a different end token.
    if ids.count(eos_id) != rendered.text.count(eos):
        raise ValueError(f"tokenizer does not encode {eos} written in text as its single eos id")
    regions = _target_regions(rendered.text, rendered.spans)
    kinds = [_token_kind(start, end, regions) for start, end in offsets]
    positions = [i for i, token_id in enumerate(ids) if token_id == image_id]
    if len(positions) != 1:
        raise ValueError(f"expected one {image_token} token in the rendered text, found {len(positions)}")
    at = positions[0]
    ids[at : at + 1] = [image_id] * image_seq_len
    kinds[at : at + 1] = [LOSS_NONE] * image_seq_len
    truncated = len(ids) > max_length
    if truncated:
        if at + image_seq_len > max_length:
            raise ValueError(
                f"image does not fit: its {image_seq_len} tokens end at {at + image_seq_len} > max_length {max_length}"
            )
        ids, kinds = ids[:max_length], kinds[:max_length]
    labels = [token_id if kind else IGNORE_INDEX for token_id, kind in zip(ids, kinds)]
    return Encoded(input_ids=ids, labels=labels, loss_kind=kinds, truncated=truncated)


def encode_prompt_answer(prompt: str, answer: str, tokenizer, image_seq_len: int, max_length: int,
                         chat: ChatFormat = VICUNA) -> Encoded:  # fmt: skip
    """``prompt`` (ending ``"ASSISTANT:"``) + ``" " + answer + "</s>"``; the answer and ``</s>`` are targets.

    Used for DPO, whose sequence log-probabilities sum over the answer tokens only. In another chat
    format the lead (``" "``) and the end-of-turn token are that format's.
    """
    answer = answer.strip()
    if not answer:
        raise ValueError("encode_prompt_answer: answer is empty")
    if chat.eos in answer or IMAGE_TOKEN in answer or chat.image_token in answer:
        raise ValueError(f"encode_prompt_answer: answer must not contain {chat.eos} or {chat.image_token}")
    start = len(prompt) + len(chat.lead)
    body = answer + chat.eos
    rendered = Rendered(prompt + chat.lead + body, [Span(start, start + len(body), "qa")])
    return encode(rendered, tokenizer, image_seq_len, max_length, chat)


def right_pad(rows: list[list[int]], value: int) -> torch.Tensor:
    """``(len(rows), longest)`` long tensor: each row followed by ``value`` up to the longest."""
    width = max(len(row) for row in rows)
    return torch.tensor([row + [value] * (width - len(row)) for row in rows], dtype=torch.long)


def collate(batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: ``input_ids`` with ``pad_id``, labels with -100, loss kinds with 0."""
    if not batch:
        raise ValueError("collate: empty batch")
    return {
        "input_ids": right_pad([item.input_ids for item in batch], pad_id),
        "attention_mask": right_pad([[1] * len(item) for item in batch], 0),
        "labels": right_pad([item.labels for item in batch], IGNORE_INDEX),
        "loss_kind": right_pad([item.loss_kind for item in batch], LOSS_NONE),
    }


def describe_targets(encoded: Encoded, tokenizer) -> list[tuple[str, str]]:
    """``(kind, decoded text)`` for each contiguous run of target tokens of one kind, in order."""
    runs: list[tuple[int, list[int]]] = []
    previous = LOSS_NONE
    for token_id, kind in zip(encoded.input_ids, encoded.loss_kind):
        if kind != LOSS_NONE:
            if kind != previous:
                runs.append((kind, []))
            runs[-1][1].append(token_id)
        previous = kind
    return [
        (
            KIND_NAMES[kind],
            tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False),
        )
        for kind, ids in runs
    ]
