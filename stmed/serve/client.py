"""A client's view of the served VQA model: one checked request, and how a user sends their own.

The endpoint (``jobs.serve``) answers ``POST /v1/vqa`` (multipart image + question: what ``curl -F``
sends) and ``POST /v1/chat/completions`` (the OpenAI shape: the ``openai`` SDK is a client). ``ask``
sends the same question both ways, so the snippets ``snippets`` prints are known to work.
"""

from __future__ import annotations

import base64
import json
import mimetypes
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from stmed.log import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class Request:
    image: Path
    question: str
    ground_truth: str | None = None


def first_benchmark_request(test_file: str | Path, image_root: str | Path) -> Request:
    """The first question of a LLaVA-Med benchmark file, with its image and ground truth."""
    rows = json.loads(Path(test_file).read_text())
    if not rows:
        raise ValueError(f"{test_file}: no questions to take a request from")
    turns = rows[0].get("conversations") or rows[0]["conversatons"]
    question = turns[0]["value"].replace("<image>", "").strip()
    return Request(Path(image_root) / rows[0]["image"], question, turns[1]["value"])


def data_url(image: Path) -> str:
    mime = mimetypes.guess_type(image.name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(image.read_bytes()).decode()}"


def ask(url: str, model: str, request: Request, api_key: str = "unused", timeout_s: float = 300.0) -> dict[str, Any]:
    """Send ``request`` through /v1/vqa and through the openai SDK; the answers and the request, as a record."""
    import httpx
    import openai

    with request.image.open("rb") as fh:
        reply = httpx.post(f"{url}/v1/vqa", files={"image": (request.image.name, fh)},
                           data={"question": request.question}, timeout=timeout_s,
                           headers={"Authorization": f"Bearer {api_key}"})  # fmt: skip
    reply.raise_for_status()
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, timeout=timeout_s)
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": [
        {"type": "text", "text": request.question},
        {"type": "image_url", "image_url": {"url": data_url(request.image)}}]}])  # fmt: skip
    body = reply.json()
    record = {"url": url, "model": model, **asdict(request), "image": str(request.image),
              "vqa_answer": body["answer"], "latency_ms": body.get("latency_ms"),
              "chat_answer": chat.choices[0].message.content}
    log.info("%s answered %r with %r (ground truth %r)", url, request.question, record["vqa_answer"],
             request.ground_truth)
    return record


def snippets(url: str, model: str, request: Request) -> str:
    """A ``curl`` line and an ``openai`` SDK script that send ``request`` to the endpoint at ``url``."""
    image, question = str(request.image), request.question
    mime = mimetypes.guess_type(image)[0] or "image/png"
    # Unindented: the heredoc's EOF and the Python lines must start at column 0 to paste and run.
    return "\n".join([
        f"curl -s {url}/v1/vqa -F image=@{shlex.quote(image)} -F question={shlex.quote(question)}",
        "python - <<'EOF'",
        "import base64, openai",
        f"client = openai.OpenAI(base_url={url + '/v1'!r}, api_key='unused')",
        f"image = 'data:{mime};base64,' + base64.b64encode(open({image!r}, 'rb').read()).decode()",
        f"reply = client.chat.completions.create(model={model!r}, messages=[{{'role': 'user', 'content': [",
        f"    {{'type': 'text', 'text': {question!r}}}, {{'type': 'image_url', 'image_url': {{'url': image}}}}]}}])",
        "print(reply.choices[0].message.content)",
        "EOF",
    ])
