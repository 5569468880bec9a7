"""Typed configuration: dataclasses validated in ``__post_init__``, loaded from YAML, TOML
or JSON files, with type-checked ``key=value`` overrides.

Unknown keys are errors (with their dotted path), so a typo never silently falls back to
a default. Objects the config names (datasets, model factories) are given as
``"package.module:function"`` import paths and built by :func:`import_object`.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import types
import typing
from typing import Any, TypeVar, Union, get_args, get_origin

from kdcache.errors import ConfigError
from kdcache.executors.config import ExecutorConfig

T = TypeVar("T")


def import_object(path: str) -> Any:
    """Import ``"package.module:attr"`` (or ``"package.module.attr"``).

    Raises:
        ConfigError: the module or attribute does not exist.
    """
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ConfigError(f"expected an import path like 'package.module:function', got {path!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import module {module_name!r} (from {path!r}): {exc}") from exc
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"module {module_name!r} has no attribute {attr!r} (from {path!r})")
        obj = getattr(obj, part)
    return obj


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check (and gently convert: int -> float, list -> tuple) ``value`` against ``tp``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(
            errors[0]
            if len(errors) == 1
            else f"{where}: {value!r} fits none of {' | '.join(_type_name(a) for a in args)}"
        )
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table/mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = get_args(tp)[:1] or (Any,)
        out = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return out if origin is list else tuple(out)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, recursively, rejecting unknown keys.

    Raises:
        ConfigError: unknown key, missing required key, or a value of the wrong type; the
            message gives the dotted path.
    """
    assert dataclasses.is_dataclass(cls)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(repr(f'{where}.{k}'.lstrip('.')) for k in unknown)}; "
            f"{cls.__name__} accepts: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, f in fields.items():
        path = f"{where}.{name}".lstrip(".")
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], path)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key {path!r} ({cls.__name__})")
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{where or cls.__name__}: {exc}") from exc


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass config as plain JSON-able data (the resolved config, for manifests)."""
    return json.loads(json.dumps(dataclasses.asdict(obj), default=str))


def read_file(path: str) -> dict[str, Any]:
    """Read a ``.yaml``/``.yml``, ``.toml`` or ``.json`` file into a mapping.

    Raises:
        ConfigError: the file is missing, unreadable, or not a mapping.
    """
    if not os.path.exists(path):
        raise ConfigError(f"config file {path} does not exist")
    ext = os.path.splitext(path)[1].lower()
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if ext in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(raw)
        elif ext == ".toml":
            import tomllib

            data = tomllib.loads(raw.decode())
        elif ext == ".json":
            data = json.loads(raw)
        else:
            raise ConfigError(f"{path}: expected a .yaml, .toml or .json file")
    except (ValueError, OSError) as exc:
        raise ConfigError(f"cannot parse {path}: {exc}") from exc
    except Exception as exc:  # yaml.YAMLError has no common base with ValueError
        if type(exc).__module__.startswith("yaml"):
            raise ConfigError(f"cannot parse {path}: {exc}") from exc
        raise
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides; values parse as YAML scalars (``4.0``,
    ``true``, ``[1, 2]``, ``null``), and types are checked when the config is built.

    Raises:
        ConfigError: an override without ``=``, or one that descends into a non-mapping.
    """
    import yaml

    out = json.loads(json.dumps(data))
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(
                f"override {item!r} must look like key=value (e.g. targets.temperature=2)"
            )
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a mapping")
            node = nxt
        node[parts[-1]] = yaml.safe_load(text) if text else ""
    return out


def command_line_overrides(positional: list[str], rest: list[str]) -> list[str]:
    """The ``key=value`` overrides of a command: its positional ones plus those argparse
    left over (it stops a ``nargs="*"`` positional at the first option).

    Raises:
        ConfigError: a leftover argument that is not ``key=value`` (a mistyped option).
    """
    stray = [r for r in rest if "=" not in r or r.startswith("-")]
    if stray:
        raise ConfigError(f"unrecognized arguments: {' '.join(stray)}")
    return [*positional, *rest]


