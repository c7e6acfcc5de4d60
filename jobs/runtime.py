"""How every job connects to Ray: an existing cluster from config, or a local one on loopback."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from stmed.config import ConfigError, RayConfig, load_config
from stmed.data.records import DataError
from stmed.log import get_logger
from stmed.train.stage import Diverged

log = get_logger(__name__)

LOOPBACK = "127.0.0.1"
EXIT_USER_ERROR = 2
T = TypeVar("T")


class NothingProduced(RuntimeError):
    """A job ran to its end with nothing usable to hand on (no preference pairs, say): a failure, with
    the counts that say why, and no ``summary.json``, so a pipeline rerun runs the stage again."""

# The environment of a local, loopback-only Ray. This machine has an external interface that Ray
# would otherwise advertise; pinning the node IP keeps the head, the workers and Ray Train's
# process group on 127.0.0.1. Token auth (on by default for a new local cluster since Ray 2.5x)
# is turned off here because nothing binds beyond loopback; a real cluster sets RAY_AUTH_MODE itself.
LOCAL_RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_NODE_IP_ADDRESS": LOOPBACK,
}


def use_local_ray_env() -> None:
    """Set the loopback-only environment for this process and its children (unless already set)."""
    for key, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(key, value)


def _pin_loopback() -> None:
    """Make an already-imported Ray honour RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0.

    Ray reads that variable once, at import; with it on (the Linux default) ``ray.init`` rewrites
    127.0.0.1 into this machine's external address. A process that imported Ray before calling
    ``init_ray`` would otherwise advertise that address.
    """
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def init_ray(cfg: RayConfig) -> None:
    """Connect to ``cfg.address`` or, when it is None, start a local Ray bound to loopback.

    Inside a submitted job Ray exports RAY_ADDRESS, and ``ray.init()`` joins that cluster whatever
    ``cfg.address`` says, which is what ``ray job submit`` expects.
    """
    local = cfg.address is None and not os.environ.get("RAY_ADDRESS")
    if local:
        use_local_ray_env()
    import ray

    if ray.is_initialized():
        return
    if local:
        _pin_loopback()
        log.info("starting a local Ray on %s with %s CPUs", LOOPBACK, cfg.num_cpus or "all")
        ray.init(
            num_cpus=cfg.num_cpus,
            include_dashboard=False,
            _node_ip_address=LOOPBACK,
            runtime_env={"env_vars": dict(LOCAL_RAY_ENV)},
        )
    else:
        log.info("joining the Ray cluster at %s", cfg.address or os.environ["RAY_ADDRESS"])
        ray.init(address=cfg.address)


def run_job(main: Callable[[T], Any], cls: type[T], argv: list[str] | None = None) -> None:
    """A job's ``__main__``: parse its config, run ``main``, and end a user mistake with one line.

    A mistake in the config or the inputs (``ConfigError``: a key, a missing file; ``DataError``: a file
    that is not what it claims, or gives nothing usable) is the user's to fix, not a bug: one line on
    stderr naming it, exit code 2, no traceback, and nothing retried. A run that diverged or produced
    nothing is one line too, with exit code 1.
    """
    cfg = load_config(cls, argv)
    try:
        main(cfg)
    except (ConfigError, DataError) as err:
        kind = "config error" if isinstance(err, ConfigError) else "input error"
        sys.stderr.write(f"{kind}: {' '.join(str(err).split())}\n")
        raise SystemExit(EXIT_USER_ERROR) from None
    except (Diverged, NothingProduced) as err:  # the job ran and failed for a reason it can name
        sys.stderr.write(f"failed: {' '.join(str(err).split())}\n")
        raise SystemExit(1) from None
