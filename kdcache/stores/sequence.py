"""The sequence-major layout of token-level entries (format version 2), both ways.

A token-level shard has one row per target position (token) in the row-major layout of
format 1: an int64 ``sample_id`` and an int32 ``position`` repeated on every token, int32
ids and counts, int32 offsets per ragged column. The sequence-major layout stores the
same content with one row per *sequence*:

* rows [M]: ``sample_id`` int64, ``first_position`` int32 and ``num_positions`` int32
  (a sequence's target positions are one run, ``first .. first + num - 1``);
* per-token columns (``log_partition``, ``tail_log_mass``, ``value_max``,
  ``value_step``) ragged over the sequence's tokens; fixed-width per-token columns
  (``log_partition_grid`` [G], dense ``scaled_logits`` [V]) flattened with offsets of
  their own;
* per-entry columns ragged over the sequence's kept entries: ``values`` in the storage
  dtype, and bit-packed (:mod:`kdcache.stores.bitpack`) ``ids`` in ``ceil(log2 V)`` bits,
  ``counts`` (minus the shard's smallest count) and quantised ``value_codes`` in the
  fewest bits their largest value needs, and ``row_length`` (kept entries per token;
  absent when every token keeps the same number).

:func:`compact_token_columns` and :func:`expand_token_columns` convert between the two;
the round trip is exact (every column, dtype and value), so everything above the store
reads row-major columns whatever the layout on disk. ``docs/format.md`` is the prose
version.

Shape legend: N token rows, M sequences, E kept entries, V vocabulary, G grid
temperatures.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kdcache import schema
from kdcache.errors import CacheCorruptError, ConfigError
from kdcache.stores.backends import ShardColumns
from kdcache.stores.bitpack import bits_for, pack, unpack

#: The value of ``meta["layout"]`` of a sequence-major shard.
SEQUENCE_LAYOUT = "sequence"
#: Ragged per-entry columns that are bit-packed (the others keep their dtype).
_PACKED = (schema.COL_IDS, schema.COL_COUNTS, schema.COL_VALUE_CODES)
#: meta keys the sequence-major layout adds (removed again by the expansion).
_LAYOUT_KEYS = ("layout", "packed", "row_widths", "row_length")


def _runs(sample_ids_N: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts int64 [M], lengths int64 [M]) of the runs of equal consecutive ids."""
    n = len(sample_ids_N)
    if not n:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    starts = np.flatnonzero(np.concatenate([[True], sample_ids_N[1:] != sample_ids_N[:-1]]))
    return starts.astype(np.int64), np.diff(np.append(starts, n)).astype(np.int64)


