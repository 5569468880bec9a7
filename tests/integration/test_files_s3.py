"""ParquetDataset on an S3-compatible server (moto, on 127.0.0.1): plan from footers over
the network, read back, versions from ETags, changed objects, missing objects and refused
credentials (with no secret in the message)."""

from __future__ import annotations

import json
import os
import pickle
import urllib.request
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from kdcache.data import InputChangedError, ParquetDataset, open_dataset
from kdcache.errors import ConfigError, DataFileNotFoundError, RetriableError

pytestmark = pytest.mark.integration

BUCKET = "kdcache-test"  # the bucket the s3_endpoint fixture (conftest.py) creates
W = 32


def table(lo, n, seed):
    img = np.random.default_rng(seed).integers(0, 256, (n, W), dtype=np.uint8)
    return pa.table(
        {
            "id": pa.array(np.arange(lo, lo + n), pa.int64()),
            "img": pa.FixedSizeBinaryArray.from_buffers(
                pa.binary(W), n, [None, pa.py_buffer(img.tobytes())]
            ),
            "label": pa.array(np.arange(n) % 5, pa.int64()),
        }
    )


@pytest.fixture
def s3(s3_endpoint):
    """(filesystem, "bucket/prefix", "?query") for a fresh prefix holding two files."""
    fs = pafs.S3FileSystem(endpoint_override=s3_endpoint, scheme="http", region="us-east-1")
    prefix = f"{BUCKET}/{uuid.uuid4().hex[:12]}"
    pq.write_table(table(0, 40, 1), f"{prefix}/part-0.parquet", filesystem=fs, row_group_size=10)
    pq.write_table(table(40, 25, 2), f"{prefix}/part-1.parquet", filesystem=fs, row_group_size=10)
    return fs, prefix, f"?endpoint_override={s3_endpoint}&scheme=http&region=us-east-1"


def read(ds, batch_size=8):
    ids, digests = [], []
    for i in range(ds.num_shards):
        reader = ds.open_shard(i, batch_size)
        ids.extend(int(x) for b in reader for x in b["sample_id"])
        digests.append(reader.digest)
    return ids, digests


def test_parquet_on_s3_reads_back_like_a_local_copy(s3, tmp_path):
    fs, prefix, query = s3
    uri = f"s3://{prefix}{query}"
    ds = ParquetDataset(uri, id_column="id", input_columns="img", rows_per_shard=20)
    assert ds.files == ["part-0.parquet", "part-1.parquet"]
    fp = ds.fingerprint()
    assert [s["num_records"] for s in fp["shards"]] == [20, 20, 20, 5]
    assert all(isinstance(f["version"], str) and f["version"] for f in fp["files"])  # ETags
    ids, digests = read(ds)
    assert ids == list(range(65))
    # the same bytes read locally give the same content digests
    for name in ds.files:
        pafs.copy_files(f"{prefix}/{name}", str(tmp_path / name), source_filesystem=fs)
    local = ParquetDataset(tmp_path, id_column="id", input_columns="img", rows_per_shard=20)
    assert read(local)[1] == digests
    assert local.fingerprint()["shards"][0]["num_records"] == 20
    # the plan travels (to a Ray actor) as URIs, without the endpoint's filesystem object
    back = pickle.loads(pickle.dumps(ds))
    assert read(back, batch_size=3) == (ids, digests)
    listed = open_dataset(
        [f"s3://{prefix}/part-1.parquet{query}", f"s3://{prefix}/part-0.parquet{query}"],
        id_column="id",
        input_columns="img",
        label_column="label",
    )
    assert listed.files == ["part-1.parquet", "part-0.parquet"]
    assert listed.read_shard(0)["labels"].tolist() == [i % 5 for i in range(25)]
    assert "endpoint_override" not in repr(ds)


def test_a_rewritten_object_is_refused_at_read(s3):
    fs, prefix, query = s3
    ds = ParquetDataset(f"s3://{prefix}{query}", id_column="id", input_columns="img")
    pq.write_table(table(40, 25, 3), f"{prefix}/part-1.parquet", filesystem=fs, row_group_size=10)
    read_first = ds.open_shard(0, 8)
    assert len(list(read_first)) == 5 and read_first.digest
    with pytest.raises(InputChangedError, match=r"s3://.*part-1\.parquet changed.*re-plan"):
        list(ds.open_shard(1, 8))
    again = ParquetDataset(f"s3://{prefix}{query}", id_column="id", input_columns="img")
    assert again.fingerprint()["shards"][1] != ds.fingerprint()["shards"][1]
    assert again.fingerprint()["shards"][0] == ds.fingerprint()["shards"][0]


def test_missing_objects_and_refused_credentials(s3, s3_endpoint):
    _, prefix, query = s3
    with pytest.raises(DataFileNotFoundError, match=r"s3://.*nothing-here does not exist"):
        ParquetDataset(f"s3://{prefix}/nothing-here{query}", id_column="id", input_columns="img")
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]

    def no_auth_after(count):
        req = urllib.request.Request(
            f"http://{s3_endpoint}/moto-api/reset-auth",
            data=str(count).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req) as r:
            assert json.loads(r.read())["status"] == "ok"

    no_auth_after(0)  # from now on moto checks credentials, and knows none
    try:
        with pytest.raises(
            ConfigError, match=r"access to s3://.* was refused.*AWS_ACCESS_KEY_ID"
        ) as e:
            ParquetDataset(f"s3://{prefix}{query}", id_column="id", input_columns="img")
        assert secret not in str(e.value) and "endpoint_override" not in str(e.value)
    finally:
        no_auth_after("inf")


def test_an_unreachable_store_is_retriable(s3_endpoint):
    # s3_endpoint for its environment (dummy credentials, no EC2 metadata look-ups); nothing
    # listens on port 1 of 127.0.0.1, and pyarrow's retries give up within seconds.
    uri = "s3://kdcache-test/x?endpoint_override=127.0.0.1:1&scheme=http&region=us-east-1"
    with pytest.raises(RetriableError, match=r"could not read s3://kdcache-test/x .*retry"):
        ParquetDataset(uri, id_column="id", input_columns="img")
