"""The one codec between soft targets and shard columns, both ways, for every backend.

Dense scaled logits [N, V] become a row column; sparse targets (ids_BS, values_BS,
log-partition [B], ...) become ragged columns [E] with offsets [N + 1]; storage dtypes
(float16, bfloat16 bits) are cast here, refusing values they cannot hold.
Shape legend: N rows, V classes or vocabulary, B = N rows, S slots per row, E entries.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kdcache import schema
from kdcache.errors import (
    CacheCorruptError,
    ConfigError,
    SampleIdMismatchError,
    TeacherOutputError,
)
from kdcache.schema import TargetSpec
from kdcache.stores.backends import ShardColumns

# --------------------------------------------------------------------------------------
# Storage dtypes
# --------------------------------------------------------------------------------------


_FLOAT16_MAX = float(np.finfo(np.float16).max)


#: Largest finite bfloat16 (bits 0x7F7F); float32 values from 0x7F7F8000 up round to inf.


_BFLOAT16_MAX = float(np.array([0x7F7F0000], np.uint32).view(np.float32)[0])


def to_storage_dtype(values: np.ndarray, storage_dtype: str, where: str) -> np.ndarray:
    """Cast float values to the storage dtype, refusing values the dtype cannot hold.

    Args:
        values: float array of any shape, finite.
        storage_dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"``.
        where: Names the shard in messages.

    Returns:
        A contiguous array: float32, float16, or uint16 holding bfloat16 bit patterns
        (round to nearest even, as ``torch.Tensor.to(torch.bfloat16)``).

    Raises:
        TeacherOutputError: a value is NaN or infinite, or outside the storage dtype's
            finite range (it would become inf: 65504 for float16, about 3.39e38 for
            bfloat16), or too small or too finely spread for it: the spread (max - min)
            of a row (of the whole array when it is not [N, V]) would change by more than
            :data:`MAX_SPREAD_ERROR` of itself (a very large temperature in float16 flushes
            every value to 0: uniform targets). The message says what to change.
        ConfigError: unknown storage dtype.
    """
    arr = np.asarray(values)
    if arr.size and not bool(np.isfinite(arr).all()):
        raise TeacherOutputError(
            f"{where}: values hold NaN or inf; nothing was written for this shard"
        )
    if storage_dtype == "float32":
        return np.ascontiguousarray(arr, dtype=np.float32)
    stored: np.ndarray
    if storage_dtype == "float16":
        limit = _FLOAT16_MAX
        with np.errstate(over="ignore"):  # overflow is detected just below
            stored = np.ascontiguousarray(arr, dtype=np.float16)
        overflow = bool(np.isinf(stored).any())
    elif storage_dtype == "bfloat16":
        limit = _BFLOAT16_MAX
        stored = float32_to_bfloat16_bits(arr)
        overflow = bool(((stored.view(np.uint16) & 0x7FFF) == 0x7F80).any())
    else:
        raise ConfigError(
            f"unknown storage dtype {storage_dtype!r}; expected one of {schema.STORAGE_DTYPES}"
        )
    if overflow:
        peak = float(np.abs(arr).max())
        raise TeacherOutputError(
            f"{where}: a value of magnitude {peak:.4g} exceeds {storage_dtype}'s range "
            f"(largest finite {limit:.4g}) and would be stored as inf; use "
            "storage_dtype='float32' or a higher temperature"
        )
    back = (
        stored.astype(np.float32)
        if storage_dtype == "float16"
        else bfloat16_bits_to_float32(stored).reshape(stored.shape)
    )
    _check_spread(np.asarray(arr, dtype=np.float32), back, storage_dtype, where)
    return stored


#: Largest change of a row's spread (max - min of its scaled logits), relative to the
#: spread, that a narrow storage dtype may cause; beyond it the dtype cannot represent the
#: distribution (values flushed to zero, or too close together for its precision).
MAX_SPREAD_ERROR = 0.01


def _check_spread(exact: np.ndarray, stored: np.ndarray, storage_dtype: str, where: str) -> None:
    if not exact.size:
        return
    rows_exact = exact.reshape(len(exact), -1) if exact.ndim == 2 else exact.reshape(1, -1)
    rows_stored = stored.reshape(rows_exact.shape)
    spread = rows_exact.max(axis=1) - rows_exact.min(axis=1)
    error = np.abs((rows_stored.max(axis=1) - rows_stored.min(axis=1)) - spread)
    bad = np.flatnonzero(error > MAX_SPREAD_ERROR * spread)
    if len(bad):
        r = int(bad[0])
        kept = float(rows_stored[r].max() - rows_stored[r].min())
        peak = float(np.abs(rows_exact[r]).max())
        raise TeacherOutputError(
            f"{where}: {storage_dtype} cannot represent these values: the spread of row {r} "
            f"({float(spread[r]):.4g}) would be stored as {kept:.4g} (its values are at most "
            f"{peak:.3g} in magnitude: too small, e.g. after a very large temperature, or too "
            "close together for its precision); use storage_dtype='float32' or a lower "
            "temperature"
        )


def float32_to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> uint16 bfloat16 bit patterns, rounding to nearest even (finite input)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
    return np.ascontiguousarray((rounded >> np.uint32(16)).astype(np.uint16))


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns -> float32 (exact: bfloat16 is a float32 prefix)."""
    return (np.ascontiguousarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(
        np.float32
    )


# -- targets <-> columns ---------------------------------------------------------------------


def dense_to_columns(
    sample_ids_N: np.ndarray,
    scaled_logits_NV: Any,
    spec: TargetSpec,
    vocab_size: int | None,
    where: str,
) -> tuple[ShardColumns, dict[str, Any]]:
    """Dense rows as :class:`ShardColumns`: ``scaled_logits`` [N, V] in the storage dtype.

    Returns:
        ``(columns, sidecar extras)``; extras hold ``vocab_size``.

    Raises:
        ConfigError: sparse targets given to a dense entry.
        TeacherOutputError: shapes disagree, a value is not finite or does not fit the
            storage dtype.
    """
    if not hasattr(scaled_logits_NV, "shape") or hasattr(scaled_logits_NV, "ids_BS"):
        raise ConfigError(f"{where}: a dense entry takes an [N, V] array of scaled logits")
    if hasattr(scaled_logits_NV, "detach"):  # a torch tensor
        scaled_logits_NV = scaled_logits_NV.detach().float().cpu().numpy()
    values = np.asarray(scaled_logits_NV)
    if values.ndim != 2 or values.shape[0] != len(sample_ids_N):
        raise TeacherOutputError(
            f"{where}: expected sample_ids [N] and values [N, V], got {sample_ids_N.shape} "
            f"and {values.shape}"
        )
    vocab = int(values.shape[1])
    if vocab_size is not None and int(vocab_size) != vocab:
        raise TeacherOutputError(f"{where}: values have V={vocab}, vocab_size={vocab_size}")
    stored = to_storage_dtype(values, spec.storage_dtype, where)
    meta = {"kind": "dense", "storage_dtype": spec.storage_dtype, "vocab_size": vocab}
    cols = ShardColumns(sample_ids_N, rows={schema.COL_SCALED_LOGITS: stored}, meta=meta)
    return cols, {"vocab_size": vocab}


def sparse_to_columns(
    sample_ids_N: np.ndarray,
    sparse: Any,
    spec: TargetSpec,
    vocab_size: int | None,
    where: str,
) -> tuple[ShardColumns, dict[str, Any]]:
    """Sparse rows (a :class:`kdcache.targets.SparseTargets`) as ragged columns.

    Pads are dropped: row n's kept entries (in slot order) become entries
    ``offsets[n]:offsets[n + 1]`` of ``ids`` (int32), ``values`` (storage dtype) and, for
    sampled targets, ``counts`` (int32). Per-row ``log_partition``, ``tail_log_mass`` and
    ``log_partition_grid`` stay float32.

    Returns:
        ``(columns, sidecar extras)``; extras hold ``vocab_size``, ``num_entries`` (E) and
        ``num_slots`` (S).

    Raises:
        ConfigError: not a SparseTargets, another kind or grid than the spec's, or no V.
        TeacherOutputError: row count differs, an id is outside [0, V), a log-partition
            is not finite, or a value does not fit the storage dtype.
    """
    from kdcache.targets.sparse import PAD_ID, SparseTargets

    if not isinstance(sparse, SparseTargets):
        raise ConfigError(
            f"{where}: a {spec.kind!r} entry takes kdcache.targets.SparseTargets, got "
            f"{type(sparse).__name__}"
        )
    if sparse.kind != spec.kind:
        raise ConfigError(f"{where}: targets are {sparse.kind!r}, the entry holds {spec.kind!r}")
    grid = spec.grid_temperatures
    if len(grid) != len(sparse.grid_temperatures) or not all(
        abs(a - b) <= 1e-6 * max(abs(a), abs(b))
        for a, b in zip(grid, sparse.grid_temperatures, strict=False)
    ):
        raise ConfigError(
            f"{where}: targets carry grid temperatures {sparse.grid_temperatures}, the "
            f"entry's spec says {grid}"
        )
    if vocab_size is None or int(vocab_size) < 1:
        raise ConfigError(f"{where}: sparse targets need vocab_size=V (got {vocab_size!r})")
    vocab = int(vocab_size)
    if vocab >= 2**31:
        raise ConfigError(f"{where}: V={vocab} does not fit the int32 id column")
    num_rows = len(sample_ids_N)
    if sparse.num_rows != num_rows:
        raise TeacherOutputError(
            f"{where}: {num_rows} sample_ids but {sparse.num_rows} rows of sparse targets"
        )
    ids_NS = sparse.ids_BS.numpy()
    valid = ids_NS != PAD_ID
    if bool(((ids_NS[valid] < 0) | (ids_NS[valid] >= vocab)).any()):
        bad = int(ids_NS[valid][(ids_NS[valid] < 0) | (ids_NS[valid] >= vocab)][0])
        raise TeacherOutputError(f"{where}: id {bad} is outside [0, V={vocab})")
    lengths = valid.sum(axis=1)
    offsets = np.zeros(num_rows + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    entries = {schema.COL_IDS: ids_NS[valid].astype(np.int32)}
    rows: dict[str, np.ndarray] = {}
    extra: dict[str, Any] = {}
    if sparse.counts_BS is not None:
        counts = sparse.counts_BS.numpy()[valid]
        if len(counts) and int(counts.min()) < 0:
            raise TeacherOutputError(f"{where}: a draw count is negative")
        entries[schema.COL_COUNTS] = counts.astype(np.int32)
    if spec.kind == "sampled_counts":
        # p_hat = counts / num_samples is all there is: no values, no normaliser, no tail
        if num_rows and bool(
            (np.add.reduceat(counts, offsets[:-1]) <= 0).any() or (lengths == 0).any()
        ):
            raise TeacherOutputError(f"{where}: a row of sampled_counts targets has no draw")
        meta = {
            "kind": spec.kind,
            "storage_dtype": spec.storage_dtype,
            "vocab_size": vocab,
            "num_slots": sparse.num_slots,
            "grid_temperatures": [],
        }
        if spec.param("compression") is not None:
            meta["compression"] = str(spec.param("compression"))
        cols = ShardColumns(sample_ids_N, entries=entries, offsets_N1=offsets, meta=meta)
        return cols, {
            "vocab_size": vocab,
            "num_entries": int(offsets[-1]),
            "num_slots": sparse.num_slots,
        }
    values = sparse.values_BS.float().numpy()[valid]
    value_bits = spec.param("value_bits")
    if value_bits is None:
        entries[schema.COL_VALUES] = to_storage_dtype(values, spec.storage_dtype, where)
    else:
        codes, vmax, step, kl = quantize_values(values, offsets, int(value_bits), where)
        entries[schema.COL_VALUE_CODES] = codes
        rows[schema.COL_VALUE_MAX] = vmax
        rows[schema.COL_VALUE_STEP] = step
        extra["quantization"] = {
            "value_bits": int(value_bits),
            "kl_nats_mean": float(kl.mean()) if len(kl) else 0.0,
            "kl_nats_max": float(kl.max()) if len(kl) else 0.0,
            "num_rows": int(num_rows),
        }
    log_z = sparse.log_partition_B.float().numpy()
    if not bool(np.isfinite(log_z).all()):
        raise TeacherOutputError(f"{where}: a log-partition is NaN or infinite")
    rows[schema.COL_LOG_PARTITION] = np.ascontiguousarray(log_z, dtype=np.float32)
    if sparse.tail_log_mass_B is not None:
        tail = sparse.tail_log_mass_B.float().numpy()
        if bool(np.isnan(tail).any() or (tail > 1e-6).any()):
            raise TeacherOutputError(f"{where}: a tail log-mass is NaN or above 0")
        rows[schema.COL_TAIL_LOG_MASS] = np.ascontiguousarray(tail, dtype=np.float32)
    if sparse.log_partition_grid_BG is not None:
        g = sparse.log_partition_grid_BG.float().numpy()
        if not bool(np.isfinite(g).all()):
            raise TeacherOutputError(f"{where}: a grid log-partition is NaN or infinite")
        rows[schema.COL_LOG_PARTITION_GRID] = np.ascontiguousarray(g, dtype=np.float32)
    meta = {
        "kind": spec.kind,
        "storage_dtype": spec.storage_dtype,
        "vocab_size": vocab,
        "num_slots": sparse.num_slots,
        "grid_temperatures": list(sparse.grid_temperatures),
    }
    if value_bits is not None:
        meta["value_bits"] = int(value_bits)
    if spec.param("compression") is not None:
        meta["compression"] = str(spec.param("compression"))
    cols = ShardColumns(sample_ids_N, rows=rows, entries=entries, offsets_N1=offsets, meta=meta)
    extra.update(
        {"vocab_size": vocab, "num_entries": int(offsets[-1]), "num_slots": sparse.num_slots}
    )
    return cols, extra


def quantize_values(
    values_E: np.ndarray, offsets_N1: np.ndarray, value_bits: int, where: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Quantise each row's kept values to ``value_bits``-bit codes below the row's largest.

    Row n's value ``v_i`` (a scaled logit ``z_i / tau``; the log-probability plus the
    row's constant log-partition) is stored as ``code_i = round((v_max - v_i) / step)``
    with ``step = (v_max - v_min) / (2**value_bits - 1)``: uniform codes of the
    log-probability relative to the row's most likely kept id. The stored ``value_max``
    is then shifted so that the dequantised values ``value_max - code * step`` (float32)
    keep exactly the kept mass of the exact ones: with the exact tail mass beside them,
    the reader's distribution sums to 1.

    Args:
        values_E: float32 [E], the kept values of N rows, back to back.
        offsets_N1: int64 [N + 1], row n's values are ``values_E[offsets[n]:offsets[n+1]]``.
        value_bits: Bits per code, 2..16.
        where: Names the shard in messages.

    Returns:
        ``(codes [E] uint8 (value_bits <= 8) or uint16, value_max float32 [N],
        value_step float32 [N], kl float64 [N])``; ``kl[n]`` is the quantisation error of
        row n in nats: ``KL(p || p')`` over its kept ids, p from the float32 values and p'
        from the stored codes, both renormalised over the kept ids (they keep the same
        mass, so this bounds the KL of the full distributions, tail included, from
        above): ``sum_i p_i (v_i - v'_i)``.

    Raises:
        TeacherOutputError: a value is NaN or infinite.
    """
    vals = np.asarray(values_E, dtype=np.float32)
    if vals.size and not bool(np.isfinite(vals).all()):
        raise TeacherOutputError(f"{where}: values hold NaN or inf; nothing was written")
    offsets = np.asarray(offsets_N1, dtype=np.int64)
    lengths = np.diff(offsets)
    num_rows = len(lengths)
    levels = (1 << int(value_bits)) - 1
    row_of = np.repeat(np.arange(num_rows), lengths)
    vmax = np.zeros(num_rows, np.float32)
    vmin = np.zeros(num_rows, np.float32)
    full = lengths > 0
    if bool(full.any()):
        starts = offsets[:-1][full]
        vmax[full] = np.maximum.reduceat(vals, starts)
        vmin[full] = np.minimum.reduceat(vals, starts)
    step = ((vmax - vmin) / np.float32(levels)).astype(np.float32)
    safe = np.where(step > 0, step, np.float32(1.0))
    codes = np.rint((vmax[row_of] - vals) / safe[row_of])
    codes = np.clip(np.where(step[row_of] > 0, codes, 0), 0, levels)
    codes = codes.astype(np.uint8 if value_bits <= 8 else np.uint16)
    # shift value_max so that the dequantised kept mass is the exact one (float64 sums)
    v64 = vals.astype(np.float64)
    deq = (vmax[row_of] - codes.astype(np.float32) * step[row_of]).astype(np.float64)
    shift = np.zeros(num_rows)
    if bool(full.any()):
        ref = v64 - vmax.astype(np.float64)[row_of]  # <= 0: exp never overflows
        got = deq - vmax.astype(np.float64)[row_of]
        starts = offsets[:-1][full]
        shift[full] = np.log(np.add.reduceat(np.exp(ref), starts)) - np.log(
            np.add.reduceat(np.exp(got), starts)
        )
    vmax_stored = (vmax.astype(np.float64) + shift).astype(np.float32)
    stored = (vmax_stored[row_of] - codes.astype(np.float32) * step[row_of]).astype(np.float64)
    kl = np.zeros(num_rows)
    if bool(full.any()):
        # p restricted to the kept ids and renormalised there (both sides keep the same
        # mass, so the tail adds nothing): KL = sum_i p_i (v_i - v'_i)
        w = np.exp(v64 - vmax.astype(np.float64)[row_of])
        starts = offsets[:-1][full]
        kl[full] = np.add.reduceat(w * (v64 - stored), starts) / np.add.reduceat(w, starts)
    return codes, vmax_stored, step, kl


def dequantize_values(cols: ShardColumns, where: str) -> np.ndarray:
    """float32 [E]: the values of quantised rows, ``value_max[n] - code * value_step[n]``.

    Raises:
        CacheCorruptError: a quantisation column is missing or not finite.
    """
    try:
        codes = cols.entries[schema.COL_VALUE_CODES]
        vmax = np.asarray(cols.rows[schema.COL_VALUE_MAX], dtype=np.float32)
        step = np.asarray(cols.rows[schema.COL_VALUE_STEP], dtype=np.float32)
    except KeyError as exc:
        raise CacheCorruptError(f"{where}: quantised shard lacks {exc}") from None
    if not (bool(np.isfinite(vmax).all()) and bool(np.isfinite(step).all())) or bool(
        (step < 0).any()
    ):
        raise CacheCorruptError(f"{where}: quantisation scales are not finite and >= 0")
    lengths = np.diff(cols.offsets_of(schema.COL_VALUE_CODES))
    row_of = np.repeat(np.arange(len(lengths)), lengths)
    return (vmax[row_of] - codes.astype(np.float32) * step[row_of]).astype(np.float32)


def columns_to_dense(cols: ShardColumns) -> np.ndarray:
    """Dense rows back from :func:`dense_to_columns`'s columns.

    Returns:
        ``scaled_logits`` [N, V] in the storage dtype (float32 or float16); bfloat16 comes
        back as float32, exactly, since numpy has no bfloat16. May be a read-only view.
    """
    values = cols.rows[schema.COL_SCALED_LOGITS]
    if cols.meta.get("storage_dtype") == "bfloat16":
        values = bfloat16_bits_to_float32(values)
    return values


def columns_to_sparse(cols: ShardColumns, where: str) -> Any:
    """Rebuild :class:`kdcache.targets.SparseTargets` from ragged columns (re-padding).

    Returns:
        SparseTargets with S = ``meta["num_slots"]``: row n's entries in slots
        ``0 .. len_n - 1``, then pads (id -1, value -inf, count 0). Values keep the
        storage dtype (bfloat16 as a torch bfloat16 tensor).

    Raises:
        CacheCorruptError: a row holds more entries than S, or a column is missing.
    """
    from kdcache.targets.sparse import PAD_ID, SparseTargets, count_log_probs

    meta = cols.meta
    num_rows = cols.num_rows
    kind = str(meta.get("kind"))
    try:
        num_slots = int(meta["num_slots"])
        flat_ids = cols.entries[schema.COL_IDS]
        offsets = cols.offsets_of(schema.COL_IDS)
        if kind == "sampled_counts":
            counts_flat = np.asarray(cols.entries[schema.COL_COUNTS])
            if bool((counts_flat <= 0).any()) or bool((np.diff(offsets) == 0).any()):
                raise CacheCorruptError(f"{where}: a sampled_counts row has a count below 1")
            flat_values = np.zeros(len(flat_ids), np.float32)  # log p_hat, set below
            log_z = np.zeros(num_rows, np.float32)
        elif schema.COL_VALUE_CODES in cols.entries:
            flat_values = dequantize_values(cols, where)
            log_z = cols.rows[schema.COL_LOG_PARTITION]
        else:
            flat_values = cols.entries[schema.COL_VALUES]
            log_z = cols.rows[schema.COL_LOG_PARTITION]
    except KeyError as exc:
        raise CacheCorruptError(f"{where}: sparse shard lacks {exc}") from None
    lengths = np.diff(offsets) if num_rows else np.zeros(0, np.int64)
    if len(lengths) and int(lengths.max()) > num_slots:
        raise CacheCorruptError(f"{where}: a row holds {int(lengths.max())} > S={num_slots}")

    full = len(lengths) > 0 and bool((lengths == num_slots).all())
    kept = None if full else np.arange(num_slots)[None, :] < lengths[:, None]

    def pad(flat: np.ndarray, fill: Any, dtype: Any) -> np.ndarray:
        # one copy (the file's arrays may be read-only), pads filled in numpy: no torch
        # work in the reader's thread
        if kept is None:
            return np.array(flat, dtype=dtype).reshape(num_rows, num_slots)
        out = np.full((num_rows, num_slots), fill, dtype=dtype)
        out[kept] = flat
        return out

    bf16_bits = meta.get("storage_dtype") == "bfloat16" and schema.COL_VALUES in cols.entries
    # a pad's value is -inf: its float, or bfloat16's bit pattern 0xFF80
    value_fill: Any = np.uint16(0xFF80) if bf16_bits else -np.inf
    columns = {
        "ids": pad(flat_ids, PAD_ID, np.int64),
        "values": pad(flat_values, value_fill, flat_values.dtype),
        "log_partition": np.array(log_z, dtype=np.float32),
    }
    if schema.COL_COUNTS in cols.entries:
        columns["counts"] = pad(cols.entries[schema.COL_COUNTS], 0, np.int64)
    for src, dst in (
        (schema.COL_TAIL_LOG_MASS, "tail_log_mass"),
        (schema.COL_LOG_PARTITION_GRID, "log_partition_grid"),
    ):
        if src in cols.rows:
            columns[dst] = np.array(cols.rows[src], dtype=np.float32)
    ids = torch.from_numpy(columns["ids"])
    values = torch.from_numpy(columns["values"])
    if bf16_bits:
        values = values.view(torch.bfloat16)  # uint16 bit patterns, reinterpreted
    counts = columns.get("counts")
    if kind == "sampled_counts":
        assert counts is not None
        values = count_log_probs(torch.from_numpy(counts))
    grid = columns.get("log_partition_grid")
    tail = columns.get("tail_log_mass")
    if kind == "sampled_counts":  # p_hat sums to 1 over the drawn ids: no tail
        tail = np.full(num_rows, -np.inf, np.float32)
    return SparseTargets(
        ids_BS=ids,
        values_BS=values,
        log_partition_B=torch.from_numpy(columns["log_partition"]),
        kind=str(meta["kind"]),
        counts_BS=None if counts is None else torch.from_numpy(counts),
        grid_temperatures=tuple(meta.get("grid_temperatures", ())),
        log_partition_grid_BG=None if grid is None else torch.from_numpy(grid),
        tail_log_mass_B=None if tail is None else torch.from_numpy(tail),
    )


def _check_token_rows(ids_N: np.ndarray, positions_N: Any, where: str) -> np.ndarray:
    """Check token-level rows: each sample one contiguous run, positions increasing in it.

    Returns:
        The positions as int32 [N].

    Raises:
        SampleIdMismatchError: a sample's rows are split, or positions do not increase.
        TeacherOutputError: positions of the wrong shape or negative.
    """
    pos = np.asarray(positions_N)
    if pos.shape != ids_N.shape or pos.dtype.kind not in "iu" or bool((pos < 0).any()):
        raise TeacherOutputError(
            f"{where}: positions must be non-negative ints of shape {ids_N.shape}, got "
            f"{pos.dtype} {pos.shape}"
        )
    if len(ids_N) > 1:
        new_run = ids_N[1:] != ids_N[:-1]
        starts = ids_N[np.concatenate([[True], new_run])]
        if len(np.unique(starts)) != len(starts):
            raise SampleIdMismatchError(
                f"{where}: a sample's token rows are not contiguous (sample_id "
                f"{int(starts[np.unique(starts, return_counts=True)[1].argmax()])} "
                "appears in two runs); write each sample's tokens together"
            )
        if bool(((np.diff(pos) <= 0) & ~new_run).any()):
            raise SampleIdMismatchError(
                f"{where}: token positions must increase within each sample's rows"
            )
    return np.ascontiguousarray(pos, dtype=np.int32)
