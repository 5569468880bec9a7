"""Run a stage on a Ray cluster as a Ray job (the Ray Jobs API), and follow it.

``kdcache submit build|train CONFIG [key=value ...]`` type-checks the config locally
(overrides applied), packages the working directory (minus virtual environments, run
outputs and caches) as the job's ``runtime_env`` ``working_dir`` and runs the ordinary
command on the cluster, visibly: the job's entrypoint is ``kdcache build CONFIG
[key=value ...]`` (or ``kdcache train ...``), the one ``ray job list`` shows and the one
a Ray user would pass to ``ray job submit --working-dir . --``. So a job does exactly
what the same command does on a workstation, and ``ray job list/logs/stop`` show and
control it.

**Secrets never travel with a job.** Whatever a job carries is readable by anyone who can
reach the cluster's Jobs API (``ray job list`` shows each job's entrypoint, metadata and
``runtime_env``, with its ``env_vars``) and lands in the job's logs and in the uploaded
package. :func:`job_spec` therefore refuses, before anything is sent, credentials in a URI
(``s3://KEY:SECRET@bucket``, ``https://user:password@host``, ``?secret_key=...``) anywhere
in the config, the overrides, ``pip`` or the runtime environment; environment variables
whose names mark a secret (``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
``AWS_ACCESS_KEY_ID``, ``HF_TOKEN``, ``*_API_KEY``, ``*_PASSWORD``, see
:func:`secret_name`); secret-named keys with a string value in the config (``token``,
``hf_token``, ``api_key``); and a job server address with credentials in it. Messages
show such a value redacted (:func:`redact`). A job gets its credentials from the cluster
instead: the nodes' identity (an instance profile, IRSA, Workload Identity) or environment
variables set on the nodes when the cluster starts (a Kubernetes Secret in the pods'
``env``); see ``docs/security.md``.

The config travels as a file in the working directory. A config inside the working
directory that Ray uploads is named by its own relative path. One that is not uploaded
(outside the working directory, or under a git-ignored path such as ``runs/``: Ray's
upload honours ``.gitignore`` and ``.rayignore`` files and ``excludes``) is copied, for
the upload only, to ``.kdcache-jobs/<job id>/`` in the working directory, and the
entrypoint names that copy. With ``workers`` the student stage runs on Ray Train
(``TorchTrainer``, through ``kdcache train``'s own ``ray`` settings), one rank per worker.

Ray is optional: this module imports it only when a function needs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shlex
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdcache.errors import (  # noqa: F401  (re-exported: kdcache.jobs.submit.JobServerError)
    ConfigError,
    JobNotFoundError,
    JobServerError,
    KDCacheError,
    RetriableError,
    require,
)

log = logging.getLogger(__name__)


#: Environment variable read by the older entrypoint ``python -m kdcache.cli.job STAGE``
#: (the resolved config as JSON); ``kdcache submit`` now ships a file instead.


CONFIG_ENV = "KDCACHE_JOB_CONFIG"

#: Directory of the working directory where a config that Ray would not upload is
#: copied for the upload (``.kdcache-jobs/<job id>/<file>``); removed after it.


SHIP_DIR = ".kdcache-jobs"


#: Stage -> (config class in kdcache.jobs.config, command module that runs it).


STAGES: dict[str, tuple[str, str]] = {
    "build": ("BuildConfig", "kdcache.cli.build"),
    "train": ("TrainConfig", "kdcache.cli.train"),
}


#: Never uploaded with the working directory (gitignore-style patterns, as Ray takes them;
#: a leading "/" anchors a pattern at the working directory, so a package's own
#: ``cache/`` or ``build/`` subdirectory still travels).


DEFAULT_EXCLUDES = (
    ".git",
    ".venv",
    "venv",
    "/runs",
    "/caches",
    "/cache",
    "/build",
    "/dist",
    "__pycache__",
    "*.egg-info",
    ".mypy_cache",
    ".pytest_cache",
    ".ruff_cache",
    ".hypothesis",
)


TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass
class JobSpec:
    """Everything sent to the job server for one stage.

    Attributes:
        stage: ``"build"`` or ``"train"``.
        config: The resolved config (file plus overrides), plain JSON-able data.
        entrypoint: Shell command the job runs on the cluster: ``kdcache STAGE FILE
            [key=value ...]``, FILE relative to the working directory.
        runtime_env: Ray runtime environment (``working_dir``, ``excludes``, ``pip``,
            ``env_vars``).
        submission_id: The job's id (``kdcache-<stage>-<hex>`` unless given).
        config_file: The config file as the job sees it (relative to the working dir).
        shipped: Files copied into the working directory for the upload only:
            ``{relative path there: local source}`` (empty when the config is uploaded
            where it is).
        entrypoint_num_cpus: CPUs reserved for the entrypoint process.
        entrypoint_num_gpus: GPUs reserved for the entrypoint process.
        metadata: Labels shown by ``ray job list``.
    """

    stage: str
    config: dict[str, Any]
    entrypoint: str
    runtime_env: dict[str, Any]
    submission_id: str
    entrypoint_num_cpus: float | None = None
    entrypoint_num_gpus: float | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    config_file: str = ""
    shipped: dict[str, str] = field(default_factory=dict)


@dataclass
class JobResult:
    """A job's state as the job server reports it.

    Attributes:
        job_id: The submission id.
        status: ``PENDING``, ``RUNNING``, ``STOPPED``, ``SUCCEEDED`` or ``FAILED``.
        message: The server's description (for a failure: the exit code and the last logs).
        error_type: The server's error class for a failure, else None.
        driver_exit_code: Exit code of the entrypoint, when it has finished.
    """

    job_id: str
    status: str
    message: str | None = None
    error_type: str | None = None
    driver_exit_code: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == "SUCCEEDED"

    @property
    def done(self) -> bool:
        return self.status in TERMINAL


# -- secrets ----------------------------------------------------------------------------

#: Words of a name (split at ``_``, ``-``, ``.``; upper-cased) that mark a secret.
_SECRET_WORDS = frozenset(
    {"SECRET", "TOKEN", "PASSWORD", "PASSWD", "PASSPHRASE", "CREDENTIAL", "CREDENTIALS", "APIKEY"}
)
#: Consecutive words that do (``AWS_ACCESS_KEY_ID``, ``OPENAI_API_KEY``, ...).
_SECRET_PAIRS = frozenset(
    {
        ("ACCESS", "KEY"),
        ("API", "KEY"),
        ("PRIVATE", "KEY"),
        ("ACCOUNT", "KEY"),
        ("STORAGE", "KEY"),
        ("CONNECTION", "STRING"),
    }
)
#: In config keys "token" is a word of language modelling (``eos_token``, ``pad_token``):
#: there only these mark a secret.
_TOKEN_OWNERS = frozenset({"AUTH", "ACCESS", "SESSION", "API", "HF", "HUB", "BEARER", "REFRESH"})

_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*)://(?P<info>[^/\s@?#]+)@")
_QUERY_PARAM = re.compile(r"(?P<sep>[?&;])(?P<name>[A-Za-z0-9_.\-]+)=(?P<value>[^&;\s#]*)")


def _words(name: str) -> list[str]:
    return [w for w in re.split(r"[_\-.]", name.upper()) if w]


def secret_name(name: str, *, config_key: bool = False) -> bool:
    """Whether an environment variable (or, with ``config_key``, a config key) is named
    like a secret: a word such as SECRET, TOKEN, PASSWORD or CREDENTIALS, or a pair such
    as ACCESS_KEY or API_KEY (``TOKENIZERS_PARALLELISM`` and ``MAX_TOKENS`` are not).

    In config keys a bare ``token`` word only counts as the whole key or after AUTH,
    ACCESS, SESSION, API, HF, HUB, BEARER or REFRESH (``eos_token`` is a vocabulary entry).

    Example:
        >>> secret_name("AWS_SECRET_ACCESS_KEY"), secret_name("TOKENIZERS_PARALLELISM")
        (True, False)
        >>> secret_name("eos_token", config_key=True), secret_name("hf_token", config_key=True)
        (False, True)
    """
    words = _words(name)
    for i, word in enumerate(words):
        if word == "TOKEN" and config_key:
            if len(words) == 1 or (i and words[i - 1] in _TOKEN_OWNERS):
                return True
            continue
        if word in _SECRET_WORDS:
            return True
        if i and (words[i - 1], word) in _SECRET_PAIRS:
            return True
    return False


def _secret_userinfo(scheme: str, info: str) -> bool:
    # "user:password@" always; a bare "TOKEN@" too, except ssh's user name (git@github.com)
    return ":" in info or "ssh" not in scheme.lower().split("+")


def credentials_in(text: str) -> bool:
    """Whether ``text`` holds credentials in a URI: ``scheme://user:password@host``,
    ``https://TOKEN@host``, or a secret-named query option (``?secret_key=...``,
    ``&session_token=...``, ``&sig=...``).

    Example:
        >>> credentials_in("s3://AKIA:wJalr@bucket/cache"), credentials_in("s3://bucket/c")
        (True, False)
    """
    for m in _USERINFO.finditer(text):
        if _secret_userinfo(m["scheme"], m["info"]):
            return True
    if "://" in text or text.startswith("?"):
        for m in _QUERY_PARAM.finditer(text):
            name = m["name"]
            if m["value"] and (secret_name(name) or name.lower() in ("sig", "signature")):
                return True
    return False


def redact(text: str) -> str:
    """``text`` with the credentials of its URIs replaced by ``***`` (for messages).

    Example:
        >>> redact("s3://AKIA:wJalr@bucket/p?region=x&secret_key=abc")
        's3://***@bucket/p?region=x&secret_key=***'
    """

    def info(m: re.Match[str]) -> str:
        if _secret_userinfo(m["scheme"], m["info"]):
            return f"{m['scheme']}://***@"
        return m.group(0)

    def query(m: re.Match[str]) -> str:
        name = m["name"]
        if secret_name(name) or name.lower() in ("sig", "signature"):
            return f"{m['sep']}{name}=***"
        return m.group(0)

    out = _USERINFO.sub(info, text)
    return _QUERY_PARAM.sub(query, out) if "://" in out else out


_HOW = (
    "a submitted job's entrypoint, metadata and runtime_env (with its env_vars) are "
    "readable by anyone who can reach the cluster's Jobs API, and they reach the job's "
    "logs; give the cluster its own credentials instead: the nodes' identity (an instance "
    "profile, IRSA, Workload Identity) or environment variables set on the nodes when the "
    "cluster starts (for KubeRay, a Kubernetes Secret in the pods' env); see "
    "docs/security.md"
)


def _walk(value: Any, where: str) -> Iterator[tuple[str, str, Any]]:
    """(dotted path, key, value) of every leaf of nested dicts and lists."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _walk(v, f"{where}.{k}" if where else str(k))
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            yield from _walk(v, f"{where}.{i}" if where else str(i))
    else:
        yield where, where.rpartition(".")[2], value


