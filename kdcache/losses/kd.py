"""Distillation objectives built on the divergences: Hinton KD, token-level KD, multi-teacher
losses and the hard-label cross-entropy, with tau^2 scaling applied explicitly.

Shape legend: K teachers, B batch, T tokens, V classes or vocabulary, N rows (B or B * T),
M rows that count (valid labels or positions).

**Normalisation.** Each term is a sum over the rows that count in it (labelled rows for
the cross-entropy, unmasked rows for the distillation term) divided by a *divisor*: by
default this process's count of those rows (a mean over the batch it sees). Under data
parallelism that mean depends on how the rows that count fall on the ranks: with 1,000
labels in 60,000 rows, two ranks average their cross-entropy over, say, 14 and 19
labelled rows, and DeepSpeed's mean of the two gradients is not the gradient of the mean
over the 33. Every loss here therefore takes ``normalizer``: a function from this rank's
count to the divisor. :func:`kdcache.train.data_parallel_normalizer` returns
``global count / world size`` (a collective over the ranks), which makes each term's
averaged gradient exactly that of one process holding the whole global batch.
"""

from __future__ import annotations

import ctypes
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch

from kdcache import losses
from kdcache import targets as _targets
from kdcache.errors import ConfigError
from kdcache.losses import _cpu_kernel
from kdcache.losses.divergences import (
    Targets,
    Weight,
    _check_temperature,
    _flat_student,
    _rows_divergence,
    dense_forward_kl_loss,
    sparse_student_log_probs,
)
from kdcache.targets.dense import _weights
from kdcache.targets.sparse import SparseTargets

IGNORE_INDEX = -100

#: ``normalizer(count) -> divisor``: given this process's number of rows that count in a
#: loss term, what the term's sum over them is divided by (see the module docstring).
#: None stands for the count itself. It may be a collective (every rank calls it once per
#: term, in the same order, also when its own count is 0).
Normalizer = Callable[[int], float]


#: Multi-teacher modes of :func:`multi_teacher_loss`.


MULTI_TEACHER_MODES = ("combined_target", "sum_of_losses")


# --------------------------------------------------------------------------------------
# Reduced losses
# --------------------------------------------------------------------------------------


def _divisor(count: int, normalizer: Normalizer | None) -> float:
    """What a term's sum over its ``count`` counted rows is divided by.

    ``normalizer(count)`` (or ``count``); 1 when that is 0, where every rank's sum is 0.

    Raises:
        ConfigError: the normalizer returned a negative or non-finite value.
    """
    value = float(count) if normalizer is None else float(normalizer(int(count)))
    if not value >= 0.0 or value == float("inf"):
        raise ConfigError(
            f"the loss normalizer returned {value} for {count} row(s); expected a finite "
            "divisor >= 0 (e.g. kdcache.train.data_parallel_normalizer: the global count "
            "over the world size)"
        )
    return value if value > 0.0 else 1.0


def _once(normalizer: Normalizer | None) -> Normalizer | None:
    """``normalizer`` called at most once (the K terms of one multi-teacher loss count the
    same rows, so one collective serves them all)."""
    if normalizer is None:
        return None
    seen: dict[int, float] = {}

    def once(count: int) -> float:
        if not seen:
            seen[count] = normalizer(count)
        assert count in seen, "terms of one loss count the same rows"
        return seen[count]

    return once


def _reduce(
    total: torch.Tensor, count: int | torch.Tensor, scale: float, normalizer: Normalizer | None
) -> torch.Tensor:
    """``total * scale / divisor(count)``; a count still on the device stays there unless a
    normalizer needs it as a number (one host sync per term, in the normalizer's nature)."""
    if isinstance(count, int):
        return total * (scale / _divisor(count, normalizer))
    if normalizer is None:
        divisor = count.clamp(min=1)
    else:
        # a tensor too, so that normalizer=float and None agree bit for bit
        value = _divisor(int(count), normalizer)
        divisor = torch.tensor(value, dtype=torch.float32, device=total.device)
    return (total if scale == 1.0 else total * scale) / divisor


def _keep_rows(
    mask: torch.Tensor | None, leading: torch.Size, device: torch.device
) -> torch.Tensor | None:
    """bool [N, 1]: the rows that count, or None for all rows."""
    if mask is None:
        return None
    mask_t = torch.as_tensor(mask, device=device)
    if mask_t.dtype != torch.bool:
        raise ConfigError(f"mask must be a bool tensor, got {mask_t.dtype}")
    if tuple(mask_t.shape) != tuple(leading):
        raise ConfigError(
            f"mask shape {tuple(mask_t.shape)} must equal the logits' leading dims {tuple(leading)}"
        )
    return mask_t.reshape(-1, 1)


