"""kdcache.targets against float64 numpy references, equivalences and properties.

Shape legend: K teachers, B rows, V vocabulary, S kept slots.
"""

from __future__ import annotations

import dataclasses
import doctest
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdcache import schema, targets
from kdcache.errors import ConfigError, TeacherOutputError
from kdcache.schema import TargetSpec
from kdcache.stores.codec import columns_to_sparse, sparse_to_columns, to_storage_dtype
from kdcache.targets.sparse import PAD_ID, SparseTargets

PROPERTY = settings(max_examples=25, deadline=None)


def np_log_softmax(x_BV: np.ndarray) -> np.ndarray:
    x = np.asarray(x_BV, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def logits(b: int, v: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, v, generator=g) * scale


def test_doctests_run():
    from kdcache.targets import dense, sparse

    results = [
        doctest.testmod(m, optionflags=doctest.NORMALIZE_WHITESPACE) for m in (dense, sparse)
    ]
    assert sum(r.attempted for r in results) >= 2 and sum(r.failed for r in results) == 0


# ---------------------------------------------------------------- temperature, dense


def test_scale_logits_is_float32_division():
    z = logits(3, 7).half()
    out = targets.scale_logits(z, 2.5)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), z.double().numpy() / 2.5, rtol=1e-6)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_scale_logits_refuses_bad_temperature(bad):
    with pytest.raises(ConfigError, match="temperature"):
        targets.scale_logits(logits(2, 3), bad)


def test_check_finite_names_teacher_and_sample():
    z = logits(4, 5)
    z[2, 1] = float("nan")
    with pytest.raises(TeacherOutputError, match=r"'big'.*sample_id 42"):
        targets.check_finite(z, teacher="big", sample_ids_B=[7, 8, 42, 9])
    with pytest.raises(TeacherOutputError):
        targets.scale_logits(z, 1.0)


def test_retemper_is_exact_against_float64():
    z = logits(5, 11).double()
    stored = (z / 4.0).float()
    got = targets.log_probs(targets.retemper(stored, 4.0, 1.5)).double().numpy()
    np.testing.assert_allclose(got, np_log_softmax(z.numpy() / 1.5), atol=2e-6)


@pytest.mark.parametrize("rule", targets.ENSEMBLE_RULES)
def test_combine_ensemble_against_float64(rule):
    s_KBV = torch.stack([logits(3, 6, seed=k) for k in range(3)])
    w = np.array([0.2, 0.5, 0.3])
    got = targets.combine_ensemble(s_KBV, rule=rule, weights=[2, 5, 3]).double().numpy()
    lp = np_log_softmax(s_KBV.double().numpy())
    if rule == "mean_probs":
        ref = np.log((w[:, None, None] * np.exp(lp)).sum(axis=0))
    else:
        ref = np_log_softmax((w[:, None, None] * lp).sum(axis=0))
    np.testing.assert_allclose(got, ref, atol=3e-6)


def _np_combine(s_KBV: np.ndarray, w_K: np.ndarray, rule: str) -> np.ndarray:
    """float64 reference in log space (logsumexp over teachers), any [K, ..., V]."""
    lp = np_log_softmax(s_KBV)
    w = np.asarray(w_K, np.float64).reshape((-1,) + (1,) * (lp.ndim - 1))
    if rule == "mean_logprobs":
        return np_log_softmax((w * lp).sum(axis=0))
    with np.errstate(divide="ignore"):
        a = lp + np.log(w)
    m = a.max(axis=0)
    return m + np.log(np.exp(a - m).sum(axis=0))


@pytest.mark.parametrize("rule", targets.ENSEMBLE_RULES)
def test_combine_ensemble_is_exact_where_linear_space_underflows(rule):
    """The one-pass mean of probabilities falls back to log space on rows that hold a
    probability too small for float32 (here log-probabilities down to -300), and matches
    float64 on every row, token-level [K, B, T, V] rows and zero weights included."""
    g = torch.Generator().manual_seed(3)
    s = torch.randn(3, 6, 4, 50, generator=g) * 3
    s[:, 1, 2, 7] -= 300.0  # far below exp's float32 range in every teacher
    s[0, 4, 0, :] *= 40.0  # one teacher with log-probabilities of -700 and below
    for w in ([1.0, 1.0, 1.0], [2.0, 0.0, 3.0]):
        got = targets.combine_ensemble(s, rule=rule, weights=w).double().numpy()
        ref = _np_combine(s.double().numpy(), np.array(w) / sum(w), rule)
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, ref, rtol=2e-6, atol=2e-5)
    assert float(targets.combine_ensemble(s, rule=rule)[1, 2, 7]) < -250.0


