"""The student stage: a DeepSpeed engine trained from a stream of batches.

The user's DeepSpeed config (a dict or JSON file) is passed to ``deepspeed.initialize``
untouched; kdcache only fills ``train_micro_batch_size_per_gpu`` when it is absent. On a
machine without CUDA, DeepSpeed runs with its CPU accelerator and the gloo backend
(set ``DS_ACCELERATOR=cpu`` and use ``"torch_adam": true`` in the optimizer params).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from kdcache.errors import ConfigError, require
from kdcache.progress import Progress
from kdcache.train.distributed import (
    _gathered_state,
    _mean_over_ranks,
    init_distributed,
    load_ds_config,
    skip_single_rank_allreduce,
)
from kdcache.train.metrics import MetricsLogger

log = logging.getLogger(__name__)


LossFn = Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]

#: ``on_eval(step, metrics, checkpoint)``: see :func:`train_student`.
EvalCallback = Callable[[int, dict[str, float], str | None], None]


@dataclass
class TrainResult:
    """What a training run did.

    Attributes:
        steps: Optimizer steps done, counting those before a resume.
        start_step: Optimizer steps already done when this call started (0 unless resumed).
        samples: Samples seen by this rank in this call.
        wall_s: Wall time of this call's loop, seconds.
        losses: Loss per optimizer step of this call (this rank's last micro-batch; with
            :func:`kdcache.train.data_parallel_normalizer`, this rank's share, whose mean
            over the ranks is the loss of the global batch).
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
    on_eval: EvalCallback | None = None,
) -> tuple[torch.nn.Module, TrainResult]:
    """Train ``model`` with a DeepSpeed engine for ``max_steps`` optimizer steps.

    The stream is iterated epoch after epoch (a :class:`kdcache.stream.ShardedStream`
    advances its own epoch) until ``max_steps`` optimizer steps are done.

    Checkpoints (``engine.save_checkpoint``, tag ``step<N>``) hold the engine state
    (weights, optimizer, scheduler) and, as client state, the stream's ``state_dict()``,
    the step count and the evaluations so far. With ``resume=True`` the latest checkpoint
    in ``checkpoint_dir`` is loaded and the run continues with exactly the batches an
    uninterrupted run would have used (also on another world size with the same global
    batch); on the CPU the losses are bit-identical. A checkpoint saved with another
    global batch (rows per micro-step over all ranks) or another optimizer batch (times
    the gradient accumulation) is refused: the resumed run would silently be another one.

    Args:
        model: The student, float32 on the CPU (DeepSpeed moves and casts it as configured).
        stream: Re-iterable batches: dicts with at least ``inputs``; must have
            ``state_dict``/``load_state_dict`` when checkpointing.
        loss_fn: ``loss_fn(student_logits, batch) -> scalar``; e.g. a closure over
            :func:`kdcache.losses.kd_loss`. DeepSpeed averages the ranks' gradients, so
            with several ranks a loss that averages over the rows that count (labelled,
            unmasked) must divide by the global count: pass
            ``normalizer=kdcache.train.data_parallel_normalizer`` to the kdcache losses
            (as ``kdcache train`` does), or the model depends on the world size.
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
        on_eval: Called on every rank as ``on_eval(step, metrics, checkpoint)`` after each
            evaluation before the last step, and once at the end (after the final
            evaluation and checkpoint): ``metrics`` are that evaluation's (the last one's
            at the end; ``{}`` without ``eval_fn``), ``checkpoint`` the checkpoint
            directory saved at that step (``checkpoint_dir/step<N>``), else None. Ray
            Train's reporting hooks in here (:mod:`kdcache.jobs.train`).

    Returns:
        ``(trained module, TrainResult)``.

    Raises:
        ConfigError: max_steps < 1, the stream yields no batch, the stream was made for
            another world size, a checkpoint is asked for a stream without
            ``state_dict``, or the checkpoint resumed from was saved with another global
            batch size (stream or optimizer batch; the message names both).
        MissingDependencyError: DeepSpeed is not installed.
    """
    if max_steps < 1:
        raise ConfigError(f"max_steps must be >= 1, got {max_steps}")
    if checkpoint_dir is not None and not hasattr(stream, "state_dict"):
        raise ConfigError(
            f"checkpoints need the stream's position, but {type(stream).__name__} has no "
            "state_dict(); use a kdcache.stream.ShardedStream or SoftTargetDataset"
        )
    require("deepspeed", "deepspeed")  # a missing DeepSpeed is said before anything starts
    rank, world = init_distributed()
    stream_world = getattr(stream, "world_size", world)
    if stream_world != world:
        raise ConfigError(
            f"the stream was made for {stream_world} rank(s) but {world} are running; create "
            "it after kdcache.train.init_distributed() (or pass rank= and world_size=)"
        )
    if rank == 0:
        log.info(
            "%s: starting DeepSpeed on %d rank(s) (its first start on a machine compiles a "
            "CPU op, about a minute)",
            desc,
            world,
        )
    engine, device = start_engine(model, ds_config)
    result = TrainResult()
    if (
        resume
        and checkpoint_dir is not None
        and os.path.exists(os.path.join(checkpoint_dir, "latest"))
    ):
        # DeepSpeed's checkpoints are pickles: only one whose files match the integrity
        # record written when it was saved is loaded (the newest intact one).
        tag = intact_checkpoint(checkpoint_dir)
        path, client = engine.load_checkpoint(checkpoint_dir, tag=tag)
        if path is None:
            raise ConfigError(f"could not load checkpoint {tag} in {checkpoint_dir}")
        _check_batch_sizes(client, stream, engine, world, os.path.join(checkpoint_dir, tag))
        stream.load_state_dict(client["stream"])  # type: ignore[attr-defined]
        result.steps = result.start_step = int(client["steps"])
        result.evals = [(int(s), dict(m)) for s, m in client.get("evals", [])]
        log.info("resumed from %s at step %d", path, result.steps)

    saved_at: list[int] = []  # steps checkpointed by this call

    def save(step: int) -> None:
        if checkpoint_dir is None:
            return
        client = {
            "stream": stream.state_dict(),  # type: ignore[attr-defined]
            "steps": step,
            "evals": [[s, m] for s, m in result.evals],
            # what a resume must share (checked by _check_batch_sizes)
            "global_batch_size": _stream_global_batch(stream, engine, world),
            "train_batch_size": int(engine.train_batch_size()),
        }
        engine.save_checkpoint(checkpoint_dir, tag=f"step{step}", client_state=client)
        write_integrity_record(os.path.join(checkpoint_dir, f"step{step}"))
        saved_at.append(step)

    def notify(step: int) -> None:
        if on_eval is None:
            return
        where = None
        if checkpoint_dir is not None and saved_at and saved_at[-1] == step:
            where = os.path.join(checkpoint_dir, f"step{step}")
        on_eval(step, dict(result.evals[-1][1]) if result.evals else {}, where)

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
    # a bar on a terminal, a log line every 30 s in a log file (a Ray job, CI)
    bar = Progress(
        max_steps, desc=desc, unit="step", enabled=progress and rank == 0, initial=result.steps
    )
    counted = result.samples
    # the loss is read on the host each step only where something shows it; else the
    # steps' losses stay on the device and are read together, every _LOSS_READ_EVERY
    # steps and at the end (no host sync per step)
    per_step_value = metrics is not None or bar.mode != "off"
    pending: list[torch.Tensor] = []
    start = time.perf_counter()
    engine.train()
    micro = 0
    while result.steps < max_steps:
        got_batch = False
        for batch in stream:
            got_batch = True
            loss, rows = micro_step(engine, device, batch, loss_fn)
            micro += 1
            result.samples += rows
            if micro % accum:
                continue
            result.steps += 1
            if per_step_value:
                value = float(loss.detach())
                result.losses.append(value)
                if metrics is not None:
                    metrics.log(
                        result.steps,
                        {
                            "train/loss": _mean_over_ranks(value, world),
                            "train/lr": engine.get_lr()[0],
                        },
                    )
                bar.update(1, samples=(result.samples - counted) * world, loss=value)
            else:
                pending.append(loss.detach())
                if len(pending) >= _LOSS_READ_EVERY:
                    _read_losses(pending, result.losses)
            counted = result.samples
            evaluated = eval_fn is not None and eval_every and result.steps % eval_every == 0
            if evaluated:
                evaluate(engine.module)
            if checkpoint_every and result.steps % checkpoint_every == 0:
                save(result.steps)
            if result.steps >= max_steps:
                break
            if evaluated:
                notify(result.steps)
        if not got_batch:
            raise ConfigError(
                "the training stream yielded no batch; is the dataset smaller "
                "than one global batch?"
            )
    _read_losses(pending, result.losses)
    bar.close()
    result.wall_s = time.perf_counter() - start
    module = engine.module
    if eval_fn is not None and (not result.evals or result.evals[-1][0] != result.steps):
        evaluate(module)
    if result.steps > result.start_step and (
        not checkpoint_every or result.steps % checkpoint_every
    ):
        save(result.steps)
    notify(result.steps)
    result.state_dict = _gathered_state(engine)
    module.eval()
    return module, result