def _refuse_in_config(config: dict[str, Any], overrides: Sequence[str] = ()) -> None:
    """Refuse credentials in a config (file data or resolved) or in ``key=value``
    overrides, before the config is validated (whose messages would echo the value)."""
    items = list(_walk(config, ""))
    for item in overrides:
        key, _, value = item.partition("=")
        items.append((key, key.rpartition(".")[2], value))
    for path, key, value in items:
        if not isinstance(value, str):
            continue
        if credentials_in(value):
            raise ConfigError(
                f"the config's {path} holds credentials in a URI ({redact(value)}); remove "
                f"them from the URI: {_HOW}"
            )
        if value and secret_name(key, config_key=True):
            raise ConfigError(
                f"expected no secrets in the config, found {path}, named like one; it would "
                f"travel in the job's config file and command line: {_HOW}"
            )


def refuse_secrets(
    config: dict[str, Any],
    runtime_env: dict[str, Any],
    *,
    entrypoint: str = "",
    metadata: dict[str, str] | None = None,
) -> None:
    """Refuse a job that would carry a secret (see the module docstring).

    Args:
        config: The resolved config (overrides applied), as :func:`stage_config` returns.
        runtime_env: The job's runtime environment.
        entrypoint: The job's command line.
        metadata: The job's labels.

    Raises:
        ConfigError: naming where the secret is, with the value redacted, and the
            supported way to give a job credentials.
    """
    _refuse_in_config(config)
    env = runtime_env.get("env_vars") or {}
    for name, value in env.items():
        if secret_name(str(name)):
            raise ConfigError(
                f"expected no secrets in the job's environment, found {name} (--env or the "
                f"runtime env's env_vars): {_HOW}"
            )
        if credentials_in(str(value)):
            raise ConfigError(
                f"the job's environment variable {name} holds credentials in a URI "
                f"({redact(str(value))}): {_HOW}"
            )
    for path, _, value in _walk({k: v for k, v in runtime_env.items() if k != "env_vars"}, ""):
        if isinstance(value, str) and credentials_in(value):
            pip = (
                "for a private package index, configure pip on the nodes (pip.conf, or "
                "PIP_INDEX_URL in their environment); "
                if path.startswith("pip")
                else ""
            )
            raise ConfigError(
                f"the job's runtime_env {path} holds credentials in a URI ({redact(value)}); "
                f"{pip}{_HOW}"
            )
    for what, text in (
        ("entrypoint", entrypoint),
        *((f"metadata {k}", v) for k, v in (metadata or {}).items()),
    ):
        if credentials_in(text):
            raise ConfigError(f"the job's {what} holds credentials ({redact(text)}): {_HOW}")


