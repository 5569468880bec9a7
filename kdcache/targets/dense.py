"""Soft-target math: temperature scaling, re-tempering, sparsification, ensembles, dtypes.

Pure tensor functions; no I/O, no stores, no configs.

Shape legend:
    K: teachers.  B: batch (samples, or flattened tokens).  V: classes or vocabulary.
    S: kept sparse entries per row.  G: temperatures in a log-partition grid.

Conventions (see ``docs/losses.md``):
    * A teacher's *soft target* at temperature tau is ``softmax(z / tau)`` over V, where
      ``z`` are its raw logits.
    * What a dense cache stores are the *scaled logits* ``z / tau`` (never probabilities),
      so the target is recovered exactly as ``log_softmax(stored)`` and can be re-tempered
      exactly to any tau' as ``stored * tau / tau'``.
    * A sparse target (:class:`SparseTargets`) stores, per row, the kept ids, their scaled
      logits ``z / tau`` and the log-partition ``logsumexp(z / tau)`` over the *full*
      vocabulary, so the kept log-probabilities and the tail mass outside them are exact.
    * All math runs in float32, whatever the input or storage dtype.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from kdcache.errors import ConfigError, TeacherOutputError

ENSEMBLE_RULES = ("mean_probs", "mean_logprobs")


_NEG_INF = float("-inf")


def _check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not t > 0 or t != t or t == float("inf"):
        raise ConfigError(f"temperature must be a finite number > 0, got {temperature!r}")
    return t


def scale_logits(logits_BV: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide raw teacher logits by the temperature, in float32.

    Args:
        logits_BV: Raw logits, shape [B, V] (or any [..., V]), any float dtype.
        temperature: Softmax temperature tau > 0, dimensionless.

    Returns:
        float32 tensor of the same shape: ``logits / tau``.

    Raises:
        ConfigError: temperature is not a finite number > 0.
        TeacherOutputError: any logit is NaN or infinite (see :func:`check_finite`).

    Source: Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", 2015, sec. 2.
    """
    t = _check_temperature(temperature)
    check_finite(logits_BV)
    return logits_BV.float() / t


def check_finite(
    values_BV: torch.Tensor,
    *,
    teacher: str = "teacher",
    sample_ids_B: torch.Tensor | Sequence[int] | None = None,
) -> None:
    """Raise if any value is NaN or +-inf, naming the teacher and the first bad sample.

    Args:
        values_BV: Tensor of shape [B, ...], any float dtype.
        teacher: Teacher name for the message.
        sample_ids_B: Optional ``sample_id`` per row, shape [B], to name the sample.

    Raises:
        TeacherOutputError: a non-finite value was found.
    """
    finite = torch.isfinite(values_BV)
    if bool(finite.all()):
        return
    rows = (~finite).reshape(values_BV.shape[0], -1).any(dim=1).nonzero().flatten()
    row = int(rows[0])
    where = f"row {row}"
    if sample_ids_B is not None:
        where = f"sample_id {int(sample_ids_B[row])}"
    raise TeacherOutputError(
        f"teacher {teacher!r} produced a non-finite output (NaN or inf) for {where} "
        f"({len(rows)} bad row(s) in this batch); fix the teacher or its input, nothing "
        "was written for this shard"
    )


def retemper(
    scaled_logits_BV: torch.Tensor, from_temperature: float, to_temperature: float
) -> torch.Tensor:
    """Re-temper stored dense scaled logits exactly: ``(z / tau) * tau / tau'``.

    Args:
        scaled_logits_BV: Stored values ``z / from_temperature``, shape [..., V].
        from_temperature: tau the values were stored at (> 0).
        to_temperature: tau' wanted (> 0).

    Returns:
        float32 tensor ``z / to_temperature`` of the same shape.

    Raises:
        ConfigError: a temperature is not a finite number > 0.
    """
    f = _check_temperature(from_temperature)
    t = _check_temperature(to_temperature)
    return scaled_logits_BV.float() * (f / t)


def log_probs(scaled_logits_BV: torch.Tensor) -> torch.Tensor:
    """Log soft targets ``log_softmax(z / tau)`` over the last dim, float32, shape kept."""
    return torch.log_softmax(scaled_logits_BV.float(), dim=-1)


def _weights(num_teachers: int, weights: Sequence[float] | None) -> torch.Tensor:
    if weights is None:
        return torch.full((num_teachers,), 1.0 / num_teachers)
    if len(weights) != num_teachers:
        raise ConfigError(f"got {len(weights)} ensemble weights for {num_teachers} teachers")
    w = torch.tensor([float(x) for x in weights], dtype=torch.float32)
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ConfigError(f"ensemble weights must be finite, >= 0 and not all 0, got {weights}")
    return w / w.sum()


