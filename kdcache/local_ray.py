"""Starting a Ray of our own on 127.0.0.1 only (the teacher stage, Ray Train, Ray Tune).

A new local Ray binds its GCS, raylet, object manager and agents to the machine's address
and to all interfaces, unless it runs in Ray's single-machine mode. :func:`loopback_ray`
sets that mode around ``ray.init`` when kdcache starts a Ray for itself; joining a cluster
(an address, ``RAY_ADDRESS``) is left alone. Ray is not imported here unless installed.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)


@contextlib.contextmanager
def loopback_ray() -> Iterator[dict[str, Any]]:
    """While a Ray that this process starts for itself runs: every server on 127.0.0.1.

    A new local Ray (``ray.init()`` without an address) binds its GCS, raylet, object
    manager and agents to the machine's address and all interfaces, except in Ray's
    single-machine mode (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, the mode it uses on
    macOS and Windows). The variable reaches the processes ``ray.init`` starts through the
    environment; this process read it when it imported Ray, so its constant is set too.
    Both are restored on exit.

    Yields:
        Keyword arguments for ``ray.init`` (``_node_ip_address="127.0.0.1"``).
    """
    name = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
    saved_env = os.environ.get(name)
    os.environ[name] = "0"
    constants: Any = None
    try:
        from ray._private import ray_constants

        constants = ray_constants
    except ImportError:  # Ray moved it: the servers may listen beyond loopback
        log.warning("cannot keep the local Ray on 127.0.0.1 (Ray's constants moved)")
    saved = getattr(constants, "ENABLE_RAY_CLUSTER", None)
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False
    try:
        yield {"_node_ip_address": "127.0.0.1"}
    finally:
        if constants is not None:
            constants.ENABLE_RAY_CLUSTER = saved
        if saved_env is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved_env


def starts_a_local_ray(address: str | None) -> bool:
    """Whether ``ray.init(address=address)`` starts a new Ray rather than joining one."""
    if address in (None, ""):
        return not os.environ.get("RAY_ADDRESS")
    return address == "local"