def resolve_address(address: str | None) -> str:
    """The job server address: ``address``, else ``RAY_API_SERVER_ADDRESS`` or
    ``RAY_ADDRESS`` when it is an http(s) URL.

    Raises:
        ConfigError: none is given, the address is a GCS address (``host:6379``)
            rather than the dashboard's job server, or it holds credentials.
    """
    if not address:
        env = os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS", "")
        address = env if env.startswith(("http://", "https://")) else None
    if not address:
        raise ConfigError(
            "expected the Ray job server address, found none; pass --address "
            "http://HEAD:8265 (the dashboard port) or set RAY_API_SERVER_ADDRESS"
        )
    if credentials_in(address):
        raise ConfigError(
            f"the job server address {redact(address)} holds credentials, which would be "
            "printed and logged; give the address alone and Ray's token through the "
            "environment: RAY_AUTH_MODE=token with RAY_AUTH_TOKEN_PATH (a file) or "
            "RAY_AUTH_TOKEN"
        )
    if not address.startswith(("http://", "https://", "ray://")):
        host, _, port = address.rpartition(":")
        if port == "6379":
            raise ConfigError(
                f"{address} looks like the GCS address; the Jobs API is served by the "
                f"dashboard: use http://{host or '127.0.0.1'}:8265"
            )
        address = f"http://{address}"
    return address


