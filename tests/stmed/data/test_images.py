"""stmed.data.images: every format to fresh RGB pixels, DICOM rendering, one typed error for bad files.

DICOM cases use the real test files shipped inside the installed pydicom package (only those present
on disk; pydicom downloads some others on demand, which this machine cannot).
"""

from __future__ import annotations

import base64
import io
import logging
import struct
import traceback
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_windowing

from stmed.data.images import (
    DATA_URL_PREFIX,
    ImageLoadError,
    ImageSizeError,
    decode_data_url,
    decode_image,
    image_to_data_url,
    load_image,
    pixel_digest,
)
from tests.malformed import PATIENT, malformed_dicoms, patient_dicom, with_length


def dicom_file(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not on disk")
    return Path(path)


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img)


@pytest.fixture
def gradient() -> np.ndarray:
    """A 48x64 RGB test pattern with every channel different."""
    y, x = np.mgrid[0:48, 0:64]
    return np.stack([x * 4, y * 5, (x + y) * 2], axis=-1).astype(np.uint8)


# ---------------------------------------------------------------- ordinary formats


@pytest.mark.parametrize("suffix", [".png", ".tif", ".bmp"])
def test_lossless_formats_round_trip_exact_pixels(tmp_path, gradient, suffix):
    path = tmp_path / f"img{suffix}"
    Image.fromarray(gradient).save(path)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (64, 48)
    assert np.array_equal(pixels(img), gradient)
    assert img.info == {}


def test_jpeg_loads_close_to_source_and_drops_exif(tmp_path, gradient):
    exif = Image.Exif()
    exif[0x010F] = "ScannerMaker"  # Make
    exif[0x013B] = "Jane Doe"  # Artist: stands in for patient data a scanner might write
    path = tmp_path / "photo.jpg"
    Image.fromarray(gradient).save(path, quality=95, exif=exif.tobytes())
    assert Image.open(path).getexif()[0x013B] == "Jane Doe"  # the source really carries it

    img = load_image(path)
    assert img.info == {} and len(img.getexif()) == 0
    assert np.abs(pixels(img).astype(int) - gradient).mean() < 3
    png = base64.b64decode(image_to_data_url(img).removeprefix(DATA_URL_PREFIX))
    assert b"Jane Doe" not in png and b"ScannerMaker" not in png


def test_png_text_chunks_do_not_survive(tmp_path, gradient):
    info = PngInfo()
    info.add_text("PatientName", "Jane Doe")
    path = tmp_path / "img.png"
    Image.fromarray(gradient).save(path, pnginfo=info)
    assert Image.open(path).info["PatientName"] == "Jane Doe"
    img = load_image(path)
    assert img.info == {}
    assert b"Jane Doe" not in base64.b64decode(image_to_data_url(img).removeprefix(DATA_URL_PREFIX))


def test_exif_orientation_is_applied_to_the_pixels(tmp_path, gradient):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.jpg"
    Image.fromarray(gradient).save(path, exif=exif.tobytes())
    img = load_image(path)
    assert img.size == (48, 64)  # width and height swapped
    assert img.info == {}


def test_grey_and_16_bit_images_become_rgb(tmp_path):
    grey = np.arange(100, dtype=np.uint8).reshape(10, 10)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    rgb = pixels(load_image(tmp_path / "grey.png"))
    assert rgb.shape == (10, 10, 3)
    assert np.array_equal(rgb[..., 0], grey) and np.array_equal(rgb[..., 2], grey)

    # 12-bit data in a 16-bit PNG, as scanners write it: min-max stretched, not clipped to white.
    deep = (np.arange(100).reshape(10, 10) * 40 + 100).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    out = pixels(load_image(tmp_path / "deep.png"))[..., 0].astype(int)
    assert out.min() == 0 and out.max() == 255
    assert np.all(np.diff(out.ravel()) >= 0)  # order of intensities preserved
    assert np.abs(out - (deep - 100) / (99 * 40) * 255).max() <= 0.5 + 1e-9


