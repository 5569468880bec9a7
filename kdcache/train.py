"""The student stage: a DeepSpeed engine trained from a stream of batches.

The user's DeepSpeed config (a dict or JSON file) is passed to ``deepspeed.initialize``
untouched; kdcache only fills ``train_micro_batch_size_per_gpu`` when it is absent. On a
machine without CUDA, DeepSpeed runs with its CPU accelerator and the gloo backend
(set ``DS_ACCELERATOR=cpu`` and use ``"torch_adam": true`` in the optimizer params).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kdcache.errors import ConfigError, require

log = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_distributed() -> tuple[int, int]:
    """Initialise torch.distributed for DeepSpeed, also for a plain single-process run.

    Launchers (``deepspeed``, ``torchrun``, Ray Train) set RANK/WORLD_SIZE/MASTER_*; when
    they are absent this is a single rank on 127.0.0.1. Without CUDA the CPU accelerator
    and the gloo backend are used.

    Returns:
        ``(rank, world_size)``.

    Raises:
        MissingDependencyError: DeepSpeed is not installed (extra ``deepspeed``).
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    deepspeed = require("deepspeed", "deepspeed")
    if not torch.distributed.is_initialized():
        for k, v in (
            ("RANK", "0"),
            ("LOCAL_RANK", "0"),
            ("WORLD_SIZE", "1"),
            ("MASTER_ADDR", "127.0.0.1"),
        ):
            os.environ.setdefault(k, v)
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def load_ds_config(ds_config: dict[str, Any] | str) -> dict[str, Any]:
    """A DeepSpeed config from a dict or a JSON file path (returned as a new dict).

    Raises:
        ConfigError: the file does not exist or is not JSON.
    """
    if isinstance(ds_config, dict):
        return json.loads(json.dumps(ds_config))
    try:
        with open(ds_config) as f:
            return dict(json.load(f))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read DeepSpeed config {ds_config}: {exc}") from exc


