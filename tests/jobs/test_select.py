"""jobs.select end to end on Ray Train (2 CPU workers, loopback): a tiny "policy", judged rows of a fake generate
run, clinician labels; asserts on the head, the cached features, selected.parquet and the summary."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pytest
from safetensors import safe_open

from jobs.select import SELECTED_FILE, SelectConfig, main
from stmed.config import build_config, read_yaml
from stmed.data.records import read_preferences, write_preferences
from stmed.data.synthetic import make_dataset
from stmed.judge.judging import JudgeSettings, JudgeVerdict
from stmed.model.build import build_tiny
from stmed.runs import MetricsLog, content_digest
from stmed.selection.head import load_head
from stmed.selection.train import FEATURES_FILE, HEAD_FILE, load_features
from stmed.selfplay.preferences import assemble, make_row, write_part

REPO = Path(__file__).resolve().parents[2]
LOCAL = REPO / "jobs" / "configs" / "local" / "select.yaml"
GOOD = ["Yes, there is a lesion in the left lung.", "A round lesion is seen on the left.", "Yes."]
BAD = ["No, the image is normal.", "The liver.", "I cannot tell."]


def _rows(images: list[Path]) -> list[dict]:
    """Two questions per image, two sub-pairs each: a good answer (score 8-9) against a bad one (1-3)."""
    rows = []
    for n, image in enumerate(images):
        for q in range(2):
            for slot in range(2):
                row = make_row(image.name, str(image), index=q, question=f"Is there a lesion? ({q})",
                               question_seed=q, answers=(GOOD[(n + slot) % 3], BAD[(n + q + slot) % 3]),
                               seeds=(slot, slot + 10), slot=slot)  # fmt: skip
                verdict = JudgeVerdict(row["pair_id"], 8.0 + slot, 1.0 + 2 * slot, judge_model="reference")
                rows.append({**row, **verdict.to_row()})
    return rows


@pytest.fixture(scope="module")
def select_run(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("select")
    data = make_dataset(root / "data", num_images=12, seed=0)
    images = sorted(data.images.glob("*.png"))
    policy, processor = build_tiny(seed=0)
    policy.save_pretrained(root / "policy")
    processor.save_pretrained(root / "policy")
    gen = root / "generate"
    (gen / "parts").mkdir(parents=True)
    rows = _rows(images)
    write_part(gen / "parts", "part-00000", pa.Table.from_pylist(rows))
    pairs, _ = assemble(rows, JudgeSettings())
    write_preferences(gen / "preferences.parquet", pairs)
    labels = [{"pair_id": p.pair_id, "preferred": "rejected" if i % 3 == 0 else "chosen", "image": p.image,
               "question": p.question, "chosen": p.chosen, "rejected": p.rejected} for i, p in enumerate(pairs)]
    (root / "labels.jsonl").write_text("".join(json.dumps(row) + "\n" for row in labels))
    before = content_digest(root / "policy")
    cfg = build_config(SelectConfig, read_yaml(LOCAL), [
        f"output_dir={root / 'out'}", f"model.name_or_path={root / 'policy'}", f"generate_dir={gen}",
        f"clinician_labels={root / 'labels.jsonl'}", "selection.holdout_fraction=0.3", "selection.clinician_weight=1", "train.steps=30",
        "train.batch_size=64", "train.lr=3e-3", "train.log_every=10", "train.checkpoint_every=20", "train.max_length=256",
    ])  # fmt: skip
    return root, pairs, before, main(cfg)


def test_the_stage_writes_its_head_features_and_selection(select_run):
    root, pairs, before, summary = select_run
    out = root / "out"
    assert content_digest(root / "policy") == before  # the policy is read, never written
    head = load_head(out / HEAD_FILE)
    assert head.shape["layers"] == 3 and not any(p.suffix in (".pt", ".pkl") for p in out.glob("*"))
    with safe_open(str(out / FEATURES_FILE), framework="pt") as fh:
        key = fh.metadata()["key"]
    features, skipped = load_features(out / FEATURES_FILE, key)
    assert len(features) == summary["answers_rated"] == summary["answers"] and not skipped
    rows = MetricsLog(out / "metrics.jsonl").read_steps()
    assert [r["step"] for r in rows] == list(range(1, 31)) and all(math.isfinite(r["loss"]) for r in rows)
    selected = read_preferences(out / SELECTED_FILE)
    assert len(selected) == math.ceil(0.5 * len(pairs)) == summary["selection"]["kept"]
    assert {p.pair_id for p in selected} <= {p.pair_id for p in pairs}


def test_the_summary_sets_the_selector_beside_the_judge(select_run):
    _, _, _, summary = select_run
    figures = summary["figures"]
    for source in ("judge", "clinician"):
        assert summary["pairs"][source]["train"] > 0 and summary["pairs"][source]["held_out"] > 0
        held = figures[source]["held_out"]
        assert held["n"] == summary["pairs"][source]["held_out"] and 0.0 <= held["agreement"] <= 1.0
        assert 0.0 <= held["auc"] <= 1.0
    assert figures["judge"]["train"]["agreement"] > 0.8  # a planted, learnable ranking
    judge = figures["judge_vs_clinician"]
    assert judge["all"]["n"] == summary["pairs"]["clinician"]["train"] + summary["pairs"]["clinician"]["held_out"]
    assert judge["all"]["agreement"] == pytest.approx(2 / 3, abs=0.1)
    assert summary["selection"]["why"] and summary["selection"]["keep_fraction"] == 0.5
