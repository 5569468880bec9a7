"""The Ray that the teacher stage starts for itself listens on 127.0.0.1 only."""

from __future__ import annotations

import pytest
from netcheck import LOOPBACK, ListeningSockets

import kdcache
from kdcache.executors import RayExecutor
from kdcache.testing import linear_teacher, toy_dataset

ray = pytest.importorskip("ray")
pytest.importorskip("psutil")
pytestmark = pytest.mark.integration


def test_the_teacher_stages_own_ray_listens_on_loopback_only(root, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert not ray.is_initialized()
    with ListeningSockets() as sockets, RayExecutor(num_actors=1) as ex:
        cache = kdcache.build_cache(
            toy_dataset(num_records=40, num_shards=2),
            linear_teacher(),
            temperature=2.0,
            root=root,
            executor=ex,
            progress=False,
        )
        assert cache.is_complete
    assert not ray.is_initialized()  # the executor shut down the Ray it started
    names = {name for name, _, _ in sockets.seen}
    assert {"gcs_server", "raylet"} <= names, sockets.seen
    beyond = sorted(x for x in sockets.seen if x[1] not in LOOPBACK)
    assert not beyond, beyond
