"""Progress of a long loop: a tqdm bar on a terminal, a ``logging`` line per interval
elsewhere.

One helper for both stages (the teacher stage's shard tasks, the student's optimizer
steps). Where progress goes depends on where it would be drawn:

- on a terminal (the stream is a TTY, or a Jupyter kernel is running), a tqdm bar;
- anywhere else (a log file, a pipe, a Ray job's log, CI), no bar and no carriage
  returns, but one ``logging`` INFO line every ``interval_s`` seconds (default 30) and one
  at the end, with the count and total, the loss or samples/s, the rate and the ETA:

  ``student_kd: step 120/400 (30%), loss 0.4321, 1,575 samples/s, 12.3 step/s, ETA 0:23``

- nowhere when ``enabled=False`` or when ``TQDM_DISABLE`` (tqdm's own variable) is set
  to anything but ``""``, ``0`` or ``false``: no bar and no interval lines.

Example:
    >>> import io
    >>> with Progress(3, desc="demo", unit="step", file=io.StringIO()) as p:
    ...     for _ in range(3):
    ...         p.update(1, loss=0.5)
    >>> p.n
    3
"""

from __future__ import annotations

import logging
import os
import sys
import time
from types import TracebackType
from typing import IO, Any

log = logging.getLogger(__name__)

#: Seconds between two log lines when progress does not go to a terminal.
DEFAULT_INTERVAL_S = 30.0


def progress_disabled_by_env() -> bool:
    """True when ``TQDM_DISABLE`` is set to anything but ``""``, ``0`` or ``false``."""
    return os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false")


def _on_terminal(stream: IO[str]) -> bool:
    """A bar can be drawn: ``stream`` is a TTY, or it is stderr in a Jupyter kernel
    (where ``tqdm.auto`` draws a widget although stderr is not a TTY)."""
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        return True
    return stream is sys.stderr and "ipykernel" in sys.modules


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` (or ``M:SS`` under an hour) for a duration in seconds."""
    total = int(max(0.0, seconds) + 0.5)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """Progress over ``total`` units: a bar on a terminal, interval log lines elsewhere.

    Args:
        total: Units of the whole loop (steps, shards), at least 1.
        desc: Label (``"student_kd"``, ``"teacher stage"``).
        unit: Name of one unit (``"step"``, ``"shard"``).
        enabled: False shows nothing (as does ``TQDM_DISABLE``).
        initial: Units already done (a resumed run); rates count only this call's.
        interval_s: Seconds between log lines when not on a terminal (> 0).
        file: Where a bar is drawn (default ``sys.stderr``); also what decides between a
            bar (a TTY) and log lines (anything else).
        logger: Logger of the interval lines (default ``kdcache.progress``), INFO level.

    Attributes:
        mode: ``"bar"``, ``"log"`` or ``"off"``.
        n: Units done so far, ``initial`` included.
    """

    def __init__(
        self,
        total: int,
        *,
        desc: str,
        unit: str = "it",
        enabled: bool = True,
        initial: int = 0,
        interval_s: float = DEFAULT_INTERVAL_S,
        file: IO[str] | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.total = max(1, int(total))
        self.desc = desc
        self.unit = unit
        self.n = self.initial = int(initial)
        self.interval_s = float(interval_s)
        self.samples = 0
        self.loss: float | None = None
        self._log = logger or log
        self._start = self._last_log = time.monotonic()
        self._closed = False
        self._bar: Any = None
        stream = sys.stderr if file is None else file
        if not enabled or progress_disabled_by_env():
            self.mode = "off"
        elif _on_terminal(stream):
            from tqdm.auto import tqdm

            self.mode = "bar"
            self._bar = tqdm(
                total=self.total,
                initial=self.initial,
                desc=desc,
                unit=unit,
                file=file,
                dynamic_ncols=True,
                disable=False,  # decided above, TQDM_DISABLE included
            )
        else:
            self.mode = "log"

    def update(self, n: int = 1, *, samples: int = 0, loss: float | None = None) -> None:
        """Count ``n`` more units done.

        Args:
            n: Units done since the last call.
            samples: Samples processed by those units (for samples/s; 0 to leave out).
            loss: The latest loss, shown beside the count (None: none shown).
        """
        self.n += n
        self.samples += samples
        if loss is not None:
            self.loss = float(loss)
        if self.mode == "bar":
            postfix = self._postfix(time.monotonic() - self._start)
            if postfix:
                self._bar.set_postfix_str(postfix, refresh=False)
            self._bar.update(n)
        elif self.mode == "log":
            now = time.monotonic()
            if now - self._last_log >= self.interval_s:
                self._last_log = now
                self._log.info("%s", self._line(now - self._start))

    def close(self) -> None:
        """End the progress: close the bar, or log the last line (once)."""
        if self._closed:
            return
        self._closed = True
        if self.mode == "bar":
            self._bar.close()
        elif self.mode == "log":
            self._log.info("%s", self._line(time.monotonic() - self._start, final=True))

    def _postfix(self, elapsed_s: float) -> str:
        parts = []
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.samples and elapsed_s > 0:
            parts.append(f"{self.samples / elapsed_s:,.0f} samples/s")
        return ", ".join(parts)

    def _line(self, elapsed_s: float, *, final: bool = False) -> str:
        elapsed_s = max(elapsed_s, 1e-9)
        done = self.n - self.initial
        rate = done / elapsed_s
        head = f"{self.desc}: {self.unit} {self.n}/{self.total} ({100 * self.n / self.total:.0f}%)"
        parts = [head]
        postfix = self._postfix(elapsed_s)
        if postfix:
            parts.append(postfix)
        parts.append(f"{rate:.3g} {self.unit}/s")
        if final:
            word = "done" if self.n >= self.total else "stopped"
            parts.append(f"{word} in {format_duration(elapsed_s)}")
        elif rate > 0:
            parts.append(f"ETA {format_duration((self.total - self.n) / rate)}")
        return ", ".join(parts)

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
