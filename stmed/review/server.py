"""Where the review app listens: loopback by default; beyond it only with TLS or an explicit flag.

``start`` runs uvicorn in a background thread (the job's foreground waits on it; tests and the pipeline's
simulated clinician talk to it and stop it). The socket is bound here, so a taken port fails in the
caller and port 0's pick is known.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from stmed.config import ConfigError
from stmed.log import get_logger
from stmed.privacy.hosts import is_loopback_host

log = get_logger("stmed.review")


@dataclass(frozen=True)
class HTTPConfig:
    """Where the review app listens (config group ``http``)."""

    host: str = "127.0.0.1"
    """Loopback by default. Any other address needs tls_certfile/tls_keyfile, or allow_plain_http_beyond_
    loopback when a TLS-terminating proxy or ingress sits in front."""
    port: int = 8300
    tls_certfile: str | None = None
    tls_keyfile: str | None = None
    allow_plain_http_beyond_loopback: bool = False
    """Serve plain HTTP on a non-loopback address (behind a TLS ingress only: tokens cross the wire)."""

    def __post_init__(self) -> None:
        if bool(self.tls_certfile) != bool(self.tls_keyfile):
            raise ConfigError("http.tls_certfile and http.tls_keyfile go together: set both or neither")
        if not is_loopback_host(self.host) and not self.tls and not self.allow_plain_http_beyond_loopback:
            raise ConfigError(f"http.host={self.host} is beyond loopback: set http.tls_certfile and "
                              "http.tls_keyfile, or http.allow_plain_http_beyond_loopback=true behind a TLS "
                              "ingress")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"http.port must be 0-65535, got {self.port}")

    @property
    def tls(self) -> bool:
        return bool(self.tls_certfile)


class RunningApp:
    def __init__(self, server: Any, thread: threading.Thread, url: str):
        self._server, self._thread, self.url = server, thread, url

    def stop(self, timeout_s: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout_s)

    def wait(self) -> None:
        while self._thread.is_alive():
            self._thread.join(0.5)


def start(app: Any, http: HTTPConfig, start_timeout_s: float = 20.0) -> RunningApp:
    import uvicorn  # deferred: only a process that serves pays for it

    sock = socket.socket(socket.AF_INET6 if ":" in http.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((http.host, http.port))
    except OSError as err:
        sock.close()
        raise ConfigError(f"http: cannot listen on {http.host}:{http.port}: {err.strerror or err}") from None
    port = sock.getsockname()[1]
    # No access log: paths carry only ids, but a reviewer's traffic is nobody's business.
    config = uvicorn.Config(app, host=http.host, port=port, log_level="warning", access_log=False,
                            lifespan="off", ssl_certfile=http.tls_certfile, ssl_keyfile=http.tls_keyfile)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="review-app", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError(f"review app on {http.host}:{port} did not start within {start_timeout_s} s")
        time.sleep(0.01)
    host = f"[{http.host}]" if ":" in http.host else http.host
    return RunningApp(server, thread, f"{'https' if http.tls else 'http'}://{host}:{port}")
