"""What listens where: the loopback addresses, and a sampler of the listening sockets of
this process and everything it starts (imported by the integration tests)."""

from __future__ import annotations

import pytest

#: Addresses that are this machine only.
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


class ListeningSockets:
    """Samples, in a thread, the listening sockets of this process and its descendants:
    ``seen`` holds (process name, ip, port)."""

    def __init__(self, every_s: float = 0.2) -> None:
        import threading

        self.every_s = every_s
        self.seen: set[tuple[str, str, int]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        psutil = pytest.importorskip("psutil")
        me = psutil.Process()
        while not self._stop.is_set():
            try:
                procs = {p.pid: p for p in me.children(recursive=True)}
                procs[me.pid] = me
                for c in psutil.net_connections(kind="tcp"):
                    if c.pid in procs and c.status == psutil.CONN_LISTEN:
                        self.seen.add((procs[c.pid].name(), c.laddr.ip, c.laddr.port))
            except psutil.Error:
                pass
            self._stop.wait(self.every_s)

    def __enter__(self) -> ListeningSockets:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