def _valid_rows(
    mask: torch.Tensor | None, leading: torch.Size, device: torch.device
) -> torch.Tensor | None:
    """int64 [M] indices of rows that count, or None for all rows (a host sync)."""
    keep_N1 = _keep_rows(mask, leading, device)
    return None if keep_N1 is None else keep_N1.nonzero()[:, 0]


def _reads_back_free(device: torch.device) -> bool:
    """Whether reading a tensor of ``device`` back to the host costs nothing (the CPU):
    then the losses read counts as numbers and drop masks that keep every row. On an
    accelerator they never do (a read would wait for the device every step)."""
    return device.type == "cpu"


def _labelled_rows(
    labels: torch.Tensor, leading: torch.Size, vocab: int, ignore_index: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(int64 [N, 1] labels, 0 in unlabelled rows; bool [N, 1] labelled), on ``device``.

    Labels outside [0, V) are refused here when they sit on the CPU and the logits do not
    (no device sync); on the logits' own device the gather that reads them refuses them.
    """
    labels_t = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(labels)
    if tuple(labels_t.shape) != tuple(leading):
        raise ConfigError(
            f"labels shape {tuple(labels_t.shape)} must equal the logits' leading dims "
            f"{tuple(leading)}"
        )
    if labels_t.device.type == "cpu" and device.type != "cpu":
        bad = (labels_t != ignore_index) & ((labels_t < 0) | (labels_t >= vocab))
        if bool(bad.any()):
            raise ConfigError(
                f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}"
            )
    if labels_t.device != device or labels_t.dtype != torch.int64:
        labels_t = labels_t.to(device=device, dtype=torch.int64)
    labels_N1 = labels_t.reshape(-1, 1)
    keep_N1 = labels_N1 != ignore_index
    return torch.where(keep_N1, labels_N1, 0), keep_N1


def _all_labelled_on_cpu(
    labels: torch.Tensor, leading: torch.Size, ignore_index: int
) -> torch.Tensor | None:
    """A copy of ``labels`` as int64 [N, 1] when they are a CPU int64 tensor of the
    logits' leading shape and no row has ``ignore_index``, else None (then
    :func:`_labelled_rows` checks them and says what is wrong). Checked in numpy: about
    a fifth of the torch ops' cost on a classifier's batch. The range is checked by the
    gather (or the CPU kernel) that reads them."""
    if (
        not isinstance(labels, torch.Tensor)
        or labels.device.type != "cpu"
        or labels.dtype != torch.int64
        or tuple(labels.shape) != tuple(leading)
        or not bool((labels.numpy() != ignore_index).all())
    ):
        return None
    return labels.reshape(-1, 1).clone()  # the caller may refill its buffer before backward


def _weight(scale: float, count: int | torch.Tensor, normalizer: Normalizer | None) -> Weight:
    """``scale / divisor(count)``: a number for a count known here, else a 0-dim tensor on
    the count's device (a normalizer needs the count as a number: one host sync per term,
    in the normalizer's nature)."""
    if isinstance(count, int):
        return scale / _divisor(count, normalizer)
    if normalizer is None:
        return scale / count.clamp(min=1)
    # a tensor too, so that normalizer=float and None agree bit for bit
    value = _divisor(int(count), normalizer)
    return scale / torch.tensor(value, dtype=torch.float32, device=count.device)


#: Values of a batch ([N, V]) up to which the CPU route of the fused loss runs the
#: compiled kernel (2^20: 4 MiB of float32; a classifier's batch, or a short
#: language-model batch such as 8 x 128k); larger batches take the torch route.
_GRAD_IN_FORWARD_MAX = 1 << 20


class _KernelGradient(torch.autograd.Function):
    """``apply(logits [N, V], grad [N, V] float32, value)``: the float32 scalar ``value``,
    whose gradient with respect to the logits is ``grad`` (made by the kernel with the
    value). The backward is one multiplication; ``grad`` stays with the node, so a
    backward with ``retain_graph`` can run again."""

    @staticmethod
    def forward(
        ctx: Any, logits_NV: torch.Tensor, grad_NV: torch.Tensor, value: float
    ) -> torch.Tensor:
        # saved, not kept as an attribute: freed by the backward (unless retain_graph),
        # and a second backward without retain_graph is refused as anywhere in torch
        ctx.save_for_backward(grad_NV)
        ctx.logits_dtype = logits_NV.dtype
        return torch.tensor(value, dtype=torch.float32)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (saved_NV,) = ctx.saved_tensors
        g_NV = saved_NV * grad
        return (
            g_NV if ctx.logits_dtype == torch.float32 else g_NV.to(ctx.logits_dtype),
            None,
            None,
        )


