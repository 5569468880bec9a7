"""Combined entries (kdcache.stores.combined): an ensemble view combined once into one dense
entry, read by the stream in place of the view; the same values, a hit, a resume, the
refusals (re-tempering, rules that read the stream's rows, sparse views)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import kdcache
from kdcache import targets
from kdcache.errors import CacheCorruptError, CacheReadOnlyError, ConfigError, SpecMismatchError
from kdcache.stores.admin import verify
from kdcache.stores.combined import combinable, combined_entry, materialize
from kdcache.stores.view import EnsembleView
from kdcache.targets import EnsembleRule
from kdcache.testing import linear_teacher, toy_dataset

TAU = 2.0


@pytest.fixture
def built(root):
    ds = toy_dataset(96, num_shards=3)
    teachers = [linear_teacher(seed=s, name=f"t{s}") for s in range(3)]
    view = kdcache.build_cache(
        ds, teachers, temperature=TAU, root=root, executor="local", progress=False
    )
    assert isinstance(view, EnsembleView)
    return ds, view


def _view_log_probs(view: EnsembleView, index: int, tau: float) -> np.ndarray:
    _, scaled = view.read_shard(index)
    s = targets.retemper(torch.from_numpy(scaled), view.temperature, tau)
    return targets.combine_ensemble(s, rule=view.ensemble_rule).numpy()


@pytest.mark.parametrize("rule", ["mean_probs", "mean_logprobs", "confidence_max"])
@pytest.mark.parametrize("tau", [TAU, 1.0])
def test_the_combined_entry_holds_the_views_combination(built, rule, tau):
    _, view = built
    view = view.with_rule(rule)
    entry = view.materialize(tau)
    assert entry.is_complete and entry.is_combined and not view.entries[0].is_combined
    assert entry.temperature == tau and entry.vocab_size == view.vocab_size
    assert entry.key == combined_entry(view, tau).key
    assert entry.key != combined_entry(view, 3.0).key
    assert entry.key != combined_entry(view.with_rule("confidence_entropy"), tau).key
    for i in range(view.num_shards):
        ids, vals = entry.read_shard(i)
        np.testing.assert_array_equal(ids, view.read_shard(i)[0])
        assert vals.dtype == np.float32
        np.testing.assert_allclose(vals, _view_log_probs(view, i, tau), rtol=1e-5, atol=1e-4)
        # log-probabilities: every row sums to 1
        np.testing.assert_allclose(np.exp(vals.astype(np.float64)).sum(-1), 1.0, atol=1e-5)
    assert entry.manifest["combined_from"] == {
        "view": view.key,
        "entries": [e.key for e in view.entries],
    }
    assert entry.teacher_name == f"{rule}(t0, t1, t2)"
    assert verify(entry).ok


def test_a_second_materialize_is_a_hit_and_writes_nothing(built):
    _, view = built
    entry = view.materialize()
    manifest = os.path.join(entry.location.path, "manifest.json")
    before = os.stat(manifest).st_mtime_ns
    again = view.materialize()
    assert again.key == entry.key
    assert os.stat(manifest).st_mtime_ns == before


def test_an_interrupted_combination_resumes_with_the_missing_shards_only(built, monkeypatch):
    _, view = built
    entry = combined_entry(view)
    calls: list[int] = []
    real = EnsembleView.read_shard

    def read_shard(self, index, **kw):
        calls.append(index)
        if index == 2 and len(calls) == 3:
            raise OSError("the store went away")
        return real(self, index, **kw)

    monkeypatch.setattr(EnsembleView, "read_shard", read_shard)
    with pytest.raises(OSError, match="went away"):
        view.materialize()
    assert not entry.is_complete
    assert not os.path.exists(os.path.join(entry.location.path, "lease.json"))
    calls.clear()
    done = view.materialize()
    assert calls == [2] and done.is_complete


def test_a_damaged_shard_of_a_complete_combination_is_recomputed(built):
    _, view = built
    entry = view.materialize()
    good = entry.read_shard(1)[1].copy()
    os.remove(os.path.join(entry.shards_location.path, entry.shards[1].file))
    again = view.materialize()
    np.testing.assert_array_equal(again.read_shard(1)[1], good)


def test_the_stream_reads_the_combined_entry_when_it_exists(built):
    ds, view = built
    kw = {"batch_size": 16, "seed": 3, "temperature": 1.0, "retemper": True}
    on_the_fly = kdcache.SoftTargetDataset(view, ds, **kw)
    assert on_the_fly.combined_entry is None  # not made yet: combined at read time
    made = kdcache.SoftTargetDataset(view, ds, combined=True, **kw)
    assert made.combined_entry is not None and made.combined_entry.temperature == 1.0
    found = kdcache.SoftTargetDataset(view, ds, **kw)
    assert found.combined_entry is not None and found.combined_entry.key == made.combined_entry.key
    assert kdcache.SoftTargetDataset(view, ds, combined=False, **kw).combined_entry is None
    # another temperature is another combination: none is stored for it
    assert kdcache.SoftTargetDataset(view, ds, batch_size=16).combined_entry is None
    a = list(on_the_fly)
    b = list(found)
    assert len(a) == len(b) == len(on_the_fly)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["sample_id"], y["sample_id"])
        assert torch.equal(x["inputs"], y["inputs"])
        torch.testing.assert_close(
            x["teacher_log_probs"], y["teacher_log_probs"], rtol=1e-5, atol=1e-4
        )


def test_a_combined_entry_is_an_entry_that_opens_by_key(built, root):
    ds, view = built
    entry = view.materialize(1.0)
    opened = kdcache.open_cache(entry.key, root=root)
    stream = kdcache.SoftTargetDataset(opened, ds, batch_size=32, temperature=1.0)
    batch = next(iter(stream))
    assert batch["teacher_log_probs"].shape == (32, 5)
    # the stream passes the stored log-probabilities through: no second log_softmax
    ids, vals = entry.read_shard(0)
    rows = {int(s): j for j, s in enumerate(ids)}
    for sid, lp in zip(batch["sample_id"].tolist(), batch["teacher_log_probs"], strict=True):
        if sid in rows:
            assert torch.equal(lp, torch.from_numpy(vals[rows[sid]]))


def test_a_combination_is_never_re_tempered(built):
    ds, view = built
    entry = view.materialize()
    with pytest.raises(SpecMismatchError, match="cannot be re-tempered"):
        kdcache.SoftTargetDataset(entry, ds, batch_size=8, temperature=1.0, retemper=True)
    with pytest.raises(SpecMismatchError, match=r"cannot be re-tempered to 1\.0"):
        kdcache.SoftTargetDataset(entry, ds, batch_size=8, temperature=1.0)
    with pytest.raises(ConfigError, match="feature entry"):
        kdcache.SoftTargetDataset(entry, ds, batch_size=8, output="features")


@pytest.mark.parametrize(
    "rule, why",
    [
        (EnsembleRule("best_on_label"), "reads the stream's labels"),
        (
            EnsembleRule("route", routes={c: c % 3 for c in range(5)}, route_column="labels"),
            "inputs",
        ),
    ],
)
def test_rules_that_read_the_streams_rows_are_combined_at_read_time(built, rule, why):
    ds, view = built
    other = view.with_rule(rule)
    assert why in (combinable(other) or "")
    with pytest.raises(ConfigError, match="cannot be stored combined"):
        other.materialize()
    # the stream then combines per shard, as before
    stream = kdcache.SoftTargetDataset(other, ds, batch_size=16, combined=True)
    assert stream.combined_entry is None
    assert next(iter(stream))["teacher_log_probs"].shape == (16, 5)


def test_one_teacher_and_sparse_views_are_not_combined(root):
    ds = toy_dataset(48, num_shards=2)
    one = kdcache.build_cache(
        ds, [linear_teacher(seed=0)], temperature=TAU, root=root, executor="local", progress=False
    )
    with pytest.raises(ConfigError, match="one teacher"):
        materialize(kdcache.stores.view.as_view(one))
    sparse = kdcache.build_cache(
        ds,
        [linear_teacher(seed=s) for s in range(2)],
        temperature=TAU,
        root=root,
        executor="local",
        progress=False,
        kind="topk",
        params={"k": 2},
    )
    with pytest.raises(ConfigError, match="sparse"):
        sparse.materialize()


def test_members_that_saw_different_inputs_are_refused(built, monkeypatch):
    _, view = built
    from kdcache.stores import combined

    digests = iter(["xxh3_128:" + "0" * 32, "xxh3_128:" + "1" * 32, None])

    class Rec:
        def __init__(self) -> None:
            self.input_digest = next(digests)

    monkeypatch.setattr(type(view.entries[0]), "manifest_record", lambda self, i: Rec())
    with pytest.raises(CacheCorruptError, match="different input digests"):
        combined._input_digest(view, 0)


def test_a_combined_member_is_never_re_tempered_into_a_new_combination(built):
    """A combination cannot be re-tempered, also not as a member of another view."""
    _, view = built
    nested = EnsembleView([view.materialize(), view.entries[0]], "mean_probs")
    with pytest.raises(SpecMismatchError, match="cannot be re-tempered"):
        nested.materialize(1.0)
    assert not nested.combined_entry(TAU).is_complete  # nothing was written for 1.0
    assert nested.materialize(TAU).is_complete  # at its own temperature it combines


def test_a_read_only_root_is_a_clear_error_and_the_stream_combines_per_shard(
    built, monkeypatch, caplog
):
    ds, view = built

    def refuse(self, spec):
        raise PermissionError(13, "Permission denied", self.location.path)

    monkeypatch.setattr(kdcache.CacheEntry, "write_spec", refuse)
    with pytest.raises(CacheReadOnlyError, match="cannot store the combination") as err:
        view.materialize()
    assert "combined=False" in str(err.value)
    stream = kdcache.SoftTargetDataset(view, ds, batch_size=16, combined=True)
    assert stream.combined_entry is None
    assert "combining at read time" in caplog.text
    assert next(iter(stream))["teacher_log_probs"].shape == (16, 5)


def test_bad_combined_values_and_bad_options_write_nothing(built):
    ds, view = built
    with pytest.raises(ConfigError, match="combined must be None, True or False"):
        kdcache.SoftTargetDataset(view, ds, batch_size=16, combined=0)
    with pytest.raises(ConfigError):
        kdcache.SoftTargetDataset(view, ds, batch_size=0, combined=True)
    assert not view.combined_entry().location.exists("spec.json")


def test_a_combined_entry_at_another_temperature_says_what_to_do(built):
    ds, view = built
    entry = view.materialize()
    with pytest.raises(SpecMismatchError, match=r"materialize\(temperature\)"):
        kdcache.SoftTargetDataset(entry, ds, batch_size=8, temperature=1.0)


def test_a_damaged_combined_shard_names_the_command_that_recomputes_it(built):
    ds, view = built
    entry = view.materialize()
    path = os.path.join(entry.shards_location.path, entry.shards[0].file)
    with open(path, "r+b") as f:  # same size, other bytes
        f.seek(200)
        f.write(b"\x00" * 16)
    from kdcache.stores import entry as entry_mod

    entry_mod._VERIFIED.clear()
    with pytest.raises(CacheCorruptError, match="kdcache combine"):
        next(iter(kdcache.SoftTargetDataset(view, ds, batch_size=8, shuffle=False)))


def test_inspect_says_what_a_combined_entry_holds(built):
    from kdcache.stores.admin import describe

    _, view = built
    assert describe(view, num_samples=0)["combined_entry"] is None
    entry = view.materialize()
    assert describe(view, num_samples=0)["combined_entry"] == entry.key
    info = describe(entry, num_samples=1)
    assert info["combined_from"]["view"] == view.key and info["rule"] == "mean_probs"


def test_the_combination_does_not_depend_on_another_threads_timing():
    """The stored combination is computed on the CPU through numpy's exp and log
    (kdcache.targets.dense._exp_): torch's threaded CPU exp (MKL's vector math) was
    measured to lose accuracy on part of a tensor while another thread was busy. Two
    combinations of the same values, one with a busy thread alongside, agree bit for bit
    and with a float64 reference."""
    import threading

    g = torch.Generator().manual_seed(5)
    s = torch.randn(3, 2048, 10, generator=g) * 6
    stop = threading.Event()

    def busy() -> None:
        while not stop.is_set():
            np.exp(np.ones(50_000, dtype=np.float32)).sum()

    t = threading.Thread(target=busy)
    t.start()
    try:
        with_busy = targets.combine_ensemble(s, rule="mean_probs")
    finally:
        stop.set()
        t.join()
    alone = targets.combine_ensemble(s, rule="mean_probs")
    assert torch.equal(with_busy, alone)
    ref = torch.logsumexp(torch.log_softmax(s.double(), -1) - np.log(3.0), dim=0)
    assert float((alone.double() - ref).abs().max()) < 2e-6
