"""The Generator actor called directly (no Ray): row schema, seeds, filters, de-duplication, the
judge gate, and the pure pieces of the (GPU-only) vLLM path."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path
from typing import ClassVar

import httpx
import numpy as np
import pytest
from PIL import Image

from actors.generator import Generator, KeptPairJudge, self_play, to_columns
from actors.judge import VERDICT_COLUMNS
from actors.vllm_generator import finish_pair, questions_of_image, vllm_request
from stmed.data.images import decode_data_url, load_image, pixel_digest
from stmed.judge.judging import JudgeSettings
from stmed.model import prompts
from stmed.selfplay import generation
from stmed.selfplay.generation import GenerationSettings
from stmed.selfplay.preferences import OUTPUT_COLUMNS, make_row

K = 3
SETTINGS = GenerationSettings(questions_per_image=K, seed=7, batch_size=8, describe_max_tokens=8,
                              question_max_tokens=12, answer_max_tokens=8)


def _write_images(folder: Path, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        pixels = np.random.default_rng(i).integers(0, 256, (40 + i, 48, 3), dtype=np.uint8)
        paths.append(str(folder / f"img{i}.png"))
        Image.fromarray(pixels).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def generator() -> Generator:
    return Generator({"preset": "tiny"}, SETTINGS)


def _rows(out: dict[str, np.ndarray]) -> list[dict]:
    return [{name: out[name][i] for name in OUTPUT_COLUMNS} for i in range(len(out["pair_id"]))]


def test_generator_rows_cover_every_question_and_unreadable_image(generator: Generator, tmp_path: Path):
    paths = _write_images(tmp_path / "images", 3)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    ids = ["a.png", "b.png", "c.png", "missing.png", "broken.png"]
    batch = {"image_id": np.array(ids), "image_path": np.array([*paths, str(tmp_path / "nope.png"),
                                                                 str(tmp_path / "broken.png")])}
    out = generator(batch)
    assert set(out) == set(OUTPUT_COLUMNS)
    rows = _rows(out)
    errors = {r["image_id"]: r["reason"] for r in rows if r["status"] == "image_error"}
    assert errors["missing.png"] == "file not found"
    assert errors["broken.png"].startswith(("corrupt", "unsupported"))
    assert Counter(r["image_id"] for r in rows if r["status"] != "image_error") == {i: K for i in ids[:3]}
    assert len({r["pair_id"] for r in rows}) == len(rows)
    for image_id, path in zip(ids[:3], paths):
        mine = sorted((r for r in rows if r["image_id"] == image_id), key=lambda r: r["question_index"])
        assert [r["question_index"] for r in mine] == list(range(K))
        assert [r["question_seed"] for r in mine] == [SETTINGS.question_seed(image_id, j) for j in range(K)]
        # every filtered question carries exactly the reason the filter gives for this image's questions
        reasons = generation.question_reasons([r["question"] for r in mine])
        assert [r["reason"] if r["status"] == "question_filtered" else None for r in mine] == reasons
        for r in mine:
            if r["status"] in ("ok", "answer_filtered"):
                assert (r["seed1"], r["seed2"]) == SETTINGS.answer_seeds(image_id, r["question_index"])
                assert r["reason"] == (generation.answer_pair_reason(r["answer1"], r["answer2"]) or "")
            if r["status"] == "ok":  # the judge sees exactly the pixels the model saw
                assert pixel_digest(decode_data_url(r["image_data_url"])) == pixel_digest(load_image(path))
            else:
                assert r["image_data_url"] == ""


def test_generator_output_does_not_depend_on_batching_and_skips_finished_rows(generator: Generator, tmp_path):
    paths = _write_images(tmp_path, 3)
    together = _rows(generator({"image_id": np.array(["x", "y", "z"]), "image_path": np.array(paths)}))
    alone = _rows(generator({"image_id": np.array(["z"]), "image_path": np.array(paths[2:])}))
    key = ("pair_id", "question", "answer1", "answer2", "status", "reason")
    z_in_batch = [tuple(r[k] for k in key) for r in together if r["image_id"] == "z"]
    assert z_in_batch == [tuple(r[k] for k in key) for r in alone]

    resumed = Generator({"preset": "tiny"}, SETTINGS, skip_pair_ids=[alone[0]["pair_id"]])
    rest = _rows(resumed({"image_id": np.array(["z"]), "image_path": np.array(paths[2:])}))
    assert [r["pair_id"] for r in rest] == [r["pair_id"] for r in alone[1:]]


class ScriptedEngine:
    """Stands in for HFEngine: answers by what the prompt asks, so every filter path is reached."""

    QUESTIONS: ClassVar[dict[str, list[str]]] = {  # per image: k=4 sampled questions
        "img-a": ["Is there a lesion?", "Is there a  LESION?", "brain", "What organ is shown here?"],
        "img-b": ["What is in this image?", "the the the the the the?", "Where is the lesion located",
                  "Which side is the lesion on?"],
    }
    ANSWERS: ClassVar[dict[str, tuple[str, str]]] = {
        "Is there a lesion?": ("Yes.", "yes"),  # identical once normalised
        "What organ is shown here?": ("The brain.", ""),
        "What is in this image?": ("A CT of the chest.", "An MRI of the brain."),
        "Which side is the lesion on?": ("Left.", "It is on the right side."),
    }

    def __init__(self):
        self.calls: list[int] = []

    def generate(self, texts, images, sampling, seed=0, row_seeds=None):
        self.calls.append(len(texts))
        outputs, asked = [], Counter()
        for text, image in zip(texts, images):
            if text.endswith(prompts.QUESTIONER + ":"):
                image_id = image.info["id"]
                outputs.append(self.QUESTIONS[image_id][asked[image_id]])
                asked[image_id] += 1
            elif prompts.DESCRIBE_QUESTION in text.split("USER:")[-1]:
                outputs.append("A scan.")
            else:
                question = text.split("<image>\n")[1].rsplit(" ASSISTANT:", 1)[0]
                first = sum(1 for t in texts[: len(outputs)] if t == text) == 0
                outputs.append(self.ANSWERS[question][0 if first else 1])
        return outputs


def test_self_play_dedupes_and_counts_every_filter():
    images = []
    for image_id in ("img-a", "img-b"):
        img = Image.new("RGB", (8, 8))
        img.info["id"] = image_id
        images.append((image_id, f"/data/{image_id}.png", img))
    settings = GenerationSettings(questions_per_image=4, seed=1)
    engine = ScriptedEngine()
    rows = self_play(engine, images, settings)
    outcome = {(r["image_id"], r["question_index"]): (r["status"], r["reason"]) for r in rows}
    assert outcome == {
        ("img-a", 0): ("answer_filtered", "identical_answers"),
        ("img-a", 1): ("question_filtered", "duplicate"),
        ("img-a", 2): ("question_filtered", "too_short"),
        ("img-a", 3): ("answer_filtered", "answer2_empty"),
        ("img-b", 0): ("ok", ""),
        ("img-b", 1): ("question_filtered", "repetitive"),
        ("img-b", 2): ("question_filtered", "not_a_question"),
        ("img-b", 3): ("ok", ""),
    }
    ok = [r for r in rows if r["status"] == "ok"]
    assert [(r["answer1"], r["answer2"]) for r in ok] == [("A CT of the chest.", "An MRI of the brain."),
                                                         ("Left.", "It is on the right side.")]
    assert all(r["image_data_url"].startswith("data:image/png;base64,") for r in ok)
    # one describe call, one call for all 8 questions, one for both answers of the 4 kept questions
    assert engine.calls == [2, 8, 8]


class RecordingEngine(ScriptedEngine):
    """The scripted engine, keeping every questioner prompt it was given, by image."""

    def __init__(self):
        super().__init__()
        self.question_prompts: dict[str, set[str]] = {}

    def generate(self, texts, images, sampling, seed=0, row_seeds=None):
        for text, image in zip(texts, images):
            if text.endswith(prompts.QUESTIONER + ":"):
                self.question_prompts.setdefault(image.info["id"], set()).add(text)
        return super().generate(texts, images, sampling, seed, row_seeds)


def test_both_engines_put_the_same_demonstrations_in_the_questioner_prompt(tmp_path: Path):
    """generation.demonstrations: the HF engine's questioner prompt for an image is the vLLM path's request
    prompt for it, the demonstrations in file order; both call a repeated demonstration a duplicate."""
    from actors.vllm_generator import ask_request

    shown = [("Is the liver enlarged?", "No."), ("What organ is shown here?", "The brain."),
             ("Is there a fracture?", "Yes, of the left rib.")]
    demos = tmp_path / "demonstrations.jsonl"
    demos.write_text("".join(json.dumps({"pair_id": f"p{i}", "image": "x.png", "question": q, "answer": a})
                             + "\n" for i, (q, a) in enumerate(shown)))
    settings = GenerationSettings(questions_per_image=4, seed=1, demonstrations=str(demos),
                                  demonstrations_k=3)
    images = []
    for image_id in ("img-a", "img-b"):
        img = Image.new("RGB", (8, 8))
        img.info["id"] = image_id
        images.append((image_id, f"/data/{image_id}.png", img))
    engine = RecordingEngine()
    rows = self_play(engine, images, settings)
    url = "data:image/png;base64,iVBORw0KGgo="
    for image_id, _, _ in images:
        (hf_prompt,) = engine.question_prompts[image_id]  # one prompt per image, sampled under k seeds
        at = [hf_prompt.index(f"VUSER: {q}</s> ASSISTANT: {a}</s>") for q, a in shown]
        assert at == sorted(at) and hf_prompt.count("<image>") == 1
        for j in range(4):
            seed = settings.question_seed(image_id, j)
            row = make_row(image_id, f"/data/{image_id}.png", index=j, question_seed=seed,
                           image_data_url=url) | {"description": "A scan."}
            request = ask_request(row, settings)
            assert request["prompt"] == hf_prompt
            assert request["sampling_params"]["seed"] == seed
        # the question filter: the same reasons on both paths, a demonstration repeated is a duplicate
        mine = sorted((r for r in rows if r["image_id"] == image_id), key=lambda r: r["question_index"])
        group = {name: np.array([r[name] for r in mine]) for name in OUTPUT_COLUMNS}
        vllm_reasons = list(questions_of_image(group, settings)["reason"])
        hf_reasons = [r["reason"] if r["status"] == "question_filtered" else "" for r in mine]
        assert vllm_reasons == hf_reasons
    assert ("img-a", 3, "duplicate") in {(r["image_id"], r["question_index"], r["reason"]) for r in rows}


def _reply(request: httpx.Request) -> httpx.Response:
    body = json.loads(request.content)
    text = body["messages"][0]["content"][0]["text"]
    content = "7 3\nfirst is better" if "Left." in text else "5 5\nequal"
    return httpx.Response(200, json={
        "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 5, "total_tokens": 105}})


def test_kept_pair_judge_judges_ok_rows_and_passes_the_rest():
    url = "data:image/png;base64,iVBORw0KGgo="
    rows = [make_row("i", "/i.png", "question_filtered", "duplicate", 1, "Q?", 11),
            make_row("i", "/i.png", index=0, question="Which side?", question_seed=10,
                     answers=("Left.", "Right."), seeds=(1, 2), image_data_url=url, gate=("passed", 0, "d")),
            make_row("j", "/j.png", "image_error", "file not found"),
            make_row("j", "/j.png", index=2, question="What?", question_seed=12, answers=("A", "B"),
                     seeds=(3, 4), image_data_url=url, gate=("passed", 0, "d"))]  # gated upstream
    judge = KeptPairJudge(JudgeSettings(base_url="http://127.0.0.1:9/v1", model="m"),
                          http_client=httpx.AsyncClient(transport=httpx.MockTransport(_reply)))
    out = asyncio.run(judge(to_columns(rows)))
    assert "image_data_url" not in out
    assert set(out) == (set(OUTPUT_COLUMNS) - {"image_data_url"}) | set(VERDICT_COLUMNS)
    by_id = {out["pair_id"][i]: {k: out[k][i] for k in out} for i in range(len(out["pair_id"]))}
    assert len(by_id) == 4
    assert (by_id[rows[1]["pair_id"]]["score1"], by_id[rows[1]["pair_id"]]["score2"]) == (7.0, 3.0)
    assert (by_id[rows[3]["pair_id"]]["score1"], by_id[rows[3]["pair_id"]]["score2"]) == (5.0, 5.0)
    for passed in (rows[0], rows[2]):
        got = by_id[passed["pair_id"]]
        assert got["status"] == passed["status"] and got["score1"] is None and got["error"] is None


def test_vllm_path_pieces_build_requests_and_rows_like_the_hf_path():
    """The vLLM path's row-level functions (the path itself runs in tests/jobs/test_vllm.py)."""
    url = "data:image/png;base64,iVBORw0KGgo="
    row = make_row("i", "/i.png", index=0, question="Which side?", question_seed=5, image_data_url=url)
    request = vllm_request(row, prompts.answer_prompt("Which side?"), SETTINGS.answer_sampling, seed=42)
    assert request["prompt"].endswith("Which side? ASSISTANT:") and request["prompt"].count("<image>") == 1
    assert request["messages"][0]["content"][0] == {"type": "image_url", "image_url": {"url": url}}
    assert request["sampling_params"] == {"temperature": 1.2, "top_p": 0.95, "top_k": 100, "max_tokens": 8,
                                          "stop": ["</s>"], "seed": 42, "repetition_penalty": 1.0}
    questions = ["Is it the brain?", "Is it the  BRAIN?", "Where?"]
    rows = [make_row("i", "/i.png", index=j, question=q, question_seed=j, image_data_url=url)
            for j, q in reversed(list(enumerate(questions)))]  # groups arrive in any order
    group = {name: np.array([row[name] for row in rows]) for name in OUTPUT_COLUMNS}
    got = questions_of_image(group, SETTINGS)
    assert list(got["question_index"]) == [0, 1, 2]
    assert list(got["status"]) == ["ok", "question_filtered", "question_filtered"]
    assert list(got["reason"]) == ["", "duplicate", "too_short"]
    same = finish_pair({**row, "answer1": "Left.", "answer2": "left"})
    assert (same["status"], same["reason"]) == ("answer_filtered", "identical_answers")
    assert same["image_data_url"] == ""
    assert finish_pair({**row, "answer1": "Left.", "answer2": "Right."})["status"] == "ok"


