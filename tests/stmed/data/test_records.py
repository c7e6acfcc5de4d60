"""stmed.data.records: records, instruct and benchmark readers, answer files, preference parquet, DPO export,
image manifests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stmed.data.records import (
    DataError,
    InstructSample,
    Prediction,
    PreferencePair,
    Skip,
    VQAExample,
    export_dpo_json,
    list_images,
    read_benchmark,
    read_instruct,
    read_predictions,
    read_preferences,
    sample_images,
    write_predictions,
    write_preferences,
)

# tests/stmed/test_data.py -> parents: [0] tests/stmed, [1] tests, [2] the repo, [3] its parent (/work).
VQA_RAD = Path(__file__).resolve().parents[4] / "shared" / "benchmarks" / "vqa_rad"


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def human(text: str) -> dict:
    return {"from": "human", "value": text}


def gpt(text: str) -> dict:
    return {"from": "gpt", "value": text}


def pair(i: int, **overrides) -> PreferencePair:
    fields = {"pair_id": f"p{i}", "image": f"/data/images/img{i}.png", "question": f"What is shown in {i}?",
              "chosen": f"A lesion {i}.", "rejected": "Nothing.", "chosen_score": 8.0, "rejected_score": 3.5,
              "judge_model": "gpt-4o", "seeds": [10 + i, 20 + i], "question_seed": i}
    return PreferencePair(**(fields | overrides))


# ---------------------------------------------------------------- records


def test_records_round_trip_through_rows_and_json():
    records = [
        InstructSample("s1", "a.png", [human("<image>\nWhat?"), gpt("A chest X-ray.")]),
        VQAExample(10, "synpic1.jpg", "Is it normal?", "yes", "CLOSED"),
        Prediction(10, "Is it normal?", "yes", "CLOSED", "tiny"),
        pair(1),
        pair(2, question_seed=None, seeds=[]),
        Skip("s9", "missing image"),
    ]
    for record in records:
        row = record.to_row()
        assert json.loads(json.dumps(row)) == row  # plain JSON values only
        assert type(record).from_row(row) == record


def test_from_row_accepts_what_ray_data_hands_back():
    """Ray Data returns numpy scalars and arrays; records must come back as plain Python values."""
    row = pair(3).to_row() | {"seeds": np.array([13, 23]), "chosen_score": np.float64(8.0),
                              "question_seed": np.int64(3)}
    back = PreferencePair.from_row(row)
    assert back == pair(3) and type(back.seeds[0]) is int and type(back.question_seed) is int
    example = VQAExample.from_row({"id": np.int64(7), "image": "x.jpg", "question": "q", "answer": "a",
                                   "answer_type": "OPEN"})
    assert example.id == 7 and type(example.id) is int
    turns = np.array([human("<image>\nq"), gpt("a")], dtype=object)
    sample = InstructSample.from_row({"id": "s", "image": "i.png", "conversations": turns})
    assert sample.conversations == [human("<image>\nq"), gpt("a")] and type(sample.conversations) is list


def test_record_validation_and_answer_id():
    with pytest.raises(ValueError, match="answer_type"):
        VQAExample(1, "x.jpg", "q", "a", "open")
    a = Prediction(1, "q", "yes", "CLOSED", "m")
    assert a.answer_id == Prediction(1, "q", "yes", "CLOSED", "m").answer_id  # reproducible
    assert a.answer_id != Prediction(1, "q", "no", "CLOSED", "m").answer_id
    assert Prediction(1, "q", "yes", answer_id="given").answer_id == "given"


# ---------------------------------------------------------------- instruct data


def test_read_instruct_keeps_good_entries_and_skips_bad_ones_with_reasons(tmp_path):
    good = {"id": "PMC1_a", "image": "PMC1_a.jpg", "domain": {"chest_xray": True},
            "conversations": [human("What is seen?\n<image>"), gpt("An opacity."),
                              human("Where?"), gpt("Left.")]}
    entries = [
        good,
        {"id": "no_image", "conversations": good["conversations"]},
        {"id": "blank_image", "image": " ", "conversations": good["conversations"]},
        {"id": "gpt_first", "image": "x.jpg", "conversations": [gpt("a"), human("q")]},
        {"id": "unanswered", "image": "x.jpg", "conversations": [human("<image>\nq"), gpt("a"), human("q2")]},
        {"id": "late_image", "image": "x.jpg",
         "conversations": [human("q"), gpt("a"), human("<image> q2"), gpt("b")]},
        {"id": "two_images", "image": "x.jpg", "conversations": [human("<image><image> q"), gpt("a")]},
        {"id": "empty_answer", "image": "x.jpg", "conversations": [human("<image> q"), gpt("  ")]},
        {"id": "not_a_list", "image": "x.jpg", "conversations": "USER: hi"},
        {"image": "x.jpg", "conversations": good["conversations"]},
        "not an object",
        {"id": 42, "image": "n.jpg", "conversations": [human("<image>\nq"), gpt("a")]},
    ]
    samples, skips = read_instruct(write_json(tmp_path / "instruct.json", entries))

    assert [s.id for s in samples] == ["PMC1_a", "42"]
    assert samples[0] == InstructSample("PMC1_a", "PMC1_a.jpg", good["conversations"])
    reasons = {s.item_id: s.reason for s in skips}
    assert list(reasons) == ["no_image", "blank_image", "gpt_first", "unanswered", "late_image", "two_images",
                             "empty_answer", "not_a_list", "#9", "#10"]
    assert reasons["no_image"] == "missing image"
    assert "human first" in reasons["gpt_first"]
    assert "unanswered" in reasons["unanswered"]
    assert "turn 2 contains <image>" in reasons["late_image"]
    assert "more than once" in reasons["two_images"]
    assert "empty" in reasons["empty_answer"]
    assert reasons["#9"] == "missing id" and reasons["#10"] == "entry is not a JSON object"


def test_read_instruct_rejects_files_that_are_not_json_arrays(tmp_path):
    with pytest.raises(ValueError, match="expected a JSON array.*dict"):
        read_instruct(write_json(tmp_path / "obj.json", {"data": []}))
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_instruct(tmp_path / "broken.json")


# ---------------------------------------------------------------- benchmarks


def test_read_benchmark_both_spellings_and_normalisation(tmp_path):
    entries = [
        {"id": 1, "image": "a.jpg", "answer_type": "closed",
         "conversations": [human("<image>\nIs there a fracture?  "), gpt("no")], "question_type": "PRES"},
        {"id": "q2", "image": "b.jpg", "answer_type": "OPEN",
         "conversatons": [human("What organ is this? <image>"), gpt("Liver")]},
    ]
    examples = read_benchmark(write_json(tmp_path / "test.json", entries))
    assert examples == [VQAExample(1, "a.jpg", "Is there a fracture?", "no", "CLOSED"),
                        VQAExample("q2", "b.jpg", "What organ is this?", "Liver", "OPEN")]


@pytest.mark.parametrize("entry, message", [
    ({"id": 1, "image": "a.jpg", "answer_type": "YESNO", "conversations": [human("q"), gpt("a")]},
     "answer_type"),
    ({"id": 1, "image": "a.jpg", "answer_type": "OPEN"}, "conversations"),
    ({"id": 1, "image": "a.jpg", "answer_type": "OPEN", "conversations": [human("q")]}, "gpt answer"),
    ({"image": "a.jpg", "answer_type": "OPEN", "conversations": [human("q"), gpt("a")]}, "'id'"),
])
def test_read_benchmark_is_strict(tmp_path, entry, message):
    with pytest.raises(ValueError, match=message):
        read_benchmark(write_json(tmp_path / "test.json", [entry]))


@pytest.mark.skipif(not (VQA_RAD / "test.json").is_file(), reason="shared VQA-RAD benchmark not present")
def test_real_vqa_rad_benchmark():
    examples = read_benchmark(VQA_RAD / "test.json")
    assert len(examples) == 451
    assert sum(e.answer_type == "CLOSED" for e in examples) == 272
    assert sum(e.answer_type == "OPEN" for e in examples) == 179
    assert len({e.image for e in examples}) == 203
    assert all(e.question and "<image>" not in e.question for e in examples)
    assert all(e.question == e.question.strip() for e in examples)
    raw = json.loads((VQA_RAD / "test.json").read_text())
    assert [e.id for e in examples] == [r["id"] for r in raw]  # order and ids kept for the scorer
    assert examples[0].question == raw[0]["conversations"][0]["value"].replace("<image>", "").strip()
    with_options = read_benchmark(VQA_RAD / "test_w_options.json")
    # The published file capitalises the options for some questions ("[Yes, No]"); compare case-blind.
    suffix = " please choose from the following two options: [yes, no]"
    for plain, optioned in zip(examples, with_options, strict=True):
        expected = plain.question + suffix if plain.answer_type == "CLOSED" else plain.question
        assert optioned.question.lower() == expected.lower() and optioned.answer == plain.answer


# ---------------------------------------------------------------- answer files


def test_predictions_round_trip_in_llava_med_answer_format(tmp_path):
    preds = [Prediction(10, "Is it normal?", "yes", "CLOSED", "stmed-tiny"),
             Prediction("q2", "What organ?", "the liver, ünïcode", "", "stmed-tiny")]
    path = write_predictions(tmp_path / "out" / "answers.jsonl", preds)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert set(lines[0]) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
    assert lines[0]["question_id"] == 10 and lines[0]["metadata"] == {"answer_type": "CLOSED"}
    assert lines[1]["metadata"] == {}
    assert read_predictions(path) == preds


def test_read_official_answer_lines_and_reject_bad_ones(tmp_path):
    official = {"question_id": 5, "prompt": "q", "text": "no", "answer_id": "Zx8", "model_id": "llava-med",
                "metadata": {}}
    path = tmp_path / "official.jsonl"
    path.write_text(json.dumps(official) + "\n\n" + json.dumps({"question_id": 6, "text": "yes"}) + "\n")
    first, second = read_predictions(path)
    assert first == Prediction(5, "q", "no", "", "llava-med", "Zx8")
    assert second.question_id == 6 and second.text == "yes" and second.prompt == ""
    path.write_text(json.dumps(official) + "\n" + json.dumps({"question_id": 7}) + "\n")
    with pytest.raises(ValueError, match=r"official.jsonl:2: .*'text'"):
        read_predictions(path)
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match=r":1: not valid JSON"):
        read_predictions(path)


# ---------------------------------------------------------------- preference pairs


def test_preferences_parquet_round_trip_with_typed_schema(tmp_path):
    pairs = [pair(1), pair(2, question_seed=None), pair(3, seeds=[])]
    path = write_preferences(tmp_path / "prefs" / "pairs.parquet", pairs)
    assert read_preferences(path) == pairs
    schema = pq.read_schema(path)
    assert schema.field("seeds").type == pa.list_(pa.int64())
    assert schema.field("chosen_score").type == pa.float64()
    assert pq.read_table(path).column("question_seed").to_pylist() == [1, None, 3]
    empty = write_preferences(tmp_path / "empty.parquet", [])
    assert read_preferences(empty) == [] and pq.read_schema(empty).names == schema.names


def test_read_preferences_names_missing_columns(tmp_path):
    pq.write_table(pa.table({"pair_id": ["p"], "image": ["i"]}), tmp_path / "other.parquet")
    with pytest.raises(ValueError, match="missing columns.*chosen"):
        read_preferences(tmp_path / "other.parquet")


def test_export_dpo_json_reference_format(tmp_path):
    pairs = [pair(1), pair(2, image="/elsewhere/x.png")]
    path = export_dpo_json(pairs, tmp_path / "dpo.json", image_root="/data/images")
    records = json.loads(path.read_text())
    assert records[0] == {
        "id": "p1",
        "image": "img1.png",
        "chosen_conversations": [human("<image>\nWhat is shown in 1?"), gpt("A lesion 1.")],
        "reject_conversations": [human("<image>\nWhat is shown in 1?"), gpt("Nothing.")],
    }
    assert records[1]["image"] == "/elsewhere/x.png"  # outside image_root: kept as given
    unrooted = json.loads(export_dpo_json(pairs[:1], tmp_path / "b.json").read_text())
    assert unrooted[0]["image"] == pairs[0].image


# ---------------------------------------------------------------- image manifests


def test_list_images_from_a_folder(tmp_path):
    for name in ["b/scan.DCM", "a/2.png", "a/1.JPG", "c.tiff", "d.bmp", "notes.txt", "a/e.jpeg", "x.gif"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    found = list_images(tmp_path)
    expected = ["a/1.JPG", "a/2.png", "a/e.jpeg", "b/scan.DCM", "c.tiff", "d.bmp"]
    assert found == [str(tmp_path / name) for name in expected]


def test_list_images_from_json_jsonl_and_instruct_files(tmp_path):
    write_json(tmp_path / "paths.json", ["a.png", "sub/b.png", str(tmp_path / "c.png"), "a.png"])
    assert list_images(tmp_path / "paths.json") == [str(tmp_path / "a.png"), str(tmp_path / "sub/b.png"),
                                                     str(tmp_path / "c.png")]
    write_json(tmp_path / "objects.json", [{"image": "a.png", "note": 1}, {"image": "b.png"}])
    assert list_images(tmp_path / "objects.json", image_root="/imgs") == ["/imgs/a.png", "/imgs/b.png"]
    (tmp_path / "list.jsonl").write_text('"a.png"\n\n{"image": "b.png"}\n')
    assert list_images(tmp_path / "list.jsonl") == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    instruct = [{"id": str(i), "image": f"img{i % 2}.jpg", "conversations": [human("<image>q"), gpt("a")]}
                for i in range(5)] + [{"id": "text_only", "conversations": [human("q"), gpt("a")]}]
    write_json(tmp_path / "instruct.json", instruct)
    assert list_images(tmp_path / "instruct.json") == [str(tmp_path / "img0.jpg"), str(tmp_path / "img1.jpg")]


@pytest.mark.parametrize("name, content, message", [
    ("m.csv", "a.png\n", "expected a folder"),
    ("m.json", json.dumps([3]), "entry 0"),
    ("m.json", json.dumps({"images": []}), "JSON array"),
    ("m.jsonl", '"a.png"\n{oops\n', ":2: not valid JSON"),
])
def test_list_images_rejects_bad_manifests(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=message):
        list_images(tmp_path / name)
    with pytest.raises(ValueError, match="does not exist"):
        list_images(tmp_path / "missing.json")


@pytest.mark.parametrize("entry", ["/etc/hostname", "../../../../etc/passwd", "sub/../../outside.png"])
@pytest.mark.parametrize("kind", ["json", "jsonl"])
def test_manifest_paths_outside_the_image_root_are_refused_naming_the_line(tmp_path, entry, kind):
    root = tmp_path / "data"
    root.mkdir()
    entries = ["a.png", {"image": entry}]
    manifest = root / f"m.{kind}"
    if kind == "json":
        write_json(manifest, entries)
    else:
        manifest.write_text("".join(json.dumps(e) + "\n" for e in entries))
    where = "entry 1" if kind == "json" else "line 2"
    with pytest.raises(DataError, match=rf"m.{kind}: {where}: image path .* outside the image root") as err:
        list_images(manifest)
    assert "\n" not in str(err.value)


def test_a_symlink_pointing_out_of_the_image_root_is_refused(tmp_path):
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"x")
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    (root / "ok.png").write_bytes(b"x")
    (root / "sub" / "leak.png").symlink_to(outside)
    with pytest.raises(DataError, match=r"leak.png: image path 'sub/leak.png' resolves to .*secret.png, out"):
        list_images(root)
    write_json(root / "m.json", ["ok.png", "sub/leak.png"])
    with pytest.raises(DataError, match="entry 1: image path 'sub/leak.png'"):
        list_images(root / "m.json")
    (root / "sub" / "leak.png").unlink()
    (root / "sub" / "inside.png").symlink_to(root / "ok.png")  # a link that stays inside is fine
    assert list_images(root) == [str(root / "ok.png"), str(root / "sub" / "inside.png")]


def test_sample_images_is_reproducible():
    paths = [f"img{i:03d}.png" for i in range(100)]
    first = sample_images(paths, 10, seed=0)
    assert first == sample_images(paths, 10, seed=0)
    assert len(set(first)) == 10 and set(first) <= set(paths)
    assert first == sorted(first, key=paths.index)  # manifest order kept
    assert first != sample_images(paths, 10, seed=1)
    assert sample_images(paths, 1000, seed=0) == paths
    assert sample_images(paths, 0, seed=0) == []
    with pytest.raises(ValueError, match=">= 0"):
        sample_images(paths, -1, seed=0)


def test_preference_null_text_reads_as_empty_not_none():
    row = dict(pair_id="a", image="i.png", question="q?", chosen=None, rejected="r",
               chosen_score=1.0, rejected_score=2.0, judge_model="m")
    pair = PreferencePair.from_row(row)
    assert pair.chosen == "" and pair.rejected == "r"
