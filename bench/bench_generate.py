"""Teacher generation for sequence-level distillation: the key/value cache against
recomputing the whole prefix at every step.

Side by side in one process, on the same teacher and prompts: ``generate_continuations``
given a Hugging Face causal-LM teacher (``Teacher.from_hf``: one prefill, then one token
per step with the key/value cache) against the same call given the teacher's ``logits``
function (the no-cache fallback, which reruns the full padded batch each step: O(T^2)).
The teacher is a small GPT-2 with random weights, saved and loaded like the LM
pipeline's teachers (default 4 layers, width 128, V = 2048); the prompts are 64 tokens
(the shorter ones down to 3/4 of that, so the cached path pads), continued by 64 greedy
tokens. Both paths must write the same tokens; the script checks it. Times are the best
of n rounds, the two cases interleaved within each round, on one CPU thread by default.

    python bench/bench_generate.py --quick            # under a minute on 2 cores
    python bench/bench_generate.py --json out.json    # {"name", "figures", "ratios"}

Names in ``--json``: ``ratios.kv_speed_over_recompute`` (time without the cache over
time with it; > 1 is a speed-up) and ``figures.identical`` (1.0 when both paths wrote the
same tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kdcache import Teacher, quiet
from kdcache.data.tokens import TokenDataset
from kdcache.errors import require
from kdcache.teachers.generate import generate_continuations


def make_teacher(directory: str, *, layers: int, width: int, vocab: int, context: int) -> Teacher:
    transformers = require("transformers", "hf")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=vocab,
        n_positions=context,
        n_embd=width,
        n_layer=layers,
        n_head=max(1, width // 32),
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
        activation_function="gelu",
    )
    with quiet.hf_loading():  # no weight-writing bar either
        transformers.GPT2LMHeadModel(cfg).save_pretrained(directory)
    return Teacher.from_hf(directory, task="causal-lm", name="gpt2-bench")


def make_prompts(num: int, tokens: int, vocab: int, seed: int) -> TokenDataset:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(max(2, (3 * tokens) // 4), tokens + 1, size=num)
    lengths[0] = tokens
    seqs = [rng.integers(2, vocab, size=int(n)) for n in lengths]
    return TokenDataset.from_sequences(np.arange(num), seqs, num_shards=1, pad_token_id=0)


def best_s(cases: dict[str, Callable[[], TokenDataset]], repeats: int) -> dict[str, float]:
    """Best-of-n seconds per case, interleaved round by round (noise only adds time)."""
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return {name: min(v) for name, v in samples.items()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer prompts and rounds (< 1 min)")
    ap.add_argument("--prompts", type=int, default=None, help="prompts (default 32, quick 16)")
    ap.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    ap.add_argument("--prompt-tokens", type=int, default=64, help="longest prompt")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens generated per prompt")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=None, help="rounds (default 5, quick 3)")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: steadier ratios)"
    )
    ap.add_argument("--json", default=None, metavar="PATH")
    args = ap.parse_args(argv)
    num_prompts = args.prompts or (16 if args.quick else 32)
    repeats = args.repeats or (3 if args.quick else 5)
    torch.set_num_threads(args.threads)
    prompts = make_prompts(num_prompts, args.prompt_tokens, args.vocab, seed=0)
    kw = dict(max_new_tokens=args.new_tokens, greedy=True, batch_size=args.batch_size)

    with tempfile.TemporaryDirectory() as directory:
        teacher = make_teacher(
            directory,
            layers=args.layers,
            width=args.width,
            vocab=args.vocab,
            context=args.prompt_tokens + args.new_tokens,
        )
        cases: dict[str, Callable[[], TokenDataset]] = {
            "kv cache": lambda: generate_continuations([teacher], prompts, **kw),
            "recompute": lambda: generate_continuations([teacher.logits], prompts, **kw),
        }
        outputs = {name: fn() for name, fn in cases.items()}  # warm-up, and the check
        seconds = best_s(cases, repeats)

    a, b = outputs["kv cache"], outputs["recompute"]
    identical = bool(
        np.array_equal(a.lengths, b.lengths)
        and all(np.array_equal(a.sequence(i), b.sequence(i)) for i in range(len(a)))
    )
    new_tokens = int((a.lengths - a.prompt_lengths).sum())
    figures: dict[str, float] = {"identical": float(identical), "new_tokens": float(new_tokens)}
    for name, s in seconds.items():
        key = name.replace(" ", "_")
        figures[f"{key}/seconds"] = round(s, 4)
        figures[f"{key}/new_tokens_per_s"] = round(new_tokens / s, 1)
    ratios = {"kv_speed_over_recompute": round(seconds["recompute"] / seconds["kv cache"], 3)}

    print(
        f"bench_generate: GPT-2 {args.layers} layers, width {args.width}, V={args.vocab}; "
        f"{num_prompts} prompts of <= {args.prompt_tokens} tokens + {args.new_tokens} new "
        f"(greedy), batch {args.batch_size}, threads={torch.get_num_threads()}, "
        f"best of {repeats}"
    )
    header = f"{'case':<12} {'seconds':>9} {'new tok/s':>10}"
    print(header)
    print("-" * len(header))
    for name, s in seconds.items():
        print(f"{name:<12} {s:>9.3f} {new_tokens / s:>10.1f}")
    print(f"same tokens: {'yes' if identical else 'NO'}")
    for name, value in ratios.items():
        print(f"  {name:28s} {value:7.3f}")
    result = {"name": "generate", "figures": figures, "ratios": ratios}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2, sort_keys=True)
    if not identical:
        raise SystemExit("the cached and recomputed continuations differ")
    return result


if __name__ == "__main__":
    main()