MORE = GenerationSettings(questions_per_image=K, seed=7, batch_size=8, describe_max_tokens=8,
                          question_max_tokens=12, answer_max_tokens=8, answers_per_question=4,
                          closed_suffix_fraction=1.0)


def test_more_answers_per_question_come_as_sub_pairs_with_their_own_seeds(tmp_path: Path, monkeypatch):
    """answers_per_question=4: every kept question is two rows (slots 0 and 1) under the slot's seeds; slot
    0 is the two-answer run's row exactly; the kept yes/no questions carry the closed suffix. (The random
    tiny model asks no well-formed question, so the questions are given; the answers are its own.)"""
    asked = ["Is there a lesion?", "Where is the lesion?", "Is there a lesion?"]
    monkeypatch.setattr(generation, "ask_seeded", lambda engine, images, *a: [list(asked) for _ in images])
    paths = _write_images(tmp_path / "images", 2)
    engine = Generator({"preset": "tiny"}, SETTINGS).engine
    images = [(f"{i}.png", p, load_image(p)) for i, p in enumerate(paths)]
    two, four = self_play(engine, images, SETTINGS), self_play(engine, images, MORE)
    kept_two = [r for r in two if r["status"] != "question_filtered"]
    kept_four = [r for r in four if r["status"] != "question_filtered"]
    assert len(kept_two) == 4 and len(kept_four) == 8  # the third question is a duplicate
    assert len({r["pair_id"] for r in four}) == len(four)
    by_question = {}
    for r in kept_four:
        by_question.setdefault((r["image_id"], r["question_index"]), []).append(r)
    for (image_id, j), rows in by_question.items():
        assert sorted(r["pair_slot"] for r in rows) == [0, 1]
        for r in rows:
            assert (r["seed1"], r["seed2"]) == MORE.answer_seeds(image_id, j, r["pair_slot"])
        # identical answers are judged too (their scores rank against the other sub-pair's), unless every
        # answer of the question reads the same: then no pair can come of it, and no judge is asked
        alike = len({generation.normalize_text(a) for r in rows for a in (r["answer1"], r["answer2"])}) == 1
        for r in rows:
            expected = generation.answer_pair_reason(r["answer1"], r["answer2"], True)
            assert r["reason"] == (expected or ("identical_answers" if alike else ""))
    slot0 = {(r["image_id"], r["question_index"]): r for r in kept_four if r["pair_slot"] == 0}
    for r in kept_two:
        other = slot0[r["image_id"], r["question_index"]]
        assert other["pair_id"] == r["pair_id"]
        assert (other["seed1"], other["seed2"]) == (r["seed1"], r["seed2"])
        assert other["question"] == MORE.closed_suffixed(r["question"], r["image_id"], r["question_index"])
        if other["question"] != r["question"]:  # suffixed: the answers were sampled for that question
            assert generation.is_yes_no(r["question"]) and other["question"].endswith(prompts.CLOSED_SUFFIX)
        else:
            assert (other["answer1"], other["answer2"]) == (r["answer1"], r["answer2"])


