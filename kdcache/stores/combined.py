"""Combined entries: an ensemble view's soft targets combined once and stored as one entry.

An :class:`kdcache.stores.view.EnsembleView` over K dense entries is combined by its rule
each time a reader reads it: K files per shard instead of one, and the combination's
arithmetic (an ``exp`` per stored value for ``mean_probs``) on every epoch of every
student. That work is a function of the entries, the rule and the temperature alone, so,
like the teacher stage, it is done once and cached. :func:`materialize` writes the view's
combined log-probabilities at one temperature as a dense entry whose key is derived from
the view's key and that temperature (:func:`combined_entry`); the student stream reads it
in place of the view when it exists (:class:`kdcache.SoftTargetDataset`, ``combined``).

The entry is an ordinary entry (the same files, commit protocol, integrity checks, ``kdcache
verify``, ``kdcache gc``), with:

* ``spec.teacher = {"kind": "ensemble_combination", "combine_version": 1, "view": the
  view's JSON}`` (the entry keys and the rule with its parameters) and ``spec.targets`` a
  dense float32 Arrow target at the combination's temperature;
* values that are the combined log-probabilities (each row's ``logsumexp`` is 0 up to
  float32 rounding), exactly what the stream computes from the view (same function, same
  shard): a student reads the same floats either way;
* every shard's ``input_digest`` carried over from the members, so the reader still
  checks that the inputs it joins are the ones the teachers saw.

A combined entry does not re-temper: a mixture of K softmaxes at tau is not a softmax of
anything at another tau. Materialise the view at each temperature a student uses (the
view itself re-tempers exactly).

Only rules that are a function of the teachers' outputs are combined: ``mean_probs``,
``mean_logprobs``, ``confidence_max``, ``confidence_entropy``. ``best_on_label`` reads the
stream's labels and ``route`` an input column, so they stay combined at read time.
"""

from __future__ import annotations

import logging
import platform
import time
from typing import Any

import torch

from kdcache import schema
from kdcache._version import __version__
from kdcache.errors import CacheCorruptError, CacheReadOnlyError, ConfigError
from kdcache.stores.entry import CacheEntry
from kdcache.stores.lease import Lease, _LeaseKeeper
from kdcache.stores.view import EnsembleView, check_reader

log = logging.getLogger(__name__)

#: Bumped when the stored arithmetic changes, so that an older combination is a miss.
COMBINE_VERSION = 1

#: Rules whose combination is a function of the teachers' outputs alone.
COMBINABLE_RULES = ("mean_probs", "mean_logprobs", "confidence_max", "confidence_entropy")


def combinable(view: EnsembleView) -> str | None:
    """Why ``view`` cannot be stored combined, or None when it can.

    A view can be when it has two or more dense members of one sample per row (not
    token-level) and a rule in :data:`COMBINABLE_RULES`. A member may itself be a
    combined entry (a dense entry like any other).
    """
    if len(view.entries) < 2:
        return "it holds one teacher (nothing to combine)"
    if view.is_sparse:
        return "its targets are sparse (combined per batch)"
    if view.entries[0].spec.get("dataset", {}).get("preprocessing", {}).get("token_level"):
        return "it is token-level"
    if view.rule not in COMBINABLE_RULES:
        return (
            f"its rule {view.rule!r} reads the stream's "
            f"{'labels' if view.rule == 'best_on_label' else 'inputs'}; it is combined at "
            "read time"
        )
    return None


def combined_spec(view: EnsembleView, temperature: float | None = None) -> dict[str, Any]:
    """The key material of ``view``'s combination at ``temperature`` (None: the view's).

    Raises:
        ConfigError: the view cannot be combined (:func:`combinable` says why), or a bad
            temperature.
    """
    why = combinable(view)
    if why is not None:
        what = (
            f"entry {view.entries[0].key} is one teacher's targets"
            if len(view.entries) == 1
            else f"ensemble view {view.key}"
        )
        raise ConfigError(f"{what} cannot be stored combined: {why}")
    tau = view.temperature if temperature is None else float(temperature)
    # members re-temper exactly, except a combined member (a mixture), which is refused
    check_reader(view, temperature=tau, retemper=True)
    targets = schema.TargetSpec(temperature=tau, kind="dense", storage_dtype="float32")
    teacher = {
        "kind": schema.COMBINED_TEACHER_KIND,
        "combine_version": COMBINE_VERSION,
        "view": view.view_json(),
    }
    return schema.entry_spec(view.entries[0].dataset_fingerprint, teacher, targets)


def combined_entry(view: EnsembleView, temperature: float | None = None) -> CacheEntry:
    """The entry that holds (or would hold) ``view`` combined at ``temperature`` (None:
    the view's own), under the view's root. Nothing is read or written: check
    ``is_complete``.

    Raises:
        ConfigError: as :func:`combined_spec`.
    """
    return CacheEntry(view.root, schema.content_key(combined_spec(view, temperature)))


