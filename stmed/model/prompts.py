"""The chat template: every fixed text the model is shown, and the prompts that end where it continues.

The template is Vicuna v1 with a third role, the *questioner* (``VUSER``, the paper's ``<vusr>``), which
is plain text, not a special token (METHOD §2)::

    SYSTEM USER: <image>\\nQ1 ASSISTANT: A1</s>VUSER: Q2</s> ASSISTANT: A2</s>

A turn is ``"{ROLE}: "`` + body + tail: user turns end with a space, assistant turns with ``</s>``,
questioner turns with ``</s>`` *and* a space (the questioner asks like a user but is trained like an
assistant, so its question is closed by an end-of-turn token). This module owns those strings;
``stmed.model.conversation`` turns conversations into tokens and label masks using :func:`turn_parts`.

Prompt builders return text that stops right after a role's colon (``"… ASSISTANT:"``): the model then
writes ``" answer</s>"``, which is exactly how the same turn reads in training text.

That is the LLaVA family's chat format (:data:`VICUNA`). A model family with another chat format (Qwen's
ChatML) describes it with a :class:`ChatFormat` and passes it as ``chat=`` to every builder here; the
three roles, the system prompts and which parts are targets stay the same. Turns always hold the
canonical ``"<image>\\n"`` in the first question; a format writes it as its own image block.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

IMAGE_TOKEN = "<image>"
EOS = "</s>"
USER = "USER"
ASSISTANT = "ASSISTANT"
QUESTIONER = "VUSER"
ROLES = (USER, ASSISTANT, QUESTIONER)

SYSTEM_PLAIN = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
SYSTEM_SQ = (
    SYSTEM_PLAIN + " The assistant is also a curious virtual user who asks complex questions "
    "relevant to the image content and avoids uncertain details."
)
DESCRIBE_QUESTION = "Can you describe the image in detail?"
CLOSED_SUFFIX = " Please choose from the following two options: [yes, no]"

SEP = " "
"""Written after the system prompt and after every user or questioner turn."""


@dataclass(frozen=True)
class ChatFormat:
    """How a family's chat template writes the three roles; every string is literal template text.

    A turn renders as ``prefix.format(role=names[role])`` + body + tail: a user turn's body is its text
    and its tail ``user_tail``; an assistant or questioner turn's body is its text + ``eos`` (a target),
    its tail ``answer_tail`` / ``question_tail``. An open turn (where the model continues) is the prefix
    cut to ``open_prefix``; the model writes the rest (``lead``) itself before its text.
    """

    name: str
    names: dict[str, str]
    """Canonical role (USER, ASSISTANT, QUESTIONER) -> the role as the template writes it."""
    header: str
    """The system prompt's rendering, ``{system}`` filled in."""
    prefix: str
    open_prefix: str
    eos: str
    """End-of-turn text after answers and questions; the tokenizer's eos token."""
    user_tail: str
    answer_tail: str
    question_tail: str
    image_token: str
    """The token an image expands into (repeated once per image feature)."""
    image_block: str
    """What the canonical ``"<image>\\n"`` of a first question is written as."""
    image_text: str = ""
    """The text the family's processor writes for one image in place of ``image_block``, with one
    ``image_token`` standing for all of them (Gemma 3 wraps the soft tokens in ``\\n\\n<start_of_image>`` …
    ``<end_of_image>\\n\\n``); empty when it expands ``image_token`` in place. Training text is encoded
    in this form, so its tokens are the processor's (``stmed.model.conversation.encode``)."""
    system_in_first_turn: bool = False
    """The template has no system role and writes the system prompt at the start of the first user turn
    (Gemma 3): ``header`` opens that turn, and the first question (the one with the image) has no prefix."""

    @property
    def lead(self) -> str:
        """What the model writes between an open prefix and its text (Vicuna: the space after ``:``)."""
        full = self.prefix.format(role="R")
        opened = self.open_prefix.format(role="R")
        assert full.startswith(opened), "open_prefix must be a prefix of prefix"
        return full[len(opened) :]

    def turn_parts(self, role: str, text: str) -> tuple[str, str, str]:
        """Split one rendered turn into ``(prefix, body, tail)`` (see :func:`turn_parts`)."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")
        prefix = self.prefix.format(role=self.names[role])
        if role == USER and self.system_in_first_turn and IMAGE_TOKEN in text:
            prefix = ""  # the header opened this turn
        if role == USER:
            return prefix, text.replace(IMAGE_TOKEN + "\n", self.image_block), self.user_tail
        if role == ASSISTANT:
            return prefix, text + self.eos, self.answer_tail
        return prefix, text + self.eos, self.question_tail

    def open(self, role: str) -> str:
        """A turn left open for the model to write."""
        return self.open_prefix.format(role=self.names[role])

    def render_header(self, system: str) -> str:
        if not system.strip():
            raise ValueError("system prompt is empty")
        return self.header.format(system=system)


VICUNA = ChatFormat(
    name="vicuna_v1", names={role: role for role in ROLES}, header="{system}" + SEP,
    prefix="{role}: ", open_prefix="{role}:", eos=EOS, user_tail=SEP, answer_tail="", question_tail=SEP,
    image_token=IMAGE_TOKEN, image_block=IMAGE_TOKEN + "\n",
)  # fmt: skip
"""LLaVA-1.5's Vicuna v1 template with the questioner role ``VUSER``."""


