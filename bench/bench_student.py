"""The student stage: what reading cached soft targets costs, and what caching saves.

Side by side in one process, one DeepSpeed rank on the CPU, the same student (an MLP
784-128-10), the same data (synthetic 28x28 uint8 images, 10 classes, 8 shards), the same
batch and the same number of steps (one epoch):

* ``hard``: hard labels alone (cross-entropy), read by a ``ShardedStream``;
* ``read``: the same hard-label loss, but batches come from ``SoftTargetDataset`` (the
  Arrow read, checksum and sample_id join of the ensemble's soft targets): what reading
  costs;
* ``cached``: distillation from the cache (``SoftTargetDataset``: the Arrow read of the
  ensemble's combined entry, made once before timing as the train job and the demo do,
  the sample_id join, then ``kd_loss``);
* ``read_view``, ``cached_view``: ``read`` and ``cached`` with the 3 teachers' entries
  read and combined per shard (``combined=False``: no combined entry);
* ``online``: the same distillation with the 3 teachers (MLPs 784-512-256-10) run in the
  loop on every batch, as without a cache.

* ``hard_b``: a second, independent ``hard`` case (its own engine and stream): an A/A
  control, whose ratio to ``hard`` is the run's own noise floor.

Every case has its own DeepSpeed engine and stream for the whole run, and takes its steps
with :func:`kdcache.train.loop.micro_step` (the step :func:`kdcache.train.train_student`
takes: the batch to the device, forward, loss, backward, optimizer step; the loss stays
on the device). The cases take turns in slices of ``--slice`` steps (16 by default, a
few tens of milliseconds; the first case of each turn rotates), so a slow second of the
shared machine falls on every case alike: each case's epoch time is its seconds over
all its steps at that thread count, divided by the rounds. The times of whole epochs
run one after another (the first version of this bench, best of rounds) moved by
10-40% from one epoch to the next on a shared 2-core machine, which no ratio near 1.05
survives. A stream's prefetch thread may finish its pending shard reads (at most
``prefetch_shards`` = 2 ahead, about 0.25 ms each here) during another case's turn: a
bias of at most 0.3% of an epoch in favour of the cache-reading cases. The teacher stage
that fills the cache runs once before timing (its time is reported, not counted).

Names in ``--json``: ``ratios.cached_over_hard_t<N>`` and ``ratios.read_over_hard_t<N>``
(epoch time over the hard-label epoch's at N torch threads; the goal is <= 1.05),
``ratios.cached_view_over_hard_t<N>`` and ``ratios.read_view_over_hard_t<N>`` (the same,
combining per shard), ``ratios.online_over_cached_t<N>``, ``ratios.hard_b_over_hard_t<N>``
(the A/A control), with ``--loader-workers W`` also
``ratios.read_w<W>_over_hard_t<N>`` (the read case in W loader processes); the epoch
times are ``figures.<case>_epoch_s_t<N>``.

    python bench/bench_student.py --quick            # a few minutes on 2 cores
    python bench/bench_student.py --json out.json    # {"name", "figures", "ratios"}
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import kdcache
from kdcache import losses
from kdcache.stream.dataset import ShardedStream
from kdcache.train.distributed import cpu_ds_config, init_distributed
from kdcache.train.loop import micro_step, start_engine

TEMPERATURE, ALPHA = 4.0, 0.9


def _mlp(hidden: list[int], seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = [torch.nn.Flatten()]
    width = 784
    for h in hidden:
        layers += [torch.nn.Linear(width, h), torch.nn.ReLU()]
        width = h
    layers.append(torch.nn.Linear(width, 10))
    return _Scaled(torch.nn.Sequential(*layers))


class _Scaled(torch.nn.Module):
    """uint8 images in, logits out (the model normalises, as pipelines.models does)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.float() / 255.0)