def start_engine(
    model: torch.nn.Module, ds_config: dict[str, Any] | str
) -> tuple[Any, torch.device]:
    """A DeepSpeed engine over ``model`` and the device it runs on, as :func:`train_student`
    starts it (call :func:`kdcache.train.init_distributed` first).

    Over one float32 rank without ZeRO the gradient all-reduce is switched off
    (:func:`kdcache.train.distributed.skip_single_rank_allreduce`): it would copy and change
    nothing.

    Raises:
        ConfigError: the config file cannot be read.
        MissingDependencyError: DeepSpeed is not installed.
    """
    deepspeed = require("deepspeed", "deepspeed")
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=load_ds_config(ds_config)
    )
    skip_single_rank_allreduce(engine)
    return engine, torch.device(getattr(engine, "device", "cpu"))


def micro_step(
    engine: Any, device: torch.device, batch: dict[str, Any], loss_fn: LossFn
) -> tuple[torch.Tensor, int]:
    """One micro-step of :func:`train_student`: the batch moved to ``device``
    (:func:`to_device`), the student's forward, ``loss_fn``, backward and the engine's step
    (an optimizer step at the end of each gradient-accumulation window).

    Args:
        engine: From :func:`start_engine`.
        device: Its device.
        batch: A stream's batch: at least ``inputs`` [B, ...] (what the student takes),
            and whatever ``loss_fn`` reads (``labels`` int64 [B], ``teacher_log_probs``
            float32 [B, V], ...).
        loss_fn: ``loss_fn(student_logits, batch) -> scalar`` (see :func:`train_student`).

    Returns:
        ``(loss, rows)``: the scalar loss, still on the device (reading it is a host sync),
        and the batch's rows (``inputs.shape[0]``).
    """
    batch = to_device(batch, device)
    logits = engine(batch["inputs"])
    loss = loss_fn(logits, batch)
    engine.backward(loss)
    engine.step()
    return loss, int(batch["inputs"].shape[0])


