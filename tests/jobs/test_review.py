"""jobs.review end to end on loopback: a simulated clinician reviews a round through the HTTP API, the labels
and the judge's calibration are exported, the report shows κ with its interval; the command line prints a
token once and refuses a beyond-loopback bind without TLS."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.review import ReviewConfig, main, open_store, simulated_round
from stmed.config import ConfigError, build_config
from stmed.eval.calibration import cohen_kappa, markdown
from stmed.eval.report import review_section
from stmed.review.queue import QueueConfig
from stmed.review.store import digest
from tests.stmed.review.fixtures import generate_run


def test_a_simulated_clinician_calibrates_the_judge(tmp_path: Path):
    preferences = generate_run(tmp_path, images=10)
    cfg = ReviewConfig(output_dir=str(tmp_path / "review"), kappa_threshold=0.5,
                       queue=QueueConfig(preferences=str(preferences), items=16, reviewers_per_item=2))
    summary = simulated_round(cfg, tmp_path / "data" / "findings.json")
    assert summary["labels"] == 32 and summary["items"] == 16
    assert [c["decided"] for c in summary["simulated_clinicians"]] == [16, 16]
    assert all(c["unknown_image"] == 0 for c in summary["simulated_clinicians"])
    cal = json.loads((tmp_path / "review" / "calibration.json").read_text())
    judge = cal["judge_vs_clinicians"]
    # The fixture's judge prefers the wrong answer on one closed pair in five: the clinicians disagree there.
    assert 0.5 < judge["agreement"] < 1.0 and judge["kappa"] is not None
    low, high = judge["kappa_ci"]
    assert low <= judge["kappa"] <= high
    assert set(judge["per_kind"]) == {"closed", "open"}
    assert cal["inter_reviewer"]["n"] == 16 and cal["inter_reviewer"]["kappa"] == pytest.approx(1.0)
    assert cal["verdict"].startswith("judge ")
    section = review_section(tmp_path).markdown if (tmp_path / "review").exists() else ""
    assert "Cohen's κ" in section and cal["verdict"] in section
    assert markdown(cal) == section
    demos = (tmp_path / "review" / "demonstrations.jsonl").read_text().splitlines()
    assert demos and all(json.loads(line)["answer"] for line in demos)


def test_kappa_matches_a_worked_example():
    # 50 items: both yes 20, both no 15, a-yes b-no 5, a-no b-yes 10 → po 0.70, pe 0.50, κ 0.40
    a = ["y"] * 20 + ["n"] * 15 + ["y"] * 5 + ["n"] * 10
    b = ["y"] * 20 + ["n"] * 15 + ["n"] * 5 + ["y"] * 10
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    assert cohen_kappa(["A"] * 4, ["A"] * 4) is None


def test_the_command_line(tmp_path: Path, capsys):
    main(["add-reviewer", "dr-lee", f"output_dir={tmp_path}"])
    token = capsys.readouterr().out.strip().splitlines()[-1]
    store = open_store(ReviewConfig(output_dir=str(tmp_path)))
    assert store.sign_in(token, 60) is not None
    files = b"".join(path.read_bytes() for path in tmp_path.glob("review.db*"))  # the WAL too
    assert token.encode() not in files and digest(token).encode() in files
    with pytest.raises(SystemExit):
        main(["add-reviewer", "dr-lee", f"output_dir={tmp_path}"])  # the name exists
    with pytest.raises(ConfigError, match="beyond loopback"):
        build_config(ReviewConfig, {"output_dir": str(tmp_path), "http": {"host": "0.0.0.0"}})
    build_config(ReviewConfig, {"output_dir": str(tmp_path),
                                "http": {"host": "0.0.0.0", "allow_plain_http_beyond_loopback": True}})


def test_the_pipeline_review_stage(tmp_path: Path):
    from jobs.pipeline import PipelineConfig, ReviewStage, review_round
    from stmed.config import ModelConfig
    from stmed.eval.report import write_report

    generated = generate_run(tmp_path, images=6)  # tmp_path/data and tmp_path/generate/preferences.parquet
    generated.parent.rename(tmp_path / "generate1")
    cfg = PipelineConfig(output_dir=str(tmp_path), model=ModelConfig(preset="tiny"),
                         review=ReviewStage(enabled=True, items=8))
    review_round(cfg, tmp_path, fresh=False)
    assert json.loads((tmp_path / "review" / "summary.json").read_text())["labels"] == 8
    assert "## Judge calibration against clinicians" in write_report(tmp_path).read_text()


def test_the_review_app_under_ray_serve(ray_session, tmp_path: Path):
    """jobs.review:app_builder (what rayservice-review.yaml deploys) under Ray Serve on 127.0.0.1: a simulated
    clinician signs in, reads the queue, fetches an image and decides two items through Serve's proxy."""
    import httpx
    import yaml
    from ray import serve

    from jobs.review import app_builder
    from stmed.judge.reference import load_digest_index
    from stmed.review.simulated import SimulatedClinician
    from tests.jobs.test_serve import free_port

    preferences = generate_run(tmp_path, images=4)
    config = tmp_path / "review.yaml"
    config.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "review"),
                                      "queue": {"preferences": str(preferences), "items": 6}}))
    app = app_builder({"config": str(config), "overrides": ["web.login_attempts=3"]})  # queues the pairs
    store = open_store(ReviewConfig(output_dir=str(tmp_path / "review")))
    assert store.counts()["items"] == 6
    token = store.add_reviewer("dr-serve")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(app, name="review", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url) as client:  # not signed in: no queue
            assert client.get("/api/next").status_code == 401
            assert client.get("/healthz").headers["cache-control"] == "no-store"
        counts = SimulatedClinician(url, token, load_digest_index(tmp_path / "data" / "findings.json")).review(2)
    finally:
        serve.shutdown()
    assert counts["decided"] == 2 and counts["unknown_image"] == 0
    assert [row["reviewer"] for row in store.labels()] == ["dr-serve", "dr-serve"]
