"""File-backed input datasets (Parquet, Arrow IPC files, Hugging Face save_to_disk) and
batch transforms: what is read back, how it is sharded, fingerprinted and digested, and
the error for each kind of bad input."""

from __future__ import annotations

import importlib
import json
import os
import pickle
import sys

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest

from kdcache.data import (
    ArrowDataset,
    HFDiskDataset,
    InputChangedError,
    ParquetDataset,
    Transform,
    open_dataset,
)
from kdcache.data.base import StreamingDataset, open_shard, read_shard_checked
from kdcache.data.files import ID_FILE_STRIDE
from kdcache.errors import ConfigError, DataError, DataFileNotFoundError

W = 16  # bytes per image row in these tests


# -- transforms used by the tests (importable as test_files:...) --------------------------
def scale(inputs, factor=1.0):
    return inputs.astype(np.float32) * factor


def add_one(inputs):
    return inputs + 1


def broken(inputs):
    raise RuntimeError("boom")


def drop_row(inputs):
    return inputs[1:]


# -- writers ------------------------------------------------------------------------------
def images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, W), dtype=np.uint8)


def image_table(ids, img, labels=None):
    cols = {
        "id": pa.array(ids, pa.int64()),
        "img": pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(img.shape[1]), len(img), [None, pa.py_buffer(img.tobytes())]
        ),
    }
    if labels is not None:
        cols["label"] = pa.array(labels, pa.int64())
    return pa.table(cols)


def write_parquet(path, table, row_group_size=10):
    # Uncompressed, no dictionary: one changed byte in the file is one changed input byte.
    pq.write_table(
        table, path, row_group_size=row_group_size, compression="none", use_dictionary=False
    )


def write_arrow(path, table, chunk=10):
    with ipc.new_file(str(path), table.schema) as w:
        for b in table.to_batches(max_chunksize=chunk):
            w.write_batch(b)


