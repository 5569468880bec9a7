"""Sparse distillation losses against the dense loss: forward+backward time and peak memory.

Side by side in one process, on the same batch of student logits: the dense forward-KL
loss (teacher log-probabilities [N, V]) against the sparse losses on top-k (k = 64, exact
tail bucket) and sampled (64 draws) targets of the same teacher, for V = 32k and 128k.
Targets are built before timing (in training they are read from the cache). Times are
the best of n rounds, the cases interleaved within each round, on one CPU thread by
default, so that load from other processes hits every case alike.

Next to those, ``kd_loss`` itself against the plain-torch expression of the same value,
``F.kl_div(log_softmax(s / tau), log_softmax(t / tau), log_target=True,
reduction="batchmean") * tau^2 * alpha + (1 - alpha) * F.cross_entropy(s, y)``, forward and
backward (the teacher's log-probabilities made once, outside the timing, for both), at the
classifier shape of ``bench_student.py`` (256 rows x 10 classes, tau = 4, alpha = 0.9:
``ratios.kd_loss_over_torch``) and at a language-model shape (4,096 rows x 2,048
vocabulary: ``ratios.kd_loss_over_torch_lm``); the goal is <= 1.1. Each timing of the
small shape is the mean of a burst of calls (one call is ~0.2 ms).

Peak memory is the extra resident memory a loss needs (forward and backward, including
the [N, V] gradient), measured on CPU from the kernel's resident high-water mark (reset
through /proc/self/clear_refs, with glibc's mmap threshold pinned so freed buffers go
back to the system), or from the CUDA allocator with ``--device cuda``.

    python bench/bench_losses.py --quick            # about a minute on 2 cores
    python bench/bench_losses.py --json out.json    # {"name", "figures", "ratios"}
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kdcache import losses, targets


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _pin_malloc() -> bool:
    """Make glibc return large freed buffers to the OS so the RSS high-water mark is honest."""
    libc = _libc()
    if libc is None:
        return False
    libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: fixed, so no dynamic growth
    libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
    return True


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_mib(fn: Callable[[], None], device: str) -> float:
    """Extra memory (MiB) at the peak of one call of fn, above what was resident before."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)  # free heap pages left over from earlier cases leave the RSS
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset the peak resident set size (Linux >= 4.0)
    except OSError:
        return float("nan")
    base = _rss_kib("VmRSS")
    fn()
    return (_rss_kib("VmHWM") - base) / 1024


def time_ms(cases: dict[str, Callable[[], None]], repeats: int, device: str) -> dict[str, float]:
    """Best-of-n ms per case, the cases interleaved round by round so drift hits all alike.

    The minimum, not the median: on a shared machine the noise only ever adds time.
    """
    for fn in cases.values():
        fn()  # warm-up
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            samples[name].append((time.perf_counter() - t0) * 1e3)
    return {name: min(v) for name, v in samples.items()}


