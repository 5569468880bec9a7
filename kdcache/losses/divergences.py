"""Distillation losses on dense and sparse soft targets, plus feature and relation losses.

Pure tensor functions (and one small learned projection); no I/O. Every loss upcasts to
float32 before any math.

Shape legend:
    K: teachers.  B: batch (samples).  T: tokens.  V: classes or vocabulary.
    N: rows, the flattened leading dims (B, or B * T).  M: rows that count (valid).
    S: kept sparse entries per row.  D, E: student and teacher feature widths.

Conventions (kdcache's choice where tools disagree; see ``docs/losses.md``):
    * ``alpha`` weighs the distillation term; ``1 - alpha`` weighs the hard-label
      cross-entropy: ``loss = alpha * tau^2 * D(p_t, p_s) + (1 - alpha) * CE``.
    * The tau^2 factor is applied explicitly (switch: ``scale_by_temperature_squared``)
      so gradient magnitudes stay comparable across temperatures (Hinton et al. 2015, sec. 2).
    * Reduction is "batchmean": a divergence summed over V, averaged over the rows that
      count (all rows, or the valid positions of a mask), so padding never dilutes it.
    * Teacher targets are passed as *log-probabilities at temperature tau* (what
      :func:`kdcache.targets.log_probs` or :func:`kdcache.targets.combine_ensemble` return),
      never as probabilities or raw logits, or as :class:`kdcache.targets.SparseTargets`.
    * Sparse targets (top-k, top-p, mixtures) are compared on S + 1 buckets: each kept id,
      plus one *tail* bucket holding the exact mass outside the kept ids for both teacher
      and student. That is exact at k = V and otherwise a lower bound on the full-vocabulary
      divergence (data-processing inequality). Sampled targets use the counts
      (Anshumann et al. 2025). The student's full-vocabulary normaliser is computed in row
      chunks by a custom autograd function, so no [N, V] float32 tensor is materialised.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from kdcache.errors import ConfigError
from kdcache.targets.sparse import SparseTargets

#: Divergences every distillation entry point accepts (``divergence=...``).


DIVERGENCES = (
    "forward_kl",
    "reverse_kl",
    "jsd",
    "skew_kl",
    "skew_reverse_kl",
    "total_variation",
)


#: Elements (rows * V) per float32 chunk in the sparse student pass: 16 MiB.


_CHUNK_ELEMENTS = 1 << 22


_NEG_INF = float("-inf")


_LOG_EPS32 = math.log(torch.finfo(torch.float32).eps)


Targets = torch.Tensor | SparseTargets


def _check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not t > 0 or t != t or t == float("inf"):
        raise ConfigError(f"temperature must be a finite number > 0, got {temperature!r}")
    return t


def _chunk(chunk_rows: int | None, vocab: int) -> int:
    if chunk_rows is None:
        return max(1, _CHUNK_ELEMENTS // max(vocab, 1))
    if int(chunk_rows) < 1:
        raise ConfigError(f"chunk_rows must be >= 1, got {chunk_rows}")
    return int(chunk_rows)


# --------------------------------------------------------------------------------------
# The student's log-probabilities at sparse ids, chunked over rows
# --------------------------------------------------------------------------------------


def _take_rows(x_NV: torch.Tensor, rows_M: torch.Tensor | None, lo: int, hi: int) -> torch.Tensor:
    """Rows lo:hi of the selection: a view when all rows are used, else a gather.

    (Advanced indexing, not ``index_select``: on CPU the latter is ~25x slower for
    [rows, 128k] float32 slabs in torch 2.x.)
    """
    if rows_M is None:
        return x_NV[lo:hi]
    return x_NV[rows_M[lo:hi]]


def _scatter_plan(
    ids_MS: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad-safe scatter targets: each pad slot points at its row's first kept id.

    Returns (valid_MS, any_valid_M, target_MS, first_slot_M1). Writing the same value
    through a pad and through the real slot it duplicates keeps ``scatter_`` deterministic.
    """
    valid_MS = ids_MS >= 0
    any_valid_M = valid_MS.any(dim=1)
    first_slot_M1 = valid_MS.to(torch.int8).argmax(dim=1, keepdim=True)
    first_id_M1 = ids_MS.gather(1, first_slot_M1).clamp(min=0)
    target_MS = torch.where(valid_MS, ids_MS, first_id_M1)
    return valid_MS, any_valid_M, target_MS, first_slot_M1


