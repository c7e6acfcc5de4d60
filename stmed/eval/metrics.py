"""The medical-VQA scorer every paper's table uses: LLaVA-Med v1.0's, reproduced quirk for quirk.

Two kinds of question (METHOD §5):
- OPEN: unigram precision / recall / F1 between prediction and ground truth, macro-averaged.
- CLOSED (yes/no): a hit when the prediction says "yes" or "no" somewhere and contains the ground
  truth as a substring. We report a strict variant beside it (first yes/no word equals the answer),
  because the substring rule counts "normal" as saying "no".

The quirks kept on purpose, because published numbers were computed with them:
- the period regex gets ``re.UNICODE`` as its *count*, so at most 32 periods are removed;
- OPEN metrics normalise both strings twice (once in the scorer's loop, again inside its F1);
- tp counts the *prediction's* occurrences of shared words, so repeating a right word raises tp;
- the contraction table has capitalised keys ("Im", "Ive") that can never match lower-cased text.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # records only; the scorer itself needs nothing from stmed.data.records at import time
    from stmed.data.records import Prediction, VQAExample

OPEN = "OPEN"
CLOSED = "CLOSED"

# The marks handled one by one, in the original's order (the order matters: see _strip_punctuation).
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# "(?!<=\d)" is a negative *lookahead* for the text "<=digit" (the author meant a lookbehind), so in
# effect this removes every period not followed by a digit, including one that follows a digit.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
# The original calls `period_strip.sub("", text, re.UNICODE)`: the flag lands in the count slot.
PERIOD_LIMIT = int(re.UNICODE)  # == 32

NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})

# The VQA challenge's vqaEval.py table (apostrophe-less form -> apostrophe form), entries as published,
# including the odd ones ("somebody'd" -> "somebodyd") and capitalised keys that never match here.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}


def _strip_punctuation(text: str) -> str:
    """Delete or blank each mark; the decision looks at the *original* text, never the edited one."""
    # A digit,digit anywhere ("1,000") switches every mark to deletion, not just the comma.
    has_digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        beside_space = (mark + " ") in text or (" " + mark) in text
        out = out.replace(mark, "" if beside_space or has_digit_comma else " ")
    return out


def normalize(text: str) -> str:
    """LLaVA-Med's ``normalize_word`` applied to a lower-cased string (METHOD §5, in that order)."""
    text = _strip_punctuation(text.lower())
    text = _PERIOD.sub("", text, count=PERIOD_LIMIT)
    words = [NUMBER_WORDS.get(word, word) for word in text.split()]
    words = [CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES]
    # No mark survives _strip_punctuation, so this only matters for commas a table could introduce;
    # kept because the original does it.
    return " ".join(words).replace(",", "")


def _open_counts(text: str) -> Counter[str]:
    # The scorer's loop normalises once and its F1 function normalises again: OPEN sees both passes.
    return Counter(normalize(normalize(text)).split())


def open_scores(pred: str, gt: str) -> tuple[float, float, float]:
    """(precision, recall, F1) in [0, 1] for one OPEN question, with the original's counting."""
    pred_counts, gt_counts = _open_counts(pred), _open_counts(gt)
    if not pred_counts or not gt_counts:
        return 0.0, 0.0, 0.0
    # tp takes the *prediction's* count of each shared word (not min of the two counts), so
    # "mass mass" against "mass" has tp = 2 and recall 2/2; shared words never reach fp or fn.
    tp = sum(count for word, count in pred_counts.items() if word in gt_counts)
    fp = sum(count for word, count in pred_counts.items() if word not in gt_counts)
    fn = sum(count for word, count in gt_counts.items() if word not in pred_counts)
    if tp == 0:
        return 0.0, 0.0, 0.0
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return precision, recall, 2 * precision * recall / (precision + recall)


