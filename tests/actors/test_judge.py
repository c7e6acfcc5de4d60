"""The Judge actor: called directly on a batch (no Ray), and under Ray Data's actor pool against a real
loopback HTTP endpoint."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from actors.judge import INPUT_COLUMNS, Judge
from stmed.judge.judging import JudgeSettings, JudgeVerdict


def png_data_url() -> str:
    """A small, decodable, text-free image: the privacy gate in front of the judge refuses what it cannot read."""
    buffer = io.BytesIO()
    Image.new("L", (32, 32), 90).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


IMAGE = png_data_url()


def reply_for(body: dict) -> str:
    """Scores by content: an answer naming the nodule gets 9, any other 4; a question about 'noise'
    gets a garbled reply."""
    text = body["messages"][0]["content"][0]["text"]
    if "noise" in text.split("[Answer 1]")[0]:
        return "I cannot decide."
    first = text.split("[Answer 1]\n")[1].split("\n\n[End Answer 1]")[0]
    second = text.split("[Answer 2]\n")[1].split("\n\n[End Answer 2]")[0]
    return " ".join("9" if "nodule" in a else "4" for a in (first, second)) + "\nexplained"


def completion_body(body: dict) -> dict:
    return {
        "id": "cmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": reply_for(body)}}],
        "usage": {"prompt_tokens": 800, "completion_tokens": 10, "total_tokens": 810},
    }


def batch_of(rows: list[dict]) -> dict[str, np.ndarray]:
    return {name: np.array([row[name] for row in rows]) for name in rows[0]}


ROWS = [
    {"pair_id": "p0", "question": "Is there a nodule?", "answer1": "Yes, a nodule.", "answer2": "No.",
     "image_data_url": IMAGE, "seed": 1},
    {"pair_id": "p1", "question": "What is seen?", "answer1": "Nothing.", "answer2": "A nodule.",
     "image_data_url": IMAGE, "seed": 2},
    {"pair_id": "p2", "question": "Any noise?", "answer1": "Yes.", "answer2": "No.",
     "image_data_url": IMAGE, "seed": 3},
]


def test_judge_called_directly_scores_a_batch_and_reuses_the_cache(tmp_path: Path):
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(200, json=completion_body(json.loads(request.content)))

    settings = JudgeSettings(base_url="http://127.0.0.1:9/v1", model="judge", cache_dir=str(tmp_path),
                             parse_retries=0)
    judge = Judge(settings, http_client=httpx.AsyncClient(transport=httpx.MockTransport(handler)))

    async def twice() -> tuple[dict, dict]:
        return await judge(batch_of(ROWS)), await judge(batch_of(ROWS))

    first, second = asyncio.run(twice())
    assert "image_data_url" not in first and list(first["seed"]) == [1, 2, 3]
    assert list(first["pair_id"]) == ["p0", "p1", "p2"]
    assert list(first["score1"][:2]) == [9.0, 4.0] and list(first["score2"][:2]) == [4.0, 9.0]
    assert first["score1"][2] is None and first["score2"][2] is None
    assert first["error"][2].startswith("parse:") and list(first["error"][:2]) == [None, None]
    assert list(first["attempts"]) == [1, 1, 1] and not any(first["cached"])
    # The rerun pays only for the pair that failed: the two judged ones come from the cache.
    assert len(requests) == 4
    assert list(second["cached"]) == [True, True, False] and list(second["attempts"]) == [0, 0, 1]
    assert JudgeVerdict.from_row({k: v[0] for k, v in second.items()}).score1 == 9.0


def test_judge_names_a_missing_column():
    judge = Judge({"base_url": "http://127.0.0.1:9/v1"})
    batch = batch_of(ROWS)
    del batch["answer2"]
    with pytest.raises(ValueError, match=r"\['answer2'\]"):
        asyncio.run(judge(batch))
    assert set(INPUT_COLUMNS) - set(batch) == {"answer2"}


class _Handler(BaseHTTPRequestHandler):
    count = 0
    lock = threading.Lock()

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with _Handler.lock:
            _Handler.count += 1
        payload = json.dumps(completion_body(body)).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:  # keep pytest output clean
        pass


@pytest.fixture
def judge_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_judge_under_ray_data_actor_pool(ray_session, judge_url: str):
    import ray

    _Handler.count = 0
    settings = JudgeSettings(base_url=judge_url, model="judge", parse_retries=0, max_in_flight=4)
    ds = ray.data.from_items(ROWS * 2).map_batches(
        Judge,
        fn_constructor_kwargs={"settings": settings, "num_actors": 1},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=1),
        batch_size=2,
    )
    rows = sorted(ds.take_all(), key=lambda r: (r["pair_id"], r["seed"]))
    assert len(rows) == 6 and _Handler.count == 6
    assert all("image_data_url" not in row for row in rows)
    by_id = {row["pair_id"]: row for row in rows}
    assert (by_id["p0"]["score1"], by_id["p0"]["score2"], by_id["p0"]["error"]) == (9.0, 4.0, None)
    assert (by_id["p1"]["score1"], by_id["p1"]["score2"]) == (4.0, 9.0)
    failed = [row for row in rows if row["pair_id"] == "p2"]
    assert all(row["score1"] is None and row["error"].startswith("parse:") for row in failed)


def test_a_large_batch_holds_request_bodies_only_for_requests_in_flight(monkeypatch):
    """40 rows, 2 in flight: the rows come back in order, and no more than 2 requests' messages (each
    with the base64 image) exist at once, however many rows wait."""
    from stmed.judge import judging

    live, peak = 0, 0
    build = judging.build_judge_messages

    def counting_build(*args):
        nonlocal live, peak
        live += 1
        peak = max(peak, live)
        return build(*args)

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal live
        await asyncio.sleep(0.005)
        live -= 1
        return httpx.Response(200, json=completion_body(json.loads(request.content)))

    monkeypatch.setattr(judging, "build_judge_messages", counting_build)
    settings = JudgeSettings(base_url="http://127.0.0.1:9/v1", model="judge", max_in_flight=2)
    judge = Judge(settings, http_client=httpx.AsyncClient(transport=httpx.MockTransport(handler)))
    rows = [{**ROWS[i % 2], "pair_id": f"p{i}", "seed": i} for i in range(40)]
    out = asyncio.run(judge(batch_of(rows)))
    assert list(out["pair_id"]) == [f"p{i}" for i in range(40)] and list(out["seed"]) == list(range(40))
    assert list(out["score1"]) == [9.0, 4.0] * 20 and all(e is None for e in out["error"])
    assert peak <= 2 and live == 0
