"""The review database: reviewers, the queue of judged pairs, their decisions, sessions and an audit trail.

SQLAlchemy 2 over an SQLite file by default (``sqlite:///runs/review/review.db``) or a PostgreSQL URL on a
cluster (``postgresql+psycopg://user@host/db``). One ``schema_version`` row says which layout a database
holds; a database written by another version is refused with the number, never half-migrated.

What the rules here guarantee, whatever the web layer does:

- a reviewer's token is stored only as its sha256; the token itself is printed once by ``add_reviewer``;
- a reviewer decides an item at most once (a unique constraint on item and reviewer, not a check that two
  requests could both pass), and every decision carries the one-use form token it was posted with: a
  retry of the same post finds its decision and gets it back, a replayed or forged form is refused;
- undo removes the reviewer's latest decision only; the audit trail keeps both (who, what, when).

Each item keeps the order its two answers are shown in (``chosen_first``), drawn once when it is queued, so
every reviewer and the calibration read positions the same way.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import (
    Boolean,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    select,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

SCHEMA_VERSION = 1
Choice = Literal["A", "B", "tie", "both_wrong"]
CHOICES = ("A", "B", "tie", "both_wrong")
TOKEN_PREFIX = "stmed-review-"


class ReviewError(ValueError):
    """A request the rules refuse; ``status`` is the HTTP status the web layer answers with."""

    def __init__(self, status: int, message: str, code: str):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def now() -> float:
    return time.time()


# ----------------------------------------------------------------------------- tables


class Base(DeclarativeBase):
    pass


class SchemaVersion(Base):
    __tablename__ = "schema_version"
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[float] = mapped_column(Float)


class Reviewer(Base):
    __tablename__ = "reviewers"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(120), unique=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[float] = mapped_column(Float)


class Item(Base):
    """One judged pair in the queue, as a reviewer sees it (answers in display order) and as the judge
    saw it (scores, which answer it chose). Only ``question``, the answers and the image reach the page."""

    __tablename__ = "items"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    pair_id: Mapped[str] = mapped_column(String(64), unique=True)
    position: Mapped[int] = mapped_column(Integer, index=True)
    image: Mapped[str] = mapped_column(Text)
    question: Mapped[str] = mapped_column(Text)
    chosen: Mapped[str] = mapped_column(Text)
    rejected: Mapped[str] = mapped_column(Text)
    chosen_score: Mapped[float] = mapped_column(Float)
    rejected_score: Mapped[float] = mapped_column(Float)
    judge_model: Mapped[str] = mapped_column(String(200))
    chosen_first: Mapped[bool] = mapped_column(Boolean)
    kind: Mapped[str] = mapped_column(String(40))
    stratum: Mapped[str] = mapped_column(String(80))
    swap_consistent: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)

    @property
    def answers(self) -> tuple[str, str]:
        """(A, B) as shown."""
        return (self.chosen, self.rejected) if self.chosen_first else (self.rejected, self.chosen)


class Decision(Base):
    __tablename__ = "decisions"
    __table_args__ = (UniqueConstraint("item_id", "reviewer_id", name="one_decision_per_reviewer"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"), index=True)
    reviewer_id: Mapped[int] = mapped_column(ForeignKey("reviewers.id"), index=True)
    choice: Mapped[str] = mapped_column(String(16))
    ill_formed: Mapped[bool] = mapped_column(Boolean, default=False)
    corrected: Mapped[str] = mapped_column(Text, default="")
    starred: Mapped[bool] = mapped_column(Boolean, default=False)
    form_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[float] = mapped_column(Float)


class FormToken(Base):
    """A one-use token for deciding one item, issued with the item; only its hash is kept."""

    __tablename__ = "form_tokens"
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    reviewer_id: Mapped[int] = mapped_column(ForeignKey("reviewers.id"))
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"))
    issued_at: Mapped[float] = mapped_column(Float)
    used_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class WebSession(Base):
    __tablename__ = "sessions"
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    reviewer_id: Mapped[int] = mapped_column(ForeignKey("reviewers.id"))
    csrf: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float] = mapped_column(Float)


class Audit(Base):
    __tablename__ = "audit"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[float] = mapped_column(Float, index=True)
    reviewer_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    action: Mapped[str] = mapped_column(String(40))
    item_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    detail: Mapped[str] = mapped_column(Text, default="{}")


# ----------------------------------------------------------------------------- the store


@dataclass(frozen=True)
class Served:
    """The next item for a reviewer, as the page shows it, with the form token that decides it."""

    item_id: int
    question: str
    answer_a: str
    answer_b: str
    form: str
    done: int
    total: int


class Store:
    """The database behind one review round; every method is one transaction."""

    def __init__(self, url: str, echo: bool = False):
        self.url = url
        kwargs: dict[str, Any] = {"pool_pre_ping": True}  # a database that came back is reconnected to
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        self.engine: Engine = create_engine(url, echo=echo, **kwargs)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._check_schema()

    def _check_schema(self) -> None:
        Base.metadata.create_all(self.engine)
        with self.session() as s:
            versions = s.scalars(select(SchemaVersion.version)).all()
            if not versions:
                s.add(SchemaVersion(version=SCHEMA_VERSION, created_at=now()))
            elif versions != [SCHEMA_VERSION]:
                raise ValueError(f"review.database: schema version {versions} in {self.safe_url}, this stmed "
                                 f"reads version {SCHEMA_VERSION}; export its labels with the stmed that wrote it")

    @property
    def safe_url(self) -> str:
        """The URL with any password hidden, for messages."""
        return self.engine.url.render_as_string(hide_password=True)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions.begin() as s:
            yield s

    def audit(self, s: Session, action: str, reviewer_id: int | None = None, item_id: int | None = None,
              **detail: Any) -> None:
        s.add(Audit(at=now(), reviewer_id=reviewer_id, action=action, item_id=item_id,
                    detail=json.dumps(detail, sort_keys=True)))

    # -- reviewers and sessions

    def add_reviewer(self, name: str) -> str:
        """Create a reviewer and return their token; only its hash is stored, so it is shown once."""
        name = name.strip()
        if not name or len(name) > 120:
            raise ValueError("add-reviewer: a name of 1-120 characters, e.g. add-reviewer dr-lee")
        token = TOKEN_PREFIX + secrets.token_urlsafe(24)
        with self.session() as s:
            if s.scalar(select(Reviewer).where(Reviewer.name == name)):
                raise ValueError(f"add-reviewer: a reviewer named {name!r} exists; pick another name")
            reviewer = Reviewer(name=name, token_sha256=digest(token), active=True, created_at=now())
            s.add(reviewer)
            s.flush()
            self.audit(s, "add_reviewer", reviewer.id, name=name)
        return token

    def sign_in(self, token: str, lifetime_s: float) -> tuple[str, str, str] | None:
        """``(session id, csrf token, reviewer name)`` for a valid token, else None (audited either way)."""
        with self.session() as s:
            reviewer = s.scalar(select(Reviewer).where(Reviewer.token_sha256 == digest(token.strip())))
            if reviewer is None or not reviewer.active:
                self.audit(s, "sign_in_refused")
                return None
            sid, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
            s.add(WebSession(sha256=digest(sid), reviewer_id=reviewer.id, csrf=csrf, created_at=now(),
                             expires_at=now() + lifetime_s))
            self.audit(s, "sign_in", reviewer.id)
            return sid, csrf, reviewer.name

    def session_for(self, sid: str) -> tuple[int, str, str] | None:
        """``(reviewer id, reviewer name, csrf)`` of a live session, else None."""
        with self.session() as s:
            row = s.get(WebSession, digest(sid))
            if row is None or row.expires_at < now():
                return None
            reviewer = s.get(Reviewer, row.reviewer_id)
            if reviewer is None or not reviewer.active:
                return None
            return reviewer.id, reviewer.name, row.csrf

    def sign_out(self, sid: str) -> None:
        with self.session() as s:
            row = s.get(WebSession, digest(sid))
            if row is not None:
                self.audit(s, "sign_out", row.reviewer_id)
                s.delete(row)

    # -- the queue

    def add_items(self, items: list[dict[str, Any]]) -> int:
        """Queue items (``queue.draw``'s rows); a pair already queued is left as it is. Returns how many
        were new."""
        with self.session() as s:
            known = set(s.scalars(select(Item.pair_id)).all())
            start = (s.scalar(select(func.max(Item.position))) or 0) + 1
            new = [row for row in items if row["pair_id"] not in known]
            for offset, row in enumerate(new):
                s.add(Item(**row, position=start + offset, created_at=now()))
            self.audit(s, "queue", added=len(new), offered=len(items))
        return len(new)

    def next_item(self, reviewer_id: int, per_item: int) -> Served | None:
        """The first queued item this reviewer has not decided and fewer than ``per_item`` others have, with
        a fresh form token; None when the reviewer is through."""
        with self.session() as s:
            mine = select(Decision.item_id).where(Decision.reviewer_id == reviewer_id)
            counts = (select(Decision.item_id, func.count().label("n")).group_by(Decision.item_id)
                      .subquery())  # fmt: skip
            item = s.scalar(
                select(Item).outerjoin(counts, counts.c.item_id == Item.id)
                .where(Item.id.not_in(mine), func.coalesce(counts.c.n, 0) < per_item)
                .order_by(Item.position).limit(1))  # fmt: skip
            done = s.scalar(select(func.count()).select_from(Decision).where(Decision.reviewer_id == reviewer_id))
            total = done + (s.scalar(
                select(func.count()).select_from(Item).outerjoin(counts, counts.c.item_id == Item.id)
                .where(Item.id.not_in(mine), func.coalesce(counts.c.n, 0) < per_item)) or 0)  # fmt: skip
            if item is None:
                return None
            form = secrets.token_urlsafe(24)
            s.add(FormToken(sha256=digest(form), reviewer_id=reviewer_id, item_id=item.id, issued_at=now()))
            a, b = item.answers
            return Served(item.id, item.question, a, b, form, done, total)

    def image_of(self, item_id: int) -> str | None:
        """The image path of a queued item (the only way a path reaches the file system)."""
        with self.session() as s:
            item = s.get(Item, item_id)
            return None if item is None else item.image

    # -- decisions

    def decide(self, reviewer_id: int, item_id: int, form: str, choice: str, ill_formed: bool = False,
               corrected: str = "", starred: bool = False) -> tuple[int, bool]:
        """Record a decision; returns ``(decision id, created)``. The same post sent again (same form
        token, same content) returns the decision it made with ``created=False``; any other reuse of a
        form, a form not issued to this reviewer for this item, or a second decision is refused."""
        if choice not in CHOICES:
            raise ReviewError(422, f"choice must be one of {', '.join(CHOICES)}", "bad_choice")
        form_hash = digest(form)
        try:
            with self.session() as s:
                token = s.get(FormToken, form_hash)
                if token is None or token.reviewer_id != reviewer_id or token.item_id != item_id:
                    raise ReviewError(403, "this form was not issued to you for this item; reload the page",
                                      "forged_form")
                if token.used_at is not None:
                    earlier = s.scalar(select(Decision).where(Decision.form_sha256 == form_hash))
                    same = earlier is not None and (earlier.choice, earlier.ill_formed, earlier.corrected,
                                                    earlier.starred) == (choice, ill_formed, corrected, starred)
                    if same:
                        return earlier.id, False
                    raise ReviewError(409, "this form was already used; reload the page for the current item",
                                      "replayed_form")
                if s.scalar(select(Decision.id).where(Decision.item_id == item_id,
                                                      Decision.reviewer_id == reviewer_id)):
                    raise ReviewError(409, "you have already decided this item; undo it to change it",
                                      "already_decided")
                token.used_at = now()
                decision = Decision(item_id=item_id, reviewer_id=reviewer_id, choice=choice,
                                    ill_formed=ill_formed, corrected=corrected, starred=starred,
                                    form_sha256=form_hash, created_at=now())
                s.add(decision)
                s.flush()
                self.audit(s, "decide", reviewer_id, item_id, choice=choice, ill_formed=ill_formed,
                           starred=starred, corrected=bool(corrected))
                return decision.id, True
        except IntegrityError:  # a concurrent post of the same item won the unique constraint
            raise ReviewError(409, "you have already decided this item; undo it to change it",
                              "already_decided") from None

    def undo_last(self, reviewer_id: int) -> int | None:
        """Remove the reviewer's latest decision; returns its item id (None when there is none)."""
        with self.session() as s:
            last = s.scalar(select(Decision).where(Decision.reviewer_id == reviewer_id)
                            .order_by(Decision.created_at.desc(), Decision.id.desc()).limit(1))  # fmt: skip
            if last is None:
                return None
            self.audit(s, "undo", reviewer_id, last.item_id, choice=last.choice)
            item_id = last.item_id
            s.delete(last)
            return item_id

    # -- reading back

    def labels(self) -> list[dict[str, Any]]:
        """Every decision with its item, in the judge's terms: ``preferred`` is chosen / rejected / tie /
        both_wrong, so the display order never leaks into training or calibration."""
        with self.session() as s:
            rows = s.execute(select(Decision, Item, Reviewer.name).join(Item, Decision.item_id == Item.id)
                             .join(Reviewer, Decision.reviewer_id == Reviewer.id)
                             .order_by(Decision.id)).all()  # fmt: skip
            return [label_row(d, item, name) for d, item, name in rows]

    def audit_rows(self) -> list[dict[str, Any]]:
        with self.session() as s:
            return [{"at": a.at, "reviewer_id": a.reviewer_id, "action": a.action, "item_id": a.item_id,
                     "detail": json.loads(a.detail)} for a in s.scalars(select(Audit).order_by(Audit.id))]

    def counts(self) -> dict[str, int]:
        with self.session() as s:
            return {"items": s.scalar(select(func.count()).select_from(Item)) or 0,
                    "decisions": s.scalar(select(func.count()).select_from(Decision)) or 0,
                    "reviewers": s.scalar(select(func.count()).select_from(Reviewer)) or 0}


def label_row(d: Decision, item: Item, reviewer: str) -> dict[str, Any]:
    picked = {"A": item.chosen_first, "B": not item.chosen_first}.get(d.choice)
    preferred = d.choice if picked is None else ("chosen" if picked else "rejected")
    return {
        "pair_id": item.pair_id, "reviewer": reviewer, "preferred": preferred, "shown": d.choice,
        "chosen_first": item.chosen_first, "ill_formed": d.ill_formed, "corrected": d.corrected,
        "starred": d.starred, "decided_at": d.created_at, "image": item.image, "question": item.question,
        "chosen": item.chosen, "rejected": item.rejected, "chosen_score": item.chosen_score,
        "rejected_score": item.rejected_score, "judge_model": item.judge_model, "kind": item.kind,
        "stratum": item.stratum, "swap_consistent": item.swap_consistent,
    }  # fmt: skip


def _sqlite_pragmas(connection, _record) -> None:
    # WAL: the page's reads do not wait on a decision being written; foreign keys are off by default.
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
