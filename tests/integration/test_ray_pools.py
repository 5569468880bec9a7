"""Actor pools on a real local Ray: teachers with their own resources run on actors of their
own, specs are loaded on the actors (never on the driver) once, a second build reuses the
actors, and a failing teacher stops every pool while the others' commits are kept."""

from __future__ import annotations

import glob
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import kdcache
from kdcache import schema
from kdcache.errors import TeacherOutputError
from kdcache.executors import ExecutorConfig, RayExecutor
from kdcache.schema import TargetSpec
from kdcache.stores.admin import verify
from kdcache.stores.entry import CacheEntry
from kdcache.teachers import TeacherResources, TeacherSpec
from kdcache.testing import linear_teacher, toy_dataset

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.integration

HERE = __name__  # the import path of this module (Ray's workers import it too, see local_ray)


def recording_teacher(log: str, seed: int = 0) -> kdcache.Teacher:
    """A factory that records the pid of each process that builds it."""
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\n")
    return linear_teacher(seed=seed)


class Sleepy(torch.nn.Module):
    """A linear teacher that takes ``delay_s`` per forward pass."""

    def __init__(self, inner: torch.nn.Module, delay_s: float) -> None:
        super().__init__()
        self.inner = inner
        self.delay_s = delay_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.delay_s)
        return self.inner(x)


class NaNOnceDone(torch.nn.Module):
    """Returns NaN logits, but only once ``num_files`` sidecars exist under ``pattern``:
    the failure comes after another pool has committed those shards."""

    def __init__(self, inner: torch.nn.Module, pattern: str, num_files: int) -> None:
        super().__init__()
        self.inner = inner
        self.pattern = pattern
        self.num_files = num_files

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        deadline = time.monotonic() + 120
        while len(glob.glob(self.pattern)) < self.num_files and time.monotonic() < deadline:
            time.sleep(0.02)
        return torch.full_like(self.inner(x), float("nan"))


def _calls(log) -> list[int]:
    return [int(x) for x in Path(log).read_text().split()] if os.path.exists(log) else []


@pytest.fixture(scope="module")
def local_ray():
    # address="local": a fresh cluster even if another one runs on this machine; the
    # workers get this directory on their path, to import the fakes of this module
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        logging_level="ERROR",
        job_config=ray.job_config.JobConfig(code_search_path=[os.path.dirname(__file__)]),
    )
    yield
    ray.shutdown()


def _info(actor) -> dict:
    return ray.get(actor.info.remote(), timeout=60)


def test_teachers_with_their_own_resources_run_on_their_own_actors(local_ray, tmp_path):
    root = str(tmp_path / "cache")
    log = str(tmp_path / "built")
    from safetensors.torch import save_file

    weights = str(tmp_path / "b.safetensors")
    save_file(linear_teacher(seed=2).module.state_dict(), weights)
    a = TeacherSpec.factory(
        "a",
        f"{HERE}:recording_teacher",
        {"log": log, "seed": 1},
        version=1,
        resources=TeacherResources(num_actors=1, cpus_per_actor=1.0),
    )
    b = TeacherSpec.checkpoint(
        "b",
        "kdcache.testing:linear_module",
        weights,
        resources=TeacherResources(num_actors=1, cpus_per_actor=0.5, memory_bytes=64 * 2**20),
    )
    c = TeacherSpec.factory(  # no resources: the default pool, with the small teacher d
        "c", f"{HERE}:recording_teacher", {"log": log, "seed": 3}, version=1
    )
    d = linear_teacher(seed=4, name="d")
    teachers = [a, b, c, d]
    config = ExecutorConfig(num_actors=1, cpus_per_actor=0.5)  # 1 + 0.5 + 0.5 = 2 CPUs
    with RayExecutor(config) as ex:
        first = kdcache.build_cache(
            toy_dataset(seed=0), teachers, temperature=2.0, root=root, executor=ex, progress=False
        )
        pools = ex.pools
        assert list(pools) == ["a", "b", "default"]
        assert all(len(h) == 1 for h in pools.values())
        infos = {name: _info(h[0]) for name, h in pools.items()}
        assert len({i["pid"] for i in infos.values()}) == 3 and os.getpid() not in {
            i["pid"] for i in infos.values()
        }
        # each actor loaded only its pool's specs (d came with its weights and was let go)
        assert {n: i["teachers"] for n, i in infos.items()} == {
            "a": ["a"],
            "b": ["b"],
            "default": ["c"],
        }
        assert set(first.build_report.per_actor) == {"a/actor-0", "b/actor-0", "default/actor-0"}
        assert first.build_report.per_actor["default/actor-0"]["shards"] == 4  # c and d together
        # the factories ran on the actors, once each, never in the driver
        assert sorted(_calls(log)) == sorted([infos["a"]["pid"], infos["default"]["pid"]])
        for entry in first.entries:
            result = verify(entry)
            assert result.ok, result.problems

        # a second build through the same executor: the same actors, specs not reloaded
        second = kdcache.build_cache(
            toy_dataset(seed=1), teachers, temperature=2.0, root=root, executor=ex, progress=False
        )
        assert not second.build_report.hit and second.build_report.computed == 16
        assert ex.pools == pools
        again = {name: _info(h[0]) for name, h in ex.pools.items()}
        assert {n: i["pid"] for n, i in again.items()} == {n: i["pid"] for n, i in infos.items()}
        assert {n: i["num_loads"] for n, i in again.items()} == {"a": 1, "b": 1, "default": 1}
        assert len(_calls(log)) == 2
        assert set(second.build_report.per_actor) == set(first.build_report.per_actor)
        assert all(verify(e).ok for e in second.entries)
    assert ex.actors == ()

    # the same bytes as the local executor
    local = kdcache.build_cache(
        toy_dataset(seed=0),
        teachers,
        temperature=2.0,
        root=str(tmp_path / "local"),
        executor="local",
        progress=False,
    )
    assert [e.key for e in local.entries] == [e.key for e in first.entries]
    for x, y in zip(local.entries, first.entries, strict=True):
        assert [s.sha256 for s in x.shards] == [s.sha256 for s in y.shards]


