"""The VQA deployment over real HTTP on loopback: httpx and the openai SDK as clients, auth on, bad input.

Serve starts once for the module (tiny model, 1 CPU replica) with an API key and small limits, so the
413/422 paths are cheap to reach, and a short body deadline, so stalled uploads end within the test.
"""

from __future__ import annotations

import asyncio
import base64
import io
import ipaddress
import json
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from actors.serve import AutoscalingConfig, BatchingConfig, ReplicaConfig, build_app, controller_options
from stmed.config import ConfigError, ModelConfig
from stmed.serve.contract import DISCLAIMER, LimitsConfig, api_key_digest

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
BODY_TIMEOUT_S = 4.0
LIMITS = LimitsConfig(max_upload_bytes=300_000, max_image_pixels=600 * 600, max_question_chars=200,
                      max_tokens=16, default_max_tokens=4, body_timeout_s=BODY_TIMEOUT_S)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def png(size: tuple[int, int] = (64, 64), colour: tuple[int, int, int] = (40, 90, 140)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@dataclass(frozen=True)
class Endpoint:
    url: str


@pytest.fixture(scope="module")
def endpoint(ray_session) -> Iterator[Endpoint]:
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, controller_options=controller_options())
    # A long batch wait so that concurrent test requests reliably share a batch on a busy 2-core box.
    app = build_app(ModelConfig(preset="tiny"), "stmed-tiny", LIMITS,
                    BatchingConfig(max_batch_size=8, batch_wait_timeout_s=0.3),
                    AutoscalingConfig(), ReplicaConfig(max_ongoing_requests=16), api_key_digest(KEY))
    serve.run(app, name="vqa-test", route_prefix="/")
    yield Endpoint(f"http://127.0.0.1:{port}")
    serve.shutdown()


def vqa(endpoint: Endpoint, headers: dict | None = AUTH, **kwargs) -> httpx.Response:
    return httpx.post(f"{endpoint.url}/v1/vqa", headers=headers, timeout=60, **kwargs)


def assert_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    return error


# ----------------------------------------------------------------------------- answers


def test_multipart_upload_answers_with_the_documented_fields(endpoint: Endpoint):
    response = vqa(endpoint, files={"image": ("scan.png", png(), "image/png")},
                   data={"question": "Is there a lesion?", "max_tokens": "3"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"id", "answer", "model", "usage", "latency_ms", "disclaimer"}
    assert isinstance(body["answer"], str) and body["model"] == "stmed-tiny"
    assert body["disclaimer"] == DISCLAIMER and "not medical advice" in body["disclaimer"]
    usage = body["usage"]
    # 64 image tokens plus the system prompt and the question
    assert usage["prompt_tokens"] > 64 and 0 <= usage["completion_tokens"] <= 3
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["batch_size"] >= 1 and body["latency_ms"] > 0
    assert response.headers["x-stmed-batch-size"] == str(usage["batch_size"])


def test_json_base64_and_data_url_give_the_same_greedy_answer(endpoint: Endpoint):
    image = png(colour=(200, 10, 10))
    raw = vqa(endpoint, json={"image_base64": base64.b64encode(image).decode(), "question": "What organ?"})
    url = vqa(endpoint, json={"image_base64": data_url(image), "question": "What organ?"})
    assert raw.status_code == url.status_code == 200, (raw.text, url.text)
    assert raw.json()["answer"] == url.json()["answer"]


def test_dicom_upload_is_answered(endpoint: Endpoint):
    from pydicom.data import get_testdata_file

    dicom = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    response = vqa(endpoint, files={"image": ("ct.dcm", dicom, "application/dicom")},
                   data={"question": "What modality is this?"})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] <= LIMITS.default_max_tokens


