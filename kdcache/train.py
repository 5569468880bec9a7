"""The student stage: a DeepSpeed engine trained from a stream of batches.

The user's DeepSpeed config (a dict or JSON file) is passed to ``deepspeed.initialize``
untouched; kdcache only fills ``train_micro_batch_size_per_gpu`` when it is absent. On a
machine without CUDA, DeepSpeed runs with its CPU accelerator and the gloo backend
(set ``DS_ACCELERATOR=cpu`` and use ``"torch_adam": true`` in the optimizer params).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

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


@dataclass
class TrainResult:
    """What a training run did.

    Attributes:
        steps: Optimizer steps taken.
        samples: Samples seen by this rank.
        wall_s: Wall time of the loop, seconds.
        losses: Loss per step (this rank), floats.
        evals: ``(step, metrics)`` for each evaluation.
    """

    steps: int = 0
    samples: int = 0
    wall_s: float = 0.0
    losses: list[float] = field(default_factory=list)
    evals: list[tuple[int, dict[str, float]]] = field(default_factory=list)


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
) -> tuple[torch.nn.Module, TrainResult]:
    """Train ``model`` with a DeepSpeed engine for ``max_steps`` steps.

    The stream is iterated epoch after epoch (a :class:`kdcache.stream.ShardedStream`
    advances its own epoch) until ``max_steps`` optimizer steps are done.

    Args:
        model: The student, float32 on the CPU (DeepSpeed moves it as configured).
        stream: Re-iterable batches: dicts with at least ``inputs``.
        loss_fn: ``loss_fn(student_logits, batch) -> scalar``; e.g. a closure over
            :func:`kdcache.losses.kd_loss`.
        ds_config: DeepSpeed config dict or JSON path, passed through.
        max_steps: Optimizer steps (micro-batches x gradient accumulation).
        eval_fn: Called on the bare module every ``eval_every`` steps and at the end.
        eval_every: Steps between evaluations (0: only at the end).
        progress: Show a progress bar on rank 0.
        desc: Progress bar label.

    Returns:
        ``(trained module, TrainResult)``.

    Raises:
        ConfigError: max_steps < 1, or the stream yields no batch.
        MissingDependencyError: DeepSpeed is not installed.
    """
    from tqdm.auto import tqdm

    if max_steps < 1:
        raise ConfigError(f"max_steps must be >= 1, got {max_steps}")
    deepspeed = require("deepspeed", "deepspeed")
    rank, _ = init_distributed()
    config = load_ds_config(ds_config)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=config
    )
    result = TrainResult()
    accum = int(engine.gradient_accumulation_steps())
    bar = tqdm(
        total=max_steps,
        desc=desc,
        unit="step",
        disable=not progress or rank != 0,
        dynamic_ncols=True,
    )
    start = time.perf_counter()
    engine.train()
    micro = 0
    for _ in itertools.count():
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
            result.losses.append(float(loss.detach()))
            bar.update(1)
            if result.steps % 20 == 0:
                bar.set_postfix_str(f"loss {result.losses[-1]:.4f}")
            if eval_fn is not None and eval_every and result.steps % eval_every == 0:
                result.evals.append((result.steps, eval_fn(engine.module)))
                engine.train()
            if result.steps >= max_steps:
                break
        if not got_batch:
            raise ConfigError(
                "the training stream yielded no batch; is the dataset smaller "
                "than one global batch?"
            )
        if result.steps >= max_steps:
            break
    bar.close()
    result.wall_s = time.perf_counter() - start
    module = engine.module
    module.eval()
    if eval_fn is not None and (not result.evals or result.evals[-1][0] != result.steps):
        result.evals.append((result.steps, eval_fn(module)))
    return module, result


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
    os.replace(tmp, path)
    return os.path.getsize(path)


def read_safetensors_metadata(path: str) -> dict[str, Any]:
    """The ``kdcache`` metadata saved by :func:`save_safetensors` (empty if none)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    return dict(json.loads(meta["kdcache"])) if "kdcache" in meta else {}
