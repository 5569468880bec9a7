"""Sparse soft targets: top-k, top-p and sampled sparsification, exact re-tempering and
ensembles of sparse teachers, with the full-vocabulary log-partition kept exact.

Shape legend: B rows (M rows to sparsify), S kept slots per row, V classes or vocabulary,
K teachers, G temperatures in a log-partition grid, N sorted candidates per row.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kdcache.errors import ConfigError
from kdcache.schema import (
    COUNT_KINDS,
    DEFAULT_SAMPLING,
    RETEMPER_KINDS,
    SPARSE_KINDS,
    TargetSpec,
)
from kdcache.targets.dense import (
    _NEG_INF,
    ENSEMBLE_RULES,
    EnsembleRule,
    _check_temperature,
    _label_fallback_check,
    _labels,
    _rule_weights,
    _weights,
    as_ensemble_rule,
    check_finite,
)

#: Id of an unused slot in ``SparseTargets.ids_BS`` (its value is -inf, its count 0).


PAD_ID = -1


# --------------------------------------------------------------------------------------
# Sparse targets
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SparseTargets:
    """Sparse soft targets for B rows: kept ids, their scaled logits, and the exact normaliser.

    Every field is a per-row array with the same leading dimension B, so a store writes
    one column per field (``ids``, ``values``, ``log_partition``, optionally ``counts``
    and ``log_partition_grid``) and reads rows back with :meth:`from_columns`. Unused
    slots (rows with fewer than S kept entries) have id :data:`PAD_ID`, value -inf in
    memory (0 in storage, see :meth:`to_columns`) and count 0. Ids are unique per row.

    The teacher's log-probability of a kept id ``i`` at the cache temperature tau is
    ``values[b, s] - log_partition[b]`` exactly, and the tail mass outside the kept ids
    is ``1 - sum_s exp(values[b, s] - log_partition[b])`` (:meth:`tail_log_mass`).

    Attributes:
        ids_BS: int64 token or class ids, shape [B, S], in ``[0, V)`` or :data:`PAD_ID`.
        values_BS: Scaled logits ``z / tau`` at ``ids_BS``, shape [B, S], float32, float16
            or bfloat16 (upcast for math). For ``kind="mixture"`` these are the combined
            log-probabilities and ``log_partition_B`` is 0.
        log_partition_B: float32 ``logsumexp_v(z_v / tau)`` over the full vocabulary, [B].
        kind: One of :data:`SPARSE_KINDS`: ``"topk"``, ``"topp"``, ``"sampled"``,
            ``"sampled_counts"`` or ``"mixture"``. For ``"sampled_counts"`` (draw counts
            only, :func:`counts_only`) the values are ``log(counts / num_samples)``, the
            log-partition is 0 and the tail is empty (-inf): the targets *are* the
            estimate p_hat.
        counts_BS: int64 draw counts, shape [B, S], only for the sampled kinds; the
            unbiased estimate of the teacher distribution is ``counts / counts.sum(-1)``.
        grid_temperatures: Temperatures tau_g at which ``log_partition_grid_BG`` holds the
            full-vocabulary log-partition of ``z / tau_g``; empty when no grid was kept.
        log_partition_grid_BG: float32 [B, G] or None.
        tail_log_mass_B: float32 [B], ``log sum_{v not kept} softmax(z / tau)_v`` computed
            from the full logits when the targets were made (-inf when nothing is left
            out). Optional, but stored by every builder: deriving the tail from
            ``log_partition_B`` (``1 - kept mass``) has only about 1e-6 *absolute* accuracy,
            so a tail of 1e-9 would read as 0 and a reverse KL against it as infinite.

    Raises:
        ConfigError: a field has the wrong dtype or shape, or ``kind`` is unknown.
    """

    ids_BS: torch.Tensor  # noqa: N815 (shape suffix, house style)
    values_BS: torch.Tensor  # noqa: N815 (shape suffix, house style)
    log_partition_B: torch.Tensor  # noqa: N815 (shape suffix, house style)
    kind: str
    counts_BS: torch.Tensor | None = None  # noqa: N815 (shape suffix, house style)
    grid_temperatures: tuple[float, ...] = field(default=())
    log_partition_grid_BG: torch.Tensor | None = None  # noqa: N815 (shape suffix, house style)
    tail_log_mass_B: torch.Tensor | None = None  # noqa: N815 (shape suffix, house style)

    def __post_init__(self) -> None:
        if self.kind not in SPARSE_KINDS:
            raise ConfigError(f"unknown sparse kind {self.kind!r}; expected one of {SPARSE_KINDS}")
        if self.ids_BS.dim() != 2 or self.ids_BS.dtype != torch.int64:
            raise ConfigError(
                f"ids_BS must be int64 of shape [B, S], got {self.ids_BS.dtype} "
                f"{tuple(self.ids_BS.shape)}"
            )
        if self.values_BS.shape != self.ids_BS.shape or not self.values_BS.is_floating_point():
            raise ConfigError(
                f"values_BS must be a float tensor shaped like ids_BS {tuple(self.ids_BS.shape)},"
                f" got {self.values_BS.dtype} {tuple(self.values_BS.shape)}"
            )
        if tuple(self.log_partition_B.shape) != (self.ids_BS.shape[0],):
            raise ConfigError(
                f"log_partition_B must have shape [{self.ids_BS.shape[0]}], "
                f"got {tuple(self.log_partition_B.shape)}"
            )
        if (self.kind in COUNT_KINDS) != (self.counts_BS is not None):
            raise ConfigError(f"counts_BS is required for kinds {COUNT_KINDS} and only for them")
        if self.counts_BS is not None and (
            self.counts_BS.shape != self.ids_BS.shape or self.counts_BS.dtype != torch.int64
        ):
            raise ConfigError("counts_BS must be int64 shaped like ids_BS")
        object.__setattr__(
            self, "grid_temperatures", tuple(float(t) for t in self.grid_temperatures)
        )
        num_grid = len(self.grid_temperatures)
        grid = self.log_partition_grid_BG
        if (num_grid > 0) != (grid is not None) or (
            grid is not None and tuple(grid.shape) != (self.ids_BS.shape[0], num_grid)
        ):
            raise ConfigError(
                f"log_partition_grid_BG must be [B, {num_grid}] when grid_temperatures are "
                "given, and None otherwise"
            )
        tail = self.tail_log_mass_B
        if tail is not None and tuple(tail.shape) != (self.ids_BS.shape[0],):
            raise ConfigError(f"tail_log_mass_B must have shape [{self.ids_BS.shape[0]}]")

    @property
    def num_rows(self) -> int:
        """B, the number of rows."""
        return int(self.ids_BS.shape[0])

    @property
    def num_slots(self) -> int:
        """S, the number of slots per row (kept entries plus padding)."""
        return int(self.ids_BS.shape[1])

    @property
    def valid_BS(self) -> torch.Tensor:
        """bool [B, S]: True where a slot holds a kept id (not :data:`PAD_ID`)."""
        return self.ids_BS >= 0

    def log_probs(self) -> torch.Tensor:
        """float32 [B, S]: exact teacher log-probabilities at the kept ids, -inf in pads.

        For ``kind="sampled"`` these are the exact probabilities of the drawn ids, not the
        count-based estimate (see :meth:`estimate_log_probs`).
        """
        lp = self.values_BS.float() - self.log_partition_B.float()[:, None]
        return lp.masked_fill(~self.valid_BS, _NEG_INF)

    def estimate_log_probs(self) -> torch.Tensor:
        """float32 [B, S]: log of the unbiased estimate ``counts / num_draws`` (sampled only).

        Raises:
            ConfigError: the targets are not ``kind="sampled"``.
        """
        if self.counts_BS is None:
            raise ConfigError(f"estimate_log_probs needs kind='sampled', got {self.kind!r}")
        counts = self.counts_BS.float()
        return torch.log(counts / counts.sum(dim=-1, keepdim=True).clamp(min=1.0))

    def tail_log_mass(self) -> torch.Tensor:
        """float32 [B]: log of the teacher's mass outside the kept ids (-inf if none).

        ``tail_log_mass_B`` when stored (exact to float32 relative precision); otherwise
        derived as ``log(-expm1(logsumexp(kept log-probs)))``, clamped at 0, whose absolute
        accuracy is that of the stored values (about 1e-6 in float32).
        """
        if self.tail_log_mass_B is not None:
            return self.tail_log_mass_B.float()
        log_kept_B = torch.logsumexp(self.log_probs(), dim=-1).clamp(max=0.0)
        return torch.log(-torch.expm1(log_kept_B))

    def rows(self, index: torch.Tensor | slice) -> SparseTargets:
        """The targets of a subset of rows (an index tensor, boolean mask or slice)."""
        return SparseTargets(
            ids_BS=self.ids_BS[index],
            values_BS=self.values_BS[index],
            log_partition_B=self.log_partition_B[index],
            kind=self.kind,
            counts_BS=None if self.counts_BS is None else self.counts_BS[index],
            grid_temperatures=self.grid_temperatures,
            log_partition_grid_BG=(
                None if self.log_partition_grid_BG is None else self.log_partition_grid_BG[index]
            ),
            tail_log_mass_B=None if self.tail_log_mass_B is None else self.tail_log_mass_B[index],
        )


def _check_2d(scaled_logits_BV: torch.Tensor) -> torch.Tensor:
    if scaled_logits_BV.dim() != 2:
        raise ConfigError(
            f"expected scaled logits of shape [B, V] (flatten tokens into B), got "
            f"{tuple(scaled_logits_BV.shape)}"
        )
    scaled = scaled_logits_BV.float()
    check_finite(scaled)
    return scaled


def _grid(
    scaled_BV: torch.Tensor, temperature: float | None, grid_temperatures: Sequence[float]
) -> tuple[tuple[float, ...], torch.Tensor | None]:
    if not grid_temperatures:
        return (), None
    if temperature is None:
        raise ConfigError("a log-partition grid needs the temperature the logits were scaled at")
    tau = _check_temperature(temperature)
    grid = tuple(_check_temperature(g) for g in grid_temperatures)
    cols = [torch.logsumexp(scaled_BV * (tau / g), dim=-1) for g in grid]
    return grid, torch.stack(cols, dim=-1)


def _append_labels(
    scaled_BV: torch.Tensor,
    ids_BS: torch.Tensor,
    values_BS: torch.Tensor,
    labels_B: torch.Tensor | None,
    ignore_index: int,
    counts_BS: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Add one slot holding each row's label when the kept set lacks it (else a pad)."""
    if labels_B is None:
        return ids_BS, values_BS, counts_BS
    num_rows, vocab = scaled_BV.shape
    labels = torch.as_tensor(labels_B, dtype=torch.int64).reshape(-1)
    if labels.shape[0] != num_rows:
        raise ConfigError(f"got {labels.shape[0]} labels for {num_rows} rows")
    has = labels != ignore_index
    if bool(((labels[has] < 0) | (labels[has] >= vocab)).any()):
        raise ConfigError(f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}")
    missing = has & ~(ids_BS == labels[:, None]).any(dim=-1)
    safe = labels.clamp(0, vocab - 1)
    extra_ids = torch.where(missing, labels, torch.full_like(labels, PAD_ID))
    extra_vals = torch.where(missing, scaled_BV.gather(1, safe[:, None])[:, 0], _NEG_INF)
    ids_BS = torch.cat([ids_BS, extra_ids[:, None]], dim=1)
    values_BS = torch.cat([values_BS, extra_vals[:, None]], dim=1)
    if counts_BS is not None:
        counts_BS = torch.cat([counts_BS, torch.zeros_like(counts_BS[:, :1])], dim=1)
    return ids_BS, values_BS, counts_BS


