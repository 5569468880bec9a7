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
        from kdcache.data import ShardedDataset

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
        from kdcache.teachers import Teacher

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
        from kdcache.targets import ENSEMBLE_RULES

        if self.rule not in ENSEMBLE_RULES:
            raise ConfigError(f"rule must be one of {ENSEMBLE_RULES}, got {self.rule!r}")


@dataclasses.dataclass
class TargetsConfig:
    """What is stored per sample (see :class:`kdcache.schema.TargetSpec`)."""

    temperature: float = 4.0
    storage_dtype: str = "float32"
    backend: str = "arrow"

    def __post_init__(self) -> None:
        from kdcache.schema import TargetSpec

        TargetSpec(self.temperature, storage_dtype=self.storage_dtype, backend=self.backend)


@dataclasses.dataclass
class ExecutorConfig:
    """How the teacher stage runs (none of this changes the cache key)."""

    kind: str = "ray"
    address: str | None = None
    num_actors: int | None = None
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    batch_size: int = 1024
    max_retries: int = 2

    def __post_init__(self) -> None:
        if self.kind not in ("ray", "local"):
            raise ConfigError(f"executor.kind must be 'ray' or 'local', got {self.kind!r}")
        if self.batch_size < 1 or self.max_retries < 0 or self.cpus_per_actor <= 0:
            raise ConfigError("executor: batch_size >= 1, max_retries >= 0, cpus_per_actor > 0")
        if self.gpus_per_actor < 0:
            raise ConfigError(f"executor.gpus_per_actor must be >= 0, got {self.gpus_per_actor}")
        if self.num_actors is not None and self.num_actors < 1:
            raise ConfigError(f"executor.num_actors must be >= 1, got {self.num_actors}")


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
