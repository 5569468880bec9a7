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

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from kdcache.errors import ConfigError, TeacherOutputError

ENSEMBLE_RULES = ("mean_probs", "mean_logprobs")

#: Kinds of :class:`SparseTargets`. ``"mixture"`` is what a sparse ensemble produces.
SPARSE_KINDS = ("topk", "topp", "sampled", "mixture")

#: Id of an unused slot in ``SparseTargets.ids_BS`` (its value is -inf, its count 0).
PAD_ID = -1

#: Storage dtypes a cache may hold values in; math always runs in float32.
STORAGE_DTYPES = ("float32", "float16", "bfloat16")

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
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
        kind: One of :data:`SPARSE_KINDS`: ``"topk"``, ``"topp"``, ``"sampled"`` or
            ``"mixture"``.
        counts_BS: int64 draw counts, shape [B, S], only for ``kind="sampled"``; the
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
        if (self.kind == "sampled") != (self.counts_BS is not None):
            raise ConfigError("counts_BS is required for kind='sampled' and only for it")
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

    def to_columns(
        self, storage_dtype: str = "float32", *, on_overflow: str = "raise"
    ) -> dict[str, np.ndarray]:
        """Column arrays for a store: one numpy array per field, each with leading dim B.

        Pad values are written as 0 (the pad id marks them), so no inf is ever stored.
        ``values`` go through :func:`to_storage_dtype`; the log-partitions stay float32.

        Args:
            storage_dtype: One of :data:`STORAGE_DTYPES` for ``values``.
            on_overflow: ``"raise"`` or ``"widen"``, as in :func:`to_storage_dtype`.

        Returns:
            ``{"ids": int64 [B, S], "values": [B, S], "log_partition": float32 [B]}``, plus
            ``"counts"`` (int64 [B, S]), ``"log_partition_grid"`` (float32 [B, G]) and
            ``"tail_log_mass"`` (float32 [B]; -inf only where the ids cover the vocabulary)
            when present. bfloat16 values come back as a ``uint16`` view of their bits, since
            numpy has no bfloat16.

        Raises:
            ConfigError: unknown storage dtype, or overflow with ``on_overflow="raise"``.
        """
        values = self.values_BS.float().masked_fill(~self.valid_BS, 0.0)
        stored = to_storage_dtype(values, storage_dtype, on_overflow=on_overflow)
        values_np = (
            stored.view(torch.uint16).numpy() if stored.dtype == torch.bfloat16 else stored.numpy()
        )
        cols: dict[str, np.ndarray] = {
            "ids": self.ids_BS.numpy(),
            "values": values_np,
            "log_partition": self.log_partition_B.float().numpy(),
        }
        if self.counts_BS is not None:
            cols["counts"] = self.counts_BS.numpy()
        if self.log_partition_grid_BG is not None:
            cols["log_partition_grid"] = self.log_partition_grid_BG.float().numpy()
        if self.tail_log_mass_B is not None:
            # -inf here means "no tail" (ids cover V): a sentinel, not an overflow.
            cols["tail_log_mass"] = self.tail_log_mass_B.float().numpy()
        return cols

    @classmethod
    def from_columns(
        cls,
        columns: Mapping[str, np.ndarray],
        *,
        kind: str,
        grid_temperatures: Sequence[float] = (),
        bfloat16_values: bool = False,
    ) -> SparseTargets:
        """Rebuild targets from :meth:`to_columns` output (pads restored to -inf).

        Args:
            columns: Mapping with ``ids``, ``values``, ``log_partition`` and optionally
                ``counts``, ``log_partition_grid`` and ``tail_log_mass``, as written by
            :meth:`to_columns`.
            kind: The :data:`SPARSE_KINDS` entry the store recorded.
            grid_temperatures: The grid's temperatures, as recorded by the store.
            bfloat16_values: ``values`` is a uint16 view of bfloat16 bits.

        Returns:
            SparseTargets with float32-or-narrower values exactly as stored.
        """
        ids = torch.from_numpy(np.asarray(columns["ids"], dtype=np.int64))
        values = torch.from_numpy(np.array(columns["values"]))
        if bfloat16_values:
            values = values.view(torch.bfloat16)
        values = values.masked_fill(ids < 0, _NEG_INF)
        counts = columns.get("counts")
        grid = columns.get("log_partition_grid")
        tail = columns.get("tail_log_mass")
        return cls(
            ids_BS=ids,
            values_BS=values,
            log_partition_B=torch.from_numpy(np.asarray(columns["log_partition"], np.float32)),
            kind=kind,
            counts_BS=None if counts is None else torch.from_numpy(np.asarray(counts, np.int64)),
            grid_temperatures=tuple(grid_temperatures),
            log_partition_grid_BG=None if grid is None else torch.from_numpy(np.asarray(grid)),
            tail_log_mass_B=None
            if tail is None
            else torch.from_numpy(np.asarray(tail, np.float32)),
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


def sampled_targets(
    scaled_logits_BV: torch.Tensor,
    num_samples: int,
    *,
    labels_B: torch.Tensor | None = None,
    ignore_index: int = -100,
    generator: torch.Generator | None = None,
    temperature: float | None = None,
    grid_temperatures: Sequence[float] = (),
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
    draws = torch.multinomial(probs, int(num_samples), replacement=True, generator=generator)
    sorted_draws = draws.sort(dim=-1).values
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
    if targets.kind not in ("topk", "topp"):
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


def combine_sparse_ensemble(
    targets_K: Sequence[SparseTargets],
    *,
    rule: str = "mean_probs",
    weights: Sequence[float] | None = None,
) -> SparseTargets:
    """Combine K sparse teachers (same rows, same temperature) into one mixture target.

    How differing supports combine (``rule="mean_probs"``): the result keeps the *union*
    of the teachers' ids. At a kept id ``i`` its probability is
    ``sum over teachers k that kept i of w_k p_k(i)``; a teacher that did not keep ``i``
    has ``p_k(i)`` inside its own tail, so that share stays in the combined tail, whose
    mass is exactly ``sum_k w_k tail_k``. Each kept probability is therefore exact where
    every teacher kept the id and a lower bound otherwise, and the total mass is exactly 1.
    With identical supports (for instance k = V) the mixture is exact.

    ``"mean_logprobs"`` is refused: a geometric mean needs every teacher's probability at
    every id, and its renormaliser runs over the full vocabulary. Sampled targets are
    refused too: mix their *losses* instead (:func:`kdcache.losses.multi_teacher_loss`
    with ``mode="sum_of_losses"``; forward KL is linear in the target, so that stays an
    unbiased estimate).

    Args:
        targets_K: K SparseTargets of kind ``"topk"``, ``"topp"`` or ``"mixture"``, each with
            B rows, all at the same temperature.
        rule: Only ``"mean_probs"``.
        weights: K non-negative weights, normalised to sum 1; uniform when None.

    Returns:
        SparseTargets with ``kind="mixture"``: ``values_BS`` are the combined
        log-probabilities, ``log_partition_B`` is 0, S = the largest union size.

    Raises:
        ConfigError: no teachers, different row counts, a sampled teacher, a
            ``"mean_logprobs"`` rule, or bad weights.
    """
    if not targets_K:
        raise ConfigError("combine_sparse_ensemble needs at least one teacher")
    if rule == "mean_logprobs":
        raise ConfigError(
            "rule 'mean_logprobs' needs every teacher's full distribution; for sparse "
            "teachers use 'mean_probs', or keep teachers apart with "
            "kdcache.losses.multi_teacher_loss(mode='sum_of_losses')"
        )
    if rule not in ENSEMBLE_RULES:
        raise ConfigError(f"unknown ensemble rule {rule!r}; expected one of {ENSEMBLE_RULES}")
    if any(t.kind == "sampled" for t in targets_K):
        raise ConfigError(
            "sampled targets do not combine into one sparse target; use "
            "kdcache.losses.multi_teacher_loss(mode='sum_of_losses') to mix their losses"
        )
    num_rows = targets_K[0].num_rows
    if any(t.num_rows != num_rows for t in targets_K):
        raise ConfigError(f"teachers disagree on rows: {[t.num_rows for t in targets_K]}")
    w_K = _weights(len(targets_K), weights)
    ids = torch.cat([t.ids_BS for t in targets_K], dim=1)
    logp = torch.cat(
        [
            t.log_probs() + math.log(float(w))
            if float(w) > 0
            else torch.full_like(t.log_probs(), _NEG_INF)
            for t, w in zip(targets_K, w_K, strict=True)
        ],
        dim=1,
    )
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
    tails = [
        t.tail_log_mass() + math.log(float(w))
        for t, w in zip(targets_K, w_K, strict=True)
        if float(w) > 0
    ]
    return SparseTargets(
        ids_BS=out_ids[:, :keep].contiguous(),
        values_BS=out_vals[:, :keep].contiguous(),
        log_partition_B=torch.zeros(num_rows),
        kind="mixture",
        tail_log_mass_B=torch.logsumexp(torch.stack(tails), dim=0),
    )


# --------------------------------------------------------------------------------------
# Storage dtypes
# --------------------------------------------------------------------------------------


def storage_dtype_fits(values: torch.Tensor, storage_dtype: str) -> bool:
    """True when every (finite) value survives a cast to ``storage_dtype`` without becoming inf.

    Args:
        values: Any float tensor.
        storage_dtype: One of :data:`STORAGE_DTYPES`.

    Raises:
        ConfigError: unknown storage dtype.
    """
    dtype = _storage_torch_dtype(storage_dtype)
    cast = values.to(dtype)
    return not bool((torch.isinf(cast) & torch.isfinite(values)).any())


def _storage_torch_dtype(storage_dtype: str) -> torch.dtype:
    if storage_dtype not in _TORCH_DTYPES:
        raise ConfigError(f"storage dtype must be one of {STORAGE_DTYPES}, got {storage_dtype!r}")
    return _TORCH_DTYPES[storage_dtype]


def to_storage_dtype(
    values: torch.Tensor, storage_dtype: str, *, on_overflow: str = "raise"
) -> torch.Tensor:
    """Cast values for storage, refusing (or widening) anything that would become inf.

    float16 overflows above 65504; bfloat16 keeps float32's exponent range but rounds
    values within 2^-8 relative of float32's maximum up to inf; both are checked the same
    way: cast, then look for an inf that was finite before.

    Args:
        values: float tensor (any shape) of finite values, e.g. scaled logits.
        storage_dtype: One of :data:`STORAGE_DTYPES`.
        on_overflow: ``"raise"`` to refuse, or ``"widen"`` to return float32 instead
            (check ``result.dtype``; the caller records the dtype actually stored).

    Returns:
        The values in ``storage_dtype`` (or float32 when widened).

    Raises:
        ConfigError: unknown dtype or ``on_overflow``, or a value overflows with "raise".
        TeacherOutputError: a value is NaN or infinite before any cast.
    """
    if on_overflow not in ("raise", "widen"):
        raise ConfigError(f"on_overflow must be 'raise' or 'widen', got {on_overflow!r}")
    dtype = _storage_torch_dtype(storage_dtype)
    if values.numel():
        check_finite(values.reshape(values.shape[0] if values.dim() else 1, -1))
    if values.dtype == dtype:
        return values
    cast = values.to(dtype)
    if bool(torch.isinf(cast).any()):
        if on_overflow == "widen":
            return values.float()
        biggest = float(values.abs().max())
        raise ConfigError(
            f"a value of magnitude {biggest:.4g} does not fit {storage_dtype} (it would be "
            f"stored as inf); store float32, or pass on_overflow='widen'"
        )
    return cast


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
