"""`kdcache demo fashion-mnist --subset 6000` with its output sent to a file reads as a log:
no carriage returns, no ANSI colour codes, no third-party start-up noise, at most 200
lines, and a progress line at the end of every loop.

Progress is left on (no ``--no-progress``, no ``TQDM_DISABLE``): the point is what it
writes when stderr is a file. One teacher epoch and two student epochs keep it to a
minute or two; the number of lines does not depend on them.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

MAX_LINES = 200


def test_demo_output_to_a_file_is_a_readable_log(tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "RAY_AUTH_MODE": "disabled"}
    for name in ("RAY_ADDRESS", "TQDM_DISABLE", "RAY_COLOR_PREFIX"):
        env.pop(name, None)  # a fresh local Ray, the defaults a user gets
    cmd = [
        *(sys.executable, "-m", "kdcache.cli", "demo", "fashion-mnist"),
        *("--subset", "6000", "--work-dir", str(tmp_path / "work")),
        *("--teacher-epochs", "1", "--student-epochs", "2"),
    ]
    log_path = tmp_path / "demo.log"
    with open(log_path, "wb") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=900)
    raw = log_path.read_bytes()
    text = raw.decode("utf-8", errors="replace")
    assert proc.returncode == 0, text[-4000:]

    assert b"\r" not in raw, "carriage returns in the log file (a progress bar was drawn)"
    assert b"\x1b[" not in raw, "ANSI escape codes in the log file"
    lines = text.splitlines()
    assert len(lines) <= MAX_LINES, f"{len(lines)} lines:\n" + text[:4000]
    assert "built successfully" not in text  # DeepSpeed's op-build print
    assert "Loading weights" not in text and "lr_scheduler.step()" not in text
    # progress went to the log as lines: the last one of each loop says it is done
    for desc, unit in [
        ("teacher convnet-a", "step"),
        ("teacher stage", "shard"),
        ("student_hard", "step"),
        ("student_kd", "step"),
    ]:
        done = [ln for ln in lines if f"{desc}: {unit} " in ln and "done in " in ln]
        assert len(done) == 1, f"no final progress line for {desc!r}:\n" + text[:4000]
    assert "student (distilled)" in text and "report written to" in text