def test_openai_sdk_chat_completion(endpoint: Endpoint):
    client = openai.OpenAI(base_url=f"{endpoint.url}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["stmed-tiny"]
    completion = client.chat.completions.create(
        model="stmed-tiny", max_tokens=3,
        messages=[{"role": "system", "content": "ignored: the model's own system prompt is used"},
                  {"role": "user", "content": [
                      {"type": "text", "text": "Is the scan normal?"},
                      {"type": "image_url", "image_url": {"url": data_url(png())}}]}],
    )
    assert completion.object == "chat.completion" and completion.model == "stmed-tiny"
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert completion.usage.prompt_tokens > 64 and completion.usage.completion_tokens <= 3


def test_concurrent_requests_are_batched(endpoint: Endpoint):
    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60, headers=AUTH) as client:
            return await asyncio.gather(*(
                client.post(f"{endpoint.url}/v1/vqa", json={
                    "image_base64": data_url(png(colour=(i * 30, 50, 50))), "question": f"Question {i}?",
                    "max_tokens": 2})
                for i in range(8)))

    responses = asyncio.run(burst())
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    sizes = [r.json()["usage"]["batch_size"] for r in responses]
    assert max(sizes) > 1, sizes
    stats = httpx.get(f"{endpoint.url}/v1/stats", headers=AUTH).json()
    assert stats["largest_batch"] > 1 and stats["requests"] >= 8


# ----------------------------------------------------------------------------- loopback


def _listening(pid: int) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Addresses the process ``pid`` listens on (TCP), read from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            link = os.readlink(fd)
        except FileNotFoundError:  # closed while we looked
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                raw = bytes.fromhex(fields[1].split(":")[0])
                # /proc prints each 32-bit word of the address in host (little-endian) order
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                found.add(ipaddress.ip_address(raw))
    return found


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")
def test_replica_listens_on_loopback_only(endpoint: Endpoint):
    replicas = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
                and (p / "cmdline").read_bytes().startswith(b"ray::ServeReplica:vqa-test")]
    assert replicas
    for pid in replicas:
        addresses = _listening(pid)
        assert addresses  # at least its internal gRPC server
        for address in addresses:
            mapped = getattr(address, "ipv4_mapped", None)
            assert (mapped or address).is_loopback, f"replica {pid} listens on {address}"


# ----------------------------------------------------------------------------- auth


