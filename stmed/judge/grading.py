"""Grading an answer against an image's known findings: the reference judge's deterministic rules.

The synthetic phantoms (``stmed.data.synthetic``) come with their findings — modality, organ, whether there
is a lesion, and its side, size and count — so an answer can be graded without a model. The question's
topic (modality, organ, lesion presence, side, size, count, a description, or unknown) and, for yes/no
questions, its claims are read with keyword rules that cover ``stmed.data.synthetic``'s templates and common
free-form phrasings; the answer's statements are read the same way. A correct answer scores 8 (a bit
more for further correct detail), a wrong one 2, an answer that says nothing about the question 3, an
empty or degenerate one 1.

``stmed.judge.reference`` serves these scores behind an OpenAI-compatible endpoint (``judge_answer``
gives the score and the reason its explanation line reports); ``score_answer`` is the bare score.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

from stmed.data.synthetic import Findings

# ----------------------------------------------------------------------------- reading text

_WORDS = {
    "modality": {"ct": "ct", "tomography": "ct", "mri": "mri", "mr": "mri", "resonance": "mri",
                 "xray": "x-ray", "radiograph": "x-ray", "radiography": "x-ray"},
    "organ": {"brain": "brain", "head": "brain", "skull": "brain", "cranial": "brain", "cerebral": "brain",
              "chest": "chest", "lung": "chest", "lungs": "chest", "thorax": "chest", "thoracic": "chest",
              "abdomen": "abdomen", "abdominal": "abdomen", "belly": "abdomen"},
    "side": {"left": "left", "right": "right"},
    "size": {"small": "small", "tiny": "small", "little": "small", "large": "large", "big": "large",
             "huge": "large"},
}
_NUMBERS = {"zero": 0, "none": 0, "one": 1, "single": 1, "solitary": 1, "two": 2, "three": 3, "four": 4,
            "five": 5, **{str(n): n for n in range(10)}}
_MULTIPLE = {"multiple", "several", "many"}
_LESION = r"(?:lesions?|mass(?:es)?|tumou?rs?|nodules?|spots?|abnormalit(?:y|ies))"
_COUNTED = re.compile(r"\b(" + "|".join([*_NUMBERS, *_MULTIPLE]) + r")\s+(?:(?:small|large|big|tiny|bright|"
                      r"round|white|visible)\s+)*" + _LESION + r"\b")
_ABSENT = re.compile(r"\bno\s+(?:\w+\s+)?" + _LESION + r"|\b(?:normal|unremarkable)\b|\bwithout\s+(?:any\s+)?"
                     + _LESION + r"|\b(?:is|are)\s+not\s+(?:any\s+)?" + _LESION + r"|\bnone\b")
_PRESENT = re.compile(r"\b" + _LESION + r"\b|\babnormal\b")
_SUFFIX = re.compile(r"\s*please choose from the following.*$", re.IGNORECASE | re.DOTALL)
_AUXILIARY = {"is", "are", "does", "do", "did", "was", "were", "can", "could", "has", "have", "will", "would",
              "should"}
# Question cues for each topic, besides the finding words themselves; checked in this priority order.
_TOPIC_CUES = {
    "count": ("how many", "number of", "multiple", "several", "only one", "single", "count"),
    "size": ("size", "how large", "how big"),
    "side": ("side", "where", "located", "location"),
    "modality": ("modality", "type of scan", "kind of scan", "type of image", "imaging", "taken with"),
    "organ": ("organ", "part of the body", "body part", "region", "anatomy"),
    "presence": ("lesion", "normal", "abnormal", "mass", "tumor", "nodule"),
}
_DESCRIBE_CUES = ("describe", "detail", "what do you see", "what can you see", "what is shown",
                  "what does the image show", "findings", "tell me about")


def _normalise(text: str) -> str:
    text = re.sub(r"<image>", " ", text.lower())
    text = re.sub(r"\bx[\s-]?rays?\b", "xray", text)
    return re.sub(r"\s+", " ", text).strip()


@dataclass
class _Claims:
    """What a text states: finding words it uses, counts it names, and whether it says a lesion exists."""

    values: dict[str, set[str]]
    counts: set[int | str]
    presence: bool | None


def _claims(text: str, bare_count: bool = False) -> _Claims:
    words = re.findall(r"[a-z0-9]+", text)
    values = {attr: {table[w] for w in words if w in table} for attr, table in _WORDS.items()}
    counts: set[int | str] = {m if m in _MULTIPLE else _NUMBERS[m] for m in _COUNTED.findall(text)}
    if bare_count and not counts:  # "How many lesions?" → "two": the number stands alone
        counts = {_NUMBERS[w] for w in words if w in _NUMBERS}
    presence = None
    if _ABSENT.search(text) or counts == {0}:
        presence = False
    elif _PRESENT.search(text) or any(c != 0 for c in counts):
        presence = True
    return _Claims(values, counts, presence)


def _attr_ok(attr: str, claims: _Claims, f: Findings) -> bool | None:
    """Whether the text's statement about ``attr`` is true of the image; None if it makes none."""
    if attr == "presence":
        return None if claims.presence is None else claims.presence == f.lesion
    if attr == "count":
        if not claims.counts:
            return None
        return all(f.count >= 2 if isinstance(c, str) else c == f.count for c in claims.counts)
    said = claims.values[attr]
    if not said:
        return None
    truth = {"modality": f.modality, "organ": f.organ, "side": f.side, "size": f.size}[attr]
    return said == {truth}  # naming several values is hedging, not an answer


