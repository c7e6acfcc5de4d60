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
"""

from __future__ import annotations

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


def turn_parts(role: str, text: str) -> tuple[str, str, str]:
    """Split one rendered turn into ``(prefix, body, tail)``.

    ``body`` is what can be a training target: the text plus ``</s>`` for assistant and questioner
    turns, the bare text for user turns. ``prefix`` (``"ROLE: "``) and ``tail`` never are.
    """
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")
    prefix = f"{role}: "
    if role == USER:
        return prefix, text, SEP
    if role == ASSISTANT:
        return prefix, text + EOS, ""
    return prefix, text + EOS, SEP


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


def _header(system: str) -> str:
    if not system.strip():
        raise ValueError("system prompt is empty")
    return system + SEP


def _closed(role: str, text: str) -> str:
    prefix, body, tail = turn_parts(role, text)
    return prefix + body + tail


def _open(role: str) -> str:
    """A turn left open for the model: ``"ROLE:"`` with no space, the model writes the space itself."""
    return turn_parts(role, "")[0].rstrip()


def answer_prompt(question: str, system: str = SYSTEM_SQ) -> str:
    """``"{system} USER: <image>\\n{question} ASSISTANT:"`` — the model continues with its answer."""
    return _header(system) + _closed(USER, _with_image(question.strip())) + _open(ASSISTANT)


def describe_prompt(system: str = SYSTEM_SQ) -> str:
    """The greedy description request that precedes question sampling (METHOD §3 step 2)."""
    return answer_prompt(DESCRIBE_QUESTION, system)


def question_prompt(description: str, system: str = SYSTEM_SQ) -> str:
    """The describe turn answered with ``description``, then an open ``VUSER:`` turn for a new question."""
    description = description.strip()
    if not description:
        raise ValueError("question_prompt: description is empty")
    if EOS in description or IMAGE_TOKEN in description:
        raise ValueError(f"question_prompt: description must not contain {EOS} or {IMAGE_TOKEN}")
    first = _closed(USER, _with_image(DESCRIBE_QUESTION))
    return _header(system) + first + _closed(ASSISTANT, description) + _open(QUESTIONER)


def preference_prompt(question: str) -> str:
    """Plain Vicuna v1 prompt (no questioner in the system prompt) used for DPO pairs (METHOD §4)."""
    return answer_prompt(question, system=SYSTEM_PLAIN)


def serving_chat_template(system: str = SYSTEM_SQ) -> str:
    """A Jinja chat template that renders an OpenAI chat request exactly as :func:`answer_prompt` does.

    For engines that render chat messages themselves (vLLM's OpenAI server): the checkpoint's own
    template would drop the system prompt the model was tuned with and format the turns its own way.
    The template takes the last user message's text parts joined by spaces, as the HF endpoint does
    (``stmed.serve.contract.chat_parts``), and wraps it in the very strings :func:`answer_prompt`
    writes, cut out of a prompt it rendered, so the two cannot drift apart. Messages come in the
    OpenAI content format (a list of parts; the image part itself renders as nothing, its token is
    in the fixed text).
    """
    marker = "\x00question\x00"
    head, tail = answer_prompt(marker, system).split(marker)
    return (
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
