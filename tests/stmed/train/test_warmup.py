"""The tiny preset's general-alignment warm-up: appearance questions only, true answers, a trainable config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stmed.config import build_config
from stmed.data.images import load_image, pixel_digest
from stmed.data.synthetic import load_findings, make_dataset
from stmed.judge.grading import _question_topics, score_answer
from stmed.model.prompts import CLOSED_SUFFIX, DESCRIBE_QUESTION, IMAGE_TOKEN
from stmed.train.session import LocalSession
from stmed.train.sft import SFTLoopConfig, train_sft
from stmed.train.warmup import WARMUP_TOPICS, make_warmup_data, warmup_train_config


@pytest.fixture(scope="module")
def warmup(tmp_path_factory) -> Path:
    return make_warmup_data(tmp_path_factory.mktemp("warmup") / "data", num_images=24)


def test_conversations_ask_about_appearance_only_and_answer_truly(warmup: Path) -> None:
    rows = json.loads(warmup.read_text())
    findings = load_findings(warmup.parent / "findings.json")
    assert len(rows) == 24
    first_is_description = 0
    for row in rows:
        turns = row["conversations"]
        humans, answers = [t["value"] for t in turns[::2]], [t["value"] for t in turns[1::2]]
        assert [t["from"] for t in turns] == ["human", "gpt"] * 5
        assert humans[0].startswith(f"{IMAGE_TOKEN}\n") and all(IMAGE_TOKEN not in h for h in humans[1:])
        questions = [h.removeprefix(f"{IMAGE_TOKEN}\n") for h in humans]
        first_is_description += questions[0] == DESCRIBE_QUESTION
        assert questions.count(DESCRIBE_QUESTION) == 1
        closed = [q for q in questions if q.endswith(CLOSED_SUFFIX)]
        assert len(closed) == len(WARMUP_TOPICS)  # one yes/no and one open question per topic
        for question, answer in zip(questions, answers):
            if question == DESCRIBE_QUESTION:
                continue
            assert set(_question_topics(question.removesuffix(CLOSED_SUFFIX).lower())) <= set(WARMUP_TOPICS)
            assert answer in ("yes", "no") if question in closed else len(answer.split()) > 2
            assert score_answer(question, answer, findings[row["image"]]) >= 8, (question, answer)
    assert 0 < first_is_description < len(rows)  # the description opens some conversations, ends the rest


def test_warmup_images_are_not_benchmark_images(warmup: Path, tmp_path: Path) -> None:
    bench = make_dataset(tmp_path / "bench", num_images=40, seed=0)
    digests = {entry["pixel_digest"] for entry in json.loads(bench.findings.read_text()).values()}
    warm = {pixel_digest(load_image(p)) for p in (warmup.parent / "images").glob("*.png")}
    assert warm and not warm & digests


def test_config_is_valid_and_trains_to_a_merged_base(warmup: Path, tmp_path: Path) -> None:
    config = warmup_train_config(warmup, tmp_path / "align", steps=2)
    cfg = build_config(SFTLoopConfig, config)
    assert cfg.train.sq_ratio == 0.0 and cfg.lora.train_embeddings and cfg.train.max_steps == 2
    train_sft(config, LocalSession(tmp_path / "align" / "checkpoints"))
    rows = [json.loads(line) for line in (tmp_path / "align" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["n_vq_tokens"] == 0 for r in rows)  # no questions
    assert (tmp_path / "align" / "merged" / "config.json").is_file()