def _offsets(lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def compact_token_columns(cols: ShardColumns, where: str) -> ShardColumns:
    """Row-major token-level columns (one row per token) as the sequence-major layout.

    Args:
        cols: A token-level shard as :mod:`kdcache.stores.codec` makes it (rows per
            token, ``position`` among the row columns, ``meta["token_level"]``).
        where: Names the shard in messages.

    Returns:
        The same content with one row per sequence (see the module docstring).

    Raises:
        ConfigError: a sequence's positions are not one run of consecutive integers (the
            layout stores a run; the teacher stage always writes one).
    """
    ids_N = np.asarray(cols.sample_ids_N, dtype=np.int64)
    pos_N = np.asarray(cols.rows[schema.COL_POSITION], dtype=np.int64)
    starts, num_pos = _runs(ids_N)
    tok_off = _offsets(num_pos)
    first = pos_N[starts] if len(starts) else np.zeros(0, np.int64)
    within = np.arange(len(ids_N), dtype=np.int64) - np.repeat(tok_off[:-1], num_pos)
    if not np.array_equal(pos_N, np.repeat(first, num_pos) + within):
        raise ConfigError(
            f"{where}: a sequence's target positions are not consecutive; the sequence-major "
            "layout stores each sequence's positions as one run (first .. first + n - 1)"
        )
    if len(first) and int(first.max()) >= 2**31:
        raise ConfigError(f"{where}: a position does not fit int32")
    meta: dict[str, Any] = {**cols.meta, "layout": SEQUENCE_LAYOUT}
    out = ShardColumns(
        ids_N[starts],
        rows={
            schema.COL_FIRST_POSITION: first.astype(np.int32),
            schema.COL_NUM_POSITIONS: num_pos.astype(np.int32),
        },
        offsets_N1=tok_off,
        meta=meta,
    )
    widths: dict[str, int] = {}
    for name, col in cols.rows.items():
        if name == schema.COL_POSITION:
            continue
        if col.ndim == 1:
            out.entries[name] = np.ascontiguousarray(col)
        else:
            widths[name] = int(col.shape[1])
            out.entries[name] = np.ascontiguousarray(col).reshape(-1)
            out.entry_offsets[name] = tok_off * int(col.shape[1])
    if widths:
        meta["row_widths"] = widths
    if not cols.entries:
        return out
    row_off = cols.offsets_of(schema.COL_IDS)
    row_len = np.diff(row_off)
    seq_entry_off = row_off[tok_off]
    packed: dict[str, dict[str, Any]] = {}
    if len(row_len) and bool((row_len == row_len[0]).all()):
        meta["row_length"] = int(row_len[0])
    elif len(row_len):
        bits = bits_for(int(row_len.max()))
        data, byte_off = pack(row_len, bits, tok_off)
        out.entries[schema.COL_ROW_LENGTH] = data
        out.entry_offsets[schema.COL_ROW_LENGTH] = byte_off
        packed[schema.COL_ROW_LENGTH] = {"bits": bits, "base": 0, "dtype": "<i8"}
    vocab = int(cols.meta.get("vocab_size", 0))
    for name, col in cols.entries.items():
        if name not in _PACKED:
            out.entries[name] = np.ascontiguousarray(col)
            out.entry_offsets[name] = seq_entry_off
            continue
        flat = np.asarray(col)
        base = int(flat.min()) if len(flat) and name != schema.COL_IDS else 0
        top = vocab - 1 if name == schema.COL_IDS else (int(flat.max()) - base if len(flat) else 0)
        bits = bits_for(max(top, 0))
        data, byte_off = pack(flat.astype(np.int64) - base, bits, seq_entry_off)
        out.entries[name] = data
        out.entry_offsets[name] = byte_off
        packed[name] = {"bits": bits, "base": base, "dtype": flat.dtype.str}
    meta["packed"] = packed
    return out


def expand_token_columns(cols: ShardColumns, where: str) -> ShardColumns:
    """Inverse of :func:`compact_token_columns`: one row per token again.

    Raises:
        CacheCorruptError: the columns disagree with each other (run lengths, offsets,
            packed sizes), or an id is outside ``[0, V)``.
    """
    meta = {k: v for k, v in cols.meta.items() if k not in _LAYOUT_KEYS}
    try:
        num_pos = np.asarray(cols.rows[schema.COL_NUM_POSITIONS], dtype=np.int64)
        first = np.asarray(cols.rows[schema.COL_FIRST_POSITION], dtype=np.int64)
        widths = {str(k): int(v) for k, v in dict(cols.meta.get("row_widths", {})).items()}
        packed = {str(k): dict(v) for k, v in dict(cols.meta.get("packed", {})).items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise CacheCorruptError(f"{where}: sequence-major shard lacks {exc}") from None
    if bool((num_pos < 0).any()) or bool((first < 0).any()):
        raise CacheCorruptError(f"{where}: negative positions or run lengths")
    tok_off = _offsets(num_pos)
    if cols.offsets_N1 is not None and not np.array_equal(cols.offsets_N1, tok_off):
        raise CacheCorruptError(f"{where}: per-token offsets disagree with num_positions")
    num_rows = int(tok_off[-1])
    within = np.arange(num_rows, dtype=np.int64) - np.repeat(tok_off[:-1], num_pos)
    out = ShardColumns(
        np.repeat(np.asarray(cols.sample_ids_N, dtype=np.int64), num_pos),
        rows={},
        meta=meta,
    )
    per_entry = [n for n in cols.entries if n in cols.entry_offsets and n not in widths]
    for name, col in cols.entries.items():
        if name in widths:
            w = widths[name]
            if not np.array_equal(cols.offsets_of(name), tok_off * w):
                raise CacheCorruptError(f"{where}: column {name!r} is not {w} values per token")
            out.rows[name] = col.reshape(num_rows, w)
        elif name not in per_entry:
            out.rows[name] = col
    out.rows[schema.COL_POSITION] = (np.repeat(first, num_pos) + within).astype(np.int32)
    if not per_entry:
        return out
    if "row_length" in cols.meta:
        row_len = np.full(num_rows, int(cols.meta["row_length"]), np.int64)
    else:
        spec = packed.get(schema.COL_ROW_LENGTH)
        if spec is None or schema.COL_ROW_LENGTH not in cols.entries:
            raise CacheCorruptError(f"{where}: no row lengths")
        row_len = unpack(
            cols.entries[schema.COL_ROW_LENGTH],
            cols.offsets_of(schema.COL_ROW_LENGTH),
            int(spec["bits"]),
            tok_off,
            f"{where} column {schema.COL_ROW_LENGTH!r}",
        )
    row_off = _offsets(row_len)
    seq_entry_off = row_off[tok_off]
    out.offsets_N1 = row_off
    vocab = int(cols.meta.get("vocab_size", 0))
    for name in per_entry:
        if name == schema.COL_ROW_LENGTH:
            continue
        col = cols.entries[name]
        if name in packed:
            spec = packed[name]
            values = unpack(
                col, cols.offsets_of(name), int(spec["bits"]), seq_entry_off, f"{where} {name!r}"
            )
            values = values + int(spec["base"])
            if name == schema.COL_IDS and len(values) and int(values.max()) >= vocab:
                raise CacheCorruptError(
                    f"{where}: id {int(values.max())} is outside [0, V={vocab})"
                )
            out.entries[name] = values.astype(np.dtype(str(spec["dtype"])))
        else:
            if not np.array_equal(cols.offsets_of(name), seq_entry_off):
                raise CacheCorruptError(f"{where}: column {name!r} disagrees with the row lengths")
            out.entries[name] = col
    return out


def is_sequence_layout(cols: ShardColumns) -> bool:
    """Whether decoded columns are in the sequence-major layout."""
    return cols.meta.get("layout") == SEQUENCE_LAYOUT
