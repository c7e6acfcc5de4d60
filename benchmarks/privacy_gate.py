"""What the burned-in-text gate and the contamination guard achieve, measured (issue 29's targets).

    .venv/bin/python benchmarks/privacy_gate.py --images 200 --vqa-rad /work/shared/benchmarks/vqa_rad

Phantoms (``stmed.data.synthetic``) with one fake identifier each (``stmed.data.overlays``: heights
8-14 px, three fonts, six positions, 70-200 grey levels of contrast) and as many clean ones go through
``stmed.privacy.gate.TextGate`` with the default settings. Printed:
- detection recall: overlays at least half covered by a masked region, by text height;
- recoverable identifiers: Tesseract run on a crop around each overlay's known box in what the judge
  would receive (and, for scale, in the original), an identifier counted when 4 of its characters in a
  row are read back;
- clean phantoms masked, and real VQA-RAD test images masked (they carry real "L"/"R" markers);
- the gate's cost per image in milliseconds;
- the contamination guard on VQA-RAD: resized, JPEG-recompressed and cropped (<= 10%) copies found, and
  false matches among the distinct images; the same among distinct phantoms.
"""

from __future__ import annotations

import argparse
import io
import random
import re
import subprocess
import time
from pathlib import Path

import numpy as np
from PIL import Image

from stmed.data.images import decode_data_url, load_image
from stmed.data.overlays import IDENTIFIER_KINDS, draw_overlay
from stmed.data.records import list_images
from stmed.data.synthetic import _sample_findings, render_phantom
from stmed.privacy.contamination import BenchmarkIndex, ContaminationSettings
from stmed.privacy.gate import MASKED, PrivacySettings, TextGate


def phantoms(n: int, seed: int) -> list[Image.Image]:
    return [render_phantom(f, np.random.default_rng([seed, i]), 64)
            for i, f in enumerate(_sample_findings(n, random.Random(f"bench:{seed}")))]


def read_crop(img: Image.Image, box: tuple[int, int, int, int]) -> str:
    """Tesseract's reading of the region around ``box``, enlarged 8x, as it is and inverted."""
    x0, y0, x1, y1 = box
    crop = img.convert("L").crop((max(0, x0 - 3), max(0, y0 - 3), min(img.width, x1 + 3), min(img.height, y1 + 3)))
    big = crop.resize((crop.width * 8, crop.height * 8), Image.Resampling.LANCZOS)
    text = ""
    for page in (big, Image.eval(big, lambda v: 255 - v)):
        framed = Image.new("L", (page.width + 64, page.height + 64), int(np.median(np.asarray(page))))
        framed.paste(page, (32, 32))
        buf = io.BytesIO()
        framed.save(buf, format="PNG")
        done = subprocess.run(["tesseract", "stdin", "stdout", "--psm", "7"], input=buf.getvalue(),
                              capture_output=True, check=False)
        text += " " + done.stdout.decode("utf-8", "replace")
    return re.sub(r"[^A-Z0-9]", "", text.upper())


def recovered(identifier: str, read: str) -> bool:
    ident = re.sub(r"[^A-Z0-9]", "", identifier.upper())
    return any(ident[i:i + 4] in read for i in range(max(1, len(ident) - 3)))


def covered(result_url: str | None, original: Image.Image, box: tuple[int, int, int, int], fill: int,
            mask_fill: int = PrivacySettings().mask_fill) -> bool:
    """At least half of the text's ink pixels are gone from what is sent (or nothing was sent): changed, or
    inside a masked area. Inside means the 5x5 square around the pixel is all ``mask_fill``: a region is
    filled with a margin of 2, and black text (fill 0) masked in black keeps its grey level."""
    if result_url is None:
        return True
    sent = np.asarray(decode_data_url(result_url))[..., 0]
    filled = np.pad(sent == mask_fill, 2, mode="edge")
    inside = np.ones(sent.shape, bool)
    for dy in range(5):
        for dx in range(5):
            inside &= filled[dy:dy + sent.shape[0], dx:dx + sent.shape[1]]
    x0, y0, x1, y1 = box
    ink = np.asarray(original)[y0:y1, x0:x1, 0] == fill
    gone = (sent[y0:y1, x0:x1] != fill) | inside[y0:y1, x0:x1]
    return bool(gone[ink].mean() >= 0.5)


