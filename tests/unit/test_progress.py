"""Output a person can read: progress (a bar on a terminal, log lines in a file,
``TQDM_DISABLE`` honoured) and the third-party noise that :mod:`kdcache.quiet` quiets,
without hiding anything else."""

from __future__ import annotations

import io
import logging
import os
import sys
import warnings

import pytest

from kdcache import quiet
from kdcache.progress import Progress, format_duration


class _Terminal(io.StringIO):
    """A stream that says it is a TTY."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _no_tqdm_env(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)


def _run(progress: Progress, num: int, **update) -> None:
    with progress:
        for _ in range(num):
            progress.update(1, **update)


def test_not_a_tty_logs_interval_lines_and_writes_no_carriage_return(caplog):
    stream = io.StringIO()
    p = Progress(5, desc="student_kd", unit="step", interval_s=1e-9, file=stream)
    assert p.mode == "log"
    with caplog.at_level(logging.INFO, logger="kdcache.progress"):
        _run(p, 5, samples=128, loss=0.25)
    assert stream.getvalue() == ""  # nothing drawn, so no "\r"
    lines = [r.getMessage() for r in caplog.records if r.name == "kdcache.progress"]
    assert len(lines) == 6  # one per update (tiny interval) and one at the end
    assert lines[0].startswith("student_kd: step 1/5 (20%), loss 0.2500, ")
    assert "samples/s" in lines[0] and "step/s" in lines[0] and "ETA " in lines[0]
    assert lines[-1].startswith("student_kd: step 5/5 (100%)") and "done in " in lines[-1]
    assert not any("\r" in line for line in lines)


def test_default_interval_logs_only_the_last_line(caplog):
    p = Progress(100, desc="teacher stage", unit="shard", file=io.StringIO())
    with caplog.at_level(logging.INFO, logger="kdcache.progress"):
        _run(p, 40, samples=1000)
    lines = [r.getMessage() for r in caplog.records if r.name == "kdcache.progress"]
    assert len(lines) == 1  # 30 s did not pass: no interval line, one at the end
    assert lines[0].startswith("teacher stage: shard 40/100 (40%), ")
    assert "samples/s" in lines[0] and "stopped in " in lines[0]


@pytest.mark.parametrize("how", ["env", "argument"])
def test_tqdm_disable_and_progress_false_turn_bars_and_lines_off(how, monkeypatch, caplog):
    if how == "env":
        monkeypatch.setenv("TQDM_DISABLE", "1")
    for stream in (io.StringIO(), _Terminal()):
        # with TQDM_DISABLE set, even enabled=True shows nothing
        p = Progress(3, desc="x", unit="step", interval_s=1e-9, file=stream, enabled=how == "env")
        assert p.mode == "off"
        with caplog.at_level(logging.INFO, logger="kdcache.progress"):
            _run(p, 3, loss=1.0)
        assert stream.getvalue() == ""
    assert not [r for r in caplog.records if r.name == "kdcache.progress"]


def test_tqdm_disable_zero_leaves_progress_on(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "0")
    assert Progress(3, desc="x", file=io.StringIO()).mode == "log"


def test_on_a_terminal_a_tqdm_bar(caplog):
    from tqdm import tqdm

    stream = _Terminal()
    p = Progress(4, desc="student_kd", unit="step", file=stream, initial=1)
    assert p.mode == "bar" and isinstance(p._bar, tqdm)
    with caplog.at_level(logging.INFO, logger="kdcache.progress"):
        _run(p, 3, samples=64, loss=0.5)
    out = stream.getvalue()
    assert "\r" in out and "student_kd" in out and "4/4" in out and "loss 0.5000" in out
    assert not [r for r in caplog.records if r.name == "kdcache.progress"]  # no log lines


def test_format_duration():
    assert format_duration(0) == "0:00"
    assert format_duration(83.4) == "1:23"
    assert format_duration(3 * 3600 + 5) == "3:00:05"


# -- quiet ---------------------------------------------------------------------------------


@pytest.fixture
def deepspeed_logger():
    """The ``DeepSpeed`` logger (as deepspeed makes it: no propagation, its own handler),
    its filters restored afterwards."""
    logger = logging.getLogger("DeepSpeed")
    filters, propagate = list(logger.filters), logger.propagate
    seen: list[str] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)
    logger.propagate = False
    yield logger, seen
    logger.removeHandler(handler)
    logger.filters[:] = filters
    logger.propagate = propagate


def test_deepspeed_known_lines_go_to_debug_and_others_pass(deepspeed_logger, caplog):
    logger, seen = deepspeed_logger
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings():
            quiet.quiet_deepspeed()
        with caplog.at_level(logging.DEBUG, logger="kdcache.quiet"):
            logger.info("Setting ds_accelerator to cpu (override)")
            logger.info("DeepSpeed info: version=0.19.8, git-hash=unknown, git-branch=unknown")
            logger.warning("Attempting to get learning rate from scheduler before it has started")
            logger.warning("Attempting to get learning rate: something else went wrong")
            logger.warning("ZeRO stage 3 partitioning failed on rank 0")
    finally:
        logger.setLevel(old_level)
    assert seen == [
        "Attempting to get learning rate: something else went wrong",
        "ZeRO stage 3 partitioning failed on rank 0",
    ]
    debug = [r.getMessage() for r in caplog.records if r.name == "kdcache.quiet"]
    assert debug == [
        "DeepSpeed: Setting ds_accelerator to cpu (override)",
        "DeepSpeed: DeepSpeed info: version=0.19.8, git-hash=unknown, git-branch=unknown",
        "DeepSpeed: Attempting to get learning rate from scheduler before it has started",
    ]
    quiet.install_log_filters()  # once per logger
    assert sum(isinstance(f, quiet.NoiseFilter) for f in logger.filters) == 1


def test_deepspeed_printed_op_build_line_to_debug_other_prints_pass(capsys, caplog):
    with caplog.at_level(logging.DEBUG, logger="kdcache.quiet"):
        with warnings.catch_warnings(), quiet.deepspeed_output():
            print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
            print("a line of the user's", end="")
            print(" and its end")
            sys.stdout.write("no newline yet")
    assert capsys.readouterr().out == "a line of the user's and its end\nno newline yet"
    assert [r.getMessage() for r in caplog.records if r.name == "kdcache.quiet"] == [
        "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully"
    ]


def test_torch_scheduler_order_warnings_dropped_unrelated_warnings_kept():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet.install_warning_filters()
        warnings.warn(
            "Detected call of `lr_scheduler.step()` before `optimizer.step()`. In PyTorch "
            "1.1.0 and later, you should call them in the opposite order",
            UserWarning,
            stacklevel=1,
        )
        warnings.warn(
            "Seems like `optimizer.step()` has been overridden after learning rate scheduler "
            "initialization. Please, make sure to call `optimizer.step()` before",
            UserWarning,
            stacklevel=1,
        )
        warnings.warn("lr_scheduler.step() got a NaN learning rate", UserWarning, stacklevel=1)
        # the same text under another category is not the known warning: kept
        warnings.warn(
            "Detected call of `lr_scheduler.step()` before `optimizer.step()`",
            RuntimeWarning,
            stacklevel=1,
        )
    assert [(str(w.message), w.category) for w in caught] == [
        ("lr_scheduler.step() got a NaN learning rate", UserWarning),
        ("Detected call of `lr_scheduler.step()` before `optimizer.step()`", RuntimeWarning),
    ]


def test_hf_weight_loading_bars_off_while_loading_then_restored(monkeypatch):
    hf_logging = pytest.importorskip("transformers.utils.logging")
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    assert hf_logging.is_progress_bar_enabled()
    with quiet.hf_loading():
        assert not hf_logging.is_progress_bar_enabled()
    assert hf_logging.is_progress_bar_enabled()


def test_ray_colour_prefix_off_in_a_file_kept_on_a_terminal_and_user_value_wins(monkeypatch):
    monkeypatch.delenv("RAY_COLOR_PREFIX", raising=False)
    quiet.quiet_ray(_Terminal())
    assert "RAY_COLOR_PREFIX" not in os.environ
    quiet.quiet_ray(io.StringIO())
    assert os.environ["RAY_COLOR_PREFIX"] == "0"
    monkeypatch.setenv("RAY_COLOR_PREFIX", "1")
    quiet.quiet_ray(io.StringIO())
    assert os.environ["RAY_COLOR_PREFIX"] == "1"
