"""Tools over cache roots: describe, verify, list and garbage-collect entries.

These back ``kdcache inspect``, ``kdcache verify``, ``kdcache ls`` and ``kdcache gc``;
only :func:`gc` deletes anything.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kdcache import schema
from kdcache.errors import CacheIncompleteError, KDCacheError
from kdcache.stores.entry import CacheEntry, _dumps
from kdcache.stores.fs import STAGING_PREFIX, Location
from kdcache.stores.view import EnsembleView, as_view

log = logging.getLogger(__name__)


def describe(cache: CacheEntry | EnsembleView, *, num_samples: int = 3) -> dict[str, Any]:
    """Spec, teachers, temperature, dtype, shards, rows, bytes and a few decoded samples.

    Returns:
        A JSON-able dict. ``samples`` holds, for the first rows of shard 0, the
        ``sample_id``, the top classes of the (combined) soft target and their
        probabilities at the cache's temperature.
    """
    import torch

    from kdcache import targets

    view = as_view(cache)
    first = view.entries[0]
    out: dict[str, Any] = {
        "kind": "ensemble" if isinstance(cache, EnsembleView) else "entry",
        "key": cache.key,
        "temperature": view.temperature,
        "targets": first.spec["targets"],
        "dataset": {
            "num_records": first.spec["dataset"].get("num_records"),
            "preprocessing": first.spec["dataset"].get("preprocessing"),
        },
        "num_shards": view.num_shards,
        "num_rows": first.num_rows,
        "num_bytes": view.num_bytes,
        "vocab_size": first.vocab_size,
        "rule": view.rule if len(view.entries) > 1 else None,
        "weights": view.weights,
        "teachers": [
            {
                "name": e.teacher_name,
                "key": e.key,
                "architecture": e.spec["teacher"].get("architecture"),
                "weights_sha256": e.spec["teacher"].get("weights_sha256", "")[:16],
                "num_bytes": e.num_bytes,
            }
            for e in view.entries
        ],
    }
    if view.is_combined:
        out["combined_from"] = first.manifest.get("combined_from")
        out["rule"] = first.spec["teacher"]["view"].get("rule")
    elif isinstance(cache, EnsembleView) and len(view.entries) > 1:
        from kdcache.stores.combined import combinable

        if combinable(view) is None:  # the combination stored at the view's temperature?
            stored = view.combined_entry()
            out["combined_entry"] = stored.key if stored.is_complete else None
    if first.is_sparse:
        out["sparse"] = {"kind": first.target_spec.kind, **dict(first.target_spec.params or ())}
    # A rule that needs per-row inputs (labels, route keys) is applied by the reader, which
    # has them; the samples shown here combine the teachers by their (weighted) mean.
    rule = view.ensemble_rule
    shown = rule if not (rule.needs_labels or rule.needs_route_keys) else "mean_probs"
    if shown != rule and num_samples > 0:
        out["samples_rule"] = "mean_probs (the view's rule needs the inputs' columns)"
    if num_samples > 0 and view.num_shards and view.is_sparse:
        ids, parts = view.read_sparse_shard(0)
        rows = [t.rows(slice(0, num_samples)) for t in parts]
        combined = (
            rows[0]
            if len(rows) == 1 or rows[0].kind in schema.COUNT_KINDS
            else targets.combine_sparse_ensemble(
                rows, rule=shown, weights=None if shown == rule else view.weights
            )
        )
        k = min(3, combined.num_slots)
        top = combined.log_probs().topk(k, dim=-1)
        out["samples"] = [
            {
                "sample_id": int(i),
                "top_classes": combined.ids_BS[r].gather(0, top.indices[r]).tolist(),
                "top_probs": [round(float(p), 4) for p in top.values[r].exp()],
                "tail_mass": round(float(combined.tail_log_mass()[r].exp()), 6),
            }
            for r, i in enumerate(ids[:num_samples])
        ]
    elif num_samples > 0 and view.num_shards:
        ids, scaled = view.read_shard(0)
        logp = targets.combine_ensemble(
            torch.from_numpy(scaled[:, :num_samples]),
            rule=shown,
            weights=None if shown == rule else view.weights,
        )
        k = min(3, logp.shape[-1])
        top = logp.exp().topk(k, dim=-1)
        out["samples"] = [
            {
                "sample_id": int(i),
                "top_classes": c.tolist(),
                "top_probs": [round(float(p), 4) for p in pr],
            }
            for i, c, pr in zip(ids[:num_samples], top.indices, top.values, strict=True)
        ]
    return out


@dataclass
class VerifyResult:
    """Outcome of :func:`verify`: ``problems`` is empty when the cache is sound."""

    checked_shards: int = 0
    checked_rows: int = 0
    problems: list[str] = field(default_factory=list)
    #: (entry, shard index) of each shard whose file is missing, altered or unreadable.
    damaged: list[tuple[CacheEntry, int]] = field(default_factory=list)
    #: Entries whose own records (spec, manifest) are missing, torn or edited.
    broken: list[CacheEntry] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def repair(result: VerifyResult) -> tuple[list[str], list[str]]:
    """Repair what :func:`verify` found, so that rerunning the same build heals the cache.

    Damaged shards are uncommitted (their sidecar and their entry's manifest removed): the
    rebuild recomputes exactly those. A broken entry record is repaired where that is
    sound: a ``spec.json`` that no longer hashes to its key is restored from the
    manifest's copy when that copy does hash to the key; a torn or inconsistent manifest
    is removed (the entry reads as unfinished; the rebuild recomputes only shards without
    a valid sidecar). Nothing that is not kdcache's is touched.

    Returns:
        ``(done, left)``: one line per repair made, one per fault it could not repair.
    """
    done: list[str] = []
    left: list[str] = []
    for entry in result.broken:
        line = _repair_records(entry)
        (done if line.startswith("repaired") else left).append(line)
    for entry, index in result.damaged:
        entry.invalidate_shard(index)
        done.append(f"uncommitted {entry.key}/{schema.shard_stem(index)}")
    return done, left


def _raw_json(loc: Any, name: str) -> Any:
    try:
        return json.loads(loc.read_bytes(name))
    except (FileNotFoundError, ValueError, UnicodeDecodeError):
        return None


def _repair_records(entry: CacheEntry) -> str:
    """Restore a broken spec from the manifest's copy, then drop a bad manifest."""
    loc = entry.location
    spec = _raw_json(loc, schema.SPEC_FILE)
    if not isinstance(spec, dict) or schema.content_key(spec) != entry.key:
        manifest = _raw_json(loc, schema.MANIFEST_FILE)
        copy = manifest.get("spec") if isinstance(manifest, dict) else None
        if not isinstance(copy, dict) or schema.content_key(copy) != entry.key:
            return (
                f"left {entry.key}: its spec.json does not hash to its key and no intact "
                "copy exists; delete the entry directory and rebuild"
            )
        loc.write_atomic(schema.SPEC_FILE, _dumps(copy))
        log.warning("restored %s from the manifest's copy", loc.display(schema.SPEC_FILE))
    entry.__dict__.pop("spec", None)
    entry.__dict__.pop("manifest", None)
    try:
        _ = entry.manifest
    except CacheIncompleteError:
        return f"repaired {entry.key}: unfinished (no manifest); rerun its build to finish it"
    except KDCacheError:
        loc.delete(schema.MANIFEST_FILE)
        entry.__dict__.pop("manifest", None)
        return f"repaired {entry.key}: removed its damaged manifest; rerun its build"
    return f"repaired {entry.key}: spec.json restored"


def verify(cache: CacheEntry | EnsembleView | list[CacheEntry]) -> VerifyResult:
    """Check every shard of every member entry.

    Checks: each listed file exists with its recorded size and SHA-256; rows per shard and
    id ranges match the sidecar; every ``sample_id`` appears exactly once across shards
    (in a token-level entry, as one run of rows: one row per target token); all values
    are finite; each entry's sample count equals its dataset's record count.

    Returns:
        A :class:`VerifyResult`; each problem names the entry and the shard.
    """
    result = VerifyResult()
    entries = cache if isinstance(cache, list) else as_view(cache).entries
    for entry in entries:
        try:
            records = entry.shards  # checks spec (hash), manifest and every shard record
        except KDCacheError as exc:
            result.problems.append(f"{entry.key}: {exc}")
            result.broken.append(entry)
            continue
        seen: list[np.ndarray] = []
        prep = entry.spec["dataset"].get("preprocessing") or {}
        token_level = bool(prep.get("token_level")) if isinstance(prep, dict) else False
        for rec in records:
            where = f"{entry.key}/{rec.file}"
            try:
                if entry.is_sparse:
                    ids, sparse = entry.read_sparse_shard(rec.index, verify=True)
                    problem = _sparse_problem(ids, sparse, entry.vocab_size)
                else:
                    ids, values = entry.read_shard(rec.index, verify=True)
                    finite = np.isfinite(values.astype(np.float32)).all(axis=1)
                    problem = (
                        f"non-finite value (first at sample_id {int(ids[~finite][0])})"
                        if not finite.all()
                        else None
                    )
            except KDCacheError as exc:
                result.problems.append(f"{where}: {exc}")
                result.damaged.append((entry, rec.index))
                continue
            result.checked_shards += 1
            result.checked_rows += len(ids)
            if len(ids) and (
                int(ids.min()) != rec.min_sample_id or int(ids.max()) != rec.max_sample_id
            ):
                result.problems.append(f"{where}: sample_id range differs from its sidecar")
            if problem:
                result.problems.append(f"{where}: {problem}")
            if token_level and len(ids):
                # One row per target token: a sequence is one run of equal ids (the
                # writer checks that), so count each run once.
                ids = ids[np.concatenate([[True], ids[1:] != ids[:-1]])]
            seen.append(ids)
        if seen:
            all_ids = np.concatenate(seen)
            uniq, counts = np.unique(all_ids, return_counts=True)
            if (counts > 1).any():
                result.problems.append(
                    f"{entry.key}: sample_id {int(uniq[counts > 1][0])} appears in more than "
                    "one row"
                )
            expected = entry.spec["dataset"].get("num_records")
            if expected is not None and len(all_ids) != expected and not result.problems:
                result.problems.append(f"{entry.key}: {len(all_ids)} rows, dataset has {expected}")
    return result


def _sparse_problem(ids: np.ndarray, sparse: Any, vocab_size: int) -> str | None:
    """The first fault in sparse rows (ids out of range or repeated, non-finite values)."""
    import torch

    valid = sparse.valid_BS
    bad_rows = torch.zeros(sparse.num_rows, dtype=torch.bool)
    bad_rows |= (valid & (sparse.ids_BS >= vocab_size)).any(dim=1)
    if bool(bad_rows.any()):
        return f"id outside [0, {vocab_size}) at sample_id {int(ids[int(bad_rows.nonzero()[0])])}"
    finite = torch.isfinite(sparse.values_BS.float()) | ~valid
    bad_rows = ~finite.all(dim=1) | ~torch.isfinite(sparse.log_partition_B)
    if bool(bad_rows.any()):
        return f"non-finite value (first at sample_id {int(ids[int(bad_rows.nonzero()[0])])})"
    srt = sparse.ids_BS.sort(dim=1).values
    dup = ((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any(dim=1)
    if bool(dup.any()):
        return f"an id repeats within the row of sample_id {int(ids[int(dup.nonzero()[0])])}"
    return None


@dataclass
class GcResult:
    """Outcome of :func:`gc`.

    Attributes:
        removed: Display URIs of the files removed (or, with ``dry_run``, to remove).
        skipped_leased: Keys of entries left alone because a live lease covers them.
        num_bytes: Bytes removed (or to remove).
        dry_run: Whether nothing was deleted.
    """

    removed: list[str] = field(default_factory=list)
    skipped_leased: list[str] = field(default_factory=list)
    num_bytes: int = 0
    dry_run: bool = False


def _live_lease(entry: CacheEntry, now: float) -> bool:
    try:
        held = json.loads(entry.location.read_bytes(schema.LEASE_FILE))
    except FileNotFoundError:
        return False
    except ValueError:
        return True  # a lease being written right now: treat as live
    return float(held.get("expires_at", 0)) >= now


def gc(root: str, *, dry_run: bool = False) -> GcResult:
    """Remove staging files and unreferenced shards under a cache root.

    Removes:
        * staging files (``.tmp-*``: a write that died before its rename) anywhere in an
          entry, in ``ensembles/`` and in ``aliases/``;
        * in a complete entry (one with a manifest), every file under ``shards/`` that
          the manifest does not list (neither a listed data file nor its sidecar): left
          over from an interrupted build under another backend or an older shard count.

    Never touches an entry under a live (unexpired) lease, the files of an incomplete
    entry other than staging files (its committed shards are what a resumed build
    reuses), specs, manifests, leases, ensemble views or aliases.

    Args:
        root: The cache root (local path or URI).
        dry_run: Only list what would be removed.

    Returns:
        A :class:`GcResult`.
    """
    loc = Location(root)
    result = GcResult(dry_run=dry_run)
    now = time.time()

    def remove(where: Location, name: str) -> None:
        try:
            size = where.size(name)
        except FileNotFoundError:
            return
        result.removed.append(where.display(name))
        result.num_bytes += size
        if not dry_run:
            where.delete(name)
            log.info("gc: removed %s", where.display(name))

    for sub in (schema.ENSEMBLES_DIR, schema.ALIASES_DIR):
        d = loc.child(sub)
        if _is_link(d):
            continue
        for name in d.listdir():
            if name.startswith(STAGING_PREFIX):
                remove(d, name)
    entries = loc.child(schema.ENTRIES_DIR)
    if _is_link(entries):
        log.warning("gc: %s is a symbolic link; gc never follows one", entries.display())
        return result
    for key in entries.listdir():
        entry = CacheEntry(loc, key)
        if not _KEY_LIKE.fullmatch(key) or not entries.is_dir(key):
            continue  # not an entry kdcache wrote
        if _is_link(entry.location) or _is_link(entry.shards_location):
            log.warning("gc: %s (or its shards/) is a symbolic link; left alone", key)
            continue
        if _live_lease(entry, now):
            result.skipped_leased.append(key)
            continue
        for name in entry.location.listdir():
            if name.startswith(STAGING_PREFIX):
                remove(entry.location, name)
        listed: set[str] | None = None
        if entry.is_complete:
            try:
                listed = set()
                for rec in entry.shards:
                    listed |= {rec.file, schema.shard_stem(rec.index) + ".json"}
            except KDCacheError as exc:
                log.warning("gc: %s has an unreadable manifest (%s); left alone", key, exc)
                listed = None
        shards = entry.shards_location
        for name in shards.listdir():
            if shards.is_dir(name) or _is_link(shards, name):
                continue
            if name.startswith(STAGING_PREFIX) or (
                listed is not None and name not in listed and _SHARD_FILE.fullmatch(name)
            ):
                remove(shards, name)  # only names kdcache writes: staging files and shards
    return result


#: The names kdcache gives shard files and sidecars (``shard-00042.arrow``, ``.json``).
_SHARD_FILE = re.compile(r"shard-\d{5,}\.[a-z0-9]+")
_KEY_LIKE = re.compile(f"[0-9a-f]{{{schema.KEY_HEX_CHARS}}}")


def _is_link(loc: Location, name: str = "") -> bool:
    """True for a symbolic link on a local filesystem (object stores have none)."""
    if not loc.is_local:
        return False
    return os.path.islink(loc.path if not name else os.path.join(loc.path, name))
