"""Training metrics: ``metrics.csv`` (and TensorBoard when installed), and reading them back."""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger(__name__)


class MetricsLogger:
    """Metrics to ``metrics.csv`` (``step,name,value`` rows) and, when the ``tensorboard``
    package is installed, to TensorBoard event files. Only rank 0 writes.

    Args:
        directory: Output directory (created).
        rank: This rank; ranks other than 0 write nothing.
        tensorboard: Also write TensorBoard events (warns once and goes on with CSV only
            when ``tensorboard`` is missing: ``pip install 'kdcache[tensorboard]'``).
        resume_from_step: On a resumed run, rows after this step (written after the
            checkpoint the run resumes from) are dropped, so the CSV has each step once.
    """

    def __init__(
        self,
        directory: str,
        *,
        rank: int = 0,
        tensorboard: bool = True,
        resume_from_step: int | None = None,
    ) -> None:
        self.path = os.path.join(directory, "metrics.csv")
        self.active = rank == 0
        self._tb: Any = None
        if not self.active:
            return
        os.makedirs(directory, exist_ok=True)
        if resume_from_step is not None and os.path.exists(self.path):
            with open(self.path) as f:
                rows = f.read().splitlines()
            kept = [r for r in rows[1:] if int(r.split(",", 1)[0]) <= resume_from_step]
            with open(self.path, "w") as f:
                f.write("\n".join([rows[0], *kept]) + "\n")
        elif not os.path.exists(self.path) or resume_from_step is None:
            with open(self.path, "w") as f:
                f.write("step,name,value\n")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.warning(
                    "tensorboard is not installed: metrics go to %s only "
                    "(pip install 'kdcache[tensorboard]')",
                    self.path,
                )
            else:
                self._tb = SummaryWriter(os.path.join(directory, "tensorboard"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Record ``metrics`` at optimizer step ``step``."""
        if not self.active:
            return
        with open(self.path, "a") as f:
            for name, value in metrics.items():
                f.write(f"{step},{name},{float(value)!r}\n")
        if self._tb is not None:
            for name, value in metrics.items():
                self._tb.add_scalar(name, float(value), step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(path: str) -> dict[str, list[tuple[int, float]]]:
    """``metrics.csv`` as ``{name: [(step, value), ...]}``."""
    out: dict[str, list[tuple[int, float]]] = {}
    with open(path) as f:
        next(f)
        for line in f:
            step, name, value = line.rstrip("\n").split(",")
            out.setdefault(name, []).append((int(step), float(value)))
    return out