def test_combine_ensemble_at_the_edges_of_float32():
    """Scaled logits near the top of exp's range with a large V (the row's sum of V
    exps overflows without the shift), one teacher offset by 1e7 (its values would round
    the others away in a plain float32 mix): both rules still match float64."""
    g = torch.Generator().manual_seed(5)
    big_v = torch.stack(
        [79.0 + 0.5 * torch.rand(2, 32768, generator=g), 0.5 * torch.randn(2, 32768, generator=g)]
    )
    offset = torch.stack([torch.randn(4, 9, generator=g) + 1e7, torch.randn(4, 9, generator=g)])
    for s in (big_v, offset):
        for rule in targets.ENSEMBLE_RULES:
            got = targets.combine_ensemble(s, rule=rule).double()
            ref = torch.from_numpy(_np_combine(s.double().numpy(), np.array([0.5, 0.5]), rule))
            np.testing.assert_allclose(got.exp().sum(-1).numpy(), 1.0, rtol=1e-5)
            torch.testing.assert_close(got.exp(), ref.exp(), rtol=0, atol=2e-6)


def test_best_on_label_geometric_fallback_drops_zero_weights():
    """A teacher of weight 0 with a -inf entry leaves no NaN in the mean_logprobs
    fallback (0 * -inf never appears: zero weights drop out, as in the static rules)."""
    s = torch.stack([logits(4, 6, seed=k) for k in range(3)])
    s[1, :, 2] = float("-inf")
    labels = torch.tensor([1, -100, 3, -100])
    got = targets.combine_ensemble(
        s, rule="best_on_label", fallback="mean_logprobs", weights=[1, 0, 1], labels_B=labels
    )
    assert torch.isfinite(got).all()
    geo = targets.combine_ensemble(s[[0, 2]], rule="mean_logprobs")
    torch.testing.assert_close(got[[1, 3]], geo[[1, 3]])


def test_combine_ensemble_mean_logprobs_is_log_softmax_of_mixed_logits():
    """The identity the fused geometric mean rests on: per-teacher log-normalisers are a
    constant per row, so normalising once after mixing gives the same distribution."""
    s = torch.stack([logits(5, 9, seed=k, scale=8.0) for k in range(4)]).double()
    w = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    left = torch.log_softmax((torch.log_softmax(s, -1) * w[:, None, None]).sum(0), -1)
    right = torch.log_softmax((s * w[:, None, None]).sum(0), -1)
    torch.testing.assert_close(left, right, rtol=0, atol=1e-12)


def test_combine_ensemble_refuses_bad_rule_and_weights():
    s = torch.zeros(2, 1, 3)
    with pytest.raises(ConfigError, match="rule"):
        targets.combine_ensemble(s, rule="max")
    with pytest.raises(ConfigError):
        targets.combine_ensemble(s, weights=[1.0])
    with pytest.raises(ConfigError):
        targets.combine_ensemble(s, weights=[1.0, -1.0])


# ---------------------------------------------------------------- top-k


def test_topk_keeps_largest_with_exact_logprobs_and_tail():
    z = logits(4, 30)
    t = targets.topk_targets(z, 5)
    lp = np_log_softmax(z.numpy())
    ref_ids = np.argsort(-z.numpy(), axis=1)[:, :5]
    np.testing.assert_array_equal(t.ids_BS.numpy(), ref_ids)
    np.testing.assert_allclose(
        t.log_probs().double().numpy(), np.take_along_axis(lp, ref_ids, 1), atol=2e-6
    )
    ref_tail = 1.0 - np.exp(np.take_along_axis(lp, ref_ids, 1)).sum(axis=1)
    np.testing.assert_allclose(t.tail_log_mass().exp().double().numpy(), ref_tail, atol=2e-6)
    assert t.kind == "topk" and t.values_BS.dtype == torch.float32


