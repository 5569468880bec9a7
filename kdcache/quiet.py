"""Third-party noise that every run would print, routed to debug level; nothing else.

Each rule names one known line of one library, matched exactly (a logger and a message
pattern, a warning's message and category, one line printed by DeepSpeed); what matches
is logged at DEBUG on the ``kdcache.quiet`` logger (``kdcache -v`` shows it) or, for the
warnings, suppressed. Everything else, every warning kdcache does not know about
included, passes untouched. Environment variables are set only when the user has not set
them.

Called where kdcache starts the libraries: :func:`quiet_deepspeed` and
:func:`deepspeed_output` where DeepSpeed starts (``kdcache.train.distributed``),
:func:`hf_loading` around loading a Hugging Face model (``kdcache.teachers``),
:func:`quiet_ray` before ``ray.init`` (``kdcache.executors.ray``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator, Sequence
from typing import IO

log = logging.getLogger(__name__)

#: Known log records, by logger name: info-level banners and a scheduler notice that
#: DeepSpeed logs on every start (its logger does not propagate and writes to stdout).
LOG_NOISE: dict[str, tuple[re.Pattern[str], ...]] = {
    "DeepSpeed": (
        re.compile(r"Setting ds_accelerator to \w+ \((override|auto detect|model specified)\)$"),
        re.compile(r"DeepSpeed info: version="),
        re.compile(r"cdb=<deepspeed\.comm\."),
        re.compile(
            r"(Initializing TorchBackend in DeepSpeed with backend \w+|"
            r"Distributed backend already initialized)$"
        ),
        # WarmupLR & co. log this from their constructor, before the first step: the
        # schedule is right (kdcache steps the engine, which steps the scheduler).
        re.compile(r"Attempting to get learning rate from scheduler before it has started$"),
    ),
}

#: Known lines that DeepSpeed writes with ``print`` when it builds or loads a
#: communication op (``deepspeed/comm/torch.py``, ``deepspeed/comm/ccl.py``).
PRINT_NOISE: tuple[re.Pattern[str], ...] = (re.compile(r"DeepSpeed [\w.]+ built successfully$"),)

#: Known warnings, as ``(message regex, category)``: torch's learning-rate-scheduler order
#: checks, which misfire when DeepSpeed wraps the optimizer's ``step`` (the engine steps
#: the optimizer before the scheduler, by construction).
WARNING_NOISE: tuple[tuple[str, type[Warning]], ...] = (
    (r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`", UserWarning),
    (
        r"Seems like `optimizer\.step\(\)` has been overridden after learning rate scheduler "
        r"initialization",
        UserWarning,
    ),
)


class NoiseFilter(logging.Filter):
    """Drops a logger's records whose message matches one of ``patterns`` (searched),
    re-logging each at DEBUG on ``kdcache.quiet``; every other record passes.

    Args:
        patterns: Compiled message patterns.
    """

    def __init__(self, patterns: Sequence[re.Pattern[str]]) -> None:
        super().__init__()
        self.patterns = tuple(patterns)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(p.search(message) for p in self.patterns):
            log.debug("%s: %s", record.name, message)
            return False
        return True


def install_log_filters() -> None:
    """Put a :class:`NoiseFilter` on each logger of :data:`LOG_NOISE` (once per logger)."""
    for name, patterns in LOG_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, NoiseFilter) for f in logger.filters):
            logger.addFilter(NoiseFilter(patterns))


def install_warning_filters() -> None:
    """Ignore the warnings of :data:`WARNING_NOISE` (exact message regex and category);
    other warnings keep their filters."""
    for message, category in WARNING_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)


def quiet_deepspeed() -> None:
    """DeepSpeed's known log lines to debug level, torch's scheduler-order warnings off."""
    install_log_filters()
    install_warning_filters()


class _LineFilter(io.TextIOBase):
    """A text stream that passes every line to ``target`` except those matching
    ``patterns``, which go to DEBUG on ``kdcache.quiet``."""

    def __init__(self, target: IO[str], patterns: Sequence[re.Pattern[str]]) -> None:
        super().__init__()
        self.target = target
        self.patterns = tuple(patterns)
        self._partial = ""

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        *lines, self._partial = (self._partial + s).split("\n")
        for line in lines:
            if any(p.search(line) for p in self.patterns):
                log.debug("%s", line)
            else:
                self.target.write(line + "\n")
        return len(s)

    def flush(self) -> None:
        if self._partial:
            self.target.write(self._partial)
            self._partial = ""
        self.target.flush()

    def isatty(self) -> bool:
        return bool(getattr(self.target, "isatty", lambda: False)())


@contextlib.contextmanager
def deepspeed_output() -> Iterator[None]:
    """While DeepSpeed starts: its known printed lines (:data:`PRINT_NOISE`) to debug
    level, every other line of ``sys.stdout`` through; and :func:`quiet_deepspeed`.

    Only Python-level writes are seen (a C++ compiler's output on a first op build is not
    touched).
    """
    quiet_deepspeed()
    stream = _LineFilter(sys.stdout, PRINT_NOISE)
    try:
        with contextlib.redirect_stdout(stream):
            yield
    finally:
        stream.flush()


@contextlib.contextmanager
def hf_loading() -> Iterator[None]:
    """While loading a local Hugging Face model or tokenizer: no weight-loading progress
    bars (``transformers.utils.logging.disable_progress_bar``), restored afterwards.

    Left alone when the user set ``HF_HUB_DISABLE_PROGRESS_BARS`` (their choice wins), or
    when transformers is not installed or its bars are already off.
    """
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    if "HF_HUB_DISABLE_PROGRESS_BARS" in os.environ or not hf_logging.is_progress_bar_enabled():
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


def quiet_ray(stream: IO[str] | None = None) -> None:
    """Before ``ray.init``: no ANSI colour codes in the ``(pid=...)`` prefixes of the
    workers' lines that Ray copies to this driver, when they go to a file or a pipe
    (``RAY_COLOR_PREFIX=0``, only if the user has not set it; Ray reads it as it prints).

    Args:
        stream: Where the driver's output goes (default ``sys.stderr``); on a terminal
            Ray's colours are kept.
    """
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    if not (isatty is not None and isatty()):
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
