"""The store conformance suite against an S3-compatible server on 127.0.0.1.

The server is moto's (``moto[server]``, in the ``dev`` extra), started once for this
module on a free port and stopped after. Credentials are dummies set in the environment
for the duration of the module; the endpoint travels in the root URI as pyarrow query
options, so every child location (and every pickled entry) reaches the same server.
"""

from __future__ import annotations

import uuid

import numpy as np
import pytest

import kdcache
from kdcache.stores.admin import gc, verify
from kdcache.testing.store_suite import StoreSuite

pytestmark = pytest.mark.integration

BUCKET = "kdcache-test"  # the bucket the s3_endpoint fixture (conftest.py) creates


def s3_root(endpoint: str) -> str:
    prefix = uuid.uuid4().hex[:12]
    return f"s3://{BUCKET}/{prefix}?endpoint_override={endpoint}&scheme=http&region=us-east-1"


class TestS3Store(StoreSuite):
    @pytest.fixture
    def store_root(self, s3_endpoint):
        return s3_root(s3_endpoint)


def test_build_inspect_verify_gc_on_s3(s3_endpoint):
    from kdcache.testing import linear_teacher, toy_dataset

    root = s3_root(s3_endpoint)
    ds = toy_dataset()
    view = kdcache.build_cache(
        ds,
        [linear_teacher(seed=s) for s in range(2)],
        temperature=2.0,
        root=root,
        backend="parquet",
        executor="local",
        progress=False,
    )
    reopened = kdcache.open_cache(view.key, root=root)
    assert isinstance(reopened, kdcache.EnsembleView) and verify(reopened).ok
    _, vals = reopened.read_shard(1)
    np.testing.assert_array_equal(vals, view.read_shard(1)[1])
    entry = reopened.entries[0]
    entry.shards_location.write_atomic("shard-00042.parquet", b"stale")
    assert [p.rsplit("/", 1)[1] for p in gc(root).removed] == ["shard-00042.parquet"]
    assert "endpoint_override" not in entry.shards_location.display("x")