def closed_hit(pred: str, gt: str) -> bool:
    """The paper-comparable rule: says yes/no somewhere (as substrings) and contains the answer."""
    pred_norm, gt_norm = normalize(pred), normalize(gt)
    says_yes_or_no = "yes" in pred_norm or "no" in pred_norm  # "normal", "nodule" count as "no"
    return says_yes_or_no and gt_norm in pred_norm


def first_yes_no(pred: str) -> str | None:
    """The first whole word "yes" or "no" in the (normalised) prediction, or None."""
    return next((word for word in normalize(pred).split() if word in ("yes", "no")), None)


def closed_hit_strict(pred: str, gt: str) -> bool:
    """The first whole word "yes" or "no" in the prediction equals the (normalised) answer."""
    first = first_yes_no(pred)
    return first is not None and first == normalize(gt)


def yes_no_split(examples: Sequence[VQAExample], texts: Sequence[str]) -> dict[str, float | None]:
    """CLOSED yes/no questions by what the answer says first (%): how often "yes", and the strict accuracy on
    the questions whose answer is yes and on those whose answer is no (None where there are none). A model
    that only shifts its yes/no bias moves one accuracy up and the other down; one that reads the image
    better moves both up, which a single accuracy on a balanced benchmark cannot tell apart."""
    said = [(normalize(e.answer), first_yes_no(t)) for e, t in zip(examples, texts) if e.answer_type == CLOSED]
    said = [(truth, first) for truth, first in said if truth in ("yes", "no")]

    def percent(truth: str | None, word: str) -> float | None:
        return _mean_percent([float(first == word) for t, first in said if truth is None or t == truth])

    return {"closed_said_yes": percent(None, "yes"), "closed_accuracy_on_yes": percent("yes", "yes"),
            "closed_accuracy_on_no": percent("no", "no")}


def _check_aligned(examples: Sequence[VQAExample], predictions: Sequence[Prediction]) -> None:
    """The official scorer zips the two files, so ids must agree in value and order."""
    if len(examples) != len(predictions):
        raise ValueError(f"the benchmark has {len(examples)} questions but there are {len(predictions)} "
                         "predictions; they must match one to one, in order")
    for position, (example, prediction) in enumerate(zip(examples, predictions)):
        if example.id != prediction.question_id:
            raise ValueError(f"ids differ at position {position}: benchmark id {example.id!r}, prediction "
                             f"question_id {prediction.question_id!r} (same ids, same order required)")


def _mean_percent(values: list[float]) -> float | None:
    # None, not 0, when a benchmark has no question of that kind: a metric over nothing is undefined.
    return 100.0 * sum(values) / len(values) if values else None


def score(examples: Sequence[VQAExample], predictions: Sequence[Prediction]) -> dict[str, float | int | None]:
    """Benchmark metrics in percent (0-100, unrounded); None for a kind with no questions."""
    if not examples:
        raise ValueError("no benchmark questions to score")
    _check_aligned(examples, predictions)
    opens: list[tuple[float, float, float]] = []
    closed: list[bool] = []
    strict: list[bool] = []
    for example, prediction in zip(examples, predictions):
        if example.answer_type == OPEN:
            opens.append(open_scores(prediction.text, example.answer))
        elif example.answer_type == CLOSED:
            closed.append(closed_hit(prediction.text, example.answer))
            strict.append(closed_hit_strict(prediction.text, example.answer))
        else:
            raise ValueError(f"question {example.id!r} has answer_type {example.answer_type!r}; "
                             f"expected {OPEN!r} or {CLOSED!r}")
    return {
        "open_recall": _mean_percent([recall for _, recall, _ in opens]),
        "open_f1": _mean_percent([f1 for _, _, f1 in opens]),
        "open_precision": _mean_percent([precision for precision, _, _ in opens]),
        "closed_accuracy": _mean_percent([float(hit) for hit in closed]),
        "closed_accuracy_strict": _mean_percent([float(hit) for hit in strict]),
        "num_open": len(opens),
        "num_closed": len(closed),
    }