# ---------------------------------------------------------------- DICOM


def test_ct_dicom_min_max_after_rescale_and_no_tags(tmp_path):
    path = dicom_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (ds.Columns, ds.Rows)
    assert img.info == {} and len(img.getexif()) == 0
    out = pixels(img)
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 0], out[..., 2])
    # No window in this file: the Hounsfield range is stretched min-max.
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected = np.rint((hu - hu.min()) / (hu.max() - hu.min()) * 255)
    assert np.array_equal(out[..., 0], expected.astype(np.uint8))
    # Nothing of the header survives into what we would send anywhere.
    png = base64.b64decode(image_to_data_url(img).removeprefix(DATA_URL_PREFIX))
    assert str(ds.PatientName).encode() not in png and ds.PatientID.encode() not in png


def test_mr_dicom_window_matches_pydicom_linear_windowing():
    path = dicom_file("MR_small.dcm")
    ds = pydicom.dcmread(path)
    assert "WindowCenter" in ds and "RescaleSlope" not in ds
    out = pixels(load_image(path))[..., 0].astype(float)
    # pydicom's own VOI implementation, rescaled from its output range to 0..255, is the oracle.
    ref = apply_windowing(ds.pixel_array.astype(float), ds)
    low, high = -(2 ** (ds.BitsStored - 1)), 2 ** (ds.BitsStored - 1) - 1
    expected = (ref - low) / (high - low) * 255
    assert np.abs(out - expected).max() <= 1.0
    assert out.min() < 100 and out.max() == 255  # the window really clips the bright end


def test_rescale_is_applied_before_the_window(tmp_path):
    ds = pydicom.dcmread(dicom_file("CT_small.dcm"))
    ds.WindowCenter, ds.WindowWidth = 40, 400  # a soft-tissue window, in Hounsfield units
    path = tmp_path / "ct_windowed.dcm"
    ds.save_as(path)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected = np.clip(np.rint(((hu - 39.5) / 399 + 0.5) * 255), 0, 255)
    out = pixels(load_image(path))[..., 0]
    assert np.array_equal(out, expected.astype(np.uint8))
    assert 0 < out.mean() < 255  # without the intercept every raw value would sit far above the window


def test_slope_and_intercept_scale_consistently(tmp_path):
    plain = pixels(load_image(dicom_file("MR_small.dcm"))).astype(int)
    ds = pydicom.dcmread(dicom_file("MR_small.dcm"))
    centre, width = float(ds.WindowCenter), float(ds.WindowWidth)
    ds.RescaleSlope, ds.RescaleIntercept = 2, -100
    ds.WindowCenter, ds.WindowWidth = 2 * centre - 100, 2 * width - 1  # same window in rescaled units
    ds.save_as(tmp_path / "mr_rescaled.dcm")
    rescaled = pixels(load_image(tmp_path / "mr_rescaled.dcm")).astype(int)
    assert np.abs(rescaled - plain).max() <= 1


