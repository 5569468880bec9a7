"""K augmented views per sample (kdcache.data.views): stable ids and parameters, the teacher
stage stores one row per view, the student stream replays the same augmentation, and a
different augmentation, K or seed is refused at the join."""

from __future__ import annotations

import pickle
import re

import numpy as np
import pytest
import torch

import kdcache
from kdcache.data.base import ArrayDataset, open_shard
from kdcache.data.views import Augmentation, AugmentedViews, ViewRandom, epoch_views
from kdcache.errors import ConfigError, DataError, SpecMismatchError
from pipelines.augment import shift_flip

SHIFT_FLIP = "pipelines.augment:shift_flip"
TAU = 2.0


def _images(num_records: int = 23, size: int = 6, *, id_offset: int = 500) -> ArrayDataset:
    rng = np.random.default_rng(0)
    return ArrayDataset(
        np.arange(num_records, dtype=np.int64) + id_offset,
        rng.integers(1, 256, (num_records, size, size)).astype(np.uint8),
        rng.integers(0, 5, num_records),
        num_shards=3,
        preprocessing={"toy": "images"},
    )


def _views(base: ArrayDataset, k: int = 3, seed: int = 7, **kwargs: object) -> AugmentedViews:
    return AugmentedViews(
        base, Augmentation(SHIFT_FLIP, {"max_shift": 2, **kwargs}), num_views=k, seed=seed
    )


def _rows(views: AugmentedViews, batch_size: int) -> dict[int, tuple]:
    """Every row of every shard, read with ``batch_size``, by sample_id."""
    out: dict[int, tuple] = {}
    for i in range(views.num_shards):
        for b in open_shard(views, i, batch_size):
            assert len(b["sample_id"]) <= batch_size
            for j, sid in enumerate(b["sample_id"].tolist()):
                assert sid not in out
                out[sid] = (
                    b["augmentation"][j].tolist(),
                    b["inputs"][j].tobytes(),
                    int(b["labels"][j]),
                    int(b["view"][j]),
                    int(b["base_sample_id"][j]),
                )
    return out


def _shift_flip_reference(image: np.ndarray, dy: int, dx: int, flip: int) -> np.ndarray:
    """One image, pixel by pixel: mirror left-right when ``flip``, then move down by dy and
    right by dx, zero where nothing moves in (independent of the vectorised gather)."""
    src = image[:, ::-1] if flip else image
    h, w = image.shape
    out = np.zeros_like(image)
    for y in range(h):
        for x in range(w):
            sy, sx = y - dy, x - dx
            if 0 <= sy < h and 0 <= sx < w:
                out[y, x] = src[sy, sx]
    return out


def test_ids_and_parameters_do_not_depend_on_sharding_or_batch_size():
    base = _images()
    k = 3
    reference = _rows(_views(base, k), 1 << 20)
    assert sorted(reference) == sorted(int(s) * k + v for s in base.sample_ids for v in range(k))
    for sid, (params, _, label, view, base_id) in reference.items():
        assert (base_id, view) == divmod(sid, k)
        assert label == int(base.labels[base_id - 500])
        assert -2 <= params[0] <= 2 and -2 <= params[1] <= 2 and params[2] in (0, 1)
    for num_shards in (1, 4, 7):
        resharded = base.subset(np.arange(len(base)), num_shards=num_shards)
        for batch_size in (1, 2, 5, 64):
            assert _rows(_views(resharded, k), batch_size) == reference, (num_shards, batch_size)
    # the draws vary: not all views of a sample share parameters, and a new seed changes them
    params = np.array([reference[s][0] for s in sorted(reference)])
    assert len(np.unique(params, axis=0)) > 10
    other = _rows(_views(base, k, seed=8), 64)
    assert any(other[s][0] != reference[s][0] for s in reference)
    # a pickled dataset (as it travels to a Ray actor) reads the same rows
    assert _rows(pickle.loads(pickle.dumps(_views(base, k))), 5) == reference


def test_view_random_is_a_function_of_seed_id_view_and_draw_only():
    ids, views = np.array([3, 9, 3, 4]), np.array([0, 0, 1, 0])
    a = ViewRandom(5, ids, views)
    first, second = a.bits(), a.bits()
    b = ViewRandom(5, ids[::-1].copy(), views[::-1].copy())
    np.testing.assert_array_equal(b.bits(), first[::-1])
    assert len(set(first.tolist())) == 4 and not np.array_equal(first, second)
    u = ViewRandom(5, np.arange(20_000), np.zeros(20_000, np.int64)).integers(-2, 3)
    counts = np.bincount(u + 2, minlength=5)
    assert counts.min() > 3_600 and counts.max() < 4_400  # uniform (expected 4,000 each)


