"""TODO docstring."""

from __future__ import annotations

import gzip
import os
import zlib
from typing import Any

import numpy as np

from kdcache.errors import ConfigError, DataError, DataFileNotFoundError

_IDX_DTYPES: dict[int, Any] = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not.

    Args:
        path: File path; ``.gz`` files are decompressed.

    Returns:
        Array with the file's dtype and shape (e.g. uint8 [60000, 28, 28] for images).

    Raises:
        DataFileNotFoundError: the file does not exist.
        DataError: the file is not valid IDX (bad magic, truncated).

    Source: Y. LeCun et al., the MNIST database file format ("IDX").
    """
    if not os.path.exists(path):
        raise DataFileNotFoundError(f"{path} does not exist")
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path} could not be read ({exc}); the file is damaged") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number {data[:4]!r})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path} is truncated: header needs {header} bytes, file has {len(data)}")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise DataError(
            f"{path} is truncated or padded: shape {shape} needs {expected} bytes, file has "
            f"{len(data)}"
        )
    return (
        np.frombuffer(data, dtype=dtype, offset=header)
        .reshape(shape)
        .astype(dtype.newbyteorder("="))
    )


#: Where the Debian package ``fortunes`` (and ``fortunes-min``) installs its text files.


FORTUNES_DIR = "/usr/share/games/fortunes"


# --------------------------------------------------------------------------------------
# Corpus and tokenizer
# --------------------------------------------------------------------------------------


def read_fortunes(directory: str = FORTUNES_DIR) -> list[tuple[int, str]]:
    """Read the records of the Debian ``fortunes`` text files, with stable ids.

    Files are the plain-text ones in ``directory`` (``*.dat`` indexes, ``*.u8`` links and
    subdirectories are skipped), read in name order as UTF-8 (invalid bytes replaced);
    records are separated by lines holding only ``%``; empty records are dropped.

    Args:
        directory: The fortunes directory.

    Returns:
        ``[(sample_id, text), ...]`` with ``sample_id = crc32(file name) * 2**20 + record
        index``: stable as long as a file keeps its name and record order (adding a file
        never renumbers another file's records).

    Raises:
        DataFileNotFoundError: no such directory, or no text file in it (names the fix).
    """
    if not os.path.isdir(directory):
        raise DataFileNotFoundError(
            f"{directory} does not exist: install the corpus with "
            "'sudo apt-get install fortunes' (Debian/Ubuntu) or pass its directory"
        )
    out: list[tuple[int, str]] = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name.endswith((".dat", ".u8")) or os.path.islink(path) or not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            records = f.read().split("\n%\n")
        base = zlib.crc32(name.encode()) * (1 << 20)
        for i, rec in enumerate(records):
            text = rec.strip("\n%").strip()
            if text:
                out.append((base + i, text))
    if not out:
        raise DataFileNotFoundError(
            f"{directory} holds no fortune text files; install 'fortunes' or pass another dir"
        )
    return out


def split_by_id(sample_ids: np.ndarray, validation_fraction: float) -> np.ndarray:
    """bool [N]: True for validation records, chosen by a hash of each id (stable, no RNG).

    Raises:
        ConfigError: the fraction is outside (0, 1).
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ConfigError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    ids = np.asarray(sample_ids, dtype=np.int64)
    # splitmix64-style mixing of the id, then a uniform draw in [0, 1).
    x = ids.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53) < validation_fraction
