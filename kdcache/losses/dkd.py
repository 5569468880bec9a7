"""Decoupled Knowledge Distillation (DKD): the KD loss split into its target-class and
non-target-class parts, each with its own weight.

Shape legend: B batch, T tokens, V classes or vocabulary, N rows (B or B * T), M rows
with a label, S kept sparse entries per row, S + 1 buckets (kept ids and the tail).

For one row with label t, teacher p = softmax(z_t / tau) and student q = softmax(z_s / tau)
(Zhao et al. 2022, sec. 3.1):

* binary probabilities ``b = [p_t, p_rest]`` with ``p_rest = sum_{i != t} p_i = 1 - p_t``
  (and ``b^S`` from q alike);
* the non-target distribution ``p_hat_i = p_i / p_rest`` over the classes i != t
  (``q_hat`` alike);
* ``TCKD = KL(b^T || b^S)`` and ``NCKD = KL(p_hat^T || q_hat^S)`` (eq. 5), so that
  ``KD = KL(p || q) = TCKD + (1 - p_t^T) NCKD`` (eq. 6);
* ``DKD = alpha * TCKD + beta * NCKD`` (eq. 7).
"""

from __future__ import annotations

import torch

from kdcache.errors import ConfigError
from kdcache.losses.divergences import (
    _LOG_EPS32,
    Targets,
    Weight,
    _check_temperature,
    _flat_student,
    _kl_sum,
    sparse_student_log_probs,
)
from kdcache.losses.kd import IGNORE_INDEX, Normalizer, _divisor, _labelled_rows, _weight
from kdcache.targets.sparse import SparseTargets

_NEG_INF = float("-inf")

#: Sparse kinds DKD takes: each has the teacher's exact probability at every kept id and
#: an exact tail bucket (a mixture's kept probabilities are those of the mixture).
DKD_SPARSE_KINDS = ("topk", "topp", "mixture")


