"""Run a `kdcache demo` the way a user does: a subprocess, a clean environment (no
RAY_ADDRESS, so a fresh local Ray), and the JSON report it writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any


def run_demo(
    name: str, work: Any, *args: str, timeout_s: float = 600
) -> tuple[dict[str, Any], subprocess.CompletedProcess]:
    """``kdcache demo NAME --work-dir WORK ARGS...``; asserts exit 0 and returns the report
    and the finished process."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "kdcache.cli", "demo", name, "--work-dir", str(work), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(os.path.join(work, "report.json")) as f:
        return json.load(f), proc