def _kernel_route(
    student_NV: torch.Tensor,
    teacher_NV: torch.Tensor,
    labels: torch.Tensor | None,
    leading: torch.Size,
    *,
    tau: float,
    kl_scale: float,
    nll_scale: float,
    ignore_index: int,
    normalizer: Normalizer | None,
) -> torch.Tensor | None:
    """The fused loss of a CPU batch by the compiled kernel (:mod:`kdcache.losses._cpu_kernel`):
    its value and its gradient in one C call, the gradient kept for the backward. Both
    terms as :func:`_dense_forward_kl_loss` defines them, every row counted in the KL,
    unlabelled rows (``ignore_index``) left out of the NLL; the normalizer is called for
    the KL, then for the NLL. None where the kernel cannot take the batch (no kernel, not
    on the CPU, over :data:`_GRAD_IN_FORWARD_MAX` values, labels that are not an int64
    CPU tensor of the logits' leading shape): the torch route then reads, or refuses, it.

    Raises:
        ConfigError: a label outside [0, V) that is not ``ignore_index`` (nothing is
            computed), or a normalizer that returns a bad divisor.
    """
    kernel = _cpu_kernel.load()
    if (
        kernel is None
        or student_NV.device.type != "cpu"
        or teacher_NV.device.type != "cpu"
        or student_NV.numel() > _GRAD_IN_FORWARD_MAX
        or student_NV.shape[1] == 0
    ):
        return None
    try:  # C reads an int64: anything else (a float, beyond 64 bits) is the torch route's
        ignore_index = operator.index(ignore_index)
    except TypeError:
        return None
    if not -(1 << 63) <= ignore_index < 1 << 63:
        return None
    n, v = student_NV.shape
    labels_N = None
    if labels is not None:
        if (
            not isinstance(labels, torch.Tensor)
            or labels.device.type != "cpu"
            or labels.dtype != torch.int64
            or labels.shape != leading
        ):
            return None
        labels_N = labels.reshape(n).contiguous()
    s_NV = student_NV.detach()
    s_NV = (s_NV if s_NV.dtype == torch.float32 else s_NV.float()).contiguous()
    t_NV = teacher_NV.detach()
    t_NV = (t_NV if t_NV.dtype == torch.float32 else t_NV.float()).contiguous()
    w_kl = kl_scale / _divisor(n, normalizer)
    w_nll, per_count = nll_scale, 1  # divided by the labelled count in C
    if labels_N is not None and normalizer is not None:
        count = kernel.count_labels(labels_N.data_ptr(), n, v, ignore_index)
        if count >= 0:  # else the kernel's call below says which row
            w_nll, per_count = nll_scale / _divisor(count, normalizer), 0
    g_NV = torch.empty_like(s_NV)
    status = (ctypes.c_int64 * 1)()
    value = kernel.forward_kl_nll(
        s_NV.data_ptr(),
        t_NV.data_ptr(),
        None if labels_N is None else labels_N.data_ptr(),
        n,
        v,
        tau,
        w_kl,
        w_nll,
        ignore_index,
        per_count,
        g_NV.data_ptr(),
        status,
    )
    if status[0] != -1:
        if status[0] == -2:
            raise MemoryError(f"kd_loss's CPU kernel could not allocate {3 * v} floats")
        assert labels_N is not None
        row = int(status[0])
        raise ConfigError(
            f"labels must be in [0, {v}) or equal ignore_index={ignore_index}; row {row} "
            f"has {int(labels_N[row])}"
        )
    if not (student_NV.requires_grad and torch.is_grad_enabled()):
        return torch.tensor(value, dtype=torch.float32)
    return _KernelGradient.apply(student_NV, g_NV, value)