def load(cls: type[T], path: str, overrides: list[str] | None = None) -> T:
    """Read ``path``, apply overrides and build ``cls`` (see :func:`from_dict`)."""
    return from_dict(cls, apply_overrides(read_file(path), overrides or []))


# -- the teacher stage -------------------------------------------------------------------


@dataclasses.dataclass
class DatasetConfig:
    """Where the input records come from.

    Attributes:
        factory: Import path of a function returning a :class:`kdcache.ShardedDataset`.
        kwargs: Keyword arguments for it.
    """

    factory: str
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    def build(self) -> Any:
        from kdcache.data.base import ShardedDataset

        ds = import_object(self.factory)(**self.kwargs)
        if not isinstance(ds, ShardedDataset):
            raise ConfigError(
                f"dataset factory {self.factory!r} returned {type(ds).__name__}, which lacks "
                "num_shards / read_shard / fingerprint"
            )
        return ds


@dataclasses.dataclass
class TeacherConfig:
    """One teacher: a factory plus a checkpoint, or a TorchScript file.

    Attributes:
        name: Unique name (reports, manifests).
        factory: Import path of a function ``factory(**kwargs) -> nn.Module``.
        kwargs: Architecture config passed to the factory (part of the fingerprint).
        checkpoint: safetensors or torch state-dict file (loaded with weights_only=True).
        torchscript: A TorchScript archive, instead of factory + checkpoint.
    """

    name: str
    factory: str | None = None
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    checkpoint: str | None = None
    torchscript: str | None = None

    def __post_init__(self) -> None:
        if self.torchscript is None and (self.factory is None or self.checkpoint is None):
            raise ConfigError(
                f"teacher {self.name!r}: give either torchscript, or factory and checkpoint"
            )
        if self.torchscript is not None and self.factory is not None:
            raise ConfigError(f"teacher {self.name!r}: give torchscript or factory, not both")

    def build(self) -> Any:
        from kdcache.teachers.teacher import Teacher

        if self.torchscript is not None:
            return Teacher.from_torchscript(self.torchscript, name=self.name, config=self.kwargs)
        assert self.factory is not None and self.checkpoint is not None
        return Teacher.from_checkpoint(
            import_object(self.factory), self.checkpoint, name=self.name, config=self.kwargs
        )


@dataclasses.dataclass
class EnsembleConfig:
    """How the teachers combine at read time (see :func:`kdcache.targets.combine_ensemble`)."""

    rule: str = "mean_probs"
    weights: list[float] | None = None

    def __post_init__(self) -> None:
        from kdcache.targets.dense import ENSEMBLE_RULES

        if self.rule not in ENSEMBLE_RULES:
            raise ConfigError(f"rule must be one of {ENSEMBLE_RULES}, got {self.rule!r}")


@dataclasses.dataclass
class TargetsConfig:
    """What is stored per sample (see :class:`kdcache.schema.TargetSpec`): ``kind`` is
    ``dense``, ``topk``, ``topp`` or ``sampled``; ``params`` its sparsification settings,
    e.g. ``{k: 64, labels: true}`` or ``{num_samples: 32, seed: 0}``."""

    temperature: float = 4.0
    storage_dtype: str = "float32"
    backend: str = "arrow"
    kind: str = "dense"
    params: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        from kdcache.schema import TargetSpec

        TargetSpec(
            self.temperature,
            kind=self.kind,
            storage_dtype=self.storage_dtype,
            backend=self.backend,
            params=self.params,
        )


