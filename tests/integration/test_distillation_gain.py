"""The slow tier: on real Fashion-MNIST, distillation through the cache beats hard labels.

bash scripts/test.sh -m slow      (about one to two minutes on 2 cores)
"""

from __future__ import annotations

import pytest
from demo_runner import run_demo

pytestmark = pytest.mark.slow


def test_distilled_student_beats_the_hard_label_student(tmp_path):
    report, _ = run_demo(
        "fashion-mnist",
        tmp_path,
        "--subset",
        "12000",
        "--teacher-epochs",
        "2",
        "--student-epochs",
        "6",
        "--student-labels",
        "500",
        "--no-progress",
        timeout_s=1800,
    )
    models = {m["role"]: m for m in report["models"]}
    hard, kd = models["student_hard"]["test_accuracy"], models["student_kd"]["test_accuracy"]
    assert kd > hard + 0.02, (hard, kd)
    assert models["ensemble"]["test_accuracy"] > kd  # the student learns from better teachers
