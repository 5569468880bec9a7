"""Student quality against cache bytes for language-model caches, side by side in one run.

On the fortunes corpus (``pipelines.lm_fortunes``: its tokenizer, V = 2,048, its teacher
gpt-a or the ensemble ``--teachers gpt-a,gpt-b`` combined by mean of probabilities), the
same GPT-2 student (``lm_fortunes.STUDENT``), the same steps and the same optimiser
(a plain torch AdamW loop: linear warm-up over 5% of the steps, linear decay, gradient
clipping at 1) is trained once per configuration and seed:

* ``hard``: next-token cross-entropy alone (what distillation adds);
* ``dense-online``: the teachers run on every batch, dense targets at tau, the loss
  :func:`kdcache.losses.token_distill_loss` gives dense targets (the reference);
* ``topk{k}-fp32`` (k = 8, 16, 32, 64) and ``topk64-bf16``: top-k caches with the exact
  log-partition and tail, values stored as float32 (bfloat16);
* ``topk{k}-q8``: the same with quantised values (``params={"k": k, "value_bits": 8}``);
* ``sampled{n}`` (n = 16, 64): sampled ids with counts and values (``kind="sampled"``,
  Anshumann et al., "Sparse Logit Sampling", ACL 2025, sec. 3);
* ``sampled{n}-counts``: counts only (``kind="sampled_counts"``), drawn by this kind's
  default, systematic sampling (one uniform offset per row: unbiased, less variance);
* ``sampled{n}-counts-iid``: counts only of independent draws (``sampling:
  multinomial``), the very draws of ``sampled{n}``.

Caches are built once (``kdcache.build.build_cache``, local executor) over a fixed subset
of the training sequences and read with ``kdcache.SoftTargetDataset``; the distillation
loss is ``token_distill_loss`` for every row (alpha of the pipeline, 0.5). Each seed sets
the student's initialisation and the data order (the same for every row). Reported per
row: validation perplexity (mean and sample standard deviation over the seeds), cache
bytes per target token (entry bytes over target tokens, per teacher), the teacher-stage
build time and the mean student training time; a PNG of perplexity against bytes per
token (log x) is written next to the JSON (or to ``--plot``).

The teachers are the pipeline's checkpoints when ``--work-dir`` holds them
(``python -m pipelines.lm_fortunes`` writes them); otherwise they are trained here with
the pipeline's settings and saved there, so the next run reuses them. ``--quick`` trains
a short-lived gpt-a (100 steps) in a scratch directory, still at V = 2,048, and runs the
rows ``hard``, ``dense-online``, ``topk64-fp32``, ``topk64-q8``, ``sampled16`` and
``sampled16-counts`` for 2 seeds of 100 steps over 768 cached sequences (the byte figures
hold; the perplexities are of barely trained students).

    python bench/bench_lm_quality.py --quick --json bench_lm_quality.json
    python bench/bench_lm_quality.py --json bench_lm_quality.json   # about 25 min, 2 cores
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import kdcache
from kdcache import schema
from kdcache.build.stage import build_cache
from kdcache.data.tokens import TokenDataset, tokenizer_files_sha256
from kdcache.errors import ConfigError
from kdcache.losses.kd import token_distill_loss
from kdcache.stores.entry import CacheEntry
from kdcache.stores.view import as_view
from kdcache.stream import ShardedStream, SoftTargetDataset
from kdcache.teachers.loaders import HFLogits
from kdcache.train.evaluate import evaluate_perplexity

VOCAB_SIZE = 2048


@dataclass(frozen=True)
class Row:
    """One configuration: a cache (kind, params, storage dtype), or none (``online``)."""

    name: str
    kind: str | None  # None: no cache (hard labels or dense online distillation)
    params: dict[str, Any] = field(default_factory=dict)
    storage_dtype: str = "float32"
    family: str = ""
    online: bool = False

    @property
    def key(self) -> str:
        """The row's name as a JSON key (``topk64-q8`` -> ``topk64_q8``)."""
        return self.name.replace("-", "_")

    @property
    def needs_new_kinds(self) -> bool:
        return self.kind == "sampled_counts" or "value_bits" in self.params


