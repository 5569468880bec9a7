"""TODO docstring."""

from __future__ import annotations

import sys
from typing import Any

from kdcache.build.report import BuildReport
from kdcache.build.task import compute_shard


def _progress(total: int, samples_total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        unit="shard",
        desc="teacher stage",
        disable=not enabled,
        dynamic_ncols=True,
        # into a log file (a Ray job, CI), a line every 30 s rather than every update
        mininterval=0.1 if sys.stderr.isatty() else 30.0,
    )


def _run_local(
    dataset, ensemble, entries, pending, report, *, batch_size, progress, **_: Any
) -> None:
    bar = _progress(len(pending), 0, progress)
    for shard_index, ks in sorted(pending.items()):
        stats = compute_shard(
            dataset,
            [ensemble.teachers[k] for k in ks],
            [entries[k] for k in ks],
            shard_index,
            batch_size,
        )
        _account(report, "local", stats, bar)
    bar.close()


def _account(report: BuildReport, actor: str, stats: dict[str, float], bar) -> None:
    slot = report.per_actor.setdefault(actor, {"samples": 0.0, "seconds": 0.0, "shards": 0.0})
    slot["samples"] += stats["samples"]
    slot["seconds"] += stats["seconds"]
    slot["shards"] += 1
    report.num_samples += int(stats["samples"])
    elapsed = bar.format_dict.get("elapsed") or 1e-9
    bar.set_postfix_str(f"{report.num_samples / elapsed:,.0f} samples/s")
    bar.update(1)
