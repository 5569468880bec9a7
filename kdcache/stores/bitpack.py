"""Bit-packing of non-negative integers, in groups that each start on a byte.

The sequence-major layout of token-level entries (``docs/format.md``) stores ids in
``ceil(log2 V)`` bits and counts, row lengths and quantised values in the fewest bits
their largest value needs. Each group (one sequence's entries) is packed on its own,
starting on a byte boundary, so a group's bytes are a plain ragged run: a reader slices
one sequence's bytes with the byte offsets, as it slices any ragged column.

Bit order: value ``j`` of a group occupies bits ``j * bits .. (j + 1) * bits - 1`` of the
group's bytes, least significant bit first, bytes little-endian (bit ``b`` of the stream
is bit ``b % 8`` of byte ``b // 8``); the last byte's unused high bits are zero.

Shape legend: E values, M groups.
"""

from __future__ import annotations

import numpy as np

from kdcache.errors import CacheCorruptError, ConfigError

#: Most bits one value may take (a value and its shift fit one 64-bit word pair).
MAX_BITS = 57


def bits_for(max_value: int) -> int:
    """Bits needed to hold every integer in ``0 .. max_value`` (0 for ``max_value`` 0).

    Raises:
        ConfigError: ``max_value`` is negative or needs more than :data:`MAX_BITS` bits.
    """
    v = int(max_value)
    if v < 0:
        raise ConfigError(f"cannot bit-pack negative values (largest {v})")
    bits = v.bit_length()
    if bits > MAX_BITS:
        raise ConfigError(f"values up to {v} need {bits} bits; at most {MAX_BITS} are packed")
    return bits


def packed_byte_offsets(group_offsets_M1: np.ndarray, bits: int) -> np.ndarray:
    """int64 [M + 1]: where each group's bytes start, for groups of these sizes."""
    counts = np.diff(np.asarray(group_offsets_M1, dtype=np.int64))
    out = np.zeros(len(counts) + 1, np.int64)
    np.cumsum((counts * int(bits) + 7) // 8, out=out[1:])
    return out


def _bit_positions(
    group_offsets_M1: np.ndarray, byte_offsets_M1: np.ndarray, bits: int
) -> np.ndarray:
    """int64 [E]: the first bit of every value in the packed stream (ascending)."""
    starts = group_offsets_M1[:-1]
    counts = np.diff(group_offsets_M1)
    num = int(group_offsets_M1[-1])
    within = np.arange(num, dtype=np.int64) - np.repeat(starts, counts)
    return np.repeat(byte_offsets_M1[:-1] * 8, counts) + within * int(bits)


def pack(
    values_E: np.ndarray, bits: int, group_offsets_M1: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Pack non-negative integers into ``bits`` bits each, every group from a new byte.

    Args:
        values_E: int [E], each in ``0 .. 2**bits - 1``.
        bits: 0..:data:`MAX_BITS`; 0 stores nothing (every value must be 0).
        group_offsets_M1: int64 [M + 1], non-decreasing from 0 to E: group m is
            ``values_E[group_offsets[m]:group_offsets[m + 1]]``.

    Returns:
        ``(data uint8 [B], byte_offsets int64 [M + 1])``: group m's bytes are
        ``data[byte_offsets[m]:byte_offsets[m + 1]]``, ``ceil(len_m * bits / 8)`` of them.

    Raises:
        ConfigError: a value is negative or does not fit ``bits``; bad offsets.
    """
    bits = int(bits)
    if not 0 <= bits <= MAX_BITS:
        raise ConfigError(f"bits must be in 0..{MAX_BITS}, got {bits}")
    groups = np.asarray(group_offsets_M1, dtype=np.int64)
    vals = np.asarray(values_E)
    if groups.ndim != 1 or len(groups) < 1 or int(groups[0]) != 0 or int(groups[-1]) != len(vals):
        raise ConfigError(f"group offsets must run from 0 to {len(vals)}")
    if len(vals) and (int(vals.min()) < 0 or int(vals.max()) >= (1 << bits)):
        raise ConfigError(
            f"values {int(vals.min())}..{int(vals.max())} do not fit {bits} unsigned bits"
        )
    byte_offsets = packed_byte_offsets(groups, bits)
    total = int(byte_offsets[-1])
    if bits == 0 or not len(vals):
        return np.zeros(total, np.uint8), byte_offsets
    v = vals.astype(np.uint64)
    pos = _bit_positions(groups, byte_offsets, bits)
    word = pos >> 6
    shift = (pos & 63).astype(np.uint64)
    words = np.zeros(total // 8 + 2, dtype="<u8")
    # Bit positions ascend, so the values landing in one word are one contiguous run: an
    # OR-reduce per run puts them in place (their bits never overlap).
    lo = v << shift
    starts = np.flatnonzero(np.concatenate([[True], word[1:] != word[:-1]]))
    words[word[starts]] |= np.bitwise_or.reduceat(lo, starts)
    spill = (shift + np.uint64(bits)) > 64
    if bool(spill.any()):
        hi = v[spill] >> (np.uint64(64) - shift[spill])
        wspill = word[spill] + 1  # at most one spilled value per word: no run to reduce
        words[wspill] |= hi
    return words.view(np.uint8)[:total].copy(), byte_offsets


def unpack(
    data_B: np.ndarray,
    byte_offsets_M1: np.ndarray,
    bits: int,
    group_offsets_M1: np.ndarray,
    where: str,
) -> np.ndarray:
    """Inverse of :func:`pack`.

    Args:
        data_B: uint8 [B], the packed bytes.
        byte_offsets_M1: int64 [M + 1], as :func:`pack` returned them.
        bits: Bits per value.
        group_offsets_M1: int64 [M + 1], the group sizes (known from other columns).
        where: Names the shard and column in messages.

    Returns:
        int64 [E].

    Raises:
        CacheCorruptError: the byte offsets are not those the group sizes imply (the file
            and its other columns disagree).
    """
    bits = int(bits)
    groups = np.asarray(group_offsets_M1, dtype=np.int64)
    want = packed_byte_offsets(groups, bits)
    got = np.asarray(byte_offsets_M1, dtype=np.int64)
    data = np.asarray(data_B, dtype=np.uint8)
    if got.shape != want.shape or not np.array_equal(got, want) or len(data) != int(want[-1]):
        raise CacheCorruptError(
            f"{where}: packed bytes do not match their {int(groups[-1])} values of {bits} "
            f"bits ({len(data)} bytes, offsets ending at {int(got[-1]) if len(got) else 0}, "
            f"expected {int(want[-1])})"
        )
    num = int(groups[-1])
    if bits == 0 or not num:
        return np.zeros(num, np.int64)
    padded = np.zeros((len(data) // 8 + 2) * 8, np.uint8)
    padded[: len(data)] = data
    words = padded.view("<u8")
    pos = _bit_positions(groups, want, bits)
    word = pos >> 6
    shift = (pos & 63).astype(np.uint64)
    out = words[word] >> shift
    spill = (shift + np.uint64(bits)) > 64
    if bool(spill.any()):
        out[spill] |= words[word[spill] + 1] << (np.uint64(64) - shift[spill])
    out &= np.uint64((1 << bits) - 1)
    return out.astype(np.int64)
