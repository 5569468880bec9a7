"""The student-stage job: a typed train config run on this rank (DeepSpeed) or on Ray Train
workers: stream, loss, checkpoints, export and the summary."""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from kdcache.errors import ConfigError, require
from kdcache.train.distributed import (
    cpu_ds_config,
    init_distributed,
    load_ds_config,
    prepare_ds_config,
)
from kdcache.train.evaluate import evaluate_classifier
from kdcache.train.export import save_safetensors
from kdcache.train.loop import TrainResult, train_student
from kdcache.train.metrics import MetricsLogger, read_metrics
from kdcache.train.report import _report_int8, plot_curves


def _latest_step(checkpoint_dir: str) -> int | None:
    path = os.path.join(checkpoint_dir, "latest")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        tag = f.read().strip()
    return int(tag[4:]) if tag.startswith("step") and tag[4:].isdigit() else None


def train_from_config(cfg: Any, *, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run a :class:`kdcache.jobs.config.TrainConfig` on this process's rank.

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

    from kdcache import losses
    from kdcache._version import __version__
    from kdcache.jobs.config import to_dict
    from kdcache.stores.catalog import open_cache
    from kdcache.stores.view import as_view
    from kdcache.stream.dataset import ShardedStream, SoftTargetDataset

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


def _ray_train_loop(loop_config: dict[str, Any]) -> None:
    """The per-worker function of Ray Train's TorchTrainer (process group already set)."""
    from kdcache.jobs.config import TrainConfig, from_dict

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
    from kdcache.jobs.config import to_dict

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
