"""Bytes per token and fidelity of sparse token caches, top-k against sampling, side by side.

On a real causal-LM teacher over real text (the fortunes corpus): for top-k at several k
and sampling at several draw counts, build the cache entry (Arrow, the storage dtype of
the pipeline), measure its bytes per token, read it back and measure the KL between the
full teacher distribution p and the one reconstructed from the cache:

* top-k: kept ids at their exact probabilities, the exact tail mass spread uniformly over
  the V - k ids not kept (the best a reader can do without the tail's shape);
* sampled: the unbiased estimate ``counts / n`` (Anshumann et al. 2025), with the exact
  tail (1 - mass of the drawn ids) spread uniformly over the ids not drawn, so the KL is
  finite.

Both as ``KL(p || p_hat)`` in nats per token, averaged over the evaluation tokens. With
``--students`` a small student is trained from each cache for the same steps and its
validation perplexity reported (slow: minutes).

The teacher is the pipeline's checkpoint when ``--work-dir`` holds one
(``python -m pipelines.lm_fortunes`` writes it); otherwise (and with ``--quick``) a small
one is trained here first.

    python bench/bench_lm_fidelity.py --quick [--json out.json]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import kdcache
from kdcache.build.stage import build_cache
from kdcache.data.tokens import TokenDataset
from kdcache.stream import SoftTargetDataset, read_token_shard
from kdcache.train.evaluate import evaluate_perplexity


def _teacher(args: argparse.Namespace) -> tuple[kdcache.Teacher, dict[str, Any], str]:
    """The pipeline's teacher gpt-a and its data when ``--work-dir`` has them (and not
    ``--quick``); else a small gpt-a trained here on the ``--quick`` data."""
    from pipelines import lm_fortunes as lm

    found = sorted(glob.glob(os.path.join(args.work_dir, "teachers", "gpt-a-*", "config.json")))
    if found and not args.quick:
        path = os.path.dirname(found[-1])
        settings = lm.parse_args(["--work-dir", args.work_dir, "--no-progress"])
        data = lm.prepare_data(settings)  # reuses the pipeline's tokenizer
        source = f"pipeline checkpoint {os.path.basename(path)}"
    else:
        work = tempfile.mkdtemp(prefix="bench-lm-")
        steps = str(args.teacher_steps)
        settings = lm.parse_args(
            ["--work-dir", work, "--quick", "--teacher-steps", steps, "--no-progress"]
        )
        data = lm.prepare_data(settings)
        path = lm.train_or_load_teacher(lm.TEACHERS[0], data, settings)
        source = f"gpt-a trained here ({args.teacher_steps} steps, --quick data)"
    return kdcache.Teacher.from_hf(path, task="causal-lm", name="gpt-a"), data, source


def teacher_log_probs(
    teacher: kdcache.Teacher, dataset: TokenDataset, temperature: float
) -> list[torch.Tensor]:
    """float64 [L - 1, V] full teacher log-probabilities at tau per sequence, in order."""
    out = []
    for i in range(len(dataset)):
        seq = torch.from_numpy(dataset.sequence(i).astype(np.int64))[None]
        z = teacher.logits(seq)[0, :-1]
        out.append(torch.log_softmax(z.double() / temperature, dim=-1))
    return out


def reconstruct_kl(
    entry: Any, dataset: TokenDataset, full: list[torch.Tensor]
) -> tuple[float, float]:
    """(mean KL(p || p_hat) in nats per token, mean kept ids per token), p_hat rebuilt
    from the entry: kept ids at their stored probability (top-k: exact; sampled: the
    estimate ``counts / n`` scaled by the stored 1 - tail), the stored exact tail mass
    spread uniformly over the ids not kept."""
    total, count, kept_ids = 0.0, 0, 0
    seq = 0
    for i in range(dataset.num_shards):
        shard = read_token_shard(entry, i, dataset)
        for j in range(len(shard.sample_ids)):
            logp = full[seq]
            seq += 1
            rows = shard.targets.rows(
                slice(int(shard.row_offsets[j]), int(shard.row_offsets[j + 1]))
            )
            vocab = logp.shape[1]
            valid = rows.valid_BS
            ids = rows.ids_BS.clamp(min=0)
            tail = rows.tail_log_mass().double().exp()
            if rows.kind == "sampled":
                est = rows.estimate_log_probs().double().exp() * (1.0 - tail)[:, None]
            else:
                est = rows.log_probs().double().exp()
            est = est.masked_fill(~valid, 0.0)
            num_out = (vocab - valid.sum(dim=1)).clamp(min=1).double()
            phat = (tail / num_out)[:, None].expand(-1, vocab).clone()
            phat.scatter_(1, ids, torch.where(valid, est, phat.gather(1, ids)))
            kl = (logp.exp() * (logp - torch.log(phat.clamp(min=1e-300)))).sum(dim=1)
            total += float(kl.sum())
            count += int(kl.numel())
            kept_ids += int(valid.sum())
    return total / max(count, 1), kept_ids / max(count, 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small teacher trained here (~2 min)")
    p.add_argument("--work-dir", default="runs/lm-fortunes", help="the pipeline's work dir")
    p.add_argument("--records", type=int, default=400, help="records cached and evaluated")
    p.add_argument("--ks", default="1,4,16,64")
    p.add_argument("--samples", default="4,16,64")
    p.add_argument("--teacher-steps", type=int, default=60)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--storage-dtype", default="float16")
    p.add_argument("--students", action="store_true", help="also train a student per cache")
    p.add_argument("--student-steps", type=int, default=60)
    p.add_argument("--json", default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # fastest on a shared 2-core machine (see pipelines.lm_fortunes)
    if args.quick:
        args.records = min(args.records, 200)
        args.teacher_steps = min(args.teacher_steps, 40)

    t0 = time.perf_counter()
    teacher, data, source = _teacher(args)
    train = data["train"]
    eval_set = train.subset(np.arange(min(args.records, len(train))), num_shards=2)
    root = tempfile.mkdtemp(prefix="bench-lm-cache-")
    configs = [("topk", {"k": int(k)}, f"top-k k={k}") for k in args.ks.split(",")]
    configs += [
        ("sampled", {"num_samples": int(n), "seed": 0}, f"sampled n={n}")
        for n in args.samples.split(",")
    ]
    full = teacher_log_probs(teacher, eval_set, args.temperature)
    rows: list[dict[str, Any]] = []
    for kind, params, label in configs:
        tic = time.perf_counter()
        entry = build_cache(
            eval_set,
            teacher,
            temperature=args.temperature,
            root=root,
            storage_dtype=args.storage_dtype,
            executor=kdcache.ExecutorConfig(kind="local", batch_size=32),
            kind=kind,
            params=params,
            progress=False,
        )
        build_s = time.perf_counter() - tic
        kl, ids_per_token = reconstruct_kl(entry, eval_set, full)
        row = {
            "cache": label,
            "kind": kind,
            **params,
            "bytes_per_token": entry.num_bytes / max(entry.num_rows, 1),
            "ids_per_token": ids_per_token,
            "kl_nats_per_token": kl,
            "build_s": build_s,
        }
        if args.students:
            row["student_val_perplexity"] = _student_ppl(args, entry, eval_set, data)
        rows.append(row)
    vocab = data["vocab"]
    dense = 4 * vocab + 8
    print(
        f"teacher: {source}; {eval_set.num_targets:,} tokens of {len(eval_set)} records; "
        f"V={vocab}; tau={args.temperature}; values {args.storage_dtype}; dense fp32 "
        f"{dense:,} B/token"
    )
    header = ["cache", "B/token", "ids/token", "x smaller", "KL(p||p_hat) nats"]
    if args.students:
        header.append("student ppl")
    table = [header]
    for r in rows:
        line = [
            r["cache"],
            f"{r['bytes_per_token']:.1f}",
            f"{r['ids_per_token']:.1f}",
            f"{dense / r['bytes_per_token']:.0f}",
            f"{r['kl_nats_per_token']:.4f}",
        ]
        if args.students:
            line.append(f"{r['student_val_perplexity']:.2f}")
        table.append(line)
    widths = [max(len(t[i]) for t in table) for i in range(len(header))]
    for n, t in enumerate(table):
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(t, widths, strict=True))
            )
        )
        if n == 0:
            print("  ".join("-" * w for w in widths))
    print(f"wall {time.perf_counter() - t0:.1f} s")
    if args.json:
        ratios = {
            f"dense_over_{r['cache'].replace(' ', '_')}": dense / r["bytes_per_token"] for r in rows
        }
        with open(args.json, "w") as f:
            json.dump(
                {
                    "name": "bench_lm_fidelity",
                    "figures": {"teacher": source, "vocab_size": vocab, "rows": rows},
                    "ratios": ratios,
                },
                f,
                indent=2,
            )
    return 0


def _student_ppl(args: argparse.Namespace, entry: Any, dataset: TokenDataset, data: Any) -> float:
    from kdcache.losses.kd import token_distill_loss
    from kdcache.teachers.loaders import HFLogits
    from kdcache.train.loop import train_student
    from pipelines import lm_fortunes as lm

    torch.manual_seed(0)
    module = HFLogits(lm.gpt2(lm.STUDENT, data["vocab"], 128), lm.PAD_ID, data["vocab"])
    stream = SoftTargetDataset(entry, dataset, batch_size=16, seed=0)
    module, _ = train_student(
        module,
        stream,
        lambda logits, b: token_distill_loss(logits, b, temperature=args.temperature, alpha=0.5),
        ds_config=lm.ds_config(3e-3, 16, args.student_steps),
        max_steps=args.student_steps,
        progress=False,
    )
    return evaluate_perplexity(module, data["val"], vocab_size=data["vocab"])["perplexity"]


if __name__ == "__main__":
    sys.exit(main())
