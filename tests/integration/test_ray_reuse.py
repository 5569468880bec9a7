"""A RayExecutor is reusable across builds: a second ``build_cache`` through the same object
starts no actor, ships no teacher again and writes the same bytes; ``close()`` leaves no
actor running."""

from __future__ import annotations

import time

import pytest

import kdcache
from kdcache.executors import ExecutorConfig, RayExecutor
from kdcache.local_ray import loopback_ray
from kdcache.stores.admin import verify
from kdcache.testing import linear_teacher, toy_dataset

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def local_ray():
    # address="local": a fresh cluster of our own (on 127.0.0.1), so that every actor it
    # lists is one this module started
    with loopback_ray() as local:
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            logging_level="ERROR",
            **local,
        )
    yield
    ray.shutdown()


def _teacher_actors() -> dict[str, str]:
    """Every TeacherActor this Ray has had, alive or not: actor id -> state (from the GCS;
    ``ray.util.state`` needs the dashboard, which these tests do not start)."""
    return {
        actor_id: info["State"]
        for actor_id, info in ray._private.state.actors().items()
        if info["ActorClassName"] == "TeacherActor"
    }


def _info(actor) -> dict:
    return ray.get(actor.info.remote(), timeout=60)


def _build(ex, ds, teachers, root):
    return kdcache.build_cache(
        ds, teachers, temperature=2.0, root=root, executor=ex, progress=False
    )


def test_a_second_build_starts_no_actor_ships_no_teacher_and_writes_the_same_bytes(
    local_ray, tmp_path
):
    teachers = [linear_teacher(seed=0, name="a"), linear_teacher(seed=1, name="b")]
    ds = toy_dataset(num_records=80, num_shards=8)
    before = set(_teacher_actors())
    ex = RayExecutor(ExecutorConfig(num_actors=2, batch_size=16))
    with ex:
        first = _build(ex, ds, teachers, str(tmp_path / "first"))
        started = set(_teacher_actors()) - before
        assert len(started) == 2  # the first build started the pool's two actors
        actors = ex.actors
        infos = [_info(h) for h in actors]
        assert len({i["pid"] for i in infos}) == 2
        # torch threads = the actor's CPUs (1), so an actor never oversubscribes them
        assert [i["num_threads"] for i in infos] == [1, 1]
        # each actor fetched each in-memory teacher once and keeps it between builds
        assert [sorted(i["shipped"]) for i in infos] == [["a", "b"], ["a", "b"]]
        assert [i["num_fetches"] for i in infos] == [2, 2]

        # the same build into another root: a real build (not a hit) on the same actors
        second = _build(ex, ds, teachers, str(tmp_path / "second"))
        assert not second.build_report.hit and second.build_report.computed == 16
        assert set(_teacher_actors()) - before == started  # no new actor
        assert all(state == "ALIVE" for a, state in _teacher_actors().items() if a in started)
        assert ex.actors == actors
        again = [_info(h) for h in actors]
        assert [i["pid"] for i in again] == [i["pid"] for i in infos]
        assert [i["num_fetches"] for i in again] == [2, 2]  # no teacher shipped again
        assert set(second.build_report.per_actor) == {"default/actor-0", "default/actor-1"}
        # the same bytes as the first build (and the keys: nothing run-specific in them)
        assert [e.key for e in second.entries] == [e.key for e in first.entries]
        for x, y in zip(first.entries, second.entries, strict=True):
            assert [s.sha256 for s in x.shards] == [s.sha256 for s in y.shards]
            assert verify(y).ok

        # a build with only one of the teachers lets the other go on the actors
        third = _build(ex, toy_dataset(seed=3), teachers[1], str(tmp_path / "third"))
        assert third.build_report.computed == 4
        assert [_info(h)["shipped"] for h in ex.actors] == [["b"], ["b"]]
        assert set(_teacher_actors()) - before == started
    # close(): the actors are killed and forgotten; this Ray (the fixture's) stays up
    assert ex.actors == () and ex.pools == {}
    deadline = time.monotonic() + 30  # ray.kill is asynchronous
    while any(_teacher_actors()[a] != "DEAD" for a in started):
        assert time.monotonic() < deadline, f"actors still running: {_teacher_actors()}"
        time.sleep(0.2)
    assert ray.is_initialized()


def test_a_closed_executor_can_build_again_on_fresh_actors(local_ray, tmp_path):
    ds = toy_dataset(num_records=40, num_shards=4)
    teacher = linear_teacher(seed=2)
    ex = RayExecutor(num_actors=1)
    first = _build(ex, ds, teacher, str(tmp_path / "first"))
    old = ex.actors
    ex.close()
    second = _build(ex, ds, teacher, str(tmp_path / "second"))
    assert len(ex.actors) == 1 and ex.actors != old
    assert _info(ex.actors[0])["num_fetches"] == 1
    assert [s.sha256 for s in second.shards] == [s.sha256 for s in first.shards]
    ex.close()
    assert ex.actors == ()