def test_vllm_path_makes_the_same_sub_pairs_and_suffixes():
    from actors.vllm_generator import sub_pairs

    url = "data:image/png;base64,iVBORw0KGgo="
    questions = ["Is there a lesion?", "Where is the lesion?"]
    rows = [make_row("i", "/i.png", index=j, question=q, question_seed=j, image_data_url=url)
            for j, q in enumerate(questions)]
    group = {name: np.array([row[name] for row in rows]) for name in OUTPUT_COLUMNS}
    got = questions_of_image(group, MORE)
    assert list(got["question"]) == ["Is there a lesion?" + prompts.CLOSED_SUFFIX, "Where is the lesion?"]
    row = {name: got[name][0] for name in OUTPUT_COLUMNS}
    assert row["image_data_url"] == ""  # past the barrier rows carry the image's path, not its pixels
    slots = sub_pairs(row, MORE)
    assert [s["pair_slot"] for s in slots] == [0, 1]
    assert [(s["seed1"], s["seed2"]) for s in slots] == [MORE.answer_seeds("i", 0, k) for k in (0, 1)]
    assert slots[0]["pair_id"] == row["pair_id"] != slots[1]["pair_id"]
    same = {**slots[1], "answer1": "Yes", "answer2": "yes.", "image_data_url": url}
    assert finish_pair(same, identical_ok=True)["status"] == "ok"
    assert finish_pair(same)["reason"] == "identical_answers"


def test_a_question_whose_answers_all_read_the_same_goes_to_no_judge(tmp_path: Path, monkeypatch):
    asked = ["Is there a lesion?", "Where is the lesion?"]
    replies = {asked[0] + prompts.CLOSED_SUFFIX: [("Yes.", "yes"), ("YES", "yes")],
               asked[1]: [("Left.", "left"), ("left", "Right.")]}
    monkeypatch.setattr(generation, "ask_seeded", lambda engine, images, *a: [list(asked) for _ in images])
    monkeypatch.setattr(generation, "answer_twice_seeded", lambda engine, images, questions, *a: [
        replies[q][slot] for q, slot in zip(questions, [0, 1] * len(questions))])
    paths = _write_images(tmp_path / "images", 1)
    engine = Generator({"preset": "tiny"}, SETTINGS).engine
    rows = self_play(engine, [("a.png", paths[0], load_image(paths[0]))], MORE)
    got = {(r["question_index"], r["pair_slot"]): (r["status"], r["reason"]) for r in rows}
    alike = ("answer_filtered", "identical_answers")
    # question 1: one sub-pair alike, the other not: both judged
    assert got == {(0, 0): alike, (0, 1): alike, (1, 0): ("ok", ""), (1, 1): ("ok", "")}