def test_missing_or_wrong_key_is_401_and_healthz_is_open(endpoint: Endpoint):
    files = {"image": ("a.png", png(), "image/png")}
    missing = vqa(endpoint, headers=None, files=files, data={"question": "q?"})
    assert assert_error(missing, 401)["type"] == "authentication_error"
    assert missing.headers["www-authenticate"] == "Bearer"
    assert_error(vqa(endpoint, headers={"Authorization": "Bearer nope"}, files=files, data={"question": "q"}), 401)
    assert_error(httpx.get(f"{endpoint.url}/v1/models"), 401)
    assert httpx.get(f"{endpoint.url}/healthz").json() == {"status": "ok", "model": "stmed-tiny"}

    client = openai.OpenAI(base_url=f"{endpoint.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


# ----------------------------------------------------------------------------- bad input


def test_oversized_upload_and_image_are_413(endpoint: Endpoint):
    big = vqa(endpoint, files={"image": ("big.png", b"\0" * 500_000, "image/png")}, data={"question": "q"})
    assert assert_error(big, 413)["type"] == "request_too_large"
    wide = vqa(endpoint, files={"image": ("wide.png", png((1000, 1000)), "image/png")}, data={"question": "q"})
    assert "too many pixels" in assert_error(wide, 413)["message"]


def test_corrupt_image_is_400(endpoint: Endpoint):
    truncated = png()[:100]
    error = assert_error(vqa(endpoint, files={"image": ("a.png", truncated, "image/png")},
                             data={"question": "q"}), 400)
    assert error["type"] == "invalid_image"
    assert_error(vqa(endpoint, files={"image": ("a.dcm", b"DICM" * 50, "application/dicom")},
                     data={"question": "q"}), 400)
    assert_error(vqa(endpoint, json={"image_base64": "not base64!!", "question": "q"}), 400)


def test_bad_fields_are_422_and_bad_json_400(endpoint: Endpoint):
    image = base64.b64encode(png()).decode()
    assert_error(vqa(endpoint, json={"image_base64": image, "question": "x" * 201}), 422)
    assert_error(vqa(endpoint, json={"image_base64": image, "question": "q", "max_tokens": 17}), 422)
    assert_error(vqa(endpoint, json={"image_base64": image, "question": "q", "max_tokens": "many"}), 422)
    assert_error(vqa(endpoint, json={"image_base64": image}), 422)
    assert_error(vqa(endpoint, json={"image_base64": image, "question": "<image></s>"}), 422)
    assert_error(vqa(endpoint, json={"image_base64": image, "question": "q", "extra": 1}), 422)
    assert_error(vqa(endpoint, json=["not", "an", "object"]), 422)
    assert_error(vqa(endpoint, content=b"{broken", headers={**AUTH, "content-type": "application/json"}), 400)
    assert_error(vqa(endpoint, files={"image": ("a.png", png(), "image/png")}), 422)  # no question
    assert_error(vqa(endpoint, content=b"hello", headers={**AUTH, "content-type": "text/plain"}), 415)


def test_chat_refuses_remote_images_and_malformed_messages(endpoint: Endpoint):
    client = openai.OpenAI(base_url=f"{endpoint.url}/v1", api_key=KEY, max_retries=0)
    remote = [{"role": "user", "content": [{"type": "text", "text": "q"},
                                           {"type": "image_url", "image_url": {"url": "https://example.org/a.png"}}]}]
    with pytest.raises(openai.BadRequestError, match="remote image URLs are refused"):
        client.chat.completions.create(model="stmed-tiny", messages=remote)
    with pytest.raises(openai.BadRequestError, match="exactly one image_url"):
        client.chat.completions.create(model="stmed-tiny", messages=[{"role": "user", "content": "hi"}])
    url = f"{endpoint.url}/v1/chat/completions"
    assert_error(httpx.post(url, headers=AUTH, json={"messages": "nope"}), 422)
    assert_error(httpx.post(url, headers=AUTH, json={"messages": [{"role": "user", "content": [
        {"type": "text", "text": "q"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}]}]}),
        400)


def test_max_ongoing_requests_below_batch_size_is_refused():
    with pytest.raises(ConfigError, match="max_ongoing_requests"):
        build_app(ModelConfig(preset="tiny"), "m", LIMITS, BatchingConfig(max_batch_size=16),
                  AutoscalingConfig(), ReplicaConfig(max_ongoing_requests=4), None)


# ----------------------------------------------------------------------------- hardening


def ascii_json(body: dict) -> dict:
    """httpx's ``json=`` cannot encode a lone surrogate; JSON's ASCII escape ("\\ud800") carries it."""
    return {"content": json.dumps(body), "headers": {**AUTH, "content-type": "application/json"}}


def test_a_poisoned_question_fails_alone_in_its_batch(endpoint: Endpoint):
    """A lone surrogate used to fail the tokenizer and with it every request of its batch (all 500)."""
    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(
                client.post(f"{endpoint.url}/v1/vqa", **ascii_json({
                    "image_base64": data_url(png()), "question": "Is \ud800 normal?" if i == 2 else f"Q {i}?",
                    "max_tokens": 2}))
                for i in range(6)))

    responses = asyncio.run(burst())
    error = assert_error(responses[2], 422)
    assert error["param"] == "question" and "surrogate" in error["message"]
    others = [r for i, r in enumerate(responses) if i != 2]
    assert all(r.status_code == 200 for r in others), [r.text for r in others]
    assert max(r.json()["usage"]["batch_size"] for r in others) > 1  # they did share a batch
    for _ in range(4):  # a stream of them alone is not a broken engine: the replica stays healthy
        assert_error(httpx.post(f"{endpoint.url}/v1/vqa", timeout=60,
                                **ascii_json({"image_base64": data_url(png()), "question": "\ud800"})), 422)
    assert httpx.get(f"{endpoint.url}/healthz", timeout=10).json()["status"] == "ok"


