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


def test_resources_a_ray_of_our_own_can_never_place_fail_fast(root, monkeypatch):
    import time

    from kdcache.errors import ConfigError

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    teacher = linear_teacher()
    teacher.resources = kdcache.TeacherResources(gpus_per_actor=1)
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"pool 'linear-0': one actor asks for 1 GPU \(the "):
        kdcache.build_cache(
            toy_dataset(num_records=40, num_shards=2), teacher, temperature=2.0, root=root,
            executor="ray", progress=False,
        )  # fmt: skip
    assert time.monotonic() - started < 60
    assert not ray.is_initialized()
