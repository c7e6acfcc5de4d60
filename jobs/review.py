"""Stage: clinicians review judged pairs in a web app (METHOD §7); their labels calibrate and override the judge.

    python -m jobs.review add-reviewer dr-lee --config jobs/configs/review.yaml   # prints a token once
    python -m jobs.review --config jobs/configs/review.yaml queue.preferences=runs/demo/generate/preferences.parquet
    python -m jobs.review export --config jobs/configs/review.yaml               # labels, κ, demonstrations
    ray job submit --working-dir . -- python -m jobs.review --config jobs/configs/review.yaml \
        database_env=STMED_REVIEW_DATABASE_URL http.host=0.0.0.0 http.allow_plain_http_beyond_loopback=true

Serving (the default command) queues ``queue.items`` pairs of ``queue.preferences`` (once: a pair already
queued stays as it is, so a restart resumes the round) and serves the app until stopped. ``export`` writes
``labels.parquet``, ``labels.jsonl``, ``demonstrations.jsonl`` and ``calibration.json`` (the judge's
agreement and Cohen's κ with the clinicians, ``stmed.eval.calibration``) to ``output_dir`` and a summary.
On a cluster, run it as a RayService through :func:`app_builder`
(``cluster/kuberay/rayservice-review.yaml``).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stmed.config import ConfigError, build_config, load_config, read_yaml, write_config
from stmed.eval.calibration import calibrate
from stmed.log import get_logger
from stmed.review.export import write_labels
from stmed.review.queue import QueueConfig, draw_from_run
from stmed.review.server import HTTPConfig, RunningApp, start
from stmed.review.store import Store
from stmed.review.web import WebLimits, build
from stmed.runs import write_json, write_summary

log = get_logger("stmed.jobs.review")


@dataclass(frozen=True)
class ReviewConfig:
    """Serve the clinician review app for a generate run's judged pairs."""

    output_dir: str
    database: str | None = None
    """An SQLAlchemy URL (``sqlite:///path.db``, ``postgresql+psycopg://user@host/db``); default: an SQLite
    file ``output_dir/review.db``."""
    database_env: str | None = None
    """An environment variable holding the database URL instead (keeps a password out of the config)."""
    queue: QueueConfig = field(default_factory=QueueConfig)
    http: HTTPConfig = field(default_factory=HTTPConfig)
    web: WebLimits = field(default_factory=WebLimits)
    kappa_threshold: float = 0.6
    """The judge is fit for this data when the lower end of its κ's 95% interval reaches this."""
    generate_dir: str | None = None
    """The generate run whose ``parts/`` hold swapped-order verdicts (default: queue.preferences' folder)."""
    blocking: bool = True
    """Serve until stopped; False returns the running app (tests, the pipeline)."""

    def __post_init__(self) -> None:
        if self.database and self.database_env:
            raise ConfigError("set database or database_env, not both")
        if not -1.0 <= self.kappa_threshold <= 1.0:
            raise ConfigError(f"kappa_threshold must be in [-1, 1], got {self.kappa_threshold}")

    def database_url(self) -> str:
        if self.database_env:
            url = os.environ.get(self.database_env, "").strip()
            if not url:
                raise ConfigError(f"database_env={self.database_env}, but that variable is empty or unset")
            return url
        return self.database or f"sqlite:///{Path(self.output_dir).resolve() / 'review.db'}"


def open_store(cfg: ReviewConfig) -> Store:
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    return Store(cfg.database_url())


def serve(cfg: ReviewConfig) -> RunningApp:
    """Queue the pairs (when ``queue.preferences`` is set) and start the app; blocks when ``cfg.blocking``."""
    store = open_store(cfg)
    if cfg.queue.preferences:
        added = store.add_items(draw_from_run(cfg.queue))
        log.info("queued %d new pairs (%d in the round)", added, store.counts()["items"])
    limits = WebLimits(**{**cfg.web.__dict__, "secure_cookies": cfg.web.secure_cookies or cfg.http.tls})
    running = start(build(store, cfg.queue.reviewers_per_item, limits), cfg.http)
    write_config(cfg, cfg.output_dir)
    log.info("review app on %s (%s)", running.url, store.safe_url)
    if cfg.blocking:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `ray job stop`
        try:
            running.wait()
        except KeyboardInterrupt:
            log.info("interrupted")
        finally:
            running.stop()
    return running


