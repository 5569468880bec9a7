"""TODO docstring."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from kdcache.build.task import compute_shard
from kdcache.errors import RetriableError
from kdcache.executors.local import _account, _progress

log = logging.getLogger(__name__)


def _run_ray(
    dataset,
    ensemble,
    entries,
    pending,
    report,
    *,
    batch_size,
    address,
    num_actors,
    cpus_per_actor,
    gpus_per_actor,
    max_retries,
    progress,
) -> None:
    from kdcache.errors import require

    ray = require("ray", "ray")
    started_here = not ray.is_initialized()
    if started_here:
        try:
            ray.init(
                address=address,
                include_dashboard=False,
                log_to_driver=True,
                logging_level=logging.WARNING,
            )
        except (ConnectionError, ValueError) as exc:
            where = address or os.environ.get("RAY_ADDRESS") or "a local Ray"
            raise RetriableError(
                f"could not start or join Ray at {where}: {exc}. Check --address / "
                "RAY_ADDRESS (host:port of a running head, or 'local' for a new local Ray); "
                "nothing was computed, and entries committed before are kept"
            ) from exc
    try:
        resources = ray.cluster_resources()
        n = max(1, int(float(resources.get("CPU", 1)) // cpus_per_actor))
        if gpus_per_actor > 0:
            n = min(n, max(1, int(float(resources.get("GPU", 0)) // gpus_per_actor)))
        n = num_actors or n
        n = min(n, len(pending))
        threads = max(1, int(cpus_per_actor))

        class TeacherActor:
            """Holds the ensemble's teachers (co-located small models) and runs shards."""

            def __init__(self, refs):
                # Wrapped in a list so the driver, which keeps the refs alive, owns them.
                torch.set_num_threads(threads)
                self.dataset, self.teachers, self.entries = ray.get(refs)
                if gpus_per_actor > 0 and torch.cuda.is_available():
                    for teacher in self.teachers:
                        teacher.to("cuda")

            def run(self, shard_index, ks):
                return compute_shard(
                    self.dataset,
                    [self.teachers[k] for k in ks],
                    [self.entries[k] for k in ks],
                    shard_index,
                    batch_size,
                )

        actor_cls = ray.remote(num_cpus=cpus_per_actor, num_gpus=gpus_per_actor, max_restarts=0)(
            TeacherActor
        )
        refs = [ray.put(dataset), ray.put(ensemble.teachers), ray.put(entries)]
        actors = [actor_cls.remote(refs) for _ in range(n)]
        log.info(
            "teacher stage: %d shard(s) x %d teacher(s) on %d Ray actor(s)",
            len(pending),
            len(ensemble),
            n,
        )
        bar = _progress(len(pending), 0, progress)
        queue = [(shard, ks, 0) for shard, ks in sorted(pending.items())]
        in_flight: dict[Any, tuple[int, tuple[int, list[int], int]]] = {}
        free = list(range(n))
        actor_died = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
        while queue or in_flight:
            while queue and free:
                a = free.pop()
                work = queue.pop(0)
                in_flight[actors[a].run.remote(work[0], work[1])] = (a, work)
            done, _ = ray.wait(list(in_flight), num_returns=1)
            a, (shard_index, ks, attempt) = in_flight.pop(done[0])
            try:
                stats = ray.get(done[0])  # a teacher error (fatal) raises here: job stops
            except actor_died as exc:
                # Infrastructure failure: the shard's files are idempotent, so rerun it on
                # a fresh actor, a bounded number of times.
                if attempt >= max_retries:
                    raise RetriableError(
                        f"shard {shard_index} failed {attempt + 1} times because its actor "
                        f"died ({type(exc).__name__}); committed shards are kept, rerun the "
                        "build to resume"
                    ) from exc
                log.warning(
                    "actor-%d died on shard %d (%s); retrying on a new actor (attempt %d of %d)",
                    a,
                    shard_index,
                    type(exc).__name__,
                    attempt + 2,
                    max_retries + 1,
                )
                actors[a] = actor_cls.remote(refs)
                queue.insert(0, (shard_index, ks, attempt + 1))
                free.append(a)
                continue
            _account(report, f"actor-{a}", stats, bar)
            free.append(a)
        bar.close()
        for actor in actors:
            ray.kill(actor)
    finally:
        if started_here:
            ray.shutdown()