def make_cases(num_rows: int, vocab: int, k: int, device: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    tau = 2.0
    teacher_scaled = (torch.randn(num_rows, vocab, generator=g) * 3.0 / tau).to(device)
    student = (torch.randn(num_rows, vocab, generator=g) * 2.0).to(device).requires_grad_()
    dense = targets.log_probs(teacher_scaled)
    topk = targets.topk_targets(teacher_scaled.cpu(), k)
    sampled = targets.sampled_targets(teacher_scaled.cpu(), k, generator=g)
    del teacher_scaled

    def run(teacher, divergence="forward_kl"):
        def fn() -> None:
            student.grad = None
            loss = losses.kd_loss(student, teacher, temperature=tau, divergence=divergence)
            loss.backward()
            student.grad = None

        return fn

    return {
        "dense forward_kl": run(dense),
        "top-k forward_kl": run(topk),
        "top-k jsd": run(topk, "jsd"),
        "sampled forward_kl": run(sampled),
    }


#: (name, rows, classes, calls per timing) of the kd_loss-over-torch comparison.
TORCH_SHAPES = (("kd_loss_over_torch", 256, 10, 50), ("kd_loss_over_torch_lm", 4096, 2048, 1))
TORCH_TAU, TORCH_ALPHA = 4.0, 0.9


def torch_cases(num_rows: int, vocab: int, calls: int, device: str, seed: int):
    """kd_loss and the plain-torch expression of the same value, forward and backward.

    Returns ({"kd_loss": fn, "torch": fn}, (kd_loss value, torch value)); each fn runs
    ``calls`` forward+backward passes.
    """
    F = torch.nn.functional
    g = torch.Generator().manual_seed(seed)
    tau, alpha = TORCH_TAU, TORCH_ALPHA
    teacher_logits = (torch.randn(num_rows, vocab, generator=g) * 3.0).to(device)
    student = (torch.randn(num_rows, vocab, generator=g) * 2.0).to(device).requires_grad_()
    labels = torch.randint(0, vocab, (num_rows,), generator=g).to(device)
    teacher = targets.log_probs(teacher_logits / tau)  # what the cache holds

    def ours() -> torch.Tensor:
        return losses.kd_loss(student, teacher, temperature=tau, alpha=alpha, labels_B=labels)

    def plain() -> torch.Tensor:
        # the teacher's log-probabilities as they come from the cache, for both sides
        kl = F.kl_div(
            F.log_softmax(student / tau, dim=-1), teacher, log_target=True, reduction="batchmean"
        )
        return kl * tau**2 * alpha + (1 - alpha) * F.cross_entropy(student, labels)

    def timed(loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def fn() -> None:
            for _ in range(calls):
                student.grad = None
                loss_fn().backward()
            student.grad = None

        return fn

    values = (float(ours().detach()), float(plain().detach()))
    return {"kd_loss": timed(ours), "torch": timed(plain)}, values


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer rows and repeats (< 1 min)")
    ap.add_argument(
        "--rows", type=int, default=None, help="N = B * T rows (default 1024, quick 256)"
    )
    ap.add_argument("--vocab", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: steadier ratios)"
    )
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--json", default=None, metavar="PATH")
    args = ap.parse_args(argv)
    num_rows = args.rows or (256 if args.quick else 1024)
    repeats = args.repeats or (5 if args.quick else 7)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    # Times first, with the allocator as training would see it; then memory, with glibc's
    # mmap threshold pinned so that freed buffers leave the resident set.
    figures: dict[str, float] = {}
    ratios: dict[str, float] = {}
    torch_rows = []
    for key, rows, vocab, calls in TORCH_SHAPES:
        cases, (ours_value, plain_value) = torch_cases(rows, vocab, calls, args.device, seed=rows)
        if abs(ours_value - plain_value) > 1e-5 * abs(plain_value):
            raise AssertionError(
                f"kd_loss {ours_value} and the torch expression {plain_value} differ at "
                f"{rows}x{vocab}: the comparison is of two different losses"
            )
        ms = time_ms(cases, max(repeats, 7) * (3 if calls > 1 else 1), args.device)
        per_call = {name: v / calls for name, v in ms.items()}
        ratios[key] = round(per_call["kd_loss"] / per_call["torch"], 3)
        for name, v in per_call.items():
            figures[f"{key}/{rows}x{vocab}/{name}_ms"] = round(v, 4)
        torch_rows.append((key, rows, vocab, per_call, ours_value, plain_value))
        del cases
        gc.collect()
    times = {}
    for vocab in args.vocab:
        times[vocab] = time_ms(
            make_cases(num_rows, vocab, args.k, args.device, vocab), repeats, args.device
        )
        gc.collect()
    pinned = _pin_malloc() if args.device == "cpu" else True

    rows_out = []
    for vocab in args.vocab:
        cases = make_cases(num_rows, vocab, args.k, args.device, seed=vocab)
        measured = {}
        for name, fn in cases.items():
            fn()  # warm-up under the pinned allocator
            ms, mib = times[vocab][name], peak_extra_mib(fn, args.device)
            measured[name] = (ms, mib)
            key = f"V{vocab}/{name.replace(' ', '_')}"
            figures[f"{key}/time_ms"] = round(ms, 3)
            figures[f"{key}/peak_extra_mib"] = round(mib, 1)
        dense_ms, dense_mib = measured["dense forward_kl"]
        for name, (ms, mib) in measured.items():
            t_ratio, m_ratio = ms / dense_ms, mib / dense_mib if dense_mib > 0 else float("nan")
            if name != "dense forward_kl":
                key = f"V{vocab}/{name.replace(' ', '_')}"
                ratios[f"{key}/time_vs_dense"] = round(t_ratio, 3)
                ratios[f"{key}/peak_mem_vs_dense"] = round(m_ratio, 3)
            rows_out.append((vocab, name, ms, mib, t_ratio, m_ratio))
        del cases
        gc.collect()

    print(
        f"bench_losses: N={num_rows} rows, k={args.k}, fp32 student, device={args.device}, "
        f"threads={torch.get_num_threads()}, best of {repeats}"
        + ("" if pinned else " (malloc not pinned: memory figures approximate)")
    )
    header = (
        f"{'V':>7}  {'loss':<20} {'fwd+bwd ms':>11} {'peak MiB':>9} "
        f"{'time/dense':>11} {'mem/dense':>10}"
    )
    print(header)
    print("-" * len(header))
    for vocab, name, ms, mib, tr, mr in rows_out:
        print(f"{vocab:>7}  {name:<20} {ms:>11.1f} {mib:>9.1f} {tr:>11.3f} {mr:>10.3f}")
    print()
    header = (
        f"{'shape':>11}  {'kd_loss ms':>11} {'torch ms':>10} {'kd_loss/torch':>14}  "
        f"{'values (kd_loss, torch)'}"
    )
    print(header)
    print("-" * len(header))
    for key, rows, vocab, per_call, ours_value, plain_value in torch_rows:
        shape = f"{rows}x{vocab}"
        print(
            f"{shape:>11}  {per_call['kd_loss']:>11.4f} {per_call['torch']:>10.4f} "
            f"{ratios[key]:>14.3f}  ({ours_value:.6f}, {plain_value:.6f})  {key}"
        )
    result = {"name": "bench_losses", "figures": figures, "ratios": ratios}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2, sort_keys=True)
    return result


if __name__ == "__main__":
    main()