def test_stored_tail_is_exact_where_the_derived_one_rounds_to_zero():
    z = torch.tensor([[30.0, 5.0, 4.0, 0.0, -2.0]])
    t = targets.topk_targets(z, 2)
    ref = np.log(np.exp(np_log_softmax(z.numpy())[0, 2:]).sum())  # about log(1e-11)
    assert float(t.tail_log_mass()[0]) == pytest.approx(ref, rel=1e-5)
    derived = dataclasses.replace(t, tail_log_mass_B=None).tail_log_mass()
    assert float(derived[0]) < ref - 5  # float32 1 - kept mass loses it


def test_topk_with_k_equal_v_has_no_tail():
    t = targets.topk_targets(logits(3, 8), 8)
    assert bool((t.tail_log_mass().exp() < 1e-6).all())


def test_topk_always_keeps_the_label():
    z = torch.tensor([[5.0, 4.0, 3.0, 0.0, -1.0], [5.0, 4.0, 3.0, 0.0, -1.0]])
    labels = torch.tensor([4, 1])
    t = targets.topk_targets(z, 2, labels_B=labels)
    assert t.num_slots == 3
    assert t.ids_BS.tolist() == [[0, 1, 4], [0, 1, PAD_ID]]
    lp = np_log_softmax(z.numpy())
    assert t.log_probs()[0, 2].item() == pytest.approx(lp[0, 4], abs=1e-6)
    assert t.log_probs()[1, 2].item() == float("-inf")
    # ignore_index rows get a pad too
    t2 = targets.topk_targets(z, 2, labels_B=torch.tensor([-100, 4]))
    assert t2.ids_BS[:, 2].tolist() == [PAD_ID, 4]


def test_topk_refuses_bad_arguments():
    z = logits(2, 6)
    for k in (0, 7):
        with pytest.raises(ConfigError, match="k must be"):
            targets.topk_targets(z, k)
    with pytest.raises(ConfigError, match="labels"):
        targets.topk_targets(z, 2, labels_B=torch.tensor([0, 6]))
    with pytest.raises(ConfigError, match="temperature"):
        targets.topk_targets(z, 2, grid_temperatures=[1.0])
    with pytest.raises(ConfigError, match=r"\[B, V\]"):
        targets.topk_targets(z[None], 2)
    bad = z.clone()
    bad[1, 0] = float("inf")
    with pytest.raises(TeacherOutputError):
        targets.topk_targets(bad, 2)


def test_log_partition_grid_retempers_exactly():
    raw = logits(3, 40, scale=4.0).double()
    tau = 2.0
    t = targets.topk_targets((raw / tau).float(), 6, temperature=tau, grid_temperatures=[1.0, 4.0])
    assert t.log_partition_grid_BG is not None and t.log_partition_grid_BG.shape == (3, 2)
    for to in (1.0, 4.0):
        r = targets.retemper_sparse(t, tau, to)
        lp = np_log_softmax(raw.numpy() / to)
        kept = np.take_along_axis(lp, t.ids_BS.numpy(), 1)
        np.testing.assert_allclose(r.log_probs().double().numpy(), kept, atol=3e-6)
        np.testing.assert_allclose(
            r.tail_log_mass().exp().double().numpy(), 1 - np.exp(kept).sum(1), atol=3e-6
        )
    assert targets.retemper_sparse(t, tau, tau) is t
    with pytest.raises(ConfigError, match="grid"):
        targets.retemper_sparse(t, tau, 3.0)


# ---------------------------------------------------------------- top-p


def np_nucleus(row_logits: np.ndarray, top_p: float, min_k: int, max_k: int) -> list[int]:
    p = np.exp(np_log_softmax(row_logits))
    order = np.argsort(-row_logits, kind="stable")
    kept, mass = [], 0.0
    for i in order:
        if len(kept) >= max_k:
            break
        if mass >= top_p and len(kept) >= min_k:
            break
        kept.append(int(i))
        mass += p[i]
    return kept


@pytest.mark.parametrize(("top_p", "min_k", "max_k"), [(0.5, 1, 20), (0.9, 2, 20), (0.99, 1, 4)])
def test_topp_is_the_true_nucleus(top_p, min_k, max_k):
    z = logits(6, 25, seed=3, scale=2.0)
    t = targets.topp_targets(z, top_p, min_k=min_k, max_k=max_k)
    assert t.kind == "topp" and t.num_slots == max_k
    for b in range(6):
        got = [i for i in t.ids_BS[b].tolist() if i != PAD_ID]
        assert got == np_nucleus(z[b].numpy(), top_p, min_k, max_k)


