"""Images as the model sees them: pixels only, RGB, whatever file they came from.

Every image the project touches (instruction data, benchmark files, uploads to the server) goes
through ``load_image`` / ``decode_image``. They read JPEG, PNG, TIFF, BMP and DICOM and return a
*fresh* ``PIL.Image`` in RGB built from the pixel array alone: no EXIF, no ``info`` dict and, for
DICOM, none of the tags — so patient data cannot leak into logs, the judge's requests or
exported files. A bad file of any kind raises one typed error, ``ImageLoadError`` (``ImageSizeError``
for one over a size limit), naming the file and the kind of problem; callers record it as a skip
instead of crashing a long job. Whatever PIL or pydicom raise is re-raised typed, and their own texts
go nowhere: pydicom's warnings and log lines quote raw header bytes (patient name, ID, birth date) of a
malformed file, so they are silenced while a DICOM is read, and an error names only the exception's
type, never its message. Sizes are checked from the header, before any pixel is decoded: the pixel
count, each side, and the aspect ratio (a 2 KB PNG can declare 1,600,000 x 1 pixels, which a model's
image processor would then scale to gigapixels).

DICOM pixels are turned into a displayable picture the way a viewer would: modality LUT (rescale
slope/intercept) → VOI window (WindowCenter/WindowWidth, else the min-max range) → MONOCHROME1
inversion → 8-bit grey replicated to RGB. Multi-frame files give their middle frame.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import logging
import os
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    from pydicom import Dataset

# A 8k x 8k scan is 67M pixels; PIL's own bomb limit (~89M) would still fire above this.
DEFAULT_MAX_PIXELS = 8192 * 8192
# Longest side: stitched full-spine radiographs and slide thumbnails stay far below it.
DEFAULT_MAX_SIDE = 16384
# Long side / short side. Real scans stay under ~5:1; the model's processor scales the short side up
# to its input size, so a 400000x4 image would become 33 million pixels wide.
DEFAULT_MAX_ASPECT = 20.0
# Formats PIL may open for us; anything else (GIF, WebP, PSD...) is refused by content, not suffix.
PIL_FORMATS = ("JPEG", "PNG", "TIFF", "BMP")
SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".dcm", ".dicom")
DICOM_SUFFIXES = (".dcm", ".dicom")
DATA_URL_PREFIX = "data:image/png;base64,"

# Held while a third-party parser runs under `warnings.catch_warnings`, which swaps process-wide state:
# two threads (the server decodes uploads in a thread pool) interleaving it would leave it wrong. PIL
# holds it for the header only; DICOM reads hold it throughout, so they run one at a time per process.
_WARNINGS_LOCK = threading.Lock()


class ImageLoadError(ValueError):
    """An image that cannot be used: missing, empty, corrupt, unsupported or too large.

    ``reason`` names the kind of problem only; it never holds a value read from the file.
    """

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot load image {self.path}: {reason}")


class ImageSizeError(ImageLoadError):
    """An image over a size limit, found from its header before decoding; ``limit`` names which one
    (``max_pixels``, ``max_side`` or ``max_aspect``)."""

    def __init__(self, path: str | os.PathLike, reason: str, limit: str):
        super().__init__(path, reason)
        self.limit = limit


@dataclass(frozen=True)
class _Limits:
    max_pixels: int
    max_side: int
    max_aspect: float


def load_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int = DEFAULT_MAX_SIDE,
               max_aspect: float = DEFAULT_MAX_ASPECT) -> Image.Image:
    """Read an image file into a fresh RGB image (pixels only) or raise ``ImageLoadError``."""
    path = Path(path)
    try:
        if not path.is_file():
            raise ImageLoadError(path, "is a directory" if path.is_dir() else "file not found")
        if path.stat().st_size == 0:
            raise ImageLoadError(path, "empty file")
        with path.open("rb") as fh:
            return _decode(fh, str(path), _Limits(max_pixels, max_side, max_aspect))
    except ImageLoadError:
        raise
    except OSError as exc:  # unreadable file: permissions, I/O error (the OS's words, not the file's)
        raise ImageLoadError(path, f"cannot read file: {exc.strerror or type(exc).__name__}") from None


def decode_image(data: bytes, name: str = "<upload>", max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_side: int = DEFAULT_MAX_SIDE, max_aspect: float = DEFAULT_MAX_ASPECT) -> Image.Image:
    """``load_image`` for bytes already in memory (uploads, data URLs); ``name`` is used in errors."""
    if not data:
        raise ImageLoadError(name, "empty file")
    return _decode(io.BytesIO(data), name, _Limits(max_pixels, max_side, max_aspect))


def image_to_data_url(img: Image.Image) -> str:
    """A ``data:image/png;base64,...`` URL of the image's RGB pixels (lossless, no metadata)."""
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    fresh = Image.frombytes("RGB", rgb.size, rgb.tobytes())  # drops info/EXIF the caller may carry
    buffer = io.BytesIO()
    fresh.save(buffer, format="PNG")
    return DATA_URL_PREFIX + base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_data_url(url: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The inverse of ``image_to_data_url`` for any base64 image data URL (the judge receives these)."""
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:image/") or not header.endswith(";base64"):
        raise ImageLoadError("<data url>", "not a base64 image data URL")
    try:
        data = base64.b64decode(payload, validate=True)
    except binascii.Error as exc:
        raise ImageLoadError("<data url>", f"invalid base64: {exc}") from exc
    return decode_image(data, "<data url>", max_pixels)


def pixel_digest(img: Image.Image) -> str:
    """sha256 over mode, size and raw RGB bytes: the same pixels give the same digest, any container."""
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    digest = hashlib.sha256(f"RGB:{rgb.width}x{rgb.height}:".encode())
    digest.update(rgb.tobytes())
    return digest.hexdigest()


def burned_in_annotation(path: str | os.PathLike) -> bool:
    """True when a DICOM file declares text burned into its pixels (Burned In Annotation (0028,0301) =
    YES); False for other files and for DICOMs without the attribute. Reads the header only, silenced
    like every DICOM read here; an unreadable header is False (``load_image`` reports it)."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
            if not is_dicom(head, path.name):
                return False
            fh.seek(0)
            import pydicom

            with _pydicom_silenced():
                ds = pydicom.dcmread(fh, stop_before_pixels=True, force=head[128:132] != b"DICM",
                                     specific_tags=[(0x0028, 0x0301)])
    except Exception:  # noqa: BLE001 - a bad header is load_image's to report; here it declares nothing
        return False
    return str(ds.get((0x0028, 0x0301)).value if (0x0028, 0x0301) in ds else "").strip().upper() == "YES"


def is_dicom(head: bytes, name: str = "") -> bool:
    """DICOM by content (``DICM`` after the 128-byte preamble) or, for preamble-less files, by suffix."""
    return head[128:132] == b"DICM" or name.lower().endswith(DICOM_SUFFIXES)


def _decode(fh: BinaryIO, name: str, limits: _Limits) -> Image.Image:
    head = fh.read(132)
    fh.seek(0)
    if is_dicom(head, name):
        return _decode_dicom(fh, name, limits, has_preamble=head[128:132] == b"DICM")
    return _decode_pil(fh, name, limits)


def _check_size(name: str, width: int, height: int, limits: _Limits) -> None:
    """Refuse what the header declares before decoding: pixel count, each side, aspect ratio."""
    if width < 1 or height < 1:
        raise ImageLoadError(name, f"image declares no pixels ({width}x{height})")
    if width * height > limits.max_pixels:
        raise ImageSizeError(name, f"too many pixels: {width}x{height} > max_pixels={limits.max_pixels}",
                             "max_pixels")
    if max(width, height) > limits.max_side:
        raise ImageSizeError(name, f"side too long: {width}x{height} has a side over max_side={limits.max_side}",
                             "max_side")
    if max(width, height) / min(width, height) > limits.max_aspect:
        raise ImageSizeError(name, f"extreme aspect ratio: {width}x{height} is over "
                             f"max_aspect={limits.max_aspect:g}:1", "max_aspect")


def _decode_pil(fh: BinaryIO, name: str, limits: _Limits) -> Image.Image:
    try:
        with _WARNINGS_LOCK, warnings.catch_warnings():
            # PIL only *warns* between its limit and twice it; a bomb is a bad file, not a warning.
            # Image.open is the one place PIL runs that check, and it reads the header only.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(fh, formats=PIL_FORMATS)
    except UnidentifiedImageError:
        raise ImageLoadError(name, "unsupported format (expected JPEG, PNG, TIFF, BMP or DICOM)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageSizeError(name, "too many pixels: over PIL's decompression-bomb limit", "max_pixels") from None
    except Exception as exc:  # noqa: BLE001 - a parser of untrusted bytes: any failure is a bad file
        raise ImageLoadError(name, f"corrupt or truncated image ({type(exc).__name__})") from None
    with img:
        _check_size(name, img.width, img.height, limits)
        try:
            img.load()  # decode now, so a truncated file fails here and not in a later resize
            return _fresh_rgb(ImageOps.exif_transpose(img))
        except Exception as exc:  # noqa: BLE001 - PIL's decoders raise many types; the message is theirs
            raise ImageLoadError(name, f"corrupt or truncated image ({type(exc).__name__})") from None


def _fresh_rgb(img: Image.Image) -> Image.Image:
    """A new RGB image from the pixels alone; 16-bit and float grey are min-max scaled to 8 bits."""
    if img.mode.startswith("I") or img.mode == "F":
        # convert("RGB") would clip 16-bit values at 255 and turn most scans white.
        return _grey_to_rgb(_min_max(np.asarray(img, dtype=np.float32)))
    rgb = img.convert("RGB")
    return Image.frombytes("RGB", rgb.size, rgb.tobytes())


def _decode_dicom(fh: BinaryIO, name: str, limits: _Limits, has_preamble: bool) -> Image.Image:
    import pydicom  # deferred: only DICOM inputs pay for importing it

    with _pydicom_silenced():
        try:
            ds = pydicom.dcmread(fh, force=not has_preamble)
            if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
                raise ImageLoadError(name, "DICOM file has no pixel data")
            _check_size(name, int(ds.Columns), int(ds.Rows), limits)
            return _dicom_to_rgb(ds)
        except ImageLoadError:
            raise
        except Exception as exc:  # noqa: BLE001 - pydicom parses untrusted bytes; any failure is a bad file
            # Its messages quote raw element bytes (BytesLengthException, invalid-VR ValueErrors...), so
            # only the type goes on, and `from None` keeps them out of any traceback a caller logs.
            raise ImageLoadError(name, f"corrupt or unsupported DICOM ({type(exc).__name__})") from None


class _SilencedInThisThread(logging.Filter):
    """Drops the records of a thread that is reading a DICOM; other threads' pydicom logs pass."""

    def __init__(self) -> None:
        super().__init__()
        self.local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(self.local, "active", False)


_PYDICOM_FILTER = _SilencedInThisThread()


@contextmanager
def _pydicom_silenced() -> Iterator[None]:
    """No warning and no log line from pydicom while this thread reads a file.

    pydicom reports a malformed element (``warn_and_log``) with its raw value, which for a mangled
    header can be the rest of the dataset: patient name, ID, birth date, institution. Its loggers are
    ``pydicom`` and a few ``pydicom.*`` modules; a logger's filter does not see its children's records,
    so each one gets the filter (the list is re-read: decoder plugins add loggers when first used).
    """
    with _WARNINGS_LOCK, warnings.catch_warnings():
        names = list(logging.root.manager.loggerDict)  # one C-level copy: other threads may add loggers
        for logger_name in ["pydicom", *(n for n in names if n.startswith("pydicom."))]:
            logger = logging.getLogger(logger_name)
            if _PYDICOM_FILTER not in logger.filters:
                logger.addFilter(_PYDICOM_FILTER)
        warnings.simplefilter("ignore")
        _PYDICOM_FILTER.local.active = True
        try:
            yield
        finally:
            _PYDICOM_FILTER.local.active = False


def _dicom_to_rgb(ds: Dataset) -> Image.Image:
    from pydicom.pixels import apply_color_lut, apply_modality_lut, pixel_array

    frames = int(ds.get("NumberOfFrames") or 1)
    # Only the middle frame is decoded: a 500-frame cine would otherwise be decoded whole.
    arr = pixel_array(ds, index=frames // 2) if frames > 1 else pixel_array(ds)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    if arr.ndim == 3:  # colour; pydicom has already converted YBR to RGB
        return Image.fromarray(_colour_to_uint8(arr, ds))
    grey = _window(apply_modality_lut(arr, ds).astype(np.float32), ds)
    if photometric == "MONOCHROME1":  # MONOCHROME1 stores white as the lowest value
        grey = 255 - grey
    return _grey_to_rgb(grey)


def _colour_to_uint8(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr[..., :3])
    bits = int(ds.get("BitsStored") or arr.dtype.itemsize * 8)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "PALETTE COLOR":
        bits = arr.dtype.itemsize * 8  # colour LUT entries span their whole integer type
    scaled = arr[..., :3].astype(np.float32) * (255.0 / (2**bits - 1))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _window(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """DICOM linear VOI window (PS3.3 C.11.2.1.2.1) to uint8; min-max when the file has none."""
    center, width = _first_value(ds.get("WindowCenter")), _first_value(ds.get("WindowWidth"))
    if center is None or width is None or width < 1:
        return _min_max(values)
    if width == 1:  # a one-value window is a threshold
        return np.where(values > center - 0.5, 255, 0).astype(np.uint8)
    scaled = ((values - (center - 0.5)) / (width - 1) + 0.5) * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _first_value(value: object) -> float | None:
    """WindowCenter/Width may hold several alternatives; the first is the file's default."""
    if value is None or value == "":
        return None
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):  # pydicom's MultiValue
        return float(value[0]) if len(value) else None
    return float(value)


def _min_max(values: np.ndarray) -> np.ndarray:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros(values.shape, dtype=np.uint8)
    low, high = float(finite.min()), float(finite.max())
    if high == low:  # a flat image carries no contrast; black rather than divide by zero
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (np.nan_to_num(values, nan=low) - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _grey_to_rgb(grey: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(np.stack([grey] * 3, axis=-1), dtype=np.uint8))
