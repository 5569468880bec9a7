"""kdcache.losses.dkd_loss (Decoupled KD) against float64 references from the paper.

Shape legend: B batch, T tokens, V classes, S kept slots.

The references below are written from Zhao et al., "Decoupled Knowledge Distillation",
CVPR 2022, sec. 3.1 (eqs. 1-7), with probabilities (not log-space tricks), in float64.
"""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch

from kdcache import losses, targets
from kdcache.errors import ConfigError
from kdcache.losses import dkd

NEG_INF = float("-inf")


def rand(*shape: int, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def case(b=6, v=11, tau=2.0, seed=0):
    """(student logits [B, V], teacher log-probs at tau [B, V], teacher raw logits, labels)."""
    s = rand(b, v, seed=seed)
    z = rand(b, v, seed=seed + 100, scale=3.0)
    labels = torch.randint(0, v, (b,), generator=torch.Generator().manual_seed(seed + 7))
    return s, targets.log_probs(z / tau), z, labels


# ------------------------------------------------------------------ float64 references


def ref_terms(s_BV, log_p_BV, labels_B, tau):
    """float64 (TCKD [B], NCKD [B]) from eqs. 1-5 (student logits in, autograd-ready)."""
    q = torch.softmax(s_BV.double() / tau, dim=-1)
    p = log_p_BV.double().exp()
    tckd, nckd = [], []
    for b, t in enumerate(labels_B.tolist()):
        others = [i for i in range(q.shape[1]) if i != t]
        p_t, q_t = p[b, t], q[b, t]
        p_rest, q_rest = p[b, others].sum(), q[b, others].sum()  # eq. 1: b = [p_t, p_\t]
        tckd.append(p_t * torch.log(p_t / q_t) + p_rest * torch.log(p_rest / q_rest))
        p_hat, q_hat = p[b, others] / p_rest, q[b, others] / q_rest  # eq. 1: p_hat
        nckd.append((p_hat * torch.log(p_hat / q_hat)).sum())
    return torch.stack(tckd), torch.stack(nckd)


def ref_loss(s_BV, log_p_BV, labels_B, tau, alpha, beta, ce_weight):
    """tau^2 (alpha TCKD + beta NCKD) + ce_weight CE, each a mean over the rows (eq. 7)."""
    tckd, nckd = ref_terms(s_BV, log_p_BV, labels_B, tau)
    ce = torch.nn.functional.cross_entropy(s_BV.double(), labels_B)
    return tau**2 * (alpha * tckd + beta * nckd).mean() + ce_weight * ce


def mdistiller_dkd(s_BV, z_BV, labels_B, tau, alpha, beta):
    """The authors' reference formulation (mdistiller ``dkd_loss``), in float64."""
    s, z = s_BV.double(), z_BV.double()
    gt = torch.nn.functional.one_hot(labels_B, s.shape[1]).bool()
    ps, pt = torch.softmax(s / tau, dim=1), torch.softmax(z / tau, dim=1)
    bs = torch.stack([(ps * gt).sum(1), (ps * ~gt).sum(1)], dim=1)
    bt = torch.stack([(pt * gt).sum(1), (pt * ~gt).sum(1)], dim=1)
    tckd = torch.nn.functional.kl_div(torch.log(bs), bt, reduction="sum") * tau**2 / s.shape[0]
    pt2 = torch.softmax(z / tau - 1000.0 * gt, dim=1)
    ls2 = torch.log_softmax(s / tau - 1000.0 * gt, dim=1)
    nckd = torch.nn.functional.kl_div(ls2, pt2, reduction="sum") * tau**2 / s.shape[0]
    return alpha * tckd + beta * nckd


def ref_sparse_terms(s_BV, log_p_BV, ids_BS, labels_B, tau):
    """float64 (TCKD, NCKD) on the documented buckets: the kept non-target ids, then one
    tail bucket with every class not kept, each renormalised by its own 1 - p_t."""
    q = torch.softmax(s_BV.double() / tau, dim=-1)
    p = log_p_BV.double().exp()
    tckd, nckd = [], []
    for b, t in enumerate(labels_B.tolist()):
        kept = [i for i in ids_BS[b].tolist() if i >= 0 and i != t]
        tail = [i for i in range(q.shape[1]) if i != t and i not in kept]
        p_t, q_t = p[b, t], q[b, t]
        p_rest, q_rest = 1 - p_t, 1 - q_t
        tckd.append(p_t * torch.log(p_t / q_t) + p_rest * torch.log(p_rest / q_rest))
        pb = torch.cat([p[b, kept], p[b, tail].sum()[None]]) / p_rest
        qb = torch.cat([q[b, kept], q[b, tail].sum()[None]]) / q_rest
        nckd.append(torch.where(pb > 0, pb * torch.log(pb / qb), 0.0).sum())
    return torch.stack(tckd), torch.stack(nckd)


def grad_of(fn, s):
    x = s.detach().clone().requires_grad_(True)
    fn(x).backward()
    assert x.grad is not None
    return x.grad


# ------------------------------------------------------------------------------ dense


def test_doctest_runs():
    result = doctest.testmod(dkd, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 1 and result.failed == 0


@pytest.mark.parametrize(
    "alpha,beta,ce_weight", [(1.0, 8.0, 1.0), (0.5, 2.0, 0.0), (1.0, 0.0, 0.3)]
)
def test_dense_matches_float64_paper_equations_values_and_gradients(alpha, beta, ce_weight):
    tau = 4.0
    s, lp, _, y = case(tau=tau)
    kw = dict(labels_B=y, temperature=tau, alpha=alpha, beta=beta, ce_weight=ce_weight)
    got = losses.dkd_loss(s, lp, **kw)
    ref = ref_loss(s, lp, y, tau, alpha, beta, ce_weight)
    assert got.dtype == torch.float32 and got.shape == ()
    assert float(ref) > 0.05
    np.testing.assert_allclose(float(got), float(ref), rtol=2e-5, atol=1e-6)
    g = grad_of(lambda x: losses.dkd_loss(x, lp, **kw), s)
    g_ref = grad_of(lambda x: ref_loss(x, lp, y, tau, alpha, beta, ce_weight), s.double())
    assert g.dtype == torch.float32 and float(g.abs().max()) > 1e-3
    np.testing.assert_allclose(g.double().numpy(), g_ref.numpy(), rtol=1e-4, atol=1e-6)


def test_tckd_and_nckd_alone_match_float64():
    tau = 2.0
    s, lp, _, y = case(tau=tau, seed=3)
    tckd, nckd = ref_terms(s, lp, y, tau)
    only_t = losses.dkd_loss(s, lp, labels_B=y, temperature=tau, alpha=1.0, beta=0.0, ce_weight=0)
    only_n = losses.dkd_loss(s, lp, labels_B=y, temperature=tau, alpha=0.0, beta=1.0, ce_weight=0)
    np.testing.assert_allclose(float(only_t), tau**2 * float(tckd.mean()), rtol=2e-5)
    np.testing.assert_allclose(float(only_n), tau**2 * float(nckd.mean()), rtol=2e-5)
    unscaled = losses.dkd_loss(
        s, lp, labels_B=y, temperature=tau, beta=0.0, ce_weight=0,
        scale_by_temperature_squared=False,
    )  # fmt: skip
    np.testing.assert_allclose(float(unscaled), float(tckd.mean()), rtol=2e-5)


def test_matches_the_authors_mdistiller_formulation():
    tau, alpha, beta = 4.0, 1.0, 8.0
    s, lp, z, y = case(b=8, v=10, tau=tau, seed=5)
    got = losses.dkd_loss(s, lp, labels_B=y, temperature=tau, alpha=alpha, beta=beta, ce_weight=0)
    ref = mdistiller_dkd(s, z, y, tau, alpha, beta)
    np.testing.assert_allclose(float(got), float(ref), rtol=2e-5)


def test_kd_is_tckd_plus_one_minus_p_t_times_nckd_eq6():
    tau = 3.0
    s, lp, _, y = case(b=5, v=9, tau=tau, seed=11)
    # the reference obeys eq. 6 ...
    tckd, nckd = ref_terms(s, lp, y, tau)
    p_t = lp.double().exp()[torch.arange(5), y]
    kd_rows = losses.forward_kl(s, lp, temperature=tau).double()
    np.testing.assert_allclose((tckd + (1 - p_t) * nckd).numpy(), kd_rows.numpy(), rtol=2e-5)
    # ... and so does dkd_loss, row by row, with alpha = 1 and beta = 1 - p_t
    for b in range(5):
        row = slice(b, b + 1)
        got = losses.dkd_loss(
            s[row], lp[row], labels_B=y[row], temperature=tau,
            alpha=1.0, beta=1.0 - float(p_t[b]), ce_weight=0.0,
        )  # fmt: skip
        kd = losses.kd_loss(s[row], lp[row], temperature=tau)
        np.testing.assert_allclose(float(got), float(kd), rtol=2e-5)
    # alpha = beta = 1 weighs NCKD by 1 > 1 - p_t: more than KD when NCKD > 0
    both = losses.dkd_loss(s, lp, labels_B=y, temperature=tau, alpha=1.0, beta=1.0, ce_weight=0)
    assert float(both) > float(losses.kd_loss(s, lp, temperature=tau)) + 1e-3


def test_three_dim_logits_equal_flattened():
    s, lp, _, y = case(b=6, v=7)
    flat = losses.dkd_loss(s, lp, labels_B=y, temperature=2.0)
    grid = losses.dkd_loss(s.reshape(2, 3, 7), lp.reshape(2, 3, 7), labels_B=y.reshape(2, 3),
                           temperature=2.0)  # fmt: skip
    torch.testing.assert_close(grid, flat)


def test_confident_teacher_rows_stay_finite():
    # p_t near 1: 1 - p_t would cancel in float32; the log-sum-exp of the rest does not
    tau = 1.0
    s = rand(3, 6, seed=2)
    z = rand(3, 6, seed=4)
    y = torch.tensor([0, 3, 5])
    z[torch.arange(3), y] += 40.0
    lp = targets.log_probs(z / tau)
    got = losses.dkd_loss(s, lp, labels_B=y, temperature=tau, alpha=0.0, beta=1.0, ce_weight=0)
    ref = ref_loss(s, lp.double(), y, tau, 0.0, 1.0, 0.0)
    assert torch.isfinite(got)
    np.testing.assert_allclose(float(got), float(ref), rtol=1e-4)


def test_teacher_without_non_target_mass_has_nckd_zero():
    s = rand(2, 4, seed=1)
    lp = torch.full((2, 4), NEG_INF)
    lp[:, 2] = 0.0  # one-hot teacher on the label
    y = torch.tensor([2, 2])
    x = s.clone().requires_grad_(True)
    loss = losses.dkd_loss(x, lp, labels_B=y, temperature=2.0, alpha=0.0, beta=1.0, ce_weight=0)
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert x.grad is not None and torch.isfinite(x.grad).all()
    # TCKD is then -log q_t, a real signal
    tckd = losses.dkd_loss(s, lp, labels_B=y, temperature=1.0, beta=0.0, ce_weight=0)
    expect = -torch.log_softmax(s, dim=-1)[:, 2].mean()
    torch.testing.assert_close(tckd, expect)


# ------------------------------------------------------------------------- ignored rows


def test_ignore_index_rows_are_left_out_of_every_term_with_zero_gradient():
    tau = 2.0
    s, lp, _, y = case(b=6, tau=tau, seed=9)
    labelled = torch.tensor([True, False, True, True, False, True])
    y_ign = torch.where(labelled, y, torch.full_like(y, -100))
    s_bad = s.clone()
    s_bad[~labelled] = float("nan")  # whatever a left-out row holds
    x = s_bad.clone().requires_grad_(True)
    got = losses.dkd_loss(x, lp, labels_B=y_ign, temperature=tau, alpha=1.0, beta=8.0)
    got.backward()
    ref = ref_loss(s[labelled], lp[labelled], y[labelled], tau, 1.0, 8.0, 1.0)
    np.testing.assert_allclose(float(got.detach()), float(ref), rtol=2e-5)
    assert x.grad is not None
    assert torch.equal(x.grad[~labelled], torch.zeros_like(x.grad[~labelled]))
    assert float(x.grad[labelled].abs().min()) > 0


def test_no_labelled_row_gives_zero_with_zero_gradient():
    s, lp, _, _ = case(b=3)
    x = s.clone().requires_grad_(True)
    loss = losses.dkd_loss(x, lp, labels_B=torch.full((3,), -100), temperature=2.0)
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert x.grad is not None and torch.equal(x.grad, torch.zeros_like(s))


def test_normalizer_is_called_once_with_the_labelled_count():
    s, lp, _, y = case(b=6)
    y[1] = -100
    seen: list[int] = []

    def double(count: int) -> float:
        seen.append(count)
        return 2.0 * count

    plain = losses.dkd_loss(s, lp, labels_B=y, temperature=2.0)
    halved = losses.dkd_loss(s, lp, labels_B=y, temperature=2.0, normalizer=double)
    assert seen == [5]
    torch.testing.assert_close(halved, plain / 2)
    sparse = targets.topk_targets(targets.log_probs(s), 4, labels_B=y)
    losses.dkd_loss(s, sparse, labels_B=y, temperature=2.0, normalizer=double)
    assert seen == [5, 5]


def test_bf16_student_logits():
    tau = 2.0
    s, lp, _, y = case(tau=tau, seed=13)
    s16 = s.to(torch.bfloat16)
    x = s16.clone().requires_grad_(True)
    got = losses.dkd_loss(x, lp, labels_B=y, temperature=tau)
    got.backward()
    assert got.dtype == torch.float32
    ref = ref_loss(s16.double(), lp, y, tau, 1.0, 8.0, 1.0)  # the same rounded logits
    np.testing.assert_allclose(float(got.detach()), float(ref), rtol=2e-5)
    assert x.grad is not None and x.grad.dtype == torch.bfloat16
    g_ref = grad_of(lambda a: ref_loss(a, lp, y, tau, 1.0, 8.0, 1.0), s16.double())
    np.testing.assert_allclose(x.grad.double().numpy(), g_ref.numpy(), rtol=2e-2, atol=2e-3)


def test_dense_path_reads_nothing_back_to_the_host():
    # On the meta device every value read (.item(), bool(), nonzero) raises, so a forward
    # and backward pass that completes there has no host synchronisation.
    with pytest.raises(RuntimeError, match="meta"):
        bool(torch.zeros(1, device="meta").any())
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.empty(4, 3, 7, device="meta", dtype=dtype, requires_grad=True)
        lp = torch.empty(4, 3, 7, device="meta")
        y = torch.empty(4, 3, device="meta", dtype=torch.int64)
        loss = losses.dkd_loss(x, lp, labels_B=y, temperature=2.0)
        loss.backward()
        assert loss.shape == () and loss.dtype == torch.float32
        assert x.grad is not None and x.grad.shape == x.shape and x.grad.dtype == dtype


# ------------------------------------------------------------------------------ sparse


def test_sparse_with_k_equal_v_equals_dense():
    tau, v = 2.0, 9
    s, lp, z, y = case(b=5, v=v, tau=tau, seed=21)
    sparse = targets.topk_targets(z / tau, v)
    kw = dict(labels_B=y, temperature=tau, alpha=1.0, beta=8.0, ce_weight=0.5)
    dense_loss = losses.dkd_loss(s, lp, **kw)
    sparse_loss = losses.dkd_loss(s, sparse, **kw)
    torch.testing.assert_close(sparse_loss, dense_loss, rtol=1e-5, atol=1e-6)
    g_dense = grad_of(lambda x: losses.dkd_loss(x, lp, **kw), s)
    g_sparse = grad_of(lambda x: losses.dkd_loss(x, sparse, **kw), s)
    torch.testing.assert_close(g_sparse, g_dense, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["topk", "topp"])
def test_sparse_smaller_k_matches_the_documented_buckets(kind):
    tau, v = 2.0, 12
    s, lp, z, y = case(b=6, v=v, tau=tau, seed=31)
    if kind == "topk":
        sparse = targets.topk_targets(z / tau, 3, labels_B=y)
    else:
        sparse = targets.topp_targets(z / tau, 0.6, max_k=5, labels_B=y)
    assert int((sparse.ids_BS >= 0).sum(dim=1).max()) < v - 1  # a real tail
    tckd, nckd = ref_sparse_terms(s, lp, sparse.ids_BS, y, tau)
    kw = dict(labels_B=y, temperature=tau, ce_weight=0.0)
    only_t = losses.dkd_loss(s, sparse, alpha=1.0, beta=0.0, **kw)
    only_n = losses.dkd_loss(s, sparse, alpha=0.0, beta=1.0, **kw)
    np.testing.assert_allclose(float(only_t), tau**2 * float(tckd.mean()), rtol=2e-5)
    np.testing.assert_allclose(float(only_n), tau**2 * float(nckd.mean()), rtol=2e-5)
    # TCKD is exact; NCKD a lower bound on the dense value (data processing)
    dense_t = losses.dkd_loss(s, lp, alpha=1.0, beta=0.0, **kw)
    dense_n = losses.dkd_loss(s, lp, alpha=0.0, beta=1.0, **kw)
    np.testing.assert_allclose(float(only_t), float(dense_t), rtol=2e-5)
    assert float(only_n) < float(dense_n)
    # gradients of the reference on the same buckets
    g = grad_of(lambda x: losses.dkd_loss(x, sparse, alpha=1.0, beta=8.0, **kw), s)

    def ref(x):
        t, n = ref_sparse_terms(x, lp, sparse.ids_BS, y, tau)
        return tau**2 * (t + 8.0 * n).mean()

    g_ref = grad_of(ref, s.double())
    np.testing.assert_allclose(g.double().numpy(), g_ref.numpy(), rtol=1e-4, atol=1e-6)


def test_sparse_ignore_index_rows_and_mixtures():
    tau = 2.0
    s, _, z, y = case(b=5, v=10, tau=tau, seed=41)
    y[2] = -100
    sparse = targets.topk_targets(z / tau, 4, labels_B=y)
    x = s.clone()
    x[2] = float("nan")
    x.requires_grad_(True)
    got = losses.dkd_loss(x, sparse, labels_B=y, temperature=tau)
    got.backward()
    keep = y != -100
    ref = losses.dkd_loss(s[keep], sparse.rows(keep), labels_B=y[keep], temperature=tau)
    torch.testing.assert_close(got, ref)
    assert x.grad is not None and torch.equal(x.grad[2], torch.zeros(10))
    # a mixture of two teachers that both kept the labels is accepted
    other = targets.topk_targets(rand(5, 10, seed=42) / tau, 4, labels_B=y)
    mix = targets.combine_sparse_ensemble([sparse, other])
    assert torch.isfinite(losses.dkd_loss(s, mix, labels_B=y, temperature=tau))


def test_sparse_refuses_a_label_that_was_not_kept():
    tau = 2.0
    s, _, z, _ = case(b=4, v=10, tau=tau, seed=51)
    sparse = targets.topk_targets(z / tau, 2)
    y = (z / tau).argmin(dim=1)  # never in the top 2
    with pytest.raises(ConfigError, match="labels: true"):
        losses.dkd_loss(s, sparse, labels_B=y, temperature=tau)


def test_sparse_refuses_sampled_kinds():
    tau = 2.0
    s, _, z, y = case(b=4, v=10, tau=tau, seed=61)
    gen = torch.Generator().manual_seed(0)
    sampled = targets.sampled_targets(z / tau, 8, labels_B=y, generator=gen)
    for t in (sampled, targets.counts_only(sampled)):
        with pytest.raises(ConfigError, match="estimate"):
            losses.dkd_loss(s, t, labels_B=y, temperature=tau)


# ------------------------------------------------------------------------------ errors


def test_clear_errors_for_bad_input():
    s, lp, _, y = case(b=4, v=6)
    with pytest.raises(ConfigError, match="same shape"):
        losses.dkd_loss(s, lp[:, :5], labels_B=y, temperature=2.0)
    with pytest.raises(ConfigError, match="labels shape"):
        losses.dkd_loss(s, lp, labels_B=y[:3], temperature=2.0)
    for bad in (6, -5):
        y_bad = y.clone()
        y_bad[1] = bad
        with pytest.raises(ConfigError, match=r"labels must be in \[0, 6\)"):
            losses.dkd_loss(s, lp, labels_B=y_bad, temperature=2.0, ce_weight=0.0)
        sparse = targets.topk_targets(lp, 6)
        with pytest.raises(ConfigError, match=r"labels must be in \[0, 6\)"):
            losses.dkd_loss(s, sparse, labels_B=y_bad, temperature=2.0)
    with pytest.raises(ConfigError, match="at least 2 classes"):
        losses.dkd_loss(s[:, :1], lp[:, :1], labels_B=torch.zeros(4, dtype=torch.int64),
                        temperature=2.0)  # fmt: skip
    with pytest.raises(ConfigError, match="temperature"):
        losses.dkd_loss(s, lp, labels_B=y, temperature=0.0)
    for name in ("alpha", "beta", "ce_weight"):
        with pytest.raises(ConfigError, match=name):
            losses.dkd_loss(s, lp, labels_B=y, temperature=2.0, **{name: -1.0})
    with pytest.raises(ConfigError, match="rows"):
        losses.dkd_loss(s, targets.topk_targets(lp[:3], 6), labels_B=y, temperature=2.0)