def _dense_forward_kl_loss(
    student_logits: torch.Tensor,
    teacher: torch.Tensor,
    *,
    temperature: float,
    kl_scale: float,
    mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    nll_scale: float,
    ignore_index: int,
    normalizer: Normalizer | None,
) -> torch.Tensor:
    """The fused dense path: ``kl_scale * mean_kept KL + nll_scale * mean_labelled NLL``,
    each mean over its divisor (the normalizer is called for the KL, then the NLL)."""
    tau = _check_temperature(temperature)
    student_NV = _flat_student(student_logits)
    if teacher.shape != student_logits.shape:
        raise ConfigError(
            f"student logits {tuple(student_logits.shape)} and teacher log-probabilities "
            f"{tuple(teacher.shape)} must have the same shape [..., V]"
        )
    leading, device = student_logits.shape[:-1], student_NV.device
    teacher_NV = teacher if teacher.dim() == 2 else teacher.reshape(student_NV.shape)
    if mask is None:
        fast = _kernel_route(
            student_NV,
            teacher_NV,
            labels,
            leading,
            tau=tau,
            kl_scale=kl_scale,
            nll_scale=nll_scale,
            ignore_index=ignore_index,
            normalizer=normalizer,
        )
        if fast is not None:
            return fast
    # On the CPU a count is read back for free: the weights become numbers and a mask
    # that keeps every row is dropped (fewer ops per step; the same value and gradient to
    # float32 rounding).
    # Elsewhere counts stay tensors, so that nothing waits for the device.
    on_cpu = _reads_back_free(device)
    keep_N1 = _keep_rows(mask, leading, device)
    count: int | torch.Tensor = student_NV.shape[0] if keep_N1 is None else keep_N1.sum()
    if on_cpu and keep_N1 is not None:
        count = int(count)
        keep_N1 = None if count == student_NV.shape[0] else keep_N1
    kl_weight = _weight(kl_scale, count, normalizer)
    labels_N1 = keep_labels_N1 = None
    nll_weight: Weight = 0.0
    if labels is not None:
        every_N1 = _all_labelled_on_cpu(labels, leading, ignore_index) if on_cpu else None
        labelled: int | torch.Tensor
        if every_N1 is not None:
            labels_N1, labelled = every_N1, student_NV.shape[0]
        else:
            labels_N1, keep_labels_N1 = _labelled_rows(
                labels, leading, student_NV.shape[1], ignore_index, device
            )
            labelled = keep_labels_N1.sum()
            if on_cpu:
                labelled = int(labelled)
                keep_labels_N1 = None if labelled == student_NV.shape[0] else keep_labels_N1
        nll_weight = _weight(nll_scale, labelled, normalizer)
    return dense_forward_kl_loss(
        student_NV,
        teacher_NV,
        temperature=tau,
        kl_weight=kl_weight,
        keep_N1=keep_N1,
        labels_N1=labels_N1,
        keep_labels_N1=keep_labels_N1,
        nll_weight=nll_weight,
    )


def _fused(teacher: Targets, divergence: str) -> bool:
    """Whether the fused dense forward-KL path applies (not to a teacher that needs a
    gradient: the fused node differentiates the student only)."""
    return (
        divergence == "forward_kl"
        and isinstance(teacher, torch.Tensor)
        and not teacher.requires_grad
    )


def cross_entropy(
    student_logits_BV: torch.Tensor,
    labels_B: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    *,
    chunk_rows: int | None = None,
    normalizer: Normalizer | None = None,
) -> torch.Tensor:
    """Hard-label cross-entropy at temperature 1, mean over labelled rows, float32.

    Computed in row chunks (:func:`sparse_student_log_probs` at the label), so a large
    vocabulary never gets an [N, V] float32 copy.

    Args:
        student_logits_BV: Raw logits, shape [B, V] or [B, T, V], any float dtype.
        labels_B: int64 class ids or next tokens, shape [B] or [B, T];
            ``ignore_index`` positions (padding, prompt, unlabelled rows) are excluded.
        ignore_index: Label value to skip.
        chunk_rows: Rows per chunk.
        normalizer: Maps this process's number of labelled rows to the divisor of their
            summed negative log-likelihood (None: that number, a mean over this batch);
            pass :func:`kdcache.train.data_parallel_normalizer` on every rank for the
            mean over all ranks' labelled rows (see the module docstring).

    Returns:
        Scalar float32 tensor; 0 (with a zero, finite gradient) when no row has a label.

    Raises:
        ConfigError: labels of the wrong shape or outside [0, V), or a normalizer that
            returns a negative or non-finite divisor.
    """
    student_NV = _flat_student(student_logits_BV)
    labels = torch.as_tensor(labels_B, device=student_NV.device)
    if tuple(labels.shape) != tuple(student_logits_BV.shape[:-1]):
        raise ConfigError(
            f"labels shape {tuple(labels.shape)} must equal the logits' leading dims "
            f"{tuple(student_logits_BV.shape[:-1])}"
        )
    labels_N = labels.reshape(-1).long()
    bad_labels = ConfigError(
        f"labels must be in [0, {student_NV.shape[1]}) or equal ignore_index={ignore_index}"
    )
    if chunk_rows is None and student_NV.numel() <= _DIRECT_CE_MAX_ELEMENTS:
        # Small enough for one float32 copy: torch's fused kernel is several times faster
        # than the chunked path for classifier-sized batches (same value and gradient),
        # and nothing here waits for the device (without a normalizer). With no label
        # the sum is 0 with a zero gradient.
        try:
            total = torch.nn.functional.cross_entropy(
                student_NV.float(), labels_N, ignore_index=ignore_index, reduction="sum"
            )
        except (IndexError, RuntimeError) as err:  # raised on the CPU; a GPU asserts
            raise bad_labels from err
        return _reduce(total, (labels_N != ignore_index).sum(), 1.0, normalizer)
    rows_M = (labels_N != ignore_index).nonzero().flatten()
    picked = labels_N[rows_M]
    if picked.numel() and bool(((picked < 0) | (picked >= student_NV.shape[1])).any()):
        raise bad_labels
    # before any early return: the normalizer may be a collective every rank must join
    divisor = _divisor(int(rows_M.numel()), normalizer)
    log_q_M1, _ = sparse_student_log_probs(
        student_NV, picked[:, None], temperature=1.0, rows_M=rows_M, chunk_rows=chunk_rows
    )
    return -log_q_M1.sum() / divisor


