"""kdcache.losses against float64 numpy references, equivalences and properties.

Shape legend: K teachers, B batch, T tokens, V vocabulary, S kept slots, D/E feature widths.
"""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import functional as F  # noqa: N812

from kdcache import losses, targets
from kdcache.errors import ConfigError

PROPERTY = settings(max_examples=20, deadline=None)
NEG_INF = float("-inf")


def num(x) -> float:
    """A Python float from a tensor (detached: no autograd warning) or a number."""
    return float(x.detach()) if isinstance(x, torch.Tensor) else float(x)


def rand(*shape: int, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def np_kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0)
    return t.sum(axis=-1)


def np_divergence(kind: str, p: np.ndarray, q: np.ndarray, beta=0.5, skew=0.1) -> np.ndarray:
    """Independent float64 references, straight from the papers' formulas."""
    if kind == "forward_kl":
        return np_kl(p, q)
    if kind == "reverse_kl":
        return np_kl(q, p)
    if kind == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * np_kl(p, m) + (1 - beta) * np_kl(q, m)
    if kind == "skew_kl":
        return np_kl(p, skew * p + (1 - skew) * q)
    if kind == "skew_reverse_kl":
        return np_kl(q, (1 - skew) * p + skew * q)
    if kind == "total_variation":
        return 0.5 * np.abs(p - q).sum(axis=-1)
    raise AssertionError(kind)


def dense_case(b=5, v=13, tau=2.0, seed=0):
    s = rand(b, v, seed=seed)
    z = rand(b, v, seed=seed + 100, scale=3.0)
    return s, targets.log_probs(z / tau), z


def test_doctests_run():
    from kdcache.losses import divergences, features, kd

    results = [
        doctest.testmod(m, optionflags=doctest.NORMALIZE_WHITESPACE)
        for m in (divergences, kd, features)
    ]
    assert sum(r.attempted for r in results) >= 2 and sum(r.failed for r in results) == 0


# ---------------------------------------------------------------- dense vs float64


@pytest.mark.parametrize("kind", losses.DIVERGENCES)
def test_dense_divergences_match_float64(kind):
    tau = 2.0
    s, lp, _ = dense_case(tau=tau)
    lp[0, :3] = NEG_INF  # teacher with zero mass on some ids
    lp = torch.log_softmax(lp, dim=-1)
    got = losses.divergence(s, lp, temperature=tau, kind=kind, beta=0.3, skew=0.2)
    p = np.exp(lp.double().numpy())
    q = np.exp(np_log_softmax(s.double().numpy() / tau))
    ref = np_divergence(kind, p, q, beta=0.3, skew=0.2)
    np.testing.assert_allclose(got.double().numpy(), ref, rtol=2e-5, atol=2e-6)


def test_named_functions_match_divergence():
    s, lp, _ = dense_case()
    pairs = [
        (losses.forward_kl, "forward_kl", {}),
        (losses.reverse_kl, "reverse_kl", {}),
        (losses.jsd, "jsd", {"beta": 0.7}),
        (losses.skew_kl, "skew_kl", {"skew": 0.3}),
        (losses.skew_reverse_kl, "skew_reverse_kl", {"skew": 0.3}),
        (losses.total_variation, "total_variation", {}),
    ]
    for fn, kind, kw in pairs:
        a = fn(s, lp, temperature=2.0, **kw)
        b = losses.divergence(s, lp, temperature=2.0, kind=kind, **kw)
        assert a.shape == (5,) and torch.equal(a, b)


def test_skew_zero_is_plain_kl():
    s, lp, _ = dense_case()
    fk = losses.forward_kl(s, lp, temperature=2.0)
    rk = losses.reverse_kl(s, lp, temperature=2.0)
    assert torch.allclose(losses.skew_kl(s, lp, temperature=2.0, skew=0.0), fk)
    assert torch.allclose(losses.skew_reverse_kl(s, lp, temperature=2.0, skew=0.0), rk)
    assert not torch.allclose(losses.skew_kl(s, lp, temperature=2.0, skew=0.3), fk)


def test_kd_loss_matches_float64_with_alpha_tau2_and_unlabelled_rows():
    tau, alpha = 3.0, 0.7
    s, lp, _ = dense_case(tau=tau)
    labels = torch.tensor([1, -100, 4, 0, -100])
    got = losses.kd_loss(s, lp, temperature=tau, alpha=alpha, labels_B=labels)
    p = np.exp(lp.double().numpy())
    q = np.exp(np_log_softmax(s.double().numpy() / tau))
    kl = np_kl(p, q).mean()  # batchmean over all rows, labelled or not
    lq1 = np_log_softmax(s.double().numpy())
    ce = -np.mean([lq1[b, y] for b, y in enumerate(labels.tolist()) if y != -100])
    assert num(got) == pytest.approx(alpha * tau**2 * kl + (1 - alpha) * ce, rel=2e-6)
    unscaled = losses.kd_loss(s, lp, temperature=tau, scale_by_temperature_squared=False)
    assert num(unscaled) == pytest.approx(kl, rel=2e-6)


def test_kd_loss_refusals():
    s, lp, _ = dense_case()
    with pytest.raises(ConfigError, match="alpha"):
        losses.kd_loss(s, lp, temperature=1.0, alpha=1.5)
    with pytest.raises(ConfigError, match="labels_B"):
        losses.kd_loss(s, lp, temperature=1.0, alpha=0.5)
    with pytest.raises(ConfigError, match="same shape"):
        losses.kd_loss(s, lp[:, :-1], temperature=1.0)
    with pytest.raises(ConfigError, match="temperature"):
        losses.kd_loss(s, lp, temperature=0.0)
    with pytest.raises(ConfigError, match="divergence"):
        losses.kd_loss(s, lp, temperature=1.0, divergence="hellinger")
    with pytest.raises(ConfigError, match="beta"):
        losses.kd_loss(s, lp, temperature=1.0, divergence="jsd", beta=1.0)
    with pytest.raises(ConfigError, match="skew"):
        losses.kd_loss(s, lp, temperature=1.0, divergence="skew_kl", skew=1.0)
    with pytest.raises(ConfigError, match="mask"):
        losses.kd_loss(s, lp, temperature=1.0, mask=torch.ones(4, dtype=torch.bool))
    with pytest.raises(ConfigError, match="bool"):
        losses.kd_loss(s, lp, temperature=1.0, mask=torch.ones(5))


def test_cross_entropy_matches_torch_and_chunks():
    s = rand(7, 11, seed=3)
    y = torch.tensor([1, 2, -100, 10, 0, -100, 5])
    ref = F.cross_entropy(s.double(), y, ignore_index=-100)
    for chunk in (None, 1, 3):
        got = losses.cross_entropy(s, y, chunk_rows=chunk)
        assert num(got) == pytest.approx(num(ref), rel=1e-6)
    a = s.clone().requires_grad_()
    b = s.double().clone().requires_grad_()
    losses.cross_entropy(a, y, chunk_rows=2).backward()
    F.cross_entropy(b, y, ignore_index=-100).backward()
    assert a.grad is not None and b.grad is not None
    assert torch.allclose(a.grad.double(), b.grad, atol=1e-7)
    with pytest.raises(ConfigError, match="labels"):
        losses.cross_entropy(s, torch.full((7,), 11))


# ---------------------------------------------------------------- temperature squared


def test_tau_squared_gradient_scaling():
    """Hinton et al. sec. 2: with zero-mean logits and large tau, the gradient of
    tau^2 * KL w.r.t. the student logits tends to (z_s - z_t) / V, independent of tau;
    without tau^2 it shrinks like 1 / tau^2."""
    v = 10
    zs = rand(1, v, seed=1)
    zt = rand(1, v, seed=2)
    zs, zt = zs - zs.mean(), zt - zt.mean()
    limit = (zs - zt) / v
    grads = {}
    for tau in (1.0, 20.0, 50.0):
        for scaled in (True, False):
            x = zs.clone().requires_grad_()
            loss = losses.kd_loss(
                x,
                targets.log_probs(zt / tau),
                temperature=tau,
                scale_by_temperature_squared=scaled,
            )
            (g,) = torch.autograd.grad(loss, x)
            grads[tau, scaled] = g
    for tau in (20.0, 50.0):
        assert torch.allclose(grads[tau, True], grads[tau, False] * tau**2, rtol=1e-5)
    rel = lambda g: num((g - limit).norm() / limit.norm())  # noqa: E731
    assert rel(grads[50.0, True]) < 0.02 < rel(grads[1.0, True])
    assert rel(grads[20.0, True]) < 0.05
    assert num(grads[50.0, False].norm()) < num(grads[1.0, False].norm()) / 100