def _decoupled_rows(
    log_p_NB: torch.Tensor, log_q_NB: torch.Tensor, slot_N1: torch.Tensor, hit_NB: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (TCKD [N], NCKD [N]) from aligned log-probabilities over B outcomes.

    ``slot_N1`` (int64) is the target class's outcome in each row and ``hit_NB`` is True
    there and only there (a gather at a slot outside [0, B) raises on the CPU). The outcomes are
    the V classes (dense) or the kept ids plus the tail bucket (sparse); both are the
    paper's equations applied to those outcomes. A row whose teacher puts no mass outside
    the target (``p_rest = 0``) has no non-target distribution: its NCKD is 0 (it weighs
    ``1 - p_t = 0`` in KD); the same for a student with ``q_rest = 0`` makes NCKD +inf
    where the teacher has non-target mass (TCKD is +inf there too).
    """
    log_p_t_N = log_p_NB.gather(1, slot_N1)[:, 0]
    log_q_t_N = log_q_NB.gather(1, slot_N1)[:, 0]
    rest_p_NB = log_p_NB.masked_fill(hit_NB, _NEG_INF)
    rest_q_NB = log_q_NB.masked_fill(hit_NB, _NEG_INF)
    # log(1 - p_t) as a log-sum-exp of the other outcomes: exact where 1 - p_t would
    # cancel (a confident row), and differentiable through every non-target logit.
    log_p_rest_N = torch.logsumexp(rest_p_NB, dim=1)
    log_q_rest_N = torch.logsumexp(rest_q_NB, dim=1)
    tckd_N = _kl_sum(
        torch.stack([log_p_t_N, log_p_rest_N], dim=1),
        torch.stack([log_q_t_N, log_q_rest_N], dim=1),
    )
    # An empty rest is renormalised by 1 (not by 0): its outcomes stay -inf (no NaN).
    zero = torch.zeros((), device=log_p_NB.device)
    norm_p_N1 = torch.where(torch.isneginf(log_p_rest_N), zero, log_p_rest_N)[:, None]
    norm_q_N1 = torch.where(torch.isneginf(log_q_rest_N), zero, log_q_rest_N)[:, None]
    nckd_N = _kl_sum(rest_p_NB - norm_p_N1, rest_q_NB - norm_q_N1)
    return tckd_N, nckd_N


def _dense_rows(
    student_NV: torch.Tensor,
    teacher_NV: torch.Tensor,
    labels_N1: torch.Tensor,
    keep_N1: torch.Tensor,
    tau: float,
    with_nll: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(TCKD [N], NCKD [N], NLL at temperature 1 [N] or None) for every row, dense targets.

    Rows False in ``keep_N1`` see zeros instead of their logits (so they get exactly zero
    gradient, NaN included); their values are for the caller to drop.
    """
    s_NV = torch.where(keep_N1, student_NV.float(), 0.0)
    log_q_NV = torch.log_softmax(s_NV / tau, dim=1)
    log_p_NV = teacher_NV.float()
    classes_1V = torch.arange(s_NV.shape[1], device=s_NV.device)[None, :]
    hit_NV = classes_1V == labels_N1
    tckd_N, nckd_N = _decoupled_rows(log_p_NV, log_q_NV, labels_N1, hit_NV)
    nll_N = None
    if with_nll:
        nll_N = torch.logsumexp(s_NV, dim=1) - s_NV.gather(1, labels_N1)[:, 0]
    return tckd_N, nckd_N, nll_N


def _sparse_rows(
    student_NV: torch.Tensor,
    teacher: SparseTargets,
    labels_N1: torch.Tensor,
    keep_N1: torch.Tensor,
    tau: float,
    with_nll: bool,
    chunk_rows: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(TCKD [M], NCKD [M], NLL [M] or None) over the M labelled rows, sparse targets.

    Raises:
        ConfigError: a sampled kind, a row count that differs, or a labelled row whose
            label is not among the teacher's kept ids.
    """
    num_rows, vocab = student_NV.shape
    if teacher.kind not in DKD_SPARSE_KINDS:
        raise ConfigError(
            f"dkd_loss is refused for {teacher.kind!r} targets: TCKD needs the teacher's "
            "exact probability of the target class and NCKD its exact distribution over "
            "the other classes (renormalised by 1 - p_t), and draws give only an estimate "
            f"of both; build kind 'topk' or 'topp' with params labels: true (kinds "
            f"{DKD_SPARSE_KINDS} are accepted)"
        )
    if teacher.num_rows != num_rows:
        raise ConfigError(
            f"sparse targets have {teacher.num_rows} rows but the student has {num_rows} rows"
        )
    device = student_NV.device
    rows_M = keep_N1[:, 0].nonzero()[:, 0]  # the sparse path reads back anyway (ids check)
    sel = teacher.rows(rows_M.to(teacher.ids_BS.device))
    ids_MS = sel.ids_BS.to(device)
    labels_M1 = labels_N1[rows_M]
    if bool(((labels_M1 < 0) | (labels_M1 >= vocab)).any()):
        raise ConfigError(f"labels must be in [0, {vocab}) or equal the ignore index")
    hit_MS = ids_MS == labels_M1
    found_M = hit_MS.any(dim=1)
    if not bool(found_M.all()):
        missing = rows_M[~found_M]
        raise ConfigError(
            f"{missing.numel()} labelled row(s) (first: row {int(missing[0])}) have a label "
            "that is not among the teacher's kept ids, so the target-class probability "
            "p_t that DKD needs is unknown (only bounded by the tail mass); build the "
            "cache with params labels: true (topk_targets / topp_targets(labels_B=...)), "
            "which keeps every label's exact probability"
        )
    log_q_MS, log_q_tail_M = sparse_student_log_probs(
        student_NV, ids_MS, temperature=tau, rows_M=rows_M, chunk_rows=chunk_rows
    )
    log_p_MS = sel.log_probs().to(device)
    log_p_tail_M = sel.tail_log_mass().to(device)
    if sel.tail_log_mass_B is None:
        # As the divergences do: a tail derived from the log-partition is only good to
        # ~1e-6 absolute, so it is floored at float32 epsilon rather than read as 0.
        log_p_tail_M = log_p_tail_M.clamp(min=_LOG_EPS32)
    covers_M = (ids_MS >= 0).sum(dim=1) >= vocab
    log_p_tail_M = log_p_tail_M.masked_fill(covers_M, _NEG_INF)
    log_p_MB = torch.cat([log_p_MS, log_p_tail_M[:, None]], dim=1)
    log_q_MB = torch.cat([log_q_MS, log_q_tail_M[:, None]], dim=1)
    hit_MB = torch.cat([hit_MS, torch.zeros_like(hit_MS[:, :1])], dim=1)
    slot_M1 = hit_MB.to(torch.int8).argmax(dim=1, keepdim=True)
    tckd_M, nckd_M = _decoupled_rows(log_p_MB, log_q_MB, slot_M1, hit_MB)
    nll_M = None
    if with_nll:
        log_q1_M1, _ = sparse_student_log_probs(
            student_NV, labels_M1, temperature=1.0, rows_M=rows_M, chunk_rows=chunk_rows
        )
        nll_M = -log_q1_M1[:, 0]
    return tckd_M, nckd_M, nll_M


def _check_weight(name: str, value: float) -> float:
    v = float(value)
    if not v >= 0.0 or v == float("inf"):
        raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
    return v


def dkd_loss(
    student_logits_BV: torch.Tensor,
    teacher_log_probs_BV: Targets,
    *,
    labels_B: torch.Tensor,
    temperature: float,
    alpha: float = 1.0,
    beta: float = 8.0,
    ce_weight: float = 1.0,
    scale_by_temperature_squared: bool = True,
    ignore_index: int = IGNORE_INDEX,
    chunk_rows: int | None = None,
    normalizer: Normalizer | None = None,
) -> torch.Tensor:
    """Decoupled KD: ``tau^2 (alpha TCKD + beta NCKD) + ce_weight * CE(y, s)``.

    With the label t of a row, teacher p and student q at temperature tau:
    ``TCKD = KL([p_t, 1 - p_t] || [q_t, 1 - q_t])`` (binary, target vs the rest) and
    ``NCKD = KL(p_hat || q_hat)`` with ``p_hat_i = p_i / (1 - p_t)`` over the classes
    i != t (the paper's eqs. 1-7; so ``KD = TCKD + (1 - p_t) NCKD``, eq. 6). Both terms
    are multiplied by tau^2 as in the authors' reference implementation (mdistiller),
    which also adds ``ce_weight`` times the hard-label cross-entropy (at temperature 1);
    its linear warm-up of the DKD term over the first epochs is the caller's schedule
    (scale ``alpha`` and ``beta``). Conventions: the non-target classes are excluded
    exactly (probability 0, where mdistiller subtracts 1000 from the target logit); a row
    whose teacher has no non-target mass (``p_t = 1``) has NCKD 0.

    **Rows.** DKD needs the target class, so a row counts only when its label is not
    ``ignore_index``; rows without a label are left out of all three terms, and each
    term's sum over the M labelled rows is divided by the same divisor (M, or
    ``normalizer(M)``, called once per call). To leave out a row that has a label (e.g.
    a prompt position), set its label to ``ignore_index``. A left-out row gets exactly
    zero gradient, whatever it holds; a NaN in a counted row makes the loss NaN.

    **Dense teachers** ([B, V] log-probabilities at tau): the terms are exact. Nothing is
    read back to the host (no ``.item()``, no ``nonzero``) unless a ``normalizer`` needs
    the count as a number; labels outside [0, V) are refused when they sit on the CPU (on
    an accelerator, the device-side assertion of the gather that reads them fails).

    **Sparse teachers** (:class:`kdcache.targets.SparseTargets` of kind ``topk``,
    ``topp`` or ``mixture``): every labelled row's label must be among the kept ids (build
    with params ``labels: true``, which keeps it); otherwise the target-class probability
    is only bounded by the tail mass, and the call is refused. The outcomes are the S kept
    ids plus one tail bucket holding the exact mass of every other class, for teacher and
    student (the student's from its full-vocabulary normaliser). TCKD is then exact
    (``1 - p_t`` is the kept non-target mass plus the tail). NCKD is the KL between the
    non-target distributions *coarsened* to the kept non-target ids and the tail bucket,
    each renormalised by its own ``1 - p_t``: a lower bound on the full NCKD (data-
    processing inequality), equal to it when nothing is left in the tail (k = V). Sampled
    kinds are refused (draws estimate p, not the exact p_t and p_hat the terms need). The
    sparse path reads back to the host (the id range and the kept-label check).

    Args:
        student_logits_BV: Raw student logits, shape [B, V] or [B, T, V], any float dtype
            (math in float32; the gradient has the logits' dtype).
        teacher_log_probs_BV: Teacher log-probabilities at temperature tau, same shape
            (-inf where the teacher has no mass), or SparseTargets with one row per
            student row.
        labels_B: int64 class ids (or next tokens), shape [B] (or [B, T]), in [0, V) or
            ``ignore_index``.
        temperature: tau > 0, dimensionless.
        alpha: Weight of TCKD, >= 0 (the paper: 1.0).
        beta: Weight of NCKD, >= 0 (the paper: 8.0 on CIFAR-100, 0.5 on ImageNet).
        ce_weight: Weight of the cross-entropy, >= 0 (0 leaves it out).
        scale_by_temperature_squared: Multiply TCKD and NCKD by tau^2 (default True).
        ignore_index: Label value of a row without a label.
        chunk_rows: Row chunk of the sparse student pass
            (:func:`kdcache.losses.sparse_student_log_probs`).
        normalizer: Maps this process's number of labelled rows to the divisor of the
            terms' sums, called once (all terms count the same rows); None: that number.
            With several ranks pass :func:`kdcache.train.data_parallel_normalizer` on
            every rank (see :mod:`kdcache.losses.kd`).

    Returns:
        Scalar float32 tensor, averaged over the labelled rows; 0 with finite (zero)
        gradients when no row has a label.

    Raises:
        ConfigError: temperature <= 0; a negative or non-finite alpha, beta or
            ce_weight; fewer than 2 classes; shapes that disagree; labels outside
            [0, V) (see above); sparse targets of a sampled kind, or whose kept ids lack
            a row's label; a normalizer that returns a bad divisor.

    Source: Zhao, Cui, Song, Qiu, Liang, "Decoupled Knowledge Distillation", CVPR 2022,
    sec. 3 (eqs. 1-7); tau^2 and the cross-entropy term as in the authors' mdistiller.

    Example:
        >>> teacher = torch.log_softmax(torch.tensor([[2.0, 1.0, 0.0]]), dim=-1)
        >>> student = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
        >>> loss = dkd_loss(student, teacher, labels_B=torch.tensor([0]), temperature=1.0,
        ...                 ce_weight=0.0)
        >>> round(float(loss), 4)
        0.0166
    """
    tau = _check_temperature(temperature)
    alpha = _check_weight("alpha", alpha)
    beta = _check_weight("beta", beta)
    ce_weight = _check_weight("ce_weight", ce_weight)
    student_NV = _flat_student(student_logits_BV)
    leading, (num_rows, vocab) = student_logits_BV.shape[:-1], student_NV.shape
    if vocab < 2:
        raise ConfigError(
            f"DKD needs at least 2 classes (a target and a non-target), got V={vocab}"
        )
    device = student_NV.device
    labels_N1, keep_N1 = _labelled_rows(labels_B, leading, vocab, ignore_index, device)
    if device.type == "cpu" and bool(((labels_N1 < 0) | (labels_N1 >= vocab)).any()):
        # (labels on the CPU beside logits elsewhere were checked by _labelled_rows; on
        # an accelerator the gathers at the labels assert instead: no host sync)
        raise ConfigError(f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}")
    with_nll = ce_weight > 0.0
    if isinstance(teacher_log_probs_BV, SparseTargets):
        tckd, nckd, nll = _sparse_rows(
            student_NV, teacher_log_probs_BV, labels_N1, keep_N1, tau, with_nll, chunk_rows
        )
        weight: Weight = 1.0 / _divisor(int(tckd.shape[0]), normalizer)
    else:
        if teacher_log_probs_BV.shape != student_logits_BV.shape:
            raise ConfigError(
                f"student logits {tuple(student_logits_BV.shape)} and teacher "
                f"log-probabilities {tuple(teacher_log_probs_BV.shape)} must have the same "
                "shape [..., V]"
            )
        tckd, nckd, nll = _dense_rows(
            student_NV,
            teacher_log_probs_BV.reshape(num_rows, vocab),
            labels_N1,
            keep_N1,
            tau,
            with_nll,
        )
        keep_N = keep_N1[:, 0]
        tckd = torch.where(keep_N, tckd, 0.0)
        nckd = torch.where(keep_N, nckd, 0.0)
        nll = None if nll is None else torch.where(keep_N, nll, 0.0)
        weight = _weight(1.0, keep_N1.sum(), normalizer)
    scale = tau**2 if scale_by_temperature_squared else 1.0
    total = (alpha * scale) * tckd.sum() + (beta * scale) * nckd.sum()
    if nll is not None:
        total = total + ce_weight * nll.sum()
    return total * weight