#: Above this many logits, cross_entropy takes the chunked path (no [N, V] float32 copy).


_DIRECT_CE_MAX_ELEMENTS = 1 << 22


def _distill_term(
    student_logits: torch.Tensor,
    teacher: Targets,
    *,
    temperature: float,
    divergence: str,
    beta: float,
    skew: float,
    mask: torch.Tensor | None,
    scale_by_temperature_squared: bool,
    chunk_rows: int | None,
    normalizer: Normalizer | None,
) -> torch.Tensor:
    scale = float(temperature) ** 2 if scale_by_temperature_squared else 1.0
    if _fused(teacher, divergence):
        assert isinstance(teacher, torch.Tensor)
        return _dense_forward_kl_loss(
            student_logits,
            teacher,
            temperature=temperature,
            kl_scale=scale,
            mask=mask,
            labels=None,
            nll_scale=0.0,
            ignore_index=IGNORE_INDEX,
            normalizer=normalizer,
        )
    rows_M = _valid_rows(mask, student_logits.shape[:-1], student_logits.device)
    per_row = _rows_divergence(
        student_logits,
        teacher,
        temperature=temperature,
        kind=divergence,
        beta=beta,
        skew=skew,
        rows_M=rows_M,
        chunk_rows=chunk_rows,
    )
    return per_row.sum() * (scale / _divisor(int(per_row.shape[0]), normalizer))


def _check_alpha(alpha: float, labels: torch.Tensor | None) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha must be in [0, 1], got {alpha}")
    if alpha < 1.0 and labels is None:
        raise ConfigError("alpha < 1 mixes in cross-entropy, so labels_B is required")