def test_shift_flip_matches_a_pixel_by_pixel_reference():
    base = _images(num_records=40)
    views = _views(base, k=4)
    shard = views.read_shard(0)
    for j in range(len(shard["sample_id"])):
        dy, dx, flip = shard["augmentation"][j].tolist()
        image = base.inputs[int(shard["base_sample_id"][j]) - 500]
        np.testing.assert_array_equal(
            shard["inputs"][j], _shift_flip_reference(image, dy, dx, flip), err_msg=str(j)
        )
    assert shard["inputs"].dtype == np.uint8


class _Pixels(torch.nn.Module):
    """A tiny teacher on uint8 images [B, 6, 6]: a seeded linear layer on the pixels."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(36, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.float().flatten(1) / 255.0) * 4.0


def _teacher() -> kdcache.Teacher:
    return kdcache.Teacher.from_module(_Pixels(), name="pixels", config={"in": 36})


def _build(views: AugmentedViews, root: str) -> kdcache.CacheEntry:
    cache = kdcache.build_cache(
        views, _teacher(), temperature=TAU, root=root, executor="local", progress=False
    )
    assert isinstance(cache, kdcache.CacheEntry)
    return cache


def test_teacher_stage_stores_one_row_per_view_equal_to_the_teacher_on_the_augmented_input(
    tmp_path,
):
    base = _images()
    views = _views(base, k=4)
    entry = _build(views, str(tmp_path))
    teacher = _teacher()
    seen: list[int] = []
    for i in range(views.num_shards):
        ids, values = entry.read_shard(i)
        base_ids = base.read_shard(i)["sample_id"]
        assert sorted(ids.tolist()) == sorted(int(s) * 4 + v for s in base_ids for v in range(4))
        rows = views.read_shard(i)
        np.testing.assert_array_equal(ids, rows["sample_id"])
        # the augmented inputs rebuilt here, pixel by pixel, from the base images
        augmented = np.stack(
            [
                _shift_flip_reference(base.inputs[int(b) - 500], *p.tolist())
                for b, p in zip(rows["base_sample_id"], rows["augmentation"], strict=True)
            ]
        )
        want = (teacher.logits(augmented) / TAU).numpy()
        np.testing.assert_allclose(values, want, rtol=1e-6, atol=1e-6)
        # not the un-augmented image's target: the views differ
        plain = (teacher.logits(base.inputs[rows["base_sample_id"] - 500]) / TAU).numpy()
        assert not np.allclose(values, plain)
        seen += ids.tolist()
    assert len(seen) == len(set(seen)) == 4 * len(base)
    # the augmentation, K and seed are in the key
    assert _build(_views(base, k=4), str(tmp_path)).key == entry.key
    keys = {entry.key}
    for other in (_views(base, k=2), _views(base, k=4, seed=8), _views(base, k=4, max_shift=1)):
        keys.add(_build(other, str(tmp_path)).key)
    assert len(keys) == 4


def test_the_stream_replays_the_augmentation_the_teacher_saw(tmp_path):
    base = _images()
    entry = _build(_views(base, k=4), str(tmp_path))
    teacher = _teacher()
    stream = kdcache.SoftTargetDataset(entry, _views(base, k=4), batch_size=7, seed=3)
    total = 0
    for batch in stream:
        inputs = batch["inputs"].numpy()
        for j, (b, p) in enumerate(
            zip(batch["base_sample_id"], batch["augmentation"], strict=True)
        ):
            want = _shift_flip_reference(base.inputs[int(b) - 500], *p.tolist())
            np.testing.assert_array_equal(inputs[j], want)
        assert torch.equal(batch["sample_id"], batch["base_sample_id"] * 4 + batch["view"])
        want_lp = torch.log_softmax(teacher.logits(inputs) / TAU, dim=-1)
        torch.testing.assert_close(batch["teacher_log_probs"], want_lp, rtol=1e-5, atol=1e-5)
        labels = base.labels[batch["base_sample_id"].numpy() - 500]
        np.testing.assert_array_equal(batch["labels"].numpy(), labels)
        total += len(inputs)
    assert total == len(stream) * 7 and total > 4 * len(base) - 7


@pytest.mark.parametrize(
    ("other", "field"),
    [
        ({"max_shift": 1}, "augmentation_kwargs"),
        ({"k": 2}, "num_views"),
        ({"seed": 8}, "view_seed"),
        ({"path": "kdcache.data.views:identity"}, "augmentation"),
    ],
)
def test_the_join_refuses_another_augmentation_k_or_seed(tmp_path, other, field):
    base = _images()
    entry = _build(_views(base, k=4), str(tmp_path))
    if "path" in other:
        student = AugmentedViews(base, other["path"], num_views=4, seed=7)
    elif "k" in other:
        student = _views(base, k=other["k"])
    elif "seed" in other:
        student = _views(base, k=4, seed=other["seed"])
    else:
        student = _views(base, k=4, **other)
    with pytest.raises(SpecMismatchError, match=rf"shard 0 differs.*\b{field} ") as info:
        kdcache.SoftTargetDataset(entry, student, batch_size=4)
    assert "build the cache for this dataset" in str(info.value)
    # the base dataset alone (no views) is refused too
    with pytest.raises(
        SpecMismatchError, match=re.escape("augmentation 'pipelines.augment:shift_flip' -> None")
    ):
        kdcache.SoftTargetDataset(entry, base, batch_size=4)


def test_ids_that_would_overflow_are_refused():
    k = 4
    top = (np.iinfo(np.int64).max - (k - 1)) // k
    fine = ArrayDataset(np.array([top, -top]), np.zeros((2, 3, 3), np.uint8), num_shards=1)
    ids = _views(fine, k).read_shard(0)["sample_id"]
    assert ids.max() == np.iinfo(np.int64).max and ids.min() == -top * k
    over = ArrayDataset(np.array([0, top + 1]), np.zeros((2, 3, 3), np.uint8), num_shards=1)
    with pytest.raises(DataError, match=rf"sample_id {top + 1} .*overflows int64"):
        _views(over, k).read_shard(0)


def test_bad_settings_are_refused_with_what_to_do():
    base = _images()
    with pytest.raises(ConfigError, match="num_views must be an int >= 1"):
        AugmentedViews(base, SHIFT_FLIP, num_views=0)
    with pytest.raises(ConfigError, match="seed must be"):
        AugmentedViews(base, SHIFT_FLIP, num_views=2, seed=-1)
    with pytest.raises(ConfigError, match="JSON-able"):
        Augmentation(SHIFT_FLIP, {"max_shift": object()})
    with pytest.raises(ConfigError, match="without callable draw and apply"):
        AugmentedViews(base, "numpy:multiply", num_views=2).read_shard(0)
    with pytest.raises(DataError, match="failed to draw"):
        _views(base, max_shift=-1).read_shard(0)


def test_epoch_views_use_every_view_once_in_k_epochs():
    ids = np.arange(1000, 1300)
    k = 4
    per_epoch = np.stack([epoch_views(ids, e, k) for e in range(k)])
    assert (np.sort(per_epoch, axis=0) == np.arange(k)[:, None]).all()
    counts = np.bincount(per_epoch[0], minlength=k)
    assert counts.min() > 40  # one epoch spreads the samples over the views
    np.testing.assert_array_equal(epoch_views(ids, k, k), per_epoch[0])


def test_shift_flip_refuses_bad_shapes():
    rng = ViewRandom(0, np.arange(2), np.zeros(2, np.int64))
    params = shift_flip.draw(rng, max_shift=2)
    with pytest.raises(ValueError, match=r"images \[R, H, W\]"):
        shift_flip.apply(np.zeros((2, 9)), params)
    with pytest.raises(ValueError, match="exceeds max_shift=1"):
        shift_flip.apply(np.zeros((2, 4, 4)), np.array([[2, 0, 0], [0, 0, 0]]), max_shift=1)


def test_views_of_a_parquet_dataset_carry_its_digest_through_build_and_join(tmp_path):
    from pipelines.fashion_mnist import parquet_dataset, write_parquet_split

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (40, 28, 28)).astype(np.uint8)
    path = write_parquet_split(
        str(tmp_path / "train.parquet"), np.arange(40), images, rng.integers(0, 10, 40), 2
    )
    files = parquet_dataset(path, 2)
    views = AugmentedViews(files, Augmentation(SHIFT_FLIP, {"max_shift": 2}), num_views=3)
    reader = open_shard(views, 1, 4)
    rows = list(reader)
    base = open_shard(files, 1, 1 << 20)
    list(base)
    assert reader.digest is not None and reader.digest == base.digest
    assert sum(len(r["sample_id"]) for r in rows) == 60
    from pipelines.models import build_model

    torch.manual_seed(0)
    module = build_model("mlp", hidden=[8])
    teacher = kdcache.Teacher.from_module(module, name="flat", config={"in": 784})
    entry = kdcache.build_cache(
        views, teacher, temperature=TAU, root=str(tmp_path / "c"), executor="local", progress=False
    )
    assert entry.manifest_record(1).input_digest == base.digest
    stream = kdcache.SoftTargetDataset(entry, views, batch_size=8, seed=0)
    for batch in stream:
        with torch.no_grad():
            want = torch.log_softmax(module(batch["inputs"]) / TAU, dim=-1)
        torch.testing.assert_close(batch["teacher_log_probs"], want, rtol=1e-5, atol=1e-5)
