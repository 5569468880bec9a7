"""``kdcache submit build|train CONFIG``, ``kdcache status JOB``, ``kdcache logs JOB``:
run a stage on a Ray cluster as a Ray job and follow it (see :mod:`kdcache.jobs.submit`)."""

from __future__ import annotations

import argparse
import json
import logging
import sys

ADDRESS_HELP = (
    "Ray job server (the dashboard), e.g. http://127.0.0.1:8265; default "
    "$RAY_API_SERVER_ADDRESS, or $RAY_ADDRESS when it is an http URL"
)


def register(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser(
        "submit",
        help="run the teacher (build) or student (train) stage on a Ray cluster as a job",
        description="Submit a stage as a Ray job through the Ray Jobs API: the config is "
        "checked here, the working directory is uploaded (without .venv, runs/, caches; a "
        "config Ray would not upload goes as a copy in .kdcache-jobs/), the job runs "
        "'kdcache STAGE CONFIG [key=value ...]' there (what 'ray job list' shows), and its "
        "logs stream to this terminal. "
        "Exit code: 0 when the job succeeded, 1 when it failed or was stopped, 2 for an "
        "error before submission. Ctrl-C stops following; the job keeps running.",
    )
    c.add_argument("stage", choices=("build", "train"), help="teacher or student stage")
    c.add_argument("config", help="the stage's config file (.yaml, .toml or .json)")
    c.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    c.add_argument("--address", default=None, help=ADDRESS_HELP)
    c.add_argument("--working-dir", default=".", help="directory uploaded with the job (.)")
    c.add_argument(
        "--exclude", action="append", default=[], help="extra upload exclude pattern (repeat)"
    )
    c.add_argument("--pip", action="append", default=[], help="pip package for the job (repeat)")
    c.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="job env var (repeat)"
    )
    c.add_argument("--runtime-env", default=None, help="base runtime_env file (YAML or JSON)")
    c.add_argument(
        "--workers",
        type=int,
        default=0,
        help="train only: Ray Train ranks (sets ray.enabled, ray.num_workers; 0: as configured)",
    )
    c.add_argument("--gpu", action="store_true", help="train only: one GPU per Ray Train rank")
    c.add_argument("--cpus-per-worker", type=float, default=1.0, help="train only, with --workers")
    c.add_argument("--entrypoint-num-cpus", type=float, default=None)
    c.add_argument("--entrypoint-num-gpus", type=float, default=None)
    c.add_argument("--submission-id", default=None, help="job id (default kdcache-STAGE-<hex>)")
    c.add_argument(
        "--python",
        default=None,
        help="run 'PYTHON -m kdcache.cli' on the cluster (default: the kdcache command)",
    )
    c.add_argument("--no-wait", action="store_true", help="print the job id and return")
    c.add_argument("--timeout-s", type=float, default=None, help="stop following after this")
    c.set_defaults(func=run_submit, passthrough=True)

    s = sub.add_parser(
        "status",
        help="a submitted job's state (exit 1 when it failed or was stopped)",
        description="Print a Ray job's state as JSON: status, message, error type, exit code.",
    )
    s.add_argument("job", help="job id printed by kdcache submit")
    s.add_argument("--address", default=None, help=ADDRESS_HELP)
    s.set_defaults(func=run_status)

    g = sub.add_parser(
        "logs",
        help="a submitted job's logs (--follow: until it ends)",
        description="Print a Ray job's logs; with --follow, stream them until the job ends "
        "and exit like kdcache submit (0 succeeded, 1 failed or stopped).",
    )
    g.add_argument("job", help="job id printed by kdcache submit")
    g.add_argument("--address", default=None, help=ADDRESS_HELP)
    g.add_argument("-f", "--follow", action="store_true")
    g.set_defaults(func=run_logs)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _finish(result) -> int:
    if result.ok:
        print(f"kdcache: job {result.job_id} SUCCEEDED", file=sys.stderr)
        return 0
    if not result.done:
        print(
            f"kdcache: job {result.job_id} is still {result.status}; follow it with: "
            f"kdcache logs {result.job_id} --follow",
            file=sys.stderr,
        )
        return 1
    detail = f" ({result.error_type})" if result.error_type else ""
    print(
        f"kdcache: error: job {result.job_id} {result.status}{detail}: {result.message}",
        file=sys.stderr,
    )
    return 1


def _follow(job_id: str, address: str | None, timeout_s: float | None) -> int:
    from kdcache.jobs import submit

    try:
        result = submit.follow(job_id, address, _write, timeout_s=timeout_s)
    except KeyboardInterrupt:
        print(
            f"\nkdcache: stopped following job {job_id}; it keeps running. Follow it with "
            f"'kdcache logs {job_id} --follow', stop it with 'ray job stop {job_id}'",
            file=sys.stderr,
        )
        return 130
    return _finish(result)


def run_submit(args: argparse.Namespace, rest: list[str]) -> int:
    from kdcache.errors import ConfigError, require
    from kdcache.jobs import config as cfg
    from kdcache.jobs import submit

    stray = [r for r in rest if "=" not in r or r.startswith("-")]
    if stray:
        raise ConfigError(f"unrecognized arguments: {' '.join(stray)}")
    env_vars = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--env expects KEY=VALUE, got {item!r}")
        env_vars[key] = value
    runtime_env = cfg.read_file(args.runtime_env) if args.runtime_env else None
    spec = submit.job_spec(
        args.stage,
        args.config,
        [*args.overrides, *rest],
        working_dir=args.working_dir,
        excludes=args.exclude,
        pip=args.pip,
        env_vars=env_vars,
        runtime_env=runtime_env,
        workers=args.workers,
        use_gpu=args.gpu,
        cpus_per_worker=args.cpus_per_worker,
        entrypoint_num_cpus=args.entrypoint_num_cpus,
        entrypoint_num_gpus=args.entrypoint_num_gpus,
        submission_id=args.submission_id,
        python=args.python,
    )
    url = submit.resolve_address(args.address)
    # Ray logs every ignored .gitignore at INFO while packaging; keep its warnings only
    # (after importing it: its import sets the level of its loggers).
    require("ray.job_submission", "ray")
    logging.getLogger("ray").setLevel(max(logging.WARNING, logging.getLogger().level))
    shipped = f", with {', '.join(spec.shipped)}" if spec.shipped else ""
    print(
        f"kdcache: uploading {spec.runtime_env['working_dir']}{shipped} (excluding "
        f"{', '.join(spec.runtime_env['excludes'])}) to {url}",
        file=sys.stderr,
    )
    job_id = submit.submit(spec, url)
    print(f"kdcache: submitted job {job_id} to {url}: {spec.entrypoint}", file=sys.stderr)
    if args.no_wait:
        print(job_id)
        return 0
    return _follow(job_id, url, args.timeout_s)


def run_status(args: argparse.Namespace, rest: list[str]) -> int:
    from kdcache.jobs import submit

    result = submit.status(args.job, args.address)
    print(json.dumps(vars(result)))
    return 1 if result.status in ("FAILED", "STOPPED") else 0


def run_logs(args: argparse.Namespace, rest: list[str]) -> int:
    from kdcache.jobs import submit

    if args.follow:
        return _follow(args.job, args.address, None)
    _write(submit.logs(args.job, args.address))
    return 0
