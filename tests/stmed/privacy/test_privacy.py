"""The privacy gate, the audit, the judge host allowlist, the contamination guard, and the phantoms'
burned-in text, asserted on what they produce."""

from __future__ import annotations

import io
import json
import os
import random

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from stmed.config import ConfigError, build_config
from stmed.data.images import burned_in_annotation, decode_data_url, load_image, pixel_digest
from stmed.data.overlays import draw_overlay
from stmed.data.synthetic import Findings, make_dataset, render_phantom
from stmed.judge.judging import JudgeSettings
from stmed.judge.reference import load_digest_index
from stmed.privacy.audit import audit_lines, audit_totals
from stmed.privacy.contamination import ContaminationSettings, remove_benchmark_copies
from stmed.privacy.gate import ALLOWED, MASKED, PASSED, REFUSED, PrivacySettings, TextGate, mask_regions
from stmed.privacy.ocr import Box, tesseract_available
from stmed.privacy.textdet import detector_available, line_evidence

FINDINGS = Findings("ct", "chest", True, "left", 2, "large")


def needs_tesseract() -> None:
    """Skip without the tesseract program, except in CI (CI=true), where its absence is a failure."""
    if tesseract_available():
        return
    if os.environ.get("CI") == "true":
        pytest.fail("tesseract is not installed: .ci/run installs Debian's tesseract-ocr")
    pytest.skip("tesseract is not installed (apt-get install tesseract-ocr); CI runs this test")


def needs_detector() -> None:
    """Skip without onnxruntime and the rapidocr wheel (pyproject dependencies), except in CI."""
    if detector_available():
        return
    if os.environ.get("CI") == "true":
        pytest.fail("the DBNet text detector is not installed: pip install rapidocr==3.10.0 onnxruntime")
    pytest.skip("the DBNet text detector is not installed (pip install rapidocr onnxruntime); CI runs this test")


def phantom(n: int = 0) -> Image.Image:
    return render_phantom(FINDINGS, np.random.default_rng([0, n]), 64)


def test_judge_host_outside_the_allowlist_is_refused_naming_the_key_and_loopback_always_passes():
    with pytest.raises(ConfigError, match=r"judge.allowed_hosts") as err:
        build_config(JudgeSettings, {"base_url": "https://judge.example.org/v1"})
    assert "\n" not in str(err.value) and "judge.example.org" in str(err.value)
    ok = build_config(JudgeSettings, {"base_url": "https://Judge.Example.org/v1"},
                      ["allowed_hosts=[judge.example.org]"])
    assert ok.allowed_hosts == ["judge.example.org"]
    for url in ("http://127.0.0.1:9/v1", "http://[::1]:9/v1", "http://localhost:9/v1"):
        assert JudgeSettings(base_url=url).base_url == url


def test_mask_fills_each_box_grown_by_the_margin_and_nothing_else():
    img = phantom()
    out = np.asarray(mask_regions(img, [Box(10, 20, 30, 26)], margin=2, fill=0))
    before = np.asarray(img)
    assert (out[18:28, 8:32] == 0).all()
    untouched = np.ones(out.shape[:2], bool)
    untouched[18:28, 8:32] = False
    assert (out[untouched] == before[untouched]).all()


class CountingOCR:
    def __init__(self, boxes: list[Box]):
        self.boxes, self.calls, self.images = boxes, 0, 0

    def __call__(self, images):
        self.calls += 1
        self.images += len(images)
        return [list(self.boxes) for _ in images]


def test_gate_modes_once_per_image_and_the_dicom_flag():
    img, other = phantom(0), phantom(1)
    ocr = CountingOCR([Box(2, 2, 20, 10)])
    gate = TextGate(PrivacySettings(burned_in_text="mask"), detect=ocr)
    first = gate.check([img, other, img])
    again = gate.check([img])
    assert ocr.calls == 1 and ocr.images == 2  # the repeated image is looked at once, then remembered
    assert first[0] == first[2] == again[0] and first[0].action == MASKED and first[0].regions == 1
    sent = decode_data_url(first[0].data_url)
    assert first[0].sent_digest == pixel_digest(sent) != pixel_digest(img)
    assert (np.asarray(sent)[0:12, 0:22] == 0).all()

    refused = TextGate(PrivacySettings(burned_in_text="refuse"), detect=CountingOCR([Box(2, 2, 20, 10)])).check([img])
    assert refused[0].action == REFUSED and refused[0].data_url is None and "1 text region" in refused[0].reason
    allowed = TextGate(PrivacySettings(burned_in_text="allow"), detect=CountingOCR([Box(2, 2, 20, 10)])).check([img])
    assert allowed[0].action == ALLOWED and decode_data_url(allowed[0].data_url).tobytes() == img.tobytes()

    nothing = TextGate(detect=CountingOCR([]))
    assert nothing.check([img])[0].action == PASSED
    declared = nothing.check([img], declared=[True])[0]  # DICOM says text, OCR locates none: not sent
    assert declared.action == REFUSED and "Burned In Annotation" in declared.reason