# ---------------------------------------------------------------- sparse equivalences


@pytest.mark.parametrize("kind", losses.DIVERGENCES)
def test_sparse_topk_with_k_equal_v_equals_dense(kind):
    tau = 1.5
    s, lp, z = dense_case(b=6, v=17, tau=tau)
    sparse = targets.topk_targets(z / tau, 17, labels_B=torch.arange(6))
    a = s.clone().requires_grad_()
    b = s.clone().requires_grad_()
    dense = losses.divergence(a, lp, temperature=tau, kind=kind)
    spar = losses.divergence(b, sparse, temperature=tau, kind=kind, chunk_rows=4)
    assert torch.allclose(dense, spar, atol=2e-6, rtol=1e-5)
    dense.sum().backward()
    spar.sum().backward()
    assert a.grad is not None and b.grad is not None
    assert torch.allclose(a.grad, b.grad, atol=1e-6)


def np_bucket(kind: str, z_t: np.ndarray, z_s: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Float64 reference of the tail-bucket form: kept ids + one bucket for the rest."""
    p = np.exp(np_log_softmax(z_t))
    q = np.exp(np_log_softmax(z_s))
    pk = np.take_along_axis(p, ids, 1)
    qk = np.take_along_axis(q, ids, 1)
    pb = np.concatenate([pk, 1 - pk.sum(1, keepdims=True)], 1)
    qb = np.concatenate([qk, 1 - qk.sum(1, keepdims=True)], 1)
    return np_divergence(kind, pb, qb)


@pytest.mark.parametrize("kind", losses.DIVERGENCES)
def test_sparse_topk_tail_bucket_matches_float64_and_bounds_dense(kind):
    tau = 2.0
    s, lp, z = dense_case(b=6, v=40, tau=tau, seed=4)
    sparse = targets.topk_targets(z / tau, 5)
    got = losses.divergence(s, sparse, temperature=tau, kind=kind)
    ref = np_bucket(kind, z.double().numpy() / tau, s.double().numpy() / tau, sparse.ids_BS.numpy())
    np.testing.assert_allclose(got.double().numpy(), ref, rtol=1e-4, atol=2e-6)
    # Data-processing inequality: merging the tail can only lose divergence.
    dense = losses.divergence(s, lp, temperature=tau, kind=kind)
    assert bool((got <= dense + 1e-6).all())
    assert bool((got < dense - 1e-4).any())


@pytest.mark.parametrize("kind", ["forward_kl", "jsd", "total_variation"])
def test_chunked_equals_unchunked(kind):
    tau = 2.0
    s, _, z = dense_case(b=9, v=31, tau=tau, seed=7)
    sparse = targets.topp_targets(z / tau, 0.8, max_k=6, labels_B=torch.arange(9))
    mask = torch.tensor([1, 1, 0, 1, 0, 1, 1, 1, 0], dtype=torch.bool)
    out = {}
    for chunk in (None, 1, 4, 100):
        x = s.clone().requires_grad_()
        loss = losses.kd_loss(
            x,
            sparse,
            temperature=tau,
            divergence=kind,
            alpha=0.6,
            labels_B=torch.arange(9),
            mask=mask,
            chunk_rows=chunk,
        )
        (g,) = torch.autograd.grad(loss, x)
        out[chunk] = (loss, g)
    for chunk in (1, 4, 100):
        assert torch.allclose(out[chunk][0], out[None][0], atol=1e-7)
        assert torch.allclose(out[chunk][1], out[None][1], atol=1e-8)
    assert bool((out[None][1][~mask].abs().sum(dim=1) > 0).all())  # CE still reaches them


def test_sparse_student_grad_is_right_against_autograd():
    s = rand(4, 12, seed=9)
    ids = torch.tensor([[3, 1, -1], [0, 11, 5], [-1, -1, -1], [7, -1, 2]])
    w_kept = rand(4, 3, seed=10)
    w_tail = rand(4, seed=11)
    x = s.clone().requires_grad_()
    kept, tail = losses.sparse_student_log_probs(x, ids, temperature=1.7, chunk_rows=3)
    obj = (torch.where(ids >= 0, kept, 0.0) * w_kept).sum() + (tail * w_tail).sum()
    (g,) = torch.autograd.grad(obj, x)
    y = s.double().clone().requires_grad_()
    lq = torch.log_softmax(y / 1.7, dim=-1)
    ref = 0.0
    for b in range(4):
        keep = [i for i in ids[b].tolist() if i >= 0]
        rest = [j for j in range(12) if j not in keep]
        ref = ref + sum(
            num(w_kept[b, k]) * lq[b, i] for k, i in enumerate(ids[b].tolist()) if i >= 0
        )
        ref = ref + num(w_tail[b]) * torch.logsumexp(lq[b, rest], dim=0)
    (g_ref,) = torch.autograd.grad(ref, y)
    assert torch.allclose(g.double(), g_ref, atol=1e-6)


@pytest.mark.parametrize("peak", [30.0, 95.0, 200.0])
def test_sparse_student_underflowing_tail_is_exact(peak):
    """Tails of e^-30, e^-95 (denormal in float32) and e^-200 (underflows): the log-space
    fallbacks keep log q_tail and its gradient right."""
    s = torch.zeros(2, 6)
    s[:, 0] = peak
    s[1, 1] = peak - 1.0
    ids = torch.tensor([[0, -1], [0, 1]])
    w_tail = torch.tensor([0.7, -1.3])
    x = s.clone().requires_grad_()
    kept, tail = losses.sparse_student_log_probs(x, ids, temperature=1.0)
    (g,) = torch.autograd.grad((tail * w_tail).sum() + kept[:, 0].sum(), x)
    y = s.double().clone().requires_grad_()
    lq = torch.log_softmax(y, dim=-1)
    tail_ref = torch.stack([torch.logsumexp(lq[0, 1:], 0), torch.logsumexp(lq[1, 2:], 0)])
    (g_ref,) = torch.autograd.grad((tail_ref * w_tail.double()).sum() + lq[:, 0].sum(), y)
    assert torch.allclose(tail.double(), tail_ref, rtol=1e-5)
    assert bool(torch.isfinite(g).all())
    assert torch.allclose(g.double(), g_ref, atol=1e-6, rtol=1e-4)


def test_sparse_loss_in_bfloat16_keeps_dtype_and_matches_float32():
    tau = 2.0
    s, _, z = dense_case(b=8, v=64, tau=tau)
    sparse = targets.topk_targets(z / tau, 8)
    a = s.bfloat16().requires_grad_()
    b = s.bfloat16().float().requires_grad_()
    la = losses.kd_loss(a, sparse, temperature=tau)
    lb = losses.kd_loss(b, sparse, temperature=tau)
    la.backward()
    lb.backward()
    assert la.dtype == torch.float32 and a.grad is not None and a.grad.dtype == torch.bfloat16
    assert num(la) == pytest.approx(num(lb), rel=1e-6)
    assert b.grad is not None and torch.allclose(a.grad.float(), b.grad, atol=1e-2)


def test_sampled_forward_kl_is_unbiased_and_gradient_too():
    tau = 1.0
    v, rows = 6, 4000
    zt = rand(1, v, seed=21, scale=1.5)
    zs = rand(1, v, seed=22)
    sampled = targets.sampled_targets(
        (zt / tau).expand(rows, v).contiguous(), 4, generator=torch.Generator().manual_seed(3)
    )
    x = zs.expand(rows, v).clone().requires_grad_()
    est = losses.forward_kl(x, sampled, temperature=tau)
    est.mean().backward()
    y = zs.clone().requires_grad_()
    exact = losses.forward_kl(y, targets.log_probs(zt / tau), temperature=tau)
    exact.sum().backward()
    assert x.grad is not None and y.grad is not None
    se = num(est.std()) / math.sqrt(rows)
    assert abs(num(est.mean()) - num(exact)) < 5 * se
    g_est = x.grad.sum(dim=0)
    assert torch.allclose(g_est, y.grad[0], atol=0.02)
    with pytest.raises(ConfigError, match="sampled"):
        losses.reverse_kl(x, sampled, temperature=tau)


def test_tiny_teacher_tail_keeps_reverse_kl_finite_and_zero_at_equality():
    s = torch.tensor([[60.0, 10.0, 8.0, 0.0, -4.0]])
    t = targets.topk_targets(s / 2.0, 2)
    for kind in losses.DIVERGENCES:
        d = losses.divergence(s, t, temperature=2.0, kind=kind)
        assert bool(torch.isfinite(d).all()) and float(d.abs().max()) < 1e-6, kind


def test_retempered_targets_with_derived_tail_stay_finite():
    raw = torch.tensor([[40.0, 6.0, 5.0, 0.0, -3.0, -3.0]])
    t = targets.topk_targets(raw / 2.0, 2, temperature=2.0, grid_temperatures=[1.0])
    r = targets.retemper_sparse(t, 2.0, 1.0)
    assert r.tail_log_mass_B is None  # derived from the grid's log-partition
    student = raw.clone()
    for kind in losses.DIVERGENCES:
        d = losses.divergence(student, r, temperature=1.0, kind=kind)
        assert bool(torch.isfinite(d).all()) and num(d.abs().max()) < 1e-5, kind
    exact = losses.forward_kl(student + rand(1, 6), targets.log_probs(raw), temperature=1.0)
    approx = losses.forward_kl(student + rand(1, 6), r, temperature=1.0)
    assert num(approx) <= num(exact) + 1e-5


def test_sparse_row_mismatch_and_bad_ids_refused():
    s = rand(4, 10)
    t = targets.topk_targets(rand(3, 10), 2)
    with pytest.raises(ConfigError, match="rows"):
        losses.forward_kl(s, t, temperature=1.0)
    t2 = targets.topk_targets(rand(4, 12), 2)
    with pytest.raises(ConfigError, match="vocabulary"):
        losses.forward_kl(s, t2, temperature=1.0)


# ---------------------------------------------------------------- token-level masking


def _padded(seq_logits_TV, seq_teacher_TV, seq_labels_T, pad_to):
    t, v = seq_logits_TV.shape
    pad = pad_to - t
    s = torch.cat([seq_logits_TV, rand(pad, v, seed=99)])
    tl = torch.cat([seq_teacher_TV, torch.full((pad, v), float("nan"))])  # never read
    y = torch.cat([seq_labels_T, torch.full((pad,), -100)])
    return s[None], tl[None], y[None]


@pytest.mark.parametrize("kind", losses.DIVERGENCES)
@pytest.mark.parametrize("sparse", [False, True])
def test_same_sequence_padded_to_two_lengths_gives_same_loss(kind, sparse):
    tau, v = 2.0, 23
    z = rand(6, v, seed=5, scale=3.0)
    s = rand(6, v, seed=6)
    y = torch.tensor([-100, -100, 3, 7, 1, 22])  # two prompt positions
    results = []
    for length in (6, 11):
        s_B, t_B, y_B = _padded(s, targets.log_probs(z / tau), y, length)
        if sparse:
            zz = torch.cat([z, torch.zeros(length - 6, v)]) / tau
            teacher = targets.topk_targets(zz, 4, labels_B=y_B[0])
        else:
            teacher = t_B
        x = s_B.clone().requires_grad_()
        loss = losses.token_kd_loss(
            x, teacher, temperature=tau, labels_BT=y_B, alpha=0.5, divergence=kind
        )
        (g,) = torch.autograd.grad(loss, x)
        results.append((loss, g[0, :6]))
        assert bool(torch.isfinite(loss)) and bool((g[0, 6:] == 0).all())
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-7)
    assert num(results[0][0]) > 0


def test_mask_normalises_by_valid_positions():
    tau = 2.0
    s, lp, _ = dense_case(b=6, v=9, tau=tau)
    mask = torch.tensor([True, False, True, True, False, False])
    got = losses.kd_loss(s, lp, temperature=tau, mask=mask)
    per_row = losses.forward_kl(s, lp, temperature=tau)
    assert num(got) == pytest.approx(num(per_row[mask].mean() * tau**2), rel=1e-6)


@pytest.mark.parametrize("kind", losses.DIVERGENCES)
def test_no_valid_position_gives_finite_zero_loss_and_grads(kind):
    tau, v = 2.0, 8
    x = rand(2, 3, v).requires_grad_()
    teacher = torch.full((2, 3, v), float("nan"))
    y = torch.full((2, 3), -100)
    for t in (teacher, targets.topk_targets(rand(6, v), 3)):
        loss = losses.token_kd_loss(x, t, temperature=tau, labels_BT=y, alpha=0.5, divergence=kind)
        (g,) = torch.autograd.grad(loss, x)
        assert num(loss) == 0.0 and bool(torch.isfinite(g).all()) and bool((g == 0).all())


# ---------------------------------------------------------------- multi-teacher


def test_multi_teacher_modes_same_gradient_and_entropy_gap():
    tau = 2.0
    s = rand(4, 10, seed=1)
    zs = [rand(4, 10, seed=10 + k, scale=3.0) for k in range(3)]
    lps = [targets.log_probs(z / tau) for z in zs]
    w = [0.5, 0.3, 0.2]
    out = {}
    for mode in losses.MULTI_TEACHER_MODES:
        x = s.clone().requires_grad_()
        loss = losses.multi_teacher_loss(x, lps, temperature=tau, mode=mode, weights=w)
        (g,) = torch.autograd.grad(loss, x)
        out[mode] = (num(loss), g)
    assert torch.allclose(out["combined_target"][1], out["sum_of_losses"][1], atol=1e-6)
    p_KBV = np.exp(np.stack([lp.double().numpy() for lp in lps]))
    wn = np.array(w)[:, None, None]
    mix = (wn * p_KBV).sum(0)
    ent = lambda p: -(p * np.log(p)).sum(-1)  # noqa: E731
    gap = (ent(mix) - (wn[:, :, 0] * ent(p_KBV)).sum(0)).mean() * tau**2
    assert gap > 1e-3
    diff = out["sum_of_losses"][0] - out["combined_target"][0]
    assert diff == pytest.approx(gap, rel=1e-4)


def test_multi_teacher_sparse_full_support_equals_dense_and_refusals():
    tau = 1.0
    s = rand(3, 7, seed=2)
    zs = [rand(3, 7, seed=30 + k) for k in range(2)]
    dense = [targets.log_probs(z) for z in zs]
    sparse = [targets.topk_targets(z, 7) for z in zs]
    for mode in losses.MULTI_TEACHER_MODES:
        for kind in ("forward_kl", "jsd"):
            a = losses.multi_teacher_loss(s, dense, temperature=tau, mode=mode, divergence=kind)
            b = losses.multi_teacher_loss(s, sparse, temperature=tau, mode=mode, divergence=kind)
            assert num(a) == pytest.approx(num(b), abs=2e-6)
    with pytest.raises(ConfigError, match="dense or all sparse"):
        losses.multi_teacher_loss(s, [dense[0], sparse[1]], temperature=tau)
    with pytest.raises(ConfigError, match="mode"):
        losses.multi_teacher_loss(s, dense, temperature=tau, mode="max")


# ---------------------------------------------------------------- features and relations


def test_fitnets_mse_and_cosine_against_float64():
    torch.manual_seed(0)
    reg = losses.FitNetsRegressor(5, 3)
    fs, ft = rand(2, 4, 5, seed=1), rand(2, 4, 3, seed=2)
    mask = torch.tensor([[True, True, False, True], [False, False, True, False]])
    w = reg.proj.weight.detach().double().numpy()
    bias = reg.proj.bias.detach().double().numpy()
    proj = fs.double().numpy() @ w.T + bias
    m = mask.numpy()
    mse_ref = ((proj - ft.double().numpy()) ** 2).mean(-1)[m].mean()
    got = losses.fitnets_loss(fs, ft, reg, mask_B=mask)
    assert num(got) == pytest.approx(mse_ref, rel=1e-5)
    a, b = proj[m], ft.double().numpy()[m]
    cos_ref = (1 - (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)).mean()
    got_cos = losses.fitnets_loss(fs, ft, reg, distance="cosine", mask_B=mask)
    assert num(got_cos) == pytest.approx(cos_ref, rel=1e-5)
    got_cos.backward()
    assert reg.proj.weight.grad is not None and num(reg.proj.weight.grad.abs().sum()) > 0


def test_fitnets_refusals_and_empty_mask():
    with pytest.raises(ConfigError, match="regressor"):
        losses.fitnets_loss(rand(3, 5), rand(3, 4))
    with pytest.raises(ConfigError, match="distance"):
        losses.fitnets_loss(rand(3, 4), rand(3, 4), distance="l1")
    x = rand(3, 4).requires_grad_()
    loss = losses.fitnets_loss(x, rand(3, 4), mask_B=torch.zeros(3, dtype=torch.bool))
    loss.backward()
    assert num(loss) == 0.0 and x.grad is not None and bool(torch.isfinite(x.grad).all())


def np_huber(d: np.ndarray) -> np.ndarray:
    a = np.abs(d)
    return np.where(a < 1, 0.5 * d**2, a - 0.5)


def test_rkd_distance_against_float64_and_invariances():
    s, t = rand(6, 4, seed=1), rand(6, 7, seed=2)

    def psi(x):
        x = x.astype(np.float64)
        d = np.array([np.linalg.norm(x[i] - x[j]) for i in range(6) for j in range(i + 1, 6)])
        return d / d.mean()

    ref = np_huber(psi(s.numpy()) - psi(t.numpy())).mean()
    got = losses.rkd_distance_loss(s, t)
    assert num(got) == pytest.approx(ref, rel=1e-5)
    assert num(losses.rkd_distance_loss(s, t * 3.0)) == pytest.approx(ref, rel=1e-5)
    assert num(losses.rkd_distance_loss(s * 2.0 + 1.0, s)) < 1e-10


def test_rkd_angle_against_float64_and_invariances():
    s, t = rand(5, 3, seed=3), rand(5, 6, seed=4)

    def cosines(x):
        x = x.astype(np.float64)
        out = np.zeros((5, 5, 5))
        for j in range(5):
            for i in range(5):
                for k in range(5):
                    a, b = x[i] - x[j], x[k] - x[j]
                    na, nb = np.linalg.norm(a), np.linalg.norm(b)
                    if na > 0 and nb > 0:
                        out[j, i, k] = a @ b / na / nb
        return out

    ref = np_huber(cosines(s.numpy()) - cosines(t.numpy())).mean()
    assert num(losses.rkd_angle_loss(s, t)) == pytest.approx(ref, rel=1e-5)
    q, _ = torch.linalg.qr(rand(3, 3, seed=5))
    assert num(losses.rkd_angle_loss(s @ q * 4.0 - 2.0, s)) < 1e-10
    x = torch.cat([s[:3], s[:1]]).requires_grad_()  # a duplicated point
    (losses.rkd_angle_loss(x, t[:4]) + losses.rkd_distance_loss(x, t[:4])).backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())
    with pytest.raises(ConfigError, match="B >= 3"):
        losses.rkd_angle_loss(s[:2], t[:2])


# ---------------------------------------------------------------- properties


logit_rows = st.integers(0, 100_000).map(lambda seed: (rand(3, 9, seed=seed, scale=4.0), seed))


@PROPERTY
@given(logit_rows, st.floats(0.5, 5.0), st.floats(0.05, 0.95))
def test_property_bounds(case, tau, beta):
    s, seed = case
    lp = targets.log_probs(rand(3, 9, seed=seed + 1, scale=4.0) / tau)
    for kind in ("forward_kl", "reverse_kl", "skew_kl", "skew_reverse_kl"):
        assert bool((losses.divergence(s, lp, temperature=tau, kind=kind) >= -1e-6).all())
    j = losses.jsd(s, lp, temperature=tau, beta=beta)
    h_beta = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
    assert bool((j >= -1e-6).all()) and bool((j <= h_beta + 1e-6).all())
    assert h_beta <= math.log(2) + 1e-12
    tv = losses.total_variation(s, lp, temperature=tau)
    assert bool((tv >= 0).all()) and bool((tv <= 1 + 1e-6).all())


@PROPERTY
@given(logit_rows, st.floats(0.5, 5.0), st.integers(1, 9))
def test_property_zero_when_student_equals_teacher(case, tau, k):
    s, _ = case
    dense = targets.log_probs(s / tau)
    sparse = targets.topk_targets(s / tau, k)
    for kind in losses.DIVERGENCES:
        for teacher in (dense, sparse):
            d = losses.divergence(s, teacher, temperature=tau, kind=kind)
            assert bool((d.abs() < 2e-6).all()), (kind, d)


@PROPERTY
@given(logit_rows, st.integers(1, 4), st.sampled_from(losses.DIVERGENCES))
def test_property_finite_grads_with_neg_inf_padded_slots(case, num_pad, kind):
    s, seed = case
    tau = 2.0
    z = rand(3, 9, seed=seed + 2)
    z[:, -num_pad:] = NEG_INF  # padded vocabulary slots: no mass for teacher or student
    x = s.clone()
    x[:, -num_pad:] = NEG_INF
    x.requires_grad_()
    lp = torch.log_softmax(z / tau, dim=-1)
    for teacher in (lp, targets.topp_targets(torch.nan_to_num(z, neginf=-1e4) / tau, 0.9, max_k=5)):
        loss = losses.kd_loss(x, teacher, temperature=tau, divergence=kind)
        (g,) = torch.autograd.grad(loss, x)
        assert bool(torch.isfinite(loss)) and bool(torch.isfinite(g).all()), kind


# ---------------------------------------------------------------- data parallelism


def _data_parallel(loss_on, x, parts):
    """W simulated data-parallel ranks, as DeepSpeed runs them: rank r computes
    ``loss_on(x[part_r], part_r, normalizer)`` on its rows, the normalizer an all-reduce of
    the counts call by call (two passes: gather the counts, then answer with the global sum
    over W), and the gradients are averaged over the ranks. Returns (mean loss, mean grad)
    and asserts that every rank made the same number of collectives."""
    calls = []
    for part in parts:
        seen: list[int] = []
        loss_on(x[part], part, lambda n, seen=seen: seen.append(n) or float(n))
        calls.append(seen)
    assert len({len(c) for c in calls}) == 1, calls  # a collective every rank joins
    totals = [sum(c[i] for c in calls) for i in range(len(calls[0]))]
    world = len(parts)
    leaf = x.detach().clone().requires_grad_()
    values = []
    for part in parts:
        answers = iter(totals)
        loss = loss_on(leaf[part], part, lambda n, a=answers: next(a) / world)
        (loss / world).backward()  # DeepSpeed: the mean of the ranks' gradients
        values.append(num(loss))
    assert leaf.grad is not None
    return float(np.mean(values)), leaf.grad, calls


def _one_process(loss_on, x):
    leaf = x.detach().clone().requires_grad_()
    loss = loss_on(leaf, slice(None), None)
    (g,) = torch.autograd.grad(loss, leaf)
    return num(loss), g


#: Two ranks with an uneven share of labelled / unmasked rows (one has none at all).
SPLITS = [[slice(0, 12), slice(12, 24)], [slice(0, 8), slice(8, 16), slice(16, 24)]]


def _scarce_labels(b: int, v: int, labelled: list[int]) -> torch.Tensor:
    y = torch.full((b,), -100)
    y[labelled] = torch.tensor([i % v for i in labelled])
    return y


@pytest.mark.parametrize("parts", SPLITS)
@pytest.mark.parametrize("sparse", [False, True])
def test_kd_loss_with_the_global_normalizer_is_world_size_independent(parts, sparse):
    """1,000 labels in 60,000 rows in miniature: 3 labelled rows of 24, all on rank 0 in
    the three-rank split, and a distillation mask that is uneven too. With the normalizer,
    W ranks give the one-process loss and gradient; without it (each rank's own mean)
    they do not."""
    tau, v = 2.0, 7
    x, lp, z = dense_case(b=24, v=v, tau=tau, seed=3)
    y = _scarce_labels(24, v, [1, 5, 17])
    mask = torch.arange(24) % 5 != 0
    mask[12:20] = False
    teacher = targets.topk_targets(z / tau, 3) if sparse else lp

    def loss_on(xs, part, normalizer):
        t = teacher.rows(part) if sparse else teacher[part]
        return losses.kd_loss(
            xs,
            t,
            temperature=tau,
            alpha=0.4,
            labels_B=y[part],
            mask=mask[part],
            normalizer=normalizer,
        )

    want, want_g = _one_process(loss_on, x)
    got, got_g, calls = _data_parallel(loss_on, x, parts)
    assert [len(c) for c in calls] == [2] * len(parts)  # one collective per term
    assert got == pytest.approx(want, rel=1e-6)
    torch.testing.assert_close(got_g, want_g, rtol=1e-5, atol=1e-7)
    # each rank's own mean (the behaviour without a normalizer) is another model
    per_rank = _data_parallel(lambda xs, p, _n: loss_on(xs, p, None), x, parts)
    assert (per_rank[1] - want_g).abs().max() > 1e-3


@pytest.mark.parametrize("chunk_rows", [None, 5])
def test_cross_entropy_and_fitnets_with_the_global_normalizer(chunk_rows):
    x = rand(24, 9, seed=7)
    y = _scarce_labels(24, 9, [2, 3, 20])

    def ce(xs, part, normalizer):
        return losses.cross_entropy(xs, y[part], chunk_rows=chunk_rows, normalizer=normalizer)

    torch.manual_seed(0)
    reg = losses.FitNetsRegressor(9, 4)
    feats = rand(24, 4, seed=8)
    mask = torch.zeros(24, dtype=torch.bool)
    mask[[0, 1, 2, 13]] = True

    def fit(xs, part, normalizer):
        return losses.fitnets_loss(xs, feats[part], reg, mask_B=mask[part], normalizer=normalizer)

    for fn in (ce, fit):
        want, want_g = _one_process(fn, x)
        for parts in SPLITS:
            got, got_g, _ = _data_parallel(fn, x, parts)
            assert got == pytest.approx(want, rel=1e-6)
            torch.testing.assert_close(got_g, want_g, rtol=1e-5, atol=1e-7)


def test_token_losses_with_the_global_normalizer_are_world_size_independent():
    tau, b, t, v = 1.5, 6, 5, 11
    x = rand(b, t, v, seed=9)
    z = rand(b, t, v, seed=10, scale=3.0)
    labels = torch.full((b, t), -100)
    labels[0, 1:4] = torch.tensor([1, 2, 3])  # padding and prompts elsewhere
    labels[4, :2] = torch.tensor([5, 6])
    mask = labels != -100
    dense = targets.log_probs(z / tau)
    sampled = [targets.topk_targets(z.reshape(-1, v) / tau, 4, labels_B=labels.reshape(-1))] * 2

    def token_kd(xs, part, normalizer):
        return losses.token_kd_loss(
            xs,
            dense[part],
            temperature=tau,
            labels_BT=labels[part],
            alpha=0.5,
            normalizer=normalizer,
        )

    def rows(part):  # the B * T sparse rows of sequences `part`
        return torch.arange(b * t).reshape(b, t)[part].reshape(-1)

    def distill(xs, part, normalizer):
        batch = {
            "labels": labels[part],
            "mask": mask[part],
            "targets": [s.rows(rows(part)) for s in sampled],
        }
        return losses.token_distill_loss(
            xs, batch, temperature=tau, alpha=0.7, normalizer=normalizer
        )

    def multi(xs, part, normalizer):
        tl = [dense[part], dense[part] * 1.0]
        return losses.multi_teacher_loss(
            xs, tl, temperature=tau, mode="sum_of_losses", mask=mask[part], normalizer=normalizer
        )

    parts = [slice(0, 3), slice(3, 6)]
    for fn, num_calls in ((token_kd, 2), (distill, 2), (multi, 1)):
        want, want_g = _one_process(fn, x)
        got, got_g, calls = _data_parallel(fn, x, parts)
        assert [len(c) for c in calls] == [num_calls] * 2, fn.__name__  # K terms: one call
        assert got == pytest.approx(want, rel=1e-6), fn.__name__
        torch.testing.assert_close(got_g, want_g, rtol=1e-5, atol=1e-7)


def test_normalizer_default_and_refusals():
    s, lp, _ = dense_case(b=6, v=5)
    y = torch.tensor([0, -100, 2, -100, -100, 4])
    plain = losses.kd_loss(s, lp, temperature=2.0, alpha=0.5, labels_B=y)
    counted = losses.kd_loss(s, lp, temperature=2.0, alpha=0.5, labels_B=y, normalizer=float)
    assert torch.equal(plain, counted)  # None is the count itself, bit for bit
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="divisor"):
            losses.cross_entropy(s, y, normalizer=lambda n, bad=bad: bad)
    # no labelled row anywhere: 0 with zero gradients, not a division by zero
    none = torch.full((6,), -100)
    x = s.clone().requires_grad_()
    loss = losses.cross_entropy(x, none, normalizer=lambda n: 0.0)
    (g,) = torch.autograd.grad(loss, x)
    assert num(loss) == 0.0 and bool((g == 0).all())


# ---------------------------------------------------------------- the fused dense path


def _reference_kd_f64(s, lp, tau, alpha, labels, mask, kl_div=None, ce_div=None):
    """alpha tau^2 sum_kept KL / max(kept, 1) + (1 - alpha) sum_labelled CE / max(labelled, 1),
    in float64 through torch autograd on the textbook formula (log_softmax and a guarded
    0 log 0): the loss and its gradient w.r.t. the logits."""
    x = s.detach().double().requires_grad_()
    v = lp.shape[-1]
    t = lp.double().reshape(-1, v)
    keep = torch.ones(t.shape[0], dtype=torch.bool) if mask is None else mask.reshape(-1)
    used = keep if alpha == 1 else keep | (labels.reshape(-1) != -100)
    # rows in neither term may hold garbage: keep it out of the reference's gradient
    x_NV = torch.where(used[:, None], x.reshape(-1, v), 0.0)
    t = torch.where(keep[:, None], t, -math.log(v))
    log_q = torch.log_softmax(x_NV / tau, dim=-1)
    p = t.exp()
    diff = torch.where(p > 0, t - torch.where(p > 0, log_q, 0.0), 0.0)
    kl_N = (p * diff).sum(dim=-1)
    kl_sum = kl_N[keep].sum()
    loss = alpha * tau**2 * kl_sum / (kl_div or max(int(keep.sum()), 1))
    if alpha < 1:
        y = labels.reshape(-1)
        rows = (y != -100).nonzero().flatten()
        nll = -torch.log_softmax(x_NV, dim=-1)[rows, y[rows]].sum()
        loss = loss + (1 - alpha) * nll / (ce_div or max(len(rows), 1))
    (g,) = torch.autograd.grad(loss, x)
    return num(loss), g


def _kd(x, lp, tau, alpha, labels, mask, **kw):
    leaf = x.detach().clone().requires_grad_()
    loss = losses.kd_loss(leaf, lp, temperature=tau, alpha=alpha, labels_B=labels, mask=mask, **kw)
    (g,) = torch.autograd.grad(loss, leaf)
    return loss, g


@pytest.mark.parametrize("alpha", [1.0, 0.6, 0.0])
@pytest.mark.parametrize("with_mask", [False, True])
def test_fused_kd_loss_masked_rows_and_ignored_labels_match_float64(alpha, with_mask):
    tau, v = 2.5, 17
    s, lp, _ = dense_case(b=9, v=v, tau=tau, seed=21)
    lp[2, :4] = NEG_INF  # no teacher mass on some ids
    lp = torch.log_softmax(lp, dim=-1)
    s[4, 5] = NEG_INF  # no student mass where the teacher has none either
    lp[4, 5] = NEG_INF
    lp[4] = torch.log_softmax(lp[4], dim=-1)
    labels = torch.tensor([3, -100, 0, 16, -100, 7, 7, -100, 1])
    mask = torch.tensor([True, True, False, True, False, True, False, True, True])
    mask = mask if with_mask else None
    if with_mask:  # rows left out hold garbage: never read into the loss or its gradient
        lp[6] = float("nan")
        s[6] = float("nan") if alpha > 0 else s[6]  # (alpha = 0: plain cross_entropy)
        labels[6] = -100
    loss, g = _kd(s, lp, tau, alpha, labels if alpha < 1 else None, mask)
    want, want_g = _reference_kd_f64(s, lp, tau, alpha, labels, mask)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert num(loss) == pytest.approx(want, rel=2e-6, abs=1e-7)
    assert bool(torch.isfinite(g).all())
    torch.testing.assert_close(g.double(), want_g, rtol=1e-5, atol=1e-7)
    if with_mask:
        assert bool((g[6] == 0).all())


def test_fused_token_kd_loss_matches_float64_and_all_ignored_rows_give_zero():
    tau, b, t, v = 1.5, 3, 4, 11
    s = rand(b, t, v, seed=31)
    lp = targets.log_probs(rand(b, t, v, seed=32, scale=3.0) / tau)
    labels = torch.full((b, t), -100)
    labels[0, 1:] = torch.tensor([2, 9, 10])
    labels[2, :2] = torch.tensor([0, 4])
    leaf = s.clone().requires_grad_()
    loss = losses.token_kd_loss(leaf, lp, temperature=tau, labels_BT=labels, alpha=0.3)
    (g,) = torch.autograd.grad(loss, leaf)
    valid = labels != -100
    want, want_g = _reference_kd_f64(s, lp, tau, 0.3, labels, valid)
    assert num(loss) == pytest.approx(want, rel=2e-6)
    torch.testing.assert_close(g.double(), want_g, rtol=1e-5, atol=1e-7)
    assert bool((g[~valid] == 0).all()) and bool((g[valid] != 0).any())
    # no valid position at all: 0 with zero gradients, garbage in the teacher or not
    none = torch.full((b, t), -100)
    x = s.clone().requires_grad_()
    nan_teacher = torch.full((b, t, v), float("nan"))
    for alpha in (1.0, 0.5):
        out = losses.token_kd_loss(x, nan_teacher, temperature=tau, labels_BT=none, alpha=alpha)
        (gx,) = torch.autograd.grad(out, x)
        assert num(out) == 0.0 and bool((gx == 0).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_kd_loss_with_low_precision_student_logits(dtype):
    tau, alpha = 2.0, 0.7
    s, lp, _ = dense_case(b=6, v=19, tau=tau, seed=41)
    s = s.to(dtype)  # the reference sees the same rounded logits, upcast
    labels = torch.tensor([1, 18, -100, 0, 5, 5])
    mask = torch.tensor([True, False, True, True, True, False])
    leaf = s.clone().requires_grad_()
    loss = losses.kd_loss(leaf, lp, temperature=tau, alpha=alpha, labels_B=labels, mask=mask)
    (g,) = torch.autograd.grad(loss, leaf)
    want, want_g = _reference_kd_f64(s.float(), lp, tau, alpha, labels, mask)
    assert loss.dtype == torch.float32 and g.dtype == dtype
    assert num(loss) == pytest.approx(want, rel=2e-6)
    # the gradient is rounded to the logits' dtype once, at the end
    torch.testing.assert_close(g, want_g.to(dtype), rtol=1e-2, atol=1e-4)
    # a low-precision teacher is upcast too
    loss_bf16 = losses.kd_loss(s, lp.to(dtype), temperature=tau)
    want_bf16, _ = _reference_kd_f64(s.float(), lp.to(dtype).float(), tau, 1.0, None, None)
    assert num(loss_bf16) == pytest.approx(want_bf16, rel=2e-6)


def test_fused_kd_loss_normalizer_counts_each_term_once_in_order():
    tau, alpha = 2.0, 0.4
    s, lp, _ = dense_case(b=8, v=6, tau=tau, seed=51)
    labels = torch.tensor([0, -100, -100, 5, 2, -100, -100, -100])
    mask = torch.tensor([True, True, False, True, False, True, True, False])
    seen: list[int] = []

    def normalizer(count: int) -> float:
        seen.append(count)
        return 2.5 * count  # e.g. a global count over a world size

    loss, g = _kd(s, lp, tau, alpha, labels, mask, normalizer=normalizer)
    assert seen == [5, 3]  # distillation rows, then labelled rows
    want, want_g = _reference_kd_f64(s, lp, tau, alpha, labels, mask, kl_div=12.5, ce_div=7.5)
    assert num(loss) == pytest.approx(want, rel=2e-6)
    torch.testing.assert_close(g.double(), want_g, rtol=1e-5, atol=1e-7)
    # a rank with no counted row still calls it (a collective), and divides nothing by 0
    seen.clear()
    empty = torch.zeros(8, dtype=torch.bool)
    none = torch.full((8,), -100)
    zero, gz = _kd(s, lp, tau, alpha, none, empty, normalizer=normalizer)
    assert seen == [0, 0] and num(zero) == 0.0 and bool((gz == 0).all())


def test_fused_kd_loss_refuses_bad_labels_and_keeps_nan_visible():
    s, lp, _ = dense_case(b=4, v=5)
    with pytest.raises(ConfigError, match="labels"):
        losses.kd_loss(s, lp, temperature=2.0, alpha=0.5, labels_B=torch.tensor([0, 5, 1, 1]))
    with pytest.raises(ConfigError, match="labels"):
        losses.kd_loss(s, lp, temperature=2.0, alpha=0.5, labels_B=torch.tensor([0, -3, 1, 1]))
    with pytest.raises(ConfigError, match="labels shape"):
        losses.kd_loss(s, lp, temperature=2.0, alpha=0.5, labels_B=torch.tensor([0, 1]))
    # a NaN in a row that counts is not dropped as if it were zero mass
    bad_student, bad_teacher = s.clone(), lp.clone()
    bad_student[1, 2] = float("nan")
    bad_teacher[3, 0] = float("nan")
    per_row = losses.forward_kl(bad_student, bad_teacher, temperature=2.0)
    assert per_row.isnan().tolist() == [False, True, False, True]
    # the teacher's zero mass where the student has none either is 0 log 0 = 0; mass the
    # student cannot reach is an infinite divergence
    x, t = s.clone(), lp.clone()
    x[0, 1], t[0, 1] = NEG_INF, NEG_INF
    t[0] = torch.log_softmax(t[0], dim=-1)
    x[2, 3] = NEG_INF
    d = losses.forward_kl(x, t, temperature=2.0)
    assert bool(torch.isfinite(d[:2]).all()) and d[2] == float("inf")
    want = losses.divergence(x, t, temperature=2.0, kind="skew_kl", skew=0.0)
    torch.testing.assert_close(d, want)


def test_fused_dense_path_equals_the_general_path_for_a_teacher_with_grad():
    """A teacher that needs a gradient takes the general path (the fused node
    differentiates the student only); both give the same loss and student gradient."""
    tau = 3.0
    s, lp, _ = dense_case(b=5, v=8, tau=tau, seed=61)
    labels = torch.tensor([1, -100, 7, 0, 3])
    mask = torch.tensor([True, False, True, True, True])
    fused, g_fused = _kd(s, lp, tau, 0.5, labels, mask)
    teacher = lp.clone().requires_grad_()
    general, g_general = _kd(s, teacher, tau, 0.5, labels, mask)
    assert num(fused) == pytest.approx(num(general), rel=1e-6)
    torch.testing.assert_close(g_fused, g_general, rtol=1e-5, atol=1e-7)


def test_fused_kd_loss_reads_nothing_back_to_the_host(monkeypatch):
    """The proxy, on the CPU, for "no per-step device synchronisation": without a
    normalizer, kd_loss and token_kd_loss (forward and backward) never turn a tensor
    into a Python number or ask for data-dependent shapes (nonzero). The CPU's own
    shortcut (counts read as numbers, where that is free) is turned off to run the
    accelerator's path."""
    from kdcache.losses import kd as kd_module

    monkeypatch.setattr(kd_module, "_reads_back_free", lambda device: False)
    tau, b, t, v = 2.0, 2, 5, 7
    s = rand(b, t, v, seed=71).requires_grad_()
    lp = targets.log_probs(rand(b, t, v, seed=72) / tau)
    labels = torch.tensor([[1, 2, -100, 4, 0], [-100, -100, 6, 6, 3]])
    mask = labels != -100
    calls: list[str] = []
    for name in ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__", "__index__"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    losses.kd_loss(s, lp, temperature=tau, alpha=0.5, labels_B=labels, mask=mask).backward()
    losses.token_kd_loss(s, lp, temperature=tau, labels_BT=labels, alpha=0.8).backward()
    assert calls == []
    # the spies see it when it happens: the general path gathers the masked rows
    losses.kd_loss(s, lp, temperature=tau, divergence="jsd", mask=mask)
    monkeypatch.undo()
    assert "nonzero" in calls


@pytest.mark.parametrize("labels_kind", ["all", "some", "none"])
@pytest.mark.parametrize("with_mask", [False, True])
def test_the_cpus_count_shortcut_gives_the_accelerator_paths_value_and_gradient(
    monkeypatch, labels_kind, with_mask
):
    """On the CPU kd_loss reads counts as numbers and drops masks that keep every row;
    the value and the gradient are those of the path that keeps them as tensors."""
    from kdcache.losses import kd as kd_module

    tau, b, v = 3.0, 9, 6
    lp = targets.log_probs(rand(b, v, seed=81) / tau)
    labels = torch.arange(b) % v
    if labels_kind == "some":
        labels[::3] = -100
    elif labels_kind == "none":
        labels[:] = -100
    mask = torch.ones(b, dtype=torch.bool) if with_mask else None
    out = []
    for free in (True, False):
        monkeypatch.setattr(kd_module, "_reads_back_free", lambda device, _f=free: _f)
        s = rand(b, v, seed=82).requires_grad_()
        loss = losses.kd_loss(s, lp, temperature=tau, alpha=0.6, labels_B=labels, mask=mask)
        loss.backward()
        out.append((loss.detach(), s.grad))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out[0][1], out[1][1], rtol=1e-6, atol=1e-7)


def test_the_callers_label_buffer_may_be_refilled_before_backward():
    """kd_loss keeps its own copy of the labels for the backward pass."""
    tau = 2.0
    lp = targets.log_probs(rand(4, 5, seed=91) / tau)
    s = rand(4, 5, seed=92).requires_grad_()
    labels = torch.tensor([0, 1, 2, 3])
    loss = losses.kd_loss(s, lp, temperature=tau, alpha=0.5, labels_B=labels)
    labels.fill_(4)  # the next batch's labels, loaded into the same buffer
    loss.backward()
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("alpha", [1.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_batches_gradient_computed_in_the_forward_equals_the_backwards(
    monkeypatch, alpha, dtype
):
    """The fused node's short route for small batches (the gradient made by the forward)
    gives the general route's value and gradient: teacher zeros (-inf), a scaled
    backward, low-precision logits."""
    from kdcache.losses import kd

    tau, b, v = 2.5, 12, 7
    lp = targets.log_probs(rand(b, v, seed=93) / tau)
    lp[0, 3] = float("-inf")  # a class the teacher rules out
    lp[0] = torch.log_softmax(lp[0], dim=-1)
    labels = torch.arange(b) % v
    out = []
    for limit in (1 << 20, 0):  # the short route, then the general one
        monkeypatch.setattr(kd, "_GRAD_IN_FORWARD_MAX", limit)
        s = rand(b, v, seed=94).to(dtype).requires_grad_()
        loss = losses.kd_loss(s, lp, temperature=tau, alpha=alpha, labels_B=labels)
        (loss * 3.0).backward()
        assert s.grad.dtype == dtype
        out.append((loss.detach(), s.grad.float()))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[0][1], out[1][1], rtol=1e-5, atol=1e-6)


def test_the_short_route_keeps_nan_and_refuses_a_second_backward():
    tau = 2.0
    lp = targets.log_probs(rand(4, 5, seed=95) / tau)
    s = rand(4, 5, seed=96)
    s[1, 2] = float("nan")
    s.requires_grad_()
    loss = losses.kd_loss(s, lp, temperature=tau)
    assert torch.isnan(loss)
    s2 = rand(4, 5, seed=97).requires_grad_()
    (g,) = torch.autograd.grad(losses.kd_loss(s2, lp, temperature=tau), s2, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


def _kernel_or_skip():
    from kdcache.losses import _cpu_kernel

    if _cpu_kernel.load() is None:
        pytest.skip("no C compiler here: kd_loss takes its torch route")


def _routes_with(monkeypatch, make_logits, lp, normalizer=None, **kw):
    """(loss, grad, normalizer calls) by the kernel's route, then by the torch route."""
    from kdcache.losses import kd

    out = []
    for limit in (1 << 20, 0):
        monkeypatch.setattr(kd, "_GRAD_IN_FORWARD_MAX", limit)
        calls: list[int] = []

        def norm(count: int, calls: list[int] = calls) -> float:
            calls.append(count)
            return normalizer(count)

        s = make_logits().requires_grad_()
        loss = losses.kd_loss(s, lp, normalizer=None if normalizer is None else norm, **kw)
        loss.backward()
        out.append((loss.detach(), s.grad, calls))
    return out


def _both_routes(monkeypatch, make_logits, lp, **kw):
    """(loss, grad) by the compiled kernel's route, then by the general torch route."""
    return [(loss, grad) for loss, grad, _ in _routes_with(monkeypatch, make_logits, lp, **kw)]


@pytest.mark.parametrize(
    ("b", "v", "tau", "alpha"),
    [(256, 10, 4.0, 0.9), (3, 5000, 1.0, 0.5), (7, 3, 0.5, 1.0), (1, 1, 2.0, 0.3)],
)
def test_the_compiled_kernel_gives_the_torch_routes_value_and_gradient(
    monkeypatch, b, v, tau, alpha
):
    _kernel_or_skip()
    lp = targets.log_probs(rand(b, v, seed=101) / tau)
    if v > 2:
        lp[0, 1] = float("-inf")  # a class the teacher rules out
        lp[0] = torch.log_softmax(lp[0], dim=-1)
    labels = torch.arange(b) % v
    (l_k, g_k), (l_t, g_t) = _both_routes(
        monkeypatch,
        lambda: rand(b, v, seed=102, scale=5.0),
        lp,
        temperature=tau,
        alpha=alpha,
        labels_B=labels,
    )
    assert torch.isfinite(l_k) and torch.isfinite(g_k).all()
    torch.testing.assert_close(l_k, l_t, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(g_k, g_t, rtol=1e-5, atol=1e-7)


def test_the_compiled_kernel_keeps_nan_inf_and_the_student_ruling_a_class_out(monkeypatch):
    _kernel_or_skip()
    tau = 2.0
    lp = targets.log_probs(rand(4, 6, seed=103) / tau)

    def logits_with(row: int, col: int, value: float):
        def make():
            s = rand(4, 6, seed=104)
            s[row, col] = value
            return s

        return make

    # a NaN logit: the loss and that row's gradient are NaN in both routes
    (l_k, g_k), (l_t, g_t) = _both_routes(
        monkeypatch,
        logits_with(1, 2, float("nan")),
        lp,
        temperature=tau,
        alpha=0.5,
        labels_B=torch.tensor([0, 1, 2, 3]),
    )
    assert torch.isnan(l_k) and torch.isnan(l_t)
    assert torch.isnan(g_k[1]).all() and torch.isnan(g_t[1]).all()
    torch.testing.assert_close(g_k[[0, 2, 3]], g_t[[0, 2, 3]], rtol=1e-5, atol=1e-7)
    # the student rules out a class the teacher keeps: +inf in both routes
    (l_k, _), (l_t, _) = _both_routes(
        monkeypatch, logits_with(0, 3, float("-inf")), lp, temperature=tau, alpha=1.0
    )
    assert l_k == l_t == float("inf")


@pytest.mark.parametrize("label", [10, -5])
def test_the_compiled_kernel_refuses_a_label_outside_the_classes(label):
    _kernel_or_skip()
    lp = targets.log_probs(rand(4, 10, seed=105))
    labels = torch.tensor([0, label, 2, 3])
    with pytest.raises(ConfigError, match=r"labels must be in \[0, 10\).*row 1"):
        losses.kd_loss(
            rand(4, 10, seed=106).requires_grad_(),
            lp,
            temperature=1.0,
            alpha=0.5,
            labels_B=labels,
        )


def test_without_the_kernel_the_loss_takes_its_torch_route(monkeypatch, caplog):
    """No compiler (or KDCACHE_CPU_KERNEL=0): load() is None, the loss still works."""
    from kdcache.losses import _cpu_kernel

    monkeypatch.setenv("CC", "/nonexistent/cc")
    with caplog.at_level("INFO", logger="kdcache.losses._cpu_kernel"):
        assert _cpu_kernel._compile() is None
    assert "torch route" in caplog.text
    monkeypatch.setattr(_cpu_kernel, "_loaded", False)
    monkeypatch.setattr(_cpu_kernel, "_function", None)
    monkeypatch.setenv(_cpu_kernel.ENV_SWITCH, "0")
    assert _cpu_kernel.load() is None
    s = rand(8, 4, seed=107).requires_grad_()
    lp = targets.log_probs(rand(8, 4, seed=108))
    loss = losses.kd_loss(s, lp, temperature=1.0, alpha=0.5, labels_B=torch.arange(8) % 4)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


@pytest.mark.parametrize(("b", "v"), [(8, 131072), (1, 1 << 20), (1024, 1000)])
def test_the_compiled_kernel_is_exact_on_wide_rows_of_close_distributions(monkeypatch, b, v):
    """The KL of a student close to its teacher is a small difference of large sums: the
    kernel's float64 row sums keep it (a float32 running sum was off by 29% at 8 x 128k)."""
    _kernel_or_skip()
    s0 = rand(b, v, seed=109)
    lp = torch.log_softmax(s0 + 0.01 * rand(b, v, seed=110, scale=1.0), dim=-1)
    p64 = lp.double().exp()
    want = (p64 * (lp.double() - torch.log_softmax(s0.double(), dim=-1))).sum() / b
    grad64 = (torch.softmax(s0.double(), dim=-1) - p64) / b
    (l_k, g_k), (l_t, g_t) = _both_routes(monkeypatch, lambda: s0.clone(), lp, temperature=1.0)
    assert abs(l_k.double() - want) <= 1e-3 * want
    assert abs(l_k.double() - want) <= abs(l_t.double() - want) + 1e-4 * want

    def rel(g: torch.Tensor) -> float:  # the gradient's error, as float32 allows it
        return float(
            torch.linalg.vector_norm(g.double() - grad64) / torch.linalg.vector_norm(grad64)
        )

    assert rel(g_k) <= 1.2 * rel(g_t) + 1e-6


def test_the_short_route_backward_twice_with_retain_graph():
    _kernel_or_skip()
    lp = targets.log_probs(rand(6, 5, seed=111))
    s = rand(6, 5, seed=112).requires_grad_()
    loss = losses.kd_loss(s, lp, temperature=2.0, alpha=0.5, labels_B=torch.arange(6) % 5)
    loss.backward(retain_graph=True)
    first = s.grad.clone()
    loss.backward()
    torch.testing.assert_close(s.grad, 2 * first)


def test_inputs_the_kernel_cannot_read_take_the_torch_route():
    """Mismatched teacher shapes, int32 or flat labels passed to the module's fused entry
    point are not handed to the C code: the torch route reads (or refuses) them."""
    from kdcache.losses import divergences

    _kernel_or_skip()
    s = rand(4, 5, seed=113).requires_grad_()
    with pytest.raises(ConfigError, match="same shape"):
        divergences.dense_forward_kl_loss(
            s, targets.log_probs(rand(4, 3, seed=114)), temperature=1.0, kl_weight=1.0
        )
    lp = targets.log_probs(rand(4, 5, seed=115))
    labels = torch.tensor([[0], [1], [2], [3]])
    want = divergences.dense_forward_kl_loss(
        s, lp, temperature=1.0, kl_weight=0.5, labels_N1=labels, nll_weight=0.5
    )
    got = divergences.dense_forward_kl_loss(
        s, lp, temperature=1.0, kl_weight=0.5, labels_N1=labels.int(), nll_weight=0.5
    )
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("cc", ["g++", "cc -O0"])
def test_the_kernel_builds_with_a_cxx_compiler_or_a_compiler_with_flags(monkeypatch, cc):
    import shutil

    from kdcache.losses import _cpu_kernel

    if shutil.which(cc.split()[0]) is None:
        pytest.skip(f"no {cc.split()[0]} here")
    monkeypatch.setenv("CC", cc)
    assert _cpu_kernel._compile() is not None


@pytest.mark.parametrize("normalizer", [None, lambda c: 0.5 * c + 3.0])
def test_the_kernel_route_leaves_unlabelled_rows_out_of_the_nll_as_the_torch_route(
    monkeypatch, normalizer
):
    """Rows with ignore_index count in the KL only; a normalizer is called for the KL's
    count, then the NLL's, on both routes."""
    _kernel_or_skip()
    b, v, tau = 9, 6, 2.0
    lp = targets.log_probs(rand(b, v, seed=121) / tau)
    labels = torch.tensor([0, -100, 2, 5, -100, -100, 1, 3, 4])
    (l_k, g_k, c_k), (l_t, g_t, c_t) = _routes_with(
        monkeypatch,
        lambda: rand(b, v, seed=122, scale=4.0),
        lp,
        normalizer,
        temperature=tau,
        alpha=0.6,
        labels_B=labels,
    )
    torch.testing.assert_close(l_k, l_t, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(g_k, g_t, rtol=1e-5, atol=1e-7)
    assert c_k == c_t == ([] if normalizer is None else [9, 6])
    # an unlabelled row's gradient is the KL's alone: the same as with alpha = 1 scaled
    (_, g_1, _), _ = _routes_with(
        monkeypatch,
        lambda: rand(b, v, seed=122, scale=4.0),
        lp,
        normalizer,
        temperature=tau,
        alpha=1.0,
    )
    torch.testing.assert_close(g_k[1], 0.6 * g_1[1], rtol=1e-5, atol=1e-7)


def test_the_kernel_route_with_no_labelled_row_is_the_kl_alone(monkeypatch):
    _kernel_or_skip()
    lp = targets.log_probs(rand(5, 4, seed=123))
    (l_k, g_k, _), (l_t, g_t, _) = _routes_with(
        monkeypatch,
        lambda: rand(5, 4, seed=124),
        lp,
        temperature=1.0,
        alpha=0.5,
        labels_B=torch.full((5,), -100),
    )
    assert torch.isfinite(l_k) and torch.isfinite(g_k).all()
    torch.testing.assert_close(l_k, l_t, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(g_k, g_t, rtol=1e-5, atol=1e-7)


def test_the_kernel_route_refuses_a_bad_label_among_unlabelled_rows_before_the_normalizer():
    """The label check comes first: a bad label is named, and a normalizer (a collective
    on several ranks) is not left half-called for the NLL."""
    _kernel_or_skip()
    lp = targets.log_probs(rand(4, 5, seed=125))
    calls: list[int] = []
    with pytest.raises(ConfigError, match=r"labels must be in \[0, 5\).*row 2 has 7"):
        losses.kd_loss(
            rand(4, 5, seed=126).requires_grad_(),
            lp,
            temperature=1.0,
            alpha=0.5,
            labels_B=torch.tensor([-100, 1, 7, 0]),
            normalizer=lambda c: calls.append(c) or float(c),
        )
    assert calls == [4]  # the KL's count only


def test_labels_of_another_shape_are_refused_on_the_cpu_too():
    _kernel_or_skip()
    lp = targets.log_probs(rand(4, 5, seed=127))
    with pytest.raises(ConfigError, match="labels shape"):
        losses.kd_loss(
            rand(4, 5, seed=128).requires_grad_(),
            lp,
            temperature=1.0,
            alpha=0.5,
            labels_B=torch.tensor([[0], [1], [2], [3]]),
        )


def test_the_kernel_route_without_grad_gives_the_value_alone():
    _kernel_or_skip()
    lp = targets.log_probs(rand(6, 5, seed=129))
    s = rand(6, 5, seed=130)
    labels = torch.arange(6) % 5
    with torch.no_grad():
        value = losses.kd_loss(s.requires_grad_(), lp, temperature=2.0, alpha=0.5, labels_B=labels)
    assert not value.requires_grad and value.grad_fn is None
    again = losses.kd_loss(s, lp, temperature=2.0, alpha=0.5, labels_B=labels)
    torch.testing.assert_close(value, again.detach())


def test_the_kernel_route_frees_its_gradient_and_refuses_a_second_backward():
    _kernel_or_skip()
    lp = targets.log_probs(rand(6, 5, seed=131))
    s = rand(6, 5, seed=132).requires_grad_()
    loss = losses.kd_loss(s, lp, temperature=2.0, alpha=0.5, labels_B=torch.arange(6) % 5)
    loss.backward()
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()


@pytest.mark.parametrize("ignore_index", [-100.0, 2**64])
def test_an_ignore_index_c_cannot_read_takes_the_torch_route(monkeypatch, ignore_index):
    """A float or an out-of-int64 ignore_index is not handed to C (it would be refused or
    wrapped): the torch route reads it, the normalizer called the same times."""
    _kernel_or_skip()
    lp = targets.log_probs(rand(6, 5, seed=133))
    (l_k, g_k, c_k), (l_t, g_t, c_t) = _routes_with(
        monkeypatch,
        lambda: rand(6, 5, seed=134),
        lp,
        float,
        temperature=1.0,
        alpha=0.5,
        labels_B=torch.tensor([0, 1, 2, 3, 4, 0]),
        ignore_index=ignore_index,
    )
    torch.testing.assert_close(l_k, l_t)
    torch.testing.assert_close(g_k, g_t)
    assert c_k == c_t == [6, 6]


def test_an_empty_batch_of_wide_rows_allocates_nothing():
    _kernel_or_skip()
    s = torch.empty(0, 1 << 40).requires_grad_()  # no row: nothing to allocate per row
    loss = losses.kd_loss(s, torch.empty(0, 1 << 40), temperature=1.0)
    loss.backward()
    assert float(loss.detach()) == 0.0 and s.grad.shape == s.shape