class _Case:
    """One case's engine, stream and clock, stepped a slice at a time."""

    def __init__(self, make_stream, loss_fn, batch_size: int) -> None:
        engine, device = start_engine(
            _mlp([128], seed=1), cpu_ds_config(lr=1e-3, micro_batch_size=batch_size)
        )
        engine.train()
        self.engine, self.device, self.loss_fn = engine, device, loss_fn
        self.stream = make_stream()
        self.batches = iter(self.stream)
        self.seconds = 0.0
        self.losses: list[torch.Tensor] = []

    def run(self, steps: int) -> None:
        t = time.perf_counter()
        for _ in range(steps):
            batch = next(self.batches, None)
            if batch is None:  # the epoch is over: the next one, as train_student does
                self.batches = iter(self.stream)
                batch = next(self.batches)
            loss, _ = micro_step(self.engine, self.device, batch, self.loss_fn)
            self.losses.append(loss.detach())
        self.seconds += time.perf_counter() - t


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--quick", action="store_true", help="65,536 samples instead of 131,072 (about 2 minutes)"
    )
    ap.add_argument("--samples", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None, help="epochs per case (default 5)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument(
        "--threads", default="1,2", help="torch thread counts, comma-separated (default 1,2)"
    )
    ap.add_argument(
        "--no-online", action="store_true", help="leave out the slow online-teacher case"
    )
    ap.add_argument(
        "--loader-workers",
        type=int,
        default=0,
        help="also time the read case with the stream in N loader worker processes "
        "(case read_wN; default 0: left out)",
    )
    ap.add_argument(
        "--slice", type=int, default=16, help="steps each case takes per turn (default 16)"
    )
    ap.add_argument("--json", default=None, metavar="PATH")
    args = ap.parse_args(argv)
    n = args.samples or (65536 if args.quick else 131072)
    rounds = args.rounds or 5
    thread_counts = [int(t) for t in str(args.threads).split(",")]
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, n)
    means = rng.integers(0, 256, (10, 784))
    images = np.clip(means[labels] + rng.normal(0, 60, (n, 784)), 0, 255).astype(np.uint8)
    ds = kdcache.ArrayDataset(
        np.arange(n), images, labels, num_shards=8, preprocessing={"bench": "student"}
    )
    teachers = [
        kdcache.Teacher.from_module(_mlp([512, 256], seed=s), name=f"t{s}", config={"s": s})
        for s in range(3)
    ]
    ensemble = kdcache.TeacherEnsemble(teachers, rule="mean_probs")
    with tempfile.TemporaryDirectory() as root:
        t = time.perf_counter()
        cache = kdcache.build_cache(
            ds, ensemble, temperature=TEMPERATURE, root=root, executor="local", progress=False
        )
        teacher_stage_s = time.perf_counter() - t
        t = time.perf_counter()
        combined = cache.materialize(TEMPERATURE)  # once, as the train job does
        combine_s = time.perf_counter() - t

        def kd(logits: torch.Tensor, log_probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return losses.kd_loss(
                logits, log_probs, temperature=TEMPERATURE, alpha=ALPHA, labels_B=y
            )

        cases = {
            "hard": (
                lambda: ShardedStream(ds, batch_size=args.batch_size, seed=0),
                lambda lg, b: losses.cross_entropy(lg, b["labels"]),
            ),
            # reads, joins and combines the soft targets but trains on hard labels: the
            # cost of reading the cache alone, apart from the distillation loss's math
            "read": (
                lambda: kdcache.SoftTargetDataset(cache, ds, batch_size=args.batch_size, seed=0),
                lambda lg, b: losses.cross_entropy(lg, b["labels"]),
            ),
            "cached": (
                lambda: kdcache.SoftTargetDataset(cache, ds, batch_size=args.batch_size, seed=0),
                lambda lg, b: kd(lg, b["teacher_log_probs"], b["labels"]),
            ),
            "read_view": (
                lambda: kdcache.SoftTargetDataset(
                    cache, ds, batch_size=args.batch_size, seed=0, combined=False
                ),
                lambda lg, b: losses.cross_entropy(lg, b["labels"]),
            ),
            "cached_view": (
                lambda: kdcache.SoftTargetDataset(
                    cache, ds, batch_size=args.batch_size, seed=0, combined=False
                ),
                lambda lg, b: kd(lg, b["teacher_log_probs"], b["labels"]),
            ),
            "online": (
                lambda: ShardedStream(ds, batch_size=args.batch_size, seed=0),
                lambda lg, b: kd(
                    lg, ensemble.log_probs(b["inputs"], temperature=TEMPERATURE), b["labels"]
                ),
            ),
        }
        cases["hard_b"] = cases["hard"]  # the A/A control: its own engine and stream
        if args.loader_workers > 0:
            w = args.loader_workers
            cases[f"read_w{w}"] = (
                lambda: kdcache.SoftTargetDataset(
                    cache, ds, batch_size=args.batch_size, seed=0, num_workers=w
                ),
                lambda lg, b: losses.cross_entropy(lg, b["labels"]),
            )
        if args.no_online:
            del cases["online"]
        init_distributed()
        best: dict[tuple[str, int], float] = {}
        steps = len(ShardedStream(ds, batch_size=args.batch_size, seed=0))
        for th in thread_counts:
            torch.set_num_threads(th)
            running = [
                _Case(make_stream, loss_fn, args.batch_size)
                for make_stream, loss_fn in cases.values()
            ]
            left, turn = rounds * steps, 0
            while left > 0:
                k = min(args.slice, left)
                first = turn % len(running)
                for case in running[first:] + running[:first]:
                    case.run(k)
                left -= k
                turn += 1
            for name, case in zip(cases, running, strict=True):
                best[name, th] = case.seconds / rounds
                if not all(bool(torch.isfinite(x)) for x in case.losses):
                    raise RuntimeError(f"case {name} at {th} thread(s) had a non-finite loss")
            del running
        cache_bytes = cache.num_bytes
        combined_bytes = combined.num_bytes
    figures: dict[str, float] = {
        "samples": n,
        "steps_per_epoch": steps,
        "batch_size": args.batch_size,
        "rounds": rounds,
        "slice_steps": args.slice,
        "teacher_stage_s": teacher_stage_s,
        "combine_s": combine_s,
        "combined_entry_bytes": combined_bytes,
        "cache_bytes": cache_bytes,
        **{f"{k}_epoch_s_t{th}": v for (k, th), v in best.items()},
    }
    ratios: dict[str, float] = {}
    for th in thread_counts:
        hard = best["hard", th]
        ratios[f"read_over_hard_t{th}"] = best["read", th] / hard
        ratios[f"cached_over_hard_t{th}"] = best["cached", th] / hard
        ratios[f"read_view_over_hard_t{th}"] = best["read_view", th] / hard
        ratios[f"cached_view_over_hard_t{th}"] = best["cached_view", th] / hard
        ratios[f"hard_b_over_hard_t{th}"] = best["hard_b", th] / hard
        if "online" in cases:
            ratios[f"online_over_cached_t{th}"] = best["online", th] / best["cached", th]
        if args.loader_workers > 0:
            w = args.loader_workers
            ratios[f"read_w{w}_over_hard_t{th}"] = best[f"read_w{w}", th] / hard
    head = (
        "case",
        *[f"t{th} epoch s" for th in thread_counts],
        *[f"t{th} vs hard" for th in thread_counts],
    )
    rows = [head]
    for k in cases:
        rows.append(
            (
                k,
                *[f"{best[k, th]:.3f}" for th in thread_counts],
                *[f"{best[k, th] / best['hard', th]:.3f}x" for th in thread_counts],
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for i, r in enumerate(rows):
        print(
            "  ".join(
                c.ljust(w) if j == 0 else c.rjust(w)
                for j, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print()
    for name, value in ratios.items():
        has_goal = name.startswith(("read_over_hard_", "cached_over_hard_"))
        goal = "  (goal <= 1.05)" if has_goal else ""
        if name.startswith("hard_b_over_hard_"):
            goal = "  (A/A control: the run's noise floor)"
        print(f"  {name:24s} {value:7.3f}{goal}")
    print(
        f"{n:,} samples, {steps} steps of {args.batch_size}, {rounds} epochs per case in "
        f"turns of {args.slice} steps at {', '.join(map(str, thread_counts))} torch "
        f"thread(s); teacher stage (once) "
        f"{teacher_stage_s:.2f} s, its combination (once) {combine_s:.2f} s"
    )
    result = {"name": "bench_student", "figures": figures, "ratios": ratios}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2, sort_keys=True)
    return result


if __name__ == "__main__":
    main()