def turn_parts(role: str, text: str, chat: ChatFormat = VICUNA) -> tuple[str, str, str]:
    """Split one rendered turn into ``(prefix, body, tail)``.

    ``body`` is what can be a training target: the text plus ``</s>`` for assistant and questioner
    turns, the bare text for user turns. ``prefix`` (``"ROLE: "``) and ``tail`` never are.
    """
    return chat.turn_parts(role, text)


def image_first(text: str) -> str:
    """Move the single ``<image>`` of a first question to its start: ``"<image>\\n" + question``.

    LLaVA-Med writes the image token at the start or the end of the first question; one in the middle
    would change the sentence if moved, so it is rejected, as are zero or several image tokens and a
    question that is empty once the token is removed.
    """
    count = text.count(IMAGE_TOKEN)
    if count != 1:
        raise ValueError(f"expected exactly one {IMAGE_TOKEN} in the first question, found {count}")
    stripped = text.strip()
    if stripped.startswith(IMAGE_TOKEN):
        question = stripped[len(IMAGE_TOKEN) :].strip()
    elif stripped.endswith(IMAGE_TOKEN):
        question = stripped[: -len(IMAGE_TOKEN)].strip()
    else:
        raise ValueError(f"{IMAGE_TOKEN} is in the middle of the first question; expected start or end")
    if not question:
        raise ValueError("the first question is empty apart from the image token")
    return f"{IMAGE_TOKEN}\n{question}"


def _with_image(question: str) -> str:
    """An inference question with its image token at the start; questions from benchmarks carry none."""
    if IMAGE_TOKEN not in question:
        question = IMAGE_TOKEN + question
    return image_first(question)


def _closed(role: str, text: str, chat: ChatFormat) -> str:
    prefix, body, tail = chat.turn_parts(role, text)
    return prefix + body + tail


def answer_prompt(question: str, system: str = SYSTEM_SQ, chat: ChatFormat = VICUNA) -> str:
    """``"{system} USER: <image>\\n{question} ASSISTANT:"`` — the model continues with its answer."""
    return chat.render_header(system) + _closed(USER, _with_image(question.strip()), chat) + chat.open(ASSISTANT)


def describe_prompt(system: str = SYSTEM_SQ, chat: ChatFormat = VICUNA) -> str:
    """The greedy description request that precedes question sampling (METHOD §3 step 2)."""
    return answer_prompt(DESCRIBE_QUESTION, system, chat)


def _turn_text(text: str, what: str, chat: ChatFormat) -> str:
    """A later turn's text, stripped; refused if empty or holding an end-of-turn or image token."""
    text = text.strip()
    if not text:
        raise ValueError(f"question_prompt: {what} is empty")
    if chat.eos in text or IMAGE_TOKEN in text or chat.image_token in text:
        raise ValueError(f"question_prompt: {what} must not contain {chat.eos} or {chat.image_token}")
    return text


