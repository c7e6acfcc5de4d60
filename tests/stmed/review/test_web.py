"""The review app over HTTP (FastAPI's TestClient, an SQLite file): sign-in, CSRF, one-use forms, undo,
images by item id, limits, and a database that fails mid-session."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError

from stmed.review.export import apply_labels, read_labels, write_labels
from stmed.review.store import Store
from stmed.review.web import WebLimits, build
from tests.stmed.review.fixtures import queued_store


@pytest.fixture(scope="module")
def round_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("review")


def signed_in(store: Store, name: str, per_item: int = 1, limits: WebLimits | None = None):
    token = store.add_reviewer(name)
    client = TestClient(build(store, per_item, limits), base_url="http://127.0.0.1")
    page = client.get("/signin")
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    response = client.post("/signin", data={"token": token, "csrf": csrf}, follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/review"
    review = client.get("/review")
    session_csrf = re.search(r'name="csrf-token" content="([^"]+)"', review.text).group(1)
    client.headers["X-CSRF-Token"] = session_csrf
    return client


def test_a_round_by_http(round_dir: Path):
    store = queued_store(round_dir)
    client = signed_in(store, "dr-a")
    first = client.get("/api/next").json()
    assert first["progress"] == {"done": 0, "total": 10}
    assert set(first) == {"done", "item_id", "question", "answer_a", "answer_b", "form", "image", "progress"}
    assert client.get("/api/next").headers["cache-control"] == "no-store"
    image = client.get(first["image"])
    assert image.status_code == 200 and image.content[:8] == b"\x89PNG\r\n\x1a\n"

    post = {"item_id": first["item_id"], "form": first["form"], "choice": "A", "starred": True}
    assert client.post("/api/decisions", json=post).status_code == 201
    again = client.post("/api/decisions", json=post)  # the page's retry after a lost reply: not doubled
    assert again.status_code == 200 and again.json()["created"] is False
    changed = client.post("/api/decisions", json={**post, "choice": "B"})  # a replayed form, other content
    assert changed.status_code == 409 and changed.json()["error"]["code"] == "replayed_form"

    second = client.get("/api/next").json()
    assert second["item_id"] != first["item_id"] and second["progress"]["done"] == 1
    forged = client.post("/api/decisions", json={**post, "item_id": second["item_id"]})
    assert forged.status_code == 403 and forged.json()["error"]["code"] == "forged_form"
    made_up = client.post("/api/decisions", json={**post, "form": "x" * 32})
    assert made_up.status_code == 403
    assert client.post("/api/decisions", json={"item_id": second["item_id"], "form": second["form"],
                                                "choice": "tie", "ill_formed": True,
                                                "corrected": "A corrected answer."}).status_code == 201
    assert client.post("/api/undo").json() == {"undone_item_id": second["item_id"]}
    back = client.get("/api/next").json()
    assert back["item_id"] == second["item_id"]  # undo puts the item back at the front
    assert client.post("/api/decisions", json={"item_id": second["item_id"], "form": second["form"],
                                                "choice": "tie"}).status_code == 409  # the undone form
    assert client.post("/api/decisions", json={"item_id": back["item_id"], "form": back["form"],
                                                "choice": "both_wrong"}).status_code == 201

    labels = store.labels()
    assert labels[0]["preferred"] == ("chosen" if labels[0]["chosen_first"] else "rejected")  # "A" was picked
    assert labels[1]["preferred"] == "both_wrong"
    assert [row["starred"] for row in labels] == [True, False]
    actions = [row["action"] for row in store.audit_rows()]
    assert actions.count("decide") == 3 and actions.count("undo") == 1 and "sign_in" in actions
    paths = write_labels(labels, round_dir / "export")
    assert len(read_labels(paths["labels.parquet"])) == 2 == len(read_labels(paths["labels.jsonl"]))
    assert len(paths["demonstrations.jsonl"].read_text().splitlines()) == 1


def test_refusals(tmp_path: Path):
    store = queued_store(tmp_path, items=2)
    anonymous = TestClient(build(store, 1, WebLimits(login_attempts=2)), base_url="http://127.0.0.1")
    assert anonymous.get("/api/next").status_code == 401
    assert anonymous.get("/api/items/1/image").status_code == 401
    assert anonymous.get("/review", follow_redirects=False).headers["location"] == "/signin"
    page = anonymous.post("/signin", data={"token": "wrong", "csrf": "forged"})
    assert page.status_code == 403
    for _ in range(2):  # each answer is a fresh form with a fresh token
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
        page = anonymous.post("/signin", data={"token": "wrong", "csrf": csrf})
        assert page.status_code == 401 and "not valid" in page.text
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    limited = anonymous.post("/signin", data={"token": "wrong", "csrf": csrf})
    assert limited.status_code == 429 and "retry-after" in limited.headers

    client = signed_in(store, "dr-b")
    item = client.get("/api/next").json()
    no_csrf = client.post("/api/decisions", json={"item_id": item["item_id"], "form": item["form"], "choice": "A"},
                          headers={"X-CSRF-Token": "nope"})
    assert no_csrf.status_code == 403 and no_csrf.json()["error"]["code"] == "csrf"
    big = client.post("/api/decisions", content=b"{" + b" " * 20000 + b"}",
                      headers={"content-type": "application/json"})
    assert big.status_code == 413
    assert client.post("/api/decisions", json={"item_id": item["item_id"], "form": item["form"],
                                                "choice": "maybe"}).status_code == 422
    assert client.get("/api/items/999/image").status_code == 404
    assert client.get("/api/items/..%2F..%2Fetc%2Fpasswd/image").status_code in (404, 422)
    assert client.get("/static/..%2Freview.py").status_code == 404
    assert store.counts()["decisions"] == 0


def test_the_database_fails_mid_session(tmp_path: Path, monkeypatch):
    store = queued_store(tmp_path, items=2)
    client = signed_in(store, "dr-c")
    item = client.get("/api/next").json()
    post = {"item_id": item["item_id"], "form": item["form"], "choice": "B"}
    real = store.decide

    def gone(*args, **kwargs):
        raise OperationalError("INSERT", {}, Exception("server closed the connection unexpectedly"))

    monkeypatch.setattr(store, "decide", gone)
    down = client.post("/api/decisions", json=post)
    assert down.status_code == 503 and down.json()["error"]["code"] == "database_unavailable"
    monkeypatch.setattr(store, "decide", real)
    assert client.post("/api/decisions", json=post).status_code == 201  # the page's retry, same form
    assert client.post("/api/decisions", json=post).status_code == 200
    assert store.counts()["decisions"] == 1


def test_k_reviewers_per_item_and_labels_override_the_judge(tmp_path: Path):
    store = queued_store(tmp_path, items=3, reviewers_per_item=2)
    clients = [signed_in(store, name, per_item=2) for name in ("r1", "r2", "r3")]
    for client, choice in zip(clients[:2], ("A", "tie")):
        for _ in range(3):
            item = client.get("/api/next").json()
            assert client.post("/api/decisions", json={"item_id": item["item_id"], "form": item["form"],
                                                        "choice": choice}).status_code == 201
    assert clients[2].get("/api/next").json() == {"done": True}  # every item has its two reviewers
    labels = store.labels()
    from stmed.data.records import read_preferences

    pairs = read_preferences(tmp_path / "generate" / "preferences.parquet")
    kept, counts = apply_labels(pairs, labels)
    assert counts["reviewed"] == 3 and counts["dropped"] == 3  # A against tie: a split vote drops the pair
    assert len(kept) == len(pairs) - 3
    one = [row for row in labels if row["reviewer"] == "r1"]
    kept, counts = apply_labels(pairs, one)
    swapped = {row["pair_id"] for row in one if row["preferred"] == "rejected"}
    assert counts["swapped"] == len(swapped)
    assert all(p.chosen != q.chosen for p in kept for q in pairs if p.pair_id == q.pair_id and p.pair_id in swapped)