_ATTRS = ("presence", "count", "size", "side", "modality", "organ")


def _graded(claims: _Claims, f: Findings) -> dict[str, bool]:
    out = {attr: ok for attr in _ATTRS if (ok := _attr_ok(attr, claims, f)) is not None}
    if claims.presence is False and f.lesion is False:
        # "there is no lesion" on a clean image also settles where/how big/how many
        out.update({attr: True for attr in ("side", "size", "count") if attr not in out})
    return out


def _degenerate(answer: str) -> str | None:
    words = re.findall(r"[a-z0-9]+", answer.lower())
    if not words or not re.search(r"[a-z]", answer.lower()):
        return "empty answer"
    if len(words) >= 6 and len(set(words)) / len(words) < 0.3:
        return "degenerate, repetitive answer"
    if re.search(r"\b(\w+)(?:\W+\1\b){3,}", answer.lower()):
        return "degenerate, repeats a word"
    if answer.strip().endswith("?"):
        return "answers with a question"
    return None


# ----------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class Verdict:
    """One answer's score and the reason, as the explanation line reports it."""

    score: int
    reason: str


@functools.cache
def _cues_pattern(cues: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile(r"\b(?:" + "|".join(re.escape(cue) for cue in cues) + ")")


def _has(text: str, cues: tuple[str, ...]) -> bool:
    """Whether any cue starts at a word boundary in ``text`` (one compiled search for all of them)."""
    return _cues_pattern(cues).search(text) is not None


def _question_topics(q: str) -> list[str]:
    claims = _claims(q)
    return [t for t, cues in _TOPIC_CUES.items()
            if _has(q, cues) or claims.values.get(t) or (t == "count" and claims.counts)]


def _expected_yes(q: str, f: Findings) -> tuple[bool, set[str]] | None:
    """For a yes/no question: whether its claims hold for the image, and which attributes it asks about."""
    claims = _claims(q)
    if " or " in q or any(len(v) > 1 for v in claims.values.values()):
        return None  # "left or right?" is a choice between values: an open question in disguise
    asked = {a for a in ("modality", "organ", "side", "size") if claims.values[a]}
    asked |= {"count"} if claims.counts else set()
    if claims.presence is not None or asked & {"side", "size", "count"}:
        asked.add("presence")
    if not asked:
        return None
    presence = False if claims.presence is False else (True if asked & {"side", "size", "count"} else claims.presence)
    checks = [_attr_ok(a, claims, f) for a in asked - {"presence"}]
    holds = (presence is None or presence == f.lesion) and all(ok is not False for ok in checks)
    return holds, asked


def _finish(correct: bool, graded: dict[str, bool], what: str, primary_graded: bool) -> Verdict:
    """Correct → 8, plus 1 per further correct statement (up to 10), minus 3 per false one (not below 4);
    wrong → 2, or 1 when it also states other falsehoods."""
    right, wrong = sum(graded.values()), sum(not ok for ok in graded.values())
    if correct:
        extra = right - 1 if primary_graded else right  # the answer itself is not extra detail
        return Verdict(max(4, min(10, 8 + min(2, extra) - 3 * wrong)), f"correct about {what}")
    return Verdict(1 if wrong >= 2 else 2, f"wrong about {what}")


def _judge_closed(q: str, answer: str, f: Findings, expected: bool, asked: set[str]) -> Verdict:
    first = re.findall(r"[a-z]+", answer)[:1]
    graded = _graded(_claims(answer), f)
    what = "/".join(sorted(asked))
    if first in (["yes"], ["no"]):
        return _finish((first[0] == "yes") == expected, graded, what, primary_graded=False)
    on_topic = {a: ok for a, ok in graded.items() if a in asked}
    if not on_topic:
        return Verdict(3, f"does not answer the question about {what}")
    return _finish(all(on_topic.values()), graded, what, primary_graded=True)


def _judge_open(topic: str, answer: str, f: Findings) -> Verdict:
    graded = _graded(_claims(answer, bare_count=topic == "count"), f)
    if topic not in graded:
        if graded.get("presence") is False:  # "there is no lesion" when asked where it is
            return Verdict(2, f"wrong about {topic}: the image has a lesion")
        if graded and all(graded.values()):  # true of the image, but not what was asked
            return Verdict(min(5, 3 + sum(graded.values())), f"relevant but does not say the {topic}")
        return Verdict(2 if graded else 3, f"does not answer the question about {topic}")
    return _finish(graded[topic], graded, topic, primary_graded=True)


def _judge_description(answer: str, f: Findings) -> Verdict:
    graded = _graded(_claims(answer), f)
    expected = 6 if f.lesion else 3  # modality, organ, presence (+ count, size, side)
    right = sum(ok for a, ok in graded.items() if f.lesion or a in ("modality", "organ", "presence"))
    wrong = sum(not ok for ok in graded.values())
    if not graded:
        return Verdict(2, "describes nothing the image shows")
    score = max(1, min(10, 1 + round(9 * right / expected) - 3 * wrong))
    return Verdict(score, f"{right} of {expected} findings right, {wrong} wrong")


def judge_answer(question: str, answer: str, findings: Findings | dict[str, Any]) -> Verdict:
    """Score one answer to ``question`` about an image with ``findings`` (1..10) and say why."""
    f = findings if isinstance(findings, Findings) else Findings.from_dict(findings)
    problem = _degenerate(answer or "")
    if problem:
        return Verdict(1, problem)
    q, a = _normalise(_SUFFIX.sub("", question)), _normalise(answer)
    if _has(q, _DESCRIBE_CUES):
        verdict = _judge_description(a, f)
    elif q.split(" ", 1)[0] in _AUXILIARY and (closed := _expected_yes(q, f)) is not None:
        verdict = _judge_closed(q, a, f, *closed)
    elif topics := _question_topics(q):
        verdict = _judge_open(topics[0], a, f)
    else:  # a free-form question we cannot read: judge what the answer states about the image
        graded = _graded(_claims(a), f)
        right, wrong = sum(graded.values()), sum(not ok for ok in graded.values())
        verdict = Verdict(max(1, min(9, 5 + right - 3 * wrong)) if graded else 3,
                          f"{right} statements right, {wrong} wrong")
    if len(a.split()) > 150:  # rambling beyond any template's length
        verdict = Verdict(min(verdict.score, 5), verdict.reason + ", far too long")
    return verdict


def score_answer(question: str, answer: str, findings: Findings | dict[str, Any]) -> int:
    """The 1..10 score ``judge_answer`` gives: deterministic, from the findings alone."""
    return judge_answer(question, answer, findings).score


_ANY_FINDINGS = Findings("ct", "brain", True, "left", 1, "small")


def gradable(question: str) -> bool:
    """Whether the rules read a topic in ``question`` that they grade against the findings.

    True for a description request, a yes/no question with a checkable claim, or a question about a
    finding; False where :func:`judge_answer` falls back to judging the answer's statements alone.
    """
    q = _normalise(_SUFFIX.sub("", question))
    if _has(q, _DESCRIBE_CUES) or _question_topics(q):
        return True
    # Whether a yes/no question is checkable does not depend on the image: any findings will do.
    return q.split(" ", 1)[0] in _AUXILIARY and _expected_yes(q, _ANY_FINDINGS) is not None


def preference(scores_a: list[float], scores_b: list[float]) -> dict[str, Any]:
    """Head-to-head of two models' answers to the same questions, from each answer's judge score.

    ``win_rate`` is wins / (wins + losses) of model a, ties left out (None when every question ties);
    the mean scores are over all questions.
    """
    if len(scores_a) != len(scores_b) or not scores_a:
        raise ValueError(f"preference: need equal, non-empty score lists; got {len(scores_a)} and {len(scores_b)}")
    wins = sum(a > b for a, b in zip(scores_a, scores_b))
    losses = sum(a < b for a, b in zip(scores_a, scores_b))
    return {"questions": len(scores_a), "wins": wins, "ties": len(scores_a) - wins - losses, "losses": losses,
            "win_rate": wins / (wins + losses) if wins + losses else None,
            "mean_score_a": sum(scores_a) / len(scores_a), "mean_score_b": sum(scores_b) / len(scores_b)}
