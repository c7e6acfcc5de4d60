"""The review app over HTTP: sign-in, the one-item page, and the small JSON API the page (and the simulated
clinician) talks to.

Routes (all answers ``Cache-Control: no-store``; API errors are ``{"error": {"message", "code"}}``):

- ``GET /signin``, ``POST /signin`` (form: ``token``, ``csrf``) → a session cookie; ``POST /signout``;
- ``GET /review`` — the page (server-rendered shell, a little plain JavaScript);
- ``GET /api/next`` — the next item: question, answers A and B, a one-use form token, progress;
- ``GET /api/items/{id}/image`` — a queued item's image, re-encoded as PNG;
- ``POST /api/decisions`` (JSON: ``item_id``, ``form``, ``choice``, ``ill_formed``, ``corrected``,
  ``starred``), ``POST /api/undo``; both need the session's ``X-CSRF-Token`` header;
- ``GET /healthz``.

Care taken, as for the VQA endpoint: every request but sign-in and health needs a live session; a file is
read only as the image of a queued item named by its integer id (no path from the request reaches the
file system); sign-in failures per client are limited; bodies are capped; nothing a reviewer reads or
writes (questions, answers, images, corrections) is logged, only ids and counts.
"""

from __future__ import annotations

import html
import io
import json
import secrets
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from importlib import resources
from string import Template
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from sqlalchemy.exc import DBAPIError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from stmed.config import ConfigError
from stmed.data.images import ImageLoadError, load_image
from stmed.log import get_logger
from stmed.review.store import CHOICES, ReviewError, Store

log = get_logger("stmed.review")

SESSION_COOKIE, PRE_COOKIE = "stmed_review", "stmed_review_pre"
MAX_CORRECTED_CHARS = 4000
SECURITY_HEADERS = {
    "cache-control": "no-store",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "content-security-policy": "default-src 'self'; img-src 'self'; style-src 'self'; script-src 'self'; "
                               "frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
}


@dataclass(frozen=True)
class WebLimits:
    """How the app protects itself (config group ``web``)."""

    max_body_bytes: int = 16384
    """Largest request body; a corrected answer is text, an upload is never expected."""
    login_attempts: int = 5
    """Failed sign-ins a client may make per ``login_window_s`` before it is told to wait."""
    login_window_s: float = 300.0
    session_hours: float = 12.0
    """How long a sign-in lasts."""
    secure_cookies: bool = False
    """Mark cookies Secure (set automatically when the app serves TLS)."""

    def __post_init__(self) -> None:
        for key in ("max_body_bytes", "login_attempts", "login_window_s", "session_hours"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"web.{key} must be > 0, got {getattr(self, key)}")