def all_rows(sample_seed: int) -> list[Row]:
    rows = [
        Row("hard", None, family="hard labels"),
        Row("dense-online", None, family="dense online KD", online=True),
    ]
    rows += [Row(f"topk{k}-fp32", "topk", {"k": k}, family="top-k float32") for k in (8, 16, 32)]
    rows += [
        Row("topk64-fp32", "topk", {"k": 64}, family="top-k float32"),
        Row("topk64-bf16", "topk", {"k": 64}, "bfloat16", family="top-k bfloat16"),
    ]
    rows += [
        Row(f"topk{k}-q8", "topk", {"k": k, "value_bits": 8}, family="top-k 8-bit")
        for k in (8, 16, 32, 64)
    ]
    for kind, suffix, family in (
        ("sampled", "", "sampled, values"),
        ("sampled_counts", "-counts", "sampled, counts only"),
    ):
        rows += [
            Row(f"sampled{n}{suffix}", kind, {"num_samples": n, "seed": sample_seed}, family=family)
            for n in (16, 64)
        ]
    rows += [
        Row(
            f"sampled{n}-counts-iid",
            "sampled_counts",
            {"num_samples": n, "seed": sample_seed, "sampling": "multinomial"},
            family="sampled (independent draws), counts only",
        )
        for n in (16, 64)
    ]
    return rows


QUICK_ROWS = ("hard", "dense-online", "topk64-fp32", "topk64-q8", "sampled16", "sampled16-counts")


def missing_features() -> list[str]:
    """What this kdcache lacks of the 8-bit top-k values and the counts-only sampled kind."""
    missing = []
    if "sampled_counts" not in schema.SPARSE_KINDS:
        missing.append("target kind 'sampled_counts' (kdcache.schema.SPARSE_KINDS)")
    try:
        schema.TargetSpec(1.0, kind="topk", params={"k": 64, "value_bits": 8})
    except ConfigError:
        missing.append("top-k parameter 'value_bits' (kdcache.schema.TargetSpec)")
    if not hasattr(CacheEntry, "quantization_error"):
        missing.append("CacheEntry.quantization_error()")
    return missing


# -- teachers and data ---------------------------------------------------------------------


def _teachers(args: argparse.Namespace) -> tuple[list[kdcache.Teacher], dict[str, Any], str]:
    """The teachers named by ``--teachers`` and the pipeline's data (tokenizer, splits)."""
    from pipelines import lm_fortunes as lm

    specs = {t["name"]: t for t in lm.TEACHERS}
    unknown = [n for n in args.teachers if n not in specs]
    if unknown:
        raise ConfigError(
            f"--teachers names {unknown}; the pipeline's teachers are {sorted(specs)}"
        )
    if args.quick:
        work = args.scratch
        steps = ["--teacher-steps", str(args.teacher_steps)]
    else:
        work = args.work_dir
        steps = [] if args.teacher_steps is None else ["--teacher-steps", str(args.teacher_steps)]
    settings = lm.parse_args(
        ["--work-dir", work, "--vocab-size", str(VOCAB_SIZE), *steps, "--no-progress"]
    )
    data = lm.prepare_data(settings)
    if data["vocab"] != VOCAB_SIZE:
        raise ConfigError(
            f"the tokenizer in {work} has V={data['vocab']}, this bench measures V={VOCAB_SIZE}"
        )
    tok_sha = tokenizer_files_sha256(data["tok_dir"])
    paths, sources = [], []
    for name in args.teachers:
        found = sorted(
            glob.glob(os.path.join(work, "teachers", f"{name}-*", "config.json")),
            key=os.path.getmtime,
        )
        # the pipeline's checkpoints of another vocabulary or data have another tokenizer
        found = [f for f in found if tokenizer_files_sha256(os.path.dirname(f)) == tok_sha]
        if found and not args.quick:
            paths.append(os.path.dirname(found[-1]))
            sources.append(f"{name}: pipeline checkpoint {os.path.basename(paths[-1])}")
        else:
            os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
            tic = time.perf_counter()
            paths.append(lm.train_or_load_teacher(specs[name], data, settings))
            sources.append(
                f"{name}: trained here ({settings.teacher_steps} steps, "
                f"{time.perf_counter() - tic:.0f} s)"
            )
    teachers = [
        kdcache.Teacher.from_hf(p, task="causal-lm", name=n)
        for p, n in zip(paths, args.teachers, strict=True)
    ]
    return teachers, data, "; ".join(sources)


def _subset(train: TokenDataset, num: int, num_shards: int) -> TokenDataset:
    """``num`` training sequences drawn once (seed 0), in dataset order."""
    if num > len(train):
        raise ConfigError(f"--records {num} exceeds the {len(train)} training sequences")
    pick = np.sort(np.random.default_rng(0).choice(len(train), size=num, replace=False))
    return train.subset(pick, num_shards=num_shards)


