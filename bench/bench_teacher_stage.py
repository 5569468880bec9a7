"""Teacher-stage throughput: what caching and Ray cost, and what a second actor buys.

Compared side by side in one run, on the same data and teachers (the Fashion-MNIST demo's
three architectures, untrained: speed does not depend on the weights):

* ``plain``: a loop in this process that runs the teachers over every shard and keeps
  the scaled logits in memory (no cache, no Ray), with as many torch threads as one
  actor gets.
* ``local``: ``build_cache(executor="local")``: the same loop plus hashing, Arrow
  encoding and the commit protocol.
* ``ray x1`` / ``ray x2``: ``build_cache(executor="ray")`` with one and two actors of one
  CPU each (Ray already running, so its start-up is not counted; actor start-up is).

Ratios: ``local / plain`` and ``ray x1 / plain`` (time, goal < 1.05), and
``ray x1 / ray x2`` (speed-up of the second actor; at most 2 on a 2-core machine).

    python bench/bench_teacher_stage.py --quick [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np
import torch

import kdcache
from kdcache import targets
from kdcache.executors import ExecutorConfig
from pipelines.fashion_mnist import TEACHERS
from pipelines.models import build_model


def make_inputs(num_records: int, num_shards: int) -> kdcache.ArrayDataset:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (num_records, 28, 28), dtype=np.uint8)
    return kdcache.ArrayDataset(np.arange(num_records), images, num_shards=num_shards)


def make_teachers() -> list[kdcache.Teacher]:
    out = []
    for spec in TEACHERS:
        torch.manual_seed(spec["seed"])
        config = {"arch": spec["arch"], **spec["kwargs"]}
        out.append(kdcache.Teacher(spec["name"], build_model(**config), config))
    return out


VARIANTS = ("plain", "local", "ray x1", "ray x2")


def plain_loop(ds: kdcache.ArrayDataset, teachers: list[kdcache.Teacher], batch: int) -> float:
    start = time.perf_counter()
    for i in range(ds.num_shards):
        shard = ds.read_shard(i)
        for t in teachers:
            parts = []
            for lo in range(0, len(shard["sample_id"]), batch):
                logits = t.logits(shard["inputs"][lo : lo + batch])
                parts.append(targets.scale_logits(logits, 4.0).numpy())
            np.concatenate(parts)  # one shard's outputs, as the cache holds them
    return time.perf_counter() - start


def timed_build(
    ds: kdcache.ArrayDataset,
    teachers: list[kdcache.Teacher],
    executor: str,
    num_actors: int | None,
    batch: int,
) -> tuple[float, float]:
    """(wall seconds, summed seconds the actors spent on shards) of one fresh build."""
    root = tempfile.mkdtemp(prefix="kdcache-bench-")
    try:
        start = time.perf_counter()
        cache = kdcache.build_cache(
            ds,
            teachers,
            temperature=4.0,
            root=root,
            executor=ExecutorConfig(kind=executor, num_actors=num_actors, batch_size=batch),
            progress=False,
        )
        wall = time.perf_counter() - start
        busy = sum(a["seconds"] for a in cache.build_report.per_actor.values())
        return wall, busy
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="8,000 samples, 1 repeat")
    p.add_argument("--samples", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--json", default=None, help="write the figures and ratios here")
    a = p.parse_args()
    num = a.samples or (8000 if a.quick else 24000)
    repeats = a.repeats or (1 if a.quick else 3)
    batch = 512
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local benchmark cluster only
    import ray

    # address="local": a fresh cluster even if another one runs on this machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    torch.set_num_threads(1)  # what one actor with one CPU gets
    ds = make_inputs(num, num_shards=8)
    teachers = make_teachers()
    runs: dict[str, list[tuple[float, float]]] = {k: [] for k in VARIANTS}
    try:
        plain_loop(ds, teachers, batch)  # warm-up
        for _ in range(repeats):  # interleaved, so drift hits every variant alike
            t = plain_loop(ds, teachers, batch)
            runs["plain"].append((t, t))
            runs["local"].append(timed_build(ds, teachers, "local", None, batch))
            runs["ray x1"].append(timed_build(ds, teachers, "ray", 1, batch))
            runs["ray x2"].append(timed_build(ds, teachers, "ray", 2, batch))
    finally:
        ray.shutdown()
    best = {k: min(v) for k, v in runs.items()}  # the run with the best wall time
    plain = best["plain"][0]
    work = num * len(teachers)
    print(
        f"bench_teacher_stage: {num} samples x {len(teachers)} teachers, 8 shards, "
        f"batch {batch}, best of {repeats}"
    )
    print(
        f"{'variant':<8} {'wall s':>7} {'samples/s':>10} {'wall/plain':>10} "
        f"{'busy s':>7} {'busy/plain':>10}"
    )
    for k, (wall, busy) in best.items():
        print(
            f"{k:<8} {wall:>7.2f} {work / wall:>10,.0f} {wall / plain:>10.3f} "
            f"{busy:>7.2f} {busy / plain:>10.3f}"
        )
    print(
        "wall: the whole call, actor start-up included; busy: time summed over actors spent "
        "on shards (read, teachers, encode, hash, commit)"
    )
    ratios = {
        "local_over_plain_time": best["local"][0] / plain,
        "ray1_over_plain_time": best["ray x1"][0] / plain,
        "ray1_busy_over_plain_time": best["ray x1"][1] / plain,
        "ray2_speedup_over_ray1": best["ray x1"][0] / best["ray x2"][0],
    }
    for k, v in ratios.items():
        print(f"{k}: {v:.3f}")
    if a.json:
        figures = {f"{k}_wall_s": v[0] for k, v in best.items()}
        figures.update({f"{k}_busy_s": v[1] for k, v in best.items()})
        with open(a.json, "w") as f:
            json.dump(
                {"name": "bench_teacher_stage", "figures": figures, "ratios": ratios}, f, indent=2
            )


if __name__ == "__main__":
    main()