@dataclasses.dataclass
class BuildConfig:
    """A teacher-stage job: ``kdcache build CONFIG``.

    Example (YAML)::

        root: runs/cache
        alias: fashion-mnist-ensemble
        dataset: {factory: "pipelines.fashion_mnist:train_dataset", kwargs: {num_shards: 8}}
        teachers:
          - {name: convnet-a, factory: "pipelines.models:build_model",
             kwargs: {arch: convnet, width: 32, hidden: 128}, checkpoint: a.safetensors}
        ensemble: {rule: mean_probs}
        targets: {temperature: 4.0}
        executor: {kind: ray}
    """

    root: str
    dataset: DatasetConfig
    teachers: list[TeacherConfig]
    ensemble: EnsembleConfig = dataclasses.field(default_factory=EnsembleConfig)
    targets: TargetsConfig = dataclasses.field(default_factory=TargetsConfig)
    executor: ExecutorConfig = dataclasses.field(default_factory=ExecutorConfig)
    alias: str | None = None

    def __post_init__(self) -> None:
        if not self.teachers:
            raise ConfigError("teachers: at least one teacher is required")
        names = [t.name for t in self.teachers]
        if len(set(names)) != len(names):
            raise ConfigError(f"teachers: names must be unique, got {names}")
        if self.ensemble.weights is not None and len(self.ensemble.weights) != len(names):
            raise ConfigError(
                f"ensemble.weights has {len(self.ensemble.weights)} values for "
                f"{len(names)} teachers"
            )


# -- the student stage -------------------------------------------------------------------


@dataclasses.dataclass
class StudentConfig:
    """The student: ``factory(**kwargs) -> nn.Module`` mapping inputs [B, ...] to logits
    [B, V]. The same pair goes into the exported safetensors metadata, so the student
    loads back with ``kdcache.Teacher.from_checkpoint(factory, path, config=kwargs)``."""

    factory: str
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    def build(self) -> Any:
        return import_object(self.factory)(**self.kwargs)


@dataclasses.dataclass
class CacheRefConfig:
    """Which soft targets: an entry directory, an ensemble view file, or (with ``root``)
    a key or an alias (see :func:`kdcache.open_cache`)."""

    uri: str
    root: str | None = None


@dataclasses.dataclass
class LossConfig:
    """The loss, from :mod:`kdcache.losses`.

    Attributes:
        kind: A divergence of :data:`kdcache.losses.DIVERGENCES` (``forward_kl`` is
            Hinton's KD), used by :func:`kdcache.losses.kd_loss`; or ``cross_entropy``
            for hard labels alone (no soft targets read).
        temperature: tau; None takes the cache's. Another value re-tempers exactly.
        alpha: Weight of the distillation term; ``1 - alpha`` weighs the cross-entropy.
        beta: JSD weight. skew: skew-KL weight.
        scale_by_temperature_squared: Multiply the distillation term by tau^2.
    """

    kind: str = "forward_kl"
    temperature: float | None = None
    alpha: float = 1.0
    beta: float = 0.5
    skew: float = 0.1
    scale_by_temperature_squared: bool = True

    def __post_init__(self) -> None:
        from kdcache.losses.divergences import DIVERGENCES

        if self.kind not in (*DIVERGENCES, "cross_entropy"):
            raise ConfigError(
                f"loss.kind must be one of {(*DIVERGENCES, 'cross_entropy')}, got {self.kind!r}"
            )
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"loss.alpha must be in [0, 1], got {self.alpha}")
        if self.temperature is not None and self.temperature <= 0:
            raise ConfigError(f"loss.temperature must be > 0, got {self.temperature}")


@dataclasses.dataclass
class StreamConfig:
    """How the student reads (see :class:`kdcache.stream.ShardedStream`).

    Attributes:
        batch_size: Rows per micro-step over *all* ranks (the global micro-batch); each
            rank gets ``batch_size / world_size``, so the sample order does not change
            with the world size.
        shuffle_window: Stateless shuffle window (0: off).
        num_lanes: Lanes of the epoch (divides batch_size; set it to the largest world
            size you plan so ranks read disjoint shards).
        num_workers: DataLoader worker processes per rank.
        prefetch_shards: Shards read ahead.
        verify: Check shard SHA-256 on read.
    """

    batch_size: int = 128
    shuffle_window: int = 0
    num_lanes: int = 1
    num_workers: int = 0
    prefetch_shards: int = 2
    verify: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.num_lanes < 1 or self.batch_size % self.num_lanes:
            raise ConfigError(
                f"stream.batch_size ({self.batch_size}) must be >= 1 and a multiple of "
                f"stream.num_lanes ({self.num_lanes})"
            )
        if self.shuffle_window < 0 or self.num_workers < 0 or self.prefetch_shards < 0:
            raise ConfigError("stream: shuffle_window, num_workers, prefetch_shards must be >= 0")


