"""The judge host allowlist: an image goes only to a host the config names, or to this machine.

``judge.allowed_hosts`` lists host names (``api.openai.com``) or IP addresses; loopback (``localhost``,
127.0.0.0/8, ::1) is always allowed, so the offline reference judge needs no entry. A judge URL whose
host is elsewhere is refused when the config is built, before any request, with one line naming the key.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlparse

from stmed.config import ConfigError


def url_host(url: str) -> str:
    """The URL's host, lower-case, without port or IPv6 brackets."""
    return (urlparse(url).hostname or "").lower().rstrip(".")


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_allowed_host(url: str, allowed_hosts: list[str] | tuple[str, ...], key: str = "judge.base_url") -> str:
    """The URL's host if it is loopback or listed; else ``ConfigError`` naming ``judge.allowed_hosts``."""
    host = url_host(url)
    if is_loopback_host(host) or host in {h.lower().rstrip(".") for h in allowed_hosts}:
        return host
    listed = ", ".join(allowed_hosts) if allowed_hosts else "none"
    raise ConfigError(f"{key} host {host!r} is not in judge.allowed_hosts ({listed}; loopback is always "
                      f"allowed): add it there to let images go to it")
