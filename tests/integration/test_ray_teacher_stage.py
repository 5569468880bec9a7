"""The teacher stage on a real local Ray: actor loss is retried, teacher errors are fatal."""

from __future__ import annotations

import os

import numpy as np
import pytest

import kdcache
from kdcache.errors import TeacherOutputError
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
        executor="ray",
        num_actors=2,
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
            ds, teacher, temperature=1.0, root=root, executor="ray", num_actors=1, progress=False
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