def _tail_log_mass(scaled_BV: torch.Tensor, ids_BS: torch.Tensor) -> torch.Tensor:
    """log of the softmax mass outside ``ids_BS``, from the full row, in log space."""
    hit = torch.zeros_like(scaled_BV).scatter_add_(1, ids_BS.clamp(min=0), (ids_BS >= 0).float())
    rest = scaled_BV.masked_fill(hit > 0, _NEG_INF)
    return torch.logsumexp(rest, dim=-1) - torch.logsumexp(scaled_BV, dim=-1)


def topk_targets(
    scaled_logits_BV: torch.Tensor,
    k: int,
    *,
    labels_B: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float | None = None,
    grid_temperatures: Sequence[float] = (),
) -> SparseTargets:
    """Keep the k largest scaled logits per row, with the exact full-vocabulary normaliser.

    Args:
        scaled_logits_BV: Scaled teacher logits ``z / tau``, shape [B, V], any float dtype.
        k: Entries to keep, 1 <= k <= V.
        labels_B: Optional int64 [B] true labels (next tokens); a label outside the top k
            is added in one extra slot (S = k + 1), so its probability is always kept.
            Rows whose label equals ``ignore_index`` get a pad there.
        ignore_index: Label value meaning "no label".
        temperature: tau the logits were scaled at; needed only with a grid.
        grid_temperatures: Temperatures tau_g at which to also store
            ``logsumexp(z / tau_g)`` over the full vocabulary, so a temperature sweep needs
            no second teacher pass (see :func:`retemper_sparse`).

    Returns:
        SparseTargets with ``kind="topk"``, S = k (or k + 1 with labels), ids sorted by
        decreasing value.

    Raises:
        ConfigError: k out of range, labels out of range, or a grid without temperature.
        TeacherOutputError: a scaled logit is NaN or infinite.

    Example:
        >>> t = topk_targets(torch.tensor([[1.0, 3.0, 2.0]]), 2)
        >>> t.ids_BS.tolist(), round(float(t.tail_log_mass().exp()), 4)
        ([[1, 2]], 0.09)
    """
    scaled = _check_2d(scaled_logits_BV)
    vocab = scaled.shape[1]
    if not 1 <= int(k) <= vocab:
        raise ConfigError(f"k must be in [1, V={vocab}], got {k}")
    values, ids = scaled.topk(int(k), dim=-1, sorted=True)
    log_z = torch.logsumexp(scaled, dim=-1)
    grid, grid_BG = _grid(scaled, temperature, grid_temperatures)
    ids, values, _ = _append_labels(scaled, ids, values, labels_B, ignore_index)
    tail = _tail_log_mass(scaled, ids)
    return SparseTargets(ids, values, log_z, "topk", None, grid, grid_BG, tail)


