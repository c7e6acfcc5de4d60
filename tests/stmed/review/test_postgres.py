"""The review database on a real PostgreSQL server (``STMED_TEST_POSTGRES_URL``; .ci/run starts one): the
same round as on SQLite, its connections killed mid-session, and a schema from another version refused."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from stmed.review.store import Base, Store
from stmed.review.web import build
from tests.stmed.review.fixtures import queued_store
from tests.stmed.review.needs import need

URL = os.environ.get("STMED_TEST_POSTGRES_URL", "")


@pytest.fixture
def pg_url() -> str:
    need(bool(URL), "STMED_TEST_POSTGRES_URL is not set: no PostgreSQL server to test against")
    engine = create_engine(URL)
    with engine.begin() as conn:  # a clean database for each test
        Base.metadata.drop_all(conn)
    engine.dispose()
    return URL


def test_a_round_survives_its_connections_being_killed(tmp_path: Path, pg_url: str):
    store = queued_store(tmp_path, url=pg_url, items=4)
    assert store.engine.dialect.name == "postgresql"
    token = store.add_reviewer("dr-pg")
    client = TestClient(build(store), base_url="http://127.0.0.1")
    csrf = re.search(r'name="csrf" value="([^"]+)"', client.get("/signin").text).group(1)
    client.post("/signin", data={"token": token, "csrf": csrf})
    page = client.get("/review").text
    client.headers["X-CSRF-Token"] = re.search(r'name="csrf-token" content="([^"]+)"', page).group(1)
    item = client.get("/api/next").json()
    post = {"item_id": item["item_id"], "form": item["form"], "choice": "A", "starred": True}
    assert client.post("/api/decisions", json=post).status_code == 201

    # The server drops every connection the app holds (a restart, a failover): the pool reconnects.
    admin = create_engine(pg_url)
    with admin.begin() as conn:
        killed = conn.execute(text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                   "WHERE datname = current_database() AND pid <> pg_backend_pid()")).scalar()
    admin.dispose()
    assert killed >= 1
    assert client.post("/api/decisions", json=post).status_code == 200  # the retry: recognised, not doubled
    second = client.get("/api/next").json()
    assert client.post("/api/decisions", json={"item_id": second["item_id"], "form": second["form"],
                                                "choice": "both_wrong"}).status_code == 201
    assert client.post("/api/decisions", json={"item_id": item["item_id"], "form": second["form"],
                                                "choice": "B"}).status_code == 403
    labels = store.labels()
    assert [(row["reviewer"], row["starred"]) for row in labels] == [("dr-pg", True), ("dr-pg", False)]
    assert {row["action"] for row in store.audit_rows()} >= {"queue", "add_reviewer", "sign_in", "decide"}
    store.engine.dispose()

    with create_engine(pg_url).begin() as conn:
        conn.execute(text("UPDATE schema_version SET version = 99"))
    with pytest.raises(ValueError, match="schema version"):
        Store(pg_url)
