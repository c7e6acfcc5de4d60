"""A simulated clinician for the embedded default: it reviews through the same HTTP API a person's browser
uses — signs in with a token, reads the queue, fetches each image, posts decisions — and decides from the
phantom's known findings.

It recognises an image by its pixel digest (as the reference judge does) and reads each answer with the
grading rules, but it decides the way a clinician would, on correctness alone: the right answer is better;
two right answers are equally good; two wrong ones are both wrong. The judge scores detail and length on
top of correctness, so the two disagree where the judge prefers one of two right answers (or of two
wrong ones): κ below 1 measures that, not chance. A question the rules cannot read is flagged ill-formed;
every ``star_every``-th right answer to a gradable question is starred as a demonstration.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import Any

import httpx
from PIL import Image

from stmed.data.images import pixel_digest
from stmed.data.synthetic import Findings
from stmed.judge.grading import gradable, judge_answer

RIGHT = 6
"""A grading score at or above this is a right answer (right: 8-10, or 4+ with an added falsehood)."""


def decide(question: str, answer_a: str, answer_b: str, findings: Findings) -> tuple[str, bool]:
    """``(choice, ill_formed)`` for one item."""
    right_a, right_b = (judge_answer(question, a, findings).score >= RIGHT for a in (answer_a, answer_b))
    choice = {(True, True): "tie", (False, False): "both_wrong", (True, False): "A", (False, True): "B"}
    return choice[right_a, right_b], not gradable(question)


@dataclass
class SimulatedClinician:
    """Reviews every item the app gives it; ``findings`` by pixel digest (``load_digest_index``)."""

    url: str
    token: str
    findings: dict[str, Findings]
    star_every: int = 4

    def review(self, limit: int | None = None) -> dict[str, Any]:
        """Decide items until the queue is done (or ``limit``); returns counts by choice."""
        counts: dict[str, Any] = {"decided": 0, "unknown_image": 0, "starred": 0, "choices": {}}
        right_seen = 0
        with httpx.Client(base_url=self.url, timeout=30.0) as client:
            self._sign_in(client)
            while limit is None or counts["decided"] < limit:
                item = _ok(client.get("/api/next"))
                if item["done"]:
                    break
                image = Image.open(io.BytesIO(_ok_bytes(client.get(item["image"]))))
                findings = self.findings.get(pixel_digest(image.convert("RGB")))
                if findings is None:  # not a phantom: a clinician would say so; skip it here
                    counts["unknown_image"] += 1
                    choice, ill_formed = "both_wrong", True
                else:
                    choice, ill_formed = decide(item["question"], item["answer_a"], item["answer_b"], findings)
                starred = False
                if choice in ("A", "tie") and not ill_formed:
                    right_seen += 1
                    starred = right_seen % self.star_every == 0
                _ok(client.post("/api/decisions", json={"item_id": item["item_id"], "form": item["form"],
                                                        "choice": choice, "ill_formed": ill_formed,
                                                        "starred": starred}))
                counts["decided"] += 1
                counts["starred"] += starred
                counts["choices"][choice] = counts["choices"].get(choice, 0) + 1
        return counts

    def _sign_in(self, client: httpx.Client) -> None:
        form = client.get("/signin").text
        csrf = re.search(r'name="csrf" value="([^"]+)"', form).group(1)
        signed = client.post("/signin", data={"token": self.token, "csrf": csrf})
        if signed.status_code != 303:
            raise RuntimeError(f"simulated clinician: sign-in refused ({signed.status_code})")
        page = _ok_text(client.get("/review"))
        client.headers["X-CSRF-Token"] = re.search(r'name="csrf-token" content="([^"]+)"', page).group(1)


def _ok(response: httpx.Response) -> dict[str, Any]:
    if response.status_code >= 400:
        raise RuntimeError(f"review app answered {response.status_code}: {response.text[:200]}")
    return response.json()


def _ok_bytes(response: httpx.Response) -> bytes:
    if response.status_code >= 400:
        raise RuntimeError(f"review app answered {response.status_code} for an image")
    return response.content


def _ok_text(response: httpx.Response) -> str:
    if response.status_code >= 400:
        raise RuntimeError(f"review app answered {response.status_code} for the page")
    return response.text
