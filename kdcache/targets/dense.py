"""Soft-target math: temperature scaling, re-tempering, sparsification, ensembles, dtypes.

Pure tensor functions; no I/O, no stores, no configs.

Shape legend:
    K: teachers.  B: batch (samples, or flattened tokens).  V: classes or vocabulary.
    S: kept sparse entries per row.  G: temperatures in a log-partition grid.

Conventions (see ``docs/losses.md``):
    * A teacher's *soft target* at temperature tau is ``softmax(z / tau)`` over V, where
      ``z`` are its raw logits.
    * What a dense cache stores are the *scaled logits* ``z / tau`` (never probabilities),
      so the target is recovered exactly as ``log_softmax(stored)`` and can be re-tempered
      exactly to any tau' as ``stored * tau / tau'``.
    * A sparse target (:class:`SparseTargets`) stores, per row, the kept ids, their scaled
      logits ``z / tau`` and the log-partition ``logsumexp(z / tau)`` over the *full*
      vocabulary, so the kept log-probabilities and the tail mass outside them are exact.
    * All math runs in float32, whatever the input or storage dtype.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from kdcache.errors import ConfigError, TeacherOutputError

#: The static rules: the same teacher weights on every row (see :func:`combine_ensemble`).
ENSEMBLE_RULES = ("mean_probs", "mean_logprobs")


_NEG_INF = float("-inf")


def _check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not t > 0 or t != t or t == float("inf"):
        raise ConfigError(f"temperature must be a finite number > 0, got {temperature!r}")
    return t


def scale_logits(logits_BV: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide raw teacher logits by the temperature, in float32.

    Args:
        logits_BV: Raw logits, shape [B, V] (or any [..., V]), any float dtype.
        temperature: Softmax temperature tau > 0, dimensionless.

    Returns:
        float32 tensor of the same shape: ``logits / tau``.

    Raises:
        ConfigError: temperature is not a finite number > 0.
        TeacherOutputError: any logit is NaN or infinite (see :func:`check_finite`).

    Source: Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", 2015, sec. 2.
    """
    t = _check_temperature(temperature)
    check_finite(logits_BV)
    return logits_BV.float() / t


def check_finite(
    values_BV: torch.Tensor,
    *,
    teacher: str = "teacher",
    sample_ids_B: torch.Tensor | Sequence[int] | None = None,
) -> None:
    """Raise if any value is NaN or +-inf, naming the teacher and the first bad sample.

    Args:
        values_BV: Tensor of shape [B, ...], any float dtype.
        teacher: Teacher name for the message.
        sample_ids_B: Optional ``sample_id`` per row, shape [B], to name the sample.

    Raises:
        TeacherOutputError: a non-finite value was found.
    """
    finite = torch.isfinite(values_BV)
    if bool(finite.all()):
        return
    rows = (~finite).reshape(values_BV.shape[0], -1).any(dim=1).nonzero().flatten()
    row = int(rows[0])
    where = f"row {row}"
    if sample_ids_B is not None:
        where = f"sample_id {int(sample_ids_B[row])}"
    raise TeacherOutputError(
        f"teacher {teacher!r} produced a non-finite output (NaN or inf) for {where} "
        f"({len(rows)} bad row(s) in this batch); fix the teacher or its input, nothing "
        "was written for this shard"
    )


def retemper(
    scaled_logits_BV: torch.Tensor, from_temperature: float, to_temperature: float
) -> torch.Tensor:
    """Re-temper stored dense scaled logits exactly: ``(z / tau) * tau / tau'``.

    Args:
        scaled_logits_BV: Stored values ``z / from_temperature``, shape [..., V].
        from_temperature: tau the values were stored at (> 0).
        to_temperature: tau' wanted (> 0).

    Returns:
        float32 tensor ``z / to_temperature`` of the same shape.

    Raises:
        ConfigError: a temperature is not a finite number > 0.
    """
    f = _check_temperature(from_temperature)
    t = _check_temperature(to_temperature)
    return scaled_logits_BV.float() * (f / t)


def log_probs(scaled_logits_BV: torch.Tensor) -> torch.Tensor:
    """Log soft targets ``log_softmax(z / tau)`` over the last dim, float32, shape kept."""
    return torch.log_softmax(scaled_logits_BV.float(), dim=-1)


def _weights(num_teachers: int, weights: Sequence[float] | None) -> torch.Tensor:
    if weights is None:
        return torch.full((num_teachers,), 1.0 / num_teachers)
    if len(weights) != num_teachers:
        raise ConfigError(f"got {len(weights)} ensemble weights for {num_teachers} teachers")
    w = torch.tensor([float(x) for x in weights], dtype=torch.float32)
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ConfigError(f"ensemble weights must be finite, >= 0 and not all 0, got {weights}")
    return w / w.sum()


# --------------------------------------------------------------------------------------
# Ensemble rules
# --------------------------------------------------------------------------------------

#: Per-sample (or per-token) rules: each row gets its own teacher weights at read time.
PER_SAMPLE_RULES = ("confidence_max", "confidence_entropy", "best_on_label", "route")