def test_privacy_settings_name_the_key():
    with pytest.raises(ConfigError, match="burned_in_text"):
        build_config(PrivacySettings, {"burned_in_text": "blur"})
    with pytest.raises(ConfigError, match="privacy.mask_margin_px"):
        PrivacySettings(mask_margin_px=-1)


def test_dicom_burned_in_annotation_flag_is_read_from_the_header(tmp_path):
    def dicom(flag: str | None) -> bytes:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, "1.2.3"
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, "1.2.3"
        ds.Rows = ds.Columns = 4
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit, ds.PixelRepresentation = 7, 0
        ds.PixelData = bytes(range(16))
        if flag is not None:
            ds.BurnedInAnnotation = flag
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()

    for name, flag, expected in (("yes.dcm", "YES", True), ("no.dcm", "NO", False), ("none.dcm", None, False)):
        (tmp_path / name).write_bytes(dicom(flag))
        assert burned_in_annotation(tmp_path / name) is expected
    phantom().save(tmp_path / "p.png")
    assert burned_in_annotation(tmp_path / "p.png") is False


def test_dbnet_gate_masks_small_burned_in_text_and_leaves_clean_phantoms_alone():
    needs_detector()
    gate = TextGate(PrivacySettings(detector="dbnet"))
    for n, (height, font) in enumerate(((8, "sans"), (10, "pixel"), (11, "sans"))):
        img, overlay = draw_overlay(phantom(n), "record_number", random.Random(n), height=height, font=font,
                                    position="bottom", contrast=120)
        result = gate.check([img])[0]
        assert result.action == MASKED, (height, font)
        sent = np.asarray(decode_data_url(result.data_url))[..., 0]
        x0, y0, x1, y1 = overlay.box
        assert (sent[y0:y1, x0:x1] == 0).mean() >= 0.8  # the line's box is filled
    assert [r.action for r in gate.check([phantom(n) for n in range(10, 14)])] == [PASSED] * 4


def test_recogniser_confirms_a_text_line_and_not_blank_pixels_and_the_gate_keeps_confirmed_text():
    needs_detector()
    img, overlay = draw_overlay(phantom(5), "record_number", random.Random(5), height=9, font="sans",
                                position="bottom", contrast=120)
    blank = Image.new("RGB", (64, 64), (90, 90, 90))
    (chars, conf), = line_evidence(img, [Box(*overlay.box)])
    (blank_chars, blank_conf), = line_evidence(blank, [Box(4, 4, 50, 14)])
    assert chars >= 4 and conf >= 0.5  # "ID" and six digits: counts and confidence only, never the text
    assert blank_chars == 0 and blank_conf == 0.0
    confirmed = TextGate(PrivacySettings(text_confidence=0.5, text_min_chars=2)).check([img, phantom(11)])
    assert [r.action for r in confirmed] == [MASKED, PASSED]
    with pytest.raises(ConfigError, match="privacy.text_confidence"):
        PrivacySettings(text_confidence=1.5)
    with pytest.raises(ConfigError, match="privacy.text_min_chars"):
        PrivacySettings(text_min_chars=0)


def test_tesseract_gate_masks_large_burned_in_text():
    needs_tesseract()
    img, overlay = draw_overlay(phantom(), "record_number", random.Random(0), height=14, font="sans",
                                position="top", contrast=200)
    result = TextGate(PrivacySettings(detector="tesseract")).check([img])[0]
    assert result.action == MASKED and result.regions >= 1
    sent = np.asarray(decode_data_url(result.data_url))[..., 0]
    x0, y0, x1, y1 = overlay.box
    ink = np.asarray(img)[y0:y1, x0:x1, 0] == overlay.fill
    assert (sent[y0:y1, x0:x1][ink] != overlay.fill).mean() >= 0.5  # most of the text is gone


