"""Teachers and teacher ensembles, and the loaders behind them."""

from __future__ import annotations

from kdcache.teachers.loaders import FeatureTap, HFLogits, load_state_dict, weights_sha256
from kdcache.teachers.teacher import Teacher, TeacherEnsemble

__all__ = [
    "FeatureTap",
    "HFLogits",
    "Teacher",
    "TeacherEnsemble",
    "load_state_dict",
    "weights_sha256",
]