#: Every rule :func:`combine_ensemble` and :func:`combine_sparse_ensemble` know.
ALL_ENSEMBLE_RULES = ENSEMBLE_RULES + PER_SAMPLE_RULES

#: What ``best_on_label`` does for a row without a label: combine it by ``mean_probs`` or
#: ``mean_logprobs`` (with the static weights), or refuse the batch (``"error"``).
LABEL_FALLBACKS = ("mean_probs", "mean_logprobs", "error")

RouteKey = int | str
RouteTarget = int | tuple[float, ...]


def _route_key(value: object) -> RouteKey:
    """A route key as a plain int or str (numpy / torch scalars unwrapped)."""
    item = getattr(value, "item", None)
    if callable(item) and not isinstance(value, str):
        value = item()
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ConfigError(
            f"route keys must be ints (a class) or strings (a domain), got {value!r} "
            f"({type(value).__name__})"
        )
    return value


def _route_target(value: object) -> RouteTarget:
    if isinstance(value, bool):
        raise ConfigError(f"a route goes to a teacher index or K weights, got {value!r}")
    if isinstance(value, int):
        return int(value)
    if isinstance(value, Sequence) and not isinstance(value, str):
        return tuple(float(x) for x in value)
    raise ConfigError(f"a route goes to a teacher index or K weights, got {value!r}")