def stage_config(stage: str, path: str, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read ``path``, apply ``key=value`` overrides and type-check it for ``stage``.

    Checking happens here, before anything is uploaded, so a typo fails in a second
    rather than after the cluster has set up the job.

    Returns:
        The resolved config as plain data (what the job receives).

    Raises:
        ConfigError: unknown stage, a stage this kdcache version lacks, an unreadable
            file, an unknown key or a wrongly typed value.
    """
    from kdcache.jobs import config as cfg

    if stage not in STAGES:
        raise ConfigError(f"expected a stage in {sorted(STAGES)}, got {stage!r}")
    class_name, _ = STAGES[stage]
    # what `kdcache STAGE` runs on the cluster; raises on unknown keys and wrong types
    return cfg.to_dict(cfg.load(getattr(cfg, class_name), path, list(overrides)))


def uploaded(working_dir: str, relative: str, excludes: Sequence[str]) -> bool:
    """Whether Ray's ``working_dir`` upload keeps the file ``relative`` (to ``working_dir``).

    Applies what Ray's packaging applies, with Ray's own matchers: the runtime env's
    ``excludes``, and the ``.gitignore`` (unless ``RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1``)
    and ``.rayignore`` files of the working directory and each directory below it on the
    way to the file. True when Ray's (private) helpers cannot be imported.
    """
    try:
        from ray._private.runtime_env.packaging import (
            _get_excludes,
            get_excludes_from_ignore_files,
        )
    except ImportError:  # Ray moved its private helpers; the job's own error will tell
        return True
    include_gitignore = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"
    root = Path(working_dir).absolute()
    checks = [_get_excludes(root, list(excludes))]
    directory = root
    for part in Path(relative).parts:
        checks += get_excludes_from_ignore_files(directory, include_gitignore=include_gitignore)
        directory = directory / part
        if any(check(directory) for check in checks):
            return False
    return True


def job_spec(
    stage: str,
    config_path: str,
    overrides: Sequence[str] = (),
    *,
    working_dir: str = ".",
    excludes: Sequence[str] = (),
    pip: Sequence[str] = (),
    env_vars: dict[str, str] | None = None,
    runtime_env: dict[str, Any] | None = None,
    workers: int = 0,
    use_gpu: bool = False,
    cpus_per_worker: float = 1.0,
    entrypoint_num_cpus: float | None = None,
    entrypoint_num_gpus: float | None = None,
    submission_id: str | None = None,
    python: str | None = None,
) -> JobSpec:
    """Describe the Ray job that runs ``stage`` with the config at ``config_path``.

    Args:
        stage: ``"build"`` (teacher stage) or ``"train"`` (student stage).
        config_path: A YAML/TOML/JSON config for that stage.
        overrides: Dotted ``key=value`` overrides, applied and checked here.
        working_dir: Directory uploaded as the job's working directory (it is on the
            job's ``PYTHONPATH``, so ``pipelines.*`` factories import on the cluster).
            The config goes with it (see the module's docstring).
        excludes: Extra gitignore-style patterns left out of the upload (added to
            :data:`DEFAULT_EXCLUDES`).
        pip: Packages the cluster installs for the job (runtime_env ``pip``).
        env_vars: Environment variables for the job; never secrets (refused: see the
            module docstring; credentials come from the cluster's own identity or the
            nodes' environment).
        runtime_env: A base runtime environment (``ray job submit --runtime-env``
            style); the arguments above are merged into it.
        workers: Student stage only: Ray Train ranks (sets ``ray.enabled``,
            ``ray.num_workers``); 0 keeps the config's ``ray`` settings (no Ray Train
            unless the config enables it: ``kdcache train`` in the entrypoint process).
        use_gpu: Student stage, with ``workers``: one GPU per rank (``ray.use_gpu``).
        cpus_per_worker: Student stage, with ``workers``: CPUs per rank.
        entrypoint_num_cpus: CPUs reserved for the entrypoint process.
        entrypoint_num_gpus: GPUs reserved for the entrypoint process.
        submission_id: Job id; default ``kdcache-<stage>-<12 hex>``.
        python: Run ``PYTHON -m kdcache.cli`` on the cluster instead of the ``kdcache``
            command (None: ``kdcache``, which must be on the cluster's ``PATH``).

    Returns:
        A :class:`JobSpec`; nothing is sent yet.

    Raises:
        ConfigError: a bad config (see :func:`stage_config`), a missing working
            directory, ``workers`` for the teacher stage, a config that Ray's upload
            would leave out even when copied to ``.kdcache-jobs/``, or a secret the job
            would carry (:func:`refuse_secrets`; the message shows it redacted).
    """
    if workers < 0 or cpus_per_worker <= 0:
        raise ConfigError(
            f"expected workers >= 0 and cpus_per_worker > 0, got {workers} and {cpus_per_worker}"
        )
    overrides = list(overrides)
    if stage == "build" and (workers or use_gpu):
        raise ConfigError(
            "workers/use_gpu apply to the student stage (Ray Train); the teacher stage "
            "scales with executor.num_actors"
        )
    if stage == "train" and workers:
        overrides += [
            "ray.enabled=true",
            f"ray.num_workers={workers}",
            f"ray.use_gpu={'true' if use_gpu else 'false'}",
            f"ray.cpus_per_worker={cpus_per_worker}",
        ]
    if os.path.exists(config_path):  # before validation, whose messages echo values
        from kdcache.jobs.config import read_file

        _refuse_in_config(read_file(config_path), overrides)
    data = stage_config(stage, config_path, overrides)
    # Inside a job, Ray is the cluster the job runs on (the job supervisor sets
    # RAY_ADDRESS); an address from the submitting machine means nothing there.
    section = {"build": "executor", "train": "ray"}[stage]
    if (data.get(section) or {}).get("address"):
        log.info(
            "%s.address %r dropped: the job joins its own cluster",
            section,
            data[section]["address"],
        )
        data[section]["address"] = None
        overrides.append(f"{section}.address=null")
    if not os.path.isdir(working_dir):
        raise ConfigError(f"working directory {working_dir!r} does not exist")
    rt: dict[str, Any] = dict(runtime_env or {})
    rt["working_dir"] = root = os.path.abspath(working_dir)
    rt["excludes"] = sorted({*rt.get("excludes", []), *DEFAULT_EXCLUDES, *excludes})
    if pip:
        rt["pip"] = [*rt.get("pip", []), *pip]
    env = dict(rt.get("env_vars") or {})
    env.update(env_vars or {})
    if env:
        rt["env_vars"] = env
    job_id = submission_id or f"kdcache-{stage}-{uuid.uuid4().hex[:12]}"
    config_file = os.path.relpath(os.path.abspath(config_path), root)
    shipped = {}
    if config_file.startswith(os.pardir) or not uploaded(root, config_file, rt["excludes"]):
        config_file = os.path.join(SHIP_DIR, job_id, os.path.basename(config_path))
        if not uploaded(root, config_file, rt["excludes"]):
            raise ConfigError(
                f"{config_path} is not uploaded with {root} (outside it or ignored), and "
                f"neither would its copy {config_file} be: an ignore file or exclude there "
                f"matches {SHIP_DIR}/; un-ignore it ('!{SHIP_DIR}/' in .gitignore) or put "
                "the config in an uploaded place of the working directory"
            )
        shipped[config_file] = os.path.abspath(config_path)
    command = "kdcache" if python is None else f"{python} -m kdcache.cli"
    entrypoint = shlex.join([*shlex.split(command), stage, config_file, *overrides])
    metadata = {"kdcache_stage": stage, "kdcache_config": os.path.basename(config_path)}
    refuse_secrets(data, rt, entrypoint=entrypoint, metadata=metadata)
    return JobSpec(
        stage=stage,
        config=data,
        entrypoint=entrypoint,
        runtime_env=rt,
        submission_id=job_id,
        entrypoint_num_cpus=entrypoint_num_cpus,
        entrypoint_num_gpus=entrypoint_num_gpus,
        metadata=metadata,
        config_file=config_file,
        shipped=shipped,
    )


@contextlib.contextmanager
def _placed(spec: JobSpec) -> Iterator[None]:
    """Copy ``spec.shipped`` into the working directory for the upload; remove them after
    (and the directories made for them, when empty)."""
    root = spec.runtime_env["working_dir"]
    made = []
    try:
        for relative, source in spec.shipped.items():
            target = os.path.join(root, relative)
            directory = os.path.dirname(target)
            while directory != root and not os.path.isdir(directory):
                made.append(directory)
                directory = os.path.dirname(directory)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copyfile(source, target)
        yield
    finally:
        for relative in spec.shipped:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(root, relative))
        for directory in sorted(made, key=len, reverse=True):
            with contextlib.suppress(OSError):  # not empty: another submission's files
                os.rmdir(directory)


def _client(address: str | None) -> Any:
    require("ray", "ray")
    from ray.exceptions import AuthenticationError, RayError
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    try:
        return JobSubmissionClient(url)
    except AuthenticationError as exc:
        raise JobServerError(
            f"the Ray job server at {url} asks for its authentication token: expected "
            f"RAY_AUTH_MODE=token with RAY_AUTH_TOKEN_PATH (a file holding the cluster's "
            f"token) or RAY_AUTH_TOKEN here, found RAY_AUTH_MODE="
            f"{os.environ.get('RAY_AUTH_MODE', '(unset)')}; for a head of "
            'cluster/local_ray.sh run: eval "$(bash cluster/local_ray.sh env)" '
            f"(Ray says: {str(exc).splitlines()[0]})"
        ) from exc
    except RayError as exc:
        raise JobServerError(f"the Ray job server at {url} refused the connection: {exc}") from exc
    except (ConnectionError, RuntimeError) as exc:
        raise JobServerError(
            f"cannot reach the Ray job server at {url}: {exc}; is the head running with "
            "its dashboard (bash cluster/local_ray.sh start), and is this the dashboard "
            "port (8265 by default)?"
        ) from exc


def submit(spec: JobSpec, address: str | None, *, agent_wait_s: float = 60.0) -> str:
    """Send ``spec`` to the job server at ``address``; returns the job id at once.

    The files of ``spec.shipped`` are in the working directory while it is uploaded
    (during this call) and removed when it returns or raises.

    Args:
        spec: What to run (see :func:`job_spec`).
        address: Job server address (see :func:`resolve_address`).
        agent_wait_s: How long to keep retrying while a freshly started head has no
            job agent yet.

    Raises:
        JobServerError: the server cannot be reached or rejects the job (for example an
            id already in use, or a working directory over Ray's upload limit).
        MissingDependencyError: Ray (with the ``default`` extra) is not installed.
    """
    client = _client(address)
    with _placed(spec):
        return _submit(client, spec, agent_wait_s)


def _submit(client: Any, spec: JobSpec, agent_wait_s: float) -> str:
    deadline = time.monotonic() + agent_wait_s
    while True:
        try:
            return str(
                client.submit_job(
                    entrypoint=spec.entrypoint,
                    runtime_env=spec.runtime_env,
                    submission_id=spec.submission_id,
                    metadata=spec.metadata,
                    entrypoint_num_cpus=spec.entrypoint_num_cpus,
                    entrypoint_num_gpus=spec.entrypoint_num_gpus,
                )
            )
        except (ConnectionError, RuntimeError, ValueError) as exc:
            # A head that has just started has no job agent registered for a few
            # seconds; the server says so and asks to try again.
            if "No available agent" in str(exc) and time.monotonic() < deadline:
                log.info("the cluster's job agent is not ready yet; retrying in 2 s")
                time.sleep(2.0)
                continue
            hint = ""
            if "No available agent" in str(exc):
                hint = (
                    f" (still after {agent_wait_s:g} s: the head's dashboard agent did not "
                    "start; see dashboard_agent.log in the head's session logs, often a port "
                    "taken by another Ray on the machine: RAY_AGENT_PORT for local_ray.sh)"
                )
            raise JobServerError(
                f"the job server refused job {spec.submission_id}: {exc}{hint}"
            ) from exc


def status(job_id: str, address: str | None) -> JobResult:
    """The current state of job ``job_id``.

    Raises:
        JobNotFoundError: no such job on that cluster.
        JobServerError: the server cannot be reached.
    """
    client = _client(address)
    try:
        info = client.get_job_info(job_id)
    except RuntimeError as exc:
        if "does not exist" in str(exc) or "404" in str(exc):
            raise JobNotFoundError(
                f"no job {job_id!r} on {resolve_address(address)}; list jobs with "
                "'ray job list --address URL'"
            ) from exc
        raise JobServerError(f"cannot read job {job_id!r}: {exc}") from exc
    error_type = getattr(info, "error_type", None)
    return JobResult(
        job_id=job_id,
        status=str(info.status),
        message=info.message,
        error_type=None if error_type is None else str(error_type),
        driver_exit_code=getattr(info, "driver_exit_code", None),
    )


def logs(job_id: str, address: str | None) -> str:
    """Everything job ``job_id`` has written to stdout and stderr so far.

    Raises:
        JobNotFoundError: no such job.
        JobServerError: the server cannot be reached.
    """
    status(job_id, address)  # a clear error for an unknown id
    try:
        return str(_client(address).get_job_logs(job_id))
    except RuntimeError as exc:
        raise JobServerError(f"cannot read the logs of job {job_id!r}: {exc}") from exc


def follow(
    job_id: str,
    address: str | None,
    sink: Callable[[str], None],
    *,
    poll_s: float = 1.0,
    timeout_s: float | None = None,
) -> JobResult:
    """Stream job ``job_id``'s logs into ``sink`` until it ends; return its final state.

    Args:
        job_id: The submission id.
        address: Job server address (see :func:`resolve_address`).
        sink: Called with each chunk of log text, in order.
        poll_s: Seconds between status polls once the log stream has closed.
        timeout_s: Give up waiting after this many seconds (the job keeps running).

    Returns:
        The job's :class:`JobResult`; ``done`` is False only after a timeout.

    Raises:
        JobNotFoundError: no such job.
        JobServerError: the server cannot be reached.
    """
    result = status(job_id, address)
    client = _client(address)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sink(chunk)

    if not result.done:
        try:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            asyncio.run(asyncio.wait_for(tail(), remaining))
        except asyncio.TimeoutError:
            return status(job_id, address)
        except (ConnectionError, OSError, RuntimeError) as exc:
            log.warning("log stream of %s closed early (%s); polling its status", job_id, exc)
    else:
        sink(logs(job_id, address))
    while True:  # the stream closes when the driver exits; the status follows shortly
        result = status(job_id, address)
        if result.done or (deadline is not None and time.monotonic() > deadline):
            return result
        time.sleep(poll_s)


def stop(job_id: str, address: str | None) -> bool:
    """Ask the cluster to stop job ``job_id``; True when it was still running.

    Raises:
        JobNotFoundError: no such job.
        JobServerError: the server cannot be reached.
    """
    status(job_id, address)
    return bool(_client(address).stop_job(job_id))