def write_hf_by_hand(directory, table, chunk=10, num_files=2):
    """The layout Dataset.save_to_disk writes: Arrow IPC streams + state.json."""
    os.makedirs(directory, exist_ok=True)
    bounds = np.linspace(0, table.num_rows, num_files + 1).astype(int)
    names = []
    for k in range(num_files):
        name = f"data-{k:05d}-of-{num_files:05d}.arrow"
        part = table.slice(bounds[k], bounds[k + 1] - bounds[k])
        with ipc.new_stream(os.path.join(directory, name), table.schema) as w:
            for b in part.to_batches(max_chunksize=chunk):
                w.write_batch(b)
        names.append(name)
    state = {
        "_data_files": [{"filename": n} for n in names],
        "_fingerprint": "0123456789abcdef",
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    with open(os.path.join(directory, "state.json"), "w") as f:
        json.dump(state, f)
    with open(os.path.join(directory, "dataset_info.json"), "w") as f:
        json.dump({"citation": "", "description": "", "features": {}}, f)


def read_all(ds, batch_size=7):
    parts, digests = [], []
    for i in range(ds.num_shards):
        reader = ds.open_shard(i, batch_size)
        parts.extend(reader)
        digests.append(reader.digest)
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return out, digests


@pytest.fixture
def two_files(tmp_path):
    """Two Parquet files of 30 + 20 rows (row groups of 10), ids 100.., labels."""
    img = images(50)
    ids = np.arange(100, 150)
    labels = np.arange(50) % 10
    d = tmp_path / "pq"
    d.mkdir()
    write_parquet(d / "a.parquet", image_table(ids[:30], img[:30], labels[:30]))
    write_parquet(d / "b.parquet", image_table(ids[30:], img[30:], labels[30:]))
    return d, ids, img, labels


# -- reading back -------------------------------------------------------------------------
def test_parquet_reads_back_what_was_written(two_files):
    d, ids, img, labels = two_files
    ds = ParquetDataset(
        d, id_column="id", input_columns="img", label_column="label", input_shape=(4, 4)
    )
    assert isinstance(ds, StreamingDataset) and ds.layout == "records"
    assert ds.files == ["a.parquet", "b.parquet"] and len(ds) == 50
    out, digests = read_all(ds)
    np.testing.assert_array_equal(out["sample_id"], ids)
    assert out["sample_id"].dtype == np.int64 and out["labels"].dtype == np.int64
    assert out["inputs"].dtype == np.uint8 and out["inputs"].shape == (50, 4, 4)
    np.testing.assert_array_equal(out["inputs"].reshape(50, W), img)
    np.testing.assert_array_equal(out["labels"], labels)
    assert all(isinstance(x, str) and x.startswith("xxh3_128:") and len(x) == 41 for x in digests)
    shard = ds.read_shard(0)
    np.testing.assert_array_equal(shard["sample_id"], ids[:30])


def test_one_file_a_list_of_files_and_file_uris(two_files):
    d, ids, _, _ = two_files
    one = ParquetDataset(d / "b.parquet", id_column="id", input_columns="img")
    assert one.files == ["b.parquet"]
    np.testing.assert_array_equal(read_all(one)[0]["sample_id"], ids[30:])
    listed = ParquetDataset(
        [f"file://{d / 'b.parquet'}", str(d / "a.parquet")], id_column="id", input_columns="img"
    )
    assert listed.files == ["b.parquet", "a.parquet"]  # the order given
    np.testing.assert_array_equal(
        read_all(listed)[0]["sample_id"], np.concatenate([ids[30:], ids[:30]])
    )


def test_arrow_file_reads_back_fixed_size_lists(tmp_path):
    x = np.random.default_rng(1).normal(size=(45, 6)).astype(np.float32)
    table = pa.table(
        {
            "id": pa.array(np.arange(45) * 3, pa.int32()),
            "x": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 6),
            "y": pa.array(np.arange(45) % 4, pa.int8()),
        }
    )
    write_arrow(tmp_path / "a.arrow", table, chunk=10)
    write_arrow(tmp_path / "b.feather", table.slice(0, 5), chunk=10)
    ds = ArrowDataset(tmp_path / "a.arrow", id_column="id", input_columns="x", label_column="y")
    assert ds.fingerprint()["shards"][0]["record_batches"] == [0, 5]
    out, _ = read_all(ds)
    np.testing.assert_array_equal(out["sample_id"], np.arange(45) * 3)
    assert out["sample_id"].dtype == np.int64 and out["inputs"].dtype == np.float32
    np.testing.assert_array_equal(out["inputs"], x)
    np.testing.assert_array_equal(out["labels"], np.arange(45) % 4)
    both = ArrowDataset(tmp_path, id_column=None, input_columns="x", input_shape=(2, 3))
    assert both.files == ["a.arrow", "b.feather"]
    assert read_all(both)[0]["inputs"].shape == (50, 2, 3)


def test_hf_layout_written_by_hand_reads_back(tmp_path):
    img = images(37)
    table = image_table(np.arange(37) + 5, img, np.arange(37) % 3)
    write_hf_by_hand(tmp_path / "hf", table, chunk=8, num_files=2)
    ds = HFDiskDataset(tmp_path / "hf", id_column="id", input_columns="img", label_column="label")
    assert ds.files == ["data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]
    assert ds.fingerprint()["format"] == "hf"
    out, _ = read_all(ds, batch_size=5)
    np.testing.assert_array_equal(out["sample_id"], np.arange(37) + 5)
    np.testing.assert_array_equal(out["inputs"], img)
    np.testing.assert_array_equal(out["labels"], np.arange(37) % 3)
    small = HFDiskDataset(tmp_path / "hf", id_column="id", input_columns="img", rows_per_shard=8)
    assert [s["num_records"] for s in small.fingerprint()["shards"]] == [8, 8, 2, 8, 8, 3]
    assert read_all(small, batch_size=3)[0]["sample_id"].tolist() == list(range(5, 42))


def test_hf_dataset_written_by_datasets_reads_back(tmp_path):
    datasets = pytest.importorskip("datasets")
    x = np.random.default_rng(2).normal(size=(30, 4)).astype(np.float32)
    features = datasets.Features(
        {
            "x": datasets.Sequence(datasets.Value("float32"), length=4),
            "text": datasets.Value("string"),
            "label": datasets.ClassLabel(num_classes=3),
        }
    )
    data = {
        "x": list(x),
        "text": [f"row {i}" for i in range(30)],
        "label": [i % 3 for i in range(30)],
    }
    hf = datasets.Dataset.from_dict(data, features=features)
    hf.save_to_disk(str(tmp_path / "ds"), num_shards=3)
    ds = HFDiskDataset(tmp_path / "ds", id_column=None, input_columns="x", label_column="label")
    out, _ = read_all(ds)
    np.testing.assert_allclose(out["inputs"], x)
    assert out["labels"].tolist() == [i % 3 for i in range(30)]
    # derived ids: file index * 2**40 + row in file
    assert out["sample_id"][:10].tolist() == list(range(10))
    assert out["sample_id"][10] == ID_FILE_STRIDE
    text = HFDiskDataset(tmp_path / "ds", id_column=None, input_columns="text")
    texts = read_all(text)[0]["inputs"]
    assert texts.dtype == object and texts[3] == "row 3"
    dd = datasets.DatasetDict({"train": hf, "test": hf})
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"DatasetDict with splits train, test.*dd/train"):
        HFDiskDataset(tmp_path / "dd", id_column=None, input_columns="x")


