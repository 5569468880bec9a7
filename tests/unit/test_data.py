"""Reading IDX files and the Fashion-MNIST loader's errors."""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np
import pytest

from kdcache.data.base import ArrayDataset
from kdcache.errors import ConfigError, DataError, DataFileNotFoundError
from pipelines.corpora import read_idx
from pipelines.fashion_mnist import FILES, load_fashion_mnist


def _write_idx(path, arr, gz=True):
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(data)


def test_read_idx_round_trip(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", arr)
    _write_idx(tmp_path / "b", arr, gz=False)
    np.testing.assert_array_equal(read_idx(str(tmp_path / "a.gz")), arr)
    np.testing.assert_array_equal(read_idx(str(tmp_path / "b")), arr)


def test_read_idx_errors_name_the_file(tmp_path):
    with pytest.raises(DataFileNotFoundError, match="nope"):
        read_idx(str(tmp_path / "nope"))
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x12\x34\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(DataError, match=r"bad.*magic"):
        read_idx(str(bad))
    short = tmp_path / "short"
    _write_idx(short, np.zeros((5, 2)), gz=False)
    short.write_bytes(short.read_bytes()[:-3])
    with pytest.raises(DataError, match=r"short.*truncated"):
        read_idx(str(short))


def _fake_dataset(d, n_train=12, n_test=6):
    rng = np.random.default_rng(0)
    _write_idx(
        os.path.join(d, FILES["train_images"] + ".gz"), rng.integers(0, 255, (n_train, 28, 28))
    )
    _write_idx(os.path.join(d, FILES["train_labels"] + ".gz"), rng.integers(0, 10, n_train))
    _write_idx(
        os.path.join(d, FILES["test_images"] + ".gz"), rng.integers(0, 255, (n_test, 28, 28))
    )
    _write_idx(os.path.join(d, FILES["test_labels"] + ".gz"), rng.integers(0, 10, n_test))


def test_fashion_mnist_loader_names_missing_file_and_fix(tmp_path):
    _fake_dataset(tmp_path)
    out = load_fashion_mnist(str(tmp_path))
    assert out["train_images"].shape == (12, 28, 28) and out["test_labels"].dtype == np.int64
    os.unlink(tmp_path / (FILES["test_labels"] + ".gz"))
    with pytest.raises(
        DataFileNotFoundError,
        match=r"t10k-labels-idx1-ubyte.*apt-get install dataset-fashion-mnist.*--data-dir",
    ):
        load_fashion_mnist(str(tmp_path))


def test_fashion_mnist_loader_names_malformed_file(tmp_path):
    _fake_dataset(tmp_path)
    path = tmp_path / (FILES["train_images"] + ".gz")
    path.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz.*reinstall"):
        load_fashion_mnist(str(tmp_path))
    _fake_dataset(tmp_path, n_train=12)
    _write_idx(os.path.join(tmp_path, FILES["train_labels"] + ".gz"), np.zeros(11))
    with pytest.raises(DataError, match="12 images but 11 labels"):
        load_fashion_mnist(str(tmp_path))


def test_array_dataset_shards_cover_every_record_once():
    ds = ArrayDataset(np.arange(10) * 7, np.zeros((10, 2)), num_shards=3)
    ids = np.concatenate([ds.read_shard(i)["sample_id"] for i in range(3)])
    assert ids.tolist() == (np.arange(10) * 7).tolist()
    with pytest.raises(ConfigError, match="unique"):
        ArrayDataset(np.array([1, 1]), np.zeros((2, 2)))
    with pytest.raises(ConfigError, match="num_shards"):
        ArrayDataset(np.arange(3), np.zeros((3, 2)), num_shards=4)