#: Steps whose losses stay on the device before they are read (one host sync for all).
_LOSS_READ_EVERY = 1024


def _read_losses(pending: list[torch.Tensor], into: list[float]) -> None:
    """Append the values of ``pending`` (0-d loss tensors of one dtype) and empty it."""
    if pending:
        into.extend(float(v) for v in torch.stack(pending).cpu().tolist())
        pending.clear()


def to_device(batch: Any, device: torch.device) -> Any:
    """A batch with every tensor on ``device``, through containers and dataclasses.

    Tensors already there are returned as they are (on the CPU this is the batch itself).
    Toward a CUDA device, host tensors are pinned first and copied without blocking, so
    the copy overlaps the host's work and no step waits on the device.

    Args:
        batch: Tensors, or dicts, lists, tuples and dataclass instances
            (:class:`kdcache.targets.SparseTargets`) of them; anything else is kept.
        device: Where the engine's module is.

    Returns:
        A batch of the same structure.
    """
    if isinstance(batch, torch.Tensor):
        if batch.device == device:
            return batch
        if device.type == "cuda" and batch.device.type == "cpu":
            return batch.pin_memory().to(device, non_blocking=True)
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        moved = {
            f.name: to_device(getattr(batch, f.name), device)
            for f in dataclasses.fields(batch)
            if isinstance(getattr(batch, f.name), torch.Tensor)
        }
        if any(moved[k] is not getattr(batch, k) for k in moved):
            return dataclasses.replace(batch, **moved)
    return batch


def _stream_global_batch(stream: Any, engine: Any, world: int) -> int:
    """Rows per micro-step over all ranks: the stream's, else the engine's micro-batch x W."""
    g = getattr(stream, "global_batch_size", None)
    if g is None:
        g = int(engine.train_micro_batch_size_per_gpu()) * world
    return int(g)


