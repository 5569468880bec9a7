"""One rank and two gloo ranks train the same student from the same global batches, also
when labels are scarce: 1,000 labelled rows of 60,000, so that the ranks of a global batch
hold different numbers of labelled rows. ``kdcache train`` averages every loss term over
the rows that count in the whole global batch (``kdcache.train.data_parallel_normalizer``),
not over each rank's share; with a rank's own mean (what it did before) the two-rank model
is another model, which the last test shows."""

from __future__ import annotations

import json
import os
import socket
import sys

import numpy as np
import pytest
import torch
import yaml

import kdcache
from kdcache.testing import linear_teacher, toy_dataset

pytestmark = pytest.mark.integration

NUM_RECORDS, NUM_LABELS, NUM_SHARDS = 60_000, 1_000, 8
GLOBAL_BATCH, STEPS, TEMPERATURE = 2_000, 6, 2.0

#: The training dataset: the cached toy inputs, with all but NUM_LABELS labels removed
#: (labels are not in the fingerprint, so the cache of the fully labelled set serves it).
FACTORY = """
import numpy as np

from kdcache.data.base import ArrayDataset
from kdcache.testing import toy_dataset


def scarce(num_records, num_labels, num_shards):
    ds = toy_dataset(num_records=num_records, num_shards=num_shards)
    labels = np.full(num_records, -100, dtype=np.int64)
    keep = np.random.default_rng(1).choice(num_records, num_labels, replace=False)
    labels[keep] = ds.labels[keep]
    return ArrayDataset(ds.sample_ids, ds.inputs, labels, num_shards, ds.preprocessing)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A cache of one linear teacher over the 60,000 toy rows, and a train config on the
    scarce-label copy of them (alpha 0.5, and the hard-label run beside it)."""
    tmp = tmp_path_factory.mktemp("rank-invariance")
    ds = toy_dataset(num_records=NUM_RECORDS, num_shards=NUM_SHARDS)
    cache = kdcache.build_cache(
        ds,
        linear_teacher(),
        temperature=TEMPERATURE,
        root=str(tmp / "cache"),
        executor="local",
        progress=False,
    )
    (tmp / "scarce_data.py").write_text(FACTORY)
    config = {
        "output_dir": "OUT",
        "student": {"factory": "torch.nn:Linear", "kwargs": {"in_features": 8, "out_features": 5}},
        "cache": {"uri": cache.key, "root": str(tmp / "cache")},
        "dataset": {
            "factory": "scarce_data:scarce",
            "kwargs": {
                "num_records": NUM_RECORDS,
                "num_labels": NUM_LABELS,
                "num_shards": NUM_SHARDS,
            },
        },
        "loss": {"alpha": 0.5},
        "stream": {"global_batch_size": GLOBAL_BATCH, "num_lanes": 2},
        "max_steps": STEPS,
        "eval_every": 0,
        "tensorboard": False,
        "compare_hard_labels": True,  # a second run on the cross-entropy alone
        "deepspeed": {
            "optimizer": {"type": "AdamW", "params": {"lr": 0.05, "torch_adam": True}},
            "steps_per_print": 10**9,
        },
    }
    path = tmp / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path), tmp


def _rank_main(rank, world, port, config, out, per_rank_mean):
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        DS_ACCELERATOR="cpu",
    )
    torch.set_num_threads(1)
    from kdcache.jobs import train as job
    from kdcache.jobs.config import TrainConfig, load

    if per_rank_mean:  # the behaviour before: each rank divides by its own count
        job.data_parallel_normalizer = float
    cfg = load(TrainConfig, config, [f"output_dir={out}"])
    job.train_from_config(cfg, progress=False)
    torch.distributed.destroy_process_group()


def _run(config, out, world, per_rank_mean=False):
    """``kdcache train`` on ``world`` gloo ranks (spawned); returns the student's weights
    and the per-step train losses (mean over ranks) of the distilled and hard-label runs."""
    for attempt in range(3):  # a free port can be taken before rank 0 binds it: retry
        try:
            torch.multiprocessing.start_processes(
                _rank_main,
                args=(world, _free_port(), config, out, per_rank_mean),
                nprocs=world,
                start_method="spawn",
            )
            break
        except torch.multiprocessing.ProcessRaisedException as exc:
            taken = ("cannot listen on 127.0.0.1", "EADDRINUSE", "ddress already in use")
            if attempt == 2 or not any(t in str(exc) for t in taken):
                raise
    weights = kdcache.teachers.load_state_dict(os.path.join(out, "student.safetensors"))
    from kdcache.train.metrics import read_metrics

    curves = {
        name: [v for _, v in read_metrics(os.path.join(out, sub, "metrics.csv"))["train/loss"]]
        for name, sub in (("distilled", ""), ("hard", "hard"))
    }
    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f)["world_size"] == world
    return weights, curves


def _labelled_per_rank(config) -> list[list[int]]:
    """How many labelled rows each of the two ranks holds at each step (the premise)."""
    sys.path.insert(0, os.path.dirname(config))
    try:
        from scarce_data import scarce  # type: ignore[import-not-found]
    finally:
        sys.path.remove(os.path.dirname(config))
    ds = scarce(NUM_RECORDS, NUM_LABELS, NUM_SHARDS)
    out = []
    for rank in range(2):
        stream = kdcache.ShardedStream(
            ds, batch_size=GLOBAL_BATCH // 2, rank=rank, world_size=2, num_lanes=2
        )
        counts = []
        for batch in stream:
            counts.append(int((batch["labels"] != -100).sum()))
            if len(counts) == STEPS:
                break
        out.append(counts)
    return out


@pytest.fixture(scope="module")
def one_rank(setup):
    config, tmp = setup
    return _run(config, str(tmp / "one"), 1)


def test_scarce_labels_fall_unevenly_on_the_ranks(setup):
    config, _ = setup
    rank0, rank1 = _labelled_per_rank(config)
    assert sum(rank0) + sum(rank1) > 0
    assert any(a != b for a, b in zip(rank0, rank1, strict=True))  # else nothing to test


def test_two_ranks_train_the_one_rank_model_with_scarce_labels(setup, one_rank):
    config, tmp = setup
    weights, curves = _run(config, str(tmp / "two"), 2)
    want_weights, want_curves = one_rank
    for k, v in want_weights.items():
        torch.testing.assert_close(weights[k], v, rtol=1e-5, atol=1e-6)
    for name in ("distilled", "hard"):
        assert len(curves[name]) == STEPS
        np.testing.assert_allclose(curves[name], want_curves[name], rtol=1e-5, err_msg=name)


def test_a_mean_over_each_ranks_own_rows_would_train_another_model(setup, one_rank):
    """The check above can fail: with each rank averaging over its own labelled rows (the
    behaviour before), two ranks drift from the one-rank model."""
    config, tmp = setup
    weights, curves = _run(config, str(tmp / "per-rank"), 2, per_rank_mean=True)
    want_weights, want_curves = one_rank
    gap = max(float((weights[k] - v).abs().max()) for k, v in want_weights.items())
    assert gap > 1e-3, gap
    assert not np.allclose(curves["hard"], want_curves["hard"], rtol=1e-5)
