"""Feature and relation distillation losses: FitNets hints and RKD distance and angle.

FitNets is a mean over rows and takes a ``normalizer`` like the losses of
:mod:`kdcache.losses.kd` (world-size independent with
:func:`kdcache.train.data_parallel_normalizer`). The RKD losses are defined over the
pairs and triplets *within* the batch they are given: under data parallelism each rank's
term relates its own rows only, so they equal the one-process loss only at the same
per-rank batch (gather the embeddings first for relations across ranks).

Shape legend: B batch, D student feature width, E teacher feature width.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F  # noqa: N812 (the universal torch alias)

from kdcache.errors import ConfigError
from kdcache.losses.kd import Normalizer, _divisor, _valid_rows

# --------------------------------------------------------------------------------------
# Feature- and relation-based distillation
# --------------------------------------------------------------------------------------


class FitNetsRegressor(torch.nn.Module):
    """Learned linear projection from student features (width D) to teacher features (E).

    FitNets trains a regressor on the student's guided layer so it can match the teacher's
    hint layer of a different width; for vector (or per-token) features that is a linear
    map. Train it with the student; it is discarded after distillation.

    Args:
        student_dim: D, the student feature width.
        teacher_dim: E, the teacher feature width.
        bias: Include a bias term.

    Source: Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015, sec. 2.2.
    """

    def __init__(self, student_dim: int, teacher_dim: int, *, bias: bool = True) -> None:
        super().__init__()
        if int(student_dim) < 1 or int(teacher_dim) < 1:
            raise ConfigError(f"feature widths must be >= 1, got {student_dim}, {teacher_dim}")
        self.proj = torch.nn.Linear(int(student_dim), int(teacher_dim), bias=bias)

    def forward(self, student_features_BD: torch.Tensor) -> torch.Tensor:
        """Project features [..., D] (any float dtype) to float32 [..., E]."""
        return self.proj(student_features_BD.to(self.proj.weight.dtype)).float()


def fitnets_loss(
    student_features_BD: torch.Tensor,
    teacher_features_BE: torch.Tensor,
    regressor: torch.nn.Module | None = None,
    *,
    distance: str = "mse",
    mask_B: torch.Tensor | None = None,
    normalizer: Normalizer | None = None,
) -> torch.Tensor:
    """FitNets hint loss between projected student features and cached teacher features.

    ``mse``: mean over counted positions of the mean over E of ``(r(s) - t)^2`` (the
    paper's ``1/2 ||t - r(s)||^2`` up to a constant factor 2/E; kdcache averages over E so
    the scale does not grow with the width). ``cosine``: mean of ``1 - cos(r(s), t)``.

    Args:
        student_features_BD: Student features, shape [..., D], any float dtype.
        teacher_features_BE: Cached teacher features, shape [..., E] (no gradient flows
            into them).
        regressor: Maps [..., D] to [..., E], e.g. :class:`FitNetsRegressor`; None when
            D == E and no projection is wanted.
        distance: ``"mse"`` or ``"cosine"``.
        mask_B: Optional bool mask over the leading dims; positions that count.
        normalizer: Maps this process's number of counted positions to the divisor of
            their sum (None: that number); see :func:`kdcache.losses.kd_loss`.

    Returns:
        Scalar float32 tensor; 0 with finite gradients when no position counts.

    Raises:
        ConfigError: unknown distance, shapes that disagree, or a normalizer that
            returns a bad divisor.

    Source: Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015, sec. 2.2, eq. 3.
    """
    if distance not in ("mse", "cosine"):
        raise ConfigError(f"distance must be 'mse' or 'cosine', got {distance!r}")
    projected = student_features_BD.float() if regressor is None else regressor(student_features_BD)
    target = teacher_features_BE.detach().float()
    if projected.shape != target.shape:
        raise ConfigError(
            f"projected student features {tuple(projected.shape)} and teacher features "
            f"{tuple(target.shape)} differ; pass a regressor mapping D to E"
        )
    width = projected.shape[-1]
    projected = projected.reshape(-1, width)
    target = target.reshape(-1, width)
    rows = _valid_rows(mask_B, teacher_features_BE.shape[:-1], projected.device)
    if rows is not None:
        projected = projected[rows]
        target = target[rows]
    if distance == "mse":
        per_row = (projected - target).pow(2).mean(dim=-1)
    else:
        per_row = 1.0 - F.cosine_similarity(projected, target, dim=-1, eps=1e-8)
    return per_row.sum() / _divisor(int(per_row.shape[0]), normalizer)


def _pair_distances(x_BD: torch.Tensor) -> torch.Tensor:
    """Euclidean distances of the B(B-1)/2 pairs i < j, float32, gradient-safe at 0."""
    i, j = torch.triu_indices(x_BD.shape[0], x_BD.shape[0], offset=1, device=x_BD.device)
    diff = x_BD.index_select(0, i) - x_BD.index_select(0, j)
    return diff.pow(2).sum(dim=-1).clamp(min=1e-12).sqrt()


def rkd_distance_loss(student_emb_BD: torch.Tensor, teacher_emb_BE: torch.Tensor) -> torch.Tensor:
    """RKD distance loss: Huber loss between mean-normalised pairwise distances.

    ``psi(x_i, x_j) = ||x_i - x_j|| / mu`` with mu the mean distance over the batch's
    pairs; the loss is the Huber (smooth L1, delta = 1) loss between the teacher's and the
    student's psi, averaged over the B(B-1)/2 distinct pairs (the reference code averages
    over all B^2 entries including the zero diagonal; that is (B-1)/B times this).

    Args:
        student_emb_BD: Student embeddings, shape [B, D], B >= 2, any float dtype.
        teacher_emb_BE: Cached teacher embeddings, shape [B, E] (widths may differ).

    Returns:
        Scalar float32 tensor.

    Raises:
        ConfigError: fewer than 2 rows or different row counts.

    Source: Park, Kim, Lu, Cho, "Relational Knowledge Distillation", CVPR 2019, sec. 3.2.1.
    """
    _check_relation_inputs(student_emb_BD, teacher_emb_BE, 2)
    with torch.no_grad():
        t = _pair_distances(teacher_emb_BE.float())
        t = t / t.mean().clamp(min=1e-12)
    s = _pair_distances(student_emb_BD.float())
    s = s / s.mean().clamp(min=1e-12)
    return F.smooth_l1_loss(s, t, reduction="mean")


def _angles(x_BD: torch.Tensor) -> torch.Tensor:
    e_BBD = F.normalize(x_BD[None, :, :] - x_BD[:, None, :], p=2, dim=2)
    return torch.bmm(e_BBD, e_BBD.transpose(1, 2)).reshape(-1)


def rkd_angle_loss(student_emb_BD: torch.Tensor, teacher_emb_BE: torch.Tensor) -> torch.Tensor:
    """RKD angle loss: Huber loss between the cosines of the angles of all triplets.

    For anchor j and points i, k: ``cos angle = <e_ji, e_jk>`` with ``e_ji`` the unit vector
    from x_j to x_i; Huber (smooth L1, delta = 1) averaged over all B^3 (anchor, i, k),
    degenerate ones (i or k equal to the anchor) giving 0 on both sides, as in the
    reference code. Memory is O(B^2 (D + E)).

    Args:
        student_emb_BD: Student embeddings, shape [B, D], B >= 3.
        teacher_emb_BE: Cached teacher embeddings, shape [B, E].

    Returns:
        Scalar float32 tensor.

    Raises:
        ConfigError: fewer than 3 rows or different row counts.

    Source: Park, Kim, Lu, Cho, "Relational Knowledge Distillation", CVPR 2019, sec. 3.2.2.
    """
    _check_relation_inputs(student_emb_BD, teacher_emb_BE, 3)
    with torch.no_grad():
        t = _angles(teacher_emb_BE.float())
    s = _angles(student_emb_BD.float())
    return F.smooth_l1_loss(s, t, reduction="mean")


def _check_relation_inputs(s: torch.Tensor, t: torch.Tensor, min_rows: int) -> None:
    if s.dim() != 2 or t.dim() != 2 or s.shape[0] != t.shape[0] or s.shape[0] < min_rows:
        raise ConfigError(
            f"relation losses need [B, D] and [B, E] with the same B >= {min_rows}, got "
            f"{tuple(s.shape)} and {tuple(t.shape)}"
        )