def _stalled_upload(endpoint: Endpoint) -> socket.socket:
    """A /v1/vqa request that sends its headers and 100 of its 100,000 body bytes, then stalls."""
    port = int(endpoint.url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(b"POST /v1/vqa HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + KEY.encode()
                 + b"\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n" + b"{" + b" " * 99)
    return sock


def _response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of the one HTTP/1.1 response on ``sock`` (read until close or length)."""
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 1 << 30


def test_stalled_uploads_hang_neither_healthz_nor_answers_and_end_in_408(endpoint: Endpoint):
    stalled = [_stalled_upload(endpoint) for _ in range(64)]
    try:
        time.sleep(0.5)  # every one of them has reached the replica and holds a Serve slot
        start = time.monotonic()
        health = httpx.get(f"{endpoint.url}/healthz", timeout=BODY_TIMEOUT_S - 1)
        assert health.status_code == 200 and time.monotonic() - start < BODY_TIMEOUT_S - 1
        answer = vqa(endpoint, json={"image_base64": data_url(png()), "question": "Is it normal?"})
        assert answer.status_code == 200, answer.text
        for sock in stalled:  # each ends at the body deadline, in the JSON error shape
            status, headers, body = _response(sock)
            assert status == 408 and headers["content-type"] == "application/json"
            assert json.loads(body)["error"]["type"] == "request_timeout"
        assert time.monotonic() - start < BODY_TIMEOUT_S + 20
    finally:
        for sock in stalled:
            sock.close()


def test_thin_images_are_refused_from_their_header(endpoint: Endpoint):
    """A 2 KB PNG of 1,600,000 x 1 pixels gave a MemoryError and a 500; 400,000 x 4 stalled the replica."""
    def thin(width: int, height: int) -> bytes:
        buffer = io.BytesIO()
        Image.new("L", (width, height)).save(buffer, format="PNG")
        return buffer.getvalue()

    for size in ((1_600_000, 1), (400_000, 4), (100_000, 1), (50_000, 4)):  # the last two: under max_pixels
        error = assert_error(vqa(endpoint, files={"image": ("thin.png", thin(*size), "image/png")},
                                 data={"question": "q"}), 413)
        assert error["type"] == "image_too_large" and f"{size[0]}x{size[1]}" in error["message"]
        assert size[0] * size[1] > LIMITS.max_image_pixels or "limits.max_image_side" in error["message"]
    error = assert_error(vqa(endpoint, files={"image": ("wide.png", thin(2000, 50), "image/png")},
                             data={"question": "q"}), 422)
    assert "aspect ratio" in error["message"]


def test_deep_json_and_huge_integers_are_400_on_every_json_route(endpoint: Endpoint):
    json_headers = {**AUTH, "content-type": "application/json"}
    for route in ("/v1/chat/completions", "/v1/vqa"):
        for body in (b"[" * 100_000 + b"]" * 100_000, b'{"max_tokens": ' + b"9" * 5000 + b"}"):
            response = httpx.post(f"{endpoint.url}{route}", content=body, headers=json_headers, timeout=60)
            assert assert_error(response, 400)["type"] == "invalid_json"


def test_chat_refuses_unknown_models_bad_sampling_fields_and_echoes_little(endpoint: Endpoint):
    client = openai.OpenAI(base_url=f"{endpoint.url}/v1", api_key=KEY, max_retries=0)
    messages = [{"role": "user", "content": [{"type": "text", "text": "Is it normal?"},
                                             {"type": "image_url", "image_url": {"url": data_url(png())}}]}]
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=messages)
    assert info.value.code == "model_not_found" and "stmed-tiny" in info.value.message
    url = f"{endpoint.url}/v1/chat/completions"
    for field, value in (("temperature", float("nan")), ("temperature", -1), ("temperature", "hot"),
                         ("top_p", -5)):
        body = json.dumps({"model": "stmed-tiny", "messages": messages, field: value})  # NaN written as NaN
        error = assert_error(httpx.post(url, content=body, headers={**AUTH, "content-type": "application/json"},
                                        timeout=60), 400)
        assert error["param"] == field and field in error["message"]
    long = assert_error(httpx.post(url, headers=AUTH, timeout=60, json={
        "model": "stmed-tiny", "messages": messages, "max_tokens": "9" * 200_000}), 422)
    assert len(long["message"]) < 200


def test_a_dead_replica_answers_its_in_flight_requests_in_json(endpoint: Endpoint, ray_session):
    """Serve's proxy, not the replica, answers when the replica dies; it used to write plain text."""
    ray = ray_session
    in_flight = _stalled_upload(endpoint)
    try:
        time.sleep(1.0)  # the request waits inside the replica, reading its body
        replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                    if a["name"].startswith("SERVE_REPLICA::vqa-test")]
        assert len(replicas) == 1
        ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]))
        status, headers, body = _response(in_flight)
    finally:
        in_flight.close()
    assert status == 500 and headers["content-type"] == "application/json", body[:200]
    assert json.loads(body)["error"]["type"] == "server_error"
    deadline = time.monotonic() + 120  # Serve starts a replacement; the tests after this one need it
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{endpoint.url}/healthz", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    assert httpx.get(f"{endpoint.url}/healthz", timeout=5).status_code == 200


