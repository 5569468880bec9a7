"""Feature teachers: hidden states cached as their own entries and streamed back for
feature-based (FitNets) and relation-based (RKD) distillation."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

import kdcache
from kdcache import losses
from kdcache.errors import ConfigError
from kdcache.testing import toy_dataset


def _teacher():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))
    return kdcache.Teacher.from_module(net, name="mlp", config={"hidden": 16})


def test_feature_entries_stream_back_the_hidden_state(root):
    ds = toy_dataset(num_records=48, num_shards=3)
    teacher = _teacher()
    hidden = teacher.feature("1")
    assert hidden.name == "mlp:1" and hidden.config["feature"] == "1"
    logits_entry = kdcache.build_cache(
        ds, teacher, temperature=1.0, root=root, executor="local", progress=False
    )
    feat_entry = kdcache.build_cache(
        ds, hidden, temperature=1.0, root=root, executor="local", progress=False
    )
    other = kdcache.build_cache(
        ds, teacher.feature("0"), temperature=1.0, root=root, executor="local", progress=False
    )
    assert len({logits_entry.key, feat_entry.key, other.key}) == 3
    assert feat_entry.vocab_size == 16

    stream = kdcache.SoftTargetDataset(feat_entry, ds, batch_size=16, output="features")
    rows = {int(i): k for k, i in enumerate(ds.sample_ids)}
    seen = 0
    for batch in stream:
        x = torch.from_numpy(ds.inputs[[rows[int(i)] for i in batch["sample_id"]]])
        with torch.no_grad():
            want = teacher.module[:2](x)
        torch.testing.assert_close(batch["teacher_features"], want)
        seen += len(x)
    assert seen == 48

    # FitNets through a learned projection: the hint loss falls while training on the cache
    student = torch.nn.Linear(8, 4)
    regressor = losses.FitNetsRegressor(4, 16)
    opt = torch.optim.Adam([*student.parameters(), *regressor.parameters()], lr=0.05)
    first = last = None
    for _ in range(15):
        for batch in stream:
            loss = losses.fitnets_loss(
                student(batch["inputs"]), batch["teacher_features"], regressor
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            first = loss.item() if first is None else first
            last = loss.item()
    assert last < 0.5 * first
    # RKD on the same cached embeddings is finite and differentiable
    batch = next(iter(stream))
    emb = student(batch["inputs"])
    rkd = losses.rkd_distance_loss(emb, batch["teacher_features"])
    rkd = rkd + losses.rkd_angle_loss(emb, batch["teacher_features"])
    rkd.backward()
    assert torch.isfinite(rkd)


def test_feature_teacher_pickles_and_bad_paths_are_named():
    hidden = _teacher().feature("1")
    clone = pickle.loads(pickle.dumps(hidden))
    x = np.ones((2, 8), np.float32)
    torch.testing.assert_close(clone.logits(x), hidden.logits(x))
    with pytest.raises(ConfigError, match=r"no submodule 'nope'; choose one of: 0, 1, 2"):
        _teacher().feature("nope")
    with pytest.raises(ConfigError, match="output must be"):
        kdcache.SoftTargetDataset(None, toy_dataset(), batch_size=4, output="hidden")