def test_topp_refuses_bad_arguments():
    z = logits(2, 6)
    for kw in (
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(top_p=0.5, min_k=3, max_k=2),
        dict(top_p=0.5, max_k=7),
        dict(top_p=0.5, min_k=0),
    ):
        with pytest.raises(ConfigError):
            targets.topp_targets(z, **kw)


@PROPERTY
@given(
    st.integers(0, 10_000),
    st.floats(0.05, 1.0),
    st.integers(1, 4),
)
def test_topp_property_minimal_prefix_reaching_p(seed, top_p, min_k):
    z = logits(3, 12, seed=seed, scale=2.0)
    t = targets.topp_targets(z, top_p, min_k=min_k, max_k=12)
    p_BS = t.log_probs().exp()
    for b in range(3):
        n = int(t.valid_BS[b].sum())
        mass = float(p_BS[b, :n].sum())
        assert n >= min_k
        assert mass >= top_p - 1e-5 or n == 12
        if n > min_k:  # dropping the last kept id would fall short of top_p
            assert mass - float(p_BS[b, n - 1]) < top_p + 1e-6


# ---------------------------------------------------------------- sampled


def test_sampled_counts_ids_and_exact_values():
    z = logits(4, 20, scale=2.0)
    t = targets.sampled_targets(z, 16, generator=torch.Generator().manual_seed(0))
    assert t.kind == "sampled" and t.counts_BS is not None
    assert t.counts_BS.sum(dim=1).tolist() == [16] * 4
    assert bool(((t.counts_BS > 0) == t.valid_BS).all())
    lp = np_log_softmax(z.numpy())
    for b in range(4):
        ids = [i for i in t.ids_BS[b].tolist() if i != PAD_ID]
        assert len(ids) == len(set(ids)) and ids == sorted(ids)
        np.testing.assert_allclose(
            t.log_probs()[b, : len(ids)].double().numpy(), lp[b, ids], atol=2e-6
        )
    est = t.estimate_log_probs().exp()
    assert torch.allclose(est.sum(dim=1), torch.ones(4))


def test_sampled_estimate_is_unbiased():
    z = logits(1, 6, seed=5, scale=1.5)
    rows = 3000
    t = targets.sampled_targets(
        z.expand(rows, 6).contiguous(), 8, generator=torch.Generator().manual_seed(1)
    )
    p_hat_V = torch.zeros(6)
    p_hat_V.index_put_(
        (t.ids_BS[t.valid_BS],), t.estimate_log_probs().exp()[t.valid_BS], accumulate=True
    )
    p_hat_V /= rows
    p = torch.softmax(z[0], dim=-1)
    sigma = torch.sqrt(p * (1 - p) / (8 * rows))
    assert bool(((p_hat_V - p).abs() < 5 * sigma + 1e-4).all()), (p_hat_V, p)


def test_sampled_keeps_undrawn_label_with_zero_count():
    z = torch.tensor([[10.0, 0.0, -10.0]])
    t = targets.sampled_targets(
        z, 4, labels_B=torch.tensor([2]), generator=torch.Generator().manual_seed(0)
    )
    assert t.ids_BS[0, -1].item() == 2 and t.counts_BS is not None
    assert t.counts_BS[0, -1].item() == 0
    assert t.log_probs()[0, -1].item() == pytest.approx(np_log_softmax(z.numpy())[0, 2], abs=1e-4)


# ---------------------------------------------------------------- container and columns


def test_sparse_targets_validates_fields():
    ids = torch.zeros(2, 3, dtype=torch.int64)
    vals = torch.zeros(2, 3)
    lz = torch.zeros(2)
    with pytest.raises(ConfigError, match="kind"):
        SparseTargets(ids, vals, lz, "topq")
    with pytest.raises(ConfigError, match="int64"):
        SparseTargets(ids.int(), vals, lz, "topk")
    with pytest.raises(ConfigError, match="values_BS"):
        SparseTargets(ids, vals[:, :2], lz, "topk")
    with pytest.raises(ConfigError, match="log_partition_B"):
        SparseTargets(ids, vals, torch.zeros(3), "topk")
    with pytest.raises(ConfigError, match="counts_BS"):
        SparseTargets(ids, vals, lz, "sampled")
    with pytest.raises(ConfigError, match="grid"):
        SparseTargets(ids, vals, lz, "topk", grid_temperatures=(1.0,))


