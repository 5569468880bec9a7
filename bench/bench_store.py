"""Store backends side by side: read and write throughput against plain files, bytes on disk.

For each target layout (dense V = 10, dense V = 1,000, sparse top-k k = 64 over V = 32k)
and each backend (Arrow IPC, Parquet, Zarr v3), in one run:

* **write**: ``CacheEntry.write_shard`` (encode, SHA-256, write, fsync, rename, sidecar)
  against writing the same number of bytes to a plain file (write, fsync, rename);
* **read**: ``CacheEntry.read_shard`` / ``read_sparse_shard`` (read, SHA-256 check, decode
  into arrays; also without the SHA-256 check) against reading the shard file's bytes
  with ``open().read()``;
* **bytes on disk** per sample (dense) or per token (sparse rows are tokens), and against
  the raw payload (ids + values + per-row float32 fields, no framing).

Ratios are the figures that count (absolute times drift on shared machines): a read
ratio of 0.5 means the backend delivers arrays at half the speed the same bytes come off
the page cache as a plain file. Each timing is the best of a few repeats, alternating
the backend and its plain-file twin.

    python bench/bench_store.py --quick --json bench_store.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from kdcache import schema
from kdcache.schema import TargetSpec
from kdcache.stores.backends import BACKENDS
from kdcache.stores.entry import CacheEntry
from kdcache.targets.sparse import SparseTargets


def _best(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _sparse_rows(num_rows: int, k: int, vocab: int, seed: int) -> SparseTargets:
    """Synthetic top-k rows: k distinct ids per row, decreasing values, exact-looking normaliser."""
    rng = np.random.default_rng(seed)
    start = rng.integers(0, vocab, num_rows)
    ids = (start[:, None] + np.arange(k)[None, :] * 7919) % vocab  # distinct: 7919 is prime
    values = -np.sort(rng.exponential(1.0, (num_rows, k)).astype(np.float32), axis=1)
    log_z = np.log(np.exp(values).sum(axis=1) + 1.0).astype(np.float32)
    tail = (np.log(1.0) - log_z).astype(np.float32)
    return SparseTargets(
        ids_BS=torch.from_numpy(ids.astype(np.int64)),
        values_BS=torch.from_numpy(values),
        log_partition_B=torch.from_numpy(log_z),
        kind="topk",
        tail_log_mass_B=torch.from_numpy(tail),
    )


def _case_rows(case: dict, seed: int) -> tuple[np.ndarray, object, int]:
    """(sample_ids, rows, raw payload bytes) of one shard."""
    n = case["rows"]
    ids = np.arange(n, dtype=np.int64) + seed * n
    if case["kind"] == "dense":
        vals = np.random.default_rng(seed).standard_normal((n, case["vocab"])).astype(np.float32)
        return ids, vals, ids.nbytes + vals.nbytes
    rows = _sparse_rows(n, case["k"], case["vocab"], seed)
    # ids int32 + values float32 per kept entry, log-partition + tail float32 per row
    payload = ids.nbytes + n * case["k"] * (4 + 4) + n * 8
    return ids, rows, payload


def _entry(root: str, case: dict, backend: str) -> CacheEntry:
    params = {"k": case["k"]} if case["kind"] == "topk" else None
    spec = TargetSpec(4.0, kind=case["kind"], backend=backend, params=params)
    material = schema.entry_spec({"bench": case["name"]}, {"bench": backend}, spec)
    entry = CacheEntry(root, schema.content_key(material))
    entry.write_spec(material)
    return entry


def _plain_write(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _plain_read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _bench_one(
    root: str, case: dict, backend: str, shards: list, repeats: int
) -> tuple[float, float, float, float, float, int]:
    """Seconds for (write, plain write, read, read without SHA-256, plain read), bytes."""
    num_shards = len(shards)
    entry = _entry(root, case, backend)

    def write() -> None:
        for i, (ids, rows, _) in enumerate(shards):
            entry.write_shard(i, ids, rows, vocab_size=case["vocab"])

    write()
    entry.commit(num_shards, {})
    files = [entry.shards_location.display(r.file) for r in entry.shards]
    blobs = [_plain_read(f) for f in files]
    plain_dir = os.path.join(root, "plain")
    os.makedirs(plain_dir)

    def plain_write() -> None:
        for i, b in enumerate(blobs):
            _plain_write(os.path.join(plain_dir, f"{i}.bin"), b)

    reader = entry.read_sparse_shard if entry.is_sparse else entry.read_shard

    def read(verify: bool = True) -> None:
        for i in range(num_shards):
            reader(i, verify=verify)

    def plain_read() -> None:
        for f in files:
            _plain_read(f)

    best = [float("inf")] * 5
    for _ in range(repeats):  # alternate the backend and its plain-file twin
        for j, fn in enumerate((write, plain_write, read, lambda: read(False), plain_read)):
            best[j] = min(best[j], _best(fn, 1))
    return best[0], best[1], best[2], best[3], best[4], sum(len(b) for b in blobs)


def run(quick: bool) -> dict:
    scale = 1 if quick else 4
    num_shards = 2
    repeats = 3 if quick else 5
    cases = [
        {"name": "dense V=10", "kind": "dense", "vocab": 10, "rows": 50_000 * scale},
        {"name": "dense V=1000", "kind": "dense", "vocab": 1000, "rows": 4_000 * scale},
        {
            "name": "topk k=64 V=32k",
            "kind": "topk",
            "vocab": 32_768,
            "k": 64,
            "rows": 8_000 * scale,
        },
    ]
    figures: dict[str, float] = {}
    ratios: dict[str, float] = {}
    table = []
    with tempfile.TemporaryDirectory(prefix="kdcache-bench-store-") as tmp:
        for case in cases:
            shards = [_case_rows(case, seed) for seed in range(num_shards)]
            payload = sum(p for _, _, p in shards)
            num_rows = case["rows"] * num_shards
            for backend in sorted(BACKENDS):
                root = os.path.join(tmp, f"{case['kind']}{case['vocab']}-{backend}")
                t_w, t_pw, t_r, t_rn, t_pr, on_disk = _bench_one(
                    root, case, backend, shards, repeats
                )
                mb = on_disk / 1e6
                tag = f"{case['name']}/{backend}"
                figures[f"{tag}/write_MBps"] = mb / t_w
                figures[f"{tag}/plain_write_MBps"] = mb / t_pw
                figures[f"{tag}/read_MBps"] = mb / t_r
                figures[f"{tag}/read_noverify_MBps"] = mb / t_rn
                figures[f"{tag}/plain_read_MBps"] = mb / t_pr
                figures[f"{tag}/bytes_per_row"] = on_disk / num_rows
                ratios[f"{tag}/write_vs_plain"] = t_pw / t_w
                ratios[f"{tag}/read_vs_plain"] = t_pr / t_r
                ratios[f"{tag}/read_noverify_vs_plain"] = t_pr / t_rn
                ratios[f"{tag}/bytes_vs_payload"] = on_disk / payload
                table.append(
                    (
                        case["name"],
                        backend,
                        mb / t_w,
                        t_pw / t_w,
                        mb / t_r,
                        t_pr / t_r,
                        t_pr / t_rn,
                        on_disk / num_rows,
                        on_disk / payload,
                    )
                )
    return {"name": "bench_store", "figures": figures, "ratios": ratios, "table": table}


def print_table(table: list[tuple]) -> None:
    head = (
        f"{'targets':<16} {'backend':<8} {'write MB/s':>10} {'w/plain':>8} "
        f"{'read MB/s':>10} {'r/plain':>8} {'r/plain*':>8} {'bytes/row':>10} {'/payload':>8}"
    )
    print(head)
    print("-" * len(head))
    for name, backend, w, wr, r, rr, rnr, bpr, over in table:
        print(
            f"{name:<16} {backend:<8} {w:>10.0f} {wr:>8.2f} {r:>10.0f} {rr:>8.2f} {rnr:>8.2f} "
            f"{bpr:>10.1f} {over:>8.3f}"
        )
    print(
        "w/plain, r/plain: backend throughput / plain-file throughput on the same bytes "
        "(read with SHA-256 check; r/plain*: without). bytes/row: per sample (dense) or per "
        "token (sparse). /payload: bytes on disk / raw ids+values bytes."
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small shards (under 1-2 min, 2 cores)")
    p.add_argument("--json", metavar="PATH", help="write {name, figures, ratios} here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    result = run(args.quick)
    print_table(result["table"])
    if args.json:
        out = {k: result[k] for k in ("name", "figures", "ratios")}
        Path(args.json).write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