def kd_loss(
    student_logits_BV: torch.Tensor,
    teacher_log_probs_BV: Targets,
    *,
    temperature: float,
    alpha: float = 1.0,
    labels_B: torch.Tensor | None = None,
    scale_by_temperature_squared: bool = True,
    ignore_index: int = IGNORE_INDEX,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    skew: float = 0.1,
    mask: torch.Tensor | None = None,
    chunk_rows: int | None = None,
    normalizer: Normalizer | None = None,
) -> torch.Tensor:
    """Hinton-style loss: ``alpha * tau^2 * D(p_t, p_s) + (1 - alpha) * CE(y, s)``.

    D is forward KL by default (any of :data:`DIVERGENCES`). The distillation term counts
    the rows where ``mask`` is True (all rows when None), *not* the label mask: an
    unlabelled sample still has a teacher. For token-level language-model losses, where
    padding and prompt positions carry ``ignore_index``, use :func:`token_kd_loss`.

    Dense forward KL (the default) takes a fused path: both terms in one autograd node
    (:func:`kdcache.losses.divergences.dense_forward_kl_loss`), the same value and
    gradient, and nothing read back to the host unless a ``normalizer`` asks for a count.
    It is differentiable once (no double backward) and w.r.t. the student only; a teacher
    that requires grad takes the general path. Rows left out (mask, ``ignore_index``) get
    exactly zero gradient whatever they hold; a NaN in a row that counts makes the loss NaN.

    Args:
        student_logits_BV: Raw student logits, shape [B, V] or [B, T, V], any float dtype
            (upcast to fp32).
        teacher_log_probs_BV: Teacher (or ensemble) log-probabilities at temperature tau,
            same shape, or SparseTargets with one row per student row.
        temperature: tau > 0, dimensionless.
        alpha: Weight of the distillation term in [0, 1].
        labels_B: Hard labels, int64 shape [B] (or [B, T]), ``ignore_index`` where a row has
            no label. Required when alpha < 1.
        scale_by_temperature_squared: Multiply the distillation term by tau^2 (default True).
        ignore_index: Label value that excludes a row from the cross-entropy.
        divergence: Which D (see :func:`divergence`).
        beta: JSD weight. skew: skew-KL weight.
        mask: Optional bool [B] (or [B, T]): rows that count in the distillation term.
        chunk_rows: Row chunk for sparse targets and the cross-entropy.
        normalizer: Maps this process's count of the rows a term counts to the divisor
            of its sum, once per term (distillation, then cross-entropy); None: the count.
            With several ranks pass :func:`kdcache.train.data_parallel_normalizer` on
            every rank, so that both terms average over the global batch whatever the
            split (see the module docstring).

    Returns:
        Scalar float32 tensor. D is summed over V and averaged over the counted rows
        ("batchmean"); CE (at temperature 1) is averaged over labelled rows. A term with no
        rows is 0 with finite (zero) gradients.

    Raises:
        ConfigError: alpha outside [0, 1], temperature <= 0, shapes differ, labels
            missing while alpha < 1, or a normalizer that returns a bad divisor.

    Source: Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", 2015, sec. 2.
    """
    _check_alpha(alpha, labels_B)
    if alpha > 0 and _fused(teacher_log_probs_BV, divergence):
        # Dense forward KL: one fused node for both terms, no host sync without a
        # normalizer (the same value and gradient as the general path below).
        assert isinstance(teacher_log_probs_BV, torch.Tensor)
        scale = float(temperature) ** 2 if scale_by_temperature_squared else 1.0
        return _dense_forward_kl_loss(
            student_logits_BV,
            teacher_log_probs_BV,
            temperature=temperature,
            kl_scale=alpha * scale,
            mask=mask,
            labels=labels_B if alpha < 1.0 else None,
            nll_scale=1.0 - alpha,
            ignore_index=ignore_index,
            normalizer=normalizer,
        )
    loss = torch.zeros((), device=student_logits_BV.device)
    if alpha > 0:
        kd = _distill_term(
            student_logits_BV,
            teacher_log_probs_BV,
            temperature=temperature,
            divergence=divergence,
            beta=beta,
            skew=skew,
            mask=mask,
            scale_by_temperature_squared=scale_by_temperature_squared,
            chunk_rows=chunk_rows,
            normalizer=normalizer,
        )
        loss = loss + alpha * kd
    if alpha < 1.0:
        assert labels_B is not None
        ce = cross_entropy(
            student_logits_BV,
            labels_B,
            ignore_index,
            chunk_rows=chunk_rows,
            normalizer=normalizer,
        )
        loss = loss + (1.0 - alpha) * ce
    return loss


def token_kd_loss(
    student_logits_BTV: torch.Tensor,
    teacher: Targets,
    *,
    temperature: float,
    labels_BT: torch.Tensor,
    alpha: float = 1.0,
    mask_BT: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    skew: float = 0.1,
    scale_by_temperature_squared: bool = True,
    chunk_rows: int | None = None,
    normalizer: Normalizer | None = None,
) -> torch.Tensor:
    """Token-level distillation for language models, normalised by valid positions.

    A position counts in both terms when its label (the next token, already shifted) is
    not ``ignore_index`` and ``mask_BT`` (if given) is True there. Both terms are averaged
    over the counted positions, so the same sequence gives the same loss however much it is
    padded, and a batch with no valid position gives 0 with finite gradients.

    Args:
        student_logits_BTV: Raw student logits, shape [B, T, V], any float dtype.
        teacher: Teacher log-probabilities at tau, shape [B, T, V], or SparseTargets with
            B * T rows (row-major over B, T).
        temperature: tau > 0.
        labels_BT: int64 next-token ids, shape [B, T]; ``ignore_index`` at padding and prompt.
        alpha: Weight of the distillation term in [0, 1].
        mask_BT: Optional extra bool mask, shape [B, T].
        ignore_index, divergence, beta, skew, scale_by_temperature_squared, chunk_rows,
        normalizer: As :func:`kd_loss` (the counts are of valid positions).

    Returns:
        Scalar float32 tensor.

    Raises:
        ConfigError: as :func:`kd_loss`.
    """
    labels = torch.as_tensor(labels_BT, device=student_logits_BTV.device)
    valid = labels != ignore_index
    if mask_BT is not None:
        valid = valid & torch.as_tensor(mask_BT, device=valid.device, dtype=torch.bool)
    ce_labels = torch.where(valid, labels, torch.full_like(labels, ignore_index))
    return kd_loss(
        student_logits_BTV,
        teacher,
        temperature=temperature,
        alpha=alpha,
        labels_B=ce_labels,
        scale_by_temperature_squared=scale_by_temperature_squared,
        ignore_index=ignore_index,
        divergence=divergence,
        beta=beta,
        skew=skew,
        mask=valid,
        chunk_rows=chunk_rows,
        normalizer=normalizer,
    )


