"""The store conformance suite against an S3-compatible server on 127.0.0.1.

The server is moto's (``moto[server]``, in the ``dev`` extra), started once for this
module on a free port and stopped after. Credentials are dummies set in the environment
for the duration of the module; the endpoint travels in the root URI as pyarrow query
options, so every child location (and every pickled entry) reaches the same server.
"""

from __future__ import annotations

import logging
import os
import uuid

import numpy as np
import pytest

import kdcache
from kdcache.stores.admin import gc, verify
from kdcache.testing.store_suite import StoreSuite

pytestmark = pytest.mark.integration

BUCKET = "kdcache-test"
_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@pytest.fixture(scope="module")
def s3_endpoint():
    """``host:port`` of a moto S3 server holding an empty bucket; stopped after the module."""
    server_mod = pytest.importorskip("moto.server")
    import pyarrow.fs as pafs

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    saved = {k: os.environ.get(k) for k in _ENV}
    os.environ.update(_ENV)
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"{host}:{port}"
        pafs.S3FileSystem(
            endpoint_override=endpoint,
            scheme="http",
            region="us-east-1",
            allow_bucket_creation=True,
        ).create_dir(BUCKET)
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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
