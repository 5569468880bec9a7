"""Distillation losses: pure tensor math (divergences, KD and token-level KD, decoupled KD,
feature losses)."""

from __future__ import annotations

from kdcache.losses.divergences import (
    DIVERGENCES,
    Targets,
    divergence,
    forward_kl,
    jsd,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    sparse_student_log_probs,
    total_variation,
)
from kdcache.losses.dkd import DKD_SPARSE_KINDS, dkd_loss
from kdcache.losses.features import (
    FitNetsRegressor,
    fitnets_loss,
    rkd_angle_loss,
    rkd_distance_loss,
)
from kdcache.losses.kd import (
    IGNORE_INDEX,
    MULTI_TEACHER_MODES,
    Normalizer,
    cross_entropy,
    kd_loss,
    multi_teacher_loss,
    token_distill_loss,
    token_kd_loss,
)

__all__ = [
    "DIVERGENCES",
    "DKD_SPARSE_KINDS",
    "IGNORE_INDEX",
    "MULTI_TEACHER_MODES",
    "FitNetsRegressor",
    "Normalizer",
    "Targets",
    "cross_entropy",
    "divergence",
    "dkd_loss",
    "fitnets_loss",
    "forward_kl",
    "jsd",
    "kd_loss",
    "multi_teacher_loss",
    "reverse_kl",
    "rkd_angle_loss",
    "rkd_distance_loss",
    "skew_kl",
    "skew_reverse_kl",
    "sparse_student_log_probs",
    "token_distill_loss",
    "token_kd_loss",
    "total_variation",
]
