"""The sweep job: many students from one cache, as Ray Tune trials (``kdcache sweep``).

A :class:`SweepConfig` names a train config (a file or an inline mapping) and the values
to try for some of its dotted keys (``loss.temperature``, ``loss.alpha``, ``loss.kind``,
``student.kwargs.hidden``, ``lr``, ...). The trials are drawn on the driver, a grid in
order or a seeded random search, and each becomes a :class:`kdcache.jobs.config.TrainConfig`
through the same ``key=value`` overrides as ``kdcache train`` (so every trial is checked
before any starts, and ``kdcache train TRAIN <its overrides>`` reruns one alone). Ray Tune
runs them, one function trainable per trial, each a normal :func:`train_from_config` run
with its own output directory; at the end a results table (CSV and terminal) and a plot
of the metric against each swept value are written under ``output_dir``.

Temperature is checked once, up front, against the cache's target spec: dense entries
re-temper exactly to any tau; sparse top-k / top-p entries only to a tau of their stored
log-partition grid (``params.grid_temperatures``); sampled and mixture entries and token
caches never. A refused value stops the sweep before any trial starts, naming it and why.

Example (YAML)::

    train: train.yaml                  # or an inline TrainConfig mapping
    output_dir: runs/sweep
    search: grid                       # or random, with num_samples and seed
    parameters:
      loss.alpha: [0.5, 0.9]
      loss.temperature: [2.0, 4.0]
      lr: {low: 1.0e-4, high: 1.0e-2, log: true}   # random search only
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import logging
import math
import os
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

from pydantic import BeforeValidator

from kdcache import schema
from kdcache.errors import ConfigError, SpecMismatchError, require
from kdcache.jobs.config import (
    TrainConfig,
    apply_overrides,
    from_dict,
    read_file,
    to_dict,
)
from kdcache.local_ray import loopback_ray
from kdcache.validation import config_dataclass

log = logging.getLogger(__name__)

#: The keys of a ``{low, high, log}`` range of a random search.
RANGE_KEYS = frozenset({"low", "high", "log"})
#: TrainConfig keys a sweep sets itself, or that a trial cannot change.
_FIXED_KEYS = ("output_dir", "ray")


@config_dataclass
class RangeConfig:
    """A float range of a random search: uniform on [low, high], or log-uniform with
    ``log: true`` (both ends > 0)."""

    low: float
    high: float
    log: bool = False

    def __post_init__(self) -> None:
        if not self.low < self.high:
            raise ConfigError(f"a range needs low < high, got low={self.low}, high={self.high}")
        if self.log and self.low <= 0:
            raise ConfigError(f"a log range needs low > 0, got low={self.low}")


def _flat_parameters(value: Any) -> Any:
    """``{loss: {alpha: [..]}}`` (as YAML nesting or ``parameters.loss.alpha=[..]``
    overrides write it) as ``{"loss.alpha": [..]}``; a mapping with ``low`` or ``high`` is
    a range, not a level. Of two values for one key, the later wins."""
    if not isinstance(value, Mapping):
        return value
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, Mapping) and node and not {"low", "high"} & set(node):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            flat.pop(prefix, None)  # a later (overriding) value goes last
            flat[prefix] = node

    walk("", value)
    return flat


@config_dataclass
class SweepConfig:
    """A sweep of students over one cache: ``kdcache sweep CONFIG``.

    Attributes:
        train: The base train config: a path to a YAML/TOML/JSON file (relative to the
            current directory), or an inline :class:`TrainConfig` mapping (its
            ``output_dir`` may be left out: each trial gets its own).
        output_dir: ``trials/trial-NNN/`` (one ``kdcache train`` output each),
            ``results.csv``, ``results.png``, ``sweep.json`` and Tune's ``tune/``.
        parameters: Dotted TrainConfig key -> a list of values (the grid's axis, or the
            random search's choices) or a ``{low, high, log}`` range (random search only).
            Nested mappings (``loss: {alpha: [..]}``) are read as dotted keys.
        search: ``grid`` (every combination, in order) or ``random`` (``num_samples``
            draws seeded by ``seed``).
        num_samples: Trials of a random search (a grid runs each point once; sweep
            ``seed`` to repeat it).
        seed: Seeds the random search's draws (not the students: that is ``train.seed``).
        metric: The reported metric that ranks trials (``eval/accuracy``,
            ``eval/cross_entropy``, ``eval/perplexity`` where the train job reports it).
        mode: ``max`` or ``min`` of ``metric``.
        address: Ray address of a cluster (None: ``RAY_ADDRESS``, else a new local Ray on
            127.0.0.1). On a cluster, every path must be reachable from every node.
        cpus_per_trial, gpus_per_trial: Resources each trial requests.
        max_concurrent_trials: At most this many trials at once (None: as resources allow).
    """

    train: str | dict[str, Any]
    output_dir: str
    parameters: Annotated[dict[str, list[Any] | RangeConfig], BeforeValidator(_flat_parameters)]
    search: str = "grid"
    num_samples: int = 1
    seed: int = 0
    metric: str = "eval/accuracy"
    mode: str = "max"
    address: str | None = None
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent_trials: int | None = None

    def __post_init__(self) -> None:
        if "://" in self.output_dir:
            raise ConfigError(
                f"output_dir: a sweep writes to a local directory (on a cluster, one every "
                f"node shares), got {self.output_dir!r}"
            )
        if self.search not in ("grid", "random"):
            raise ConfigError(f"search must be 'grid' or 'random', got {self.search!r}")
        if self.mode not in ("max", "min"):
            raise ConfigError(f"mode must be 'max' or 'min', got {self.mode!r}")
        if not self.parameters:
            raise ConfigError("parameters: give at least one dotted TrainConfig key to sweep")
        for key, values in self.parameters.items():
            where = f"parameters.{key}"
            if not key or any(not part for part in key.split(".")):
                raise ConfigError(f"{where}: expected a dotted TrainConfig key like loss.alpha")
            if key.split(".")[0] in _FIXED_KEYS:
                raise ConfigError(
                    f"{where}: a sweep sets output_dir per trial and runs each trial in one "
                    "Tune worker; sweep other keys"
                )
            if isinstance(values, RangeConfig):
                if self.search == "grid":
                    raise ConfigError(
                        f"{where}: a {{low, high}} range needs search: random; a grid takes "
                        "a list of values"
                    )
            elif not values:
                raise ConfigError(f"{where}: give at least one value")
        if self.num_samples < 1:
            raise ConfigError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.search == "grid" and self.num_samples != 1:
            raise ConfigError(
                "num_samples is for search: random; a grid runs each point once (sweep "
                "seed: [0, 1, 2] to repeat it)"
            )
        if self.cpus_per_trial <= 0 or self.gpus_per_trial < 0:
            raise ConfigError("cpus_per_trial must be > 0 and gpus_per_trial >= 0")
        if self.max_concurrent_trials is not None and self.max_concurrent_trials < 1:
            raise ConfigError(
                f"max_concurrent_trials must be >= 1, got {self.max_concurrent_trials}"
            )


def load_sweep(path: str, overrides: Sequence[str] = ()) -> SweepConfig:
    """Read a sweep config file, apply ``key=value`` overrides and validate it.

    ``parameters.loss.alpha=[0.1,0.5]`` sets (or replaces) one swept key.

    Raises:
        ConfigError: see :func:`kdcache.jobs.config.load`; errors name the dotted path.
    """
    data = read_file(path)
    if "parameters" in data:  # flat first, so that an override's nested key comes last
        data["parameters"] = _flat_parameters(data["parameters"])
    return from_dict(SweepConfig, apply_overrides(data, list(overrides)))


# -- the trials --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Trial:
    """One trial: its index and name, swept values, overrides and validated train config."""

    index: int
    values: dict[str, Any]
    overrides: list[str]
    config: TrainConfig

    @property
    def name(self) -> str:
        return f"trial-{self.index:03d}"


def expand_trials(cfg: SweepConfig) -> list[dict[str, Any]]:
    """The swept values of every trial, in trial order.

    A grid is every combination, the first parameter varying slowest; a random search
    draws ``num_samples`` times from ``numpy.random.default_rng(seed)``: a list is a
    uniform choice, a range uniform (or log-uniform) on [low, high].

    Returns:
        One ``{dotted key: value}`` per trial.
    """
    keys = list(cfg.parameters)
    if cfg.search == "grid":
        axes = [list(v) for v in cfg.parameters.values() if not isinstance(v, RangeConfig)]
        return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*axes)]
    import numpy as np

    rng = np.random.default_rng(cfg.seed)
    trials = []
    for _ in range(cfg.num_samples):
        values: dict[str, Any] = {}
        for key, space in cfg.parameters.items():
            if isinstance(space, RangeConfig):
                if space.log:
                    lo, hi = math.log(space.low), math.log(space.high)
                    values[key] = float(math.exp(rng.uniform(lo, hi)))
                else:
                    values[key] = float(rng.uniform(space.low, space.high))
            else:
                values[key] = space[int(rng.integers(len(space)))]
        trials.append(values)
    return trials


def _yaml_value(key: str, value: Any) -> str:
    """``value`` as the YAML text of a ``key=value`` override that reads back equal."""
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, width=10**9).strip()
    if text.endswith("\n..."):
        text = text[: -len("\n...")]
    if yaml.safe_load(text) != value:
        raise ConfigError(f"parameters.{key}: value {value!r} does not survive a YAML round trip")
    return text


def trial_overrides(values: Mapping[str, Any]) -> list[str]:
    """The ``key=value`` overrides of a trial (what ``kdcache train`` takes)."""
    return [f"{k}={_yaml_value(k, v)}" for k, v in values.items()]


def base_train_data(cfg: SweepConfig) -> dict[str, Any]:
    """The base train config as plain data (read from its file when ``train`` is a path)."""
    if isinstance(cfg.train, str):
        return read_file(cfg.train)
    return dict(cfg.train)


def make_trials(cfg: SweepConfig, base: Mapping[str, Any] | None = None) -> list[Trial]:
    """Every trial's validated train config, with its output dir under ``output_dir``.

    Args:
        cfg: The sweep.
        base: The base train config data (default: :func:`base_train_data`).

    Raises:
        ConfigError: the base config sets ``ray.enabled``, or a trial's config is invalid;
            the message names the trial, its overrides and the dotted path.
    """
    base = dict(base_train_data(cfg) if base is None else base)
    if (base.get("ray") or {}).get("enabled"):
        raise ConfigError(
            "train.ray.enabled: each sweep trial runs as one Ray Tune trial; drop ray.enabled "
            "from the train config (the sweep's address picks the cluster)"
        )
    root = os.path.abspath(cfg.output_dir)
    trials = []
    for index, values in enumerate(expand_trials(cfg)):
        overrides = trial_overrides(values)
        trial_dir = os.path.join(root, "trials", f"trial-{index:03d}")
        data = apply_overrides({**base, "output_dir": trial_dir}, overrides, cls=TrainConfig)
        try:
            config = from_dict(TrainConfig, data)
        except ConfigError as exc:
            raise ConfigError(f"trial {index} ({' '.join(overrides)}): {exc}") from exc
        trials.append(Trial(index, values, overrides, config))
    return trials


# -- the temperature rule ----------------------------------------------------------------


def retemper_refusal(spec: schema.TargetSpec, stored: float, temperature: float) -> str | None:
    """Why an entry of ``spec`` (stored at ``stored``) cannot stream at ``temperature``,
    or None when it can, exactly."""
    if math.isclose(temperature, stored, rel_tol=1e-6) or not spec.is_sparse:
        return None
    if spec.kind not in schema.RETEMPER_KINDS:
        why = (
            f"their draws were made at temperature {stored} and are no sample at another"
            if spec.kind == "sampled"
            else "a mixture has no single normaliser to re-temper"
        )
        return f"{spec.kind} entries cannot be re-tempered ({why})"
    grid = spec.grid_temperatures
    if not any(math.isclose(temperature, g, rel_tol=1e-6) for g in grid):
        return (
            f"temperature {temperature} is not in the entry's grid {tuple(grid)} (a "
            f"{spec.kind} entry re-tempers exactly only to a stored log-partition)"
        )
    return None


def check_temperatures(
    cache: Any, temperatures: Sequence[float], *, layout: str = "records"
) -> None:
    """Refuse the temperatures a cache cannot stream exactly, all at once, before training.

    Args:
        cache: An open :class:`kdcache.CacheEntry` or :class:`kdcache.EnsembleView`.
        temperatures: The tau of every trial that reads soft targets.
        layout: The dataset's layout; a ``tokens`` cache streams at its own tau only.

    Raises:
        SpecMismatchError: naming each refused temperature, the entry and the reason.
    """
    from kdcache.stores.view import as_view, check_reader

    view = as_view(cache)
    reasons: dict[float, list[str]] = {}
    for tau in dict.fromkeys(float(t) for t in temperatures):
        if math.isclose(tau, view.temperature, rel_tol=1e-6):
            continue
        if layout == "tokens":
            reasons.setdefault(tau, []).append(
                "a token-level cache streams soft targets at its own temperature "
                f"{view.temperature} only"
            )
            continue
        for e in view.entries:
            why = retemper_refusal(e.target_spec, view.temperature, tau)
            if why is not None:
                reasons.setdefault(tau, []).append(f"entry {e.key}: {why}")
        if tau not in reasons:
            check_reader(view, temperature=tau, retemper=True)  # the stream's own rule
    if reasons:
        lines = [f"  {tau}: {why}" for tau, whys in reasons.items() for why in whys]
        raise SpecMismatchError(
            f"the sweep asks for temperature(s) {sorted(reasons)} that cache {view.key} "
            f"(stored at temperature {view.temperature}) cannot give exactly; no trial was "
            "started:\n" + "\n".join(lines) + "\nSweep only those the cache can give, or "
            "rebuild it (dense, or with grid_temperatures including them)"
        )


def check_cache(trials: Sequence[Trial]) -> Any:
    """Open the trials' cache once and check every trial's temperature against its spec.

    Returns:
        The open cache.

    Raises:
        ConfigError: trials read different caches.
        CacheNotFoundError, SpecMismatchError: the cache is missing, or a temperature is
            refused (see :func:`check_temperatures`).
    """
    from kdcache.stores.catalog import open_cache

    if any(t.config.cache is None for t in trials):
        raise ConfigError("train.cache: a sweep trains students from one cache; give train.cache")
    refs = {(c.uri, c.root) for t in trials if (c := t.config.cache) is not None}
    if len(refs) != 1:
        raise ConfigError(f"a sweep trains from one cache; the trials name {sorted(refs, key=str)}")
    first = trials[0].config
    assert first.cache is not None
    cache = open_cache(first.cache.uri, root=first.cache.root)
    soft = [t.config for t in trials if t.config.loss.kind != "cross_entropy"]
    wanted = [c.loss.temperature for c in soft if c.loss.temperature is not None]
    if wanted:
        layout = getattr(first.dataset.build(), "layout", "records")
        check_temperatures(cache, wanted, layout=layout)
    return cache


# -- the run -----------------------------------------------------------------------------


def _run_trial(config: dict[str, Any], points: Sequence[dict[str, Any]], cwd: str) -> None:
    """Ray Tune's function trainable: one ``kdcache train`` run, its metrics reported.

    ``config`` holds the trial's index and its swept values (what Tune shows);
    ``points`` (shared through the object store) hold every trial's train config.
    """
    import ray.tune
    import torch

    from kdcache.jobs.train import train_from_config
    from kdcache.train.metrics import read_metrics

    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    # A trial is one rank of its own. Ray workers inherit the driver's environment, whose
    # MASTER_PORT may be the driver's own process group (a demo that trained first), so
    # each trial sets a fresh single-rank rendezvous rather than keep what it inherited.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    # Relative paths and factory modules of the config resolve as on the driver (when
    # this node has the driver's directory).
    if os.path.isdir(cwd):
        os.chdir(cwd)
        if cwd not in sys.path:
            sys.path.insert(0, cwd)
    point = points[int(config["trial"])]
    cfg = from_dict(TrainConfig, point["train"])
    os.makedirs(cfg.output_dir, exist_ok=True)
    with open(os.path.join(cfg.output_dir, "trial.json"), "w") as f:
        json.dump({k: point[k] for k in ("index", "values", "overrides")}, f, indent=2)
    start = time.perf_counter()
    summary = train_from_config(cfg, progress=False)
    wall_s = time.perf_counter() - start
    evals: dict[str, Any] = next(iter(summary["evals"].values()), {})
    metrics: dict[str, Any] = {f"eval/{k}": float(v) for k, v in evals.items()}
    losses = read_metrics(os.path.join(cfg.output_dir, "metrics.csv")).get("train/loss")
    if losses:
        metrics["train/loss"] = float(losses[-1][1])
    metrics.update(steps=summary["steps"], wall_s=wall_s)
    ray.tune.report(metrics)


@dataclasses.dataclass
class SweepResult:
    """What a sweep produced: one row per trial (trial order), and the files written."""

    rows: list[dict[str, Any]]
    columns: list[str]
    csv_path: str
    plot_path: str | None
    best: dict[str, Any] | None

    @property
    def num_failed(self) -> int:
        return sum(1 for r in self.rows if r["status"] != "ok")


def _connect(ray: Any, address: str | None) -> bool:
    """Join or start Ray; True when this call started it (and must shut it down)."""
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
    if address is None and not os.environ.get("RAY_ADDRESS"):
        with loopback_ray() as local:  # a new local Ray, every server on 127.0.0.1
            ray.init(address="local", logging_level=logging.WARNING, **kwargs, **local)
    else:
        ray.init(address=address, logging_level=logging.WARNING, **kwargs)
    return True


def run_sweep(cfg: SweepConfig) -> SweepResult:
    """Run every trial of ``cfg`` as a Ray Tune trial and write the results.

    The trials and the cache are checked first (:func:`make_trials`, :func:`check_cache`);
    then Ray Tune (``Tuner`` over a function trainable, ``tune.grid_search`` over the
    drawn trials) runs them, ``cpus_per_trial`` each. Writes ``results.csv``,
    ``results.png`` (with matplotlib) and ``sweep.json`` under ``output_dir``.

    Returns:
        The rows (swept values, ``eval/*`` metrics, ``wall_s``, ``status``,
        ``output_dir``), the files and the best row by ``metric``.

    Raises:
        ConfigError, SpecMismatchError, CacheNotFoundError: before any trial starts.
        MissingDependencyError: Ray Tune is not installed (extra ``tune``).
    """
    trials = make_trials(cfg)
    if cfg.metric.startswith("eval/") and any(t.config.eval_dataset is None for t in trials):
        raise ConfigError(
            f"the sweep ranks trials by {cfg.metric}; give the train config an eval_dataset"
        )
    cache = check_cache(trials)
    ray = require("ray", "tune")
    require("ray.tune", "tune")
    from ray import tune

    out = os.path.abspath(cfg.output_dir)
    os.makedirs(out, exist_ok=True)
    log.info("sweep: %d trial(s) of %s from cache %s", len(trials), list(cfg.parameters), cache.key)
    points = [
        {
            "index": t.index,
            "values": t.values,
            "overrides": t.overrides,
            "train": to_dict(t.config),
        }
        for t in trials
    ]
    started = _connect(ray, cfg.address)
    try:
        trainable = tune.with_parameters(_run_trial, points=points, cwd=os.getcwd())
        resources = {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial}
        tuner = tune.Tuner(
            tune.with_resources(trainable, resources),
            param_space=_param_space(tune, trials),
            tune_config=tune.TuneConfig(
                max_concurrent_trials=cfg.max_concurrent_trials,
                trial_name_creator=_trial_name,
                trial_dirname_creator=_trial_name,
            ),
            run_config=tune.RunConfig(
                name=time.strftime("sweep-%Y%m%d-%H%M%S"),
                storage_path=os.path.join(out, "tune"),
                verbose=1,
            ),
        )
        grid = tuner.fit()
        reported: dict[int, tuple[dict[str, Any], str]] = {}
        for i in range(len(grid)):
            result = grid[i]
            index = int((result.config or {})["trial"])
            status = "ok" if result.error is None else f"error: {_first_line(result.error)}"
            reported[index] = (dict(result.metrics or {}), status)
    finally:
        if started:
            ray.shutdown()
    rows = []
    for t in trials:
        metrics, status = reported.get(t.index, ({}, "error: not run"))
        row: dict[str, Any] = {"trial": t.name, **t.values}
        row.update({k: v for k, v in metrics.items() if k.startswith(("eval/", "train/"))})
        row.update(
            steps=metrics.get("steps"),
            wall_s=metrics.get("wall_s"),
            status=status,
            output_dir=t.config.output_dir,
        )
        rows.append(row)
    columns = table_columns(rows, list(cfg.parameters))
    csv_path = write_table(rows, columns, os.path.join(out, "results.csv"))
    plot_path = plot_sweep(rows, list(cfg.parameters), cfg.metric, os.path.join(out, "results.png"))
    ok = [r for r in rows if r["status"] == "ok" and _finite(r.get(cfg.metric))]
    best = None
    if ok:
        best = (max if cfg.mode == "max" else min)(ok, key=lambda r: float(r[cfg.metric]))
    with open(os.path.join(out, "sweep.json"), "w") as f:
        json.dump(
            {"sweep": to_dict(cfg), "cache": cache.key, "rows": rows, "best": best},
            f,
            indent=2,
            default=str,
        )
    return SweepResult(rows, columns, csv_path, plot_path, best)


def _param_space(tune: Any, trials: Sequence[Trial]) -> dict[str, Any]:
    """Tune's search space: a grid over the trial indices, and each swept key resolved
    from the index (so Tune's tables show the swept values)."""
    values = [t.values for t in trials]
    space: dict[str, Any] = {"trial": tune.grid_search([t.index for t in trials])}
    for key in trials[0].values:
        space[key] = tune.sample_from(lambda spec, key=key: values[spec.config["trial"]][key])
    return space


def _trial_name(trial: Any) -> str:
    return f"trial-{int(trial.config['trial']):03d}"


def _first_line(error: BaseException) -> str:
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return lines[-1] if lines else type(error).__name__


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


# -- the table and the plot --------------------------------------------------------------


def table_columns(rows: Sequence[Mapping[str, Any]], parameters: Sequence[str]) -> list[str]:
    """Columns: trial, the swept keys, the ``eval/`` metrics (accuracy or perplexity
    first, then the loss), ``train/loss``, steps, wall time, status, output dir."""
    seen: dict[str, None] = dict.fromkeys(k for r in rows for k in r if k.startswith("eval/"))
    first = [k for k in ("eval/accuracy", "eval/perplexity", "eval/cross_entropy") if k in seen]
    evals = first + sorted(k for k in seen if k not in first)
    train = ["train/loss"] if any("train/loss" in r for r in rows) else []
    return ["trial", *parameters, *evals, *train, "steps", "wall_s", "status", "output_dir"]


def _cell(value: Any, width: int = 100) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def write_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], path: str) -> str:
    """Write the results table as CSV (lists and mappings as JSON); returns ``path``."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in rows:
            w.writerow([_csv_cell(r.get(c)) for c in columns])
    return path


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """The results table as aligned text, for the terminal."""
    cells = [list(columns)] + [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = [
        "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_sweep(
    rows: Sequence[Mapping[str, Any]], parameters: Sequence[str], metric: str, path: str
) -> str | None:
    """Plot ``metric`` against each swept value (one panel per parameter) to a PNG.

    Numbers go on a numeric axis (log when they span 100x or more), other values (loss
    kinds, student sizes) on a categorical one; failed trials are left out.

    Returns:
        ``path``, or None when matplotlib is missing (logged; extra ``plot``) or no trial
        reported ``metric``.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no sweep plot (pip install 'kdcache[plot]')")
        return None
    ok = [r for r in rows if r.get("status") == "ok" and _finite(r.get(metric))]
    if not ok:
        log.warning("no trial reported %s: no sweep plot", metric)
        return None
    fig, axes = plt.subplots(1, len(parameters), figsize=(4 * len(parameters), 3.2), squeeze=False)
    for ax, key in zip(axes[0], parameters, strict=True):
        xs = [r[key] for r in ok]
        ys = [float(r[metric]) for r in ok]
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
        if numeric:
            ax.scatter(xs, ys)
            if min(xs) > 0 and max(xs) / min(xs) >= 100:
                ax.set_xscale("log")
        else:
            labels = list(dict.fromkeys(_cell(x) for x in xs))
            ax.scatter([labels.index(_cell(x)) for x in xs], ys)
            ax.set_xticks(range(len(labels)), labels, rotation=20)
            ax.set_xlim(-0.5, len(labels) - 0.5)
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{metric} of {len(ok)} trial(s) against each swept value")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