def gate_figures(args: argparse.Namespace) -> None:
    rng = random.Random(1)
    clean = phantoms(args.images, 7)
    overlaid, truth = [], []
    for n, img in enumerate(phantoms(args.images, 3)):
        out, overlay = draw_overlay(img, IDENTIFIER_KINDS[n % 4], rng, height=8 + n % 7)
        overlaid.append(out)
        truth.append(overlay)
    settings = PrivacySettings(detector=args.detector, ocr_min_confidence=args.min_confidence,
                               text_confidence=args.text_confidence, text_min_chars=args.text_min_chars)
    gate = TextGate(settings)
    start = time.perf_counter()
    results = gate.check(overlaid)
    cost_ms = (time.perf_counter() - start) / len(overlaid) * 1000
    clean_results = TextGate(settings).check(clean)
    by_height: dict[int, list[bool]] = {}
    for img, overlay, result in zip(overlaid, truth, results):
        by_height.setdefault(overlay.height, []).append(covered(result.data_url, img, overlay.box, overlay.fill))
    hits = [h for v in by_height.values() for h in v]
    print(f"gate: detector={args.detector} (tesseract's min confidence {args.min_confidence:g}; text_confidence "
          f"{args.text_confidence:g}, text_min_chars {args.text_min_chars}), {len(overlaid)} "
          "phantoms with an identifier, "
          f"{len(clean)} clean; {cost_ms:.0f} ms per image")
    print(f"  detection recall (>= 8 px): {sum(hits)}/{len(hits)} = {100 * sum(hits) / len(hits):.1f}%; by height: "
          + ", ".join(f"{h}px {sum(v)}/{len(v)}" for h, v in sorted(by_height.items())))
    masked_clean = sum(r.action == MASKED for r in clean_results)
    print(f"  clean phantoms masked: {masked_clean}/{len(clean)} = {100 * masked_clean / len(clean):.1f}%")
    read_sent = read_orig = 0
    for img, overlay, result in zip(overlaid, truth, results):
        sent = decode_data_url(result.data_url) if result.data_url else None
        read_orig += recovered(overlay.text, read_crop(img, overlay.box))
        read_sent += bool(sent) and recovered(overlay.text, read_crop(sent, overlay.box))
    print(f"  identifiers recoverable by OCR at their known place: originals {read_orig}/{len(truth)}, "
          f"what the judge receives {read_sent}/{len(truth)}")
    if args.vqa_rad:
        real = [load_image(p) for p in list_images(Path(args.vqa_rad) / "images")]
        start = time.perf_counter()
        real_results = TextGate(settings).check(real)
        ms = (time.perf_counter() - start) / len(real) * 1000
        masked = sum(r.action == MASKED for r in real_results)
        regions = sum(r.regions for r in real_results)
        print(f"  VQA-RAD test images masked: {masked}/{len(real)}, {regions} regions ({ms:.0f} ms per image)")
        if args.save_masked:  # to look at: what was masked on real images
            out = Path(args.save_masked)
            out.mkdir(parents=True, exist_ok=True)
            for path, result in zip(list_images(Path(args.vqa_rad) / "images"), real_results):
                if result.data_url:
                    decode_data_url(result.data_url).save(out / f"{Path(path).stem}.png")


def copies(img: Image.Image, rng: random.Random) -> dict[str, Image.Image]:
    w, h = img.size
    scale = rng.uniform(0.5, 1.5)
    resized = img.resize((max(16, round(w * scale)), max(16, round(h * scale))), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=rng.randint(50, 90))
    jpeg = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    keep = 1 - rng.uniform(0.0, 0.1)
    cw, ch = round(w * keep), round(h * keep)
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    return {"resized": resized, "jpeg": jpeg, "cropped": img.crop((x, y, x + cw, y + ch))}


def guard_figures(name: str, images: dict[str, Image.Image], distinct: dict[str, Image.Image],
                  max_distance: int) -> None:
    index = BenchmarkIndex.build(images)
    rng = random.Random(5)
    found: dict[str, list[bool]] = {}
    for key, img in images.items():
        for kind, copy in copies(img, rng).items():
            owner, distance = index.nearest(copy)
            found.setdefault(kind, []).append(owner == key and distance <= max_distance)
    false = sum(index.nearest(img)[1] <= max_distance for img in distinct.values())
    total = sum(len(v) for v in found.values())
    hit = sum(sum(v) for v in found.values())
    print(f"guard on {name}: {len(images)} benchmark images, max_distance={max_distance}: planted copies found "
          f"{hit}/{total} ({', '.join(f'{k} {sum(v)}/{len(v)}' for k, v in found.items())}); "
          f"false matches among {len(distinct)} distinct images: {false}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--detector", choices=("dbnet", "tesseract"), default=PrivacySettings().detector)
    parser.add_argument("--min-confidence", type=float, default=PrivacySettings().ocr_min_confidence)
    parser.add_argument("--text-confidence", type=float, default=PrivacySettings().text_confidence)
    parser.add_argument("--text-min-chars", type=int, default=PrivacySettings().text_min_chars)
    parser.add_argument("--save-masked", default=None, help="write what the judge would receive of VQA-RAD here")
    parser.add_argument("--vqa-rad", default=None, help="a VQA-RAD folder with images/ (read, never copied)")
    parser.add_argument("--max-distance", type=int, default=ContaminationSettings().max_distance)
    args = parser.parse_args()
    gate_figures(args)
    ph = phantoms(2 * args.images, 11)
    guard_figures("phantoms", {f"p{i}": im for i, im in enumerate(ph[: args.images])},
                  {f"q{i}": im for i, im in enumerate(ph[args.images:])}, args.max_distance)
    if args.vqa_rad:
        real = {p: load_image(p) for p in list_images(Path(args.vqa_rad) / "images")}
        keys = list(real)
        half = len(keys) // 2
        guard_figures("VQA-RAD", {k: real[k] for k in keys[:half]}, {k: real[k] for k in keys[half:]},
                      args.max_distance)


if __name__ == "__main__":
    main()