def multi_teacher_loss(
    student_logits_BV: torch.Tensor,
    teachers_K: Sequence[Targets],
    *,
    temperature: float,
    mode: str = "combined_target",
    weights: Sequence[float] | None = None,
    rule: str | _targets.EnsembleRule = "mean_probs",
    divergence: str = "forward_kl",
    beta: float = 0.5,
    skew: float = 0.1,
    mask: torch.Tensor | None = None,
    scale_by_temperature_squared: bool = True,
    chunk_rows: int | None = None,
    normalizer: Normalizer | None = None,
    labels_B: torch.Tensor | None = None,
    route_keys_B: Any = None,
) -> torch.Tensor:
    """Distil from K teachers, either to their combined target or teacher by teacher.

    * ``mode="combined_target"``: ``tau^2 * D(combine_k(p_k), p_s)``. The teachers are
      first combined by ``rule`` (:func:`kdcache.targets.combine_ensemble` for dense,
      :func:`kdcache.targets.combine_sparse_ensemble` for sparse), then one divergence.
    * ``mode="sum_of_losses"``: ``tau^2 * sum_k w_k D(p_k, p_s)``, each teacher kept apart
      (as EasyDistill, with weights). For forward KL and ``mean_probs`` both modes have the
      same gradient; the value of the sum exceeds the combined one by
      ``H(sum_k w_k p_k) - sum_k w_k H(p_k) >= 0``. For other divergences they differ.

    Args:
        student_logits_BV: Raw student logits, [B, V] or [B, T, V].
        teachers_K: K teacher targets, each dense log-probabilities at tau or SparseTargets
            (``combined_target`` needs all dense or all sparse).
        temperature: tau > 0.
        mode: One of :data:`MULTI_TEACHER_MODES`.
        weights: K non-negative weights, normalised to sum 1; uniform when None.
        rule: Ensemble rule for ``combined_target``: a name or an
            :class:`kdcache.targets.EnsembleRule`; ``sum_of_losses`` takes only the
            static rules (their weights).
        divergence, beta, skew, mask, scale_by_temperature_squared, chunk_rows,
            normalizer: As :func:`kd_loss` (called once: the K terms count the same
            rows). Add a hard-label term yourself with :func:`cross_entropy`.
        labels_B: Labels for ``rule="best_on_label"``, shaped like the teachers' rows
            ([B], [B, T]; for sparse teachers [rows]), -100 where there is none.
        route_keys_B: Each row's key for ``rule="route"`` (see
            :func:`kdcache.targets.combine_ensemble`).

    Returns:
        Scalar float32 tensor, averaged over the rows that count.

    Raises:
        ConfigError: unknown mode, no teachers, mixed dense and sparse teachers in
            ``combined_target``, bad weights, a per-sample rule with ``sum_of_losses``,
            or what the combination refuses.

    Source: Hinton et al. 2015, sec. 1 (ensembles as targets); sum of per-teacher losses
    as in multi-teacher KD (e.g. You et al., "Learning from Multiple Teacher Networks",
    KDD 2017).
    """
    if mode not in MULTI_TEACHER_MODES:
        raise ConfigError(f"unknown mode {mode!r}; expected one of {MULTI_TEACHER_MODES}")
    if not teachers_K:
        raise ConfigError("multi_teacher_loss needs at least one teacher")
    spec = _targets.as_ensemble_rule(rule, weights=weights)
    if mode == "sum_of_losses" and spec.rule not in _targets.ENSEMBLE_RULES:
        raise ConfigError(
            f"mode='sum_of_losses' weighs whole teachers; rule {spec.rule!r} weighs rows: "
            "use mode='combined_target'"
        )
    w_K = _weights(len(teachers_K), spec.weights)
    common = dict(
        temperature=temperature,
        divergence=divergence,
        beta=beta,
        skew=skew,
        mask=mask,
        scale_by_temperature_squared=scale_by_temperature_squared,
        chunk_rows=chunk_rows,
        normalizer=_once(normalizer),
    )
    if mode == "sum_of_losses":
        total = torch.zeros((), device=student_logits_BV.device)
        for teacher, w in zip(teachers_K, w_K.tolist(), strict=True):
            if w > 0:
                total = total + w * _distill_term(student_logits_BV, teacher, **common)  # type: ignore[arg-type]
        return total
    sparse = [isinstance(t, SparseTargets) for t in teachers_K]
    combined: Targets
    if all(sparse):
        combined = _targets.combine_sparse_ensemble(
            [t for t in teachers_K if isinstance(t, SparseTargets)],
            rule=spec,
            labels_B=None if labels_B is None else torch.as_tensor(labels_B).reshape(-1),
            route_keys_B=route_keys_B,
        )
    elif not any(sparse):
        dense = torch.stack([t for t in teachers_K if isinstance(t, torch.Tensor)])
        combined = _targets.combine_ensemble(
            dense, rule=spec, labels_B=labels_B, route_keys_B=route_keys_B
        )
    else:
        raise ConfigError(
            "combined_target needs all teachers dense or all sparse; use "
            "mode='sum_of_losses' to mix them"
        )
    return _distill_term(student_logits_BV, combined, **common)  # type: ignore[arg-type]


