"""The endpoint client: the pipeline's checked request, and the snippets it prints for users."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
from PIL import Image

from stmed.serve.client import Request, ask, first_benchmark_request, snippets


class _FakeEndpoint(BaseHTTPRequestHandler):
    """Answers /v1/vqa and /v1/chat/completions like jobs.serve does, and keeps what it was sent."""

    seen: ClassVar[list[tuple[str, bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.seen.append((self.path, body))
        if self.path == "/v1/vqa":
            reply = {"answer": "yes", "latency_ms": 1.5}
        else:
            reply = {"id": "c", "object": "chat.completion", "created": 0, "model": "m",
                     "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "no"}}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass


@pytest.fixture()
def image(tmp_path: Path) -> Path:
    path = tmp_path / "scan one.png"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path)
    return path


def test_ask_sends_the_question_both_ways(image: Path) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeEndpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        record = ask(url, "stmed-dpo", Request(image, "Is there a lesion?", "yes"), timeout_s=10)
    finally:
        server.shutdown()
    assert record["vqa_answer"] == "yes" and record["chat_answer"] == "no" and record["latency_ms"] == 1.5
    assert record["ground_truth"] == "yes" and record["image"] == str(image)
    (vqa_path, vqa_body), (chat_path, chat_body) = _FakeEndpoint.seen[-2:]
    assert vqa_path == "/v1/vqa" and b"Is there a lesion?" in vqa_body and image.read_bytes() in vqa_body
    chat = json.loads(chat_body)
    assert chat_path == "/v1/chat/completions" and chat["model"] == "stmed-dpo"
    parts = chat["messages"][0]["content"]
    assert parts[0] == {"type": "text", "text": "Is there a lesion?"}
    assert parts[1]["image_url"]["url"].startswith("data:image/png;base64,")


def test_first_benchmark_request(tmp_path: Path) -> None:
    rows = [{"id": 1, "image": "a.png", "answer_type": "CLOSED", "conversatons": [
        {"from": "human", "value": "<image>\nIs it a CT?"}, {"from": "gpt", "value": "no"}]}]
    (tmp_path / "test.json").write_text(json.dumps(rows))
    assert first_benchmark_request(tmp_path / "test.json", tmp_path / "images") == Request(
        tmp_path / "images" / "a.png", "Is it a CT?", "no")


def test_snippets_paste_and_run(image: Path) -> None:
    text = snippets("http://127.0.0.1:8000", "stmed-dpo", Request(image, "Is it 'left'?"))
    curl = text.splitlines()[0]
    assert curl == f"curl -s http://127.0.0.1:8000/v1/vqa -F image=@'{image}' -F question='Is it '\"'\"'left'\"'\"'?'"
    script = re.search(r"^python - <<'EOF'\n(.*)\nEOF$", text, re.DOTALL | re.MULTILINE).group(1)
    compile(script, "<snippet>", "exec")  # the heredoc body is valid Python as printed
    assert f"open({str(image)!r}, 'rb')" in script and "model='stmed-dpo'" in script