def test_audit_has_one_line_per_image_sent_and_no_text():
    rows = [
        {"image_id": "a", "status": "ok", "attempts": 1, "cached": False, "gate_action": "masked",
         "gate_regions": 2, "sent_digest": "d1", "question": "q1"},
        {"image_id": "a", "status": "ok", "attempts": 2, "cached": False, "gate_action": "masked",
         "gate_regions": 2, "sent_digest": "d1", "question": "q2"},
        {"image_id": "b", "status": "ok", "attempts": 0, "cached": True, "gate_action": "passed",
         "gate_regions": 0, "sent_digest": "d2"},
        {"image_id": "c", "status": "image_error", "gate_action": "refused", "gate_regions": 1,
         "sent_digest": ""},
        {"image_id": "d", "status": "question_filtered", "gate_action": "", "gate_regions": 0},
    ]
    lines = audit_lines(rows, "judge.example.org")
    assert [line["image_id"] for line in lines] == ["a", "b", "c"]
    assert lines[0] == {"image_id": "a", "sent": True, "host": "judge.example.org", "pixel_digest": "d1",
                        "gate_action": "masked", "masked_regions": 2, "requests": 3}
    assert lines[2]["sent"] is False and lines[2]["host"] == ""
    totals = audit_totals(lines)
    assert totals == {"images_sent": 2, "images_refused": 1, "masked_regions": 2,
                      "actions": {"masked": 1, "passed": 1, "refused": 1}, "hosts": {"judge.example.org": 2}}


def test_contamination_guard_removes_resized_jpeg_and_cropped_benchmark_copies(tmp_path):
    bench = tmp_path / "bench"
    bench.mkdir()
    pool = tmp_path / "pool"
    pool.mkdir()
    organs = [Findings(m, o, False) for m in ("ct", "mri", "x-ray") for o in ("brain", "chest", "abdomen")]
    originals = [render_phantom(f, np.random.default_rng([1, i]), 64) for i, f in enumerate(organs[:3])]
    for i, img in enumerate(originals):
        img.save(bench / f"b{i}.png")
    originals[0].resize((96, 96), Image.Resampling.BICUBIC).save(pool / "resized.png")
    originals[1].save(pool / "jpeg.jpg", quality=60)
    originals[2].crop((3, 2, 61, 60)).save(pool / "cropped.png")
    for i, f in enumerate(organs[3:8]):  # (an X-ray abdomen sits within 44 bits of a CT one: see docs)
        render_phantom(f, np.random.default_rng([2, i]), 64).save(pool / f"other{i}.png")
    images = [{"image_id": p.name, "image_path": str(p)} for p in sorted(pool.iterdir())]
    kept, counts = remove_benchmark_copies(images, ContaminationSettings(benchmarks=[str(bench)]),
                                           tmp_path / "contamination.jsonl")
    listed = [json.loads(line) for line in (tmp_path / "contamination.jsonl").read_text().splitlines()]
    assert {line["image_id"] for line in listed} == {"resized.png", "jpeg.jpg", "cropped.png"}
    assert {line["image_id"]: line["benchmark_image"].rsplit("/", 1)[1] for line in listed} == {
        "resized.png": "b0.png", "jpeg.jpg": "b1.png", "cropped.png": "b2.png"}
    assert sorted(row["image_id"] for row in kept) == [f"other{i}.png" for i in range(5)]
    assert counts["near_duplicates"] == counts["removed"] == 3 and counts["benchmark_images"] == 3


def test_phantoms_with_burned_in_text_keep_ground_truth_and_leave_the_benchmark_alone(tmp_path):
    plain = make_dataset(tmp_path / "plain", num_images=20, seed=0, pool_images=10)
    burned = make_dataset(tmp_path / "burned", num_images=20, seed=0, pool_images=10, overlay_share=0.5,
                          laterality_share=0.3)
    truth = json.loads(burned.overlays.read_text())
    assert json.loads(plain.overlays.read_text()) == {}
    findings = json.loads(burned.findings.read_text())
    assert truth and all(findings[name]["split"] in ("train", "pool") for name in truth)
    kinds = {o["kind"] for found in truth.values() for o in found}
    assert "laterality" in kinds and kinds & {"name", "birth_date", "exam_date", "record_number"}
    for name, found in truth.items():
        before = np.asarray(load_image(plain.images / name))
        after = np.asarray(load_image(burned.images / name))
        for o in found:
            x0, y0, x1, y1 = o["box"]
            assert (after[y0:y1, x0:x1] == o["fill"]).any() and not (after == before).all()
            assert o["height"] == y1 - y0 >= 5
    for name, entry in findings.items():
        if entry["split"] == "test":
            assert (burned.images / name).read_bytes() == (plain.images / name).read_bytes()
    assert burned.test.read_bytes() == plain.test.read_bytes()


def test_reference_judge_recognises_a_masked_phantom_and_nothing_else(tmp_path):
    paths = make_dataset(tmp_path / "d", num_images=6, seed=0)
    index = load_digest_index(paths.findings)
    name, entry = next(iter(json.loads(paths.findings.read_text()).items()))
    img = load_image(paths.images / name)
    masked = mask_regions(img, [Box(0, 0, 30, 9)], 2, 0)
    assert index.find_masked(np.asarray(masked)) == Findings.from_dict(entry)
    assert index.find_masked(np.asarray(phantom(99))) is None