def export(cfg: ReviewConfig) -> dict[str, Any]:
    """Labels, demonstrations and the judge's calibration into ``output_dir``; returns the summary."""
    store, out = open_store(cfg), Path(cfg.output_dir)
    labels = store.labels()
    paths = write_labels(labels, out)
    generate_dir = cfg.generate_dir or (str(Path(cfg.queue.preferences).parent) if cfg.queue.preferences else None)
    calibration = calibrate(labels, cfg.kappa_threshold, Path(generate_dir) if generate_dir else None)
    write_json(out / "calibration.json", calibration)
    with store.session() as s:
        store.audit(s, "export", decisions=len(labels))
    summary = {"stage": "review", **store.counts(), "labels": len(labels),
               "demonstrations": len(paths["demonstrations.jsonl"].read_text().splitlines()),
               "verdict": calibration["verdict"], "outputs": {k: str(v) for k, v in paths.items()}}
    write_summary(out, summary)
    log.info("%d labels exported to %s; %s", len(labels), out, calibration["verdict"])
    return summary


def simulated_round(cfg: ReviewConfig, findings: str | Path) -> dict[str, Any]:
    """The embedded default's review stage: serve the round on loopback (a free port), let simulated
    clinicians (``reviewers_per_item`` of them) review it through the HTTP API, then export."""
    from stmed.judge.reference import load_digest_index
    from stmed.review.simulated import SimulatedClinician

    cfg = dataclasses.replace(cfg, blocking=False, http=HTTPConfig(port=0))
    running = serve(cfg)
    try:
        index, store, counts = load_digest_index(findings), open_store(cfg), []
        for _ in range(cfg.queue.reviewers_per_item):
            token = store.add_reviewer(f"simulated-clinician-{store.counts()['reviewers'] + 1}")
            counts.append(SimulatedClinician(running.url, token, index).review())
    finally:
        running.stop()
    summary = export(cfg)
    write_summary(cfg.output_dir, {**summary, "simulated_clinicians": counts})
    return {**summary, "simulated_clinicians": counts}


def add_reviewer(cfg: ReviewConfig, name: str) -> str:
    return open_store(cfg).add_reviewer(name)


def app_builder(args: dict[str, Any]):
    """Ray Serve's application builder (a RayService): ``{"config": FILE, "overrides": [...]}``. The replica
    opens the database and builds the app itself (an engine does not travel between processes)."""
    from ray import serve

    cfg = build_config(ReviewConfig, read_yaml(args["config"]), list(args.get("overrides", [])))
    if cfg.queue.preferences:
        open_store(cfg).add_items(draw_from_run(cfg.queue))

    @serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0.25})
    class ReviewApp:
        def __init__(self, cfg: ReviewConfig):
            self.app = build(open_store(cfg), cfg.queue.reviewers_per_item, cfg.web)

        async def __call__(self, request):
            return await asgi_response(self.app, request)

    return ReviewApp.bind(cfg)


async def asgi_response(app, request):
    """Run one Starlette ``request`` (what Serve hands a deployment) through the ASGI ``app``."""
    from starlette.responses import Response

    sent: dict[str, Any] = {"body": b"", "status": 500, "headers": []}

    async def send(message):
        if message["type"] == "http.response.start":
            sent["status"], sent["headers"] = message["status"], message["headers"]
        elif message["type"] == "http.response.body":
            sent["body"] += message.get("body", b"")

    await app(request.scope, request.receive, send)
    response = Response(sent["body"], sent["status"])
    response.raw_headers = list(sent["headers"])
    return response


COMMANDS = ("add-reviewer", "export")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "serve"
    name = argv.pop(0) if command == "add-reviewer" and argv and not argv[0].startswith("-") else None
    if command == "add-reviewer" and not name:
        print("usage: python -m jobs.review add-reviewer NAME --config FILE", file=sys.stderr)
        raise SystemExit(2)
    cfg = load_config(ReviewConfig, argv)
    try:
        if command == "add-reviewer":
            token = add_reviewer(cfg, name)
            print(f"reviewer {name}: token (shown once, only its hash is stored):\n{token}")
        elif command == "export":
            export(cfg)
        else:
            serve(cfg)
    except (ConfigError, ValueError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
