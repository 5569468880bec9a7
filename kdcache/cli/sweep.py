"""``kdcache sweep CONFIG [key=value ...]``: many students from one cache, as Ray Tune trials.

    kdcache sweep sweep.yaml                                 # a local Ray on 127.0.0.1
    kdcache sweep sweep.yaml search=random num_samples=8 seed=1
    kdcache sweep sweep.yaml parameters.loss.alpha=[0.5,0.9] --address HOST:6379

Every trial is a ``kdcache train`` run of the sweep's train config with the trial's
values as overrides (``trials/trial-NNN/trial.json`` lists them), so one reruns alone with
``kdcache train TRAIN <overrides>``. The results table is printed and written to
``OUTPUT_DIR/results.csv``, with ``results.png``; the exit code is 1 when a trial failed.
"""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser(
        "sweep",
        help="train a grid or random search of students from one cache (Ray Tune)",
        description="Train many students from one cache as Ray Tune trials: a grid or a "
        "seeded random search over temperature, alpha, loss kind, student size, learning "
        "rate or any TrainConfig key (see SweepConfig in kdcache/jobs/sweep.py).",
    )
    c.add_argument("config", help="sweep config file (.yaml, .toml or .json)")
    c.add_argument(
        "overrides",
        nargs="*",
        help="dotted key=value overrides of the sweep config, e.g. num_samples=8 "
        "parameters.loss.alpha=[0.5,0.9]",
    )
    c.add_argument("--address", default=None, help="Ray address (overrides address)")
    c.set_defaults(func=run, passthrough=True)


def run(args: argparse.Namespace, rest: list[str]) -> int:
    from kdcache.jobs import config as cfg
    from kdcache.jobs.sweep import format_table, load_sweep, run_sweep

    overrides = cfg.command_line_overrides(args.overrides, rest)
    if args.address:
        overrides.append(f"address={args.address}")
    result = run_sweep(load_sweep(args.config, overrides))
    print(format_table(result.rows, result.columns))
    print(f"results: {result.csv_path}" + (f", {result.plot_path}" if result.plot_path else ""))
    if result.best is not None:
        print(f"best: {json.dumps(result.best, default=str)}")
    return 1 if result.num_failed else 0