def test_a_failing_pool_stops_the_build_and_the_other_pools_commits_are_kept(local_ray, root):
    ds = toy_dataset(num_records=80, num_shards=8)
    good = TeacherSpec.factory(
        "good",
        "kdcache.testing:linear_teacher",
        {"seed": 1},
        version=1,
        resources=TeacherResources(num_actors=1, cpus_per_actor=1.0),
    )
    good_entry = CacheEntry(
        root,
        schema.content_key(
            schema.entry_spec(ds.fingerprint(), good.fingerprint(), TargetSpec(2.0))
        ),
    )
    # fails on its first shard, but only once every shard of "good" is committed
    bad = kdcache.Teacher.from_module(
        NaNOnceDone(
            linear_teacher().module, os.path.join(good_entry.shards_location.uri, "*.json"), 8
        ),
        name="bad",
        resources=TeacherResources(num_actors=1, cpus_per_actor=0.5, group="flaky"),
    )
    # the default pool: a slow teacher, still busy when "bad" fails
    slow = kdcache.Teacher.from_module(Sleepy(linear_teacher(seed=2).module, 1.0), name="slow")
    with RayExecutor(ExecutorConfig(num_actors=1, cpus_per_actor=0.5)) as ex:
        started = time.monotonic()
        with pytest.raises(TeacherOutputError, match=r"'bad'.*sample_id"):
            kdcache.build_cache(
                ds,
                [slow, good, bad],
                temperature=2.0,
                root=root,
                executor=ex,
                progress=False,
            )
        elapsed = time.monotonic() - started
        pools = ex.pools
        assert list(pools) == ["default", "good", "flaky"]
        # the slow pool's busy actor was killed at once; the idle "good" actor was kept
        assert pools["default"][0] not in ex.actors and pools["good"][0] in ex.actors
        deadline = time.monotonic() + 30  # ray.kill is asynchronous
        while True:
            try:
                ray.get(pools["default"][0].info.remote(), timeout=60)
            except ray.exceptions.RayActorError:
                break
            assert time.monotonic() < deadline, "the busy actor was not killed"
            time.sleep(0.2)
    # did not wait for the slow teacher's eight shards (a behaviour, not a timing: the
    # slow entry holds fewer than all of them)
    slow_entry = CacheEntry(
        root,
        schema.content_key(
            schema.entry_spec(ds.fingerprint(), slow.fingerprint(), TargetSpec(2.0))
        ),
    )
    assert sum(slow_entry.committed_shard(i) is not None for i in range(8)) < 8, elapsed

    # the good pool committed all its shards, not held back by the others
    committed = [good_entry.committed_shard(i) is not None for i in range(8)]
    assert committed == [True] * 8 and not good_entry.is_complete
    others = set(os.listdir(os.path.join(root, "entries"))) - {good_entry.key}
    assert len(others) == 2
    for key in others:
        other = CacheEntry(root, key)
        assert not other.is_complete
        assert sum(other.committed_shard(i) is not None for i in range(8)) < 8
        assert not os.path.exists(os.path.join(other.location.uri, "lease.json"))
    # a rerun of the good teacher reuses its eight shards and computes nothing
    again = kdcache.build_cache(
        ds, good, temperature=2.0, root=root, executor=ExecutorConfig(num_actors=1), progress=False
    )
    assert (again.build_report.computed, again.build_report.reused) == (0, 8)
    assert verify(again).ok
    ids = np.concatenate([again.read_shard(i)[0] for i in range(8)])
    assert sorted(ids.tolist()) == sorted(ds.sample_ids.tolist())