@dataclass(frozen=True)
class EnsembleRule:
    """How K teachers' targets combine at read time: the rule and its parameters.

    A view (:class:`kdcache.stores.view.EnsembleView`) and a reader carry one; its JSON
    (:meth:`to_json`) is part of the view's key, never of an entry's key, so changing the
    rule makes a new view over the same entries and recomputes no teacher. See
    ``docs/losses.md``, section "Ensembles", for each rule's formula and source.

    Attributes:
        rule: One of :data:`ALL_ENSEMBLE_RULES`.
        weights: K non-negative static weights (normalised to sum 1), or None (uniform).
            For the confidence rules they multiply the per-row weights (a prior); for
            ``best_on_label`` they weigh the fallback and a teacher of weight 0 is never
            picked. Refused with ``route`` (a route carries its own weights).
        routes: ``route`` only: key value -> teacher index, or -> K weights (a mixture for
            that key). Keys are all ints (classes) or all strings (domains). Stored sorted
            by key as a tuple of ``(key, target)`` pairs.
        route_column: ``route`` only: the input column holding each sample's key (e.g.
            ``"domain"``, or ``"labels"`` to route by class); what a reader passes as
            ``route_keys_B``. Optional for the pure functions; a view requires it.
        fallback: ``best_on_label`` only: one of :data:`LABEL_FALLBACKS` for rows without
            a label; None means ``"mean_probs"``.
        entropy_temperature: ``confidence_entropy`` only: t > 0 in nats in
            ``w_k ~ exp(-H_k / t)``; None means 1.0.

    Raises:
        ConfigError: unknown rule, a parameter given to a rule that does not use it, a
            ``route`` without routes, bad weights, keys or targets.

    Example:
        >>> EnsembleRule("route", routes={"news": 0, "code": 1}).to_json()["routes"]
        [['code', 1], ['news', 0]]
    """

    rule: str = "mean_probs"
    weights: tuple[float, ...] | None = None
    routes: tuple[tuple[RouteKey, RouteTarget], ...] | None = None
    route_column: str | None = None
    fallback: str | None = None
    entropy_temperature: float | None = None

    def __post_init__(self) -> None:
        rule = self.rule
        if rule not in ALL_ENSEMBLE_RULES:
            raise ConfigError(
                f"unknown ensemble rule {rule!r}; expected one of {ALL_ENSEMBLE_RULES}"
            )
        if self.weights is not None:
            w = tuple(float(x) for x in self.weights)
            if not w or any(not math.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
                raise ConfigError(
                    f"ensemble weights must be finite, >= 0 and not all 0, got {list(w)}"
                )
            object.__setattr__(self, "weights", w)
        if rule == "route":
            if self.weights is not None:
                raise ConfigError(
                    "rule 'route' takes no static weights (each route names its teacher or "
                    "its own K weights); pass weights=None"
                )
            if not self.routes:
                raise ConfigError(
                    "rule 'route' needs routes: a mapping from key value (a domain or a "
                    "class) to a teacher index or to K weights"
                )
            pairs = self.routes.items() if isinstance(self.routes, Mapping) else self.routes
            norm = {}
            for key, target in pairs:
                k = _route_key(key)
                if k in norm:
                    raise ConfigError(f"route key {k!r} is given twice")
                norm[k] = _route_target(target)
            if len({type(k) for k in norm}) > 1:
                raise ConfigError(
                    f"route keys must be all ints or all strings, got {sorted(map(repr, norm))}"
                )
            object.__setattr__(self, "routes", tuple(sorted(norm.items())))
            if self.route_column is not None and not str(self.route_column):
                raise ConfigError("route_column must name an input column")
        else:
            for name in ("routes", "route_column"):
                if getattr(self, name) is not None:
                    raise ConfigError(f"{name} is only for rule 'route', got rule {rule!r}")
        if self.fallback is not None:
            if rule != "best_on_label":
                raise ConfigError(f"fallback is only for rule 'best_on_label', got {rule!r}")
            if self.fallback not in LABEL_FALLBACKS:
                raise ConfigError(
                    f"fallback must be one of {LABEL_FALLBACKS}, got {self.fallback!r}"
                )
        elif rule == "best_on_label":
            object.__setattr__(self, "fallback", "mean_probs")
        if self.entropy_temperature is not None:
            if rule != "confidence_entropy":
                raise ConfigError(
                    f"entropy_temperature is only for rule 'confidence_entropy', got {rule!r}"
                )
            object.__setattr__(
                self, "entropy_temperature", _check_temperature(self.entropy_temperature)
            )
        elif rule == "confidence_entropy":
            object.__setattr__(self, "entropy_temperature", 1.0)

    @property
    def needs_labels(self) -> bool:
        """True for ``best_on_label``: the reader must pass ``labels_B``."""
        return self.rule == "best_on_label"

    @property
    def needs_route_keys(self) -> bool:
        """True for ``route``: the reader must pass ``route_keys_B`` (from ``route_column``)."""
        return self.rule == "route"

    def check_readable(self) -> None:
        """Refuse a rule that a reader cannot apply from a dataset's columns: ``route``
        without ``route_column`` (the pure functions take the keys as an argument; a
        view, an ensemble and a config need the column's name).

        Raises:
            ConfigError: names what to set.
        """
        if self.rule == "route" and self.route_column is None:
            raise ConfigError(
                "rule 'route' needs route_column, the input column holding each sample's "
                "key (e.g. 'domain', or 'labels' to route by class)"
            )

    def check_num_teachers(self, num_teachers: int) -> None:
        """Refuse weights or routes that do not fit K teachers.

        Raises:
            ConfigError: K weights expected and another number given, or a route to a
                teacher index outside ``[0, K)`` or to a weight list of another length.
        """
        if self.weights is not None and len(self.weights) != num_teachers:
            raise ConfigError(
                f"got {len(self.weights)} ensemble weights for {num_teachers} teachers"
            )
        for key, target in self.routes or ():
            if isinstance(target, int):
                if not 0 <= target < num_teachers:
                    raise ConfigError(
                        f"route {key!r} goes to teacher {target}, but there are "
                        f"{num_teachers} teachers (indices 0..{num_teachers - 1})"
                    )
            elif len(target) != num_teachers:
                raise ConfigError(
                    f"route {key!r} has {len(target)} weights for {num_teachers} teachers"
                )
            else:
                _weights(num_teachers, target)

    def to_json(self) -> dict[str, Any]:
        """The canonical JSON form: ``rule`` and ``weights`` always, each other field only
        for the rule that uses it (so the two static rules keep their historical form)."""
        out: dict[str, Any] = {
            "rule": self.rule,
            "weights": None if self.weights is None else list(self.weights),
        }
        if self.rule == "route":
            out["routes"] = [
                [k, t if isinstance(t, int) else list(t)] for k, t in self.routes or ()
            ]
            out["route_column"] = self.route_column
        if self.rule == "best_on_label":
            out["fallback"] = self.fallback
        if self.rule == "confidence_entropy":
            out["entropy_temperature"] = self.entropy_temperature
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EnsembleRule:
        """The rule of :meth:`to_json` (or of a view's JSON: other view keys are ignored
        by :meth:`kdcache.stores.view.EnsembleView.from_json`, not here).

        Raises:
            ConfigError: an unknown field, or a field :class:`EnsembleRule` refuses.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown ensemble rule field(s) {unknown}; expected {sorted(known)}")
        kw = dict(data)
        if kw.get("routes") is not None:
            kw["routes"] = tuple((k, _route_target(t)) for k, t in kw["routes"])
        if kw.get("weights") is not None:
            kw["weights"] = tuple(kw["weights"])
        return cls(**kw)


def as_ensemble_rule(
    rule: str | EnsembleRule,
    *,
    weights: Sequence[float] | None = None,
    routes: Mapping[Any, Any] | None = None,
    fallback: str | None = None,
    entropy_temperature: float | None = None,
) -> EnsembleRule:
    """``rule`` as an :class:`EnsembleRule` (a name plus its keyword parameters).

    Raises:
        ConfigError: an :class:`EnsembleRule` and keyword parameters both given (the rule
            already holds them), or what :class:`EnsembleRule` refuses.
    """
    if isinstance(rule, EnsembleRule):
        given = {
            "weights": weights,
            "routes": routes,
            "fallback": fallback,
            "entropy_temperature": entropy_temperature,
        }
        extra = sorted(k for k, v in given.items() if v is not None)
        if extra and not (extra == ["weights"] and _same_weights(weights, rule.weights)):
            raise ConfigError(f"got an EnsembleRule and also {extra}; put them in the EnsembleRule")
        return rule
    return EnsembleRule(
        rule,
        weights=None if weights is None else tuple(weights),
        routes=routes,  # type: ignore[arg-type]  # normalised by __post_init__
        fallback=fallback,
        entropy_temperature=entropy_temperature,
    )


def _same_weights(a: Sequence[float] | None, b: Sequence[float] | None) -> bool:
    return a is None or (b is not None and [float(x) for x in a] == list(b))


def _route_weights(
    spec: EnsembleRule, num_teachers: int, keys: Any, rows: tuple[int, ...]
) -> torch.Tensor:
    """float32 [K, *rows] one-hot (or per-route) weights from each row's route key."""
    if keys is None:
        raise ConfigError(
            "rule 'route' needs route_keys_B, each row's key (the view's route_column); "
            "the reader passes it from the input column"
        )
    arr = keys.detach().cpu().numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    if arr.shape != rows and arr.shape != rows[:1]:
        raise ConfigError(
            f"route_keys_B has shape {arr.shape}, expected {rows} (or [{rows[0]}] per sample)"
        )
    table_keys = {k: i for i, (k, _) in enumerate(spec.routes or ())}
    table = torch.zeros((len(table_keys), num_teachers))
    for i, (_, target) in enumerate(spec.routes or ()):
        if isinstance(target, int):
            table[i, target] = 1.0
        else:
            table[i] = _weights(num_teachers, target)
    try:
        uniq, inverse = np.unique(arr.reshape(-1), return_inverse=True)
    except TypeError:
        raise ConfigError(
            "route_keys_B mixes types (e.g. ints and strings); give one key type per column"
        ) from None
    slots = []
    for value in uniq.tolist():
        key = _route_key(value)
        if key not in table_keys:
            raise ConfigError(
                f"no teacher is routed for key {key!r} (rows with it: "
                f"{int((arr.reshape(-1) == value).sum())}); routes cover "
                f"{[k for k, _ in spec.routes or ()]}: add a route for it"
            )
        slots.append(table_keys[key])
    idx = torch.as_tensor(np.asarray(slots, dtype=np.int64)[inverse]).reshape(arr.shape)
    w = table[idx]  # [*keys_shape, K]
    w = w.movedim(-1, 0)
    if arr.shape != rows:
        w = w.reshape(w.shape + (1,) * (len(rows) - 1)).expand((num_teachers, *rows))
    return w


def _labels(
    labels: Any, rows: tuple[int, ...], ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels int64 [*rows], has_label bool [*rows]) or a clear refusal."""
    if labels is None:
        raise ConfigError(
            "rule 'best_on_label' needs labels_B (each row's label, ignore_index where "
            "there is none); the reader passes the batch's labels"
        )
    lab = torch.as_tensor(labels).to(torch.int64).cpu()
    if tuple(lab.shape) != rows:
        raise ConfigError(f"labels_B has shape {tuple(lab.shape)}, expected {rows}")
    has = lab != ignore_index
    if bool((lab[has] < 0).any()):
        raise ConfigError(f"labels must be >= 0 or equal ignore_index={ignore_index}")
    return lab, has


def _rule_weights(
    spec: EnsembleRule,
    num_teachers: int,
    rows: tuple[int, ...],
    *,
    max_log_prob_KB: torch.Tensor | None = None,
    entropy_KB: torch.Tensor | None = None,
    label_ce_KB: torch.Tensor | None = None,
    has_label_B: torch.Tensor | None = None,
    route_keys_B: Any = None,
) -> torch.Tensor:
    """float32 [K, *rows] per-row teacher weights of a per-sample rule, each row summing
    to 1 (the statistics of each teacher at each row are computed by the caller)."""
    w_K = _weights(num_teachers, spec.weights).reshape((num_teachers,) + (1,) * len(rows))
    if spec.rule == "route":
        return _route_weights(spec, num_teachers, route_keys_B, rows)
    if spec.rule == "confidence_max":
        assert max_log_prob_KB is not None
        raw = w_K * max_log_prob_KB.exp()
    elif spec.rule == "confidence_entropy":
        assert entropy_KB is not None and spec.entropy_temperature is not None
        logit = torch.log(w_K) - entropy_KB / spec.entropy_temperature
        return torch.softmax(logit, dim=0)
    else:
        assert spec.rule == "best_on_label" and label_ce_KB is not None and has_label_B is not None
        allowed = (w_K > 0).expand_as(label_ce_KB)
        ce = torch.where(allowed, label_ce_KB, torch.full_like(label_ce_KB, float("inf")))
        best = ce.min(dim=0, keepdim=True).values
        # first teacher (lowest index) at the minimum among those allowed: ties go low
        pick = ((ce == best) & allowed).to(torch.int8).argmax(dim=0)
        one_hot = torch.nn.functional.one_hot(pick, num_teachers).movedim(-1, 0).float()
        return torch.where(has_label_B, one_hot, w_K.expand_as(one_hot))
    total = raw.sum(dim=0, keepdim=True)
    # a row where every teacher has zero confidence holds no distribution (an empty row):
    # it keeps the static weights
    return torch.where(total > 0, raw / total.clamp(min=1e-38), w_K.expand_as(raw))


def _label_fallback_check(spec: EnsembleRule, has_label: torch.Tensor) -> None:
    if spec.fallback == "error" and not bool(has_label.all()):
        row = int((~has_label).reshape(-1).nonzero()[0])
        raise ConfigError(
            f"rule 'best_on_label' with fallback='error': row {row} has no label "
            f"({int((~has_label).sum())} such rows); pass labels for every row or "
            "fallback='mean_probs'"
        )


def dense_entropy(log_probs_BV: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats of each row, ``-sum_v p log p`` with ``0 log 0 = 0``.

    Args:
        log_probs_BV: Log-probabilities, shape [..., V], float.

    Returns:
        float32 tensor of shape [...], in ``[0, log V]``.
    """
    lp = log_probs_BV.float()
    p = lp.exp()
    return -(p * lp.masked_fill(p == 0, 0.0)).sum(dim=-1)


def ensemble_weights(
    scaled_logits_KBV: torch.Tensor,
    *,
    rule: str | EnsembleRule = "mean_probs",
    weights: Sequence[float] | None = None,
    labels_B: Any = None,
    route_keys_B: Any = None,
    routes: Mapping[Any, Any] | None = None,
    fallback: str | None = None,
    entropy_temperature: float | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Each row's teacher weights under ``rule``, for dense targets (see :func:`combine_ensemble`).

    For the static rules the weights are the same on every row; for ``best_on_label``
    rows with a label are one-hot and rows without it hold the fallback's weights.

    Args:
        scaled_logits_KBV, rule, weights, labels_B, route_keys_B, routes, fallback,
            entropy_temperature, ignore_index: As :func:`combine_ensemble`.

    Returns:
        float32 [K, ...] (the shape of ``scaled_logits_KBV`` without V), summing to 1
        over K on every row.

    Raises:
        ConfigError: as :func:`combine_ensemble`.
    """
    spec = as_ensemble_rule(
        rule,
        weights=weights,
        routes=routes,
        fallback=fallback,
        entropy_temperature=entropy_temperature,
    )
    logp_KBV = _dense_log_probs(scaled_logits_KBV, spec)
    return _dense_rule_weights(spec, logp_KBV, labels_B, route_keys_B, ignore_index)


def _dense_log_probs(scaled_logits_KBV: torch.Tensor, spec: EnsembleRule) -> torch.Tensor:
    if scaled_logits_KBV.dim() < 2:
        raise ConfigError(
            f"expected [K, B, V] scaled logits, got shape {tuple(scaled_logits_KBV.shape)}"
        )
    spec.check_num_teachers(scaled_logits_KBV.shape[0])
    return _log_softmax(scaled_logits_KBV.float())


#: Below this probability a mixture computed in linear space (:func:`_mean_probs`) may
#: have lost digits to float32 underflow (normal floats end at 1.2e-38); rows holding one
#: are recomputed in log space.
_MIX_TINY = 1e-30

#: |s| up to which ``exp(s)`` is a normal float32 (e^-87.3 is the smallest, e^88.7 the
#: largest): inputs within it (less log V at the top, for the sum) need no max shift.
_EXP_SAFE = 80.0

#: Scaled logits beyond this magnitude are shifted by each teacher's row max before the
#: geometric mean mixes them (a float32 sum of values near 1e7 keeps no digit of one
#: near 1).
_MIX_SHIFT_ABOVE = 1e3


def _row_max(x: torch.Tensor) -> torch.Tensor:
    """The max over the last dim, kept as [..., 1]; a row of -inf gives the lowest finite
    float (so that ``x - max`` stays -inf there, not NaN)."""
    return x.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).min)


def _drop_zero_weights(s_KBV: torch.Tensor, w_K: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The teachers of weight > 0 and their weights (0 * -inf never appears)."""
    if not bool((w_K == 0).any()):
        return s_KBV, w_K
    keep = torch.nonzero(w_K).flatten()
    return s_KBV.index_select(0, keep), w_K.index_select(0, keep)


def _cpu_float32(x: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.is_contiguous()
        and not x.requires_grad
    )


def _exp(x: torch.Tensor) -> torch.Tensor:
    """``torch.exp(x)``, through numpy on the CPU for the reason :func:`_exp_` gives."""
    if _cpu_float32(x):
        return torch.from_numpy(np.exp(x.numpy()))
    return torch.exp(x)


def _exp_(x: torch.Tensor) -> torch.Tensor:
    """``x.exp_()``; a contiguous float32 CPU tensor goes through numpy's exp (one thread,
    a few ulp). torch 2.13's CPU ``exp`` hands chunks to MKL's vector math, and with MKL
    threads enabled (the default) it was measured to return one thread's half of a
    30,720-value tensor off by up to 1.5e-4 relative (about 600 ulp), in about 1 run in 4,
    while another Python thread was busy; with ``MKL_NUM_THREADS=1`` never (12 runs).
    The combination is stored (:mod:`kdcache.stores.combined`), so it must not depend on
    such timing."""
    if _cpu_float32(x):
        a = x.numpy()
        np.exp(a, out=a)
        return x
    return x.exp_()


def _log_(x: torch.Tensor) -> torch.Tensor:
    """``x.log_()``, through numpy on the CPU for the reason :func:`_exp_` gives."""
    if _cpu_float32(x):
        a = x.numpy()
        with np.errstate(divide="ignore", invalid="ignore"):  # log 0 = -inf, as torch
            np.log(a, out=a)
        return x
    return x.log_()


def _log_softmax(x: torch.Tensor) -> torch.Tensor:
    """``log_softmax`` over the last dim as max, exp, sum, log: the same values to float32
    rounding, and on narrow rows (a classifier's V = 10) about 5x faster than
    ``torch.log_softmax`` on the CPU (measured with torch 2.13, one thread)."""
    shifted = x - _row_max(x)
    lse = _log_(_exp(shifted).sum(dim=-1, keepdim=True))
    return shifted.sub_(lse)


def _mean_logprobs(s_KBV: torch.Tensor, w_K: torch.Tensor) -> torch.Tensor:
    """``log_softmax(sum_k w_k log_softmax(s_k))`` as ``log_softmax(sum_k w_k s_k)``.

    The two are equal: ``log_softmax(s_k) = s_k - lse_k`` and ``sum_k w_k lse_k`` is one
    constant per row, which the outer ``log_softmax`` removes (w sums to 1). One pass
    instead of K ``log_softmax``; w_K > 0 (zero weights dropped by the caller). Scaled
    logits beyond +-:data:`_MIX_SHIFT_ABOVE` are first shifted by each teacher's row max
    (a per-row constant too), so that one teacher's large offset cannot round another's
    values away in the sum.
    """
    w = w_K.reshape((-1,) + (1,) * (s_KBV.dim() - 1))
    lo, hi = (float(v) for v in torch.aminmax(s_KBV))
    if max(-lo, hi) > _MIX_SHIFT_ABOVE:  # rare: huge logits; shifting is exact
        s_KBV = s_KBV - _row_max(s_KBV)
    return _log_softmax((s_KBV * w).sum(dim=0))


def _mean_probs(s_KBV: torch.Tensor, w_K: torch.Tensor) -> torch.Tensor:
    """``log sum_k w_k softmax(s_k)`` in one pass in linear space, exact where it is safe.

    Each teacher's row is shifted by its max before ``exp`` (so its sum is >= 1 and
    nothing overflows), scaled by ``w_k / sum``, summed over k and logged: one ``exp`` per
    stored value instead of a ``log_softmax`` per teacher and a ``logsumexp`` over K
    (about 5x faster on the CPU, measured with torch 2.13). Where a row of the mixture has
    a probability below :data:`_MIX_TINY` (float32 underflow may have cost it digits:
    a log-probability below about -69 in every teacher), that row is recomputed in log
    space, so every row matches the log-space result to float32 rounding. Inputs within
    ``[-_EXP_SAFE, _EXP_SAFE - log V]`` (so that no exp and no sum over V leaves the
    normal float32 range) skip the max shift. Two or three host syncs per call
    (the range and the minimum), per shard, not per training step.
    """
    lo, hi = (float(v) for v in torch.aminmax(s_KBV))
    if -_EXP_SAFE <= lo and hi + math.log(s_KBV.shape[-1]) <= _EXP_SAFE:
        # every exp(s), and every row's sum of V of them, is a normal float32 with full
        # precision: no shift needed (the row max is a slow reduction over a narrow dim)
        e = _exp(s_KBV)
    else:
        e = _exp_(torch.sub(s_KBV, _row_max(s_KBV)))
    w = w_K.reshape((-1,) + (1,) * (s_KBV.dim() - 1))
    e.mul_(w / e.sum(dim=-1, keepdim=True))
    mix = e.sum(dim=0)
    if float(mix.amin()) >= _MIX_TINY:
        return _log_(mix)
    low_R = (mix.amin(dim=-1) < _MIX_TINY).reshape(-1)  # rows, flattened
    out = _log_(mix)
    if bool(low_R.any()):
        width = s_KBV.shape[-1]
        flat_out = out.view(-1, width)  # [R_all, V], a view: writes land in out
        s_low = s_KBV.reshape(s_KBV.shape[0], -1, width)[:, low_R]  # [K, R, V]
        flat_out[low_R] = torch.logsumexp(
            torch.log_softmax(s_low, dim=-1) + torch.log(w.reshape(-1, 1, 1)), dim=0
        )
    return out


def _dense_rule_weights(
    spec: EnsembleRule,
    logp_KBV: torch.Tensor,
    labels_B: Any,
    route_keys_B: Any,
    ignore_index: int,
) -> torch.Tensor:
    num_teachers = logp_KBV.shape[0]
    rows = tuple(logp_KBV.shape[1:-1])
    if spec.rule in ENSEMBLE_RULES:
        w_K = _weights(num_teachers, spec.weights)
        return w_K.reshape((num_teachers,) + (1,) * len(rows)).expand((num_teachers, *rows))
    stats: dict[str, Any] = {}
    if spec.rule == "confidence_max":
        stats["max_log_prob_KB"] = logp_KBV.max(dim=-1).values
    elif spec.rule == "confidence_entropy":
        stats["entropy_KB"] = dense_entropy(logp_KBV)
    elif spec.rule == "best_on_label":
        lab, has = _labels(labels_B, rows, ignore_index)
        vocab = logp_KBV.shape[-1]
        if bool((lab[has] >= vocab).any()):
            raise ConfigError(
                f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}"
            )
        _label_fallback_check(spec, has)
        safe = lab.clamp(0, vocab - 1).to(logp_KBV.device)
        idx = safe.unsqueeze(0).unsqueeze(-1).expand((num_teachers, *rows, 1))
        stats["label_ce_KB"] = -logp_KBV.gather(-1, idx).squeeze(-1)
        stats["has_label_B"] = has.to(logp_KBV.device)
    else:
        stats["route_keys_B"] = route_keys_B
    return _rule_weights(spec, num_teachers, rows, **stats).to(logp_KBV.device)


def combine_ensemble(
    scaled_logits_KBV: torch.Tensor,
    *,
    rule: str | EnsembleRule = "mean_probs",
    weights: Sequence[float] | None = None,
    labels_B: Any = None,
    route_keys_B: Any = None,
    routes: Mapping[Any, Any] | None = None,
    fallback: str | None = None,
    entropy_temperature: float | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Combine K teachers' dense soft targets (all at the same temperature) into one.

    Static rules (the same weights on every row):
        * ``"mean_probs"``: ``p = sum_k w_k softmax(s_k)``, the arithmetic mean of the
          teachers' distributions (Hinton et al. 2015, sec. 1: ensembles of soft targets).
        * ``"mean_logprobs"``: ``p ~ exp(sum_k w_k log_softmax(s_k))``, a weighted geometric
          mean (product of experts, Hinton 2002), renormalised over V.

    Per-sample rules (each row b, a sample or a token, gets weights ``w_k(b)``, then
    ``p(b) = sum_k w_k(b) p_k(b)``, a mean of probabilities; ``weights`` act as a prior
    ``pi_k`` where said):
        * ``"confidence_max"``: ``w_k(b) ~ pi_k max_v p_k(b, v)`` (confidence as the max
          probability, Hendrycks & Gimpel, ICLR 2017; confidence-weighted teachers as in
          Zhang et al., "Confidence-Aware Multi-Teacher KD", ICASSP 2022).
        * ``"confidence_entropy"``: ``w_k(b) = softmax_k(log pi_k - H_k(b) / t)`` with
          ``H_k(b) = -sum_v p_k log p_k`` in nats and ``t = entropy_temperature``
          (entropy-weighted teachers: Kwon et al., "Adaptive KD based on entropy",
          ICASSP 2020).
        * ``"best_on_label"``: on a row with a label y, the one teacher with the lowest
          cross-entropy ``-log p_k(y)`` (ties: the lowest index; teachers with prior 0
          are never picked); rows without a label (``ignore_index``) are combined by
          ``fallback``: ``"mean_probs"`` (the default), ``"mean_logprobs"`` (both with
          the static weights) or ``"error"`` (refuse). Label-guided teacher selection as
          in Yuan et al., "Reinforced Multi-Teacher Selection", AAAI 2021 (here by the
          label's cross-entropy, not a learned policy).
        * ``"route"``: per row the teacher (or the K weights) that ``routes`` maps its key
          to: ``route_keys_B`` is a domain column or the class (a mixture of experts
          routed by a known key, Jacobs et al. 1991, with a fixed gate).

    Log-probabilities are valid input too (``log_softmax`` of log-probabilities is the
    identity). For sparse teachers see :func:`combine_sparse_ensemble`; to keep teachers
    apart and combine *losses* instead, see :func:`kdcache.losses.multi_teacher_loss`.

    Args:
        scaled_logits_KBV: Stored scaled logits ``z_k / tau``, shape [K, B, V] (or
            [K, B, T, V], any [K, ..., V]), any float dtype.
        rule: A name in :data:`ALL_ENSEMBLE_RULES` or an :class:`EnsembleRule` (which then
            holds weights, routes, fallback and entropy temperature).
        weights: K non-negative weights (normalised to sum 1); uniform when None.
        labels_B: ``best_on_label`` only: int labels shaped like the rows ([B], or
            [B, T]), ``ignore_index`` where a row has none.
        route_keys_B: ``route`` only: each row's key, ints or strings, shaped like the
            rows or [B] (one key per sample, broadcast over its tokens); a tensor, a
            numpy array or a list.
        routes: ``route`` only: key -> teacher index or -> K weights.
        fallback: ``best_on_label`` only: one of :data:`LABEL_FALLBACKS`.
        entropy_temperature: ``confidence_entropy`` only: t > 0 in nats (default 1).
        ignore_index: The label value meaning "no label".

    Returns:
        float32 log-probabilities of the combined target, shape [B, V] (the input's shape
        without K); each row's ``exp`` sums to 1.

    Raises:
        ConfigError: unknown rule; weights of the wrong length or sign; a parameter given
            to a rule that does not use it; labels or route keys missing, misshapen or out
            of range; a key with no route (the message names it); a row without a label
            under ``fallback="error"``.

    Example:
        >>> import math
        >>> s = torch.tensor([[[0.0, 0.0]], [[0.0, math.log(3.0)]]])
        >>> combine_ensemble(s).exp()
        tensor([[0.3750, 0.6250]])
        >>> combine_ensemble(s, rule="best_on_label", labels_B=torch.tensor([1])).exp()
        tensor([[0.2500, 0.7500]])
    """
    spec = as_ensemble_rule(
        rule,
        weights=weights,
        routes=routes,
        fallback=fallback,
        entropy_temperature=entropy_temperature,
    )
    if spec.rule in ENSEMBLE_RULES:  # static weights: one fused pass, see below
        if scaled_logits_KBV.dim() < 2:
            raise ConfigError(
                f"expected [K, B, V] scaled logits, got shape {tuple(scaled_logits_KBV.shape)}"
            )
        spec.check_num_teachers(scaled_logits_KBV.shape[0])
        s_KBV = scaled_logits_KBV.float()
        w_K = _weights(s_KBV.shape[0], spec.weights).to(s_KBV.device)
        s_KBV, w_K = _drop_zero_weights(s_KBV, w_K)
        if s_KBV.shape[0] == 1:  # one teacher: its own log-probabilities
            return _log_softmax(s_KBV[0])
        if spec.rule == "mean_logprobs":
            return _mean_logprobs(s_KBV, w_K)
        return _mean_probs(s_KBV, w_K)
    logp_KBV = _dense_log_probs(scaled_logits_KBV, spec)
    num_teachers = logp_KBV.shape[0]
    w_KB = _dense_rule_weights(spec, logp_KBV, labels_B, route_keys_B, ignore_index)
    combined = torch.logsumexp(logp_KBV + torch.log(w_KB).unsqueeze(-1), dim=0)
    if spec.rule == "best_on_label" and spec.fallback == "mean_logprobs":
        _, has = _labels(labels_B, tuple(logp_KBV.shape[1:-1]), ignore_index)
        w_K = _weights(num_teachers, spec.weights).to(logp_KBV.device)
        geo = _mean_logprobs(*_drop_zero_weights(logp_KBV, w_K))
        combined = torch.where(has.to(logp_KBV.device).unsqueeze(-1), combined, geo)
    return combined


# --------------------------------------------------------------------------------------
# Vocabularies
# --------------------------------------------------------------------------------------


def trim_vocab(logits_BV: torch.Tensor, vocab_size: int, *, name: str = "teacher") -> torch.Tensor:
    """Drop logit columns beyond the tokenizer's real vocabulary (padding for alignment).

    Many language models pad their output layer (e.g. to a multiple of 64); those columns
    are not tokens and must not take probability mass.

    Args:
        logits_BV: Logits, shape [..., V_padded] with V_padded >= vocab_size.
        vocab_size: Real vocabulary size (the tokenizer's), >= 1.
        name: Model name for the error message.

    Returns:
        A view ``logits[..., :vocab_size]`` (no copy, dtype kept).

    Raises:
        ConfigError: vocab_size < 1, or the logits have fewer columns than vocab_size.
    """
    if int(vocab_size) < 1:
        raise ConfigError(f"vocab_size must be >= 1, got {vocab_size}")
    width = logits_BV.shape[-1]
    if width < vocab_size:
        raise ConfigError(
            f"{name} produces {width} logits per position but its vocabulary has "
            f"{vocab_size} tokens; the model and tokenizer do not match"
        )
    return logits_BV[..., : int(vocab_size)]


def check_vocabularies(
    vocab_sizes: Mapping[str, int], *, fingerprints: Mapping[str, str] | None = None
) -> int:
    """Refuse models whose vocabularies differ; return the common vocabulary size.

    Distillation compares distributions id by id, so teachers (and the student) must share
    one vocabulary: the same size and, when fingerprints are given (a hash of the
    tokenizer's id-to-token table), the same tokens. Pass *real* sizes (after
    :func:`trim_vocab`), not padded logit widths.

    Args:
        vocab_sizes: Model name -> real vocabulary size.
        fingerprints: Optional model name -> tokenizer fingerprint.

    Returns:
        The shared vocabulary size.

    Raises:
        ConfigError: no models, sizes differ, or fingerprints differ.
    """
    if not vocab_sizes:
        raise ConfigError("check_vocabularies needs at least one model")
    sizes = {name: int(v) for name, v in vocab_sizes.items()}
    if len(set(sizes.values())) > 1:
        listing = ", ".join(f"{n}={v}" for n, v in sizes.items())
        raise ConfigError(
            f"vocabularies differ ({listing}); distillation needs one shared vocabulary. "
            "Trim padded logits with trim_vocab, or pick models with the same tokenizer"
        )
    if fingerprints:
        prints = dict(fingerprints)
        if len(set(prints.values())) > 1:
            listing = ", ".join(f"{n}={v}" for n, v in prints.items())
            raise ConfigError(
                f"vocabularies have the same size but different tokens ({listing}); "
                "ids would not mean the same token"
            )
    return next(iter(sizes.values()))