def test_decoding_rules(tmp_path):
    n = 12
    table = pa.table(
        {
            "id": pa.array(np.arange(n), pa.int64()),
            "a": pa.array(np.arange(n, dtype=np.float32)),
            "b": pa.array(np.arange(n, dtype=np.int16)),
            "blob": pa.array([bytes([i]) * (i % 3 + 1) for i in range(n)], pa.binary()),
            "seq": pa.array([list(range(i % 4)) for i in range(n)], pa.list_(pa.int32())),
            "grid": pa.FixedSizeListArray.from_arrays(
                pa.FixedSizeListArray.from_arrays(pa.array(np.arange(n * 6, dtype=np.int64)), 3),
                2,
            ),
            "label": pa.array([None if i == 4 else i % 2 for i in range(n)], pa.int32()),
        }
    )
    write_parquet(tmp_path / "t.parquet", table, row_group_size=5)
    path = tmp_path / "t.parquet"

    def inputs(**kw):
        return read_all(ParquetDataset(path, id_column="id", **kw), batch_size=4)[0]

    one = inputs(input_columns="a", label_column="label")
    assert one["inputs"].shape == (n,) and one["inputs"].dtype == np.float32
    assert one["labels"][4] == -100 and one["labels"][5] == 1  # a null label is "no label"
    stacked = inputs(input_columns=["a", "b"])["inputs"]
    assert stacked.shape == (n, 2) and stacked.dtype == np.float32
    np.testing.assert_array_equal(stacked[:, 1], np.arange(n))
    blob = inputs(input_columns="blob")["inputs"]
    assert blob.dtype == object and blob[5] == b"\x05\x05\x05"
    seq = inputs(input_columns="seq")["inputs"]
    assert seq.dtype == object and list(seq[3]) == [0, 1, 2]
    grid = inputs(input_columns="grid")["inputs"]
    assert grid.shape == (n, 2, 3) and grid.dtype == np.int64
    np.testing.assert_array_equal(grid.reshape(-1), np.arange(n * 6))
    assert inputs(input_columns="grid", input_shape=(6,))["inputs"].shape == (n, 6)


def test_batches_are_bounded_and_exact(two_files):
    d, *_ = two_files
    ds = ParquetDataset(d, id_column="id", input_columns="img", rows_per_shard=20)
    assert [s["num_records"] for s in ds.fingerprint()["shards"]] == [20, 10, 20]
    sizes = [len(b["sample_id"]) for b in ds.open_shard(0, 7)]
    assert sizes == [7, 7, 6]  # exactly batch_size except the last, across row groups
    assert [len(b["sample_id"]) for b in open_shard(ds, 1, 100)] == [10]
    inputs = next(iter(ds.open_shard(0, 7)))["inputs"]
    assert not inputs.flags.writeable  # views of what was read, never copies to mutate
    with pytest.raises(ConfigError, match="batch_size"):
        ds.open_shard(0, 0)
    with pytest.raises(IndexError):
        ds.open_shard(3, 4)


