"""Build leases: ``lease.json`` with an owner and an expiry, so that a second job on the same
key waits for or reuses the first instead of interleaving with it."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from kdcache import schema
from kdcache.errors import (
    LeaseHeldError,
)
from kdcache.stores.entry import CacheEntry, _dumps

log = logging.getLogger(__name__)


def _owner_is_dead(held: dict[str, Any]) -> bool:
    """True when the lease's owner ran on this host and its process no longer exists (a
    crashed job), so the lease can be taken over before it expires."""
    host, _, rest = str(held.get("owner", "")).partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@dataclass
class Lease:
    """A build lease on an entry: ``lease.json`` with an owner and an expiry.

    Args:
        entry: The entry to build.
        ttl_s: Seconds before an unrenewed lease counts as abandoned.
    """

    entry: CacheEntry
    ttl_s: float = 600.0
    owner: str = ""

    def __post_init__(self) -> None:
        self.owner = self.owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    def _body(self) -> bytes:
        return _dumps({"owner": self.owner, "expires_at": time.time() + self.ttl_s})

    def _read(self) -> dict[str, Any] | None:
        """The lease's content; None when there is no lease file. A file that does not
        parse (torn by a crash on an object store, or edited) counts as held by an unknown
        owner until ``ttl_s`` after it was last written."""
        loc = self.entry.location
        try:
            held = json.loads(loc.read_bytes(schema.LEASE_FILE))
            if not isinstance(held, dict):
                raise ValueError("not an object")
            return held
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError):
            try:
                written = loc.mtime(schema.LEASE_FILE)
            except FileNotFoundError:
                return None
            return {"owner": "unknown (unreadable lease.json)", "expires_at": written + self.ttl_s}

    def acquire(self, *, wait_s: float = 3600.0, poll_s: float = 2.0) -> bool:
        """Take the lease. Returns False if another job finished the entry meanwhile.

        Raises:
            LeaseHeldError: another live job still holds it after ``wait_s`` seconds.
        """
        self.entry.location.makedirs()
        deadline = time.monotonic() + wait_s
        announced = False
        while True:
            if self.entry.is_complete:
                return False
            if self.entry.location.create_exclusive(schema.LEASE_FILE, self._body()):
                return True
            held = self._read()
            if held is None:  # released between our attempt and the read: try again
                continue
            if held.get("expires_at", 0) < time.time() or _owner_is_dead(held):
                log.warning(
                    "taking over an expired or dead job's lease on %s (held by %s)",
                    self.entry.key,
                    held.get("owner"),
                )
                self.entry.location.write_atomic(schema.LEASE_FILE, self._body())
                time.sleep(min(poll_s, 0.2))
                if (self._read() or {}).get("owner") == self.owner:
                    return True
                continue
            if not announced:
                log.warning(
                    "cache entry %s is being built by %s; waiting for it",
                    self.entry.key,
                    held.get("owner"),
                )
                announced = True
            if time.monotonic() > deadline:
                raise LeaseHeldError(
                    f"{self.entry.location.uri} is still being built by {held.get('owner')} "
                    f"after {wait_s:.0f}s; wait longer or stop that job"
                )
            time.sleep(poll_s)

    def renew(self) -> None:
        self.entry.location.write_atomic(schema.LEASE_FILE, self._body())

    def release(self) -> None:
        held = self._read()
        if held is not None and held.get("owner") == self.owner:
            self.entry.location.delete(schema.LEASE_FILE)


class _LeaseKeeper:
    """Renews build leases from a background thread, so a long shard never lets the
    lease expire while this job is alive (and a dead job's lease does expire)."""

    def __init__(self, leases: list[Lease], interval_s: float) -> None:
        self.leases = leases
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            for lease in self.leases:
                try:
                    lease.renew()
                except OSError as exc:  # transient storage error: retry next round
                    log.warning("could not renew the lease on %s: %s", lease.entry.key, exc)

    def start(self) -> None:
        if self.leases and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="kdcache-lease", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
