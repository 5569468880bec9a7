"""Teachers and teacher ensembles, the specs that describe teachers loaded where they run,
and the loaders behind them."""

from __future__ import annotations

from kdcache.teachers.loaders import FeatureTap, HFLogits, load_state_dict, weights_sha256
from kdcache.teachers.spec import TeacherResources, TeacherSpec, file_sha256
from kdcache.teachers.teacher import Teacher, TeacherEnsemble

__all__ = [
    "FeatureTap",
    "HFLogits",
    "Teacher",
    "TeacherEnsemble",
    "TeacherResources",
    "TeacherSpec",
    "file_sha256",
    "load_state_dict",
    "weights_sha256",
]