def question_prompt(description: str, system: str = SYSTEM_SQ, chat: ChatFormat = VICUNA,
                    demonstrations: Sequence[tuple[str, str]] = ()) -> str:
    """The describe turn answered with ``description``, then an open ``VUSER:`` turn for a new question.

    ``demonstrations``: ``(question, answer)`` few-shot examples (clinician-starred question-answers,
    BioMed-VITAL's generation stage), written in order as earlier questioner turns and their answers
    between the description and the open turn — the layout stage 1 trained questions in, in any family's
    chat format; the image stays once, in the first turn::

        SYSTEM USER: <image>\\nDESCRIBE ASSISTANT: d</s>VUSER: q1</s> ASSISTANT: a1</s>VUSER:
    """
    first = _closed(USER, _with_image(DESCRIBE_QUESTION), chat)
    described = _closed(ASSISTANT, _turn_text(description, "description", chat), chat)
    text = chat.render_header(system) + first + described
    for n, (question, answer) in enumerate(demonstrations):
        text += _closed(QUESTIONER, _turn_text(question, f"demonstration {n} question", chat), chat)
        text += _closed(ASSISTANT, _turn_text(answer, f"demonstration {n} answer", chat), chat)
    return text + chat.open(QUESTIONER)


def preference_prompt(question: str, chat: ChatFormat = VICUNA) -> str:
    """Plain Vicuna v1 prompt (no questioner in the system prompt) used for DPO pairs (METHOD §4)."""
    return answer_prompt(question, system=SYSTEM_PLAIN, chat=chat)


def serving_chat_template(system: str = SYSTEM_SQ, chat: ChatFormat = VICUNA) -> str:
    """A Jinja chat template that renders an OpenAI chat request exactly as :func:`answer_prompt` does.

    For engines that render chat messages themselves (vLLM's OpenAI server): the checkpoint's own
    template would drop the system prompt the model was tuned with and format the turns its own way.
    The template takes the last user message's text parts joined by spaces, as the HF endpoint does
    (``stmed.serve.contract.chat_parts``), and wraps it in the very strings :func:`answer_prompt`
    writes, cut out of a prompt it rendered, so the two cannot drift apart. Messages come in the
    OpenAI content format (a list of parts; the image part itself renders as nothing, its token is
    in the fixed text).

    It opens with the tokenizer's ``bos_token`` where it has one: vLLM tokenizes a rendered chat with
    ``add_special_tokens=False``, while training and the HF engine always had LLaVA's ``<s>`` (Qwen's
    tokenizers have no BOS token, so nothing is added there).
    """
    marker = "\x00question\x00"
    head, tail = answer_prompt(marker, system, chat).split(marker)
    return (
        "{%- if bos_token is defined and bos_token -%}{{ bos_token }}{%- endif -%}"
        "{%- set ns = namespace(text='') -%}"
        "{%- for message in messages if message['role'] == 'user' -%}"
        "{%- if message['content'] is string -%}{%- set ns.text = message['content'] -%}"
        "{%- else -%}{%- set ns.text = message['content'] | selectattr('type', 'equalto', 'text')"
        " | map(attribute='text') | join(' ') -%}{%- endif -%}"
        "{%- endfor -%}"
        "{{ " + _jinja_literal(head) + " + (ns.text | trim) + " + _jinja_literal(tail) + " }}"
    )


def _jinja_literal(text: str) -> str:
    """``text`` as a single-quoted Jinja string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def corpus() -> list[str]:
    """Every fixed text the project renders, for training the tiny tokenizer.

    Includes a skeleton of a rendered conversation so that role prefixes are learned in the context
    they appear in (after a space, after ``</s>``); special tokens are left out of it, they are never
    merged.
    """
    skeleton = (
        f"{SYSTEM_SQ} {USER}: {DESCRIBE_QUESTION} {ASSISTANT}: {QUESTIONER}: {ASSISTANT}: "
        f"{SYSTEM_PLAIN} {USER}: {ASSISTANT}:"
    )
    return [
        SYSTEM_PLAIN,
        SYSTEM_SQ,
        DESCRIBE_QUESTION,
        CLOSED_SUFFIX.strip(),
        *(f"{role}: " for role in ROLES),
        *(f" {role}:" for role in ROLES),
        skeleton,
    ]