@dataclasses.dataclass
class RayTrainConfig:
    """Run the student stage on a Ray cluster with Ray Train's ``TorchTrainer``.

    Attributes:
        enabled: Launch through Ray Train (``kdcache train --ray`` sets it).
        address: Ray address (None: ``RAY_ADDRESS``, else a local Ray).
        num_workers: Training ranks.
        cpus_per_worker: CPUs each rank requests.
        use_gpu: One GPU per rank.
    """

    enabled: bool = False
    address: str | None = None
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    use_gpu: bool = False

    def __post_init__(self) -> None:
        if self.num_workers < 1 or self.cpus_per_worker <= 0:
            raise ConfigError("ray: num_workers >= 1 and cpus_per_worker > 0")


@dataclasses.dataclass
class TrainConfig:
    """A student-stage job: ``kdcache train CONFIG``.

    Example (YAML)::

        output_dir: runs/student
        student: {factory: "pipelines.models:build_model",
                  kwargs: {arch: mlp, hidden: [16]}}
        cache: {uri: fashion-mnist-ensemble, root: runs/cache}
        dataset: {factory: "pipelines.fashion_mnist:train_dataset", kwargs: {num_shards: 8}}
        eval_dataset: {factory: "pipelines.fashion_mnist:test_dataset"}
        deepspeed: ds_config.json          # or an inline mapping; passed through
        loss: {kind: forward_kl, alpha: 0.9}
        stream: {batch_size: 128}
        epochs: 8
        eval_every: 100

    Attributes:
        output_dir: Checkpoints, metrics, plots and the exported student go here.
        student, cache, dataset: What to train, from which soft targets, on which inputs
            (the dataset the cache was built from; its labels may differ).
        eval_dataset: Held-out data with labels (accuracy and cross-entropy).
        deepspeed: The DeepSpeed config (mapping or JSON path), passed through; kdcache
            fills only the micro-batch and a scheduler's total step count when absent.
            None: a CPU AdamW config at ``lr``.
        lr: Learning rate of the default DeepSpeed config (ignored otherwise).
        loss, stream, ray: See their classes.
        epochs: Passes over the dataset (may be fractional). max_steps: optimizer steps
            instead. Give one of them; default one epoch.
        seed: Seeds the student's initial weights and the sample order.
        eval_every: Optimizer steps between evaluations (0: only at the end).
        checkpoint_every: Optimizer steps between checkpoints (0: only at the end).
        compare_hard_labels: Also train the same student, from the same initial weights
            and sample order, on the hard labels alone; both curves go in one plot.
        quantize_int8: Also export an int8 dynamically quantized student and report its
            accuracy, size and throughput beside the float one.
        tensorboard: Write TensorBoard events as well as CSV (needs ``tensorboard``).
    """

    output_dir: str
    student: StudentConfig
    cache: CacheRefConfig
    dataset: DatasetConfig
    eval_dataset: DatasetConfig | None = None
    deepspeed: dict[str, Any] | str | None = None
    lr: float = 1e-3
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    stream: StreamConfig = dataclasses.field(default_factory=StreamConfig)
    epochs: float | None = None
    max_steps: int | None = None
    seed: int = 0
    eval_every: int = 0
    checkpoint_every: int = 0
    compare_hard_labels: bool = False
    quantize_int8: bool = False
    tensorboard: bool = True
    ray: RayTrainConfig = dataclasses.field(default_factory=RayTrainConfig)

    def __post_init__(self) -> None:
        if self.epochs is not None and self.max_steps is not None:
            raise ConfigError("give epochs or max_steps, not both")
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError(f"epochs must be > 0, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.eval_every < 0 or self.checkpoint_every < 0:
            raise ConfigError("eval_every and checkpoint_every must be >= 0")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
