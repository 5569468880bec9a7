"""The teacher stage on a real local Ray: actor loss is retried, teacher errors are fatal, a
RayExecutor keeps its actors between builds and close() kills them."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

import kdcache
from kdcache.errors import TeacherOutputError
from kdcache.executors import ExecutorConfig, RayExecutor
from kdcache.stores.admin import verify
from kdcache.testing import CrashOnce, NaNAt, linear_teacher, toy_dataset

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def local_ray():
    # address="local": a fresh cluster even if another one runs on this machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def test_actor_killed_mid_shard_still_yields_every_id_once(local_ray, root, tmp_path):
    ds = toy_dataset(num_records=80, num_shards=8)
    victim = ds.read_shard(5)["inputs"][3]
    inner = linear_teacher().module
    crashing = kdcache.Teacher.from_module(
        CrashOnce(inner, float(victim[0]), str(tmp_path / "crashed")), name="crashy"
    )
    cache = kdcache.build_cache(
        ds,
        [crashing, linear_teacher(seed=1)],
        temperature=2.0,
        root=root,
        executor=ExecutorConfig(num_actors=2),
        progress=False,
    )
    assert os.path.exists(tmp_path / "crashed")  # the fault really fired
    result = verify(cache)
    assert result.ok, result.problems
    assert result.checked_rows == 160
    ids = np.concatenate([cache.read_shard(i)[0] for i in range(8)])
    assert sorted(ids.tolist()) == sorted(ds.sample_ids.tolist())


def test_teacher_nan_fails_the_job_naming_the_sample(local_ray, root):
    ds = toy_dataset(num_records=40, num_shards=4)
    bad = ds.read_shard(3)["inputs"][2]
    teacher = kdcache.Teacher.from_module(
        NaNAt(linear_teacher().module, float(bad[0])), name="nanny"
    )
    with pytest.raises(TeacherOutputError, match=r"'nanny'.*sample_id 1032"):
        kdcache.build_cache(
            ds,
            teacher,
            temperature=1.0,
            root=root,
            executor=ExecutorConfig(num_actors=1),
            progress=False,
        )


def test_ray_and_local_executors_write_identical_shards(local_ray, tmp_path):
    ds = toy_dataset()
    t = linear_teacher()
    a = kdcache.build_cache(
        ds, t, temperature=2.0, root=str(tmp_path / "a"), executor="ray", progress=False
    )
    b = kdcache.build_cache(
        ds, t, temperature=2.0, root=str(tmp_path / "b"), executor="local", progress=False
    )
    assert a.key == b.key
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]


def _pid(actor) -> int:
    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=60)


def _killed(actor, timeout_s: float = 30.0) -> bool:
    """Whether calls to ``actor`` fail as a dead actor's do, within ``timeout_s`` (``ray.kill``
    is asynchronous: a call right after it may still be served)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            _pid(actor)
        except ray.exceptions.RayActorError:
            return True
        time.sleep(0.2)
    return False


def test_a_ray_executor_keeps_its_actors_between_builds_and_close_kills_them(local_ray, root):
    ex = RayExecutor(ExecutorConfig(num_actors=2))
    with ex:
        a = kdcache.build_cache(
            toy_dataset(seed=0),
            linear_teacher(),
            temperature=2.0,
            root=root,
            executor=ex,
            progress=False,
        )
        actors = ex.actors
        pids = [_pid(h) for h in actors]
        assert len(actors) == 2 and len(set(pids)) == 2
        # new data, so a real second build (not a hit), through the same executor object
        b = kdcache.build_cache(
            toy_dataset(seed=1),
            linear_teacher(),
            temperature=2.0,
            root=root,
            executor=ex,
            progress=False,
        )
        assert a.key != b.key and not b.build_report.hit and b.build_report.computed == 4
        assert ex.actors == actors  # the same actor handles (ids), no new actor started
        assert [_pid(h) for h in ex.actors] == pids  # and the same processes, still alive
        assert set(b.build_report.per_actor) == {"default/actor-0", "default/actor-1"}
        # the first build paid for starting two actor processes (seconds); the second did not
        assert b.build_report.wall_s < a.build_report.wall_s
        assert verify(b).ok
    assert ex.actors == ()
    for actor in actors:
        assert _killed(actor)
    assert ray.is_initialized()  # the fixture started Ray, so close() left it running