def _round_trip(t, dtype="float32", grid=()):
    """Through the production codec (kdcache.stores.codec), as a shard is written and read."""
    spec = TargetSpec(1.0, kind=t.kind, storage_dtype=dtype, params=_params(t.kind, grid=grid))
    ids = np.arange(t.num_rows, dtype=np.int64)
    cols, _ = sparse_to_columns(ids, t, spec, 30, "test")
    return cols, columns_to_sparse(cols, "test")


def _params(kind, grid=()):
    base = {"topk": {"k": 10}, "topp": {"top_p": 0.8, "max_k": 10}, "sampled": {"num_samples": 5}}
    out = dict(base[kind])
    if grid:
        out["grid_temperatures"] = list(grid)
    return out


@pytest.mark.parametrize("dtype", schema.STORAGE_DTYPES)
def test_columns_round_trip_without_inf(dtype):
    z = logits(5, 30)
    t = targets.topp_targets(
        z, 0.8, max_k=10, labels_B=torch.arange(5), temperature=1.0, grid_temperatures=[2.0]
    )
    cols, back = _round_trip(t, dtype, grid=[2.0])
    vals = cols.entries[schema.COL_VALUES]
    if dtype != "bfloat16":
        assert np.isfinite(vals).all()
    # the codec drops pads, so compare kept entries by id, not by slot
    assert torch.equal(_by_id(back, back.ids_BS), _by_id(t, t.ids_BS))
    want = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    assert back.values_BS.dtype == want[dtype]
    tol = {"float32": 1e-6, "float16": 1e-2, "bfloat16": 8e-2}[dtype]
    a, b = _by_id(back, back.log_probs()), _by_id(t, t.log_probs())
    assert torch.equal(torch.isfinite(a), torch.isfinite(b))
    assert (a - b)[torch.isfinite(b)].abs().max() <= tol
    assert bool(torch.isneginf(back.values_BS[~back.valid_BS]).all())


def _by_id(t, x_BS, vocab=30):
    """[B, V]: x at each kept id, -inf (or -1) elsewhere."""
    fill = -1 if x_BS.dtype == torch.int64 else float("-inf")
    out = torch.full((t.num_rows, vocab), fill, dtype=x_BS.dtype)
    rows = torch.arange(t.num_rows)[:, None].expand_as(t.ids_BS)
    valid = t.valid_BS
    out[rows[valid], t.ids_BS[valid]] = x_BS[valid]
    return out


def test_columns_keep_counts():
    t = targets.sampled_targets(logits(2, 9), 5, generator=torch.Generator().manual_seed(0))
    _, back = _round_trip(t)
    assert back.counts_BS is not None and t.counts_BS is not None
    assert torch.equal(back.counts_BS, t.counts_BS)


# ---------------------------------------------------------------- sparse ensembles


def test_sparse_ensemble_with_full_supports_equals_dense():
    s_KBV = torch.stack([logits(3, 7, seed=k) for k in range(2)])
    sparse = [targets.topk_targets(s_KBV[k], 7) for k in range(2)]
    m = targets.combine_sparse_ensemble(sparse, weights=[1, 3])
    dense = targets.combine_ensemble(s_KBV, weights=[1, 3])
    got = torch.full((3, 7), float("-inf")).scatter(1, m.ids_BS.clamp(min=0), m.log_probs())
    assert m.kind == "mixture"
    assert torch.allclose(got, dense, atol=2e-6)


def test_sparse_ensemble_with_different_supports():
    z0, z1 = logits(2, 12, seed=1), logits(2, 12, seed=2)
    t0, t1 = targets.topk_targets(z0, 3), targets.topk_targets(z1, 4)
    m = targets.combine_sparse_ensemble([t0, t1], weights=[0.25, 0.75])
    p0, p1 = np.exp(np_log_softmax(z0.numpy())), np.exp(np_log_softmax(z1.numpy()))
    for b in range(2):
        ref: dict[int, float] = {}
        for p, t, w in ((p0, t0, 0.25), (p1, t1, 0.75)):
            for i in t.ids_BS[b].tolist():
                ref[i] = ref.get(i, 0.0) + w * p[b, i]
        got = {
            int(i): float(v)
            for i, v in zip(m.ids_BS[b].tolist(), m.log_probs()[b].exp().tolist(), strict=True)
            if i != PAD_ID
        }
        assert set(got) == set(ref)
        for i in ref:
            assert got[i] == pytest.approx(ref[i], abs=2e-6)
        tail_ref = 0.25 * (1 - p0[b, t0.ids_BS[b]].sum()) + 0.75 * (1 - p1[b, t1.ids_BS[b]].sum())
        assert float(m.tail_log_mass()[b].exp()) == pytest.approx(tail_ref, abs=3e-6)