def test_monochrome1_is_inverted(tmp_path):
    ds = pydicom.dcmread(dicom_file("MR_small.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "mono1.dcm")
    inverted = pixels(load_image(tmp_path / "mono1.dcm"))
    normal = pixels(load_image(dicom_file("MR_small.dcm")))
    assert np.array_equal(inverted, 255 - normal)


def test_multi_frame_gives_the_middle_frame():
    path = dicom_file("rtdose.dcm")
    ds = pydicom.dcmread(path)
    assert int(ds.NumberOfFrames) == 15
    frame = ds.pixel_array[7].astype(float)
    expected = np.rint((frame - frame.min()) / (frame.max() - frame.min()) * 255)
    out = pixels(load_image(path))
    assert out.shape == (ds.Rows, ds.Columns, 3)
    assert np.array_equal(out[..., 0], expected.astype(np.uint8))
    assert not np.array_equal(ds.pixel_array[0], ds.pixel_array[7])  # the choice of frame matters


def test_colour_dicom_multi_frame_and_ybr():
    path = dicom_file("examples_ybr_color.dcm")  # 30 frames, YBR_FULL_422
    ds = pydicom.dcmread(path)
    out = pixels(load_image(path))
    assert np.array_equal(out, ds.pixel_array[15])  # pydicom converts YBR to RGB
    assert (out[..., 0] != out[..., 1]).any()  # really colour, not grey


def test_colour_dicom_8_and_16_bit():
    rgb8 = dicom_file("SC_rgb_rle.dcm")
    assert np.array_equal(pixels(load_image(rgb8)), pydicom.dcmread(rgb8).pixel_array)
    rgb16 = dicom_file("SC_rgb_rle_16bit.dcm")
    raw = pydicom.dcmread(rgb16).pixel_array.astype(float)
    assert np.abs(pixels(load_image(rgb16)) - raw / 65535 * 255).max() <= 0.5 + 1e-9


def test_dicom_detected_by_content_and_preambleless_by_suffix(tmp_path):
    data = dicom_file("MR_small.dcm").read_bytes()
    reference = pixels(load_image(dicom_file("MR_small.dcm")))
    (tmp_path / "IM0001").write_bytes(data)  # scanners often write files without a suffix
    assert np.array_equal(pixels(load_image(tmp_path / "IM0001")), reference)
    # Without the 128-byte preamble and "DICM", only the .dcm suffix says it is DICOM.
    (tmp_path / "bare.dcm").write_bytes(data[132:])
    assert np.array_equal(pixels(load_image(tmp_path / "bare.dcm")), reference)
    (tmp_path / "bare.bin").write_bytes(data[132:])
    with pytest.raises(ImageLoadError, match="unsupported format"):
        load_image(tmp_path / "bare.bin")


# ---------------------------------------------------------------- bad input: one typed error


def _png_header(width: int, height: int) -> bytes:
    """A PNG that only declares its size: enough for a decompression-bomb check."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk
            + struct.pack(">I", zlib.crc32(chunk)) + struct.pack(">I", 0) + b"IEND"
            + struct.pack(">I", zlib.crc32(b"IEND")))


def _bad_files(tmp_path: Path, gradient: np.ndarray) -> dict[str, tuple[Path, str]]:
    Image.fromarray(gradient).save(tmp_path / "good.jpg")
    jpeg = (tmp_path / "good.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("this is not a picture\n")
    Image.fromarray(gradient).save(tmp_path / "anim.gif")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "garbage.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00garbage" * 20)
    (tmp_path / "huge_bomb.png").write_bytes(_png_header(20000, 20000))  # PIL's DecompressionBombError
    (tmp_path / "huge_warn.png").write_bytes(_png_header(10000, 10000))  # PIL's DecompressionBombWarning
    return {
        "missing": (tmp_path / "missing.png", "not found"),
        "directory": (tmp_path, "directory"),
        "empty": (tmp_path / "empty.png", "empty"),
        "truncated jpeg": (tmp_path / "truncated.jpg", "truncated"),
        "text named .png": (tmp_path / "text.png", "unsupported format"),
        "gif": (tmp_path / "anim.gif", "unsupported format"),
        "txt suffix": (tmp_path / "notes.txt", "unsupported format"),
        "garbage dicom": (tmp_path / "garbage.dcm", "DICOM"),
        "truncated dicom": (dicom_file("MR_truncated.dcm"), "DICOM"),
        "dicom without pixels": (dicom_file("rtplan.dcm"), "no pixel data"),
        "pil bomb error": (tmp_path / "huge_bomb.png", "too many pixels"),
        "pil bomb warning": (tmp_path / "huge_warn.png", "too many pixels"),
    }


def test_every_bad_file_raises_image_load_error(tmp_path, gradient):
    for label, (path, reason) in _bad_files(tmp_path, gradient).items():
        with pytest.raises(ImageLoadError) as info:
            load_image(path, max_pixels=10**12, max_side=10**6)  # so the PIL bombs reach PIL's own guard
        assert isinstance(info.value, ValueError), label
        assert info.value.path == str(path), label
        assert reason in info.value.reason, (label, info.value.reason)
        assert str(path) in str(info.value), label


def test_max_pixels_guard(tmp_path, gradient):
    Image.fromarray(gradient).save(tmp_path / "ok.png")
    assert load_image(tmp_path / "ok.png", max_pixels=64 * 48).size == (64, 48)
    with pytest.raises(ImageLoadError, match="64x48 > max_pixels=3071"):
        load_image(tmp_path / "ok.png", max_pixels=64 * 48 - 1)
    with pytest.raises(ImageLoadError, match="too many pixels"):
        load_image(dicom_file("CT_small.dcm"), max_pixels=1000)
    (tmp_path / "big.png").write_bytes(_png_header(9000, 9000))  # under PIL's limit, over our default
    with pytest.raises(ImageLoadError, match="too many pixels"):
        load_image(tmp_path / "big.png")


def _one_row_png(width: int, height: int = 1) -> bytes:
    """A real, decodable PNG of a long thin image: a few KB on disk, whatever its width."""
    buffer = io.BytesIO()
    Image.new("L", (width, height), 90).save(buffer, format="PNG")
    return buffer.getvalue()


def test_extreme_sides_and_aspect_ratios_are_refused_before_decoding(tmp_path):
    """1,600,000 x 1 is under the pixel limit, yet a model's processor would scale it to gigapixels."""
    for width, height in ((1_600_000, 1), (400_000, 4)):
        data = _one_row_png(width, height)
        assert len(data) < 10_000 and width * height < 8192 * 8192  # small file, under max_pixels
        with pytest.raises(ImageSizeError, match="side too long") as info:
            decode_image(data, "thin.png")
        assert info.value.limit == "max_side" and f"{width}x{height}" in info.value.reason
    (tmp_path / "header_only.png").write_bytes(_png_header(1_600_000, 1))  # no pixel data at all:
    with pytest.raises(ImageSizeError, match="side too long"):  # refused from the header, not "truncated"
        load_image(tmp_path / "header_only.png")
    with pytest.raises(ImageSizeError, match="aspect ratio") as info:
        decode_image(_one_row_png(2000, 50))  # 40:1, every side short
    assert info.value.limit == "max_aspect" and isinstance(info.value, ImageLoadError)
    assert decode_image(_one_row_png(2000, 100)).size == (2000, 100)  # 20:1 is the default limit
    assert decode_image(_one_row_png(2000, 50), max_aspect=40).size == (2000, 50)


# ---------------------------------------------------------------- malformed DICOM: no patient data out

def test_malformed_dicom_puts_no_patient_data_in_warnings_logs_or_errors(tmp_path, caplog, recwarn, capfd):
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="pydicom")
    texts = []
    for label, data in malformed_dicoms().items():
        path = tmp_path / f"{label.replace(' ', '_')}.dcm"
        path.write_bytes(data)
        with pytest.raises(ImageLoadError) as info:
            load_image(path)
        assert info.value.path == str(path) and str(path) in str(info.value), label
        texts += [str(info.value), repr(info.value), "".join(traceback.format_exception(info.value))]
    texts += [str(w.message) for w in recwarn.list]
    texts += [caplog.text, *(r.getMessage() for r in caplog.records)]
    texts += list(capfd.readouterr())
    for value in PATIENT.values():
        for needle in {value, value.split("^")[0], value[:13]}:
            leaked = [t[:120] for t in texts if needle in t]
            assert not leaked, f"{needle!r} leaked: {leaked}"


def test_every_pydicom_failure_is_an_image_load_error():
    """Every cut and every length of the transfer syntax: an image or ImageLoadError, never pydicom's own."""
    good = patient_dicom()
    assert np.array_equal(pixels(decode_image(good, "ok.dcm"))[..., 0].ravel(), np.rint(np.arange(16) * 17))
    transfer_syntax = b"\x02\x00\x10\x00UI"
    cases = {f"cut at {n}": good[:n] for n in range(132, len(good))}
    cases |= {f"length {n}": with_length(good, transfer_syntax, n) for n in range(0, 400, 3)}
    cases |= malformed_dicoms()
    reasons = set()
    for label, data in cases.items():
        try:
            assert decode_image(data, "scan.dcm").mode == "RGB", label
        except ImageLoadError as err:
            reasons.add(err.reason)
    assert "corrupt or unsupported DICOM (BytesLengthException)" in reasons
    assert all("DICOM" in reason for reason in reasons), reasons


# ---------------------------------------------------------------- bytes, data URLs, digests


def test_decode_image_from_bytes(tmp_path, gradient):
    buffer = io.BytesIO()
    Image.fromarray(gradient).save(buffer, format="PNG")
    assert np.array_equal(pixels(decode_image(buffer.getvalue())), gradient)
    dicom = decode_image(dicom_file("CT_small.dcm").read_bytes(), "upload.bin")  # found by content
    assert pixel_digest(dicom) == pixel_digest(load_image(dicom_file("CT_small.dcm")))
    with pytest.raises(ImageLoadError, match="empty") as info:
        decode_image(b"", "scan.png")
    assert info.value.path == "scan.png"
    with pytest.raises(ImageLoadError, match="unsupported format"):
        decode_image(b"GIF89a not really")


def test_data_url_is_lossless_png(gradient):
    img = Image.fromarray(gradient)
    url = image_to_data_url(img)
    assert url.startswith("data:image/png;base64,")
    png = Image.open(io.BytesIO(base64.b64decode(url.removeprefix(DATA_URL_PREFIX))))
    assert png.format == "PNG" and np.array_equal(np.asarray(png.convert("RGB")), gradient)
    assert pixel_digest(decode_data_url(url)) == pixel_digest(img)
    for bad in ("http://example.invalid/x.png", "data:image/png;base64,@@@"):
        with pytest.raises(ImageLoadError):
            decode_data_url(bad)


def test_pixel_digest_depends_on_pixels_only(tmp_path, gradient):
    Image.fromarray(gradient).save(tmp_path / "a.png")
    Image.fromarray(gradient).save(tmp_path / "a.bmp")
    digest = pixel_digest(load_image(tmp_path / "a.png"))
    assert len(digest) == 64 and digest == pixel_digest(load_image(tmp_path / "a.bmp"))
    changed = gradient.copy()
    changed[0, 0, 0] ^= 1
    assert pixel_digest(Image.fromarray(changed)) != digest
    # Same bytes, other shape: the size is part of the digest.
    assert pixel_digest(Image.fromarray(gradient.reshape(64, 48, 3))) != digest
    grey = Image.fromarray(gradient[..., 0])
    assert pixel_digest(grey) == pixel_digest(grey.convert("RGB"))


# tests/stmed/data/test_images.py -> parents[4] is the folder holding the repo and shared/.
VQA_RAD_IMAGES = Path(__file__).resolve().parents[4] / "shared" / "benchmarks" / "vqa_rad" / "images"


@pytest.mark.skipif(not VQA_RAD_IMAGES.is_dir(), reason="shared VQA-RAD images not present")
def test_real_vqa_rad_images_load():
    from stmed.data.records import list_images, sample_images

    paths = sample_images(list_images(VQA_RAD_IMAGES), 20, seed=0)
    assert len(paths) == 20
    for path in paths:
        img = load_image(path)
        with Image.open(path) as source:
            assert img.size == source.size and img.mode == "RGB" and img.info == {}
            assert np.array_equal(pixels(img), np.asarray(source.convert("RGB")))