class BodyLimit:
    """Refuse bodies over ``limit`` bytes: by Content-Length up front, and by counting as they stream."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await _too_large(self.limit)(scope, receive, send)
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _BodyTooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except _BodyTooLarge:
            await _too_large(self.limit)(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


def _too_large(limit: int) -> Response:
    return _error(413, f"request body over {limit} bytes", "body_too_large")


def _error(status: int, message: str, code: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "code": code}}, status, headers=headers)


class LoginLimiter:
    """At most ``attempts`` failed sign-ins per client per ``window_s`` (in this process)."""

    def __init__(self, attempts: int, window_s: float):
        self.attempts, self.window_s = attempts, window_s
        self.failures: dict[str, deque[float]] = defaultdict(deque)

    def wait_s(self, client: str) -> float:
        recent = self.failures[client]
        while recent and recent[0] < time.monotonic() - self.window_s:
            recent.popleft()
        return 0.0 if len(recent) < self.attempts else recent[0] + self.window_s - time.monotonic()

    def failed(self, client: str) -> None:
        self.failures[client].append(time.monotonic())


def _page(file: str, **values: str) -> str:
    text = resources.files("stmed.review").joinpath("static", file).read_text(encoding="utf-8")
    return Template(text).substitute({k: html.escape(v, quote=True) for k, v in values.items()})


def _static(name: str) -> bytes:
    return resources.files("stmed.review").joinpath("static", name).read_bytes()


STATIC = {"review.js": "text/javascript; charset=utf-8", "review.css": "text/css; charset=utf-8"}


def create_app(store: Store, per_item: int = 1, limits: WebLimits | None = None) -> FastAPI:
    """The review app over ``store``; ``per_item`` is k, the reviewers each item goes to."""
    limits = limits or WebLimits()
    limiter = LoginLimiter(limits.login_attempts, limits.login_window_s)
    app = FastAPI(title="stmed review", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)

    @app.middleware("http")
    async def headers(request: Request, call_next):
        response = await call_next(request)
        for key, value in SECURITY_HEADERS.items():
            response.headers[key] = value
        return response

    def reviewer(request: Request) -> tuple[int, str, str] | None:
        sid = request.cookies.get(SESSION_COOKIE)
        return store.session_for(sid) if sid else None

    def api_reviewer(request: Request, post: bool = False) -> tuple[int, str, str]:
        who = reviewer(request)
        if who is None:
            raise ReviewError(401, "sign in first (your session ended or was never started)", "signed_out")
        if post and not secrets.compare_digest(request.headers.get("x-csrf-token", ""), who[2]):
            raise ReviewError(403, "missing or wrong X-CSRF-Token header; reload the page", "csrf")
        return who

    @app.exception_handler(ReviewError)
    async def refused(_request: Request, err: ReviewError) -> JSONResponse:
        return _error(err.status, err.message, err.code)

    @app.exception_handler(DBAPIError)
    async def database_gone(request: Request, _err: DBAPIError) -> JSONResponse:
        # Nothing was written (each change is one transaction), and the page keeps the answer and sends
        # it again with the same form token, so it is not doubled either.
        log.warning("review database unavailable on %s %s", request.method, request.url.path)
        return _error(503, "the review database is unavailable; your answer is kept and will be sent again",
                      "database_unavailable", {"retry-after": "2"})

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"ok": True}

    @app.get("/static/{name}")
    def static(name: str) -> Response:
        if name not in STATIC:  # a fixed list: the name never becomes a path
            return _error(404, "no such file", "not_found")
        return Response(_static(name), media_type=STATIC[name])

    @app.get("/")
    def root(request: Request) -> Response:
        return RedirectResponse("/review" if reviewer(request) else "/signin", 303)

    def signin_page(message: str = "", status: int = 200) -> HTMLResponse:
        pre = secrets.token_urlsafe(24)
        response = HTMLResponse(_page("signin.html", csrf=pre, message=message), status)
        response.set_cookie(PRE_COOKIE, pre, httponly=True, samesite="strict", secure=limits.secure_cookies)
        return response

    @app.get("/signin")
    def signin_form() -> HTMLResponse:
        return signin_page()

    @app.post("/signin")
    async def signin(request: Request) -> Response:
        client = request.client.host if request.client else "?"
        wait = limiter.wait_s(client)
        if wait > 0:
            response = signin_page(f"Too many failed sign-ins. Try again in {int(wait) + 1} seconds.", 429)
            response.headers["retry-after"] = str(int(wait) + 1)
            return response
        form = await request.form()
        pre = request.cookies.get(PRE_COOKIE, "")
        if not pre or not secrets.compare_digest(str(form.get("csrf", "")), pre):
            return signin_page("The sign-in form expired. Please paste your token again.", 403)
        signed = store.sign_in(str(form.get("token", ""))[:200], limits.session_hours * 3600)
        if signed is None:
            limiter.failed(client)
            return signin_page("That token is not valid. Check it and try again.", 401)
        sid = signed[0]
        log.info("reviewer signed in")
        response = RedirectResponse("/review", 303)
        response.set_cookie(SESSION_COOKIE, sid, max_age=int(limits.session_hours * 3600), httponly=True,
                            samesite="strict", secure=limits.secure_cookies)
        response.delete_cookie(PRE_COOKIE)
        return response

    @app.post("/signout")
    def signout(request: Request) -> Response:
        who = api_reviewer(request, post=True)
        store.sign_out(request.cookies.get(SESSION_COOKIE, ""))
        log.info("reviewer %d signed out", who[0])
        response = JSONResponse({"signed_out": True})
        response.delete_cookie(SESSION_COOKIE)
        return response

    @app.get("/review")
    def page(request: Request) -> Response:
        who = reviewer(request)
        if who is None:
            return RedirectResponse("/signin", 303)
        return HTMLResponse(_page("review.html", name=who[1], csrf=who[2]))

    @app.get("/api/next")
    def next_item(request: Request) -> dict[str, Any]:
        who = api_reviewer(request)
        served = store.next_item(who[0], per_item)
        if served is None:
            return {"done": True}
        return {"done": False, "item_id": served.item_id, "question": served.question,
                "answer_a": served.answer_a, "answer_b": served.answer_b, "form": served.form,
                "image": f"/api/items/{served.item_id}/image",
                "progress": {"done": served.done, "total": served.total}}  # fmt: skip

    @app.get("/api/items/{item_id}/image")
    def image(item_id: int, request: Request) -> Response:
        api_reviewer(request)
        path = store.image_of(item_id)
        if path is None:
            return _error(404, f"no queued item {item_id}", "not_found")
        try:
            img = load_image(path)
        except ImageLoadError:
            log.warning("image of item %d is unreadable", item_id)  # not the path: it may name a patient
            return _error(422, f"the image of item {item_id} cannot be read", "image_unreadable")
        buffer = io.BytesIO()
        img.save(buffer, format="PNG")
        return Response(buffer.getvalue(), media_type="image/png")

    @app.post("/api/decisions")
    async def decide(request: Request) -> JSONResponse:
        who = api_reviewer(request, post=True)
        body = await _json_body(request)
        item_id, form, choice = body.get("item_id"), body.get("form"), body.get("choice")
        corrected = body.get("corrected", "")
        if not isinstance(item_id, int) or isinstance(item_id, bool):
            raise ReviewError(422, "item_id must be an integer", "bad_item_id")
        if not isinstance(form, str) or not 8 <= len(form) <= 100:
            raise ReviewError(422, "form must be the form token the item came with", "bad_form")
        if choice not in CHOICES:
            raise ReviewError(422, f"choice must be one of {', '.join(CHOICES)}", "bad_choice")
        if not isinstance(corrected, str) or len(corrected) > MAX_CORRECTED_CHARS:
            raise ReviewError(422, f"corrected must be text of at most {MAX_CORRECTED_CHARS} characters",
                              "bad_corrected")
        flags = {key: body.get(key, False) for key in ("ill_formed", "starred")}
        if not all(isinstance(v, bool) for v in flags.values()):
            raise ReviewError(422, "ill_formed and starred must be true or false", "bad_flag")
        decision_id, created = store.decide(who[0], item_id, form, choice, flags["ill_formed"],
                                            corrected.strip(), flags["starred"])
        log.info("reviewer %d decided item %d%s", who[0], item_id, "" if created else " (a repeat)")
        return JSONResponse({"decision_id": decision_id, "created": created}, 201 if created else 200)

    @app.post("/api/undo")
    def undo(request: Request) -> dict[str, Any]:
        who = api_reviewer(request, post=True)
        item_id = store.undo_last(who[0])
        log.info("reviewer %d undid item %s", who[0], item_id)
        return {"undone_item_id": item_id}

    return app


async def _json_body(request: Request) -> dict[str, Any]:
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise ReviewError(415, "send the decision as application/json", "bad_content_type")
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ReviewError(400, "the body is not valid JSON", "bad_json") from None
    if not isinstance(body, dict):
        raise ReviewError(400, "the body must be a JSON object", "bad_json")
    return body


def build(store: Store, per_item: int = 1, limits: WebLimits | None = None) -> FastAPI:
    """What uvicorn (or a Serve replica) runs."""
    return create_app(store, per_item, limits)
