"""``kdcache train CONFIG [key=value ...]``: run the student stage from a config file.

One code path for every launcher; each rank runs this same command:

    kdcache train train.yaml                                   # one process
    torchrun --nproc_per_node 2 -m kdcache.cli train train.yaml
    deepspeed --no_local_rank --num_gpus 2 --module kdcache.cli train train.yaml
    kdcache train train.yaml --ray [--address ADDR] [--num-workers 4]   # Ray Train

``--resume`` continues from the latest checkpoint under ``output_dir``. Rank 0 prints
one JSON line (steps, cache key, metrics, exported files) at the end.
"""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser(
        "train",
        help="run the student stage described by a YAML/TOML/JSON config",
        description="Train a student on DeepSpeed from cached soft targets (see TrainConfig "
        "in kdcache/jobs/config.py). Launch it alone, under torchrun or deepspeed on every rank, "
        "or with --ray on a Ray cluster.",
    )
    c.add_argument("config", help="train config file (.yaml, .toml or .json)")
    c.add_argument(
        "overrides",
        nargs="*",
        help="dotted key=value overrides, e.g. loss.alpha=0.5 max_steps=200",
    )
    c.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    c.add_argument("--ray", action="store_true", help="run on Ray Train (sets ray.enabled)")
    c.add_argument("--address", default=None, help="Ray address (overrides ray.address)")
    c.add_argument(
        "--num-workers", type=int, default=None, help="Ray Train ranks (overrides ray.num_workers)"
    )
    c.add_argument("--no-progress", action="store_true")
    # launchers that append --local_rank (deepspeed without --no_local_rank)
    c.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    c.set_defaults(func=run, passthrough=True)


def run(args: argparse.Namespace, rest: list[str]) -> int:
    from kdcache.jobs import config as cfg
    from kdcache.jobs.train import train_from_config, train_on_ray

    overrides = cfg.command_line_overrides(args.overrides, rest)
    if args.ray:
        overrides.append("ray.enabled=true")
    if args.address:
        overrides.append(f"ray.address={args.address}")
    if args.num_workers is not None:
        overrides.append(f"ray.num_workers={args.num_workers}")
    config = cfg.load(cfg.TrainConfig, args.config, overrides)
    if config.ray.enabled:
        summary = train_on_ray(config, resume=args.resume)
    else:
        summary = train_from_config(config, resume=args.resume, progress=not args.no_progress)
        import torch

        if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
            return 0
    _log_summary(summary)
    print(json.dumps(summary, default=str))
    return 0


def _log_summary(summary: dict) -> None:
    """One readable line per evaluated model before the JSON summary."""
    import logging

    log = logging.getLogger("kdcache.train")
    for name, ev in (summary.get("evals") or {}).items():
        if isinstance(ev, dict) and "accuracy" in ev:
            log.info(
                "%s student: accuracy %.4f, cross-entropy %.4f after %s steps; %s",
                name,
                float(ev["accuracy"]),
                float(ev.get("cross_entropy", float("nan"))),
                summary.get("steps"),
                (summary.get("student") or {}).get("path", ""),
            )
        elif isinstance(ev, dict) and "perplexity" in ev:  # a causal-LM student
            log.info(
                "%s student: validation perplexity %.2f (nll %.4f) after %s steps; %s",
                name,
                float(ev["perplexity"]),
                float(ev.get("nll", float("nan"))),
                summary.get("steps"),
                (summary.get("student") or {}).get("path", ""),
            )
