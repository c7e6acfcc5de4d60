"""A hostile chat-completions endpoint on 127.0.0.1: each request gets one scripted bad reply, written as
raw HTTP/1.1 so that nothing between it and the client tidies it up. Shared by the judge tests and
``benchmarks/fault_drill.py``.

Replies (``HostileServer(reply)``):
- ``gzip_bomb``: a 200 whose gzip body (about 1 MB) inflates to 1 GiB of zeros;
- ``endless_chunked``: a 200 with a chunked body that never ends (64 KiB chunks, as fast as it can);
- ``trickle``: a 200 whose chunked body sends a byte a second, never ending;
- ``redirect``: a 307 to another origin (it records whether anyone followed it);
- ``deep_json``: a 200 whose body is 100,000 nested arrays;
- ``not_a_dict``, ``wrong_types``, ``null_choice``: 200s with JSON of the wrong shape.
"""

from __future__ import annotations

import gzip
import io
import json
import socket
import threading
import time

BOMB_INFLATED = 1 << 30


def gzip_bomb(inflated: int = BOMB_INFLATED) -> bytes:
    buffer = io.BytesIO()
    zero = bytes(1 << 20)
    with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=9) as fh:
        for _ in range(inflated // len(zero)):
            fh.write(zero)
    return buffer.getvalue()


_BOMB: bytes | None = None


def _bomb() -> bytes:
    global _BOMB
    if _BOMB is None:
        _BOMB = gzip_bomb()
    return _BOMB


def _head(status: str, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in headers.items()), "", ""]
    return "\r\n".join(lines).encode()


def _json_reply(body: bytes) -> bytes:
    return _head("200 OK", {"Content-Type": "application/json", "Content-Length": str(len(body)),
                            "Connection": "close"}) + body


SHAPES = {
    "deep_json": b"[" * 100_000 + b"]" * 100_000,
    "not_a_dict": b'["8 6"]',
    "wrong_types": json.dumps({"choices": {"0": {"message": "8 6"}}, "usage": "lots"}).encode(),
    "null_choice": json.dumps({"choices": [None], "usage": {"prompt_tokens": "x"}}).encode(),
}
REPLIES = ("gzip_bomb", "endless_chunked", "trickle", "redirect", *SHAPES)


class HostileServer:
    """``with HostileServer("gzip_bomb") as url: ...``; ``url`` is an OpenAI ``base_url`` (``…/v1``)."""

    def __init__(self, reply: str):
        if reply not in REPLIES:
            raise ValueError(f"unknown reply {reply!r}; one of {REPLIES}")
        self.reply = reply
        self.requests = 0
        self.redirect_followed = False
        self.sent_bytes = 0
        if reply == "gzip_bomb":
            _bomb()  # built before the clock of any request starts

    def __enter__(self) -> str:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.stopped = False
        threading.Thread(target=self._serve, daemon=True).start()
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"

    def __exit__(self, *exc: object) -> None:
        self.stopped = True
        self.sock.close()

    def _serve(self) -> None:
        while not self.stopped:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    @staticmethod
    def _read_request(conn: socket.socket) -> bytes:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return data
            data += chunk
        head, body = data.split(b"\r\n\r\n", 1)
        length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        while len(body) < length:
            chunk = conn.recv(65536)
            if not chunk:
                break
            body += chunk
        return head

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            head = self._read_request(conn)
            self.requests += 1
            if b"/followed" in head.split(b"\r\n", 1)[0]:
                self.redirect_followed = True
            try:
                self._send(conn)
            except OSError:  # the client hung up: what a bounded client does
                pass

    def _send(self, conn: socket.socket) -> None:
        if self.reply in SHAPES:
            conn.sendall(_json_reply(SHAPES[self.reply]))
        elif self.reply == "redirect":
            port = self.sock.getsockname()[1]
            conn.sendall(_head("307 Temporary Redirect", {
                "Location": f"http://127.0.0.1:{port}/followed/chat/completions", "Content-Length": "0",
                "Connection": "close"}))
        elif self.reply == "gzip_bomb":
            bomb = _bomb()
            conn.sendall(_head("200 OK", {"Content-Type": "application/json", "Content-Encoding": "gzip",
                                          "Content-Length": str(len(bomb)), "Connection": "close"}) + bomb)
            self.sent_bytes += len(bomb)
        else:
            chunked = {"Content-Type": "application/json", "Transfer-Encoding": "chunked"}
            conn.sendall(_head("200 OK", chunked))
            chunk = b"[" * (1 << 16) if self.reply == "endless_chunked" else b"["
            frame = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
            limit = 8 << 30  # a guard against a client that never stops reading
            while not self.stopped and self.sent_bytes < limit:
                conn.sendall(frame)
                self.sent_bytes += len(chunk)
                if self.reply == "trickle":
                    time.sleep(1.0)
