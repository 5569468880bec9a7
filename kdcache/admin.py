"""Read-only tools over cache roots: describe, verify and list entries.

These back ``kdcache inspect``, ``kdcache verify`` and ``kdcache ls``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kdcache import schema
from kdcache.cache import CacheEntry, EnsembleView, as_view
from kdcache.errors import KDCacheError
from kdcache.storage import Location


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
    if num_samples > 0 and view.num_shards:
        ids, scaled = view.read_shard(0)
        logp = targets.combine_ensemble(
            torch.from_numpy(scaled[:, :num_samples]), rule=view.rule, weights=view.weights
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

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(cache: CacheEntry | EnsembleView) -> VerifyResult:
    """Check every shard of every member entry.

    Checks: each listed file exists with its recorded size and SHA-256; rows per shard and
    id ranges match the sidecar; every ``sample_id`` appears exactly once across shards;
    all values are finite; each entry's row count equals its dataset's record count.

    Returns:
        A :class:`VerifyResult`; each problem names the entry and the shard.
    """
    result = VerifyResult()
    for entry in as_view(cache).entries:
        seen: list[np.ndarray] = []
        for rec in entry.shards:
            where = f"{entry.key}/{rec.file}"
            try:
                ids, values = entry.read_shard(rec.index, verify=True)
            except KDCacheError as exc:
                result.problems.append(f"{where}: {exc}")
                continue
            result.checked_shards += 1
            result.checked_rows += len(ids)
            if len(ids) and (
                int(ids.min()) != rec.min_sample_id or int(ids.max()) != rec.max_sample_id
            ):
                result.problems.append(f"{where}: sample_id range differs from its sidecar")
            if not np.isfinite(values.astype(np.float32)).all():
                bad = int(ids[~np.isfinite(values.astype(np.float32)).all(axis=1)][0])
                result.problems.append(f"{where}: non-finite value (first at sample_id {bad})")
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


def list_root(root: str) -> list[dict[str, Any]]:
    """Entries, ensemble views and aliases under a cache root, one dict each."""
    loc = Location(root)
    rows: list[dict[str, Any]] = []
    entries = loc.child(schema.ENTRIES_DIR)
    for key in entries.listdir():
        entry = CacheEntry(loc, key)
        row: dict[str, Any] = {"kind": "entry", "key": key}
        if entry.is_complete:
            m = entry.manifest
            row.update(
                status="complete",
                teacher=m.get("teacher_name"),
                temperature=m["spec"]["targets"]["temperature"],
                rows=m["num_rows"],
                bytes=m["num_bytes"],
                shards=m["num_shards"],
            )
        elif entry.location.exists(schema.LEASE_FILE):
            row.update(status="building")
        else:
            row.update(status="incomplete")
        rows.append(row)
    for name in loc.child(schema.ENSEMBLES_DIR).listdir():
        if name.endswith(".json"):
            view = json.loads(loc.child(schema.ENSEMBLES_DIR).read_bytes(name))
            rows.append(
                {
                    "kind": "ensemble",
                    "key": name[:-5],
                    "rule": view["rule"],
                    "entries": view["entries"],
                }
            )
    for name in loc.child(schema.ALIASES_DIR).listdir():
        if name.endswith(".json"):
            target = json.loads(loc.child(schema.ALIASES_DIR).read_bytes(name))
            rows.append({"kind": "alias", "name": name[:-5], "key": target["key"]})
    return rows
