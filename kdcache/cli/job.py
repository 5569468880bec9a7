"""The older entrypoint of a Ray job: ``python -m kdcache.cli.job build|train [--config FILE]``.

``kdcache submit`` and the KubeRay manifests now run the stage's command itself
(``kdcache build FILE`` / ``kdcache train FILE``: see :mod:`kdcache.jobs.submit`). This
entrypoint stays for jobs and manifests written for earlier versions: it runs the same
command on ``--config FILE`` or on the config in ``$KDCACHE_JOB_CONFIG`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence

from kdcache.errors import ConfigError
from kdcache.jobs.submit import CONFIG_ENV, STAGES

# -- the entrypoint that runs on the cluster ---------------------------------------------


def _run_stage(stage: str, shipped: str) -> int:
    """Write the shipped config to a private file and run ``kdcache STAGE FILE``."""
    from kdcache.cli.app import main

    with tempfile.TemporaryDirectory(prefix="kdcache-job-") as tmp:
        path = os.path.join(tmp, f"{stage}.json")
        with open(path, "w") as f:
            f.write(shipped)
        return main([stage, path])


def entrypoint_parser() -> argparse.ArgumentParser:
    """The arguments of the job entrypoint ``python -m kdcache.cli.job`` (manifests use it)."""
    p = argparse.ArgumentParser(prog="python -m kdcache.cli.job")
    p.add_argument("stage", choices=sorted(STAGES))
    p.add_argument("--config", default=None, help=f"config file (default: ${CONFIG_ENV})")
    return p


def job_main(argv: Sequence[str] | None = None) -> int:
    """The job's entrypoint: ``python -m kdcache.cli.job build|train [--config FILE]``.

    Runs the stage's ordinary command (``kdcache build`` / ``kdcache train``) on the
    config shipped in ``$KDCACHE_JOB_CONFIG``, or read from ``--config``.

    Returns:
        The command's exit code (2 for a kdcache error raised here).
    """
    args = entrypoint_parser().parse_args(argv)
    if args.config is not None:  # e.g. a ConfigMap mounted into a KubeRay head pod
        from kdcache.jobs import config as cfg

        try:
            shipped = json.dumps(cfg.read_file(args.config))
        except ConfigError as exc:
            sys.stderr.write(f"kdcache: error: {exc}\n")
            return 2
    else:
        shipped = os.environ.get(CONFIG_ENV, "")
    if not shipped:
        sys.stderr.write(
            f"kdcache: error: expected the job's config in ${CONFIG_ENV} or --config, found "
            f"neither; this entrypoint is run by 'kdcache submit'; use 'kdcache {args.stage} "
            "CONFIG' directly instead\n"
        )
        return 2
    return _run_stage(args.stage, shipped)


if __name__ == "__main__":
    sys.exit(job_main())
