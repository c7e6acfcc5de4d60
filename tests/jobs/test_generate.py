"""jobs.generate end to end on a loopback Ray: a tiny model that can ask, the reference judge over real
HTTP with the real openai client (faults injected), and a run killed midway then resumed."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from jobs import generate
from stmed.config import build_config
from stmed.data.images import load_image
from stmed.data.records import read_preferences
from stmed.data.synthetic import load_findings, make_dataset
from stmed.judge.grading import score_answer
from stmed.judge.reference import Faults, start_server
from stmed.model import prompts
from stmed.model.build import build_tiny, image_seq_len, pixel_values
from stmed.model.conversation import collate, encode, render, to_turns
from stmed.model.prompts import SYSTEM_SQ
from stmed.selfplay import generation

K = 3
NUM_IMAGES = 6


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("synthetic"), num_images=24, seed=0)


@pytest.fixture(scope="module")
def talking_model(data, tmp_path_factory) -> Path:
    """The tiny LLaVA after ~100 steps on the synthetic conversations (questions as questioner turns):
    enough to ask real questions, so pairs reach the judge. A random model almost never writes '?'."""
    model, processor = build_tiny(seed=0)
    tokenizer, seq_len, rng = processor.tokenizer, image_seq_len(processor), random.Random(0)
    samples = [(encode(render(to_turns(s["conversations"], 1.0, rng), SYSTEM_SQ), tokenizer, seq_len, 384),
                load_image(data.images / s["image"]))
               for s in json.loads(data.instruct.read_text())]
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ~0.2 s a step; two threads on a shared 2-core box mostly spin
    try:
        for _ in range(100):
            batch = rng.sample(samples, 8)
            inputs = collate([enc for enc, _ in batch], tokenizer.pad_token_id)
            pixels = pixel_values(processor, [img for _, img in batch])
            loss = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                         labels=inputs["labels"], pixel_values=pixels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        torch.set_num_threads(threads)
    assert loss.item() < 1.5
    out = tmp_path_factory.mktemp("talking")
    model.eval().save_pretrained(out)
    processor.save_pretrained(out)
    return out


def config(out: Path, data, model: Path, **overrides) -> generate.GenerateConfig:
    return build_config(generate.GenerateConfig, {}, override_list(out, data, model, **overrides))


def override_list(out: Path, data, model: Path, **overrides) -> list[str]:
    values = {
        "output_dir": str(out), "images": str(data.unlabelled), "num_images": NUM_IMAGES,
        "model.name_or_path": str(model),
        "generation.questions_per_image": K, "generation.describe_max_tokens": 24,
        "generation.question_max_tokens": 24, "generation.answer_max_tokens": 24,
        "judge.model": "stmed-reference-judge", "judge.backoff_base_s": 0.05, "judge.backoff_max_s": 0.5,
        "judge.max_attempts": 6, "judge.parse_retries": 2, "judge.timeout_s": 20,
        "pools.images_per_batch": 2, "pools.judge_max": 2, "pools.pairs_per_judge_batch": 4,
        "ray.num_cpus": 2, **overrides,
    }
    return [f"{k}={v}" for k, v in values.items()]


def generated_rows(out: Path) -> list[dict]:
    parts = sorted((out / "parts").glob("*.parquet"))
    return [row for path in parts for row in pq.read_table(path).to_pylist()]


def test_generate_end_to_end_with_a_faulty_judge(ray_session, data, talking_model, tmp_path):
    faults = Faults(rate_limit_first=2, retry_after_s=0.2, error_rate=0.2, garbled_rate=0.2, latency_ms=20)
    server = start_server(data.findings, faults=faults)
    try:
        cfg = config(tmp_path / "run", data, talking_model, **{"judge.base_url": server.url})
        result = generate.main(cfg)
        stats = server.stats
    finally:
        server.stop()
    out, summary = result.output_dir, result.summary
    rows = generated_rows(out)
    ids = [row["pair_id"] for row in rows]
    assert len(ids) == len(set(ids)) == NUM_IMAGES * K  # one row per sampled question, none twice
    judged = [row for row in rows if row["status"] == "ok"]
    assert judged, "the talking model should produce pairs for the judge"

    # every injected fault happened, was retried, and no pair was lost or judged twice into the output
    assert stats.outcomes["rate_limited"] == 2 and stats.outcomes["server_error"] >= 1
    assert stats.outcomes["garbled"] >= 1 and stats.total == summary["judge"]["requests"] > len(judged)
    pairs = read_preferences(out / "preferences.parquet")
    assert pairs, "the reference judge should prefer one answer of some pairs"
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert sorted([p.pair_id for p in pairs] + [f["pair_id"] for f in failures]) == sorted(ids)

    # scores are the reference judge's, chosen beats rejected, seeds follow the choice
    findings = load_findings(data.findings)
    by_id = {row["pair_id"]: row for row in rows}
    for pair in pairs:
        row = by_id[pair.pair_id]
        truth = findings[Path(pair.image).name]
        assert pair.chosen_score == score_answer(pair.question, pair.chosen, truth) > pair.rejected_score
        assert pair.rejected_score == score_answer(pair.question, pair.rejected, truth)
        chosen_slot = 1 if pair.chosen == row["answer1"] else 2
        seeds = [row["seed1"], row["seed2"]]
        assert pair.seeds == (seeds if chosen_slot == 1 else seeds[::-1])
        assert pair.judge_model == "stmed-reference-judge"
    dpo = json.loads((out / "dpo.json").read_text())
    assert [d["id"] for d in dpo] == [p.pair_id for p in pairs]
    assert dpo[0]["chosen_conversations"][0]["value"] == f"<image>\n{pairs[0].question}"
    assert dpo[0]["chosen_conversations"][1]["value"] == pairs[0].chosen
    assert dpo[0]["reject_conversations"][1]["value"] == pairs[0].rejected
    assert not Path(dpo[0]["image"]).is_absolute()  # relative to the image root, as the reference expects

    stages = Counter(f["stage"] for f in failures)
    assert summary["images"] == NUM_IMAGES and summary["questions"] == NUM_IMAGES * K
    assert summary["pairs"] == len(pairs) and summary["answer_pairs_judged"] == len(judged)
    assert summary["ties"] == sum(f["reason"] == "tie" for f in failures)
    assert summary["questions"] - summary["questions_kept"] == stages["question_filtered"]
    assert sum(summary["failures"].values()) == len(failures)
    assert summary["judge"]["cost_usd"] > 0 and summary["judge"]["prompt_tokens"] > 0
    assert (out / "config.yaml").is_file()


def kill_after_the_first_part(cfg: generate.GenerateConfig, monkeypatch) -> None:
    """Run the job until its first part is written, then die as a kill would (no summary)."""
    real_write = generate.write_part

    def write_then_die(parts, name, table):
        real_write(parts, name, table)
        raise KeyboardInterrupt("killed after the first part")

    monkeypatch.setattr(generate, "write_part", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        generate.main(cfg)
    monkeypatch.setattr(generate, "write_part", real_write)


def test_killed_run_resumes_without_resending_finished_requests(ray_session, data, talking_model, tmp_path,
                                                                 monkeypatch):
    out = tmp_path / "run"
    cfg = config(out, data, talking_model, **{"judge.reference_findings": str(data.findings)})
    kill_after_the_first_part(cfg, monkeypatch)
    first = generated_rows(out)
    assert 0 < len(first) < NUM_IMAGES * K and not (out / "summary.json").exists()

    summary = generate.main(cfg).summary
    written = generated_rows(out)
    rows = {row["pair_id"]: row for row in written}
    assert len(written) == len(rows) == NUM_IMAGES * K  # nothing written twice
    assert summary["resumed_rows"] == len(first)
    finished_before = {row["pair_id"] for row in first}
    redone = [row for pid, row in rows.items() if pid not in finished_before and row["status"] == "ok"]
    assert redone
    # the second run asks the judge only about pairs not written before the kill, each once; a pair
    # whose reply arrived (and was cached) before the kill costs no request at all
    sent = summary["reference_judge"]["requests"]
    assert sent == sum(not row["cached"] for row in redone) and summary["reference_judge"]["resent"] == 0
    assert summary["questions"] == NUM_IMAGES * K

    again = generate.main(cfg).summary  # a finished run: nothing to generate, nothing to send
    assert again["reference_judge"]["requests"] == 0 and again["pairs"] == summary["pairs"]


def test_four_answers_a_question_resume_and_pair_the_best_against_the_worst(ray_session, data, talking_model,
                                                                            tmp_path, monkeypatch):
    """answers_per_question=4 through Ray Data and the offline judge: two judged sub-pairs per kept
    question, written once across a kill and a resume, and one pair per question whose chosen answer has
    the question's best reference score and whose rejected one its worst; yes/no questions are asked with
    the closed suffix."""
    out = tmp_path / "run"
    cfg = config(out, data, talking_model, **{"judge.reference_findings": str(data.findings),
                                               "generation.answers_per_question": 4,
                                               "generation.closed_suffix_fraction": 1.0})
    kill_after_the_first_part(cfg, monkeypatch)
    summary = generate.main(cfg).summary
    rows = generated_rows(out)
    assert len({row["pair_id"] for row in rows}) == len(rows)  # nothing written twice
    questions: dict[tuple, list[dict]] = {}
    for row in rows:
        questions.setdefault((row["image_id"], row["question_index"]), []).append(row)
    assert len(questions) == summary["questions"] == NUM_IMAGES * K
    kept = {key: group for key, group in questions.items() if group[0]["status"] != "question_filtered"}
    assert kept and all(sorted(r["pair_slot"] for r in group) == [0, 1] for group in kept.values())
    for group in kept.values():
        question = group[0]["question"]
        assert question.endswith(prompts.CLOSED_SUFFIX) == generation.is_yes_no(question)
    findings = load_findings(data.findings)
    pairs = read_preferences(out / "preferences.parquet")
    assert pairs and summary["pairs"] == len(pairs) and summary["answer_pairs_judged"] > len(pairs)
    by_id = {group[0]["pair_id"]: group for group in kept.values() if group[0]["pair_slot"] == 0}
    for pair in pairs:
        truth = findings[Path(pair.image).name]
        answers = [r[f"answer{i}"] for r in by_id[pair.pair_id] if r["status"] == "ok" for i in (1, 2)]
        scores = [score_answer(pair.question, a, truth) for a in answers]
        assert pair.chosen_score == max(scores) == score_answer(pair.question, pair.chosen, truth)
        chosen = generation.normalize_text(pair.chosen)
        assert pair.rejected_score == min(s for a, s in zip(answers, scores)
                                          if generation.normalize_text(a) != chosen)


def test_hf_generators_get_a_gpu_on_the_gpu_cluster_config():
    """Finding 9: jobs/configs/generate.yaml with generation.engine=hf ran its generator actors on CPU."""
    from stmed.config import ConfigError, read_yaml

    configs = Path(__file__).resolve().parents[2] / "jobs" / "configs"
    cluster = build_config(generate.GenerateConfig, read_yaml(configs / "generate.yaml"), ["generation.engine=hf"])
    assert cluster.generator_gpus == 1.0
    local = build_config(generate.GenerateConfig, read_yaml(configs / "local" / "generate.yaml"))
    assert local.generator_gpus == 0.0
    pinned = build_config(generate.GenerateConfig, read_yaml(configs / "generate.yaml"), ["pools.generator_gpus=0.5"])
    assert pinned.generator_gpus == 0.5
    with pytest.raises(ConfigError, match="generation.device=cuda.*ray.use_gpu=true"):
        build_config(generate.GenerateConfig, read_yaml(configs / "local" / "generate.yaml"),
                     ["generation.device=cuda"])


def test_a_judge_that_is_down_fails_the_job_instead_of_zero_pairs(ray_session, data, talking_model, tmp_path):
    """Hardening finding 7: with every judgement failed, generate used to exit 0 with 0 pairs."""
    import socket

    from jobs.runtime import NothingProduced

    with socket.socket() as sock:  # a loopback port nothing listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    cfg = config(tmp_path / "run", data, talking_model, **{"judge.base_url": dead, "judge.max_attempts": 1,
                                                           "num_images": 2})
    with pytest.raises(NothingProduced, match=r"no preference pairs from 2 images.*failures"):
        generate.main(cfg)
    assert not (tmp_path / "run" / "summary.json").exists()  # a pipeline rerun runs the stage again
    assert (tmp_path / "run" / "failures.jsonl").read_text().count("\n") > 0


def test_an_empty_manifest_is_an_input_error(tmp_path):
    from stmed.data.records import DataError

    manifest = tmp_path / "images.json"
    manifest.write_text("[]")
    cfg = build_config(generate.GenerateConfig, {}, [f"output_dir={tmp_path / 'out'}", f"images={manifest}",
                                                     "model.preset=tiny"])
    with pytest.raises(DataError, match="lists no images"):
        generate.main(cfg)


def test_resuming_under_other_generation_settings_is_refused(data, tmp_path):
    import pyarrow as pa

    from stmed.config import ConfigError
    from stmed.selfplay.preferences import make_row, write_part

    out, model = tmp_path / "run", tmp_path / "model"
    (out / "parts").mkdir(parents=True)
    generate.check_resume_settings(config(out, data, model), out)  # nothing written: may start
    write_part(out / "parts", "part-a-000000", pa.Table.from_pylist([make_row("a.png", "/a.png", index=0)]))
    generate.check_resume_settings(config(out, data, model, **{"generation.batch_size": 3}), out)
    changed = config(out, data, model, **{"generation.answers_per_question": 4,
                                          "generation.closed_suffix_fraction": 0.5})
    with pytest.raises(ConfigError, match=r"generation.answers_per_question was 2, now 4, generation."
                                          r"closed_suffix_fraction was 0.0, now 0.5; use a new output_dir"):
        generate.check_resume_settings(changed, out)


def test_resuming_with_a_changed_demonstrations_file_is_refused_naming_the_key(data, tmp_path):
    """generation.demonstrations: its path, k and content digest are in the fingerprint; without a file
    none of its keys is, so a folder written before they existed still resumes."""
    import pyarrow as pa

    from stmed.config import ConfigError
    from stmed.runs import FINGERPRINT_FILE
    from stmed.selfplay.preferences import make_row, write_part

    out, model = tmp_path / "run", tmp_path / "model"
    demos = tmp_path / "demonstrations.jsonl"
    demos.write_text(json.dumps({"question": "Is there a lesion?", "answer": "Yes."}) + "\n")
    (out / "parts").mkdir(parents=True)
    plain = generate.fingerprint(config(out, data, model))
    assert not any(key.startswith("generation.demonstrations") for key in plain)
    with_demos = config(out, data, model, **{"generation.demonstrations": str(demos)})
    generate.check_resume_settings(with_demos, out)
    written = json.loads((out / FINGERPRINT_FILE).read_text())
    assert written["generation.demonstrations"] == str(demos) and written["generation.demonstrations_k"] == 3
    write_part(out / "parts", "part-a-000000", pa.Table.from_pylist([make_row("a.png", "/a.png", index=0)]))
    generate.check_resume_settings(with_demos, out)  # the same file: resumes
    demos.write_text(json.dumps({"question": "Which organ is shown?", "answer": "The liver."}) + "\n")
    with pytest.raises(ConfigError, match=r"generation.demonstrations.content was '\w+', now '\w+'; use a new"):
        generate.check_resume_settings(with_demos, out)
    with pytest.raises(ConfigError, match=r"generation.demonstrations was '.*demonstrations.jsonl', now None"):
        generate.check_resume_settings(config(out, data, model), out)


def test_resuming_with_another_model_judge_or_manifest_is_refused_naming_the_keys(data, tmp_path):
    """What mixed two models' rows in one folder: only ``generation.*`` was compared, rows had no model id."""
    import pyarrow as pa

    from stmed.config import ConfigError
    from stmed.runs import FINGERPRINT_FILE
    from stmed.selfplay.preferences import make_row, write_part

    out, model = tmp_path / "run", tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights of model A")
    (out / "parts").mkdir(parents=True)
    generate.check_resume_settings(config(out, data, model), out)
    assert json.loads((out / FINGERPRINT_FILE).read_text())["model.name_or_path"] == str(model)
    write_part(out / "parts", "part-a-000000", pa.Table.from_pylist([make_row("a.png", "/a.png", index=0)]))
    generate.check_resume_settings(config(out, data, model, **{"judge.rpm": 60}), out)  # pacing only: fine
    other = tmp_path / "other"
    other.mkdir()
    cases = [
        ({"model.name_or_path": str(other)}, rf"model.name_or_path was '{model}', now '{other}'"),
        ({"judge.model": "gpt-4o-mini"}, r"judge.model was 'stmed-reference-judge', now 'gpt-4o-mini'"),
        ({"images": str(data.instruct)}, r"images was '.*unlabelled.json', now '.*instruct.json'"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message + ".*; use a new output_dir"):
            generate.check_resume_settings(config(out, data, model, **overrides), out)
    (model / "model.safetensors").write_bytes(b"weights of model B")  # the same path, other weights
    with pytest.raises(ConfigError, match=r"model.content was '\w+', now '\w+'"):
        generate.check_resume_settings(config(out, data, model), out)
    (out / FINGERPRINT_FILE).unlink()  # rows of an older stmed: what made them is unknown
    with pytest.raises(ConfigError, match=r"holds rows without a fingerprint.json"):
        generate.check_resume_settings(config(out, data, model), out)

def test_a_budget_stop_resumes_paying_nothing_twice_and_batch_mode_gives_the_same_pairs_at_half_price(
        ray_session, data, talking_model, tmp_path, capsys, monkeypatch):
    """judge.budget_usd: the job ends with one line and exit 1, the judged rows kept in parts/; a rerun with
    a higher budget judges the rest, and the judge never receives a request twice. Then judge.mode=batch on
    the same seeds: one Batch API job, the same preference rows, half the price in the ledger."""
    from jobs import runtime
    from jobs.runtime import run_job
    from stmed.judge.ledger import read_ledger

    # run_job marks the process as a stage's job (its clock then starts at the process's start); the
    # tests after this one call main() directly and must see a test process again.
    monkeypatch.setattr(runtime, "_in_job", False)

    server = start_server(data.findings)
    out = tmp_path / "run"
    try:
        # a reference-judge request costs ~$0.0012 and is reserved at ~$0.0078 (765 image tokens, 512
        # completion tokens): a few are paid, then the next would pass the budget
        argv = override_list(out, data, talking_model, **{"judge.base_url": server.url, "judge.budget_usd": 0.012})
        with pytest.raises(SystemExit) as stopped:
            run_job(generate.main, generate.GenerateConfig, argv)
        first_sent = server.stats.total
        lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("failed:")]
        assert stopped.value.code == 1 and len(lines) == 1
        assert lines[0].startswith("failed: judge budget reached: $0.0") and "rerun with a higher" in lines[0]
        assert not (out / "summary.json").exists()
        paid = read_ledger(out / "ledger.jsonl")
        assert 0 < len(paid) == first_sent and sum(r["usd"] for r in paid) <= 0.012
        judged = [r for r in generated_rows(out) if r["status"] == "ok" and r["error"] is None]
        assert judged  # what was judged is written

        summary = generate.main(config(out, data, talking_model, **{"judge.base_url": server.url,
                                                                    "judge.budget_usd": 1.0})).summary
        stats = server.stats
        server.reset_stats()
        server.batch_delay_s = 0.5
        batch_out = tmp_path / "batch"
        batch = generate.main(config(batch_out, data, talking_model, **{
            "judge.base_url": server.url, "judge.mode": "batch", "judge.batch_poll_s": 0.1})).summary
        batch_stats = server.stats
    finally:
        server.stop()
    assert batch_stats.endpoints["POST /v1/batches"] == 1 and batch_stats.resent == 0
    assert batch_stats.total == summary["judge"]["pairs"]  # every pair once, inside the batch
    online_pairs, batch_pairs = (read_preferences(o / "preferences.parquet") for o in (out, batch_out))
    assert batch_pairs == online_pairs and batch["pairs"] == summary["pairs"] > 0
    assert not (batch_out / "batch.json").exists()
    assert {r["mode"] for r in read_ledger(batch_out / "ledger.jsonl")} == {"batch"}
    assert batch["spend"]["batch_usd"] == pytest.approx(summary["spend"]["online_usd"] / 2, rel=1e-4)
    assert stats.resent == 0 and stats.total > first_sent  # nothing paid twice, the rest paid once
    ledger = read_ledger(out / "ledger.jsonl")
    paid = [r for r in ledger if not r["cached"]]
    assert len(paid) == stats.total and all(r["usd"] > 0 for r in paid)
    spend = summary["spend"]
    assert spend["usd"] == pytest.approx(sum(r["usd"] for r in ledger)) and spend["budget_usd"] == 1.0
    assert spend["usd_per_kept_pair"] == pytest.approx(spend["usd"] / summary["pairs"], rel=1e-4)
    assert spend["usd_per_judged_pair"] == pytest.approx(spend["usd"] / summary["judge"]["judged"], rel=1e-4)