# -- the student loop ----------------------------------------------------------------------

LossFn = Callable[[torch.Tensor, dict[str, Any]], torch.Tensor]


def train_student(
    module: torch.nn.Module,
    stream: ShardedStream,
    loss_fn: LossFn,
    *,
    steps: int,
    lr: float,
) -> list[float]:
    """The same plain loop for every row: AdamW (weight decay 0.01), linear warm-up over
    5% of ``steps`` then linear decay to 0, gradient norm clipped at 1; epochs of
    ``stream`` until ``steps`` batches. Returns the per-step losses."""
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=0.01)
    warm = max(1, steps // 20)

    def schedule(step: int) -> float:
        return (step + 1) / warm if step < warm else max(0.0, (steps - step) / (steps - warm))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    module.train()
    losses: list[float] = []
    while len(losses) < steps:
        before = len(losses)
        for batch in stream:
            loss = loss_fn(module(batch["inputs"]), batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss.item()} at step {len(losses)}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            if len(losses) == steps:
                break
        if len(losses) == before:
            raise ConfigError("the stream yields no batch; lower --batch-size or raise --records")
    return losses


def _loss(row: Row, args: argparse.Namespace, ensemble: kdcache.TeacherEnsemble) -> LossFn:
    tau, alpha = args.temperature, args.alpha
    if row.name == "hard":
        return lambda logits, b: token_distill_loss(logits, b, temperature=tau, alpha=0.0)
    if row.online:

        def online(logits: torch.Tensor, b: dict[str, Any]) -> torch.Tensor:
            dense_BTV = ensemble.log_probs(b["inputs"], temperature=tau)
            return token_distill_loss(
                logits, {**b, "targets": dense_BTV}, temperature=tau, alpha=alpha
            )

        return online
    return lambda logits, b: token_distill_loss(logits, b, temperature=tau, alpha=alpha)


# -- the run -------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    rows = [r for r in all_rows(args.sample_seed) if r.name in args.rows]
    unknown = sorted(set(args.rows) - {r.name for r in all_rows(args.sample_seed)})
    if unknown:
        names = ", ".join(r.name for r in all_rows(args.sample_seed))
        raise ConfigError(f"--rows names unknown rows {unknown}; the rows are: {names}")
    missing = missing_features()
    blocked = [r.name for r in rows if r.needs_new_kinds]
    if missing and blocked:
        raise ConfigError(
            f"rows {blocked} need what this kdcache does not have yet: {'; '.join(missing)}. "
            "Update kdcache, or leave those rows out with --rows"
        )
    teachers, data, source = _teachers(args)
    ensemble = kdcache.TeacherEnsemble(teachers, rule="mean_probs")
    vocab, val = data["vocab"], data["val"]
    train = _subset(data["train"], args.records, args.num_shards)
    num_tokens = train.num_targets
    # log-probabilities are valid logits: the ensemble's mixture at tau = 1
    teacher_ppl = evaluate_perplexity(
        lambda ids: ensemble.log_probs(ids, temperature=1.0), val, vocab_size=vocab
    )["perplexity"]

    from pipelines import lm_fortunes as lm

    caches: dict[str, Any] = {}
    results: dict[str, dict[str, Any]] = {}
    for row in rows:
        res: dict[str, Any] = {
            "name": row.name,
            "family": row.family,
            "kind": row.kind,
            "params": row.params,
            "storage_dtype": row.storage_dtype if row.kind else None,
            "bytes_per_token": None,
            "build_s": 0.0,
        }
        if row.kind is not None:
            tic = time.perf_counter()
            cache = build_cache(
                train,
                ensemble,
                temperature=args.temperature,
                root=os.path.join(args.scratch, "cache"),
                storage_dtype=row.storage_dtype,
                executor=kdcache.ExecutorConfig(kind="local", batch_size=32),
                kind=row.kind,
                params=row.params,
                progress=False,
            )
            res["build_s"] = time.perf_counter() - tic
            entries = as_view(cache).entries
            for e in entries:
                if e.num_rows != num_tokens:
                    raise AssertionError(f"{row.name}: {e.num_rows} rows for {num_tokens} tokens")
            res["bytes"] = int(sum(e.num_bytes for e in entries))
            res["bytes_per_token"] = res["bytes"] / len(entries) / num_tokens
            res["hit"] = bool(cache.build_report.hit)  # type: ignore[union-attr]
            if "value_bits" in row.params:
                errs = [e.quantization_error() for e in entries]
                res["quant_kl_nats_mean"] = float(np.mean([q["kl_nats_mean"] for q in errs]))
                res["quant_kl_nats_max"] = float(max(q["kl_nats_max"] for q in errs))
            caches[row.name] = cache
        res.update(ppl=[], nll=[], train_s=[], final_loss=[])
        results[row.name] = res

    # seeds outer, rows inner: load from other processes falls on every row alike
    for seed in range(args.seeds):
        for row in rows:
            res = results[row.name]
            order = {"batch_size": args.batch_size, "seed": seed}
            stream = (
                ShardedStream(train, **order)
                if row.kind is None
                else SoftTargetDataset(caches[row.name], train, **order)
            )
            torch.manual_seed(seed)
            module = HFLogits(lm.gpt2(lm.STUDENT, vocab, args.max_len), lm.PAD_ID, vocab)
            tic = time.perf_counter()
            losses = train_student(
                module, stream, _loss(row, args, ensemble), steps=args.steps, lr=args.lr
            )
            res["train_s"].append(time.perf_counter() - tic)
            module.eval()
            with torch.no_grad():
                ev = evaluate_perplexity(module, val, vocab_size=vocab)
            res["ppl"].append(ev["perplexity"])
            res["nll"].append(ev["nll"])
            res["final_loss"].append(float(np.mean(losses[-20:])))
            print(
                f"  seed {seed}: {row.name:18s} ppl {ev['perplexity']:8.2f}  "
                f"train {res['train_s'][-1]:6.1f} s",
                file=sys.stderr,
                flush=True,
            )
    dense = results.get("dense-online")
    for res in results.values():
        if dense is not None:
            # paired by seed: the same initialisation and data order as the reference
            paired = np.array(res["ppl"]) / np.array(dense["ppl"])
            res["paired_over_dense"] = paired.tolist()
            res["paired_over_dense_mean"] = float(paired.mean())
            res["paired_over_dense_std"] = float(paired.std(ddof=1)) if len(paired) > 1 else 0.0
        res["ppl_mean"] = float(np.mean(res["ppl"]))
        res["ppl_std"] = float(np.std(res["ppl"], ddof=1)) if len(res["ppl"]) > 1 else 0.0
        res["train_s_mean"] = float(np.mean(res["train_s"]))
    return {
        "teacher": source,
        "teacher_val_perplexity": teacher_ppl,
        "vocab_size": vocab,
        "records": len(train),
        "target_tokens": num_tokens,
        "validation_tokens": int(sum(len(val.sequence(i)) - 1 for i in range(len(val)))),
        "rows": list(results.values()),
        "wall_s": time.perf_counter() - t0,
    }


# -- report --------------------------------------------------------------------------------


def summarise(report: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The bench's ``{"name", "figures", "ratios"}``."""
    rows = {r["name"]: r for r in report["rows"]}
    figures: dict[str, Any] = {
        k: report[k]
        for k in ("teacher", "teacher_val_perplexity", "vocab_size", "records", "target_tokens")
    }
    figures.update(
        seeds=args.seeds,
        steps=args.steps,
        batch_size=args.batch_size,
        alpha=args.alpha,
        temperature=args.temperature,
        dense_fp32_bytes_per_token=4 * report["vocab_size"],
        wall_s=report["wall_s"],
    )
    for r in report["rows"]:
        key = r["name"].replace("-", "_")
        figures[f"{key}_ppl_mean"] = r["ppl_mean"]
        figures[f"{key}_ppl_std"] = r["ppl_std"]
        figures[f"{key}_train_s"] = r["train_s_mean"]
        if "paired_over_dense_mean" in r:
            figures[f"{key}_paired_ppl_over_dense_kd"] = r["paired_over_dense_mean"]
            figures[f"{key}_paired_ppl_over_dense_kd_std"] = r["paired_over_dense_std"]
        if r["bytes_per_token"] is not None:
            figures[f"{key}_bytes_per_token"] = r["bytes_per_token"]
            figures[f"{key}_build_s"] = r["build_s"]
    named = {
        "sampled_bytes_per_token": ("sampled16-counts", "bytes_per_token"),
        "topk64_bytes_per_token": ("topk64-q8", "bytes_per_token"),
        "topk64_quant_kl_nats": ("topk64-q8", "quant_kl_nats_mean"),
        "topk64_quant_kl_nats_max": ("topk64-q8", "quant_kl_nats_max"),
        "topk64_lossless_bytes_per_token": ("topk64-fp32", "bytes_per_token"),
    }
    for fig, (row, col) in named.items():
        if row in rows:
            figures[fig] = rows[row][col]
    figures["rows"] = report["rows"]
    ratios: dict[str, float] = {}
    dense = rows.get("dense-online")
    if dense is not None:
        if "sampled16-counts" in rows:
            ratios["sampled_ppl_over_dense_kd"] = (
                rows["sampled16-counts"]["ppl_mean"] / dense["ppl_mean"]
            )
        if "sampled16-counts-iid" in rows:
            ratios["sampled_iid_ppl_over_dense_kd"] = (
                rows["sampled16-counts-iid"]["ppl_mean"] / dense["ppl_mean"]
            )
        for r in report["rows"]:
            if r["name"] != "dense-online":
                ratios[f"{r['name'].replace('-', '_')}_ppl_over_dense_kd"] = (
                    r["ppl_mean"] / dense["ppl_mean"]
                )
    if "topk64-fp32" in rows and "sampled16-counts" in rows:
        ratios["topk64_lossless_bytes_over_sampled"] = (
            rows["topk64-fp32"]["bytes_per_token"] / rows["sampled16-counts"]["bytes_per_token"]
        )
    if "topk64-q8" in rows and "sampled16-counts" in rows:
        ratios["topk64_bytes_over_sampled"] = (
            rows["topk64-q8"]["bytes_per_token"] / rows["sampled16-counts"]["bytes_per_token"]
        )
    return {"name": "lm_quality", "figures": figures, "ratios": ratios}


def print_table(report: dict[str, Any], result: dict[str, Any]) -> None:
    dense = next((r for r in report["rows"] if r["name"] == "dense-online"), None)
    header = ["config", "val ppl", "+-sd", "/dense", "/dense paired", "B/token", "quant KL"]
    header += ["build s", "train s"]
    table = [header]
    for r in report["rows"]:
        table.append(
            [
                r["name"],
                f"{r['ppl_mean']:.3f}",
                f"{r['ppl_std']:.3f}",
                "-" if dense is None else f"{r['ppl_mean'] / dense['ppl_mean']:.4f}x",
                "-"
                if dense is None
                else f"{r['paired_over_dense_mean']:.4f} +- {r['paired_over_dense_std']:.4f}",
                "-" if r["bytes_per_token"] is None else f"{r['bytes_per_token']:.1f}",
                f"{r['quant_kl_nats_mean']:.2e}" if "quant_kl_nats_mean" in r else "-",
                f"{r['build_s']:.1f}",
                f"{r['train_s_mean']:.1f}",
            ]
        )
    widths = [max(len(t[i]) for t in table) for i in range(len(header))]
    f = result["figures"]
    print(
        f"teacher(s): {f['teacher']}; ensemble val ppl {f['teacher_val_perplexity']:.2f}; "
        f"V={f['vocab_size']}; {f['records']:,} sequences cached ({f['target_tokens']:,} target "
        f"tokens); {f['seeds']} seed(s) x {f['steps']} steps of {f['batch_size']}; "
        f"alpha {f['alpha']}, tau {f['temperature']}; dense fp32 "
        f"{f['dense_fp32_bytes_per_token']:,} B/token"
    )
    for n, t in enumerate(table):
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(t, widths, strict=True))
            )
        )
        if n == 0:
            print("  ".join("-" * w for w in widths))
    r = result["ratios"]
    if "sampled_ppl_over_dense_kd" in r:
        print(
            f"\ncounts-only sampled cache (16 draws) over dense online KD, val ppl: "
            f"{r['sampled_ppl_over_dense_kd']:.4f}x (goal <= 1.01); paired by seed "
            f"{f['sampled16_counts_paired_ppl_over_dense_kd']:.4f} +- "
            f"{f['sampled16_counts_paired_ppl_over_dense_kd_std']:.4f}"
        )
    if "topk64_bytes_over_sampled" in r:
        lossless = r.get("topk64_lossless_bytes_over_sampled")
        print(
            f"top-64 8-bit over sampled counts (16 draws), bytes/token: "
            f"{r['topk64_bytes_over_sampled']:.2f}x; "
            + ("" if lossless is None else f"top-64 float32 over it: {lossless:.2f}x; ")
            + f"quantisation error of top-64 8-bit {f['topk64_quant_kl_nats']:.2e} "
            "nats/token (mean)"
        )
    print(f"wall {f['wall_s']:.0f} s")


