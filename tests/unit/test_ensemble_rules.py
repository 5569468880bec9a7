"""Per-sample and per-token ensemble rules (kdcache.targets): float64 references, sparse
with k = V equals dense, the refusals, the rule's JSON and the view key.

Shape legend: K teachers, B rows, T tokens, V vocabulary, S kept slots.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import kdcache
from kdcache import losses, schema, targets
from kdcache.errors import ConfigError
from kdcache.stores.view import EnsembleView, view_json
from kdcache.targets import EnsembleRule
from kdcache.targets.sparse import PAD_ID, SparseTargets
from kdcache.testing import linear_teacher, toy_dataset

K, B, V = 3, 6, 7


def scaled(k: int = K, b: int = B, v: int = V, seed: int = 0, *extra: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (k, b, *extra, v)
    # teachers of different sharpness, so the per-row weights differ between teachers
    sharp = torch.tensor([0.5, 2.0, 4.0, 1.0, 3.0][:k]).reshape((k,) + (1,) * (len(shape) - 1))
    return torch.randn(shape, generator=g) * sharp


def np_probs(s_KBV: torch.Tensor) -> np.ndarray:
    x = s_KBV.double().numpy()
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_entropy(p: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(p > 0, p * np.log(p), 0.0).sum(axis=-1)


def np_mix(p_KBV: np.ndarray, w_KB: np.ndarray) -> np.ndarray:
    return (p_KBV * w_KB[..., None]).sum(axis=0)


def dense_of(t: SparseTargets, v: int) -> torch.Tensor:
    """float32 [B, V] log-probabilities of a sparse target whose ids cover V."""
    return torch.full((t.num_rows, v), float("-inf")).scatter(
        1, t.ids_BS.clamp(min=0), t.log_probs()
    )


# ---------------------------------------------------------------- dense, float64 references


@pytest.mark.parametrize("extra", [(), (4,)], ids=["per_sample", "per_token"])
def test_confidence_max_against_float64(extra):
    s = scaled(K, B, V, 1, *extra)
    prior = np.array([1.0, 2.0, 1.0])
    got = targets.combine_ensemble(s, rule="confidence_max", weights=[1, 2, 1])
    p = np_probs(s)
    raw = prior.reshape((K,) + (1,) * (p.ndim - 2)) * p.max(axis=-1)
    w = raw / raw.sum(axis=0, keepdims=True)
    want = np_mix(p, w)
    assert got.shape == s.shape[1:]
    np.testing.assert_allclose(got.exp().double().numpy(), want, atol=2e-6)
    np.testing.assert_allclose(got.exp().sum(-1).numpy(), 1.0, atol=1e-5)
    # the rows do get different weights, and the mean of probabilities is not the answer
    assert np.ptp(w[0], axis=None) > 0.05
    static = np.broadcast_to((prior / 4).reshape((K,) + (1,) * (w.ndim - 1)), w.shape)
    assert not np.allclose(want, np_mix(p, static), atol=1e-3)


@pytest.mark.parametrize("extra", [(), (4,)], ids=["per_sample", "per_token"])
@pytest.mark.parametrize("tau_h", [1.0, 0.25])
def test_confidence_entropy_against_float64(extra, tau_h):
    s = scaled(K, B, V, 2, *extra)
    got = targets.combine_ensemble(
        s, rule="confidence_entropy", weights=[3, 1, 1], entropy_temperature=tau_h
    )
    p = np_probs(s)
    logit = np.log(np.array([0.6, 0.2, 0.2])).reshape((K,) + (1,) * (p.ndim - 2))
    logit = logit - np_entropy(p) / tau_h
    w = np.exp(logit - logit.max(axis=0))
    w /= w.sum(axis=0)
    np.testing.assert_allclose(got.exp().double().numpy(), np_mix(p, w), atol=2e-6)
    weights = targets.ensemble_weights(
        s, rule="confidence_entropy", weights=[3, 1, 1], entropy_temperature=tau_h
    )
    np.testing.assert_allclose(weights.double().numpy(), w, atol=2e-6)


def test_dense_entropy_against_float64():
    s = scaled(2, 4, 9, 3)
    np.testing.assert_allclose(
        targets.dense_entropy(torch.log_softmax(s, -1)).double().numpy(),
        np_entropy(np_probs(s)),
        atol=2e-6,
    )
    one_hot = torch.log(torch.tensor([[1.0, 0.0, 0.0]]))
    assert float(targets.dense_entropy(one_hot)) == 0.0  # 0 log 0 = 0, no NaN


@pytest.mark.parametrize("fallback", ["mean_probs", "mean_logprobs"])
def test_best_on_label_against_float64(fallback):
    s = scaled(K, B, V, 4)
    labels = torch.tensor([0, 3, -100, 6, 2, -100])
    got = targets.combine_ensemble(
        s, rule="best_on_label", labels_B=labels, weights=[1, 1, 2], fallback=fallback
    )
    p = np_probs(s)
    prior = np.array([0.25, 0.25, 0.5])
    for b in range(B):
        y = int(labels[b])
        if y >= 0:
            k = int(np.argmin(-np.log(p[:, b, y])))
            want = p[k, b]
        elif fallback == "mean_probs":
            want = (prior[:, None] * p[:, b]).sum(0)
        else:
            g = np.exp((prior[:, None] * np.log(p[:, b])).sum(0))
            want = g / g.sum()
        np.testing.assert_allclose(got[b].exp().double().numpy(), want, atol=2e-6)
    # the picks are not all one teacher (the test would not tell rules apart otherwise)
    w = targets.ensemble_weights(s, rule="best_on_label", labels_B=labels)
    assert len({int(w[:, b].argmax()) for b in (0, 1, 3, 4)}) > 1


def test_best_on_label_per_token_and_ties_go_to_the_lowest_index():
    s = scaled(2, 2, 5, 5, 3)
    s = torch.cat([s[:1], s[:1], s[1:]])  # teachers 0 and 1 identical: every tie
    labels = torch.tensor([[1, 2, -100], [0, 4, 3]])
    w = targets.ensemble_weights(s, rule="best_on_label", labels_B=labels)
    p = np_probs(s)
    for b in range(2):
        for t in range(3):
            y = int(labels[b, t])
            if y < 0:
                np.testing.assert_allclose(w[:, b, t].numpy(), 1 / 3, atol=1e-7)
                continue
            want = 0 if p[0, b, t, y] >= p[2, b, t, y] else 2
            assert w[:, b, t].tolist() == [float(k == want) for k in range(3)]
    # a teacher of prior weight 0 is never picked, even where it is best
    w0 = targets.ensemble_weights(s, rule="best_on_label", labels_B=labels, weights=[0, 1, 1])
    assert float(w0[0][labels >= 0].max()) == 0.0
    assert float(w0[1][labels >= 0].sum() + w0[2][labels >= 0].sum()) == 5.0


def test_best_on_label_fallback_error_and_label_refusals():
    s = scaled(2, 3, 4, 6)
    with pytest.raises(ConfigError, match="row 1 has no label"):
        targets.combine_ensemble(
            s, rule="best_on_label", labels_B=torch.tensor([0, -100, 2]), fallback="error"
        )
    ok = targets.combine_ensemble(
        s, rule="best_on_label", labels_B=torch.tensor([0, 1, 2]), fallback="error"
    )
    assert ok.shape == (3, 4)
    with pytest.raises(ConfigError, match="needs labels_B"):
        targets.combine_ensemble(s, rule="best_on_label")
    with pytest.raises(ConfigError, match=r"labels must be in \[0, 4\)"):
        targets.combine_ensemble(s, rule="best_on_label", labels_B=torch.tensor([0, 4, 1]))
    with pytest.raises(ConfigError, match="shape"):
        targets.combine_ensemble(s, rule="best_on_label", labels_B=torch.tensor([0, 1]))
    with pytest.raises(ConfigError, match="fallback must be one of"):
        targets.combine_ensemble(s, rule="best_on_label", labels_B=[0, 1, 2], fallback="max")


def test_route_by_domain_and_by_class_against_float64():
    s = scaled(K, B, V, 7)
    p = np_probs(s)
    domains = np.array(["code", "news", "code", "chat", "news", "chat"], dtype=object)
    routes = {"code": 2, "news": 0, "chat": [1.0, 0.0, 3.0]}
    got = targets.combine_ensemble(s, rule="route", route_keys_B=domains, routes=routes)
    table = {"code": [0, 0, 1.0], "news": [1.0, 0, 0], "chat": [0.25, 0, 0.75]}
    w = np.array([table[d] for d in domains]).T
    np.testing.assert_allclose(got.exp().double().numpy(), np_mix(p, w), atol=2e-6)
    # by the class: a torch label column, routes keyed by int
    classes = torch.tensor([0, 1, 1, 0, 2, 2])
    by_class = targets.combine_ensemble(
        s, rule="route", route_keys_B=classes, routes={0: 1, 1: 0, 2: 2}
    )
    pick = {0: 1, 1: 0, 2: 2}
    for b in range(B):
        want = p[pick[int(classes[b])], b]
        np.testing.assert_allclose(by_class[b].exp().double().numpy(), want, atol=2e-6)


def test_route_per_sample_keys_broadcast_over_tokens():
    s = scaled(2, 3, 5, 8, 4)  # [K, B, T, V]
    got = targets.combine_ensemble(
        s, rule="route", route_keys_B=np.array([1, 0, 1]), routes={0: 0, 1: 1}
    )
    want = torch.log_softmax(torch.stack([s[1, 0], s[0, 1], s[1, 2]]), -1)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_route_refusals_name_what_is_wrong():
    s = scaled(2, 3, 4, 9)
    with pytest.raises(ConfigError, match="no teacher is routed for key 'sports'"):
        targets.combine_ensemble(
            s, rule="route", route_keys_B=["news", "sports", "news"], routes={"news": 0}
        )
    with pytest.raises(ConfigError, match="no teacher is routed for key 7"):
        targets.combine_ensemble(s, rule="route", route_keys_B=[0, 7, 0], routes={0: 1})
    with pytest.raises(ConfigError, match="goes to teacher 2, but there are 2 teachers"):
        targets.combine_ensemble(s, rule="route", route_keys_B=[0, 0, 0], routes={0: 2})
    with pytest.raises(ConfigError, match="has 3 weights for 2 teachers"):
        targets.combine_ensemble(s, rule="route", route_keys_B=[0, 0, 0], routes={0: [1, 1, 1]})
    with pytest.raises(ConfigError, match="takes no static weights"):
        targets.combine_ensemble(
            s, rule="route", route_keys_B=[0, 0, 0], routes={0: 1}, weights=[1, 1]
        )
    with pytest.raises(ConfigError, match="needs routes"):
        targets.combine_ensemble(s, rule="route", route_keys_B=[0, 0, 0])
    with pytest.raises(ConfigError, match="needs route_keys_B"):
        targets.combine_ensemble(s, rule="route", routes={0: 1})
    with pytest.raises(ConfigError, match="shape"):
        targets.combine_ensemble(s, rule="route", route_keys_B=[0, 0], routes={0: 1})


def test_static_weights_of_the_wrong_length_are_refused_for_every_rule():
    s = scaled(2, 3, 4, 10)
    for rule in ("mean_probs", "mean_logprobs", "confidence_max", "confidence_entropy"):
        with pytest.raises(ConfigError, match="3 ensemble weights for 2 teachers"):
            targets.combine_ensemble(s, rule=rule, weights=[1, 1, 1])
    with pytest.raises(ConfigError, match="3 ensemble weights for 2 teachers"):
        targets.combine_ensemble(s, rule="best_on_label", weights=[1, 1, 1], labels_B=[0, 1, 2])


def test_static_rules_through_an_ensemble_rule_are_unchanged():
    s = scaled(K, B, V, 11)
    for rule in targets.ENSEMBLE_RULES:
        old = targets.combine_ensemble(s, rule=rule, weights=[2, 5, 3])
        new = targets.combine_ensemble(s, rule=EnsembleRule(rule, weights=(2, 5, 3)))
        assert torch.equal(old, new)
        w = targets.ensemble_weights(s, rule=rule, weights=[2, 5, 3])
        np.testing.assert_allclose(w.numpy(), np.broadcast_to([[0.2], [0.5], [0.3]], (K, B)))


# ---------------------------------------------------------------- sparse


@pytest.mark.parametrize(
    "rule,kw",
    [
        ("confidence_max", {"weights": [1, 2, 1]}),
        ("confidence_entropy", {"entropy_temperature": 0.5}),
        ("best_on_label", {"labels_B": torch.tensor([0, 3, -100, 6, 2, -100])}),
        (
            "route",
            {
                "route_keys_B": ["a", "b", "a", "c", "b", "c"],
                "routes": {"a": 2, "b": 0, "c": [1, 1, 0]},
            },
        ),
    ],
)
def test_sparse_with_full_supports_equals_dense(rule, kw):
    s = scaled(K, B, V, 12)
    sparse = [targets.topk_targets(s[k], V) for k in range(K)]
    got = targets.combine_sparse_ensemble(sparse, rule=rule, **kw)
    want = targets.combine_ensemble(s, rule=rule, **kw)
    assert got.kind == "mixture"
    torch.testing.assert_close(dense_of(got, V), want, atol=3e-6, rtol=0)
    torch.testing.assert_close(
        targets.sparse_ensemble_weights(sparse, rule=rule, **kw),
        targets.ensemble_weights(s, rule=rule, **kw),
        atol=2e-6,
        rtol=0,
    )


def test_sparse_confidence_max_is_exact_with_a_tail():
    s = scaled(K, B, 20, 13)
    sparse = [targets.topk_targets(s[k], 3) for k in range(K)]
    w = targets.sparse_ensemble_weights(sparse, rule="confidence_max")
    p = np_probs(s)
    raw = p.max(axis=-1)
    np.testing.assert_allclose(w.double().numpy(), raw / raw.sum(0), atol=2e-6)
    got = targets.combine_sparse_ensemble(sparse, rule="confidence_max")
    wn = raw / raw.sum(0)
    for b in range(B):
        ref: dict[int, float] = {}
        for k in range(K):
            for i in sparse[k].ids_BS[b].tolist():
                ref[i] = ref.get(i, 0.0) + wn[k, b] * p[k, b, i]
        kept = {
            int(i): float(v)
            for i, v in zip(got.ids_BS[b].tolist(), got.log_probs()[b].exp().tolist(), strict=True)
            if i != PAD_ID
        }
        assert set(kept) == set(ref)
        for i in ref:
            assert kept[i] == pytest.approx(ref[i], abs=2e-6)
        tail = sum(wn[k, b] * (1 - p[k, b, sparse[k].ids_BS[b]].sum()) for k in range(K))
        assert float(got.tail_log_mass()[b].exp()) == pytest.approx(tail, abs=3e-6)


@pytest.mark.parametrize("k", [1, 3, 8, 19])
def test_sparse_entropy_bound_is_a_lower_bound_and_exact_without_tail(k):
    s = scaled(1, 40, 20, 14 + k)[0]
    true_h = np_entropy(np_probs(s))
    topk = targets.sparse_entropy_bound(targets.topk_targets(s, k)).double().numpy()
    topp = targets.sparse_entropy_bound(targets.topp_targets(s, 0.8, max_k=k)).double().numpy()
    for bound in (topk, topp):
        assert (bound <= true_h + 2e-6).all()
        assert (bound >= 0).all()
    kept = targets.topk_targets(s, k)
    p_kept = kept.log_probs().exp().double().numpy()
    h_kept = np_entropy(p_kept)
    assert (topk >= h_kept - 2e-6).all()  # the tail term counts
    if k == 1:
        # a single kept id: bound = -p log p - m log min(m, p)
        assert (topk > h_kept + 1e-3).any()
    full = targets.sparse_entropy_bound(targets.topk_targets(s, 20)).double().numpy()
    np.testing.assert_allclose(full, true_h, atol=3e-6)


def test_sparse_entropy_bound_of_counts_only_is_the_entropy_of_p_hat():
    s = scaled(1, 5, 12, 15)[0]
    draws = targets.sampled_targets(s, 16, generator=torch.Generator().manual_seed(0))
    counts = targets.counts_only(draws)
    c = counts.counts_BS.double().numpy()
    p_hat = c / c.sum(-1, keepdims=True)
    np.testing.assert_allclose(
        targets.sparse_entropy_bound(counts).double().numpy(), np_entropy(p_hat), atol=2e-6
    )


def test_sparse_best_on_label_picks_one_teacher_exactly():
    s = scaled(K, B, 30, 16)
    labels = torch.tensor([4, 29, -100, 0, 17, 8])
    sparse = [targets.topk_targets(s[k], 4, labels_B=labels) for k in range(K)]
    got = targets.combine_sparse_ensemble(sparse, rule="best_on_label", labels_B=labels)
    p = np_probs(s)
    fallback = targets.combine_sparse_ensemble(sparse, rule="mean_probs")
    for b in range(B):
        y = int(labels[b])
        row_ids = got.ids_BS[b][got.ids_BS[b] >= 0]
        if y < 0:
            assert torch.equal(row_ids, fallback.ids_BS[b][fallback.ids_BS[b] >= 0])
            continue
        k = int(np.argmin(-np.log(p[:, b, y])))
        src = sparse[k]
        want = {
            int(i): float(v)
            for i, v in zip(src.ids_BS[b].tolist(), src.log_probs()[b].tolist(), strict=True)
            if i != PAD_ID
        }
        have = dict(zip(row_ids.tolist(), got.log_probs()[b][: len(row_ids)].tolist(), strict=True))
        assert set(have) == set(want)
        for i in want:
            assert have[i] == pytest.approx(want[i], abs=1e-6)
        assert float(got.tail_log_mass()[b]) == pytest.approx(
            float(src.tail_log_mass()[b]), abs=1e-6
        )


def test_sparse_refusals_say_why():
    s = scaled(2, 4, 10, 17)
    topk = [targets.topk_targets(s[k], 3) for k in range(2)]
    labels = torch.tensor([0, 1, 2, 3])
    with pytest.raises(ConfigError, match=r"did not keep the label .* labels: true"):
        targets.combine_sparse_ensemble(topk, rule="best_on_label", labels_B=torch.full((4,), 9))
    with pytest.raises(ConfigError, match="fallback 'mean_logprobs'"):
        targets.combine_sparse_ensemble(
            [targets.topk_targets(s[k], 3, labels_B=labels) for k in range(2)],
            rule="best_on_label",
            labels_B=labels,
            fallback="mean_logprobs",
        )
    mixture = targets.combine_sparse_ensemble(topk)
    for rule in ("confidence_max", "confidence_entropy"):
        with pytest.raises(ConfigError, match="kept values are bounds"):
            targets.combine_sparse_ensemble([mixture, topk[0]], rule=rule)
    draws = targets.sampled_targets(s[0], 5, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match="may miss the most probable"):
        targets.sparse_entropy_bound(draws)
    with pytest.raises(ConfigError, match="sampled targets do not combine"):
        targets.combine_sparse_ensemble([draws, draws], rule="confidence_max")
    with pytest.raises(ConfigError, match="no teacher is routed for key 5"):
        targets.combine_sparse_ensemble(
            topk, rule="route", route_keys_B=[0, 5, 0, 0], routes={0: 1}
        )
    # route takes any kind the mixture takes: a mixture routed is that mixture, exactly
    routed = targets.combine_sparse_ensemble(
        [mixture, topk[0]], rule="route", route_keys_B=[0, 0, 0, 0], routes={0: 0}
    )
    torch.testing.assert_close(dense_of(routed, 10), dense_of(mixture, 10), atol=1e-6, rtol=0)


def test_counts_only_targets_are_weighted_by_label_but_not_combined():
    s = scaled(2, 3, 8, 18)
    gen = torch.Generator().manual_seed(1)
    counts = [
        targets.counts_only(targets.sampled_targets(s[k], 32, generator=gen)) for k in range(2)
    ]
    label = int(counts[0].ids_BS[0, 0])
    labels = torch.tensor([label, -100, -100])
    # they are not combined into one target (a mixture would lose the refusal of
    # divergences that are not linear in p); their per-row weights are still exact
    with pytest.raises(ConfigError, match="sampled targets do not combine"):
        targets.combine_sparse_ensemble(counts, rule="best_on_label", labels_B=labels)
    # a teacher that never drew the label has p_hat(y) = 0 exactly: cross-entropy +inf
    w = targets.sparse_ensemble_weights(counts, rule="best_on_label", labels_B=labels)
    lp = [
        float(c.log_probs()[0][c.ids_BS[0] == label].max())
        if (c.ids_BS[0] == label).any()
        else float("-inf")
        for c in counts
    ]
    assert w[:, 0].tolist() == [float(k == int(np.argmax(lp))) for k in range(2)]


# ---------------------------------------------------------------- the rule and its JSON


@pytest.mark.parametrize(
    "rule",
    [
        EnsembleRule(),
        EnsembleRule("mean_logprobs", weights=(1.0, 3.0)),
        EnsembleRule("confidence_max", weights=(1, 2)),
        EnsembleRule("confidence_entropy", entropy_temperature=0.5),
        EnsembleRule("best_on_label", fallback="error"),
        EnsembleRule("route", routes={"b": 1, "a": [0.5, 0.5]}, route_column="domain"),
        EnsembleRule("route", routes={3: 0, 1: 1}, route_column="labels"),
    ],
)
def test_rule_json_round_trip(rule):
    data = json.loads(json.dumps(rule.to_json()))
    assert EnsembleRule.from_json(data) == rule
    assert schema.canonical_json(EnsembleRule.from_json(data).to_json()) == schema.canonical_json(
        rule.to_json()
    )


def test_rule_defaults_are_resolved_and_stray_parameters_refused():
    assert EnsembleRule("best_on_label").fallback == "mean_probs"
    assert EnsembleRule("confidence_entropy").entropy_temperature == 1.0
    assert EnsembleRule("route", routes={"x": 0}).routes == (("x", 0),)
    for bad in (
        {"rule": "max"},
        {"rule": "mean_probs", "fallback": "error"},
        {"rule": "confidence_max", "entropy_temperature": 2.0},
        {"rule": "mean_probs", "routes": {0: 0}},
        {"rule": "confidence_entropy", "entropy_temperature": 0.0},
        {"rule": "route", "routes": {0: 0, "a": 1}},
        {"rule": "route", "routes": [(0, 0), (0, 1)]},
        {"rule": "route", "routes": {0: True}},
        {"rule": "mean_probs", "weights": (1.0, -1.0)},
    ):
        with pytest.raises(ConfigError):
            EnsembleRule(**bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unknown ensemble rule field"):
        EnsembleRule.from_json({"rule": "mean_probs", "temperature": 2.0})
    with pytest.raises(ConfigError, match="put them in the EnsembleRule"):
        targets.combine_ensemble(scaled(2, 1, 3), rule=EnsembleRule(), routes={0: 1})


# ---------------------------------------------------------------- views and losses


def test_view_json_of_the_static_rules_is_unchanged():
    keys = ["a" * 64, "b" * 64]
    assert view_json(keys, "mean_probs", None) == {
        "format_version": schema.VIEW_FORMAT_VERSION,
        "kind": "ensemble",
        "entries": keys,
        "rule": "mean_probs",
        "weights": None,
    }
    # pinned: these keys were computed before per-sample rules existed
    assert schema.content_key(view_json(keys, "mean_probs", None)) == (
        "6ae9fe21aa66a71bf8951f8f389de71f"
    )
    assert schema.content_key(view_json(keys, "mean_logprobs", [1.0, 3.0])) == (
        "1d75a13894a8a601162fda8d0f86d9b0"
    )
    assert schema.content_key(view_json(keys, EnsembleRule("mean_probs"))) == (
        "6ae9fe21aa66a71bf8951f8f389de71f"
    )
    with pytest.raises(ConfigError, match="goes to teacher 2"):
        view_json(keys, EnsembleRule("route", routes={0: 2}, route_column="labels"))


def test_a_new_rule_is_a_new_view_over_the_same_entries(root):
    ds = toy_dataset()
    view = kdcache.build_cache(
        ds,
        kdcache.TeacherEnsemble([linear_teacher(seed=s) for s in range(2)]),
        temperature=2.0,
        root=root,
        executor="local",
        progress=False,
    )
    rules = [
        EnsembleRule("confidence_max"),
        EnsembleRule("confidence_entropy", entropy_temperature=0.5),
        EnsembleRule("best_on_label"),
        EnsembleRule("best_on_label", fallback="error"),
        EnsembleRule("route", routes={0: 0, 1: 1, 2: 0}, route_column="labels"),
    ]
    keys = {view.key}
    for rule in rules:
        other = EnsembleView(view.entries, rule)
        assert [e.key for e in other.entries] == [e.key for e in view.entries]
        assert other.rule == rule.rule and other.ensemble_rule == rule
        keys.add(other.key)
        other.save()
        saved = json.loads(other.root.child(schema.ENSEMBLES_DIR).read_bytes(f"{other.key}.json"))
        assert saved["entries"] == [e.key for e in view.entries]
        again = EnsembleView.from_json(view.entries, saved)
        assert again.ensemble_rule == rule and again.key == other.key
    assert len(keys) == len(rules) + 1
    with pytest.raises(ConfigError, match="needs route_column"):
        EnsembleView(view.entries, EnsembleRule("route", routes={0: 0}))
    with pytest.raises(ConfigError, match="route 1 has 3 weights for 2 teachers"):
        EnsembleView(view.entries, EnsembleRule("route", routes={1: [1, 1, 1]}, route_column="x"))


def test_a_teacher_ensemble_with_a_per_sample_rule_builds_its_view(root):
    """``TeacherEnsemble(rule=EnsembleRule(...))``: the build computes the same entries
    as with the default rule (a hit) and returns the view with that rule, whose key is
    the one the build plans; online ``log_probs`` applies the same rule."""
    ds = toy_dataset()
    teachers = [linear_teacher(seed=s) for s in range(2)]
    kw = dict(temperature=2.0, root=root, executor="local", progress=False)
    plain = kdcache.build_cache(ds, kdcache.TeacherEnsemble(teachers), **kw)
    rule = EnsembleRule("best_on_label", fallback="mean_logprobs")
    ensemble = kdcache.TeacherEnsemble(teachers, rule=rule)
    assert ensemble.rule == "best_on_label" and ensemble.ensemble_rule == rule
    ruled = kdcache.build_cache(ds, ensemble, **kw)
    assert ruled.build_report.hit and ruled.ensemble_rule == rule
    assert [e.key for e in ruled.entries] == [e.key for e in plain.entries]
    assert ruled.key != plain.key
    assert ruled.key == kdcache.build.stage.planned_key(ds, ensemble, temperature=2.0)
    shard = ds.read_shard(0)
    x, y = torch.as_tensor(shard["inputs"][:6]), torch.as_tensor(shard["labels"][:6])
    y[1] = -100
    online = ensemble.log_probs(x, temperature=2.0, labels_B=y)
    stacked = torch.stack([targets.scale_logits(t.logits(x), 2.0) for t in teachers])
    torch.testing.assert_close(online, targets.combine_ensemble(stacked, rule=rule, labels_B=y))
    with pytest.raises(ConfigError, match="labels"):
        ensemble.log_probs(x, temperature=2.0)
    with pytest.raises(ConfigError, match="unknown rule 'vote'"):
        kdcache.TeacherEnsemble(teachers, rule="vote")
    with pytest.raises(ConfigError, match="3 weights for 2 teachers"):
        kdcache.TeacherEnsemble(teachers, weights=[1, 1, 1], rule="confidence_max")


def test_multi_teacher_loss_with_a_per_sample_rule():
    s = scaled(2, 5, 6, 19)
    student = torch.randn(5, 6, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 1, 2, -100, 5])
    lp = [torch.log_softmax(s[k], -1) for k in range(2)]
    got = losses.multi_teacher_loss(
        student, lp, temperature=2.0, rule="best_on_label", labels_B=labels
    )
    combined = targets.combine_ensemble(s, rule="best_on_label", labels_B=labels)
    want = losses.kd_loss(student, combined, temperature=2.0)
    torch.testing.assert_close(got, want)
    sparse = [targets.topk_targets(s[k], 6) for k in range(2)]
    got_sparse = losses.multi_teacher_loss(
        student, sparse, temperature=2.0, rule="best_on_label", labels_B=labels
    )
    torch.testing.assert_close(got_sparse, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="use mode='combined_target'"):
        losses.multi_teacher_loss(
            student, lp, temperature=2.0, mode="sum_of_losses", rule="confidence_max"
        )


def test_open_cache_keeps_the_rule_of_a_saved_view(root):
    ds = toy_dataset()
    view = kdcache.build_cache(
        ds,
        kdcache.TeacherEnsemble([linear_teacher(seed=s) for s in range(2)]),
        temperature=2.0,
        root=root,
        executor="local",
        progress=False,
    )
    rule = EnsembleRule("confidence_entropy", entropy_temperature=0.5)
    other = EnsembleView(view.entries, rule)
    reopened = kdcache.open_cache(other.save())
    assert reopened.ensemble_rule == rule and reopened.key == other.key


def test_route_keys_of_mixed_types_are_refused():
    with pytest.raises(ConfigError, match="mixes types"):
        targets.combine_ensemble(
            scaled(2, 2, 3),
            rule="route",
            route_keys_B=np.array([1, "a"], dtype=object),
            routes={1: 0},
        )


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "topk"])
def test_the_reader_applies_a_per_sample_rule_without_recomputing_a_teacher(root, sparse):
    """A view of the same entries under ``best_on_label`` (rows without a label fall back
    to mean_probs) gives, through SoftTargetDataset, exactly the rule applied to the
    stored targets with the batch's labels; no entry is written or recomputed."""
    ds = toy_dataset(num_records=64, num_shards=2)
    kind: dict = {"kind": "topk", "params": {"k": 5, "labels": True}} if sparse else {}
    view = kdcache.build_cache(
        ds,
        kdcache.TeacherEnsemble([linear_teacher(seed=s) for s in range(3)]),
        temperature=2.0,
        root=root,
        executor="local",
        progress=False,
        **kind,
    )
    before = sorted(e.key for e in view.entries)
    rule = kdcache.EnsembleRule("best_on_label", fallback="mean_probs")
    ruled = view.with_rule(rule)
    assert ruled.key != view.key and sorted(e.key for e in ruled.entries) == before
    stream = kdcache.SoftTargetDataset(ruled, ds, batch_size=16, shuffle=False)
    batch = next(iter(stream))
    ids = batch["sample_id"].numpy()
    pos = {int(i): n for n, i in enumerate(np.asarray(ds.read_shard(0)["sample_id"]))}
    rows = torch.tensor([pos[int(i)] for i in ids])
    if sparse:
        per_teacher = [e.read_sparse_shard(0)[1].rows(rows) for e in view.entries]
        want = targets.combine_sparse_ensemble(per_teacher, rule=rule, labels_B=batch["labels"])
        got = batch["targets"]
        assert torch.equal(got.ids_BS, want.ids_BS)
        assert torch.allclose(got.log_probs(), want.log_probs(), atol=0, rtol=0)
    else:
        scaled = torch.stack(
            [torch.from_numpy(np.array(e.read_shard(0)[1]))[rows] for e in view.entries]
        )
        want = targets.combine_ensemble(scaled, rule=rule, labels_B=batch["labels"])
        assert torch.equal(batch["teacher_log_probs"], want)
    with pytest.raises(ConfigError, match="route_column"):
        view.with_rule(kdcache.EnsembleRule("route", routes={0: 0}))