def _exp_shifted_(u_CV: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """In place u <- exp(u - max); returns (max [C], sum [C]) so lse = max + log(sum)."""
    m_C = u_CV.amax(dim=1)
    m_C = torch.where(torch.isfinite(m_C), m_C, torch.zeros_like(m_C))
    u_CV.sub_(m_C[:, None]).exp_()
    return m_C, u_CV.sum(dim=1)


def _masked_tail_lse(u_CV: torch.Tensor, ids_CS: torch.Tensor) -> torch.Tensor:
    """logsumexp of u over the ids not kept (exact in log space; the slow path)."""
    hit = torch.zeros_like(u_CV).scatter_add_(1, ids_CS.clamp(min=0), (ids_CS >= 0).float())
    return torch.logsumexp(u_CV.masked_fill(hit > 0, _NEG_INF), dim=-1)


class _SparseStudentLogProbs(torch.autograd.Function):
    """(logits [N, V], ids [M, S], rows [M]) -> (log q at ids [M, S], log q of the tail [M]).

    Forward and backward both walk the rows in chunks and recompute the chunk's float32
    softmax in place, so peak extra memory is about one [chunk, V] float32 tensor; the
    gradient is written straight into one tensor shaped (and typed) like the logits.
    Each pass touches a chunk about six times (the dense loss: about as many), with
    exact log-space fallbacks for rows whose tail mass underflows float32.
    """

    @staticmethod
    def forward(
        ctx: Any,
        logits_NV: torch.Tensor,
        ids_MS: torch.Tensor,
        rows_M: torch.Tensor | None,
        temperature: float,
        chunk_rows: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        num_rows, vocab = ids_MS.shape[0], logits_NV.shape[1]
        valid_MS, any_valid_M, target_MS, _ = _scatter_plan(ids_MS)
        kept_MS = torch.zeros(ids_MS.shape, device=logits_NV.device)
        tail_M = torch.empty(num_rows, device=logits_NV.device)
        for lo in range(0, num_rows, chunk_rows):
            hi = min(lo + chunk_rows, num_rows)
            u_CV = _take_rows(logits_NV, rows_M, lo, hi).float() / temperature
            u_CS = u_CV.gather(1, target_MS[lo:hi])
            m_C, total_C = _exp_shifted_(u_CV)  # u_CV now holds exp(u - m)
            lse_C = m_C + torch.log(total_C)
            kept_MS[lo:hi] = u_CS - lse_C[:, None]
            # Zero the kept entries; rows with no kept id write their own value back.
            own_CS = u_CV.gather(1, target_MS[lo:hi])
            src_CS = torch.where(any_valid_M[lo:hi, None], torch.zeros_like(own_CS), own_CS)
            u_CV.scatter_(1, target_MS[lo:hi], src_CS)
            tail_sum_C = u_CV.sum(dim=1)
            tail_M[lo:hi] = torch.log(tail_sum_C) + m_C - lse_C
            # A non-empty tail whose every term underflowed: redo those rows in log space.
            redo_C = (tail_sum_C == 0) & (valid_MS[lo:hi].sum(dim=1) < vocab)
            if bool(redo_C.any()):
                idx = redo_C.nonzero().flatten()
                uu = _take_rows(logits_NV, rows_M, lo, hi)[idx].float() / temperature
                tail_M[lo + idx] = _masked_tail_lse(uu, ids_MS[lo:hi][idx]) - lse_C[idx]
        kept_MS.masked_fill_(~valid_MS, 0.0)  # finite placeholder; callers mask pads
        ctx.save_for_backward(logits_NV, ids_MS, kept_MS, tail_M)
        ctx.rows_M = rows_M
        ctx.temperature = temperature
        ctx.chunk_rows = chunk_rows
        return kept_MS, tail_M

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: Any, grad_kept_MS: torch.Tensor, grad_tail_M: torch.Tensor
    ) -> tuple[torch.Tensor | None, None, None, None, None]:
        logits_NV, ids_MS, kept_MS, tail_M = ctx.saved_tensors
        rows_M, temperature, chunk_rows = ctx.rows_M, ctx.temperature, ctx.chunk_rows
        grad_NV = torch.zeros_like(logits_NV)
        valid_MS, any_valid_M, target_MS, first_slot_M1 = _scatter_plan(ids_MS)
        gk_MS = grad_kept_MS.float().masked_fill(~valid_MS, 0.0)
        gt_M = grad_tail_M.float()
        # With u = z / tau, q = softmax(u), G = sum_s gk_s + gt:
        #   dL/du_j = q_j * (gt / q_tail - G)  for j in the tail,
        #   dL/du_j = gk_j - q_j * G           for j kept.
        big_G = gk_MS.sum(dim=1) + gt_M
        has_tail = torch.isfinite(tail_M) & (gt_M != 0)
        # exp(-log q_tail) overflows for tails below ~1e-35: those rows take the slow path.
        slow_M = has_tail & (tail_M < -80.0)
        inv_tail = torch.where(has_tail & ~slow_M, torch.exp(-tail_M), torch.zeros_like(tail_M))
        coef_M = (gt_M * inv_tail - big_G) / temperature
        kept_grad_MS = (gk_MS - kept_MS.exp() * big_G[:, None]) / temperature
        kept_grad_MS = torch.where(valid_MS, kept_grad_MS, kept_grad_MS.gather(1, first_slot_M1))
        for lo in range(0, ids_MS.shape[0], chunk_rows):
            hi = min(lo + chunk_rows, ids_MS.shape[0])
            u_CV = _take_rows(logits_NV, rows_M, lo, hi).float() / temperature
            _, total_C = _exp_shifted_(u_CV)
            u_CV.mul_((coef_M[lo:hi] / total_C)[:, None])  # tail formula for every entry
            own_CS = u_CV.gather(1, target_MS[lo:hi])
            src_CS = torch.where(any_valid_M[lo:hi, None], kept_grad_MS[lo:hi], own_CS)
            u_CV.scatter_(1, target_MS[lo:hi], src_CS)  # then the kept entries
            slow_C = slow_M[lo:hi]
            if bool(slow_C.any()):
                idx = slow_C.nonzero().flatten()
                uu = _take_rows(logits_NV, rows_M, lo, hi)[idx].float() / temperature
                lse = torch.logsumexp(uu, dim=-1)
                ids = ids_MS[lo:hi][idx]
                hit = torch.zeros_like(uu).scatter_add_(1, ids.clamp(min=0), (ids >= 0).float())
                q = torch.exp(uu - lse[:, None])
                share = torch.exp(uu - (lse + tail_M[lo:hi][idx])[:, None]).masked_fill(hit > 0, 0)
                g = share * gt_M[lo:hi][idx, None] - q * big_G[lo:hi][idx, None]
                g = g.scatter_add(1, ids.clamp(min=0), gk_MS[lo:hi][idx])
                u_CV[idx] = g / temperature
            if rows_M is None:
                grad_NV[lo:hi] = u_CV
            else:
                grad_NV[rows_M[lo:hi]] = u_CV.to(grad_NV.dtype)
        return grad_NV, None, None, None, None


def sparse_student_log_probs(
    student_logits_NV: torch.Tensor,
    ids_MS: torch.Tensor,
    *,
    temperature: float,
    rows_M: torch.Tensor | None = None,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's log-probabilities at a few ids per row, and of everything else.

    Uses the full-vocabulary normaliser, computed in row chunks: neither the forward nor
    the backward pass materialises an [N, V] float32 tensor (only [chunk_rows, V]); the
    gradient has the logits' dtype.

    Args:
        student_logits_NV: Raw student logits, shape [N, V], any float dtype.
        ids_MS: int64 ids, shape [M, S], in [0, V) or :data:`kdcache.targets.PAD_ID`;
            unique within a row.
        temperature: tau > 0 applied to the student logits.
        rows_M: int64 rows of ``student_logits_NV`` that ``ids_MS`` refers to (unique);
            all N rows in order when None.
        chunk_rows: Rows per chunk; by default as many as fit 2^22 float32 elements.

    Returns:
        ``(log_q_MS, log_q_tail_M)``: float32 [M, S] log-probabilities at the ids (-inf in
        pad slots), and float32 [M] log of the mass outside the row's ids (-inf when the
        ids cover the vocabulary).

    Raises:
        ConfigError: bad temperature, chunk size, shapes or ids.
    """
    if student_logits_NV.dim() != 2 or ids_MS.dim() != 2:
        raise ConfigError(
            f"expected logits [N, V] and ids [M, S], got {tuple(student_logits_NV.shape)} "
            f"and {tuple(ids_MS.shape)}"
        )
    tau = _check_temperature(temperature)
    num_rows, vocab = student_logits_NV.shape
    num_selected = num_rows if rows_M is None else rows_M.shape[0]
    if num_selected != ids_MS.shape[0]:
        raise ConfigError(f"{ids_MS.shape[0]} rows of ids for {num_selected} student rows")
    if ids_MS.numel() and int(ids_MS.max()) >= vocab:
        raise ConfigError(f"an id {int(ids_MS.max())} is outside the student's vocabulary {vocab}")
    ids_MS = ids_MS.to(device=student_logits_NV.device, dtype=torch.int64)
    kept_MS, tail_M = _SparseStudentLogProbs.apply(
        student_logits_NV, ids_MS, rows_M, tau, _chunk(chunk_rows, vocab)
    )
    return kept_MS.masked_fill(ids_MS < 0, _NEG_INF), tail_M


# --------------------------------------------------------------------------------------
# Divergences on aligned log-probability tensors (last dim = outcomes)
# --------------------------------------------------------------------------------------


def _kl_sum(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """sum a (log a - log b) over the last dim, with 0 log 0 = 0 and NaN-free gradients.

    The log-ratio is 0 where a = 0 (so is the product, and where's backward sends exact
    zeros into the subtraction there: no 0 * inf); a NaN in ``log_a`` stays NaN.
    """
    a = log_a.exp()
    return (a * torch.where(a > 0, log_a - log_b, 0.0)).sum(dim=-1)


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, wa: float, wb: float) -> torch.Tensor:
    """log(wa * a + wb * b), NaN-free where both are 0."""
    if wa == 0.0:
        return log_b + math.log(wb)
    if wb == 0.0:
        return log_a + math.log(wa)
    both_zero = torch.isneginf(log_a) & torch.isneginf(log_b)
    zero = torch.zeros((), device=log_a.device)
    la = torch.where(both_zero, zero, log_a)
    lb = torch.where(both_zero, zero, log_b)
    mixed = torch.logaddexp(la + math.log(wa), lb + math.log(wb))
    return torch.where(both_zero, torch.full_like(mixed, _NEG_INF), mixed)


def _divergence(
    log_p: torch.Tensor, log_q: torch.Tensor, kind: str, beta: float, skew: float
) -> torch.Tensor:
    """D(p_teacher, q_student) summed over the last dim."""
    if kind == "forward_kl":
        return _kl_sum(log_p, log_q)
    if kind == "reverse_kl":
        return _kl_sum(log_q, log_p)
    if kind == "jsd":
        log_m = _log_mix(log_p, log_q, beta, 1.0 - beta)
        return beta * _kl_sum(log_p, log_m) + (1.0 - beta) * _kl_sum(log_q, log_m)
    if kind == "skew_kl":
        return _kl_sum(log_p, _log_mix(log_p, log_q, skew, 1.0 - skew))
    if kind == "skew_reverse_kl":
        return _kl_sum(log_q, _log_mix(log_p, log_q, 1.0 - skew, skew))
    if kind == "total_variation":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(dim=-1)
    raise ConfigError(f"unknown divergence {kind!r}; expected one of {DIVERGENCES}")


def _check_kind(kind: str, beta: float, skew: float) -> None:
    if kind not in DIVERGENCES:
        raise ConfigError(f"unknown divergence {kind!r}; expected one of {DIVERGENCES}")
    if kind == "jsd" and not 0.0 < beta < 1.0:
        raise ConfigError(f"jsd needs 0 < beta < 1, got {beta}")
    if kind in ("skew_kl", "skew_reverse_kl") and not 0.0 <= skew < 1.0:
        raise ConfigError(f"skew must be in [0, 1), got {skew}")


def _flat_student(student_logits: torch.Tensor) -> torch.Tensor:
    if student_logits.dim() < 2:
        raise ConfigError(
            f"student logits must be [B, V] or [B, T, V], got {tuple(student_logits.shape)}"
        )
    if student_logits.dim() == 2:
        return student_logits
    return student_logits.reshape(-1, student_logits.shape[-1])


# --------------------------------------------------------------------------------------
# Dense forward KL, fused with the hard-label term: the hot path of kd_loss
# --------------------------------------------------------------------------------------


#: A weight of a reduced term: a number, or a 0-dim float32 tensor on the logits' device
#: (a count that never left it).
Weight = float | torch.Tensor


class _DenseForwardKL(torch.autograd.Function):
    """Forward KL to dense targets, optionally with the hard-label NLL, as one node.

    ``apply(logits [N, V], teacher log p [N, V], tau, keep [N, 1] | None, labels [N, 1] |
    None, keep_labels [N, 1] | None, w_kl, w_nll)``: with ``w_kl`` None, the float32 [N]
    KL per row (no labels); else the float32 scalar ``w_kl * sum_kept KL + w_nll *
    sum_labelled NLL``. q = softmax(logits / tau); the NLL is -log softmax(logits) at the
    label (temperature 1). A row left out of a term adds 0 to it and gets exactly zero
    gradient from it, whatever it holds (NaN included).

    The value is that of :func:`_kl_sum` on ``log_softmax(logits / tau)``: ``sum_{p > 0}
    p (log p - log q)`` (0 log 0 = 0; +inf where the teacher has mass and the student
    none; NaN where a row's inputs hold a NaN); the gradient ``(q sum_v p - p) / tau``, plus
    ``softmax(logits) - onehot(label)`` for the NLL. One autograd node instead of about
    fifteen; each direction makes two float32 [N, V] buffers and works in place on them
    (the forward keeps only [N] statistics, the backward recomputes q and p from the
    inputs); nothing waits for the device.

    On the CPU, :func:`kdcache.losses.kd_loss` gives a classifier's batch to a compiled
    kernel instead (:mod:`kdcache.losses._cpu_kernel`), with the same arithmetic.
    """

    @staticmethod
    def forward(
        ctx: Any,
        logits_NV: torch.Tensor,
        teacher_NV: torch.Tensor,
        tau: float,
        keep_N1: torch.Tensor | None,
        labels_N1: torch.Tensor | None,
        keep_labels_N1: torch.Tensor | None,
        w_kl: Weight | None,
        w_nll: Weight,
    ) -> torch.Tensor:
        f32 = torch.float32
        s_NV = logits_NV if logits_NV.dtype == f32 else logits_NV.float()
        t_NV = teacher_NV if teacher_NV.dtype == f32 else teacher_NV.float()
        # Shift by the row max; a row with no finite max is NaN, as in log_softmax.
        m_N1 = s_NV.amax(dim=1, keepdim=True)
        a_NV = s_NV - m_N1
        b_NV = torch.exp(a_NV)
        nll = lse1_N1 = None
        if labels_N1 is not None:
            lse1_N1 = b_NV.sum(dim=1, keepdim=True).log_().add_(m_N1)
            try:
                nll_N1 = lse1_N1 - s_NV.gather(1, labels_N1)
            except (RuntimeError, IndexError) as err:  # raised on the CPU; a GPU asserts
                raise ConfigError(
                    f"labels must be in [0, {s_NV.shape[1]}) or equal the ignore index"
                ) from err
            if keep_labels_N1 is not None:
                nll_N1 = torch.where(keep_labels_N1, nll_N1, 0.0)
            nll = nll_N1.sum()
        log_z_N1 = torch.exp(a_NV.div_(tau), out=b_NV).sum(dim=1, keepdim=True).log_()
        log_q_NV = a_NV.sub_(log_z_N1)  # log_softmax(logits / tau)
        p_NV = torch.exp(t_NV, out=b_NV)
        mass_N1 = p_NV.sum(dim=1, keepdim=True)
        # A term with p = 0 is 0 * (+-inf or NaN) = NaN exactly where the teacher has no
        # mass (log p = -inf) or p underflows where the student has none: nansum drops
        # those (0 log 0 = 0), and the row's log-partition and mass bring back a NaN of
        # its inputs (0 * NaN).
        kl_N1 = torch.sub(t_NV, log_q_NV, out=a_NV).mul_(p_NV).nansum(dim=1, keepdim=True)
        kl_N1.addcmul_(log_z_N1, mass_N1, value=0.0)
        del a_NV, b_NV
        if keep_N1 is not None:
            kl_N1 = torch.where(keep_N1, kl_N1, 0.0)
        ctx.save_for_backward(
            logits_NV, teacher_NV, keep_N1, labels_N1, keep_labels_N1, m_N1, log_z_N1, mass_N1
        )
        ctx.lse1_N1, ctx.tau, ctx.w_kl, ctx.w_nll = lse1_N1, tau, w_kl, w_nll
        if w_kl is None:
            return kl_N1.reshape(-1)
        loss = kl_N1.sum() * w_kl
        return loss if nll is None else loss + nll * w_nll

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        logits_NV, teacher_NV, keep_N1, labels_N1, keep_labels_N1, m_N1, log_z_N1, mass_N1 = (
            ctx.saved_tensors
        )
        lse1_N1, tau, w_kl, w_nll = ctx.lse1_N1, ctx.tau, ctx.w_kl, ctx.w_nll
        nones = (None,) * 7
        if not ctx.needs_input_grad[0]:
            return (None, *nones)
        f32 = torch.float32
        s_NV = logits_NV if logits_NV.dtype == f32 else logits_NV.float()
        t_NV = teacher_NV if teacher_NV.dtype == f32 else teacher_NV.float()
        grad = grad.float()
        # KL: (q * sum_v p - p) * c, c = the row's gradient over tau
        c = grad.reshape(-1, 1) / tau if w_kl is None else grad * (w_kl / tau)
        g_NV = torch.sub(s_NV, m_N1).div_(tau).sub_(log_z_N1).exp_().mul_(mass_N1 * c)
        w_NV = torch.exp(t_NV)
        g_NV.addcmul_(w_NV, c, value=-1.0)
        if keep_N1 is not None:
            g_NV.masked_fill_(~keep_N1, 0.0)
        if labels_N1 is not None:
            # NLL: (softmax(logits) - onehot(label)) * c, c = the gradient times w_nll
            c = grad * w_nll
            h_NV = torch.sub(s_NV, lse1_N1, out=w_NV).exp_().mul_(c)
            h_NV.scatter_add_(1, labels_N1, (-c).expand(labels_N1.shape))
            if keep_labels_N1 is not None:
                h_NV.masked_fill_(~keep_labels_N1, 0.0)
            g_NV.add_(h_NV)
        return (g_NV if logits_NV.dtype == f32 else g_NV.to(logits_NV.dtype), *nones)


def dense_forward_kl_rows(
    student_logits_NV: torch.Tensor, teacher_log_probs_NV: torch.Tensor, *, temperature: float
) -> torch.Tensor:
    """Per-row forward KL(p_t || p_s) to dense targets, fused (see :class:`_DenseForwardKL`).

    Args:
        student_logits_NV: Raw student logits, shape [N, V], any float dtype (math in
            float32; the gradient has the logits' dtype).
        teacher_log_probs_NV: Teacher log-probabilities at tau, shape [N, V], any float
            dtype; -inf where the teacher has no mass. Not differentiated.
        temperature: tau > 0 applied to the student logits.

    Returns:
        float32 [N], as ``_kl_sum(teacher, log_softmax(student / tau))``.
    """
    return _DenseForwardKL.apply(
        student_logits_NV, teacher_log_probs_NV, temperature, None, None, None, None, 0.0
    )


def dense_forward_kl_loss(
    student_logits_NV: torch.Tensor,
    teacher_log_probs_NV: torch.Tensor,
    *,
    temperature: float,
    kl_weight: Weight,
    keep_N1: torch.Tensor | None = None,
    labels_N1: torch.Tensor | None = None,
    keep_labels_N1: torch.Tensor | None = None,
    nll_weight: Weight = 0.0,
) -> torch.Tensor:
    """``kl_weight * sum_kept KL(p_t || p_s) + nll_weight * sum_labelled NLL``, fused.

    The dense path of :func:`kdcache.losses.kd_loss`: one autograd node, no host
    synchronisation (it runs on an accelerator as it is).

    Args:
        student_logits_NV: Raw student logits, shape [N, V], any float dtype (math in
            float32; the gradient has the logits' dtype).
        teacher_log_probs_NV: Teacher log-probabilities at tau, shape [N, V], any float
            dtype; -inf where the teacher has no mass. Not differentiated.
        temperature: tau > 0 applied to the student logits for the KL (the NLL is at 1).
        kl_weight: Weight of the KL sum (a number or a 0-dim float32 tensor).
        keep_N1: bool [N, 1], rows whose KL counts (None: all).
        labels_N1: int64 [N, 1] class ids in [0, V) (None: no NLL term). A row without a
            label holds any valid id and is False in ``keep_labels_N1``.
        keep_labels_N1: bool [N, 1], rows whose NLL counts (None: all).
        nll_weight: Weight of the NLL sum.

    Returns:
        Scalar float32 tensor.

    Raises:
        ConfigError: logits and teacher of different shapes (or not [N, V]); a label
            outside [0, V), found by the gather (or the CPU kernel) that reads it on the
            CPU (on an accelerator the gather's device-side assertion fails instead: a
            host check would synchronise every step).
    """
    if teacher_log_probs_NV.shape != student_logits_NV.shape or student_logits_NV.dim() != 2:
        raise ConfigError(
            f"student logits {tuple(student_logits_NV.shape)} and teacher log-probabilities "
            f"{tuple(teacher_log_probs_NV.shape)} must have the same shape [N, V]"
        )
    return _DenseForwardKL.apply(
        student_logits_NV,
        teacher_log_probs_NV,
        temperature,
        keep_N1,
        labels_N1,
        keep_labels_N1,
        kl_weight,
        nll_weight,
    )


def _rows_divergence(
    student_logits: torch.Tensor,
    teacher: Targets,
    *,
    temperature: float,
    kind: str,
    beta: float,
    skew: float,
    rows_M: torch.Tensor | None,
    chunk_rows: int | None,
) -> torch.Tensor:
    """float32 [M] divergence for the selected rows (all rows when rows_M is None)."""
    tau = _check_temperature(temperature)
    _check_kind(kind, beta, skew)
    student_NV = _flat_student(student_logits)
    num_rows, vocab = student_NV.shape
    if isinstance(teacher, SparseTargets):
        if teacher.num_rows != num_rows:
            raise ConfigError(
                f"sparse targets have {teacher.num_rows} rows but the student has {num_rows} "
                f"rows (leading dims {tuple(student_logits.shape[:-1])} flattened)"
            )
        if teacher.kind == "sampled_counts" and kind != "forward_kl":
            raise ConfigError(
                f"{kind} is refused for sampled_counts targets: they hold only the estimate "
                "p_hat = counts / num_samples, which is unbiased for forward KL (linear in "
                "the teacher's p) but not for divergences that are not linear in p (reverse "
                "KL is even infinite where p_hat is 0); use divergence 'forward_kl', or "
                "build kind 'sampled' (the drawn ids' exact values) or 'topk'"
            )
        if teacher.kind == "sampled" and kind == "reverse_kl":
            raise ConfigError(
                "reverse KL needs the teacher's probability wherever the student puts mass, "
                "and sampled targets only estimate it on the drawn ids; use top-k targets "
                "(exact tail bucket) or another divergence"
            )
        sel = teacher if rows_M is None else teacher.rows(rows_M)
        ids_MS = sel.ids_BS.to(student_NV.device)
        log_q_MS, log_q_tail_M = sparse_student_log_probs(
            student_NV, ids_MS, temperature=tau, rows_M=rows_M, chunk_rows=chunk_rows
        )
        if sel.kind == "sampled":
            log_phat_MS = sel.estimate_log_probs().to(student_NV.device)
            if kind == "forward_kl":
                # Unbiased estimate of KL(p || q): sum_i p_hat_i (log p_i - log q_i), with
                # the exact teacher log p_i of each drawn id.
                log_p_MS = sel.log_probs().to(student_NV.device)
                w_MS = log_phat_MS.exp()
                pos = w_MS > 0
                zero = torch.zeros((), device=w_MS.device)
                diff = torch.where(pos, log_p_MS, zero) - torch.where(pos, log_q_MS, zero)
                return torch.where(pos, w_MS * diff, zero).sum(dim=-1)
            log_p_tail_M = torch.full_like(log_q_tail_M, _NEG_INF)
            log_p_MS = log_phat_MS
        else:
            log_p_MS = sel.log_probs().to(student_NV.device)
            log_p_tail_M = sel.tail_log_mass().to(student_NV.device)
            if sel.tail_log_mass_B is None:
                # A tail derived from the log-partition is only good to ~1e-6 absolute:
                # below that it may read 0 where it is not, so floor it (float32 epsilon).
                log_p_tail_M = log_p_tail_M.clamp(min=_LOG_EPS32)
            # When the kept ids cover the vocabulary there is no tail, whatever rounding says.
            covers = (ids_MS >= 0).sum(dim=-1) >= vocab
            log_p_tail_M = log_p_tail_M.masked_fill(covers, _NEG_INF)
        log_p = torch.cat([log_p_MS, log_p_tail_M[:, None]], dim=-1)
        log_q = torch.cat([log_q_MS, log_q_tail_M[:, None]], dim=-1)
        return _divergence(log_p, log_q, kind, beta, skew)
    if teacher.shape != student_logits.shape:
        raise ConfigError(
            f"student logits {tuple(student_logits.shape)} and teacher log-probabilities "
            f"{tuple(teacher.shape)} must have the same shape [..., V]"
        )
    teacher_NV = teacher.reshape(-1, vocab)
    if kind == "forward_kl" and rows_M is None and not teacher_NV.requires_grad:
        return dense_forward_kl_rows(student_NV, teacher_NV, temperature=tau)
    if rows_M is not None:
        student_NV = student_NV[rows_M]
        teacher_NV = teacher_NV[rows_M.to(teacher_NV.device)]
    log_q = torch.log_softmax(student_NV.float() / tau, dim=-1)
    return _divergence(teacher_NV.float(), log_q, kind, beta, skew)


def divergence(
    student_logits_BV: torch.Tensor,
    teacher: Targets,
    *,
    temperature: float,
    kind: str = "forward_kl",
    beta: float = 0.5,
    skew: float = 0.1,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Per-row divergence ``D(p_t, p_s)`` of any kind in :data:`DIVERGENCES`, unreduced.

    Args:
        student_logits_BV: Raw student logits, shape [B, V] or [B, T, V], any float dtype.
        teacher: Teacher log-probabilities at tau shaped like the student logits (entries
            may be -inf where the teacher has no mass), or SparseTargets with B (or B * T)
            rows.
        temperature: tau > 0 applied to the student logits.
        kind: The divergence (see the named functions below for each formula).
        beta: JSD mixing weight, 0 < beta < 1.
        skew: Skew KL mixing weight, 0 <= skew < 1.
        chunk_rows: Row chunk for sparse targets (see :func:`sparse_student_log_probs`).

    Returns:
        float32 tensor shaped like the student's leading dims ([B] or [B, T]).

    Raises:
        ConfigError: unknown kind, parameters out of range, or shapes that disagree.
    """
    out = _rows_divergence(
        student_logits_BV,
        teacher,
        temperature=temperature,
        kind=kind,
        beta=beta,
        skew=skew,
        rows_M=None,
        chunk_rows=chunk_rows,
    )
    return out.reshape(student_logits_BV.shape[:-1])


def forward_kl(
    student_logits_BV: torch.Tensor,
    teacher_log_probs_BV: Targets,
    *,
    temperature: float,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Per-row forward KL(p_t || p_s) = sum_v p_t (log p_t - log p_s) at temperature tau.

    Mass-covering: the student is pushed to cover everything the teacher allows.

    Args:
        student_logits_BV: Raw student logits, shape [B, V] (or [B, T, V]), any float dtype.
        teacher_log_probs_BV: Teacher log-probabilities at tau, same shape; entries may be
            -inf where the teacher puts zero mass (0 log 0 = 0). Or SparseTargets: top-k,
            top-p and mixtures use the exact tail bucket; sampled targets give the unbiased
            estimate ``sum_i p_hat_i (log p_t,i - log p_s,i)`` over drawn ids (which can be
            negative for one draw).
        temperature: tau > 0 applied to the student logits.
        chunk_rows: Row chunk for sparse targets.

    Returns:
        float32 tensor of shape [B] (or [B, T]), each entry >= 0 (up to rounding).

    Raises:
        ConfigError: temperature <= 0 or shapes differ.

    Source: Hinton, Vinyals, Dean 2015, sec. 2; sampled form: Anshumann et al. 2025.

    Example:
        >>> teacher = torch.log(torch.tensor([[0.5, 0.5], [1.0, 0.0]]))
        >>> forward_kl(torch.zeros(2, 2), teacher, temperature=2.0)
        tensor([0.0000, 0.6931])
    """
    return divergence(
        student_logits_BV,
        teacher_log_probs_BV,
        temperature=temperature,
        kind="forward_kl",
        chunk_rows=chunk_rows,
    )


def reverse_kl(
    student_logits_BV: torch.Tensor,
    teacher_log_probs_BV: Targets,
    *,
    temperature: float,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Per-row reverse KL(p_s || p_t) = sum_v p_s (log p_s - log p_t): mode-seeking.

    Infinite where the student puts mass on an id the teacher gives none (mask such
    padded slots in the student logits too, with -inf). Sampled targets are refused.

    Args, Returns: as :func:`forward_kl`.

    Raises:
        ConfigError: as :func:`forward_kl`, or sampled targets.

    Source: Gu et al., "MiniLLM: Knowledge Distillation of Large Language Models",
    ICLR 2024.
    """
    return divergence(
        student_logits_BV,
        teacher_log_probs_BV,
        temperature=temperature,
        kind="reverse_kl",
        chunk_rows=chunk_rows,
    )


def jsd(
    student_logits_BV: torch.Tensor,
    teacher_log_probs_BV: Targets,
    *,
    temperature: float,
    beta: float = 0.5,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Per-row generalised Jensen-Shannon divergence with weight beta on the teacher.

    ``JSD_beta = beta KL(p_t || m) + (1 - beta) KL(p_s || m)``, ``m = beta p_t + (1 - beta)
    p_s``; between 0 and the binary entropy of beta (<= ln 2, reached at beta = 0.5).

    Args:
        beta: Teacher weight, 0 < beta < 1.
        Others: as :func:`forward_kl`.

    Returns:
        float32 [B] (or [B, T]).

    Raises:
        ConfigError: as :func:`forward_kl`, or beta outside (0, 1).

    Source: Agarwal et al., "On-Policy Distillation of Language Models: Learning from
    Self-Generated Mistakes" (GKD), ICLR 2024.
    """
    return divergence(
        student_logits_BV,
        teacher_log_probs_BV,
        temperature=temperature,
        kind="jsd",
        beta=beta,
        chunk_rows=chunk_rows,
    )


def skew_kl(
    student_logits_BV: torch.Tensor,
    teacher_log_probs_BV: Targets,
    *,
    temperature: float,
    skew: float = 0.1,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Per-row skew KL ``KL(p_t || skew p_t + (1 - skew) p_s)``; skew = 0 is forward KL.

    Args:
        skew: Mixing weight alpha of DistiLLM, 0 <= skew < 1 (0.1 in the paper).
        Others: as :func:`forward_kl`.

    Returns:
        float32 [B] (or [B, T]), finite for skew > 0 even where the student has no mass.

    Raises:
        ConfigError: as :func:`forward_kl`, or skew outside [0, 1).

    Source: Ko et al., "DistiLLM: Towards Streamlined Distillation for Large Language
    Models", ICML 2024 (SKL).
    """
    return divergence(
        student_logits_BV,
        teacher_log_probs_BV,
        temperature=temperature,
        kind="skew_kl",
        skew=skew,
        chunk_rows=chunk_rows,
    )


def skew_reverse_kl(
    student_logits_BV: torch.Tensor,
    teacher_log_probs_BV: Targets,
    *,
    temperature: float,
    skew: float = 0.1,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Per-row skew reverse KL ``KL(p_s || (1 - skew) p_t + skew p_s)``; skew = 0 is reverse KL.

    Args, Returns, Raises: as :func:`skew_kl`.

    Source: Ko et al., DistiLLM, ICML 2024 (SRKL).
    """
    return divergence(
        student_logits_BV,
        teacher_log_probs_BV,
        temperature=temperature,
        kind="skew_reverse_kl",
        skew=skew,
        chunk_rows=chunk_rows,
    )


def total_variation(
    student_logits_BV: torch.Tensor,
    teacher_log_probs_BV: Targets,
    *,
    temperature: float,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Per-row total variation distance ``0.5 * sum_v |p_t - p_s|``, in [0, 1].

    Args, Returns, Raises: as :func:`forward_kl`.

    Source: Wen et al., "f-Divergence Minimization for Sequence-Level Knowledge
    Distillation", ACL 2023 (TVD).
    """
    return divergence(
        student_logits_BV,
        teacher_log_probs_BV,
        temperature=temperature,
        kind="total_variation",
        chunk_rows=chunk_rows,
    )
