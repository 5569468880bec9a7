"""The student's report: int8 export, side-by-side inference throughputs and loss curves."""

from __future__ import annotations

import logging
import math
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from kdcache.train.evaluate import evaluate_classifier
from kdcache.train.export import _file_bytes

log = logging.getLogger(__name__)


def quantize_int8(module: torch.nn.Module) -> torch.nn.Module:
    """An int8 dynamically quantized copy of ``module`` for CPU inference.

    ``nn.Linear`` layers get int8 weights (per-tensor scale) and quantize their
    activations on the fly; everything else stays float32. The input module is unchanged.

    torch 2.13 still ships ``torch.ao.quantization.quantize_dynamic`` but marks all of
    ``torch.ao.quantization`` deprecated in favour of the separate ``torchao`` package
    (``torchao.quantization.quantize_``). kdcache uses PyTorch's own API, which needs no
    extra package, and silences that deprecation warning here on purpose (and the
    warning about quantized-tensor constructors it triggers inside torch).

    Returns:
        The quantized module, in eval mode (its ``state_dict`` holds packed int8 weights;
        save it with ``torch.save``).

    Source: Jacob et al., "Quantization and Training of Neural Networks for Efficient
    Integer-Arithmetic-Only Inference", CVPR 2018 (affine int8 quantization).
    """
    import copy
    import warnings

    float_copy = copy.deepcopy(module).float().eval()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization is deprecated.*")
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        warnings.filterwarnings("ignore", message=".*torch.quantize_per_tensor.*")
        return torch.ao.quantization.quantize_dynamic(
            float_copy, {torch.nn.Linear}, dtype=torch.qint8
        )


def throughputs(
    fns: list[Callable[[Any], Any]],
    inputs: Any,
    repeats: int = 5,
    min_round_s: float = 0.25,
) -> list[float]:
    """Inference samples per second of each ``fn(inputs)``, measured side by side.

    Each function is first calibrated to a number of calls that lasts at least
    ``min_round_s`` (a tiny student scores 10,000 images in milliseconds, too short to time
    alone); then the functions are timed in interleaved rounds, so noise from the machine
    hits all of them alike, and each keeps its median round.

    Args:
        fns: Callables taking the whole batch (anything with ``len`` and slicing, such as
            a tensor or array [N, ...]).
        inputs: The batch.
        repeats: Timed rounds.
        min_round_s: Least duration of one function's round, seconds.

    Returns:
        Samples per second, one per function.
    """
    calls = []
    with torch.inference_mode():
        for fn in fns:
            fn(inputs[: max(1, min(1000, len(inputs) // 10))])  # warm-up
            t = time.perf_counter()
            fn(inputs)
            once = max(time.perf_counter() - t, 1e-6)
            calls.append(max(1, math.ceil(min_round_s / once)))
        rounds: list[list[float]] = [[] for _ in fns]
        for _ in range(repeats):
            for i, fn in enumerate(fns):
                t = time.perf_counter()
                for _ in range(calls[i]):
                    fn(inputs)
                rounds[i].append((time.perf_counter() - t) / calls[i])
    return [len(inputs) / statistics.median(r) for r in rounds]


def plot_curves(
    runs: dict[str, dict[str, list[tuple[int, float]]]], path: str, title: str = ""
) -> str | None:
    """Training loss, learning rate and eval metrics against step, one line per run, as
    a PNG: one panel per metric, the learning rate (``train/lr``, when logged) beside the
    loss.

    Args:
        runs: ``{label: {metric name: [(step, value), ...]}}`` (as :func:`read_metrics`).
        path: Output PNG.
        title: Figure title.

    Returns:
        ``path``, or None when matplotlib is missing (logged; extra ``plot``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plot (pip install 'kdcache[plot]')")
        return None
    logged = {n for m in runs.values() for n in m}
    names = [
        "train/loss",
        *(["train/lr"] if "train/lr" in logged else []),
        *sorted(n for n in logged if n.startswith("eval/")),
    ]
    fig, axes = plt.subplots(1, len(names), figsize=(4.8 * len(names), 3.8), dpi=110)
    axes = [axes] if len(names) == 1 else list(axes)
    for ax, name in zip(axes, names, strict=True):
        for label, metrics in runs.items():
            points = metrics.get(name)
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(
                    steps,
                    values,
                    marker="o" if name.startswith("eval/") else None,
                    markersize=3,
                    label=label,
                )
        ax.set_xlabel("optimizer step")
        ax.set_title(name)
        if name == "train/lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _report_int8(
    student: torch.nn.Module, eval_data: Any, out: str, float_path: str
) -> dict[str, Any]:
    """Export the int8 student and measure both side by side: accuracy, bytes, samples/s."""
    quantized = quantize_int8(student)
    qpath = os.path.join(out, "student-int8.pt")
    torch.save(quantized.state_dict(), qpath)
    report: dict[str, Any] = {
        "path": qpath,
        "float_bytes": _file_bytes(float_path),
        "int8_bytes": _file_bytes(qpath),
    }
    if eval_data is not None:
        report["float_accuracy"] = evaluate_classifier(student, eval_data)["accuracy"]
        report["int8_accuracy"] = evaluate_classifier(quantized, eval_data)["accuracy"]
        cols = eval_data.read_shard(0)
        inputs = torch.from_numpy(np.array(cols["inputs"]))
        fp, q8 = throughputs([student, quantized], inputs)
        report["float_samples_per_s"], report["int8_samples_per_s"] = fp, q8
    log.info("int8 student: %s", report)
    return report
