"""The judge as a Ray Data actor: an async chat-completions client that scores a batch of pairs at once.

    ds.map_batches(
        Judge,
        fn_constructor_kwargs={"settings": judge_settings, "num_actors": 4},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=4),
        batch_size=16,
    )

How Ray Data 2.60 runs it: because ``__call__`` is a coroutine function, the actor pool sees an async
UDF. Each actor builds ``Judge`` once, starts one asyncio event loop in a daemon thread, and feeds that
loop up to ``RAY_DATA_DEFAULT_ASYNC_BATCH_UDF_MAX_CONCURRENCY`` (default 4) batches at a time, handing
the results back in input order. All batches of an actor therefore share this instance's client,
semaphore and rate buckets, which is what makes ``max_in_flight`` a per-actor bound. ``__init__`` runs
outside that loop: nothing here may need a running loop at construction (the semaphore binds lazily,
the direct transport opens its HTTP session on the first request).

``num_actors`` should be the pool's ``max_size``: the run-wide RPM/TPM budgets are split by it. The spend
budget is not split: ``ledger`` (``actors.ledger.start_ledger``) is one actor every judge reserves from.
With ``judge.mode=batch`` the actor only gates: its rows leave unjudged (``PENDING``), the masked image
still on them, for the driver's one Batch API job (``stmed.judge.batch``).
The API key is read from ``settings.api_key_env`` inside the actor, so on a cluster that variable
must reach the workers (``runtime_env={"env_vars": ...}``); a loopback judge needs none.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
from typing import Any

import numpy as np

from actors.ledger import RemoteSpend
from stmed.config import build_config
from stmed.data.images import ImageLoadError
from stmed.judge.cache import ReplyCache
from stmed.judge.judging import JudgeSettings, JudgeVerdict, judge_pair, make_limiter, make_transport
from stmed.judge.ledger import Spend
from stmed.privacy.gate import REFUSED, PrivacySettings, TextGate

INPUT_COLUMNS = ("pair_id", "question", "answer1", "answer2", "image_data_url")
VERDICT_COLUMNS = tuple(f.name for f in dataclasses.fields(JudgeVerdict) if f.name != "pair_id")
GATE_COLUMNS = ("gate_action", "gate_regions", "sent_digest")
REFUSED_ERROR = "privacy: burned-in text, image refused (privacy.burned_in_text=refuse)"
PENDING = "pending: judge.mode=batch, not judged yet"
"""The error of a row left for the batch phase; it keeps its (gated) image until judged."""


def _column(values: list[Any]) -> np.ndarray:
    # None (a failed pair's score, an absent error) needs an object column; Arrow then stores a null.
    return np.array(values, dtype=object) if any(v is None for v in values) else np.array(values)


class Judge:
    """Scores every row of a batch concurrently; output = input columns minus the image, plus the
    verdict's columns (``score1``, ``score2``, ``error``, ``attempts``, …)."""

    def __init__(self, settings: JudgeSettings | dict[str, Any], num_actors: int = 1,
                 http_client: Any = None, privacy: PrivacySettings | dict[str, Any] | None = None,
                 ledger: Any = None, spend: Spend | None = None):
        """``http_client`` (an ``httpx.AsyncClient``, sent through the openai SDK) is for in-process use,
        e.g. a mock transport. ``privacy``: the burned-in-text gate for rows that arrive ungated (no
        ``gate_action``); rows a generator gated pass as they are. ``ledger``: the run's ledger actor
        (``actors.ledger``); ``spend``: an in-process one (``stmed.judge.ledger.LocalSpend``)."""
        self.settings = settings if isinstance(settings, JudgeSettings) else build_config(JudgeSettings, settings)
        privacy = privacy if isinstance(privacy, PrivacySettings) else build_config(PrivacySettings, privacy or {})
        self.gate = TextGate(privacy)
        self.gated_urls: dict[str, tuple[str | None, str, int, str]] = {}
        self.client = make_transport(self.settings, http_client)
        self.limiter = make_limiter(self.settings, num_actors)
        self.cache = ReplyCache(self.settings.cache_dir) if self.settings.cache_dir else None
        self.spend = spend if spend is not None else RemoteSpend(ledger) if ledger is not None else None
        # What the actor process has imported (Ray, torch, transformers: ~300k objects) lives as long as
        # the process. Left in the collector, every full collection re-scans it for ~200 ms, a stall of
        # the event loop that every request in flight waits out; frozen, it is never scanned again.
        gc.freeze()

    def __del__(self) -> None:
        # Ray Data drops the UDF when the pool shuts down gracefully, while the actor's event loop still
        # runs: the HTTP session is closed on it, not left to the collector's "Unclosed client session".
        close = getattr(getattr(self, "client", None), "close_from_thread", None)
        if close is not None:
            with contextlib.suppress(Exception):  # a teardown has no one to report to
                close()

    async def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [name for name in INPUT_COLUMNS if name not in batch]
        if missing:
            raise ValueError(f"Judge needs the column(s) {missing}; the batch has {sorted(batch)}")
        batch = self._gated(batch)
        if self.settings.mode == "batch":
            verdicts = self._refused_or_pending(batch)
            out = dict(batch)  # the gated image stays on a pending row, for the batch
            out["image_data_url"] = np.array([url if v.error == PENDING else "" for url, v in
                                              zip(batch["image_data_url"], verdicts)], dtype=object)
        else:
            verdicts = await self._judge_rows(batch)
            out = {name: column for name, column in batch.items() if name != "image_data_url"}
        for name in VERDICT_COLUMNS:  # the fields ``JudgeVerdict.to_row`` holds, read column by column
            out[name] = _column([getattr(v, name) for v in verdicts])
        return out

    def _gated(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The batch with every ungated row's image through the gate (once per distinct image URL):
        masked pixels in ``image_data_url``, the gate's columns filled, a refused image's URL empty."""
        n = len(batch["pair_id"])
        actions = batch.get("gate_action", np.full(n, "", dtype=object))
        if all(str(a) for a in actions):
            return batch
        columns = {"image_data_url": list(batch["image_data_url"]), "gate_action": list(actions),
                   "gate_regions": list(batch.get("gate_regions", np.zeros(n, dtype=np.int64))),
                   "sent_digest": list(batch.get("sent_digest", np.full(n, "", dtype=object)))}
        for i in range(n):
            if str(actions[i]):
                continue
            url = str(batch["image_data_url"][i])
            if url not in self.gated_urls:
                try:
                    result = self.gate.check_data_url(url)
                    self.gated_urls[url] = (result.data_url, result.action, result.regions, result.sent_digest)
                except ImageLoadError:  # pixels the gate cannot read (a remote URL, a bad image) are not sent
                    self.gated_urls[url] = (None, REFUSED, 0, "")
            sent, action, regions, digest = self.gated_urls[url]
            columns["image_data_url"][i] = sent or ""
            columns["gate_action"][i], columns["gate_regions"][i], columns["sent_digest"][i] = action, regions, digest
        return {**batch, **{name: np.array(values, dtype=object) for name, values in columns.items()}}

    @staticmethod
    def _refused_or_pending(batch: dict[str, np.ndarray]) -> list[JudgeVerdict]:
        n = len(batch["pair_id"])
        refused = batch.get("gate_action", np.full(n, "", dtype=object)) == REFUSED
        return [JudgeVerdict(str(pid), None, None, error=REFUSED_ERROR if no else PENDING)
                for pid, no in zip(batch["pair_id"], refused)]

    async def _judge_rows(self, batch: dict[str, np.ndarray]) -> list[JudgeVerdict]:
        """A verdict per row, by a few workers that each take the next row: ``2 * max_in_flight`` of
        them keep every slot busy (a worker waiting out a backoff holds none) without a task, a
        semaphore waiter and a pair's state for each of the batch's thousands of rows."""
        n = len(batch["pair_id"])
        verdicts: list[JudgeVerdict | None] = [None] * n
        todo = iter(range(n))

        refused = batch.get("gate_action", np.full(n, "", dtype=object)) == REFUSED

        async def worker() -> None:
            for i in todo:  # one iterator: each row goes to exactly one worker
                if refused[i]:  # nothing is sent: the gate refused the image
                    verdicts[i] = JudgeVerdict(str(batch["pair_id"][i]), None, None, error=REFUSED_ERROR)
                    continue
                verdicts[i] = await judge_pair(
                    self.client, self.settings, self.limiter, self.cache, str(batch["question"][i]),
                    str(batch["answer1"][i]), str(batch["answer2"][i]), str(batch["image_data_url"][i]),
                    pair_id=str(batch["pair_id"][i]), spend=self.spend)

        await asyncio.gather(*(worker() for _ in range(min(n, 2 * self.settings.max_in_flight))))
        return verdicts