def topp_targets(
    scaled_logits_BV: torch.Tensor,
    top_p: float,
    *,
    min_k: int = 1,
    max_k: int = 64,
    labels_B: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float | None = None,
    grid_temperatures: Sequence[float] = (),
) -> SparseTargets:
    """Keep each row's nucleus: the fewest most-probable ids whose mass reaches top_p.

    An id is kept when the probability mass of the ids ranked above it is < top_p (so the
    id that crosses top_p is included: the true nucleus of Holtzman et al. 2020, sec. 3.1),
    then at least ``min_k`` and at most ``max_k`` ids are kept. Probabilities are those of
    the given scaled logits, i.e. at the cache temperature.

    Args:
        scaled_logits_BV: Scaled teacher logits ``z / tau``, shape [B, V].
        top_p: Target mass in (0, 1].
        min_k: Fewest ids kept per row, >= 1.
        max_k: Most ids kept per row (the fixed slot count), min_k <= max_k <= V.
        labels_B, ignore_index, temperature, grid_temperatures: As in :func:`topk_targets`.

    Returns:
        SparseTargets with ``kind="topp"`` and S = max_k (+ 1 with labels); rows with a
        smaller nucleus are padded with :data:`PAD_ID`.

    Raises:
        ConfigError: top_p, min_k or max_k out of range; labels out of range.
        TeacherOutputError: a scaled logit is NaN or infinite.
    """
    scaled = _check_2d(scaled_logits_BV)
    vocab = scaled.shape[1]
    if not 0.0 < float(top_p) <= 1.0:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}")
    if not 1 <= int(min_k) <= int(max_k) <= vocab:
        raise ConfigError(f"need 1 <= min_k <= max_k <= V={vocab}, got {min_k}, {max_k}")
    values, ids = scaled.topk(int(max_k), dim=-1, sorted=True)
    log_z = torch.logsumexp(scaled, dim=-1)
    probs = (values - log_z[:, None]).exp()
    mass_before = torch.cumsum(probs, dim=-1) - probs
    rank = torch.arange(int(max_k))[None, :]
    keep = (mass_before < float(top_p)) | (rank < int(min_k))
    ids = torch.where(keep, ids, torch.full_like(ids, PAD_ID))
    values = values.masked_fill(~keep, _NEG_INF)
    grid, grid_BG = _grid(scaled, temperature, grid_temperatures)
    ids, values, _ = _append_labels(scaled, ids, values, labels_B, ignore_index)
    tail = _tail_log_mass(scaled, ids)
    return SparseTargets(ids, values, log_z, "topp", None, grid, grid_BG, tail)