def test_sharding_default_and_rows_per_shard(tmp_path):
    img = images(100)
    write_parquet(tmp_path / "a.parquet", image_table(np.arange(100), img), row_group_size=10)
    ds = ParquetDataset(tmp_path, id_column="id", input_columns="img")
    assert ds.num_shards == 1  # small files: one shard per file (never more than a file)
    fp = ds.fingerprint()["shards"]
    assert fp == [
        {
            "num_records": 100,
            "file": "a.parquet",
            "row_groups": [0, 10],
            "size": os.path.getsize(tmp_path / "a.parquet"),
            "version": os.stat(tmp_path / "a.parquet").st_mtime_ns,
        }
    ]
    assert [
        s["num_records"]
        for s in ParquetDataset(
            tmp_path, id_column="id", input_columns="img", rows_per_shard=33
        ).fingerprint()["shards"]
    ] == [30, 30, 30, 10]  # each run as near 33 as whole row groups allow
    tiny = ParquetDataset(tmp_path, id_column="id", input_columns="img", rows_per_shard=1)
    assert tiny.num_shards == 10  # a row group is never split


def test_digests_are_stable_across_reads_batch_sizes_and_pickling(two_files):
    d, *_ = two_files
    ds = ParquetDataset(d, id_column="id", input_columns="img", rows_per_shard=20)
    first = read_all(ds, batch_size=3)[1]
    assert len(set(first)) == ds.num_shards
    assert read_all(ds, batch_size=3)[1] == first
    assert read_all(ds, batch_size=64)[1] == first  # independent of the batch size
    assert [read_shard_checked(ds, i)[1] for i in range(ds.num_shards)] == first
    assert read_all(pickle.loads(pickle.dumps(ds)), batch_size=5)[1] == first
    assert read_all(ds.with_transform(Transform.of(add_one)))[1] == first  # before the transform
    # labels are not part of the digest (as for ArrayDataset's fingerprint)
    with_labels = ParquetDataset(
        d, id_column="id", input_columns="img", label_column="label", rows_per_shard=20
    )
    assert read_all(with_labels)[1] == first
    assert with_labels.fingerprint() == ds.fingerprint()


def test_a_digest_is_not_cut_short(two_files):
    d, *_ = two_files
    ds = ParquetDataset(d, id_column="id", input_columns="img")
    reader = ds.open_shard(0, 4)
    it = iter(reader)
    next(it)
    it.close()
    assert reader.digest is None  # only a shard read to its end has a digest


def _flip_byte_of_row(path, row_bytes):
    data = bytearray(path.read_bytes())
    at = data.find(row_bytes)
    assert at >= 0 and data.find(row_bytes, at + 1) < 0
    data[at + 3] ^= 0xFF
    stat = os.stat(path)
    path.write_bytes(bytes(data))
    return stat