def _input_digest(view: EnsembleView, index: int) -> str | None:
    """The members' shared record of input shard ``index``'s digest.

    Raises:
        CacheCorruptError: two members recorded different digests (they did not see the
            same inputs; nothing can be combined from them).
    """
    digests = {d for e in view.entries if (d := e.manifest_record(index).input_digest) is not None}
    if len(digests) > 1:
        raise CacheCorruptError(
            f"shard {index}: the members of view {view.key} recorded different input "
            f"digests {sorted(digests)}; they were built from different inputs. Run "
            "'kdcache verify' on each entry and rebuild the one that differs"
        )
    return digests.pop() if digests else None


def materialize(
    view: EnsembleView,
    temperature: float | None = None,
    *,
    verify: bool = True,
    progress: bool = False,
    lease_ttl_s: float = 600.0,
) -> CacheEntry:
    """Combine ``view`` once, shard by shard, into one dense entry (see the module doc).

    Memory is one shard of the K members at a time. A rerun after an interruption keeps
    the shards already committed (their bytes checked against their records) and
    computes the others; a complete entry is a hit (nothing read; its listed files'
    sizes are checked, and damaged shards recomputed, as for a build). Two jobs on the
    same key take turns through the entry's lease, as builds do.

    Args:
        view: A dense ensemble view of two or more entries, combinable
            (:func:`combinable`).
        temperature: The tau of the stored combination; None: the view's. Another tau
            re-tempers each member exactly before the combination
            (:func:`kdcache.targets.retemper`).
        verify: Check each member shard's size and checksum as it is read.
        progress: Show progress over the shards.
        lease_ttl_s: Seconds before a crashed job's lease can be taken over.

    Returns:
        The complete combined entry: ``read_shard(i)`` gives ``(sample_ids [N] int64,
        log_probs [N, V] float32)``, the view's combined log-probabilities at tau.

    Raises:
        ConfigError: the view cannot be combined.
        CacheIncompleteError, CacheCorruptError, SampleIdMismatchError: a member is
            unfinished or damaged, or the members disagree on a shard's ids or inputs.
        TeacherOutputError: a combined value is not finite (it is never stored).
        LeaseHeldError: another job holds the entry's lease past its wait.
        CacheReadOnlyError: the cache root is not writable (nothing was written).
        SpecMismatchError: a member is itself a combined entry at another temperature (a
            combination cannot be re-tempered).
    """
    from kdcache import targets
    from kdcache.progress import Progress

    material = combined_spec(view, temperature)
    tau = float(material["targets"]["temperature"])
    entry = CacheEntry(view.root, schema.content_key(material))
    if entry.is_complete and not entry.uncommit_damaged():
        return entry
    try:
        entry.write_spec(material)
    except PermissionError as exc:
        raise CacheReadOnlyError(
            f"cannot store the combination of view {view.key} under {view.root.uri}: {exc}. "
            "Combine it where the cache root is writable (kdcache combine), or read the "
            "view combined at read time (SoftTargetDataset(..., combined=False))"
        ) from exc
    lease = Lease(entry, ttl_s=lease_ttl_s)
    if not lease.acquire():
        return entry  # another job completed it while we waited
    keeper = _LeaseKeeper([lease], interval_s=max(1.0, lease_ttl_s / 3))
    started = time.perf_counter()
    computed = 0
    try:
        keeper.start()
        bar = Progress(view.num_shards, desc="combine", unit="shard", enabled=progress)
        try:
            for i in range(view.num_shards):
                if entry.committed_shard(i, check_bytes=True) is None:
                    ids, scaled_KNV = view.read_shard(i, verify=verify)
                    scaled = torch.from_numpy(scaled_KNV)
                    if tau != view.temperature:
                        scaled = targets.retemper(scaled, view.temperature, tau)
                    log_probs = targets.combine_ensemble(scaled, rule=view.ensemble_rule)
                    entry.write_shard(i, ids, log_probs, input_digest=_input_digest(view, i))
                    computed += 1
                bar.update(1)
        finally:
            bar.close()
        names = [e.teacher_name for e in view.entries]
        entry.commit(
            view.num_shards,
            {
                "temperature": tau,
                "teacher_name": f"{view.rule}({', '.join(names)})",
                "teacher": material["teacher"],
                "combined_from": {"view": view.key, "entries": [e.key for e in view.entries]},
                "versions": {
                    "kdcache": __version__,
                    "torch": torch.__version__,
                    "python": platform.python_version(),
                },
                "build": {"executor": "combine", "computed_shards": computed},
            },
        )
    finally:
        keeper.stop()
        lease.release()
    log.info(
        "combined view %s (%s of %d teachers) at temperature %g into entry %s: %d shard(s) "
        "in %.1f s",
        view.key,
        view.rule,
        len(view.entries),
        tau,
        entry.key,
        computed,
        time.perf_counter() - started,
    )
    return entry