def test_a_qwen2_5_vl_endpoint_answers_over_http(endpoint: Endpoint):
    """The other family behind the same deployment, on its own route: /v1/vqa and the OpenAI route answer,
    and an image's prompt cost follows its size (16 px per token side in the tiny preset)."""
    from ray import serve

    app = build_app(ModelConfig(preset="tiny-qwen2.5-vl"), "stmed-tiny-qwen", LIMITS,
                    BatchingConfig(max_batch_size=4, batch_wait_timeout_s=0.05), AutoscalingConfig(),
                    ReplicaConfig(max_ongoing_requests=4, num_cpus=0.5), api_key_digest(KEY))  # fmt: skip
    serve.run(app, name="vqa-qwen", route_prefix="/qwen")
    try:
        url = f"{endpoint.url}/qwen"
        usages = []
        for size in ((64, 64), (64, 32)):
            response = httpx.post(f"{url}/v1/vqa", headers=AUTH, timeout=60,
                                  json={"image_base64": data_url(png(size)), "question": "Is it normal?"})  # fmt: skip
            assert response.status_code == 200, response.text
            assert response.json()["model"] == "stmed-tiny-qwen" and isinstance(response.json()["answer"], str)
            usages.append(response.json()["usage"])
        assert usages[0]["prompt_tokens"] - usages[1]["prompt_tokens"] == 16 - 8
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        completion = client.chat.completions.create(
            model="stmed-tiny-qwen", max_tokens=3,
            messages=[{"role": "user", "content": [{"type": "text", "text": "Is the scan normal?"},
                                                   {"type": "image_url", "image_url": {"url": data_url(png())}}]}],
        )  # fmt: skip
        assert completion.usage.prompt_tokens == usages[0]["prompt_tokens"] + 1  # "the scan" vs "it"
    finally:
        serve.delete("vqa-qwen")


def test_logs_hold_no_key_image_or_question(endpoint: Endpoint, ray_session):
    """Runs last in this module: after every request above, Ray's log files (driver, proxy, replica)
    must not contain the API key, any base64 image, or a question text."""
    secret_question = "Is the secret-marker-77 lesion malignant?"
    response = vqa(endpoint, json={"image_base64": data_url(png()), "question": secret_question})
    assert response.status_code == 200
    logs = Path(ray_session._private.worker._global_node.get_logs_dir_path())
    files = [p for p in logs.rglob("*") if p.is_file() and p.suffix in (".log", ".out", ".err")]
    assert any("replica" in p.name for p in files)
    for path in files:
        text = path.read_text(errors="replace")
        for needle in (KEY, "iVBORw0KGgo", "secret-marker-77", "Is the scan normal"):
            assert needle not in text, f"{needle!r} found in {path.name}"