def _check_batch_sizes(
    client: dict[str, Any], stream: Any, engine: Any, world: int, where: str
) -> None:
    """Refuse to resume a checkpoint saved with another global or optimizer batch.

    Raises:
        ConfigError: naming the saved and the current size, and what to do.
    """
    new_run = "or start a new run (another output_dir, or without --resume)"
    saved = client.get("global_batch_size")
    if saved is None:  # a checkpoint from before the sizes were recorded
        saved = (client.get("stream") or {}).get("global_batch_size")
    now = _stream_global_batch(stream, engine, world)
    if saved is not None and int(saved) != now:
        raise ConfigError(
            f"checkpoint {where} was saved with a global batch of {int(saved)} rows per "
            f"micro-step (over all ranks), this run has {now}; a resume with another batch "
            f"size would train another model from the saved step on: resume with "
            f"stream.global_batch_size={int(saved)} (any world size that divides it), " + new_run
        )
    saved_train = client.get("train_batch_size")
    now_train = int(engine.train_batch_size())
    if saved_train is not None and int(saved_train) != now_train:
        raise ConfigError(
            f"checkpoint {where} was saved with an optimizer batch of {int(saved_train)} rows "
            f"per step (micro-batch x gradient_accumulation_steps x ranks), this run has "
            f"{now_train}; resume with the saved gradient_accumulation_steps, " + new_run
        )


#: The integrity record of a checkpoint: SHA-256 and size of each of its files.
INTEGRITY_FILE = "kdcache-integrity.json"


def _digest_files(directory: str) -> dict[str, dict[str, Any]]:
    out = {}
    for name in sorted(os.listdir(directory)):
        full = os.path.join(directory, name)
        if name == INTEGRITY_FILE or name.startswith(".") or not os.path.isfile(full):
            continue  # dot files are others' notes (Ray's .metadata.json), never loaded
        if os.path.islink(full):
            out[name] = {"sha256": "a symbolic link", "bytes": -1}  # never matches a record
            continue
        h = hashlib.sha256()
        with open(full, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        out[name] = {"sha256": h.hexdigest(), "bytes": os.path.getsize(full)}
    return out


def write_integrity_record(tag_dir: str) -> None:
    """After every rank saved its part, rank 0 records each file's SHA-256 and size.

    Written atomically after a barrier, so a record exists only for a complete checkpoint.
    """
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if rank == 0:
        record = {"files": _digest_files(tag_dir)}
        tmp = os.path.join(tag_dir, f".tmp-{INTEGRITY_FILE}")
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(tag_dir, INTEGRITY_FILE))
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _checkpoint_problem(tag_dir: str) -> str | None:
    """Why a checkpoint must not be loaded, or None when its files match its record."""
    try:
        with open(os.path.join(tag_dir, INTEGRITY_FILE)) as f:
            record = json.load(f)["files"]
    except FileNotFoundError:
        return "it has no integrity record (not written by kdcache, or cut off while saving)"
    except (ValueError, KeyError, TypeError):
        return "its integrity record is unreadable"
    found = _digest_files(tag_dir)
    if set(found) != set(record):
        extra, missing = set(found) - set(record), set(record) - set(found)
        return (
            f"its files differ from the record (extra {sorted(extra)}, missing {sorted(missing)})"
        )
    bad = [n for n in found if found[n] != record[n]]
    if bad:
        return f"{bad[0]} was altered or truncated since it was saved"
    return None


def intact_checkpoint(checkpoint_dir: str) -> str:
    """The checkpoint to resume from: DeepSpeed's ``latest`` tag (``step<N>``) if its files
    match their integrity record, else the newest intact one before it.

    A damaged checkpoint (empty, truncated, altered, or planted without a record) is
    skipped with a warning naming why; nothing is unpickled before its bytes are checked.

    Raises:
        ConfigError: no checkpoint in ``checkpoint_dir`` is intact.
    """
    try:
        with open(os.path.join(checkpoint_dir, "latest")) as f:
            latest = f.read().strip()
    except OSError:
        latest = ""
    limit = int(latest[4:]) if latest.startswith("step") and latest[4:].isdigit() else None
    tags = []
    for name in os.listdir(checkpoint_dir):
        full = os.path.join(checkpoint_dir, name)
        if name.startswith("step") and name[4:].isdigit() and os.path.isdir(full):
            if limit is None or int(name[4:]) <= limit:
                tags.append((int(name[4:]), name))
    reasons: list[str] = []
    for _, tag in sorted(tags, reverse=True):
        problem = _checkpoint_problem(os.path.join(checkpoint_dir, tag))
        if problem is None:
            if reasons:
                log.warning("resuming from %s instead: %s", tag, "; ".join(reasons))
            return tag
        reasons.append(f"checkpoint {tag} is not loaded: {problem}")
    raise ConfigError(
        f"no intact checkpoint in {checkpoint_dir} to resume from"
        + (f" ({'; '.join(reasons)})" if reasons else "")
        + "; start without --resume, or restore the checkpoint folder"
    )
