"""Distillation losses.

Pure tensor functions; no I/O. Every loss upcasts to float32 before any math.

Shape legend:
    B: batch (samples, or flattened valid tokens).  V: classes or vocabulary.

Conventions (kdcache's choice where tools disagree; see ``docs/losses.md``):
    * ``alpha`` weighs the distillation term; ``1 - alpha`` weighs the hard-label
      cross-entropy: ``loss = alpha * tau^2 * KL(p_t || p_s) + (1 - alpha) * CE``.
    * The tau^2 factor is applied explicitly (switch: ``scale_by_temperature_squared``)
      so gradient magnitudes stay comparable across temperatures (Hinton et al. 2015, sec. 2).
    * Reduction is "batchmean": KL summed over V, averaged over the rows that count.
    * Teacher targets are passed as *log-probabilities at temperature tau* (what
      :func:`kdcache.targets.log_probs` or :func:`kdcache.targets.combine_ensemble` return),
      never as probabilities or raw logits.
"""

from __future__ import annotations

import torch

from kdcache.errors import ConfigError

IGNORE_INDEX = -100


def forward_kl(
    student_logits_BV: torch.Tensor,
    teacher_log_probs_BV: torch.Tensor,
    *,
    temperature: float,
) -> torch.Tensor:
    """Per-row forward KL(p_t || p_s) at temperature tau, summed over V.

    Args:
        student_logits_BV: Raw student logits, shape [B, V], any float dtype.
        teacher_log_probs_BV: Teacher log-probabilities at tau, shape [B, V]; entries may
            be -inf where the teacher puts zero mass.
        temperature: tau > 0 applied to the student logits.

    Returns:
        float32 tensor of shape [B], each entry >= 0 (up to rounding).

    Raises:
        ConfigError: temperature <= 0 or shapes differ.

    Source: Hinton, Vinyals, Dean 2015, sec. 2.
    """
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    if student_logits_BV.shape != teacher_log_probs_BV.shape:
        raise ConfigError(
            f"student logits {tuple(student_logits_BV.shape)} and teacher log-probabilities "
            f"{tuple(teacher_log_probs_BV.shape)} must have the same shape [B, V]"
        )
    log_q = torch.log_softmax(student_logits_BV.float() / temperature, dim=-1)
    log_p = teacher_log_probs_BV.float()
    p = log_p.exp()
    # 0 * log 0 = 0: where the teacher has no mass the term vanishes (and stays finite).
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return terms.sum(dim=-1)


def kd_loss(
    student_logits_BV: torch.Tensor,
    teacher_log_probs_BV: torch.Tensor,
    *,
    temperature: float,
    alpha: float = 1.0,
    labels_B: torch.Tensor | None = None,
    scale_by_temperature_squared: bool = True,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Hinton-style loss: ``alpha * tau^2 * KL(p_t || p_s) + (1 - alpha) * CE(y, s)``.

    Args:
        student_logits_BV: Raw student logits, shape [B, V], any float dtype (upcast to fp32).
        teacher_log_probs_BV: Teacher (or ensemble) log-probabilities at temperature tau,
            shape [B, V].
        temperature: tau > 0, dimensionless.
        alpha: Weight of the distillation term in [0, 1].
        labels_B: Hard labels, int64 shape [B], ``ignore_index`` where a sample has no label.
            Required when alpha < 1.
        scale_by_temperature_squared: Multiply the KL term by tau^2 (default True).
        ignore_index: Label value that excludes a row from the cross-entropy.

    Returns:
        Scalar float32 tensor. KL is summed over V and averaged over B ("batchmean");
        CE (at temperature 1) is averaged over labelled rows. A term with no rows is 0.

    Raises:
        ConfigError: alpha outside [0, 1], temperature <= 0, shapes differ, or labels
            missing while alpha < 1.

    Source: Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", 2015, sec. 2.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha must be in [0, 1], got {alpha}")
    if alpha < 1.0 and labels_B is None:
        raise ConfigError("alpha < 1 mixes in cross-entropy, so labels_B is required")
    loss = student_logits_BV.new_zeros((), dtype=torch.float32)
    if alpha > 0:
        kl = forward_kl(student_logits_BV, teacher_log_probs_BV, temperature=temperature).mean()
        scale = temperature**2 if scale_by_temperature_squared else 1.0
        loss = loss + alpha * scale * kl
    if alpha < 1.0:
        assert labels_B is not None
        loss = loss + (1.0 - alpha) * cross_entropy(student_logits_BV, labels_B, ignore_index)
    return loss


def cross_entropy(
    student_logits_BV: torch.Tensor, labels_B: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Hard-label cross-entropy at temperature 1, mean over labelled rows, float32.

    Args:
        student_logits_BV: Raw logits, shape [B, V].
        labels_B: int64 class ids, shape [B]; ``ignore_index`` rows are excluded.
        ignore_index: Label value to skip.

    Returns:
        Scalar float32 tensor; 0 (with a zero gradient) when no row has a label.
    """
    valid = labels_B != ignore_index
    if not bool(valid.any()):
        return student_logits_BV.float().sum() * 0.0
    return torch.nn.functional.cross_entropy(
        student_logits_BV.float(), labels_B.long(), ignore_index=ignore_index
    )