def combine_ensemble(
    scaled_logits_KBV: torch.Tensor,
    *,
    rule: str = "mean_probs",
    weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """Combine K teachers' dense soft targets (all at the same temperature) into one.

    Rules:
        * ``"mean_probs"``: ``p = sum_k w_k softmax(s_k)``, the arithmetic mean of the
          teachers' distributions (Hinton et al. 2015, sec. 1: ensembles of soft targets).
        * ``"mean_logprobs"``: ``p ~ exp(sum_k w_k log_softmax(s_k))``, a weighted geometric
          mean (product of experts), renormalised over V.

    Weighted versions of both come from ``weights``. Log-probabilities are valid input
    too (``log_softmax`` of log-probabilities is the identity), so targets that were
    already normalised combine the same way. For sparse teachers see
    :func:`combine_sparse_ensemble`; to keep teachers apart and combine *losses* instead,
    see :func:`kdcache.losses.multi_teacher_loss`.

    Args:
        scaled_logits_KBV: Stored scaled logits ``z_k / tau``, shape [K, B, V] (or
            [K, ..., V]), any float dtype.
        rule: ``"mean_probs"`` or ``"mean_logprobs"``.
        weights: K non-negative weights (normalised to sum 1); uniform when None.

    Returns:
        float32 log-probabilities of the combined target, shape [B, V]; each row's
        ``exp`` sums to 1.

    Raises:
        ConfigError: unknown rule, or weights of the wrong length or sign.

    Example:
        >>> import math
        >>> s = torch.tensor([[[0.0, 0.0]], [[0.0, math.log(3.0)]]])
        >>> combine_ensemble(s).exp()
        tensor([[0.3750, 0.6250]])
    """
    if scaled_logits_KBV.dim() < 2:
        raise ConfigError(
            f"expected [K, B, V] scaled logits, got shape {tuple(scaled_logits_KBV.shape)}"
        )
    num_teachers = scaled_logits_KBV.shape[0]
    w_K = _weights(num_teachers, weights).to(scaled_logits_KBV.device)
    logp_KBV = torch.log_softmax(scaled_logits_KBV.float(), dim=-1)
    w_shape = (num_teachers,) + (1,) * (logp_KBV.dim() - 1)
    if rule == "mean_probs":
        # log sum_k w_k p_k, computed stably in log space; zero weights drop out.
        log_w = torch.log(w_K).reshape(w_shape)
        return torch.logsumexp(logp_KBV + log_w, dim=0)
    if rule == "mean_logprobs":
        mixed = (logp_KBV * w_K.reshape(w_shape)).sum(dim=0)
        return torch.log_softmax(mixed, dim=-1)
    raise ConfigError(f"unknown ensemble rule {rule!r}; expected one of {ENSEMBLE_RULES}")


# --------------------------------------------------------------------------------------
# Vocabularies
# --------------------------------------------------------------------------------------


def trim_vocab(logits_BV: torch.Tensor, vocab_size: int, *, name: str = "teacher") -> torch.Tensor:
    """Drop logit columns beyond the tokenizer's real vocabulary (padding for alignment).

    Many language models pad their output layer (e.g. to a multiple of 64); those columns
    are not tokens and must not take probability mass.

    Args:
        logits_BV: Logits, shape [..., V_padded] with V_padded >= vocab_size.
        vocab_size: Real vocabulary size (the tokenizer's), >= 1.
        name: Model name for the error message.

    Returns:
        A view ``logits[..., :vocab_size]`` (no copy, dtype kept).

    Raises:
        ConfigError: vocab_size < 1, or the logits have fewer columns than vocab_size.
    """
    if int(vocab_size) < 1:
        raise ConfigError(f"vocab_size must be >= 1, got {vocab_size}")
    width = logits_BV.shape[-1]
    if width < vocab_size:
        raise ConfigError(
            f"{name} produces {width} logits per position but its vocabulary has "
            f"{vocab_size} tokens; the model and tokenizer do not match"
        )
    return logits_BV[..., : int(vocab_size)]


def check_vocabularies(
    vocab_sizes: Mapping[str, int], *, fingerprints: Mapping[str, str] | None = None
) -> int:
    """Refuse models whose vocabularies differ; return the common vocabulary size.

    Distillation compares distributions id by id, so teachers (and the student) must share
    one vocabulary: the same size and, when fingerprints are given (a hash of the
    tokenizer's id-to-token table), the same tokens. Pass *real* sizes (after
    :func:`trim_vocab`), not padded logit widths.

    Args:
        vocab_sizes: Model name -> real vocabulary size.
        fingerprints: Optional model name -> tokenizer fingerprint.

    Returns:
        The shared vocabulary size.

    Raises:
        ConfigError: no models, sizes differ, or fingerprints differ.
    """
    if not vocab_sizes:
        raise ConfigError("check_vocabularies needs at least one model")
    sizes = {name: int(v) for name, v in vocab_sizes.items()}
    if len(set(sizes.values())) > 1:
        listing = ", ".join(f"{n}={v}" for n, v in sizes.items())
        raise ConfigError(
            f"vocabularies differ ({listing}); distillation needs one shared vocabulary. "
            "Trim padded logits with trim_vocab, or pick models with the same tokenizer"
        )
    if fingerprints:
        prints = dict(fingerprints)
        if len(set(prints.values())) > 1:
            listing = ", ".join(f"{n}={v}" for n, v in prints.items())
            raise ConfigError(
                f"vocabularies have the same size but different tokens ({listing}); "
                "ids would not mean the same token"
            )
    return next(iter(sizes.values()))
