"""The store conformance suite on a local root, and details of single backends.

The suite itself ships in the library, :class:`kdcache.testing.store_suite.StoreSuite`,
so that users' backends run it too; ``TestLocalStore`` runs it over every backend x kind
on a local directory, and the integration tier runs it against an S3-compatible server
(``tests/integration/test_s3.py``). The tests below it are particular to one backend or
to the codec.
"""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import torch

from kdcache.errors import CacheCorruptError, ConfigError, TeacherOutputError
from kdcache.schema import TargetSpec
from kdcache.stores.backends import ShardColumns
from kdcache.testing.store_suite import VOCAB, StoreSuite, make_entry, make_rows


class TestLocalStore(StoreSuite):
    """Every backend x kind on a fresh local directory (the suite's default root)."""


# -- codec ------------------------------------------------------------------------------


def test_bfloat16_bits_match_torch_rounding():
    from kdcache.stores.codec import bfloat16_bits_to_float32, to_storage_dtype

    x = np.random.default_rng(0).standard_normal(10_000).astype(np.float32) * 1e3
    x[:4] = [0.0, -0.0, 3.3e38, -1.0e-40]
    bits = to_storage_dtype(x, "bfloat16", "test")
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(bits, want)
    np.testing.assert_array_equal(
        bfloat16_bits_to_float32(bits), torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    )
    with pytest.raises(TeacherOutputError, match="NaN or inf"):
        to_storage_dtype(np.array([1.0, np.nan], np.float32), "float16", "test")


# -- backend details --------------------------------------------------------------------


def test_zarr_shard_opens_with_zarr_itself(tmp_path):
    zarr = pytest.importorskip("zarr")
    entry = make_entry(str(tmp_path), "zarr", "topk")
    ids, rows = make_rows("topk", 12, seed=1)
    entry.write_shard(0, ids, rows, vocab_size=VOCAB)
    path = tmp_path / "entries" / entry.key / "shards" / "shard-00000.zarr.zip"
    with zipfile.ZipFile(path) as zf:
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())
    group = zarr.open_group(zarr.storage.ZipStore(str(path), mode="r"), mode="r")
    np.testing.assert_array_equal(group["sample_id"][:], ids)
    assert group["offsets"].shape == (13,) and group.attrs["kdcache"]["kind"] == "topk"
    np.testing.assert_array_equal(group["ids"][:], rows.ids_BS.numpy().reshape(-1))


def test_parquet_avoids_list_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    for kind in ("dense", "sampled"):
        entry = make_entry(str(tmp_path), "parquet", kind)
        ids, rows = make_rows(kind, 12, seed=1)
        entry.write_shard(0, ids, rows, vocab_size=VOCAB)
        path = tmp_path / "entries" / entry.key / "shards" / "shard-00000.parquet"
        schema_ = pq.read_schema(path)
        assert not any(pa.types.is_nested(f.type) for f in schema_)
        if kind == "dense":
            assert pa.types.is_fixed_size_binary(schema_.field("scaled_logits").type)
        else:
            assert pa.types.is_binary(schema_.field("values").type)


def test_shard_columns_check_catches_inconsistent_offsets():
    cols = ShardColumns(
        np.arange(2, dtype=np.int64),
        entries={"ids": np.arange(3, dtype=np.int32)},
        offsets_N1=np.array([0, 2, 5]),
    )
    with pytest.raises(CacheCorruptError, match="offsets say 5"):
        cols.check("here")


def test_target_spec_params_validated_and_dense_keys_unchanged():
    dense = TargetSpec(4.0)
    assert dense.to_json() == {
        "temperature": 4.0,
        "kind": "dense",
        "storage_dtype": "float32",
        "backend": "arrow",
    }
    topk = TargetSpec(4.0, kind="topk", params={"k": 64, "grid_temperatures": [1, 2]})
    assert topk.param("k") == 64 and topk.grid_temperatures == (1.0, 2.0)
    assert TargetSpec.from_json(topk.to_json()) == topk
    with pytest.raises(ConfigError, match="missing"):
        TargetSpec(4.0, kind="topk")
    with pytest.raises(ConfigError, match="unknown"):
        TargetSpec(4.0, kind="topk", params={"k": 3, "kk": 1})
    with pytest.raises(ConfigError, match="top_p"):
        TargetSpec(4.0, kind="topp", params={"top_p": 1.5, "max_k": 3})
    with pytest.raises(ConfigError, match="no params"):
        TargetSpec(4.0, params={"k": 3})
    with pytest.raises(ConfigError, match="backend"):
        TargetSpec(4.0, backend="hdf5")