def _dedup_sorted(sorted_BN: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Group equal neighbours of row-sorted ids; returns (group index [B, N], is_new)."""
    is_new = torch.ones_like(sorted_BN, dtype=torch.bool)
    is_new[:, 1:] = sorted_BN[:, 1:] != sorted_BN[:, :-1]
    return torch.cumsum(is_new.long(), dim=1) - 1, is_new


#: How ``sampled`` / ``sampled_counts`` targets draw their ids (``params.sampling``).
SAMPLING_SCHEMES = ("multinomial", "systematic")


def _systematic_draws(
    probs_BV: torch.Tensor, num_samples: int, generator: torch.Generator | None
) -> torch.Tensor:
    """int64 [B, n], sorted: systematic sampling, one uniform offset per row.

    Draw i of a row is the id whose cumulative probability interval holds
    ``(i + U) / n``, ``U ~ U(0, 1)``: each draw is marginally a draw from p, so
    ``E[counts_v / n] = p_v`` exactly, and the counts are ``floor(n p_v)`` or
    ``ceil(n p_v)`` (for ids whose mass is within one stratum), far less variance than
    independent draws. Source: Kitagawa, "Monte Carlo filter and smoother for non-Gaussian
    nonlinear state space models", JCGS 1996 (systematic resampling); Douc, Cappe and
    Moulines, "Comparison of resampling schemes for particle filtering", ISPA 2005.
    """
    num_rows, vocab = probs_BV.shape
    cdf = torch.cumsum(probs_BV.double(), dim=-1)
    cdf = cdf / cdf[:, -1:]  # the last interval ends at 1 exactly
    offset = torch.rand((num_rows, 1), generator=generator, dtype=torch.float64)
    u = (torch.arange(num_samples, dtype=torch.float64)[None, :] + offset) / num_samples
    return torch.searchsorted(cdf, u, right=True).clamp_(max=vocab - 1)


def sampled_targets(
    scaled_logits_BV: torch.Tensor,
    num_samples: int,
    *,
    labels_B: torch.Tensor | None = None,
    ignore_index: int = -100,
    generator: torch.Generator | None = None,
    temperature: float | None = None,
    grid_temperatures: Sequence[float] = (),
    sampling: str = "multinomial",
) -> SparseTargets:
    """Draw ``num_samples`` ids per row from the teacher distribution and keep their counts.

    With proposal equal to the teacher's distribution p at the cache temperature, the
    estimate ``p_hat_i = counts_i / num_samples`` is unbiased (``E[p_hat] = p``), so the
    gradient of the forward-KL / cross-entropy loss against ``p_hat`` is an unbiased
    estimate of the full-distribution gradient, where top-k is biased. The exact scaled
    logits of the drawn ids and the full log-partition are stored too.

    Args:
        scaled_logits_BV: Scaled teacher logits ``z / tau``, shape [B, V].
        num_samples: Draws per row (with replacement), >= 1.
        labels_B: Optional int64 [B] labels; a label never drawn is added in an extra slot
            with count 0 (its exact probability is kept; the estimate is unchanged).
        ignore_index: Label value meaning "no label".
        generator: torch.Generator for reproducible draws.
        temperature, grid_temperatures: As in :func:`topk_targets`.

    Returns:
        SparseTargets with ``kind="sampled"``, S = num_samples (+ 1 with labels); the
        distinct ids drawn in a row come first, sorted by id, then pads.

    Raises:
        ConfigError: num_samples < 1; labels out of range.
        TeacherOutputError: a scaled logit is NaN or infinite.

    Source: Anshumann et al., "Sparse Logit Sampling: Accelerating Knowledge Distillation
    in LLMs", ACL 2025 (random-sampling KD with proposal = teacher).
    """
    scaled = _check_2d(scaled_logits_BV)
    if int(num_samples) < 1:
        raise ConfigError(f"num_samples must be >= 1, got {num_samples}")
    num_rows = scaled.shape[0]
    probs = torch.softmax(scaled, dim=-1)
    if sampling == "systematic":
        sorted_draws = _systematic_draws(probs, int(num_samples), generator)
    elif sampling == "multinomial":
        draws = torch.multinomial(probs, int(num_samples), replacement=True, generator=generator)
        sorted_draws = draws.sort(dim=-1).values
    else:
        raise ConfigError(f"sampling must be one of {SAMPLING_SCHEMES}, got {sampling!r}")
    group, _ = _dedup_sorted(sorted_draws)
    ids = torch.full((num_rows, int(num_samples)), PAD_ID, dtype=torch.int64)
    ids.scatter_(1, group, sorted_draws)  # equal ids write equal values: deterministic
    counts = torch.zeros_like(ids).scatter_add_(1, group, torch.ones_like(group))
    valid = ids >= 0
    values = scaled.gather(1, ids.clamp(min=0)).masked_fill(~valid, _NEG_INF)
    log_z = torch.logsumexp(scaled, dim=-1)
    grid, grid_BG = _grid(scaled, temperature, grid_temperatures)
    ids, values, counts2 = _append_labels(scaled, ids, values, labels_B, ignore_index, counts)
    tail = _tail_log_mass(scaled, ids)
    return SparseTargets(ids, values, log_z, "sampled", counts2, grid, grid_BG, tail)


def count_log_probs(counts_BS: torch.Tensor) -> torch.Tensor:
    """float32 [B, S]: ``log(counts / counts.sum(-1))``, -inf where a count is 0; the one
    definition of ``log p_hat`` for counts-only targets (built or read back)."""
    total = counts_BS.sum(dim=-1, keepdim=True).clamp(min=1)
    values = torch.log(counts_BS.float() / total.float())
    return values.masked_fill(counts_BS <= 0, _NEG_INF)


def counts_only(targets: SparseTargets) -> SparseTargets:
    """Sampled targets reduced to their draw counts: the Sparse Logit Sampling estimate.

    ``p_hat_i = counts_i / num_samples`` is all that is kept: values become
    ``log p_hat`` (pads -inf), the log-partition 0 and the tail empty (-inf), so
    :meth:`SparseTargets.log_probs` is ``log p_hat``. Forward KL against p_hat (cross-
    entropy up to a constant) has the same expectation as against the teacher's p, since
    it is linear in the target: the gradient is unbiased. Nothing else is: reverse KL,
    JSD and skew divergences are not linear in p (and reverse KL is infinite where
    p_hat is 0), and draws made at one temperature are no sample at another, so the
    losses refuse those (:func:`kdcache.losses.divergence`).

    Args:
        targets: ``kind="sampled"`` targets (label slots with count 0 are dropped).

    Returns:
        SparseTargets with ``kind="sampled_counts"``, the same ids and counts.

    Raises:
        ConfigError: the targets are not ``kind="sampled"``.

    Source: Anshumann et al., "Sparse Logit Sampling: Accelerating Knowledge Distillation
    in LLMs", ACL 2025 (random-sampling KD storing counts only).
    """
    if targets.kind != "sampled" or targets.counts_BS is None:
        raise ConfigError(f"counts_only needs kind='sampled' targets, got {targets.kind!r}")
    counts = targets.counts_BS
    ids = targets.ids_BS.masked_fill(counts <= 0, PAD_ID)
    counts = counts.clamp(min=0)
    values = count_log_probs(counts)
    num_rows = targets.num_rows
    return SparseTargets(
        ids_BS=ids,
        values_BS=values,
        log_partition_B=torch.zeros(num_rows),
        kind="sampled_counts",
        counts_BS=counts.masked_fill(ids < 0, 0),
        tail_log_mass_B=torch.full((num_rows,), _NEG_INF),
    )


def retemper_sparse(
    targets: SparseTargets, from_temperature: float, to_temperature: float
) -> SparseTargets:
    """Re-temper top-k / top-p targets exactly using their stored log-partition grid.

    The kept values become ``values * tau / tau'`` and the log-partition is the grid's
    entry at tau', so kept log-probabilities and the tail mass stay exact. The kept *set*
    is the one chosen at tau (a top-k set at tau is still the top-k set at tau', since
    scaling by a positive constant keeps the order; a nucleus at tau is just a kept set).

    Args:
        targets: Sparse targets stored at ``from_temperature``, kind ``"topk"`` or ``"topp"``.
        from_temperature: tau the values were stored at.
        to_temperature: tau' wanted; must be ``from_temperature`` or in the grid
            (relative tolerance 1e-6).

    Returns:
        New SparseTargets (float32 values) at tau', keeping the same grid. Its tail mass is
        derived from the grid's log-partition (about 1e-6 absolute accuracy).

    Raises:
        ConfigError: tau' not in the grid, or kind ``"sampled"``/``"mixture"`` (draws made
            at tau are not an unbiased sample at tau'; a mixture has no single normaliser).
    """
    f = _check_temperature(from_temperature)
    t = _check_temperature(to_temperature)
    if math.isclose(f, t, rel_tol=1e-6):
        return targets
    if targets.kind not in RETEMPER_KINDS:
        raise ConfigError(
            f"cannot re-temper {targets.kind!r} targets; rebuild them at temperature {t}"
        )
    match = [
        g for g, tg in enumerate(targets.grid_temperatures) if math.isclose(tg, t, rel_tol=1e-6)
    ]
    if not match or targets.log_partition_grid_BG is None:
        raise ConfigError(
            f"temperature {t} is not in the stored log-partition grid "
            f"{targets.grid_temperatures}; rebuild with grid_temperatures including it"
        )
    values = targets.values_BS.float() * (f / t)
    return SparseTargets(
        ids_BS=targets.ids_BS,
        values_BS=values.masked_fill(~targets.valid_BS, _NEG_INF),
        log_partition_B=targets.log_partition_grid_BG[:, match[0]].float(),
        kind=targets.kind,
        grid_temperatures=targets.grid_temperatures,
        log_partition_grid_BG=targets.log_partition_grid_BG,
    )


#: Sparse kinds whose kept ids include each row's most probable ones (or hold the whole
#: target, ``sampled_counts``), so a row's max probability and an entropy bound are known.
_STAT_KINDS = ("topk", "topp", "sampled_counts")


def sparse_entropy_bound(targets: SparseTargets) -> torch.Tensor:
    """A lower bound, in nats, on each row's entropy, exact when the tail is empty.

    ``H = -sum_kept p log p - sum_tail p log p``. The kept part is exact. Every id outside
    a top-k or top-p set has a probability ``p_i <= c = min(m, max_kept p)``, with ``m``
    the (exact) tail mass, so ``-sum_tail p_i log p_i >= -m log c``: the bound is
    ``H_kept - m log c`` (``c = m`` for a row without kept ids). It is exact when ``m = 0``
    (k = V, or ``sampled_counts``, whose target ``p_hat`` has no tail) and when the tail
    is one id of mass ``c``; otherwise it is below the true entropy by at most
    ``m log((V - n) c / m)`` (n kept ids; the uniform tail has the most entropy). The
    true entropy is not known from what a sparse entry stores; the bound needs no
    vocabulary size, and a teacher with a large tail therefore reads as more confident
    than it is by at most that gap.

    Args:
        targets: SparseTargets of kind ``"topk"``, ``"topp"`` or ``"sampled_counts"``.

    Returns:
        float32 [B], >= 0.

    Raises:
        ConfigError: another kind (``sampled``: the drawn ids may miss the most probable
            one; ``mixture``: its kept values are themselves bounds).
    """
    _check_stat_kind(targets, "an entropy bound")
    lp = targets.log_probs()
    p = lp.exp()
    h_kept = -(p * lp.masked_fill(p == 0, 0.0)).sum(dim=-1)
    log_m = targets.tail_log_mass().float()
    m = log_m.exp()
    log_max = lp.max(dim=-1).values if targets.num_slots else torch.full_like(log_m, _NEG_INF)
    log_c = torch.minimum(log_m, torch.where(torch.isfinite(log_max), log_max, log_m))
    tail = torch.where(m > 0, -m * log_c, torch.zeros_like(m))
    return (h_kept + tail).clamp(min=0.0)


def _check_stat_kind(targets: SparseTargets, what: str) -> None:
    if targets.kind not in _STAT_KINDS:
        why = (
            "its drawn ids may miss the most probable one; mix sampled teachers' losses "
            "with kdcache.losses.multi_teacher_loss(mode='sum_of_losses') instead"
            if targets.kind == "sampled"
            else "its kept values are bounds of the mixture; combine the member entries "
            "with the rule instead"
        )
        raise ConfigError(
            f"{what} needs sparse targets of kind {_STAT_KINDS}, got {targets.kind!r}: {why}"
        )


def _sparse_label_ce(
    targets_K: Sequence[SparseTargets], labels: torch.Tensor, has: torch.Tensor
) -> torch.Tensor:
    """float32 [K, B]: ``-log p_k(y_b)`` from the kept ids; +inf where a teacher's tail is
    empty and it did not keep the label (p = 0 exactly); refused where it is unknown."""
    out = []
    for k, t in enumerate(targets_K):
        _check_stat_kind(t, "rule 'best_on_label'")
        hit = (t.ids_BS == labels[:, None]) & t.valid_BS
        kept = hit.any(dim=-1)
        lp = t.log_probs().masked_fill(~hit, _NEG_INF).max(dim=-1).values
        empty_tail = ~torch.isfinite(t.tail_log_mass())
        unknown = has & ~kept & ~empty_tail
        if bool(unknown.any()):
            row = int(unknown.nonzero()[0])
            raise ConfigError(
                f"rule 'best_on_label': teacher {k} did not keep the label "
                f"{int(labels[row])} of row {row} ({int(unknown.sum())} such rows), so its "
                "probability there is unknown (somewhere in its tail); build the entries "
                "with params labels: true (the label is then always kept)"
            )
        out.append(torch.where(kept, -lp, torch.full_like(lp, float("inf"))))
    return torch.stack(out)


def sparse_ensemble_weights(
    targets_K: Sequence[SparseTargets],
    *,
    rule: str | EnsembleRule = "mean_probs",
    weights: Sequence[float] | None = None,
    labels_B: Any = None,
    route_keys_B: Any = None,
    routes: Mapping[Any, Any] | None = None,
    fallback: str | None = None,
    entropy_temperature: float | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Each row's teacher weights under ``rule``, for sparse targets.

    As :func:`kdcache.targets.ensemble_weights`, with the per-teacher statistics taken
    from the kept ids: the max probability exactly (the kept set holds the most probable
    ids), the entropy as the lower bound of :func:`sparse_entropy_bound`, and the label's
    cross-entropy exactly (the label must be kept, or the tail empty).

    Args:
        targets_K: K SparseTargets with B rows each.
        rule, weights, labels_B, route_keys_B, routes, fallback, entropy_temperature,
            ignore_index: As :func:`combine_sparse_ensemble`.

    Returns:
        float32 [K, B], summing to 1 over K on every row.

    Raises:
        ConfigError: as :func:`combine_sparse_ensemble`.
    """
    spec = as_ensemble_rule(
        rule,
        weights=weights,
        routes=routes,
        fallback=fallback,
        entropy_temperature=entropy_temperature,
    )
    _check_sparse_members(targets_K, spec)
    return _sparse_rule_weights(spec, targets_K, labels_B, route_keys_B, ignore_index)


def _check_sparse_members(targets_K: Sequence[SparseTargets], spec: EnsembleRule) -> None:
    if not targets_K:
        raise ConfigError("combine_sparse_ensemble needs at least one teacher")
    num_rows = targets_K[0].num_rows
    if any(t.num_rows != num_rows for t in targets_K):
        raise ConfigError(f"teachers disagree on rows: {[t.num_rows for t in targets_K]}")
    spec.check_num_teachers(len(targets_K))


def _sparse_rule_weights(
    spec: EnsembleRule,
    targets_K: Sequence[SparseTargets],
    labels_B: Any,
    route_keys_B: Any,
    ignore_index: int,
) -> torch.Tensor:
    num_teachers, rows = len(targets_K), (targets_K[0].num_rows,)
    if spec.rule in ENSEMBLE_RULES:
        return _weights(num_teachers, spec.weights)[:, None].expand(num_teachers, rows[0])
    stats: dict[str, Any] = {}
    if spec.rule == "confidence_max":
        for t in targets_K:
            _check_stat_kind(t, "rule 'confidence_max'")
        stats["max_log_prob_KB"] = torch.stack(
            [
                t.log_probs().max(dim=-1).values
                if t.num_slots
                else torch.full((t.num_rows,), _NEG_INF)
                for t in targets_K
            ]
        )
    elif spec.rule == "confidence_entropy":
        stats["entropy_KB"] = torch.stack([sparse_entropy_bound(t) for t in targets_K])
    elif spec.rule == "best_on_label":
        lab, has = _labels(labels_B, rows, ignore_index)
        _label_fallback_check(spec, has)
        if spec.fallback == "mean_logprobs":
            raise ConfigError(
                "rule 'best_on_label' with fallback 'mean_logprobs' needs every teacher's "
                "full distribution on unlabelled rows; for sparse teachers use "
                "fallback='mean_probs' or 'error'"
            )
        stats["label_ce_KB"] = _sparse_label_ce(targets_K, lab, has)
        stats["has_label_B"] = has
    else:
        stats["route_keys_B"] = route_keys_B
    return _rule_weights(spec, num_teachers, rows, **stats)


def combine_sparse_ensemble(
    targets_K: Sequence[SparseTargets],
    *,
    rule: str | EnsembleRule = "mean_probs",
    weights: Sequence[float] | None = None,
    labels_B: Any = None,
    route_keys_B: Any = None,
    routes: Mapping[Any, Any] | None = None,
    fallback: str | None = None,
    entropy_temperature: float | None = None,
    ignore_index: int = -100,
) -> SparseTargets:
    """Combine K sparse teachers (same rows, same temperature) into one mixture target.

    How differing supports combine (``rule="mean_probs"``): the result keeps the *union*
    of the teachers' ids. At a kept id ``i`` its probability is
    ``sum over teachers k that kept i of w_k p_k(i)``; a teacher that did not keep ``i``
    has ``p_k(i)`` inside its own tail, so that share stays in the combined tail, whose
    mass is exactly ``sum_k w_k tail_k``. Each kept probability is therefore exact where
    every teacher kept the id and a lower bound otherwise, and the total mass is exactly 1.
    With identical supports (for instance k = V) the mixture is exact.

    The per-sample rules (see :func:`kdcache.targets.combine_ensemble` for their formulas
    and sources) mix the same way with per-row weights ``w_k(b)``:

    * ``"route"`` and ``"best_on_label"`` pick one teacher per row (weight 1): the row is
      that teacher's target, exact. ``best_on_label`` needs the label's probability: a
      teacher that did not keep the label (and has a tail) is refused, naming the row:
      build with ``params.labels: true``. Its ``fallback`` may not be ``mean_logprobs``.
    * ``"confidence_max"`` is exact (top-k and top-p sets hold each row's most probable
      id; a ``sampled_counts`` target is ``p_hat`` itself).
    * ``"confidence_entropy"`` uses a *lower bound* of each teacher's entropy
      (:func:`sparse_entropy_bound`), exact when the tails are empty (k = V): the true
      entropy is not known from the kept ids and the tail mass.

    The confidence rules and ``best_on_label`` refuse ``sampled`` and ``mixture`` inputs
    (their kept values do not give the statistic); ``route`` takes every kind the mixture
    takes. ``"mean_logprobs"`` is refused: a geometric mean needs every teacher's
    probability at every id, and its renormaliser runs over the full vocabulary. Sampled
    targets are refused too: mix their *losses* instead
    (:func:`kdcache.losses.multi_teacher_loss` with ``mode="sum_of_losses"``; forward KL
    is linear in the target, so that stays an unbiased estimate).

    Args:
        targets_K: K SparseTargets of kind ``"topk"``, ``"topp"``, ``"sampled_counts"`` or
            ``"mixture"``, each with B rows, all at the same temperature.
        rule: A name in :data:`kdcache.targets.ALL_ENSEMBLE_RULES` other than
            ``"mean_logprobs"``, or an :class:`kdcache.targets.EnsembleRule`.
        weights: K non-negative weights, normalised to sum 1; uniform when None.
        labels_B: ``best_on_label`` only: int [B], ``ignore_index`` where a row has none.
        route_keys_B: ``route`` only: each row's key, ints or strings, [B].
        routes, fallback, entropy_temperature, ignore_index: As
            :func:`kdcache.targets.combine_ensemble`.

    Returns:
        SparseTargets with ``kind="mixture"``: ``values_BS`` are the combined
        log-probabilities, ``log_partition_B`` is 0, S = the largest union size.

    Raises:
        ConfigError: no teachers, different row counts, a sampled teacher, a
            ``"mean_logprobs"`` rule, bad weights, or what the per-sample rules refuse
            (see above and :func:`kdcache.targets.combine_ensemble`).
    """
    spec = as_ensemble_rule(
        rule,
        weights=weights,
        routes=routes,
        fallback=fallback,
        entropy_temperature=entropy_temperature,
    )
    if not targets_K:
        raise ConfigError("combine_sparse_ensemble needs at least one teacher")
    if spec.rule == "mean_logprobs":
        raise ConfigError(
            "rule 'mean_logprobs' needs every teacher's full distribution; for sparse "
            "teachers use 'mean_probs', or keep teachers apart with "
            "kdcache.losses.multi_teacher_loss(mode='sum_of_losses')"
        )
    # Sampled kinds stay apart: a mixture of sampled_counts estimates would lose the
    # refusal of divergences that are not linear in p (it reads as an exact mixture).
    if any(t.kind in COUNT_KINDS for t in targets_K):
        raise ConfigError(
            "sampled targets do not combine into one sparse target; use "
            "kdcache.losses.multi_teacher_loss(mode='sum_of_losses') to mix their losses "
            "(forward KL is linear in the target, so the gradient is the same)"
        )
    _check_sparse_members(targets_K, spec)
    if spec.rule in ENSEMBLE_RULES:
        # python-float logs, as always: static views keep their bytes
        w_K = _weights(len(targets_K), spec.weights)
        log_w = [torch.tensor(math.log(float(w)) if float(w) > 0 else _NEG_INF) for w in w_K]
        return _mix_sparse(targets_K, log_w)
    w_KB = _sparse_rule_weights(spec, targets_K, labels_B, route_keys_B, ignore_index)
    return _mix_sparse(targets_K, list(torch.log(w_KB)[:, :, None]))


def _mix_sparse(targets_K: Sequence[SparseTargets], log_w_K: list[torch.Tensor]) -> SparseTargets:
    """The union mixture ``sum_k w_k p_k`` of K sparse teachers; ``log_w_K[k]`` is a
    scalar or [B, 1] log-weight (-inf: the teacher contributes nothing there)."""
    num_rows = targets_K[0].num_rows
    ids = torch.cat([t.ids_BS for t in targets_K], dim=1)
    logp = torch.cat([t.log_probs() + lw for t, lw in zip(targets_K, log_w_K, strict=True)], dim=1)
    # A teacher with weight 0 contributes nothing: treat its slots as pads.
    ids = torch.where(logp > _NEG_INF, ids, torch.full_like(ids, PAD_ID))
    order = ids.argsort(dim=1, stable=True)
    ids_sorted = ids.gather(1, order)
    logp_sorted = logp.gather(1, order)
    group, _ = _dedup_sorted(ids_sorted)
    width = int(group.max()) + 1 if group.numel() else 1
    out_ids = torch.full((num_rows, width), PAD_ID, dtype=torch.int64)
    out_ids.scatter_(1, group, ids_sorted)
    # Stable log-sum-exp of the duplicates of each id: max first, then sum of exps.
    gmax = torch.full((num_rows, width), _NEG_INF).scatter_reduce(
        1, group, logp_sorted, reduce="amax", include_self=True
    )
    safe_max = torch.where(torch.isfinite(gmax), gmax, torch.zeros_like(gmax))
    sums = torch.zeros((num_rows, width)).scatter_add_(
        1, group, (logp_sorted - safe_max.gather(1, group)).exp()
    )
    out_vals = (torch.log(sums) + safe_max).masked_fill(out_ids < 0, _NEG_INF)
    # Pads sort first; move them to the end so rows read "kept ids, then pads".
    back = (out_ids < 0).to(torch.int8).argsort(dim=1, stable=True)
    out_ids = out_ids.gather(1, back)
    out_vals = out_vals.gather(1, back)
    num_kept = int((out_ids >= 0).sum(dim=1).max()) if num_rows else 0
    keep = max(num_kept, 1)
    # The combined tail is exactly sum_k w_k tail_k (see above), summed in log space.
    tails = [t.tail_log_mass() + lw.reshape(-1) for t, lw in zip(targets_K, log_w_K, strict=True)]
    return SparseTargets(
        ids_BS=out_ids[:, :keep].contiguous(),
        values_BS=out_vals[:, :keep].contiguous(),
        log_partition_B=torch.zeros(num_rows),
        kind="mixture",
        tail_log_mass_B=torch.logsumexp(torch.stack(tails), dim=0),
    )


#: Most logits (B x T x V floats) one teacher forward pass may return on the token path:
#: 2^26 float32 = 256 MiB; a batch of long sequences is split to stay under it.


MAX_LOGITS_PER_PASS = 1 << 26


def _sample_seed(seed: int, sample_id: int) -> int:
    """A 63-bit generator seed from (spec seed, sample_id): draws do not depend on the
    batch size, the shard layout or the actor that runs the sample."""
    digest = hashlib.sha256(f"{int(seed)}:{int(sample_id)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def sparsify(
    scaled_MV: torch.Tensor,
    spec: TargetSpec,
    *,
    labels_M: torch.Tensor | None = None,
    row_sample_ids_M: np.ndarray | None = None,
) -> SparseTargets | np.ndarray:
    """The targets of ``spec`` for M rows of scaled logits (one row per token or sample).

    Args:
        scaled_MV: float32 ``z / tau``, shape [M, V].
        spec: The entry's :class:`TargetSpec` (kind and params).
        labels_M: int64 [M] true next tokens / labels; kept in an extra slot when the spec
            has ``labels: true``.
        row_sample_ids_M: int64 [M] sample of each row; ``sampled`` draws use a generator
            seeded by (``seed`` param, sample_id), so bytes do not depend on batching.

    Returns:
        float32 numpy [M, V] for ``dense``; else :class:`kdcache.SparseTargets`.

    Raises:
        ConfigError: ``mixture`` (made by combining entries, never by a teacher).
    """
    if spec.kind == "dense":
        return scaled_MV.numpy()
    labels = labels_M if spec.param("labels", False) else None
    grid: dict[str, Any] = {
        "temperature": spec.temperature,
        "grid_temperatures": spec.grid_temperatures,
    }
    if spec.kind == "topk":
        return topk_targets(scaled_MV, int(spec.param("k")), labels_B=labels, **grid)
    if spec.kind == "topp":
        return topp_targets(
            scaled_MV,
            float(spec.param("top_p")),
            min_k=int(spec.param("min_k", 1)),
            max_k=int(spec.param("max_k")),
            labels_B=labels,
            **grid,
        )
    if spec.kind == "sampled_counts":
        # the very draws of kind "sampled" with the same seed and sampling scheme (this
        # kind's default scheme: systematic), values dropped
        params = {"sampling": DEFAULT_SAMPLING["sampled_counts"], **dict(spec.params or ())}
        sampled = sparsify(
            scaled_MV,
            TargetSpec(spec.temperature, "sampled", params=params),
            row_sample_ids_M=row_sample_ids_M,
        )
        assert isinstance(sampled, SparseTargets)
        return counts_only(sampled)
    if spec.kind == "sampled":
        n = int(spec.param("num_samples"))
        seed = int(spec.param("seed", 0))
        sampling = str(spec.param("sampling", "multinomial"))
        if row_sample_ids_M is None:
            gen = torch.Generator().manual_seed(seed)
            return sampled_targets(
                scaled_MV, n, labels_B=labels, generator=gen, sampling=sampling, **grid
            )
        parts = []
        bounds = np.flatnonzero(np.diff(row_sample_ids_M)) + 1
        for lo, hi in zip(
            [0, *bounds.tolist()], [*bounds.tolist(), len(row_sample_ids_M)], strict=True
        ):
            gen = torch.Generator().manual_seed(_sample_seed(seed, int(row_sample_ids_M[lo])))
            parts.append(
                sampled_targets(
                    scaled_MV[lo:hi],
                    n,
                    labels_B=None if labels is None else labels[lo:hi],
                    generator=gen,
                    sampling=sampling,
                    **grid,
                )
            )
        return concat_sparse(parts)
    raise ConfigError(
        f"a teacher cannot produce {spec.kind!r} targets; combine entries with "
        "kdcache.targets.combine_sparse_ensemble instead"
    )


def concat_sparse(parts: Sequence[SparseTargets]) -> SparseTargets:
    """Stack SparseTargets row-wise (same kind; the slot count S is the largest, others
    padded with ``PAD_ID``).

    Raises:
        ConfigError: no parts, or parts of different kinds or grids.
    """
    if not parts:
        raise ConfigError("concat_sparse needs at least one part")
    first = parts[0]
    if any(p.kind != first.kind or p.grid_temperatures != first.grid_temperatures for p in parts):
        raise ConfigError("concat_sparse: parts differ in kind or grid temperatures")
    width = max(p.num_slots for p in parts)

    def widen(x: torch.Tensor, fill: float) -> torch.Tensor:
        if x.shape[1] == width:
            return x
        pad = torch.full((x.shape[0], width - x.shape[1]), fill, dtype=x.dtype)
        return torch.cat([x, pad], dim=1)

    def cat(name: str) -> torch.Tensor | None:
        got = [getattr(p, name) for p in parts]
        return None if got[0] is None else torch.cat(got)

    return SparseTargets(
        ids_BS=torch.cat([widen(p.ids_BS, PAD_ID) for p in parts]),
        values_BS=torch.cat([widen(p.values_BS, float("-inf")) for p in parts]),
        log_partition_B=torch.cat([p.log_partition_B for p in parts]),
        kind=first.kind,
        counts_BS=None
        if first.counts_BS is None
        else torch.cat([widen(p.counts_BS, 0) for p in parts if p.counts_BS is not None]),
        grid_temperatures=first.grid_temperatures,
        log_partition_grid_BG=cat("log_partition_grid_BG"),
        tail_log_mass_B=cat("tail_log_mass_B"),
    )