def cpu_ds_config(lr: float = 1e-3, micro_batch_size: int = 128) -> dict[str, Any]:
    """A minimal DeepSpeed config that runs on the CPU (gloo, torch Adam, fp32)."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": lr, "weight_decay": 0.0, "torch_adam": True},
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def prepare_ds_config(
    ds_config: dict[str, Any] | str, *, micro_batch_size: int, total_steps: int
) -> dict[str, Any]:
    """The user's DeepSpeed config with only the values kdcache owns filled in.

    Everything the user wrote passes through untouched. Filled when absent or ``"auto"``:
    ``train_micro_batch_size_per_gpu`` (the stream's per-rank batch) and, for the
    schedulers that need it (``WarmupDecayLR``, ``WarmupCosineLR``), the scheduler's
    ``total_num_steps`` (optimizer steps of the whole run, from the manifest's row
    count, the epochs and the batch).

    Args:
        ds_config: Dict or JSON path.
        micro_batch_size: Rows per rank per micro-step.
        total_steps: Optimizer steps of the run.

    Returns:
        A new dict.

    Raises:
        ConfigError: the file cannot be read, or the config sets a micro-batch that
            differs from the stream's.
    """
    config = load_ds_config(ds_config)
    micro = config.get("train_micro_batch_size_per_gpu", "auto")
    if micro == "auto":
        config["train_micro_batch_size_per_gpu"] = micro_batch_size
    elif int(micro) != micro_batch_size:
        raise ConfigError(
            f"the DeepSpeed config sets train_micro_batch_size_per_gpu={micro}, but the stream "
            f"gives each rank {micro_batch_size} rows per micro-step; remove the key (kdcache "
            "fills it) or make the batch sizes agree"
        )
    scheduler = config.get("scheduler")
    if isinstance(scheduler, dict) and scheduler.get("type") in TOTAL_STEP_SCHEDULERS:
        params = scheduler.setdefault("params", {})
        if params.get("total_num_steps", "auto") == "auto":
            params["total_num_steps"] = int(total_steps)
            log.info("DeepSpeed scheduler %s: total_num_steps=%d", scheduler["type"], total_steps)
    return config


#: DeepSpeed schedulers whose ``total_num_steps`` kdcache fills when the config leaves it.
TOTAL_STEP_SCHEDULERS = ("WarmupDecayLR", "WarmupCosineLR")


@dataclass
class TrainResult:
    """What a training run did.

    Attributes:
        steps: Optimizer steps done, counting those before a resume.
        start_step: Optimizer steps already done when this call started (0 unless resumed).
        samples: Samples seen by this rank in this call.
        wall_s: Wall time of this call's loop, seconds.
        losses: Loss per optimizer step of this call (this rank's last micro-batch).
        evals: ``(step, metrics)`` for each evaluation (also those before a resume).
        state_dict: The trained weights as float32 CPU tensors (gathered under ZeRO-3),
            on every rank.
    """

    steps: int = 0
    start_step: int = 0
    samples: int = 0
    wall_s: float = 0.0
    losses: list[float] = field(default_factory=list)
    evals: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    state_dict: dict[str, torch.Tensor] = field(default_factory=dict)


class MetricsLogger:
    """Metrics to ``metrics.csv`` (``step,name,value`` rows) and, when the ``tensorboard``
    package is installed, to TensorBoard event files. Only rank 0 writes.

    Args:
        directory: Output directory (created).
        rank: This rank; ranks other than 0 write nothing.
        tensorboard: Also write TensorBoard events (warns once and goes on with CSV only
            when ``tensorboard`` is missing: ``pip install 'kdcache[tensorboard]'``).
        resume_from_step: On a resumed run, rows after this step (written after the
            checkpoint the run resumes from) are dropped, so the CSV has each step once.
    """

    def __init__(
        self,
        directory: str,
        *,
        rank: int = 0,
        tensorboard: bool = True,
        resume_from_step: int | None = None,
    ) -> None:
        self.path = os.path.join(directory, "metrics.csv")
        self.active = rank == 0
        self._tb: Any = None
        if not self.active:
            return
        os.makedirs(directory, exist_ok=True)
        if resume_from_step is not None and os.path.exists(self.path):
            with open(self.path) as f:
                rows = f.read().splitlines()
            kept = [r for r in rows[1:] if int(r.split(",", 1)[0]) <= resume_from_step]
            with open(self.path, "w") as f:
                f.write("\n".join([rows[0], *kept]) + "\n")
        elif not os.path.exists(self.path) or resume_from_step is None:
            with open(self.path, "w") as f:
                f.write("step,name,value\n")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.warning(
                    "tensorboard is not installed: metrics go to %s only "
                    "(pip install 'kdcache[tensorboard]')",
                    self.path,
                )
            else:
                self._tb = SummaryWriter(os.path.join(directory, "tensorboard"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Record ``metrics`` at optimizer step ``step``."""
        if not self.active:
            return
        with open(self.path, "a") as f:
            for name, value in metrics.items():
                f.write(f"{step},{name},{float(value)!r}\n")
        if self._tb is not None:
            for name, value in metrics.items():
                self._tb.add_scalar(name, float(value), step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(path: str) -> dict[str, list[tuple[int, float]]]:
    """``metrics.csv`` as ``{name: [(step, value), ...]}``."""
    out: dict[str, list[tuple[int, float]]] = {}
    with open(path) as f:
        next(f)
        for line in f:
            step, name, value = line.rstrip("\n").split(",")
            out.setdefault(name, []).append((int(step), float(value)))
    return out


def _mean_over_ranks(value: float, world: int) -> float:
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return float(t.item()) / world


def _gathered_state(engine: Any) -> dict[str, torch.Tensor]:
    """The module's weights as float32 CPU tensors, gathered first under ZeRO-3."""
    module = engine.module
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    else:
        state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def train_student(
    model: torch.nn.Module,
    stream: Iterable[dict[str, torch.Tensor]],
    loss_fn: LossFn,
    *,
    ds_config: dict[str, Any] | str,
    max_steps: int,
    eval_fn: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    eval_every: int = 0,
    progress: bool = True,
    desc: str = "student",
    checkpoint_dir: str | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    metrics: MetricsLogger | None = None,
) -> tuple[torch.nn.Module, TrainResult]:
    """Train ``model`` with a DeepSpeed engine for ``max_steps`` optimizer steps.

    The stream is iterated epoch after epoch (a :class:`kdcache.stream.ShardedStream`
    advances its own epoch) until ``max_steps`` optimizer steps are done.

    Checkpoints (``engine.save_checkpoint``, tag ``step<N>``) hold the engine state
    (weights, optimizer, scheduler) and, as client state, the stream's ``state_dict()``,
    the step count and the evaluations so far. With ``resume=True`` the latest checkpoint
    in ``checkpoint_dir`` is loaded and the run continues with exactly the batches an
    uninterrupted run would have used (also on another world size with the same global
    batch); on the CPU the losses are bit-identical.

    Args:
        model: The student, float32 on the CPU (DeepSpeed moves and casts it as configured).
        stream: Re-iterable batches: dicts with at least ``inputs``; must have
            ``state_dict``/``load_state_dict`` when checkpointing.
        loss_fn: ``loss_fn(student_logits, batch) -> scalar``; e.g. a closure over
            :func:`kdcache.losses.kd_loss`.
        ds_config: DeepSpeed config dict or JSON path, passed through.
        max_steps: Optimizer steps of the whole run (micro-batches / gradient accumulation).
        eval_fn: Called on every rank (it may use collectives) with the bare module every
            ``eval_every`` steps and at the end.
        eval_every: Steps between evaluations (0: only at the end).
        progress: Show a progress bar on rank 0.
        desc: Progress bar label.
        checkpoint_dir: Where engine checkpoints go (None: no checkpoints).
        checkpoint_every: Steps between checkpoints (0: only at the end).
        resume: Continue from the latest checkpoint in ``checkpoint_dir`` (a fresh start
            when there is none).
        metrics: Where ``train/loss`` (mean over ranks), ``train/lr`` and the eval metrics
            go.

    Returns:
        ``(trained module, TrainResult)``.

    Raises:
        ConfigError: max_steps < 1, the stream yields no batch, the stream was made for
            another world size, or a checkpoint is asked for a stream without
            ``state_dict``.
        MissingDependencyError: DeepSpeed is not installed.
    """
    from tqdm.auto import tqdm

    if max_steps < 1:
        raise ConfigError(f"max_steps must be >= 1, got {max_steps}")
    if checkpoint_dir is not None and not hasattr(stream, "state_dict"):
        raise ConfigError(
            f"checkpoints need the stream's position, but {type(stream).__name__} has no "
            "state_dict(); use a kdcache.stream.ShardedStream or SoftTargetDataset"
        )
    deepspeed = require("deepspeed", "deepspeed")
    rank, world = init_distributed()
    stream_world = getattr(stream, "world_size", world)
    if stream_world != world:
        raise ConfigError(
            f"the stream was made for {stream_world} rank(s) but {world} are running; create "
            "it after kdcache.train.init_distributed() (or pass rank= and world_size=)"
        )
    config = load_ds_config(ds_config)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=config
    )
    result = TrainResult()
    if (
        resume
        and checkpoint_dir is not None
        and os.path.exists(os.path.join(checkpoint_dir, "latest"))
    ):
        path, client = engine.load_checkpoint(checkpoint_dir)
        if path is None:
            raise ConfigError(f"could not load the latest checkpoint in {checkpoint_dir}")
        stream.load_state_dict(client["stream"])  # type: ignore[attr-defined]
        result.steps = result.start_step = int(client["steps"])
        result.evals = [(int(s), dict(m)) for s, m in client.get("evals", [])]
        log.info("resumed from %s at step %d", path, result.steps)

    def save(step: int) -> None:
        if checkpoint_dir is None:
            return
        client = {
            "stream": stream.state_dict(),  # type: ignore[attr-defined]
            "steps": step,
            "evals": [[s, m] for s, m in result.evals],
        }
        engine.save_checkpoint(checkpoint_dir, tag=f"step{step}", client_state=client)

    def evaluate(module: torch.nn.Module) -> None:
        assert eval_fn is not None
        module.eval()
        with torch.no_grad():
            m = eval_fn(module)
        result.evals.append((result.steps, m))
        if metrics is not None:
            metrics.log(result.steps, {f"eval/{k}": v for k, v in m.items()})
        engine.train()

    accum = int(engine.gradient_accumulation_steps())
    bar = tqdm(
        total=max_steps,
        initial=result.steps,
        desc=desc,
        unit="step",
        disable=not progress or rank != 0,
        dynamic_ncols=True,
        # into a log file (a Ray job, CI), a line every 30 s rather than every update
        mininterval=0.1 if sys.stderr.isatty() else 30.0,
    )
    start = time.perf_counter()
    engine.train()
    micro = 0
    while result.steps < max_steps:
        got_batch = False
        for batch in stream:
            got_batch = True
            logits = engine(batch["inputs"])
            loss = loss_fn(logits, batch)
            engine.backward(loss)
            engine.step()
            micro += 1
            result.samples += int(batch["inputs"].shape[0])
            if micro % accum:
                continue
            result.steps += 1
            value = float(loss.detach())
            result.losses.append(value)
            if metrics is not None:
                metrics.log(
                    result.steps,
                    {"train/loss": _mean_over_ranks(value, world), "train/lr": engine.get_lr()[0]},
                )
            bar.update(1)
            if result.steps % 20 == 0:
                bar.set_postfix_str(f"loss {value:.4f}")
            if eval_fn is not None and eval_every and result.steps % eval_every == 0:
                evaluate(engine.module)
            if checkpoint_every and result.steps % checkpoint_every == 0:
                save(result.steps)
            if result.steps >= max_steps:
                break
        if not got_batch:
            raise ConfigError(
                "the training stream yielded no batch; is the dataset smaller "
                "than one global batch?"
            )
    bar.close()
    result.wall_s = time.perf_counter() - start
    module = engine.module
    if eval_fn is not None and (not result.evals or result.evals[-1][0] != result.steps):
        evaluate(module)
    if result.steps > result.start_step and (
        not checkpoint_every or result.steps % checkpoint_every
    ):
        save(result.steps)
    result.state_dict = _gathered_state(engine)
    module.eval()
    return module, result


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
    fns: list[Callable[[torch.Tensor], Any]], inputs: torch.Tensor, repeats: int = 3
) -> list[float]:
    """Inference samples per second of each ``fn(inputs)``, measured side by side.

    Each round times every function once (after one warm-up call each), so machine noise
    hits all alike; each keeps its best round.

    Args:
        fns: Callables taking the whole batch [N, ...].
        inputs: The batch.
        repeats: Rounds.

    Returns:
        Samples per second, one per function.
    """
    with torch.inference_mode():
        for fn in fns:
            fn(inputs[: max(1, len(inputs) // 10)])
        best = [float("inf")] * len(fns)
        for _ in range(repeats):
            for i, fn in enumerate(fns):
                t = time.perf_counter()
                fn(inputs)
                best[i] = min(best[i], time.perf_counter() - t)
    return [len(inputs) / max(b, 1e-9) for b in best]


def plot_curves(
    runs: dict[str, dict[str, list[tuple[int, float]]]], path: str, title: str = ""
) -> str | None:
    """Training loss and eval metrics against step, one line per run, as a PNG.

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
    names = ["train/loss", *sorted({n for m in runs.values() for n in m if n.startswith("eval/")})]
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
                    marker="o" if name != "train/loss" else None,
                    markersize=3,
                    label=label,
                )
        ax.set_xlabel("optimizer step")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def save_safetensors(module: torch.nn.Module, path: str, metadata: dict[str, Any]) -> int:
    """Save a module's weights as safetensors with JSON metadata; returns bytes on disk.

    Args:
        module: The model.
        path: Output ``.safetensors`` path (written atomically).
        metadata: JSON-able config (architecture, cache keys, ...), stored under the
            ``kdcache`` metadata key.
    """
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(state, tmp, metadata={"kdcache": json.dumps(metadata, sort_keys=True)})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors creates 0600; checkpoints are for sharing
    os.replace(tmp, path)
    return os.path.getsize(path)


def read_safetensors_metadata(path: str) -> dict[str, Any]:
    """The ``kdcache`` metadata saved by :func:`save_safetensors` (empty if none)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    return dict(json.loads(meta["kdcache"])) if "kdcache" in meta else {}


# -- the `kdcache train` job ---------------------------------------------------------------


def evaluate_classifier(
    module: torch.nn.Module,
    dataset: Any,
    *,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 1000,
) -> dict[str, float]:
    """Accuracy and mean cross-entropy (tau = 1) of a classifier on a labelled dataset.

    Rank ``r`` of ``W`` evaluates shards ``r, r + W, ...``; the sums are all-reduced, so
    every rank gets the metrics of the whole set. Rows labelled -100 are skipped.

    Args:
        module: Maps inputs [B, ...] to logits [B, V].
        dataset: A :class:`kdcache.data.ShardedDataset` with ``labels``.
        rank, world_size: Which shards this process evaluates.
        batch_size: Rows per forward pass.

    Returns:
        ``{"accuracy": in [0, 1], "cross_entropy": nats, "num_samples": n}``.

    Raises:
        ConfigError: the dataset has no labels.
    """
    totals = torch.zeros(3, dtype=torch.float64)  # correct, nll sum, count
    with torch.no_grad():
        for shard in range(rank, dataset.num_shards, world_size):
            cols = dataset.read_shard(shard)
            if "labels" not in cols:
                raise ConfigError("the eval dataset has no labels; give one with labels")
            inputs, labels = cols["inputs"], np.asarray(cols["labels"], dtype=np.int64)
            for lo in range(0, len(labels), batch_size):
                y = torch.from_numpy(labels[lo : lo + batch_size])
                keep = y != -100
                if not bool(keep.any()):
                    continue
                logits = module(torch.from_numpy(np.array(inputs[lo : lo + batch_size]))).float()
                logits, y = logits[keep], y[keep]
                totals[0] += float((logits.argmax(1) == y).sum())
                totals[1] += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
                totals[2] += float(y.numel())
    if world_size > 1:
        torch.distributed.all_reduce(totals)
    n = max(float(totals[2]), 1.0)
    return {
        "accuracy": float(totals[0]) / n,
        "cross_entropy": float(totals[1]) / n,
        "num_samples": float(totals[2]),
    }


def _latest_step(checkpoint_dir: str) -> int | None:
    path = os.path.join(checkpoint_dir, "latest")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        tag = f.read().strip()
    return int(tag[4:]) if tag.startswith("step") and tag[4:].isdigit() else None


def _file_bytes(path: str) -> int:
    return os.path.getsize(path) if os.path.exists(path) else 0


def train_from_config(cfg: Any, *, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run a :class:`kdcache.config.TrainConfig` on this process's rank.

    Launch it on every rank (``torchrun``, ``deepspeed``, Ray Train, or a single process).
    Writes under ``cfg.output_dir``: ``checkpoints/`` (engine and loader state),
    ``metrics.csv`` and ``tensorboard/``, ``student.safetensors`` (float32 weights with
    the student config, the cache keys and the resolved config as metadata), with
    ``quantize_int8`` also ``student-int8.pt``, with ``compare_hard_labels`` a ``hard/``
    run, ``curves.png`` and ``summary.json``.

    Args:
        cfg: The job.
        resume: Continue each run from its latest checkpoint (fresh when none).
        progress: Progress bars on rank 0.

    Returns:
        The summary (rank 0 writes it to ``summary.json``): steps, metrics, cache keys,
        paths, and the float and int8 students' accuracy, bytes and samples/s.

    Raises:
        ConfigError: the global batch does not split over the ranks, or a bad setting.
        CacheNotFoundError, SpecMismatchError: the cache is missing or does not fit the
            dataset or temperature.
    """
    import math

    from kdcache import __version__, losses
    from kdcache.cache import as_view, open_cache
    from kdcache.config import to_dict
    from kdcache.stream import ShardedStream, SoftTargetDataset

    rank, world = init_distributed()
    if cfg.stream.batch_size % world:
        raise ConfigError(
            f"stream.batch_size {cfg.stream.batch_size} (the global micro-batch) does not split "
            f"over {world} ranks; use a multiple of the world size"
        )
    per_rank = cfg.stream.batch_size // world
    out = cfg.output_dir
    os.makedirs(out, exist_ok=True)
    dataset = cfg.dataset.build()
    eval_data = cfg.eval_dataset.build() if cfg.eval_dataset is not None else None
    cache = open_cache(cfg.cache.uri, root=cfg.cache.root)
    view = as_view(cache)
    loss_cfg = cfg.loss
    temperature = view.temperature if loss_cfg.temperature is None else loss_cfg.temperature
    order = {
        "batch_size": per_rank,
        "seed": cfg.seed,
        "shuffle_window": cfg.stream.shuffle_window,
        "num_lanes": cfg.stream.num_lanes,
        "num_workers": cfg.stream.num_workers,
        "prefetch_shards": cfg.stream.prefetch_shards,
    }

    def make_stream(hard: bool) -> ShardedStream:
        if hard:
            return ShardedStream(dataset, **order)
        return SoftTargetDataset(
            cache,
            dataset,
            temperature=temperature,
            retemper=temperature != view.temperature,
            verify=cfg.stream.verify,
            **order,
        )

    def kd(logits: torch.Tensor, b: dict[str, torch.Tensor]) -> torch.Tensor:
        return losses.kd_loss(
            logits,
            b["teacher_log_probs"],
            temperature=temperature,
            alpha=loss_cfg.alpha,
            labels_B=b.get("labels"),
            divergence=loss_cfg.kind,
            beta=loss_cfg.beta,
            skew=loss_cfg.skew,
            scale_by_temperature_squared=loss_cfg.scale_by_temperature_squared,
        )

    def hard_loss(logits: torch.Tensor, b: dict[str, torch.Tensor]) -> torch.Tensor:
        if "labels" not in b:
            raise ConfigError("loss.kind=cross_entropy needs a dataset with labels")
        return losses.cross_entropy(logits, b["labels"])

    eval_fn = None
    if eval_data is not None:

        def eval_fn(module: torch.nn.Module) -> dict[str, float]:
            m = evaluate_classifier(module, eval_data, rank=rank, world_size=world)
            return {"accuracy": m["accuracy"], "cross_entropy": m["cross_entropy"]}

    base_ds = cfg.deepspeed if cfg.deepspeed is not None else cpu_ds_config(cfg.lr, per_rank)
    raw = load_ds_config(base_ds)
    accum = raw.get("gradient_accumulation_steps", 1)
    accum = int(accum) if accum != "auto" else 1
    probe = make_stream(hard=True)
    if cfg.max_steps is not None:
        total = cfg.max_steps
    else:
        total = max(1, math.ceil((cfg.epochs or 1.0) * len(probe) / accum))
    ds_config = prepare_ds_config(base_ds, micro_batch_size=per_rank, total_steps=total)

    only_hard = loss_cfg.kind == "cross_entropy"
    runs = [("hard labels" if only_hard else "distilled", "", only_hard)]
    if cfg.compare_hard_labels and loss_cfg.kind != "cross_entropy":
        runs.append(("hard labels", "hard", True))
    results: dict[str, TrainResult] = {}
    for label, sub, hard in runs:
        directory = os.path.join(out, sub) if sub else out
        ckpt = os.path.join(directory, "checkpoints")
        metrics = MetricsLogger(
            directory,
            rank=rank,
            tensorboard=cfg.tensorboard,
            resume_from_step=_latest_step(ckpt) if resume else None,
        )
        torch.manual_seed(cfg.seed)  # the same initial student for every run
        model = cfg.student.build()
        try:
            _, results[label] = train_student(
                model,
                make_stream(hard),
                hard_loss if hard else kd,
                ds_config=ds_config,
                max_steps=total,
                eval_fn=eval_fn,
                eval_every=cfg.eval_every,
                progress=progress,
                desc=f"student ({label})",
                checkpoint_dir=ckpt,
                checkpoint_every=cfg.checkpoint_every,
                resume=resume,
                metrics=metrics,
            )
        finally:
            metrics.close()

    main = results[runs[0][0]]
    summary: dict[str, Any] = {
        "steps": main.steps,
        "start_step": main.start_step,
        "world_size": world,
        "global_batch_size": cfg.stream.batch_size,
        "cache": {
            "uri": cfg.cache.uri,
            "key": cache.key,
            "entries": [e.key for e in view.entries],
            "teachers": [e.teacher_name for e in view.entries],
            "temperature": view.temperature,
        },
        "evals": {label: r.evals[-1][1] if r.evals else {} for label, r in results.items()},
    }
    if rank != 0:
        return summary
    student = cfg.student.build()
    student.load_state_dict(main.state_dict)
    student.eval()
    path = os.path.join(out, "student.safetensors")
    meta = {
        "student": {"factory": cfg.student.factory, "kwargs": cfg.student.kwargs},
        "cache_key": cache.key,
        "cache_entries": summary["cache"]["entries"],
        "cache_temperature": view.temperature,
        "steps": main.steps,
        "eval": summary["evals"][runs[0][0]],
        "config": to_dict(cfg),
        "versions": {"kdcache": __version__, "torch": torch.__version__},
    }
    summary["student"] = {"path": path, "bytes": save_safetensors(student, path, meta)}
    if cfg.quantize_int8:
        summary["quantized"] = _report_int8(student, eval_data, out, path)
    plot_runs = {
        label: read_metrics(os.path.join(out, sub, "metrics.csv")) for label, sub, _ in runs
    }
    summary["plot"] = plot_curves(
        plot_runs,
        os.path.join(out, "curves.png"),
        f"student ({sum(p.numel() for p in student.parameters()):,} params), tau={temperature}",
    )
    summary["metrics_csv"] = os.path.join(out, "metrics.csv")
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


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


def _ray_train_loop(loop_config: dict[str, Any]) -> None:
    """The per-worker function of Ray Train's TorchTrainer (process group already set)."""
    from kdcache.config import TrainConfig, from_dict

    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    cfg = from_dict(TrainConfig, loop_config["config"])
    summary = train_from_config(cfg, resume=loop_config["resume"], progress=False)
    import ray.train

    ray.train.report({"steps": summary["steps"]})


def train_on_ray(cfg: Any, *, resume: bool = False) -> dict[str, Any]:
    """Run :func:`train_from_config` on ``cfg.ray.num_workers`` Ray Train workers.

    Ray Train's ``TorchTrainer`` starts one process per rank and sets up the torch process
    group (gloo on CPUs, nccl with ``use_gpu``); each worker runs the same code as a
    ``torchrun`` rank. ``output_dir`` must be reachable from every node (a shared file
    system on a multi-node cluster).

    Returns:
        The summary that rank 0 wrote to ``summary.json``.

    Raises:
        MissingDependencyError: Ray is not installed (extra ``ray``).
    """
    from kdcache.config import to_dict

    ray = require("ray", "ray")
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    started = False
    if not ray.is_initialized():
        # log_to_driver: the workers' logs reach this driver, and through it
        # `kdcache submit` / `kdcache logs` when the stage runs as a Ray job.
        ray.init(address=cfg.ray.address, log_to_driver=True)
        started = True
    out = os.path.abspath(cfg.output_dir)
    config = to_dict(cfg)
    config["output_dir"] = out
    try:
        trainer = TorchTrainer(
            _ray_train_loop,
            train_loop_config={"config": config, "resume": resume},
            scaling_config=ScalingConfig(
                num_workers=cfg.ray.num_workers,
                use_gpu=cfg.ray.use_gpu,
                resources_per_worker={"CPU": cfg.ray.cpus_per_worker},
            ),
            run_config=RunConfig(storage_path=os.path.join(out, "ray"), name="train"),
        )
        trainer.fit()
    finally:
        if started:
            ray.shutdown()
    with open(os.path.join(out, "summary.json")) as f:
        return dict(json.load(f))
