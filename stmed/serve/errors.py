"""The endpoint's one error shape, ``{"error": {"message", "type", "param", "code"}}`` (OpenAI's), and
what makes every failure leave in it: refusals, HTTP and validation errors, bugs, and the responses
Ray Serve's proxy writes itself when a replica dies or times out.

Messages name the field and the rule, never the request's content: a value a message must mention
goes through :func:`echo`, which keeps a short ASCII prefix (a 1 MB ``max_tokens`` is not sent back).
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from stmed.log import get_logger

log = get_logger("stmed.serve")

ECHO_CHARS = 24  # how much of a client's value an error message may quote

# What the proxy's own error responses become (it writes plain text, or nothing at all for a 500).
_PROXY_ERRORS = {
    408: ("the request timed out on the server", "request_timeout"),
    429: ("too many requests; retry later", "rate_limit_exceeded"),
    500: ("internal error: the request failed on the server (its model replica may have died); retry",
          "server_error"),
    503: ("no model replica can take the request now; retry later", "unavailable"),
}
# Headers of a replaced error response that still mean something to the client.
_KEPT_HEADERS = (b"retry-after", b"www-authenticate", b"x-request-id")


class APIError(Exception):
    """A request we refuse: becomes ``{"error": {...}}`` with ``status``; ``param`` names the field."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def echo(value: Any, limit: int = ECHO_CHARS) -> str:
    """A client's value as an error message may show it: ASCII-escaped, at most ``limit`` characters.

    ASCII because a lone surrogate cannot be encoded into the UTF-8 body; a prefix because a message
    that returns the whole value turns every error into an amplifier.
    """
    if isinstance(value, bool) or value is None or isinstance(value, float):
        text = repr(value)
    elif isinstance(value, int):
        text = repr(value) if value.bit_length() <= 64 else "a very large integer"
    elif isinstance(value, str):
        text = ascii(value[:limit])
    else:
        return f"a JSON {_json_kind(value)}"
    return text if len(text) <= limit else text[:limit] + "..."


def _json_kind(value: Any) -> str:
    return {dict: "object", list: "array"}.get(type(value), type(value).__name__)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(status: int, message: str, type_: str, param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    if status == 408:  # the body was not read to its end: this connection cannot carry another request
        headers = {"Connection": "close"}
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.type, exc.param, exc.code)


async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error_response(exc.status_code, str(exc.detail)[:200], "invalid_request_error")


async def _server_error(_: Request, exc: Exception) -> JSONResponse:
    # A bug or a broken engine, never bad input. The type only: messages may quote request content.
    log.error("request failed: %s", type(exc).__name__)
    return error_response(500, "internal error", "server_error")


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    where = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:3])  # no inputs echoed
    return error_response(422, f"invalid request: {where}", "invalid_request_error")


def install_error_handlers(app: FastAPI) -> None:
    """Every failure as ``{"error": {...}}``: refusals, HTTP errors, validation, bugs (500)."""
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _server_error)
    app.add_exception_handler(RequestValidationError, _validation_error)


# ----------------------------------------------------------------------------- the proxy's own errors


class JSONErrors:
    """Pure ASGI middleware: an error response that is not JSON, or no response at all, leaves as the
    JSON error shape.

    Ray Serve's proxy answers for the replica when the replica cannot: on a timeout or when none is
    available it writes plain text, and when the replica dies mid-request it writes nothing, so uvicorn
    sends a plain-text "Internal Server Error". An OpenAI client then fails parsing the body instead of
    reading the error. Runs in the proxy (see :func:`proxy_middlewares`); JSON responses pass untouched.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        replaced: Message | None = None  # a non-JSON error's start, withheld while its body is dropped
        answered = False

        async def send_json_errors(message: Message) -> None:
            nonlocal replaced, answered
            if message["type"] == "http.response.start" and message["status"] >= 400 \
                    and not _is_json(message.get("headers", [])):
                replaced = message
            elif message["type"] == "http.response.body" and replaced is not None:
                if not message.get("more_body", False):
                    answered = True
                    await _send_error(send, replaced["status"], replaced.get("headers", []))
            else:
                answered = answered or message["type"] == "http.response.start"
                await send(message)

        try:
            await self.app(scope, receive, send_json_errors)
        except Exception as exc:
            if answered:
                raise
            log.error("request failed in the proxy: %s", type(exc).__name__)
            await _send_error(send, 500, [])
            return
        if not answered:  # nothing sent (a dead replica), or an error start without its last body part
            await _send_error(send, replaced["status"] if replaced else 500, [])


def _is_json(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(k.lower() == b"content-type" and b"json" in v.lower() for k, v in headers)


async def _send_error(send: Send, status: int, headers: list[tuple[bytes, bytes]]) -> None:
    message, type_ = _PROXY_ERRORS.get(status) or (_phrase(status),
                                                   "server_error" if status >= 500 else "invalid_request_error")
    body = json.dumps(error_body(message, type_)).encode()
    kept = [(k, v) for k, v in headers if k.lower() in _KEPT_HEADERS]
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *kept]})
    await send({"type": "http.response.body", "body": body})


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"HTTP {status}"


def proxy_middlewares() -> list[Middleware]:
    """Ray Serve's proxy callback (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``): its middlewares."""
    return [Middleware(JSONErrors)]
