"""The project's records and the files they live in.

Records (frozen dataclasses with ``to_row()`` / ``from_row()``, so they cross Ray Data boundaries as
plain dicts of JSON/Arrow values):
- ``InstructSample``: one LLaVA-Med instruction conversation about an image (stage-1 training data);
- ``VQAExample``: one benchmark question with its ground truth;
- ``Prediction``: a model's answer to a ``VQAExample`` (LLaVA-Med answer-file line);
- ``PreferencePair``: a judged pair of self-generated answers (DPO data);
- ``Skip``: an input that was rejected, and why.

File formats (METHOD §6): instruct JSON arrays, benchmark JSON arrays (``conversations`` or the
misspelt ``conversatons``), JSONL answer files, preference pairs as parquet, the reference DPO JSON as
an export, and image manifests (a folder, a JSON/JSONL list, or an instruct file).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from stmed.data.images import SUFFIXES
from stmed.log import get_logger

log = get_logger(__name__)

class DataError(ValueError):
    """An input file that is not what it claims to be, or gives nothing usable: the user's data, not a bug.

    Jobs report it as one line and exit 2, and a training run does not retry it (it would fail again)."""


Gather = Callable[[dict[Any, Any]], dict[Any, Any]]
"""Merges every rank's part of a table keyed by index into the whole table, on every rank (a training
loop hands in its collective; the data checks stay free of process groups)."""


def check_by_rank(items: Sequence[Any], check: Callable[[Any], Any], rank: int, world_size: int,
                  gather: Gather | None, what: str) -> dict[int, Any]:  # fmt: skip
    """``{index: check(item)}`` for every item: each rank checks every ``world_size``-th item from
    ``rank`` and ``gather`` (the training loop's collective) shares the verdicts; one process needs none."""
    verdicts = {i: check(items[i]) for i in range(rank, len(items), world_size)}
    if world_size > 1:
        if gather is None:
            raise ValueError(f"world_size={world_size} needs a gather function to share the verdicts")
        verdicts = gather(verdicts)
    if len(verdicts) != len(items):
        raise RuntimeError(f"checked {len(verdicts)} of {len(items)} {what}; is the process group up?")
    return verdicts

IMAGE_TOKEN = "<image>"  # the literal of stmed.model.prompts.IMAGE_TOKEN
ANSWER_TYPES = ("OPEN", "CLOSED")
ROLES = ("human", "gpt")
# Malformed file content is a ValueError throughout (the project's contract), even where the fault is
# a wrong JSON type; hence the TRY004 exemptions below.


def _plain(value: Any) -> Any:
    """numpy scalars (what Ray Data hands back) to Python values."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (str, bytes)) else value


def _id(value: Any) -> int | str:
    """Ids stay ints when the source file has ints (VQA-RAD) and strings otherwise (LLaVA-Med)."""
    value = _plain(value)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise DataError(f"id must be an int or a string, got {value!r}")  # noqa: TRY004
    return value


def _list(value: Any) -> list[Any]:
    """A list from a JSON list, a numpy array (Ray Data) or None."""
    return [] if value is None else list(value)


class _Row:
    """``to_row`` / ``from_row`` for flat frozen dataclasses."""

    def to_row(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_row(cls, row: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: _plain(v) for k, v in row.items() if k in names})


@dataclass(frozen=True)
class Skip(_Row):
    """An input item that was not used: its id (or ``#index``) and the reason."""

    item_id: str
    reason: str


@dataclass(frozen=True)
class InstructSample(_Row):
    """A LLaVA-Med instruction sample: ``conversations`` is ``[{"from", "value"}, ...]``, human first."""

    id: str
    image: str
    conversations: list[dict[str, str]]

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> InstructSample:
        turns = [{"from": str(t["from"]), "value": str(t["value"])} for t in row["conversations"]]
        return cls(id=str(row["id"]), image=str(row["image"]), conversations=turns)


@dataclass(frozen=True)
class VQAExample(_Row):
    """A benchmark question: ``question`` without ``<image>``, ``answer_type`` OPEN or CLOSED."""

    id: int | str
    image: str
    question: str
    answer: str
    answer_type: str

    def __post_init__(self) -> None:
        if self.answer_type not in ANSWER_TYPES:
            raise DataError(f"answer_type must be one of {ANSWER_TYPES}, got {self.answer_type!r}")

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> VQAExample:
        return cls(id=_id(row["id"]), image=str(row["image"]), question=str(row["question"]),
                   answer=str(row["answer"]), answer_type=str(row["answer_type"]))


@dataclass(frozen=True)
class Prediction(_Row):
    """A model's answer to one question; ``answer_id`` defaults to a digest of the rest (reproducible)."""

    question_id: int | str
    prompt: str
    text: str
    answer_type: str = ""
    model_id: str = ""
    answer_id: str = ""

    def __post_init__(self) -> None:
        if not self.answer_id:
            key = json.dumps([self.question_id, self.prompt, self.text, self.model_id])
            object.__setattr__(self, "answer_id", hashlib.sha256(key.encode()).hexdigest()[:22])


@dataclass(frozen=True)
class PreferencePair(_Row):
    """A judged pair of answers to a self-generated question; higher score = ``chosen``.

    ``seeds`` are the sampling seeds of the two answers (chosen first); ``question_seed`` the seed
    that sampled the question, when known.
    """

    pair_id: str
    image: str
    question: str
    chosen: str
    rejected: str
    chosen_score: float
    rejected_score: float
    judge_model: str
    seeds: list[int] = field(default_factory=list)
    question_seed: int | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> PreferencePair:
        question_seed = _plain(row.get("question_seed"))
        text = {k: "" if row.get(k) is None else str(row[k]) for k in ("question", "chosen", "rejected")}
        return cls(
            pair_id=str(row["pair_id"]), image=str(row["image"]), **text,
            chosen_score=float(row["chosen_score"]), rejected_score=float(row["rejected_score"]),
            judge_model=str(row["judge_model"]), seeds=[int(s) for s in _list(row.get("seeds"))],
            question_seed=None if question_seed is None else int(question_seed),
        )


PREFERENCE_SCHEMA = pa.schema([
    ("pair_id", pa.string()), ("image", pa.string()), ("question", pa.string()),
    ("chosen", pa.string()), ("rejected", pa.string()),
    ("chosen_score", pa.float64()), ("rejected_score", pa.float64()),
    ("judge_model", pa.string()), ("seeds", pa.list_(pa.int64())), ("question_seed", pa.int64()),
])


# ---------------------------------------------------------------- instruction data and benchmarks


def _read_json_array(path: str | os.PathLike) -> list[Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, list):
        kind = type(data).__name__
        raise DataError(f"{path}: expected a JSON array of records, got a JSON {kind}")  # noqa: TRY004
    return data


def conversation_problem(conversations: Any) -> str | None:
    """Why a LLaVA-Med conversation list is unusable, or None when it is well formed.

    Well formed: human/gpt turns, strictly alternating from human, ending with gpt, non-empty string
    values, ``<image>`` at most once and only in the first turn.
    """
    if not isinstance(conversations, list) or len(conversations) < 2:
        return "conversations must be a list of at least two turns"
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or turn.get("from") != ROLES[i % 2]:
            return f"turn {i} must be from {ROLES[i % 2]!r} (strictly alternating, human first)"
        if not isinstance(turn.get("value"), str) or not turn["value"].strip():
            return f"turn {i} has an empty or non-string value"
        if i > 0 and IMAGE_TOKEN in turn["value"]:
            return f"turn {i} contains {IMAGE_TOKEN}; only the first human turn may"
    if len(conversations) % 2:
        return "conversation ends with an unanswered human turn"
    if conversations[0]["value"].count(IMAGE_TOKEN) > 1:
        return f"{IMAGE_TOKEN} appears more than once in the first turn"
    return None


def read_instruct(path: str | os.PathLike) -> tuple[list[InstructSample], list[Skip]]:
    """Read a LLaVA-Med instruct JSON array; unusable entries become ``Skip`` records, not errors."""
    samples: list[InstructSample] = []
    skips: list[Skip] = []
    for index, entry in enumerate(_read_json_array(path)):
        item_id = str(entry["id"]) if isinstance(entry, dict) and "id" in entry else f"#{index}"
        if not isinstance(entry, dict):
            reason = "entry is not a JSON object"
        elif "id" not in entry:
            reason = "missing id"
        elif not isinstance(entry.get("image"), str) or not entry["image"].strip():
            reason = "missing image"
        else:
            reason = conversation_problem(entry.get("conversations"))
        if reason is not None:
            skips.append(Skip(item_id, reason))
            continue
        turns = [{"from": t["from"], "value": t["value"]} for t in entry["conversations"]]
        samples.append(InstructSample(id=item_id, image=entry["image"], conversations=turns))
    if skips:
        log.warning("%s: skipped %d of %d entries (first: %s: %s)", path, len(skips),
                    len(skips) + len(samples), skips[0].item_id, skips[0].reason)
    return samples, skips


def read_benchmark(path: str | os.PathLike) -> list[VQAExample]:
    """Read a LLaVA-Med benchmark file. Strict: a malformed entry is a ValueError naming it, because
    silently dropping a question would change the reported metrics."""
    examples = []
    for index, entry in enumerate(_read_json_array(path)):
        where = f"{path}: entry {index}"
        if not isinstance(entry, dict) or "id" not in entry or not isinstance(entry.get("image"), str):
            raise DataError(f"{where}: needs 'id' and 'image'")
        turns = entry.get("conversations", entry.get("conversatons"))
        if not isinstance(turns, list):
            raise DataError(f"{where} (id {entry['id']}): no 'conversations' list")  # noqa: TRY004
        question, answer = _first_turn(turns, "human"), _first_turn(turns, "gpt")
        if question is None or answer is None:
            raise DataError(f"{where} (id {entry['id']}): needs a human question and a gpt answer")
        answer_type = str(entry.get("answer_type", "")).strip().upper()
        if answer_type not in ANSWER_TYPES:
            raise DataError(f"{where} (id {entry['id']}): answer_type must be OPEN or CLOSED, "
                             f"got {entry.get('answer_type')!r}")
        examples.append(VQAExample(id=_id(entry["id"]), image=entry["image"],
                                   question=question.replace(IMAGE_TOKEN, "").strip(),
                                   answer=answer, answer_type=answer_type))
    return examples


def _first_turn(turns: list[Any], role: str) -> str | None:
    return next((t["value"] for t in turns
                 if isinstance(t, dict) and t.get("from") == role and isinstance(t.get("value"), str)), None)


# ---------------------------------------------------------------- predictions (answer files)


def _write_atomic(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_predictions(path: str | os.PathLike, preds: list[Prediction]) -> Path:
    """Write a LLaVA-Med answer file (JSONL, one line per prediction, in the given order)."""
    lines = []
    for pred in preds:
        metadata = {"answer_type": pred.answer_type} if pred.answer_type else {}
        lines.append(json.dumps({"question_id": pred.question_id, "prompt": pred.prompt, "text": pred.text,
                                 "answer_id": pred.answer_id, "model_id": pred.model_id,
                                 "metadata": metadata}, ensure_ascii=False))
    return _write_atomic(Path(path), "".join(line + "\n" for line in lines))


def read_predictions(path: str | os.PathLike) -> list[Prediction]:
    """Read a LLaVA-Med answer file (ours or the official ones: ``question_id`` and ``text`` required)."""
    preds = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: not valid JSON ({exc})") from exc
        if not isinstance(obj, dict) or "question_id" not in obj or not isinstance(obj.get("text"), str):
            raise DataError(f"{path}:{number}: an answer line needs 'question_id' and a string 'text'")
        metadata = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
        preds.append(Prediction(
            question_id=_id(obj["question_id"]), prompt=str(obj.get("prompt", "")), text=obj["text"],
            answer_type=str(metadata.get("answer_type", "")), model_id=str(obj.get("model_id", "")),
            answer_id=str(obj.get("answer_id", "")),
        ))
    return preds


# ---------------------------------------------------------------- preference pairs


def write_preferences(path: str | os.PathLike, pairs: list[PreferencePair]) -> Path:
    """Write preference pairs as parquet (fixed schema, so an empty list still has typed columns)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist([p.to_row() for p in pairs], schema=PREFERENCE_SCHEMA)
    tmp = path.with_suffix(path.suffix + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path


def read_preferences(path: str | os.PathLike) -> list[PreferencePair]:
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:  # not parquet, truncated, unreadable
        raise DataError(f"{path}: not a readable parquet file ({type(err).__name__})") from None
    missing = set(PREFERENCE_SCHEMA.names) - set(table.column_names) - {"question_seed"}
    if missing:
        raise DataError(f"{path}: not a preference file, missing columns {sorted(missing)}")
    return [PreferencePair.from_row(row) for row in table.to_pylist()]


def export_dpo_json(pairs: list[PreferencePair], path: str | os.PathLike,
                    image_root: str | os.PathLike | None = None) -> Path:
    """Write the reference DPO JSON array (``chosen_conversations`` / ``reject_conversations``).

    With ``image_root``, image paths under it are written relative to it, as the reference expects.
    """
    records = []
    for pair in pairs:
        human = {"from": "human", "value": f"{IMAGE_TOKEN}\n{pair.question}"}
        records.append({
            "id": pair.pair_id,
            "image": _relative_image(pair.image, image_root),
            "chosen_conversations": [human, {"from": "gpt", "value": pair.chosen}],
            "reject_conversations": [human, {"from": "gpt", "value": pair.rejected}],
        })
    return _write_atomic(Path(path), json.dumps(records, indent=2, ensure_ascii=False) + "\n")


def _relative_image(image: str, image_root: str | os.PathLike | None) -> str:
    if image_root is None:
        return image
    try:
        return Path(image).relative_to(image_root).as_posix()
    except ValueError:  # not under image_root: keep the path as given rather than invent one
        return image


# ---------------------------------------------------------------- image manifests


def list_images(manifest: str | os.PathLike, image_root: str | os.PathLike | None = None) -> list[str]:
    """Image paths named by a manifest, de-duplicated in first-seen order.

    ``manifest`` is a folder (searched recursively for image suffixes, sorted), a JSON array or a
    JSONL file of paths or of objects with ``"image"`` (an instruct file is one; objects without an
    image are text-only samples and are left out). Relative paths are resolved against
    ``image_root``, by default the manifest's folder.
    """
    manifest = Path(manifest)
    if manifest.is_dir():
        found = [p for p in manifest.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES]
        for path in found:  # a symlink in the folder that points out of it
            confined_path(manifest, path.relative_to(manifest), f"image folder {manifest}: {path.name}")
        return sorted(str(p) for p in found)
    if not manifest.is_file():
        raise DataError(f"image manifest {manifest} does not exist")
    suffix = manifest.suffix.lower()
    if suffix == ".json":
        located = [(f"entry {i}", entry) for i, entry in enumerate(_read_json_array(manifest))]
    elif suffix == ".jsonl":
        located = [(f"line {n}", entry) for n, entry in _read_jsonl(manifest)]
    else:
        raise DataError(f"image manifest {manifest}: expected a folder, a .json or a .jsonl file")
    root = Path(image_root) if image_root is not None else manifest.parent
    paths = []
    for where, entry in located:
        name = _manifest_image(entry, f"{manifest}: {where}")
        if name is not None:
            paths.append(str(confined_path(root, name, f"image manifest {manifest}: {where}")))
    return list(dict.fromkeys(paths))


def confined_path(root: str | os.PathLike, name: str | os.PathLike, where: str) -> Path:
    """``root / name``, refused (``DataError`` naming ``where``) unless it resolves inside ``root``: an
    absolute path elsewhere, a ``..`` escape or a symlink pointing out would hand any file on the machine
    to self-play, and its image to the judge."""
    path = Path(root) / name
    real_root, real = Path(root).resolve(), path.resolve()
    if not real.is_relative_to(real_root):
        raise DataError(f"{where}: image path {str(name)[:120]!r} resolves to {real}, outside the image root "
                        f"{real_root}; list images under the image root (or set image_root to their folder)")
    return path


def _read_jsonl(path: Path) -> list[tuple[int, Any]]:
    """Each non-empty line's JSON value, with its line number."""
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                entries.append((number, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not valid JSON ({exc})") from exc
    return entries


def _manifest_image(entry: Any, where: str) -> str | None:
    if isinstance(entry, str) and entry.strip():
        return entry
    if isinstance(entry, dict):
        image = entry.get("image")
        if image is None:
            return None
        if isinstance(image, str) and image.strip():
            return image
    raise DataError(f"{where}: expected an image path or an object with an 'image' path, got {entry!r:.80}")


def sample_images(paths: list[str], n: int, seed: int) -> list[str]:
    """``n`` of ``paths`` chosen by ``seed`` (all of them when n >= len), kept in manifest order."""
    if n < 0:
        raise DataError(f"number of images to sample must be >= 0, got {n}")
    if n >= len(paths):
        return list(paths)
    chosen = sorted(random.Random(seed).sample(range(len(paths)), n))
    return [paths[i] for i in chosen]
