"""The slow tier: on real Fashion-MNIST, distillation through the cache beats hard labels.

bash scripts/test.sh -m slow      (about 3-5 minutes on 2 cores)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_distilled_student_beats_the_hard_label_student(tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    cmd = [
        sys.executable,
        "-m",
        "kdcache.cli",
        "demo",
        "fashion-mnist",
        "--work-dir",
        str(tmp_path),
        "--subset",
        "12000",
        "--teacher-epochs",
        "2",
        "--student-epochs",
        "6",
        "--student-labels",
        "500",
        "--no-progress",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / "report.json") as f:
        models = {m["role"]: m for m in json.load(f)["models"]}
    hard, kd = models["student_hard"]["test_accuracy"], models["student_kd"]["test_accuracy"]
    assert kd > hard + 0.02, (hard, kd)
    assert models["ensemble"]["test_accuracy"] > kd  # the student learns from better teachers
