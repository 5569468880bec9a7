"""Ensemble views: K committed entries over one dataset, combined at read time by a rule,
and the checks that a reader's expectations match what the cache holds."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from kdcache import schema
from kdcache.errors import (
    ConfigError,
    SampleIdMismatchError,
    SpecMismatchError,
)
from kdcache.stores.entry import CacheEntry, _dumps
from kdcache.stores.fs import Location
from kdcache.targets.dense import EnsembleRule, as_ensemble_rule

#: The fields of a view's JSON that are not the rule's.
_VIEW_FIELDS = ("format_version", "kind", "entries")


def view_json(
    entry_keys: list[str],
    rule: str | EnsembleRule,
    weights: Sequence[float] | None = None,
) -> dict[str, Any]:
    """The JSON of an ensemble view over ``entry_keys``; its content key is the view's key
    (so the key of a build is known before anything is built).

    The rule is part of the view's JSON (:meth:`kdcache.targets.EnsembleRule.to_json`):
    another rule over the same entries is another view, never another entry. The two
    static rules keep the historical form ``{format_version, kind, entries, rule,
    weights}``, so their view keys do not change; the other rules add only their own
    parameters (``routes`` and ``route_column``, ``fallback``, ``entropy_temperature``).

    Args:
        entry_keys: The member entries' keys, in teacher order.
        rule: A rule name or an :class:`kdcache.targets.EnsembleRule`.
        weights: With a rule name, its K static weights (None: uniform).

    Raises:
        ConfigError: what :class:`kdcache.targets.EnsembleRule` refuses, or weights or
            routes that do not fit the number of entries.
    """
    spec = as_ensemble_rule(rule, weights=weights)
    spec.check_num_teachers(len(entry_keys))
    return {
        "format_version": schema.VIEW_FORMAT_VERSION,
        "kind": "ensemble",
        "entries": list(entry_keys),
        **spec.to_json(),
    }


class EnsembleView:
    """A read-time view over K entries that share a dataset and a temperature.

    The combination rule is applied by the reader (:class:`kdcache.SoftTargetDataset`) via
    :func:`kdcache.targets.combine_ensemble` (dense) or
    :func:`kdcache.targets.combine_sparse_ensemble` (sparse). :meth:`materialize` stores
    a dense view's combination once, as one entry that readers then use in its place.
    Per-sample rules need the batch's labels (``best_on_label``) or the input column
    ``route_column`` (``route``); :attr:`ensemble_rule` says which.

    Args:
        entries: The member entries (complete), in teacher order.
        rule: A name in :data:`kdcache.targets.ALL_ENSEMBLE_RULES` or an
            :class:`kdcache.targets.EnsembleRule` (which then holds the weights).
        weights: K non-negative weights, or None for uniform (with a rule name only).

    Raises:
        ConfigError: an unknown rule or a bad parameter, weights or routes that do not fit
            K entries, or a ``route`` rule without ``route_column`` (the reader needs it).
        SpecMismatchError: members disagree on dataset, temperature or vocabulary.
    """

    def __init__(
        self,
        entries: Sequence[CacheEntry],
        rule: str | EnsembleRule = "mean_probs",
        weights: Sequence[float] | None = None,
    ) -> None:
        if not entries:
            raise ConfigError("an ensemble view needs at least one entry")
        if weights is not None and len(weights) != len(entries):
            raise ConfigError(f"{len(weights)} weights for {len(entries)} entries")
        spec = as_ensemble_rule(rule, weights=weights)
        spec.check_num_teachers(len(entries))
        spec.check_readable()
        self.entries = list(entries)
        self.ensemble_rule = spec
        first = self.entries[0]
        for e in self.entries[1:]:
            if e.dataset_fingerprint != first.dataset_fingerprint:
                raise SpecMismatchError(
                    f"{e.key} and {first.key} were built over different datasets"
                )
            if e.temperature != first.temperature:
                raise SpecMismatchError(
                    f"{e.key} is at temperature {e.temperature}, {first.key} at {first.temperature}"
                )
            if e.vocab_size != first.vocab_size:
                raise SpecMismatchError(
                    f"{e.key} has V={e.vocab_size}, {first.key} V={first.vocab_size}"
                )
            if e.is_sparse != first.is_sparse:
                raise SpecMismatchError(
                    f"{e.key} holds {e.target_spec.kind!r} targets, {first.key} "
                    f"{first.target_spec.kind!r}; an ensemble view is all dense or all sparse"
                )

    @classmethod
    def from_json(cls, entries: Sequence[CacheEntry], data: dict[str, Any]) -> EnsembleView:
        """The view that :func:`view_json` wrote, over its (opened) ``entries``.

        Args:
            entries: The entries ``data["entries"]`` names, in that order.
            data: A view's JSON.

        Raises:
            ConfigError: an unknown field in the rule, or what the constructor refuses.
        """
        rule = {k: v for k, v in data.items() if k not in _VIEW_FIELDS}
        rule.setdefault("rule", "mean_probs")
        return cls(entries, EnsembleRule.from_json(rule))

    def with_rule(
        self, rule: str | EnsembleRule, weights: Sequence[float] | None = None
    ) -> EnsembleView:
        """The same entries combined by another rule: nothing is recomputed (call
        :meth:`save` to keep the new view under its own key).

        The new rule comes with its own parameters: static weights are those of ``rule``
        (an :class:`kdcache.targets.EnsembleRule`) or ``weights``, never this view's
        (``view.with_rule(EnsembleRule("confidence_max", weights=view.weights))`` keeps
        them as the rule's prior).

        Raises:
            ConfigError: as the constructor.
        """
        return EnsembleView(self.entries, rule, weights)

    @property
    def rule(self) -> str:
        """The rule's name (see :attr:`ensemble_rule` for its parameters)."""
        return self.ensemble_rule.rule

    @property
    def weights(self) -> list[float] | None:
        """The K static weights, or None (uniform)."""
        w = self.ensemble_rule.weights
        return None if w is None else list(w)

    @property
    def key(self) -> str:
        return schema.content_key(self.view_json())

    def view_json(self) -> dict[str, Any]:
        return view_json([e.key for e in self.entries], self.ensemble_rule)

    @property
    def root(self) -> Location:
        return self.entries[0].root

    @property
    def temperature(self) -> float:
        return self.entries[0].temperature

    @property
    def num_shards(self) -> int:
        return self.entries[0].num_shards

    @property
    def vocab_size(self) -> int:
        return self.entries[0].vocab_size

    @property
    def is_sparse(self) -> bool:
        return self.entries[0].is_sparse

    @property
    def num_bytes(self) -> int:
        return sum(e.num_bytes for e in self.entries)

    @property
    def is_combined(self) -> bool:
        """Whether this is one combined entry (:meth:`materialize`), whose stored values
        are the final log-probabilities: a reader neither combines nor re-tempers them."""
        return len(self.entries) == 1 and self.entries[0].is_combined

    def combined_entry(self, temperature: float | None = None) -> CacheEntry:
        """The entry that holds (or would hold) this view combined at ``temperature``
        (None: the view's); nothing is read or written (see
        :func:`kdcache.stores.combined.combined_entry`)."""
        from kdcache.stores.combined import combined_entry

        return combined_entry(self, temperature)

    def materialize(self, temperature: float | None = None, **kwargs: Any) -> CacheEntry:
        """Combine this view once into one dense entry at ``temperature`` (None: the
        view's), which the student stream then reads instead of the K members; a hit when
        it exists. See :func:`kdcache.stores.combined.materialize` (its keywords, errors
        and the stored format)."""
        from kdcache.stores.combined import materialize

        return materialize(self, temperature, **kwargs)

    def save(self) -> str:
        """Write ``<root>/ensembles/<key>.json``, unless it already holds these bytes (so
        that a cache hit writes nothing: it works on a read-only root); returns its URI."""
        loc = self.root.child(schema.ENSEMBLES_DIR)
        name = f"{self.key}.json"
        data = _dumps(self.view_json())
        try:
            same = loc.read_bytes(name) == data
        except FileNotFoundError:
            same = False
        if not same:
            loc.write_atomic(name, data)
        return loc.display(name)

    def read_shard(self, index: int, *, verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Read shard ``index`` of every member.

        Returns:
            ``(sample_ids [N] int64, scaled_logits [K, N, V] float32)``.

        Raises:
            SampleIdMismatchError: members disagree on the ids of this shard.
        """
        ids0, vals0 = self.entries[0].read_shard(index, verify=verify)
        out = np.empty((len(self.entries), *vals0.shape), dtype=np.float32)
        out[0] = vals0
        for k, e in enumerate(self.entries[1:], start=1):
            ids, vals = e.read_shard(index, verify=verify)
            if not np.array_equal(ids, ids0):
                raise SampleIdMismatchError(
                    f"shard {index}: entries {self.entries[0].key} and {e.key} hold different "
                    "sample_id sequences"
                )
            out[k] = vals
        return ids0, out

    def read_sparse_shard(self, index: int, *, verify: bool = True) -> tuple[np.ndarray, list[Any]]:
        """Read shard ``index`` of every sparse member.

        Returns:
            ``(sample_ids [N] int64, [SparseTargets per teacher])``; combine them with
            :func:`kdcache.targets.combine_sparse_ensemble` or keep them apart for
            :func:`kdcache.losses.multi_teacher_loss`.

        Raises:
            ConfigError: the members are dense.
            SampleIdMismatchError: members disagree on the ids of this shard.
        """
        ids0, first = self.entries[0].read_sparse_shard(index, verify=verify)
        out = [first]
        for e in self.entries[1:]:
            ids, t = e.read_sparse_shard(index, verify=verify)
            if not np.array_equal(ids, ids0):
                raise SampleIdMismatchError(
                    f"shard {index}: entries {self.entries[0].key} and {e.key} hold different "
                    "sample_id sequences"
                )
            out.append(t)
        return ids0, out


def check_reader(
    cache: CacheEntry | EnsembleView,
    *,
    temperature: float | None = None,
    vocab_size: int | None = None,
    teachers: Sequence[str] | None = None,
    retemper: bool = False,
) -> None:
    """Refuse a reader whose expectations disagree with what the cache holds.

    Args:
        cache: An open entry or ensemble view.
        temperature: The tau the reader will use; None accepts the cache's.
        vocab_size: The student's V; None skips the check.
        teachers: The teachers the reader expects, as teacher names or entry keys, in any
            order; None skips the check.
        retemper: Allow another temperature: dense targets re-temper exactly; sparse
            top-k / top-p targets only to a temperature in their log-partition grid;
            sampled and mixture targets, and combined entries, never.

    Raises:
        SpecMismatchError: the temperature differs (without ``retemper``, or beyond what
            the targets can re-temper to), V differs, or the teacher set differs; the
            message says what the cache holds and what to do.
    """
    view = as_view(cache)
    if temperature is not None and float(temperature) != view.temperature:
        for e in view.entries:
            if e.is_combined:
                raise SpecMismatchError(
                    f"entry {e.key} holds an ensemble's combined soft targets at temperature "
                    f"{e.temperature}; a combination cannot be re-tempered to {temperature}. "
                    "Read its view at that temperature, or store that combination "
                    "(EnsembleView.materialize(temperature), kdcache combine)"
                )
        if not retemper:
            raise SpecMismatchError(
                f"cache holds soft targets at temperature {view.temperature}, {temperature} "
                "was asked; pass retemper=True to re-temper, or build at that temperature"
            )
        for e in view.entries:
            spec = e.target_spec
            if not spec.is_sparse:
                continue
            grid = spec.grid_temperatures
            ok = spec.kind in schema.RETEMPER_KINDS and any(
                abs(g - float(temperature)) <= 1e-6 * g for g in grid
            )
            if not ok:
                raise SpecMismatchError(
                    f"entry {e.key} holds {spec.kind!r} targets at temperature "
                    f"{view.temperature} with log-partition grid {list(grid)}; they cannot "
                    f"be re-tempered exactly to {temperature}. Rebuild with "
                    "grid_temperatures including it"
                )
    if vocab_size is not None and int(vocab_size) != view.vocab_size:
        raise SpecMismatchError(
            f"cache holds V={view.vocab_size} classes, the reader expects V={vocab_size}; "
            "student and teachers must share one vocabulary"
        )
    if teachers is not None:
        have = {e.teacher_name for e in view.entries} | {e.key for e in view.entries}
        names = [e.teacher_name for e in view.entries]
        want = set(teachers)
        matched = {e.key for e in view.entries if e.teacher_name in want or e.key in want}
        if not want <= have or len(matched) != len(view.entries):
            raise SpecMismatchError(
                f"cache holds teachers {names}, the reader expects {sorted(want)}; open the "
                "ensemble view of those teachers (kdcache ls ROOT) or build the missing ones"
            )


def as_view(cache: CacheEntry | EnsembleView) -> EnsembleView:
    """Treat a single entry as an ensemble of one."""
    return cache if isinstance(cache, EnsembleView) else EnsembleView([cache])
