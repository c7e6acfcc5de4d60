"""The fault drill's privacy rows (issue 29): what a judge actually received, checked at the receiving end
(``benchmarks/fault_drill.py`` runs them as its ``privacy`` section).

- Phantoms with fake identifiers burned in (``stmed.data.overlays``) go through the judge path: the Judge
  actor (which gates rows that arrive ungated, as the vLLM stream does) sends them to the offline reference
  judge on loopback, which keeps every image it receives. Tesseract then reads each received image at the
  identifier's known place and over the whole image: 0 identifiers may come back. The same reading of
  the originals is printed for scale.
- A judge URL outside ``judge.allowed_hosts`` is refused when the config is built, with no connection
  attempted (every socket connect in the process is counted).
- Benchmark images planted in a pool (resized, JPEG-recompressed, cropped) are removed before self-play,
  and the distinct pool images are kept.
"""

from __future__ import annotations

import asyncio
import io
import json
import random
import socket
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

Add = Callable[[str, str, str, str, bool], None]
IMAGES = 8


def _read(img: Image.Image, box: tuple[int, int, int, int] | None) -> str:
    from benchmarks.privacy_gate import read_crop

    return read_crop(img, box or (0, 0, img.width, img.height))


def row_judge_received(add: Add, work: Path) -> None:
    """Overlaid phantoms through the Judge actor to a loopback judge that keeps what it receives."""
    from actors.judge import Judge
    from benchmarks.privacy_gate import recovered
    from stmed.data.images import decode_data_url, image_to_data_url, load_image
    from stmed.data.synthetic import make_dataset
    from stmed.judge import reference
    from stmed.judge.judging import JudgeSettings

    paths = make_dataset(work / "data", num_images=IMAGES + 2, seed=3, test_images=2, overlay_share=1.0)

    truth = json.loads(paths.overlays.read_text())
    received: list[str] = []
    parse = reference.parse_request

    def keeping(body):  # the receiving end: every image URL in a request, as it arrived
        for message in (body or {}).get("messages", []):
            for part in message.get("content") if isinstance(message.get("content"), list) else []:
                if isinstance(part, dict) and part.get("type") == "image_url":
                    received.append(part["image_url"]["url"])
        return parse(body)

    reference.parse_request = keeping
    try:
        with reference.start_server(paths.findings) as server:
            judge = Judge(JudgeSettings(base_url=server.url, model="stmed-reference-judge", max_in_flight=4))
            names = sorted(truth)
            batch = {"pair_id": np.array([f"p{n}" for n in range(len(names))], dtype=object),
                     "question": np.array(["Is there a lesion?"] * len(names), dtype=object),
                     "answer1": np.array(["Yes."] * len(names), dtype=object),
                     "answer2": np.array(["No."] * len(names), dtype=object),
                     "image_data_url": np.array([image_to_data_url(load_image(paths.images / n)) for n in names],
                                                dtype=object)}

            async def judged() -> dict:
                try:
                    return await judge(batch)
                finally:
                    await judge.client.close()

            out = asyncio.run(judged())
    finally:
        reference.parse_request = parse
    by_digest = {}
    for url in received:
        by_digest.setdefault(url, decode_data_url(url))
    sent = list(by_digest.values())
    idents = [(name, o) for name in sorted(truth) for o in truth[name] if o["kind"] != "laterality"]
    orig_read = sum(recovered(o["text"], _read(load_image(paths.images / name), tuple(o["box"])))
                    for name, o in idents)
    # Each received image read whole and at every identifier's place (the judge does not say which
    # image is which: every identifier is looked for in every received image).
    readings = [_read(img, None) for img in sent] + [_read(img, tuple(o["box"])) for img in sent for _, o in idents]
    back = sum(any(recovered(o["text"], r) for r in readings) for _, o in idents)
    actions = sorted({str(a) for a in out["gate_action"]})
    add("privacy", f"{len(names)} phantoms with {len(idents)} fake identifiers through the Judge actor to a "
        "loopback judge that keeps what it receives; Tesseract on the received images",
        "0 identifiers recovered", f"{back} of {len(idents)} recovered from {len(sent)} received images "
        f"(originals: {orig_read}); gate actions {actions}", back == 0 and len(sent) > 0)


def row_host_refused(add: Add) -> None:
    """A judge URL outside judge.allowed_hosts: refused at config time, before any connection."""
    from stmed.config import ConfigError, build_config
    from stmed.judge.judging import JudgeSettings

    connects = []
    real = socket.socket.connect

    def counting(self, address):
        connects.append(address)
        return real(self, address)

    socket.socket.connect = counting
    try:
        build_config(JudgeSettings, {"base_url": "https://judge.example.org/v1"}, ["allowed_hosts=[api.openai.com]"])
        message = "accepted"
    except ConfigError as err:
        message = str(err)
    finally:
        socket.socket.connect = real
    ok = "judge.allowed_hosts" in message and "\n" not in message and not connects
    add("privacy", "judge.base_url=https://judge.example.org/v1 with allowed_hosts [api.openai.com]",
        "refused before any request, one line naming judge.allowed_hosts",
        f"{len(connects)} connections; {message[:90]}", ok)


def row_planted_duplicates(add: Add, work: Path) -> None:
    """Benchmark images planted in a pool (resized, JPEG, cropped) are removed, distinct ones kept."""
    from stmed.data.synthetic import Findings, render_phantom
    from stmed.privacy.contamination import ContaminationSettings, remove_benchmark_copies

    bench, pool = work / "bench", work / "pool"
    bench.mkdir(parents=True)
    pool.mkdir()
    kinds = [Findings(m, o, False) for m in ("ct", "mri", "x-ray") for o in ("brain", "chest", "abdomen")]
    originals = [render_phantom(f, np.random.default_rng([1, i]), 64) for i, f in enumerate(kinds[:3])]
    for i, img in enumerate(originals):
        img.save(bench / f"b{i}.png")
    originals[0].resize((96, 96), Image.Resampling.BICUBIC).save(pool / "planted-resized.png")
    buffer = io.BytesIO()
    originals[1].save(buffer, format="JPEG", quality=60)
    (pool / "planted-jpeg.jpg").write_bytes(buffer.getvalue())
    originals[2].crop((3, 2, 61, 60)).save(pool / "planted-cropped.png")
    for i, f in enumerate(kinds[3:7]):
        render_phantom(f, np.random.default_rng([2, i]), 64).save(pool / f"distinct{i}.png")
    rows = [{"image_id": p.name, "image_path": str(p)} for p in sorted(pool.iterdir())]
    kept, counts = remove_benchmark_copies(rows, ContaminationSettings(benchmarks=[str(bench)]),
                                           work / "contamination.jsonl")
    kept_ids = {r["image_id"] for r in kept}
    planted_left = sorted(i for i in kept_ids if i.startswith("planted"))
    distinct_lost = 4 - sum(i.startswith("distinct") for i in kept_ids)
    add("privacy", "3 benchmark images planted in a pool of 7 (resized 1.5x, JPEG q60, cropped 9%)",
        "3 removed and listed, 4 distinct kept", f"removed {counts['removed']}, planted left {planted_left}, "
        f"distinct removed {distinct_lost}", not planted_left and distinct_lost == 0)


def privacy_rows(add: Add, work: Path, quick: bool) -> None:
    work.mkdir(parents=True, exist_ok=True)
    random.seed(0)
    row_judge_received(add, work / "received")
    row_host_refused(add)
    row_planted_duplicates(add, work / "guard")