def test_one_changed_byte_same_size_same_mtime_changes_that_shard_digest_only(two_files):
    d, _, img, _ = two_files
    ds = ParquetDataset(d, id_column="id", input_columns="img", rows_per_shard=10)
    fp, digests = ds.fingerprint(), read_all(ds)[1]
    stat = _flip_byte_of_row(d / "b.parquet", img[42].tobytes())  # b.parquet, shard 4
    os.utime(d / "b.parquet", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again = ParquetDataset(d, id_column="id", input_columns="img", rows_per_shard=10)
    assert again.fingerprint() == fp  # sizes and versions are what the plan trusts
    new_digests = read_all(again)[1]
    assert [i for i in range(5) if new_digests[i] != digests[i]] == [4]


def test_one_changed_byte_with_new_mtime_changes_that_files_shards_only(two_files):
    d, _, img, _ = two_files
    old = ParquetDataset(d, id_column="id", input_columns="img", rows_per_shard=10)
    fp = old.fingerprint()
    stat = _flip_byte_of_row(d / "b.parquet", img[42].tobytes())
    os.utime(d / "b.parquet", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    new = ParquetDataset(d, id_column="id", input_columns="img", rows_per_shard=10)
    changed = [
        i
        for i, (a, b) in enumerate(zip(fp["shards"], new.fingerprint()["shards"], strict=True))
        if a != b
    ]
    assert changed == [3, 4]  # the shards of b.parquet; a.parquet's are untouched
    assert new.fingerprint() != fp
    list(old.open_shard(0, 8))  # a.parquet did not change: the old plan still reads it
    with pytest.raises(InputChangedError, match=r"b\.parquet changed.*re-plan"):
        list(old.open_shard(4, 8))


def test_changed_size_is_refused_at_read(two_files):
    d, ids, img, labels = two_files
    ds = ParquetDataset(d, id_column="id", input_columns="img")
    write_parquet(d / "a.parquet", image_table(ids[:29], img[:29], labels[:29]))
    with pytest.raises(InputChangedError, match=r"a\.parquet changed after the dataset"):
        list(ds.open_shard(0, 8))
    with pytest.raises(DataFileNotFoundError, match=r"b\.parquet"):
        os.unlink(d / "b.parquet")
        list(ds.open_shard(1, 8))


def test_the_plan_reads_no_data(two_files, monkeypatch):
    d, *_ = two_files

    def no(*a, **k):
        raise AssertionError("data read while planning")

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", no)
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", no)
    monkeypatch.setattr(pq.ParquetFile, "read", no)
    ds = ParquetDataset(d, id_column="id", input_columns="img")
    assert ds.fingerprint()["num_records"] == 50


def test_pickles_small_and_holds_no_records(tmp_path):
    img = images(2000, seed=7)
    write_parquet(tmp_path / "a.parquet", image_table(np.arange(2000), img), row_group_size=100)
    ds = ParquetDataset(tmp_path, id_column="id", input_columns="img", rows_per_shard=500)
    ds.fingerprint()
    blob = pickle.dumps(ds)
    assert len(blob) < 4096, len(blob)
    assert img[123].tobytes() not in blob and img[1999, :8].tobytes() not in blob
    back = pickle.loads(blob)
    assert back.fingerprint() == ds.fingerprint()
    np.testing.assert_array_equal(back.read_shard(3)["inputs"], img[1500:])


# -- transforms ---------------------------------------------------------------------------
def test_transforms_apply_and_change_the_top_level_fingerprint_only(two_files):
    d, _, img, _ = two_files
    plain = ParquetDataset(d, id_column="id", input_columns="img", rows_per_shard=10)
    scaled = ParquetDataset(
        d,
        id_column="id",
        input_columns="img",
        rows_per_shard=10,
        transform=Transform("test_files:scale", {"factor": 0.5}),
    )
    out = read_all(scaled)[0]["inputs"]
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, img.astype(np.float32) * 0.5)
    fp, fp0 = scaled.fingerprint(), plain.fingerprint()
    assert fp["shards"] == fp0["shards"] and fp != fp0 and fp0["transform"] is None
    (t,) = fp["transform"]
    assert t["fn"] == "test_files:scale" and t["kwargs"] == {"factor": 0.5}
    assert len(t["source_sha256"]) == 64
    other = plain.with_transform(Transform("test_files:scale", {"factor": 2.0}))
    assert other.fingerprint()["transform"] != fp["transform"]
    assert other.fingerprint()["shards"] == fp0["shards"]
    assert scaled.without_transform().fingerprint() == fp0
    chain = plain.with_transform([Transform.of(add_one), "test_files:scale"])
    np.testing.assert_array_equal(
        read_all(chain)[0]["inputs"],
        (img + 1).astype(np.float32),  # uint8 wraps, as numpy does
    )
    assert [x["fn"] for x in chain.fingerprint()["transform"]] == [
        "test_files:add_one",
        "test_files:scale",
    ]


def test_transform_source_is_part_of_the_fingerprint(tmp_path, monkeypatch):
    mod = tmp_path / "kd_tf_mod.py"
    mod.write_text("def tf(x):\n    return x * 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    first = Transform("kd_tf_mod:tf").fingerprint()
    mod.write_text("def tf(x):\n    return x * 3\n")
    importlib.reload(importlib.import_module("kd_tf_mod"))
    second = Transform("kd_tf_mod:tf").fingerprint()
    assert first["source_sha256"] != second["source_sha256"]
    sys.modules.pop("kd_tf_mod", None)
    builtin = Transform("numpy:ascontiguousarray").fingerprint()
    assert builtin["source_sha256"] is None and builtin["version"] == np.__version__


def test_transform_pickles_as_its_path():
    t = Transform("test_files:scale", {"factor": 3.0})
    assert t.resolve() is scale
    blob = pickle.dumps(t)
    assert b"test_files" in blob and len(blob) < 200
    back = pickle.loads(blob)
    assert back == t and "_resolved" not in back.__dict__


def test_transform_mistakes(two_files):
    d, *_ = two_files
    with pytest.raises(ConfigError, match="no import path"):
        Transform.of(lambda x: x)
    with pytest.raises(ConfigError, match="JSON-able"):
        Transform("test_files:scale", {"factor": np.float32(1.0)})
    with pytest.raises(ConfigError, match="import path"):
        Transform(scale)  # type: ignore[arg-type]
    ds = ParquetDataset(d, id_column="id", input_columns="img", transform="test_files:broken")
    with pytest.raises(DataError, match=r"'test_files:broken'.*shard 0 .*a\.parquet.*boom"):
        list(ds.open_shard(0, 8))
    short = ds.with_transform("test_files:drop_row")
    with pytest.raises(DataError, match=r"drop_row.*shape \(7, 16\).*batch of 8 rows.*shard 0"):
        list(short.open_shard(0, 8))
    with pytest.raises(ConfigError, match="nope"):
        ds.with_transform("test_files:nope").fingerprint()


# -- ids ----------------------------------------------------------------------------------
def test_derived_ids_follow_file_order(two_files):
    d, *_ = two_files
    ds = ParquetDataset(d, id_column=None, input_columns="img")
    got = read_all(ds)[0]["sample_id"]
    want = np.concatenate([np.arange(30), ID_FILE_STRIDE + np.arange(20)])
    np.testing.assert_array_equal(got, want)
    assert ds.fingerprint()["columns"]["id"] is None


def test_duplicate_ids_in_one_file_are_refused(tmp_path):
    img = images(30)
    ids = np.arange(30)
    ids[17] = 3  # the same shard when one shard; another shard when cut in three
    write_parquet(tmp_path / "dup.parquet", image_table(ids, img))
    write_parquet(tmp_path / "ok.parquet", image_table(np.arange(30), img))  # ids repeat across
    ds = ParquetDataset(tmp_path, id_column="id", input_columns="img")
    with pytest.raises(DataError, match=r"sample id 3 appears more than once in .*dup\.parquet"):
        list(ds.open_shard(0, 8))
    list(ds.open_shard(1, 8))  # files may share ids with each other
    split = ParquetDataset(
        tmp_path / "dup.parquet", id_column="id", input_columns="img", rows_per_shard=10
    )
    with pytest.raises(DataError, match=r"sample id 3 .*shard 1 .*shard 0 "):
        list(split.open_shard(1, 8))
    with pytest.raises(DataError, match=r"sample id 3"):
        list(split.open_shard(0, 8))
    list(split.open_shard(2, 8))  # statistics show ids 20..29 cannot collide
    write_arrow(tmp_path / "dup.arrow", image_table(ids, img))
    arrow = ArrowDataset(
        tmp_path / "dup.arrow", id_column="id", input_columns="img", rows_per_shard=10
    )
    with pytest.raises(DataError, match=r"sample id 3 .*dup\.arrow"):
        list(arrow.open_shard(0, 8))


def test_null_ids_and_inputs_are_refused_at_read(tmp_path):
    table = pa.table({"id": pa.array([1, None, 3], pa.int64()), "x": [1.0, 2.0, None]})
    pq.write_table(table, tmp_path / "n.parquet")
    with pytest.raises(DataError, match=r"null ids in shard 0 \(.*n\.parquet"):
        ParquetDataset(tmp_path, id_column="id", input_columns="x").read_shard(0)
    with pytest.raises(DataError, match=r"input column 'x' has null values"):
        ParquetDataset(tmp_path, id_column=None, input_columns="x").read_shard(0)


# -- bad input ----------------------------------------------------------------------------
def test_missing_column_lists_the_columns(two_files):
    d, *_ = two_files
    with pytest.raises(DataError, match=r"a\.parquet has no column 'image'.*id, img, label"):
        ParquetDataset(d, id_column="id", input_columns="image")
    with pytest.raises(DataError, match=r"no column 'sid' \(given as id_column\)"):
        ParquetDataset(d, id_column="sid", input_columns="img")


def test_wrong_column_types(tmp_path):
    table = pa.table(
        {
            "fid": [0.0, 1.0],
            "id": [0, 1],
            "x": [1.0, 2.0],
            "s": ["cat", "dog"],
            "st": pa.array([{"a": 1}, {"a": 2}]),
        }
    )
    pq.write_table(table, tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"'fid' \(id_column\) of .*t\.parquet is double.*integer"):
        ParquetDataset(tmp_path, id_column="fid", input_columns="x")
    with pytest.raises(DataError, match=r"'s' \(label_column\).*is string.*class ids"):
        ParquetDataset(tmp_path, id_column="id", input_columns="x", label_column="s")
    with pytest.raises(DataError, match=r"input column 'st' .*struct.*cannot decode"):
        ParquetDataset(tmp_path, id_column="id", input_columns="st")
    with pytest.raises(ConfigError, match=r"must all be numeric scalars"):
        ParquetDataset(tmp_path, id_column="id", input_columns=["x", "s"])
    with pytest.raises(ConfigError, match=r"input_shape=\(3,\) holds 3 values per row.*give 1"):
        ParquetDataset(tmp_path, id_column="id", input_columns="x", input_shape=(3,))
    with pytest.raises(ConfigError, match=r"rows vary in length"):
        ParquetDataset(tmp_path, id_column="id", input_columns="s", input_shape=(3,))


def test_input_types_must_agree_across_files(tmp_path):
    pq.write_table(
        pa.table({"id": [0], "x": pa.array([1.0], pa.float64())}), tmp_path / "a.parquet"
    )
    pq.write_table(
        pa.table({"id": [0], "x": pa.array([1.0], pa.float32())}), tmp_path / "b.parquet"
    )
    with pytest.raises(DataError, match=r"'x' is float in .*b\.parquet but double in .*a\.parquet"):
        ParquetDataset(tmp_path, id_column="id", input_columns="x")


def test_unreadable_truncated_and_empty_files(two_files, tmp_path):
    d, *_ = two_files
    data = (d / "b.parquet").read_bytes()
    (d / "b.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"b\.parquet is not a readable Parquet file"):
        ParquetDataset(d, id_column="id", input_columns="img")
    (d / "b.parquet").write_text("id,img\n1,2\n")
    with pytest.raises(DataError, match=r"b\.parquet is not a readable Parquet file.*rewrite"):
        ParquetDataset(d, id_column="id", input_columns="img")
    pq.write_table(image_table(np.arange(0), images(0)), d / "b.parquet")
    with pytest.raises(DataError, match=r"b\.parquet has no rows"):
        ParquetDataset(d, id_column="id", input_columns="img")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "_SUCCESS").write_text("")
    with pytest.raises(DataError, match=r"empty holds no \*\.parquet"):
        ParquetDataset(tmp_path / "empty", id_column="id", input_columns="img")
    with pytest.raises(DataFileNotFoundError, match="nowhere"):
        ParquetDataset(tmp_path / "nowhere", id_column="id", input_columns="img")
    with pytest.raises(ConfigError, match="empty list"):
        ParquetDataset([], id_column="id", input_columns="img")
    (tmp_path / "junk.arrow").write_bytes(b"not arrow at all")
    with pytest.raises(DataError, match=r"junk\.arrow is not an Arrow IPC file"):
        ArrowDataset(tmp_path / "junk.arrow", id_column=None, input_columns="img")


def test_corrupt_data_is_refused_at_read(tmp_path):
    img = images(40)
    pq.write_table(image_table(np.arange(40), img), tmp_path / "c.parquet", row_group_size=40)
    ds = ParquetDataset(tmp_path, id_column="id", input_columns="img")
    data = bytearray((tmp_path / "c.parquet").read_bytes())
    stat = os.stat(tmp_path / "c.parquet")
    data[4:400] = bytes(396)  # the first pages' headers and snappy data
    (tmp_path / "c.parquet").write_bytes(bytes(data))
    os.utime(tmp_path / "c.parquet", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(DataError, match=r"c\.parquet is not a readable Parquet file .*shard 0"):
        list(ds.open_shard(0, 8))


def test_hf_directory_mistakes(tmp_path):
    table = image_table(np.arange(10), images(10))
    write_hf_by_hand(tmp_path / "hf", table, num_files=1)
    (tmp_path / "dd").mkdir()
    (tmp_path / "dd" / "dataset_dict.json").write_text('{"splits": ["train", "validation"]}')
    with pytest.raises(DataError, match=r"DatasetDict with splits train, validation"):
        HFDiskDataset(tmp_path / "dd", id_column=None, input_columns="img")
    with pytest.raises(DataError, match=r"no state\.json"):
        HFDiskDataset(tmp_path, id_column=None, input_columns="img")
    with pytest.raises(DataError, match=r"Arrow IPC stream.*HFDiskDataset"):
        ArrowDataset(tmp_path / "hf", id_column=None, input_columns="img")


def test_argument_mistakes(two_files):
    d, *_ = two_files
    with pytest.raises(ConfigError, match="rows_per_shard"):
        ParquetDataset(d, id_column="id", input_columns="img", rows_per_shard=0)
    with pytest.raises(ConfigError, match="input_columns"):
        ParquetDataset(d, id_column="id", input_columns=[])
    with pytest.raises(ConfigError, match="input_shape"):
        ParquetDataset(d, id_column="id", input_columns="img", input_shape=(0, 4))
    with pytest.raises(ConfigError, match="format must be one of"):
        open_dataset(d, format="csv", id_column="id", input_columns="img")


def test_open_dataset_picks_the_format(two_files, tmp_path):
    d, *_ = two_files
    kw = {"id_column": "id", "input_columns": "img"}
    assert type(open_dataset(d, **kw)) is ParquetDataset
    assert type(open_dataset(str(d / "a.parquet"), **kw)) is ParquetDataset
    table = image_table(np.arange(10), images(10))
    write_arrow(tmp_path / "x.arrow", table)
    assert type(open_dataset(tmp_path / "x.arrow", **kw)) is ArrowDataset
    write_hf_by_hand(tmp_path / "hf", table, num_files=1)
    assert type(open_dataset(tmp_path / "hf", **kw)) is HFDiskDataset
    assert type(open_dataset(tmp_path / "hf", format="hf", **kw)) is HFDiskDataset
    (tmp_path / "data.csv").write_text("a\n")
    with pytest.raises(ConfigError, match=r"cannot tell the format.*format='parquet'"):
        open_dataset(tmp_path / "data.csv", **kw)


def test_module_docstring_example_runs():
    import doctest

    import kdcache.data.files as files
    import kdcache.data.transforms as transforms

    for mod in (files, transforms):
        result = doctest.testmod(mod, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert result.failed == 0 and result.attempted > 0, mod.__name__


def test_fingerprint_layout(two_files):
    d, *_ = two_files
    ds = ParquetDataset(
        d, id_column="id", input_columns="img", input_shape=(4, 4), rows_per_shard=10
    )
    fp = ds.fingerprint()
    assert fp is ds.fingerprint()  # memoised
    assert set(fp) == {"format", "columns", "transform", "num_records", "files", "shards"}
    assert fp["columns"] == {
        "id": "id",
        "inputs": ["img"],
        "input_types": [f"fixed_size_binary[{W}]"],
        "input_shape": [4, 4],
    }
    assert [f["name"] for f in fp["files"]] == ["a.parquet", "b.parquet"]
    assert fp["files"][1]["num_row_groups"] == 2 and fp["files"][1]["num_records"] == 20
    assert sum(s["num_records"] for s in fp["shards"]) == fp["num_records"] == 50
    assert fp["shards"][3] == {
        "num_records": 10,
        "file": "b.parquet",
        "row_groups": [0, 1],
        "size": fp["files"][1]["size"],
        "version": fp["files"][1]["version"],
    }
    json.dumps(fp)


def keep_even_ids(labels, sample_ids, *, sentinel=-100):
    return np.where(sample_ids % 2 == 0, labels, sentinel)


def bad_label_transform(labels, sample_ids):
    return labels[:-1]


def test_label_transform_changes_labels_only_never_a_fingerprint(two_files):
    d, ids, _, labels = two_files
    common = {"id_column": "id", "input_columns": "img", "label_column": "label"}
    plain = ParquetDataset(d, **common)
    masked = ParquetDataset(d, **common, label_transform=Transform("test_files:keep_even_ids"))
    out, digests = read_all(masked)
    np.testing.assert_array_equal(out["labels"], np.where(ids % 2 == 0, labels, -100))
    assert masked.fingerprint() == plain.fingerprint()  # labels are in no fingerprint
    assert digests == read_all(plain)[1]
    copy = pickle.loads(pickle.dumps(masked))
    np.testing.assert_array_equal(read_all(copy)[0]["labels"], out["labels"])
    with pytest.raises(ConfigError, match="label_transform needs a label_column"):
        ParquetDataset(d, id_column="id", input_columns="img", label_transform="test_files:x")
    bad = ParquetDataset(d, **common, label_transform="test_files:bad_label_transform")
    with pytest.raises(DataError, match=r"bad_label_transform' returned int64 \(\d+,\).*expected"):
        read_all(bad)