def plot(report: dict[str, Any], path: str) -> None:
    """Validation perplexity (mean, +- sd over seeds) against cache bytes per token, log x."""
    from kdcache.errors import require

    matplotlib = require("matplotlib", "plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    families: dict[str, list[dict[str, Any]]] = {}
    for r in report["rows"]:
        if r["bytes_per_token"] is not None:
            families.setdefault(r["family"], []).append(r)
    for fam, rs in families.items():
        rs = sorted(rs, key=lambda r: r["bytes_per_token"])
        ax.errorbar(
            [r["bytes_per_token"] for r in rs],
            [r["ppl_mean"] for r in rs],
            yerr=[r["ppl_std"] for r in rs],
            marker="o",
            capsize=3,
            label=fam,
        )
        for r in rs:
            ax.annotate(
                r["name"],
                (r["bytes_per_token"], r["ppl_mean"]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
            )
    styles = {"dense-online": ("k", "--"), "hard": ("grey", ":")}
    for r in report["rows"]:
        if r["name"] in styles:
            color, ls = styles[r["name"]]
            ax.axhline(r["ppl_mean"], color=color, ls=ls, lw=1, label=f"{r['family']} (no cache)")
    ax.axvline(
        4 * report["vocab_size"], color="k", lw=0.8, ls="-.", label="dense float32 cache (4V)"
    )
    ax.set_xscale("log")
    ax.set_xlabel("cache bytes per target token (per teacher, log scale)")
    ax.set_ylabel("student validation perplexity")
    ax.set_title(f"fortunes LM, V={report['vocab_size']}: student quality against cache bytes")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="gpt-a trained here (100 steps); rows " + ", ".join(QUICK_ROWS) + "; 2 seeds of "
        "100 steps over 768 sequences (about 3 minutes on 2 cores)",
    )
    p.add_argument("--work-dir", default="runs/lm-fortunes", help="the pipeline's work dir")
    p.add_argument("--teachers", default="gpt-a", help="comma list of the pipeline's teachers")
    p.add_argument(
        "--teacher-steps", type=int, default=None, help="steps of a teacher trained here"
    )
    p.add_argument("--rows", default=None, help="comma list of rows (default: all)")
    p.add_argument("--records", type=int, default=None, help="training sequences cached")
    p.add_argument("--num-shards", type=int, default=4)
    p.add_argument("--seeds", type=int, default=None, help="student seeds (default 3)")
    p.add_argument("--steps", type=int, default=None, help="student steps (default 300)")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per step")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the distillation term")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--sample-seed", type=int, default=0, help="seed of the sampled caches")
    p.add_argument("--max-len", type=int, default=64, help="student positions")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: least noise)")
    p.add_argument("--scratch", default=None, help="caches (and --quick teacher) here, kept")
    p.add_argument("--json", default=None, metavar="PATH")
    p.add_argument("--plot", default=None, metavar="PATH", help="PNG (default: beside --json)")
    args = p.parse_args(argv)
    args.teachers = [t.strip() for t in args.teachers.split(",") if t.strip()]
    if args.quick:
        args.teacher_steps = args.teacher_steps or 100
        args.rows = args.rows or ",".join(QUICK_ROWS)
        args.records = args.records or 768
        args.seeds = args.seeds or 2
        args.steps = args.steps or 100
    args.records = args.records or 4096
    args.seeds = args.seeds or 3
    args.steps = args.steps or 300
    args.rows = (
        [r.name for r in all_rows(args.sample_seed)]
        if args.rows is None
        else [r.strip() for r in args.rows.split(",") if r.strip()]
    )
    if args.seeds < 1 or args.steps < 2:
        raise SystemExit("--seeds must be >= 1 and --steps >= 2")
    torch.set_num_threads(max(1, args.threads))
    keep = args.scratch is not None
    args.scratch = args.scratch or tempfile.mkdtemp(prefix="bench-lm-quality-")
    try:
        report = run(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if not keep:
            shutil.rmtree(args.scratch, ignore_errors=True)
    result = summarise(report, args)
    print_table(report, result)
    png = args.plot or (os.path.splitext(args.json)[0] + ".png" if args.json else None)
    for out in (png, args.json):
        if out:
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if png:
        plot(report, png)
        print(f"plot written to {png}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2, sort_keys=True, default=_json_default)
    return 0


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


if __name__ == "__main__":
    sys.exit(main())