def test_sparse_ensemble_refusals():
    t = targets.topk_targets(logits(2, 5), 2)
    s = targets.sampled_targets(logits(2, 5), 3, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match="mean_logprobs"):
        targets.combine_sparse_ensemble([t, t], rule="mean_logprobs")
    with pytest.raises(ConfigError, match="sampled"):
        targets.combine_sparse_ensemble([t, s])
    with pytest.raises(ConfigError, match="rows"):
        targets.combine_sparse_ensemble([t, targets.topk_targets(logits(3, 5), 2)])
    with pytest.raises(ConfigError):
        targets.combine_sparse_ensemble([])


# ---------------------------------------------------------------- storage dtypes


def test_float16_overflow_is_refused():
    with pytest.raises(TeacherOutputError, match="float16"):
        to_storage_dtype(np.array([[1.0, 7e4]], np.float32), "float16", "test")
    ok = to_storage_dtype(np.array([[65504.0, -3.0]], np.float32), "float16", "test")
    assert ok.dtype == np.float16 and bool(np.isfinite(ok).all())


def test_bfloat16_near_float32_max_is_refused():
    x = np.array([[3.4e38]], np.float32)
    assert to_storage_dtype(x, "float32", "test").dtype == np.float32
    with pytest.raises(TeacherOutputError, match="bfloat16"):
        to_storage_dtype(x, "bfloat16", "test")
    bits = to_storage_dtype(np.array([[1e30]], np.float32), "bfloat16", "test")
    assert bits.dtype == np.uint16
    assert torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float().item() == (
        pytest.approx(1e30, rel=1e-2)
    )


def test_storage_dtype_refusals():
    with pytest.raises(ConfigError, match="storage dtype"):
        to_storage_dtype(np.zeros((1, 2), np.float32), "int8", "test")
    with pytest.raises(TeacherOutputError):
        to_storage_dtype(np.array([[float("nan")]], np.float32), "float32", "test")


def test_sparse_columns_refuse_overflowing_values():
    t = targets.topk_targets(torch.tensor([[1e5, 0.0, -1.0]]), 2)
    spec = TargetSpec(1.0, kind="topk", storage_dtype="float16", params={"k": 2})
    with pytest.raises(TeacherOutputError, match="float16"):
        sparse_to_columns(np.zeros(1, np.int64), t, spec, 3, "test")


# ---------------------------------------------------------------- vocabularies


def test_trim_vocab_drops_padding_columns():
    z = logits(2, 64)
    trimmed = targets.trim_vocab(z, 50)
    assert trimmed.shape == (2, 50) and torch.equal(trimmed, z[:, :50])
    with pytest.raises(ConfigError, match="65"):
        targets.trim_vocab(z, 65, name="t1")


def test_check_vocabularies():
    assert targets.check_vocabularies({"a": 50, "b": 50}) == 50
    with pytest.raises(ConfigError, match=r"a=50, student=49"):
        targets.check_vocabularies({"a": 50, "student": 49})
    with pytest.raises(ConfigError, match="different tokens"):
        targets.check_vocabularies({"a": 5, "b": 5}, fingerprints={"a": "x", "b": "y"})


# ---------------------------------------------------------------- properties


@PROPERTY
@given(st.integers(0, 10_000), st.integers(1, 16), st.floats(0.1, 8.0))
def test_topk_mass_is_exactly_one(seed, k, scale):
    z = logits(3, 16, seed=seed, scale=scale)
    t = targets.topk_targets(z, k)
    kept = t.log_probs().double().exp().sum(dim=1)
    total = kept + t.tail_log_mass().double().exp()
    assert torch.allclose(total, torch.ones(3, dtype=torch.float64), atol=1e-5)
    assert math.isfinite(float(t.log_partition_B.sum()))