def token_distill_loss(
    student_logits_BTV: torch.Tensor,
    batch: dict[str, Any],
    *,
    temperature: float,
    alpha: float = 1.0,
    weights: Sequence[float] | None = None,
    divergence: str = "forward_kl",
    vocab_size: int | None = None,
    normalizer: Normalizer | None = None,
) -> torch.Tensor:
    """The student's loss on a token batch of :class:`kdcache.SoftTargetDataset`.

    ``alpha * tau^2 * D(p_t, p_s) + (1 - alpha) * CE`` averaged over the batch's target
    positions (:func:`kdcache.losses.token_kd_loss`); prompt and padding positions are
    masked. With a list of K teachers (sampled entries), the distillation term is
    ``sum_k w_k D_k`` (:func:`kdcache.losses.multi_teacher_loss`, ``sum_of_losses``: for
    forward KL an unbiased estimate of the mixture's gradient). With ``alpha = 0`` it is
    the hard-label cross-entropy; a batch without ``targets`` is refused for any other
    alpha (it never falls back to cross-entropy silently).

    Args:
        student_logits_BTV: Raw student logits [B, T, V'] (V' >= V; columns beyond
            ``vocab_size`` are dropped).
        batch: A token batch of :class:`kdcache.SoftTargetDataset` (its ``targets``,
            ``labels`` and ``mask``).
        temperature: tau > 0 of the cache.
        alpha: Weight of the distillation term in [0, 1].
        weights: K teacher weights for a list of targets (uniform when None).
        divergence: See :data:`kdcache.losses.DIVERGENCES`.
        vocab_size: Real V (None: the logits' width).
        normalizer: As :func:`kdcache.losses.kd_loss`: pass
            :func:`kdcache.train.data_parallel_normalizer` on every rank so that both
            terms average over the target positions of the global batch.

    Returns:
        Scalar float32 tensor.

    Raises:
        ConfigError: as :func:`kdcache.losses.token_kd_loss`; or ``alpha > 0`` and the
            batch has no ``targets``.
    """
    logits = student_logits_BTV if vocab_size is None else student_logits_BTV[..., :vocab_size]
    labels = batch["labels"].to(logits.device)
    mask = batch["mask"].to(logits.device)
    tgt = batch.get("targets")
    if alpha == 0.0:
        return losses.cross_entropy(logits, labels, normalizer=normalizer)
    if tgt is None:
        raise ConfigError(
            f"the batch has no teacher 'targets' (a hard-label stream) but alpha={alpha} "
            "weighs a distillation term; stream it with kdcache.SoftTargetDataset(cache, "
            "dataset, ...), or pass alpha=0 to train on the labels alone"
        )
    if not isinstance(tgt, list):
        return losses.token_kd_loss(
            logits,
            tgt,
            temperature=temperature,
            labels_BT=labels,
            alpha=alpha,
            mask_BT=mask,
            divergence=divergence,
            normalizer=normalizer,
        )
    kd = losses.multi_teacher_loss(
        logits,
        tgt,
        temperature=temperature,
        mode="sum_of_losses",
        weights=weights,
        divergence=divergence,
        mask=mask & (labels != losses.IGNORE_INDEX),
        normalizer=normalizer,
    )
    if alpha >= 1.0:
        return alpha * kd
    ce = losses.cross_entropy(logits, labels, normalizer=normalizer)
    return alpha * kd + (1.0 - alpha) * ce
