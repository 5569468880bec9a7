"""Typed configuration: pydantic dataclasses validated in ``__post_init__``, loaded from
YAML, TOML or JSON files, with type-checked ``key=value`` overrides.

Unknown keys and wrong types are errors that name their dotted path (``teachers.0.kwargs``,
``stream.global_batch_size``), so a typo never silently falls back to a default and nothing is
converted with a loss (1.5 or ``"3"`` is no int; an int is a float). Objects the config
names (datasets, model factories) are given as ``"package.module:function"`` import paths
and built by :func:`import_object`.

Example:
    >>> from kdcache.jobs import config
    >>> data = {"root": "cache", "dataset": {"factory": "kdcache.testing:toy_dataset"},
    ...         "teachers": [{"name": "a", "torchscript": "a.pt"}]}
    >>> c = config.from_dict(config.BuildConfig, config.apply_overrides(data, [
    ...     "teachers.0.torchscript=b.pt", "targets.kind=topk", "targets.params={k: 8}"]))
    >>> c.teachers[0].torchscript, c.targets.temperature, c.targets.params
    ('b.pt', 4.0, (('k', 8),))
    >>> config.from_dict(config.BuildConfig, config.to_dict(c)) == c
    True
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, ClassVar, TypeVar

from pydantic import (
    BeforeValidator,
    GetJsonSchemaHandler,
    GetPydanticSchema,
    TypeAdapter,
    ValidationError,
    field_serializer,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue

from kdcache.errors import ConfigError
from kdcache.executors.config import ExecutorConfig
from kdcache.imports import (  # re-exported: configs name objects by import path
    _CONFIG_DIRS,
    call_factory,
    import_object,
    search_dirs,  # noqa: F401
)
from kdcache.schema import TargetSpec
from kdcache.validation import config_dataclass, config_error, resolve_path

T = TypeVar("T")

#: The temperature of a build config that gives none (``TargetSpec`` itself requires one).
DEFAULT_TEMPERATURE = 4.0


def _plain(value: Any, where: str) -> Any:
    """``value`` as JSON data (tuples become lists, configs their fields), or an error."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, Mapping):
        # YAML reads `0: x` as an int key; JSON has string keys only (ensemble.routes
        # turns integer keys back into classes)
        bad = [k for k in value if not isinstance(k, str) and (type(k) is not int)]
        if bad:
            raise ConfigError(f"{where or 'config'}: keys must be strings, got {bad[0]!r}")
        return {str(k): _plain(v, f"{where}.{k}".lstrip(".")) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}.{i}".lstrip(".")) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value), where)
    raise ConfigError(
        f"{where or 'config'}: expected a mapping, list, string, number, boolean or null, "
        f"got {type(value).__name__} {value!r}"
    )


def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """Build config class ``cls`` from a mapping, recursively, rejecting unknown keys.

    The data validate in pydantic's strict JSON mode: exact JSON types, except that an
    integer is accepted for a float; nested configs are mappings (or instances).

    Args:
        cls: A config dataclass (:class:`BuildConfig`, :class:`TrainConfig`, ...).
        data: Plain data, as read by :func:`read_file` (and :func:`apply_overrides`).

    Returns:
        The validated config; every ``__post_init__`` has run.

    Raises:
        ConfigError: ``data`` is not a mapping, or has an unknown key, a missing required
            key, a value of the wrong type or one a ``__post_init__`` refuses; the message
            names each dotted path, what was expected and what was found.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{cls.__name__}: expected a mapping, got {data!r}")
    text = json.dumps(_plain(data, ""))
    try:
        config: T = TypeAdapter(cls).validate_json(text)
    except ValidationError as exc:
        raise config_error(exc, cls) from exc
    return config


def to_dict(obj: Any) -> dict[str, Any]:
    """A config as plain JSON-able data: the resolved config, for manifests, checkpoints
    and ``kdcache submit``. ``from_dict(type(obj), to_dict(obj)) == obj`` whenever its
    free-form ``kwargs`` are JSON data; ``targets.params`` is written as a mapping.

    Args:
        obj: A config dataclass instance.

    Returns:
        Nested dicts, lists, strings, numbers, booleans and None; values that JSON cannot
        hold (in free-form ``kwargs``) are written as their ``str``.
    """
    out: dict[str, Any] = TypeAdapter(type(obj)).dump_python(obj, mode="json", fallback=str)
    return out


def json_schema(cls: type) -> dict[str, Any]:
    """The JSON Schema of config class ``cls`` (for editors and ``kdcache config schema``).

    Args:
        cls: A config dataclass (:class:`BuildConfig`, :class:`TrainConfig`, ...).

    Returns:
        A JSON Schema (draft 2020-12) dict; nested configs are under ``$defs``.
    """
    schema: dict[str, Any] = TypeAdapter(cls).json_schema()
    return schema


def read_file(path: str) -> dict[str, Any]:
    """Read a ``.yaml``/``.yml``, ``.toml`` or ``.json`` file into a mapping.

    Args:
        path: The file; its extension picks the parser.

    Returns:
        The file's top-level mapping, unvalidated.

    Raises:
        ConfigError: the file is missing, unreadable, unparsable, of another extension, or
            not a mapping.
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


def apply_overrides(
    data: Mapping[str, Any], overrides: list[str], *, cls: type | None = None
) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides to a copy of ``data``.

    Values parse as YAML (``2.0`` a float, ``true`` a bool, ``[1, 2]`` a list, ``{k: 8}``
    a mapping, ``null`` None; an empty value is the empty string). A number in the path
    indexes a list (``teachers.0.checkpoint=a.safetensors``); a missing mapping on the
    way is created. Keys and types are checked when the config is built
    (:func:`from_dict`), so an unknown key is reported there with its path.

    With ``cls``, a non-null override of one key of a config's ``exclusive_keys`` group
    (``TrainConfig``: ``epochs`` and ``max_steps``) removes the others of its group from
    the data, unless they are overridden too: ``epochs=2`` on a config that sets
    ``max_steps`` trains for two epochs.

    Args:
        data: The config as read from its file (left unchanged).
        overrides: ``key=value`` strings, applied in order.
        cls: The config class ``data`` is for (the root of the dotted paths).

    Returns:
        The overridden copy.

    Raises:
        ConfigError: an override without ``=``, a value that is not YAML, a list index
            that is not a number or out of range, or a path through a value that is
            neither a mapping nor a list; the message names the dotted path.
    """
    import yaml

    out = copy.deepcopy(dict(data))
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(
                f"override {item!r} must look like key=value (e.g. targets.temperature=2)"
            )
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: the value is not valid YAML: {exc}") from exc
        parts = key.split(".")
        node: Any = out
        for depth, part in enumerate(parts):
            where, last = ".".join(parts[: depth + 1]), depth == len(parts) - 1
            if isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            elif isinstance(node, list):
                parent = ".".join(parts[:depth])
                if not (part.isascii() and part.isdigit()):
                    raise ConfigError(
                        f"override {item!r}: {parent!r} is a list; index it with a number "
                        f"({parent}.0), got {part!r}"
                    )
                if int(part) >= len(node):
                    raise ConfigError(
                        f"override {item!r}: {where!r} is out of range; {parent!r} has "
                        f"{len(node)} item(s)"
                    )
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            else:
                raise ConfigError(
                    f"override {item!r}: {'.'.join(parts[:depth])!r} is "
                    f"{type(node).__name__} {node!r}, not a mapping or a list, so it has no "
                    f"key {part!r}"
                )
    if cls is not None:
        _clear_exclusive(out, cls, overrides)
    return out


def _clear_exclusive(data: dict[str, Any], cls: type, overrides: list[str]) -> None:
    """Drop the keys that an override of their exclusive partner replaces (in place)."""
    given = {item.partition("=")[0] for item in overrides}
    for item in overrides:
        key, _, text = item.partition("=")
        parts = key.split(".")
        _, owner = resolve_path(cls, tuple(parts))
        if text.strip() in ("", "null", "~", "None"):
            continue
        for group in getattr(owner, "exclusive_keys", ()):
            if parts[-1] not in group:
                continue
            node: Any = data
            for part in parts[:-1]:
                node = node[int(part)] if isinstance(node, list) else node.get(part, {})
            for other in group:
                other_key = ".".join([*parts[:-1], other])
                if other != parts[-1] and other_key not in given and isinstance(node, dict):
                    node.pop(other, None)


def command_line_overrides(positional: list[str], rest: list[str]) -> list[str]:
    """The ``key=value`` overrides of a command: its positional ones plus those argparse
    left over (it stops a ``nargs="*"`` positional at the first option).

    Args:
        positional: The command's ``overrides`` positional arguments.
        rest: What ``parse_known_args`` left over.

    Returns:
        All overrides, positional ones first.

    Raises:
        ConfigError: a leftover argument that is not ``key=value`` (a mistyped option).
    """
    stray = [r for r in rest if "=" not in r or r.startswith("-")]
    if stray:
        raise ConfigError(f"unrecognized arguments: {' '.join(stray)}")
    return [*positional, *rest]


def load(cls: type[T], path: str, overrides: list[str] | None = None) -> T:
    """Read ``path``, apply overrides and build ``cls``.

    Args:
        cls: The config class.
        path: A YAML, TOML or JSON file (see :func:`read_file`).
        overrides: ``key=value`` overrides (see :func:`apply_overrides`).

    The file's directory joins :func:`search_dirs`, so the import paths it names may
    point at modules beside it. Overriding one key of an exclusive pair clears the other
    (``epochs=2`` on a config with ``max_steps``; see :func:`apply_overrides`).

    Returns:
        The validated config.

    Raises:
        ConfigError: see :func:`read_file`, :func:`apply_overrides` and :func:`from_dict`.
    """
    data = read_file(path)
    directory = os.path.dirname(os.path.abspath(path))
    if directory in _CONFIG_DIRS:
        _CONFIG_DIRS.remove(directory)
    _CONFIG_DIRS.insert(0, directory)
    return from_dict(cls, apply_overrides(data, overrides or [], cls=cls))


# -- the teacher stage -------------------------------------------------------------------


@config_dataclass
class TransformConfig:
    """A named preprocessing step (:class:`kdcache.data.transforms.Transform`): the callable
    ``fn(inputs [B, ...], **kwargs) -> [B, ...]`` at import path ``fn``, run on the worker
    that reads the data; its path, kwargs and source are part of the dataset fingerprint."""

    fn: str
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    def build(self) -> Any:
        from kdcache.data.transforms import Transform

        return Transform(self.fn, dict(self.kwargs))


#: The file formats a :class:`DatasetConfig` names (see :func:`kdcache.data.files.open_dataset`).
DATASET_FORMATS = ("auto", "parquet", "arrow", "hf")

#: The file formats of a token dataset from text (:class:`TextDatasetConfig`).
TEXT_FORMATS = ("auto", "text", "jsonl", "parquet")

#: What a text record longer than ``max_tokens`` gets (:class:`TextDatasetConfig`).
TEXT_TRUNCATIONS = ("error", "right")


@config_dataclass
class TextDatasetConfig:
    """A token dataset tokenized from text files: ``dataset: {text: {...}}``, built as
    ``kdcache.data.text.TextDataset(paths, **options)`` (layout ``"tokens"``: ragged
    sequences, one cached row per target position).

    Example (YAML)::

        dataset:
          text:
            paths: [data/fortunes.txt]
            tokenizer: runs/lm-fortunes/tokenizer   # tokenizer.json or a model directory
            max_tokens: 512
            num_shards: 8

    Every option but ``paths`` and ``tokenizer`` is passed only when given (None: the
    default of ``TextDataset``, which owns them), so a config says only what it changes.

    Attributes:
        paths: Text, JSON Lines or Parquet files (at least one), read where they are used.
        tokenizer: A ``tokenizer.json`` file or a directory written by ``save_pretrained``
            holding one; its files' SHA-256 goes into the dataset's fingerprint.
        format: One of :data:`TEXT_FORMATS` (``auto``: by extension).
        text_field, prompt_field, completion_field, messages_field: The record's field(s)
            of JSON Lines and Parquet files (a text; or a prompt and its completion, no
            targets on the prompt; or chat messages).
        record_separator: What separates records of a text file (``"\n"``: one a line).
        id_field: A field holding a stable int64 id per record (None: derived from the
            file and the record's position).
        max_tokens: Longest sequence, in tokens (>= 2).
        truncation: One of :data:`TEXT_TRUNCATIONS`: refuse a longer record, or cut it.
        add_eos: Append the tokenizer's end-of-text token to each record.
        num_shards: Shards of the dataset (>= 1).

    Raises:
        ConfigError: no paths, an unknown format or truncation, or a number out of range;
            the message names the key.
    """

    paths: list[str]
    tokenizer: str
    format: str | None = None
    text_field: str | None = None
    prompt_field: str | None = None
    completion_field: str | None = None
    messages_field: str | None = None
    record_separator: str | None = None
    id_field: str | None = None
    max_tokens: int | None = None
    truncation: str | None = None
    add_eos: bool | None = None
    num_shards: int | None = None

    def __post_init__(self) -> None:
        if not self.paths or not all(self.paths):
            raise ConfigError(
                f"text.paths: expected at least one file (text, JSON Lines or Parquet), got "
                f"{self.paths!r}"
            )
        if not self.tokenizer:
            raise ConfigError(
                "text.tokenizer: expected a tokenizer.json file or a model directory holding "
                "one, got an empty string"
            )
        if self.format is not None and self.format not in TEXT_FORMATS:
            raise ConfigError(f"text.format must be one of {TEXT_FORMATS}, got {self.format!r}")
        if self.truncation is not None and self.truncation not in TEXT_TRUNCATIONS:
            raise ConfigError(
                f"text.truncation must be one of {TEXT_TRUNCATIONS}, got {self.truncation!r}"
            )
        if self.max_tokens is not None and self.max_tokens < 2:
            raise ConfigError(
                f"text.max_tokens must be >= 2 (a causal-LM sample needs two tokens), got "
                f"{self.max_tokens}"
            )
        if self.num_shards is not None and self.num_shards < 1:
            raise ConfigError(f"text.num_shards must be >= 1, got {self.num_shards}")

    def options(self) -> dict[str, Any]:
        """The keyword arguments of ``TextDataset`` this config gives (``tokenizer`` and
        every option that is not None)."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name != "paths" and getattr(self, f.name) is not None
        }

    def check_tokenizer(self, where: str = "dataset.text.tokenizer") -> None:
        """Refuse a tokenizer that is not there.

        Raises:
            ConfigError: ``tokenizer`` is neither a file nor a directory with a
                ``tokenizer.json`` (or another tokenizer file); names ``where``.
        """
        tokenizer_file_error(self.tokenizer, where)

    def build(self) -> Any:
        """The ``TextDataset`` (its files are read where it is used; the tokenizer here).

        Raises:
            ConfigError: the tokenizer is missing (names the key), or ``TextDataset``
                refuses an option.
            MissingDependencyError: ``kdcache.data.text`` needs a package not installed.
        """
        self.check_tokenizer()
        from kdcache.data.text import TextDataset

        return TextDataset(list(self.paths), **self.options())


def tokenizer_file_error(path: str, where: str) -> None:
    """Refuse ``path`` unless it is a tokenizer file or a directory holding one.

    Args:
        path: A ``tokenizer.json`` file, or a directory written by ``save_pretrained``.
        where: The config key, for the message.

    Raises:
        ConfigError: the path does not exist, or is a directory without a tokenizer file.
    """
    from kdcache.data.tokens import _TOKENIZER_FILES

    if os.path.isfile(path):
        return
    if os.path.isdir(path):
        if any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
            return
        raise ConfigError(
            f"{where}: {path} holds no tokenizer file (expected one of "
            f"{', '.join(_TOKENIZER_FILES)}); save the tokenizer there with save_pretrained, "
            "or name its tokenizer.json"
        )
    raise ConfigError(
        f"{where}: {path} does not exist; expected a tokenizer.json file or a model "
        "directory holding one"
    )


@config_dataclass
class DatasetConfig:
    """Where the input records come from: files named by path and columns (read lazily on
    the workers that use them), or a Python factory.

    Example (YAML)::

        dataset:
          path: data/train.parquet        # a file, a directory, or s3://bucket/prefix
          id_column: sample_id
          input_columns: image
          input_shape: [28, 28]
          label_column: label
          transform: {fn: "mypkg.prep:normalise", kwargs: {mean: 0.286}}

    Attributes:
        path: A Parquet file or directory, an Arrow IPC file, or a Hugging Face
            ``save_to_disk`` directory; local, ``file://`` or a store URI (``s3://...``).
        format: One of :data:`DATASET_FORMATS` (``auto``: by extension and contents).
        id_column: The int64 id column; None derives ids from (file, row), which changes
            when files are added or reordered (see ``docs/datasets.md``).
        input_columns: The column(s) the teachers and the student consume.
        input_shape: Reshape each row's input to this shape (e.g. ``[28, 28]``).
        label_column: The int64 label column (-100: no label), if any.
        transform: Preprocessing steps, applied in order on the reading worker.
        label_transform: ``fn(labels_B, sample_ids_B, **kwargs) -> labels_B`` (int64,
            -100 = no label), e.g. to keep a labelled subset; labels are not part of any
            fingerprint, so it never changes a cache key.
        rows_per_shard: Target rows per shard (shards are runs of row groups or record
            batches); None: the dataset's default.
        factory: Instead of ``path``: import path of a function returning a
            :class:`kdcache.ShardedDataset`. kwargs: its keyword arguments.
        text: Instead of ``path`` or ``factory``: a token dataset tokenized from text
            files (:class:`TextDatasetConfig`), for causal-LM teachers and students.

    Raises:
        ConfigError: not exactly one of ``path``, ``factory`` and ``text``; file options
            beside a factory or text; an unknown format.
    """

    path: str | None = None
    format: str = "auto"
    id_column: str | None = None
    input_columns: str | list[str] | None = None
    input_shape: list[int] | None = None
    label_column: str | None = None
    transform: TransformConfig | list[TransformConfig] | None = None
    label_transform: TransformConfig | None = None
    rows_per_shard: int | None = None
    factory: str | None = None
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    text: TextDatasetConfig | None = None

    def __post_init__(self) -> None:
        sources = [k for k in ("path", "factory", "text") if getattr(self, k) is not None]
        if len(sources) != 1:
            raise ConfigError(
                "dataset: give one of path (files, read where they are used), factory (a "
                "Python function returning a ShardedDataset) or text (a token dataset from "
                f"text files), got {' and '.join(sources) if sources else 'none'}"
            )
        if self.text is not None:
            given = [
                f.name
                for f in dataclasses.fields(self)
                if f.name != "text" and getattr(self, f.name) not in (None, {}, "auto")
            ]
            if given:
                raise ConfigError(
                    f"dataset: {', '.join(given)} beside text: a token dataset takes its "
                    "options inside text (dataset.text.max_tokens, ...)"
                )
            return
        if self.format not in DATASET_FORMATS:
            raise ConfigError(
                f"dataset.format must be one of {DATASET_FORMATS}, got {self.format!r}"
            )
        if self.factory is not None:
            given = [
                name
                for name in (
                    "id_column",
                    "input_columns",
                    "input_shape",
                    "label_column",
                    "transform",
                    "label_transform",
                    "rows_per_shard",
                )
                if getattr(self, name) is not None
            ]
            if given or self.format != "auto":
                raise ConfigError(
                    f"dataset: {', '.join(given or ['format'])} apply to a dataset given by path, "
                    "not by factory; pass them to the factory in kwargs"
                )
        else:
            if self.kwargs:
                raise ConfigError(
                    "dataset.kwargs apply to a factory; a path takes its options as keys"
                )
            if self.input_columns is None:
                raise ConfigError(
                    f"dataset {self.path!r}: input_columns is required (the column(s) the "
                    "teachers and the student consume)"
                )
            if self.rows_per_shard is not None and self.rows_per_shard < 1:
                raise ConfigError(f"dataset.rows_per_shard must be >= 1, got {self.rows_per_shard}")

    def transforms(self) -> list[Any] | None:
        """The :class:`kdcache.data.transforms.Transform` steps, or None."""
        if self.transform is None:
            return None
        steps = self.transform if isinstance(self.transform, list) else [self.transform]
        return [t.build() for t in steps]

    def build(self) -> Any:
        """The dataset: a file-backed plan (nothing read but metadata) or the factory's.

        Raises:
            ConfigError: the factory fails or returns no ShardedDataset.
            DataError: the files cannot be planned (missing, empty, wrong columns).
        """
        from kdcache.data.base import ShardedDataset

        if self.text is not None:
            return self.text.build()
        if self.path is not None:
            from kdcache.data.files import open_dataset

            return open_dataset(
                self.path,
                format=self.format,
                id_column=self.id_column,
                input_columns=self.input_columns,
                input_shape=None if self.input_shape is None else tuple(self.input_shape),
                label_column=self.label_column,
                transform=self.transforms(),
                label_transform=None
                if self.label_transform is None
                else self.label_transform.build(),
                rows_per_shard=self.rows_per_shard,
            )
        assert self.factory is not None
        ds = call_factory(import_object(self.factory), self.kwargs, f"dataset {self.factory!r}")
        if not isinstance(ds, ShardedDataset):
            raise ConfigError(
                f"dataset factory {self.factory!r} returned {type(ds).__name__}, which lacks "
                "num_shards / read_shard / fingerprint"
            )
        return ds


@config_dataclass
class ResourcesConfig:
    """What one teacher's Ray actors need (:class:`kdcache.teachers.TeacherResources`):
    a teacher with resources gets an actor pool of its own; teachers naming the same
    ``group`` share one. Unset fields fall back to ``executor``'s. Never part of a key.

    Attributes:
        num_actors: Actors of the pool (None: a share of the cluster).
        cpus_per_actor: Ray ``num_cpus`` (and torch threads) per actor.
        gpus_per_actor: Ray ``num_gpus`` per actor (fractions share a GPU).
        memory_bytes: Ray ``memory`` reservation per actor, in bytes.
        group: Pool shared by the teachers that name it.
    """

    num_actors: int | None = None
    cpus_per_actor: float | None = None
    gpus_per_actor: float | None = None
    memory_bytes: int | None = None
    group: str | None = None

    def build(self) -> Any:
        from kdcache.teachers.spec import TeacherResources

        return TeacherResources(
            num_actors=self.num_actors,
            cpus_per_actor=self.cpus_per_actor,
            gpus_per_actor=self.gpus_per_actor,
            memory_bytes=self.memory_bytes,
            group=self.group,
        )


#: The tasks of a Hugging Face teacher (``TeacherConfig.hf``).
HF_TEACHER_TASKS = ("sequence-classification", "causal-lm")


@config_dataclass
class TeacherConfig:
    """One teacher, described (a :class:`kdcache.teachers.TeacherSpec`): the driver
    fingerprints its files and never loads its weights; each actor loads it where it runs.

    Give one of: ``factory`` and ``checkpoint``; ``torchscript``; ``hf`` (a local
    Hugging Face directory); or ``factory`` and ``version`` (a teacher built in code).

    Attributes:
        name: Unique name (reports, manifests).
        factory: Import path of a function ``factory(**kwargs) -> nn.Module``.
        kwargs: Architecture config passed to the factory (part of the fingerprint).
        checkpoint: safetensors or torch state-dict file (loaded with weights_only=True).
        torchscript: A TorchScript archive, instead of factory + checkpoint.
        hf: A directory written by ``save_pretrained`` (weights, config, tokenizer).
        task: ``hf`` only: ``sequence-classification`` or ``causal-lm``.
        version: A factory without a checkpoint: what tells two versions of its code
            apart (part of the fingerprint).
        resources: What its actors need (:class:`ResourcesConfig`); None: the shared pool.
    """

    name: str
    factory: str | None = None
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    checkpoint: str | None = None
    torchscript: str | None = None
    hf: str | None = None
    task: str = "sequence-classification"
    version: str | int | None = None
    resources: ResourcesConfig | None = None

    def __post_init__(self) -> None:
        sources = [
            k
            for k, given in (
                ("checkpoint", self.checkpoint is not None),
                ("torchscript", self.torchscript is not None),
                ("hf", self.hf is not None),
                ("version", self.version is not None),
            )
            if given
        ]
        if len(sources) != 1 or ((self.factory is None) != (sources[0] in ("torchscript", "hf"))):
            raise ConfigError(
                f"teacher {self.name!r}: give one of factory + checkpoint, torchscript, hf "
                f"(a Hugging Face directory), or factory + version; got "
                f"{', '.join(['factory'] * (self.factory is not None) + sources) or 'none'}"
            )
        if self.task not in HF_TEACHER_TASKS:
            raise ConfigError(f"teacher {self.name!r}: task must be one of {HF_TEACHER_TASKS}")

    def build(self) -> Any:
        """The teacher's :class:`kdcache.teachers.TeacherSpec` (files checked, none loaded).

        Raises:
            DataFileNotFoundError: a file it names does not exist.
            ConfigError: the factory cannot be imported.
        """
        from kdcache.teachers.spec import TeacherSpec

        resources = None if self.resources is None else self.resources.build()
        if self.torchscript is not None:
            return TeacherSpec.torchscript(
                self.name, self.torchscript, config=self.kwargs, resources=resources
            )
        if self.hf is not None:
            return TeacherSpec.hf(self.name, self.hf, task=self.task, resources=resources)
        assert self.factory is not None
        if self.checkpoint is not None:
            return TeacherSpec.checkpoint(
                self.name, self.factory, self.checkpoint, kwargs=self.kwargs, resources=resources
            )
        return TeacherSpec.factory(
            self.name, self.factory, kwargs=self.kwargs, version=self.version, resources=resources
        )


def check_teachers_for_layout(teachers: list[TeacherConfig], layout: str, what: str) -> None:
    """Refuse Hugging Face teachers that are not language models over a token dataset
    (layout ``"tokens"``: every teacher gives next-token logits [B, T, V], so an ``hf``
    teacher needs ``task: causal-lm``). Other kinds of teacher are not checked here (a
    factory may build either; the teacher stage checks the shapes of their outputs), nor
    are record datasets.

    Args:
        teachers: The config's teachers.
        layout: The dataset's layout, ``"records"`` or ``"tokens"``.
        what: How the dataset is named in the message (``dataset.text``).

    Raises:
        ConfigError: naming ``teachers.N.task``, the teacher and what to set.
    """
    if layout != "tokens":
        return
    for i, t in enumerate(teachers):
        if t.hf is not None and t.task != "causal-lm":
            raise ConfigError(
                f"teachers.{i}.task: {what} is a token dataset, which needs causal-lm "
                f"teachers, but teacher {t.name!r} has task {t.task!r}"
                + (" (the default of hf teachers)" if t.task == "sequence-classification" else "")
                + f"; set teachers.{i}.task=causal-lm, or use a record dataset"
            )


def _is_int_literal(text: str) -> bool:
    return text.lstrip("-").isdigit()


@config_dataclass
class EnsembleConfig:
    """How the teachers combine at read time (see :func:`kdcache.targets.combine_ensemble`
    and ``docs/losses.md``, "Ensembles"). The rule is in the ensemble view's key, never
    in an entry's: another rule over the same teachers recomputes nothing.

    Attributes:
        rule: One of :data:`kdcache.targets.ALL_ENSEMBLE_RULES`: ``mean_probs``,
            ``mean_logprobs``, ``confidence_max``, ``confidence_entropy``,
            ``best_on_label`` or ``route``.
        weights: K static weights (normalised), or None (uniform); not with ``route``.
        routes: ``route`` only: key -> a teacher (its name or index) or K weights, e.g.
            ``{news: teacher-a, code: teacher-b}`` or, by class, ``{0: 1, 1: 0}``. Keys
            that all read as integers are classes (ints); otherwise they are strings.
        route_column: ``route`` only: the input column holding each sample's key
            (``labels`` routes by class).
        fallback: ``best_on_label`` only: ``mean_probs`` (default), ``mean_logprobs`` or
            ``error`` for rows without a label.
        entropy_temperature: ``confidence_entropy`` only: t > 0 in nats (default 1).

    Example (YAML)::

        ensemble: {rule: best_on_label, fallback: mean_probs}
    """

    rule: str = "mean_probs"
    weights: list[float] | None = None
    routes: dict[str, int | str | list[float]] | None = None
    route_column: str | None = None
    fallback: str | None = None
    entropy_temperature: float | None = None

    def __post_init__(self) -> None:
        from kdcache.targets.dense import ALL_ENSEMBLE_RULES

        if self.rule not in ALL_ENSEMBLE_RULES:
            raise ConfigError(f"rule must be one of {ALL_ENSEMBLE_RULES}, got {self.rule!r}")
        # every other check, before any work (the config loader names this field)
        self.to_rule(None, where="").check_readable()

    def to_rule(self, teacher_names: Sequence[str] | None, *, where: str = "ensemble") -> Any:
        """The :class:`kdcache.EnsembleRule` this config describes; route targets given
        by teacher name are resolved against ``teacher_names`` (the teachers' order).

        Args:
            teacher_names: The teachers, in order; None: names are not resolved yet.
            where: The config path that errors name (``ensemble``, ``cache.ensemble``).

        Raises:
            ConfigError: ``<where>.<field>`` named, when the rule refuses a parameter, a
                route names a teacher that is not in ``teacher_names``, or route keys mix
                classes (integers) and strings.
        """
        from kdcache.targets.dense import EnsembleRule

        prefix = f"{where}." if where else ""
        routes: dict[Any, Any] | None = None
        if self.routes is not None:
            routes = {}
            ints = [k for k in self.routes if _is_int_literal(k)]
            if ints and len(ints) != len(self.routes):
                others = [k for k in self.routes if not _is_int_literal(k)]
                raise ConfigError(
                    f"{prefix}routes: keys are all classes (integers) or all strings "
                    f"(domains), not both: {ints} and {others}"
                )
            for key, target in self.routes.items():
                if isinstance(target, str):
                    if teacher_names is None:
                        target = 0  # resolved when the teachers are known
                    elif target in teacher_names:
                        target = list(teacher_names).index(target)
                    else:
                        raise ConfigError(
                            f"{prefix}routes.{key}: no teacher named {target!r}; the "
                            f"teachers are {list(teacher_names)}"
                        )
                routes[int(key) if ints else key] = target
        try:
            return EnsembleRule(
                self.rule,
                weights=None if self.weights is None else tuple(self.weights),
                routes=routes,  # type: ignore[arg-type]  # normalised by EnsembleRule
                route_column=self.route_column,
                fallback=self.fallback,
                entropy_temperature=self.entropy_temperature,
            )
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}" if where else str(exc)) from None


def _default_targets() -> TargetSpec:
    return TargetSpec(DEFAULT_TEMPERATURE)


def _with_default_temperature(value: Any) -> Any:
    """A ``targets`` mapping without a temperature gets :data:`DEFAULT_TEMPERATURE`."""
    if isinstance(value, Mapping) and "temperature" not in value:
        return {"temperature": DEFAULT_TEMPERATURE, **value}
    return value


def _default_temperature_schema(core: Any, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
    """The JSON Schema of ``targets``: TargetSpec's, with the temperature optional."""
    schema = handler(core)
    spec = handler.resolve_ref_schema(schema)
    spec["properties"]["temperature"]["default"] = DEFAULT_TEMPERATURE
    spec["required"] = [k for k in spec.get("required", []) if k != "temperature"]
    if not spec["required"]:
        del spec["required"]
    return schema


#: ``BuildConfig.targets``: a :class:`TargetSpec` whose temperature a config may omit.
ConfigTargets = Annotated[
    TargetSpec,
    BeforeValidator(_with_default_temperature),
    GetPydanticSchema(get_pydantic_json_schema=_default_temperature_schema),
]


@config_dataclass
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
        targets: {temperature: 4.0, kind: topk, params: {k: 64, labels: true}}
        executor: {kind: ray}

    Attributes:
        root: Cache root (local path, ``file://`` or another pyarrow filesystem URI).
        dataset: The input records.
        teachers: At least one; names unique.
        ensemble: How the teachers combine at read time; ``weights`` one per teacher.
        targets: What is stored per sample, a :class:`kdcache.schema.TargetSpec`; a
            mapping without ``temperature`` gets :data:`DEFAULT_TEMPERATURE`, and none at
            all a dense spec at that temperature. ``params`` is held as TargetSpec's
            sorted tuple of pairs and written back as a mapping by :func:`to_dict`.
        executor: Where the per-shard tasks run (:class:`ExecutorConfig`).
        alias: A name pointed at the result, when given.
    """

    root: str
    dataset: DatasetConfig
    teachers: list[TeacherConfig]
    ensemble: EnsembleConfig = dataclasses.field(default_factory=EnsembleConfig)
    targets: ConfigTargets = dataclasses.field(default_factory=_default_targets)
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
        try:
            self.ensemble.to_rule(names).check_num_teachers(len(names))
        except ConfigError as exc:
            msg = str(exc)
            raise ConfigError(msg if msg.startswith("ensemble") else f"ensemble: {msg}") from None
        if self.dataset.text is not None:
            check_teachers_for_layout(self.teachers, "tokens", "dataset.text")
        if self.alias is not None:  # before the build, not after all its compute
            from kdcache.stores.catalog import check_alias_name

            try:
                check_alias_name(self.alias)
            except ConfigError as exc:
                raise ConfigError(f"alias: {exc}") from None

    @field_serializer("targets")
    def _targets_json(self, targets: TargetSpec) -> dict[str, Any]:
        # params as the mapping a config file gives, not TargetSpec's tuple of pairs
        out = targets.to_json()
        out.setdefault("params", None)
        return out


# -- the student stage -------------------------------------------------------------------

#: The learning rate of the default CPU DeepSpeed config (a TrainConfig without ``lr``).
DEFAULT_LR = 1e-3

#: The remote URI schemes an ``output_dir`` may have (pyarrow filesystems; besides local
#: paths and ``file://``).
REMOTE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")


def check_output_dir(uri: str, where: str = "output_dir") -> None:
    """Refuse an output directory that is not a local path, ``file://`` or a URI of one
    of :data:`REMOTE_SCHEMES` (``memory://``, ``ftp://``, ``s3:/bucket`` are refused).

    Args:
        uri: The directory, as a config gives it.
        where: The key, for the message.

    Raises:
        ConfigError: an empty value, an unknown scheme, or a URI without a path.
    """
    if not uri:
        raise ConfigError(f"{where}: expected a directory, got an empty string")
    match = _SCHEME.match(uri)
    if match is None:
        return  # a local path
    scheme, rest = match.group(1).lower(), uri[match.end() :]
    if not rest.startswith("//") and scheme not in (*REMOTE_SCHEMES, "file", "memory"):
        return  # a local path with a colon in its first part
    if scheme == "file" and rest.startswith("//"):
        return
    if scheme not in REMOTE_SCHEMES or not rest.startswith("//") or not rest.strip("/"):
        raise ConfigError(
            f"{where}: {uri!r} is not a directory kdcache can write; expected a local path, "
            f"file:///abs/path or a URI of {', '.join(s + '://' for s in REMOTE_SCHEMES)} "
            "(bucket and path, e.g. s3://bucket/run)"
        )


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")


def _lr_beside_deepspeed(lr: float, deepspeed: dict[str, Any] | str) -> str:
    """The message for ``lr`` given beside a DeepSpeed config."""
    raw: Any = deepspeed
    if isinstance(deepspeed, str) and os.path.isfile(deepspeed):
        try:
            with open(deepspeed) as f:
                raw = json.load(f)
        except (OSError, ValueError):
            raw = None
    optimizer = raw.get("optimizer") if isinstance(raw, dict) else None
    params = optimizer.get("params") if isinstance(optimizer, dict) else None
    ds_lr = params.get("lr") if isinstance(params, dict) else None
    if ds_lr is not None:
        return (
            f"lr={lr} and deepspeed.optimizer.params.lr={ds_lr} are both set: drop lr (it "
            "applies only to the default CPU config) and set the rate in the DeepSpeed config"
        )
    return (
        f"lr={lr} is given beside a deepspeed config, where it would be ignored (it applies "
        "only to the default CPU config): drop lr and set deepspeed.optimizer.params.lr"
    )


@config_dataclass
class StudentConfig:
    """The student, one of:

    * ``factory(**kwargs) -> nn.Module``, mapping inputs [B, ...] to logits [B, V] (or,
      on a token dataset, input ids [B, T] int64 to logits [B, T, V]). The same pair goes
      into the exported safetensors metadata, so the student loads back with
      ``kdcache.Teacher.from_checkpoint(factory, path, config=kwargs)``. A factory that
      returns a transformers model is trained and exported as ``hf_config`` is.
    * ``hf_config``: a Hugging Face causal LM made from a ``config.json`` (the file, or
      the directory holding it), with fresh weights drawn under ``TrainConfig.seed``;
    * ``hf``: a Hugging Face causal LM loaded from a directory written by
      ``save_pretrained`` (its weights are the starting point).

    A Hugging Face student is trained through :class:`kdcache.teachers.loaders.HFLogits`
    (attention mask from the pad id, logits trimmed to the tokenizer's V) and exported
    with ``save_pretrained`` and its tokenizer into ``output_dir``, so that
    ``transformers.AutoModelForCausalLM.from_pretrained(output_dir)`` loads it.

    Attributes:
        factory, kwargs: The factory's import path and keyword arguments.
        hf_config: A ``config.json`` file, or a directory holding one.
        hf: A model directory (``config.json`` and weights).
        tokenizer: The student's tokenizer (a ``tokenizer.json`` file or a directory):
            its V, its pad id, and the files exported beside the weights. None: the
            tokenizer of the ``hf`` or ``hf_config`` directory, else the dataset's
            (``dataset.text.tokenizer``).

    Raises:
        ConfigError: not exactly one of ``factory``, ``hf_config`` and ``hf``; ``kwargs``
            without a factory.
    """

    factory: str | None = None
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    hf_config: str | None = None
    hf: str | None = None
    tokenizer: str | None = None

    def __post_init__(self) -> None:
        sources = [k for k in ("factory", "hf_config", "hf") if getattr(self, k) is not None]
        if len(sources) != 1:
            raise ConfigError(
                "student: give one of factory (a Python function returning the module), "
                "hf_config (a Hugging Face config.json: a new causal LM) or hf (a Hugging "
                f"Face model directory), got {' and '.join(sources) if sources else 'none'}"
            )
        if self.kwargs and self.factory is None:
            raise ConfigError(
                f"student.kwargs apply to a factory, not to {sources[0]}; drop them (a Hugging "
                "Face student's architecture is its config.json)"
            )

    @property
    def is_hf(self) -> bool:
        """Whether the config names a Hugging Face model (``hf`` or ``hf_config``)."""
        return self.factory is None

    def build(self) -> Any:
        """The student module: the factory's, or the Hugging Face causal LM (bare, not
        yet wrapped; see :func:`kdcache.jobs.train.lm_student`).

        Raises:
            ConfigError: the factory fails; ``hf_config`` or ``hf`` is missing or not a
                causal-LM config (the message names the key).
            MissingDependencyError: transformers is not installed (extra ``hf``).
        """
        if self.factory is not None:
            return call_factory(
                import_object(self.factory), self.kwargs, f"student (factory {self.factory!r})"
            )
        import torch

        from kdcache import quiet
        from kdcache.errors import require

        transformers = require("transformers", "hf")
        key, path = ("hf", self.hf) if self.hf is not None else ("hf_config", self.hf_config)
        assert path is not None
        config_file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.isfile(config_file):
            raise ConfigError(
                f"student.{key}: {config_file} does not exist; expected "
                + (
                    "a directory written by save_pretrained"
                    if key == "hf"
                    else "a Hugging Face config.json (or the directory holding it)"
                )
            )
        try:
            with quiet.hf_loading():
                hf_cfg = transformers.AutoConfig.from_pretrained(config_file)
                if self.hf is not None:
                    return transformers.AutoModelForCausalLM.from_pretrained(
                        self.hf, local_files_only=True, dtype=torch.float32
                    )
                return transformers.AutoModelForCausalLM.from_config(hf_cfg)
        except (ValueError, OSError, KeyError) as exc:
            raise ConfigError(
                f"student.{key}: {path} does not hold a causal LM transformers can build: {exc}"
            ) from exc

    def tokenizer_path(self, dataset: DatasetConfig | None = None) -> str | None:
        """The student's tokenizer: :attr:`tokenizer`, else the ``hf`` / ``hf_config``
        directory when it holds a tokenizer file, else ``dataset.text.tokenizer``.

        Raises:
            ConfigError: ``tokenizer`` is given but missing (names ``student.tokenizer``).
        """
        from kdcache.data.tokens import tokenizer_files_sha256

        if self.tokenizer is not None:
            tokenizer_file_error(self.tokenizer, "student.tokenizer")
            return self.tokenizer
        for path in (self.hf, self.hf_config):
            if path and os.path.isdir(path) and tokenizer_files_sha256(path) is not None:
                return path
        if dataset is not None and dataset.text is not None:
            return dataset.text.tokenizer
        return None


@config_dataclass
class CacheRefConfig:
    """Which soft targets: an entry directory, an ensemble view file, or (with ``root``)
    a key or an alias (see :func:`kdcache.open_cache`).

    Attributes:
        uri: The entry, view, key or alias.
        root: The cache root a key or an alias is looked up in.
        ensemble: Combine the view's teachers by this rule instead of the view's own
            (:meth:`kdcache.stores.view.EnsembleView.with_rule`): nothing is recomputed;
            route targets by name are the view's teacher names; static weights are this
            config's (``ensemble.weights``), not the view's. Needs a view of two or more
            teachers. The new view is saved under the cache root, so the key the run
            records opens there.
        combined: Read a dense view of two or more teachers (its rule reading only their
            outputs) from its combined entry at the loss temperature, made once before
            training if it does not exist (:meth:`kdcache.EnsembleView.materialize`; every
            later run and student reuses it): one file per shard instead of K, and no
            combination per epoch. False combines at read time. A read-only cache root
            falls back to combining at read time, with a warning.
    """

    uri: str
    root: str | None = None
    ensemble: EnsembleConfig | None = None
    combined: bool = True


@config_dataclass
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


@config_dataclass
class StreamConfig:
    """How the student reads (see :class:`kdcache.stream.ShardedStream`).

    Attributes:
        global_batch_size: Rows per micro-step over *all* ranks; each rank gets
            ``global_batch_size / world_size`` (the per-rank ``batch_size`` of
            :class:`kdcache.SoftTargetDataset`), so the sample order does not change with
            the world size. (Formerly ``batch_size``, which is now an error: in Python,
            ``batch_size`` is per rank.)
        shuffle_window: Stateless shuffle window (0: off).
        num_lanes: Lanes of the epoch (divides global_batch_size; set it to the largest
            world size you plan so ranks read disjoint shards).
        num_workers: DataLoader worker processes per rank.
        prefetch_shards: Shards read ahead.
        verify: Check shard SHA-256 on read.
    """

    global_batch_size: int = 128
    shuffle_window: int = 0
    num_lanes: int = 1
    num_workers: int = 0
    prefetch_shards: int = 2
    verify: bool = True

    @model_validator(mode="before")
    @classmethod
    def _renamed_batch_size(cls, data: Any) -> Any:
        keys = data if isinstance(data, Mapping) else (getattr(data, "kwargs", None) or {})
        if "batch_size" in keys:
            raise ConfigError(
                f"stream.batch_size ({keys['batch_size']!r}) is now stream.global_batch_size: "
                "the rows per micro-step over all ranks, split over the world size; rename "
                "the key (in Python, SoftTargetDataset(batch_size=) is per rank)"
            )
        return data

    def __post_init__(self) -> None:
        g = self.global_batch_size
        if g < 1 or self.num_lanes < 1 or g % self.num_lanes:
            raise ConfigError(
                f"stream.global_batch_size ({g}) must be >= 1 and a multiple of "
                f"stream.num_lanes ({self.num_lanes})"
            )
        if self.shuffle_window < 0 or self.num_workers < 0 or self.prefetch_shards < 0:
            raise ConfigError("stream: shuffle_window, num_workers, prefetch_shards must be >= 0")


@config_dataclass
class RayTrainConfig:
    """Run the student stage on a Ray cluster with Ray Train's ``TorchTrainer``.

    Attributes:
        enabled: Launch through Ray Train (``kdcache train --ray`` sets it).
        address: Ray address (None: ``RAY_ADDRESS``, else a local Ray).
        num_workers: Training ranks.
        cpus_per_worker: CPUs each rank requests.
        use_gpu: One GPU per rank.
        storage_path: Where Ray Train persists the run: the checkpoints and metrics each
            evaluation reports (Ray's ``RunConfig.storage_path``: a path every node
            reaches, or a URI such as ``s3://bucket/prefix``). None: ``OUTPUT_DIR/ray``.
            Ray keeps a report's metrics with its checkpoint, so set ``checkpoint_every``
            to ``eval_every`` for one checkpoint per evaluation.
        name: The run's name under ``storage_path`` (Ray's ``RunConfig.name``).
        max_failures: Worker failures Ray Train recovers from by restarting the ranks
            from the latest reported checkpoint (Ray's ``FailureConfig``; -1: no limit).
    """

    enabled: bool = False
    address: str | None = None
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    storage_path: str | None = None
    name: str = "train"
    max_failures: int = 0

    def __post_init__(self) -> None:
        if self.num_workers < 1 or self.cpus_per_worker <= 0:
            raise ConfigError("ray: num_workers >= 1 and cpus_per_worker > 0")
        if not self.name or "/" in self.name:
            raise ConfigError(f"ray.name: expected a non-empty name without '/', got {self.name!r}")
        if self.max_failures < -1:
            raise ConfigError(f"ray.max_failures: expected >= -1, got {self.max_failures}")


@config_dataclass
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
        stream: {global_batch_size: 128}   # over all ranks
        epochs: 8
        eval_every: 100

    Attributes:
        output_dir: Checkpoints, metrics, plots and the exported student go here: what a
            cache root accepts (a local path, ``file://``, or a remote URI of
            :data:`REMOTE_SCHEMES` such as ``s3://bucket/run?endpoint_override=...``). A
            remote one is written through a local staging directory and the finished
            artefacts are uploaded (see :func:`kdcache.jobs.train.train_from_config`).
        student, cache, dataset: What to train, from which soft targets, on which inputs
            (the dataset the cache was built from; its labels may differ). ``cache`` may
            be left out for a student of the hard labels alone (``loss.alpha: 0`` or
            ``loss.kind: cross_entropy``). A token dataset (``dataset.text``, or a
            factory's dataset of layout ``"tokens"``) trains a causal LM: padded token
            batches, :func:`kdcache.losses.token_distill_loss`, validation perplexity,
            and a Hugging Face student exported with ``save_pretrained`` (see
            ``docs/lm.md``).
        eval_dataset: Held-out data with labels (accuracy and cross-entropy), or a token
            dataset (validation perplexity, :func:`kdcache.train.evaluate.evaluate_perplexity`).
        deepspeed: The DeepSpeed config (mapping or JSON path), passed through; kdcache
            fills only the micro-batch and a scheduler's total step count when absent.
            None: a CPU AdamW config at ``lr``.
        lr: Learning rate of that default config; None: :data:`DEFAULT_LR`. Giving it
            beside a ``deepspeed`` config is an error (the optimizer's lr lives there).
        loss, stream, ray: See their classes.
        epochs: Passes over the dataset (may be fractional). max_steps: optimizer steps
            instead. Give one of them (default: one epoch); an override of one replaces
            the other (``kdcache train cfg.yaml epochs=2`` on a config with max_steps).
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
    dataset: DatasetConfig
    cache: CacheRefConfig | None = None
    eval_dataset: DatasetConfig | None = None
    deepspeed: dict[str, Any] | str | None = None
    lr: float | None = None
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

    #: Keys of which a config gives at most one; an override of one clears the others.
    exclusive_keys: ClassVar[tuple[tuple[str, ...], ...]] = (("epochs", "max_steps"),)

    def __post_init__(self) -> None:
        check_output_dir(self.output_dir)
        if self.cache is None and self.loss.kind != "cross_entropy" and self.loss.alpha != 0:
            raise ConfigError(
                f"cache: required for a distilled student (loss.kind={self.loss.kind}, "
                f"loss.alpha={self.loss.alpha}); name the soft targets (cache: {{uri: KEY, "
                "root: ROOT}}), or train on the hard labels alone with loss.alpha=0 or "
                "loss.kind=cross_entropy"
            )
        if self.epochs is not None and self.max_steps is not None:
            raise ConfigError(
                f"give epochs ({self.epochs}) or max_steps ({self.max_steps}), not both: drop "
                "one of them (on the command line, an override of one replaces the other)"
            )
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError(f"epochs must be > 0, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.eval_every < 0 or self.checkpoint_every < 0:
            raise ConfigError("eval_every and checkpoint_every must be >= 0")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.lr is not None and self.deepspeed is not None:
            raise ConfigError(_lr_beside_deepspeed(self.lr, self.deepspeed))


# -- the kinds of config -----------------------------------------------------------------

#: The job configs by kind, as ``kdcache config show --kind`` and ``kdcache config schema``
#: name them. :func:`config_kinds` adds ``sweep`` (defined in :mod:`kdcache.jobs.sweep`).
CONFIG_KINDS: dict[str, type] = {"build": BuildConfig, "train": TrainConfig}


def config_kinds() -> dict[str, type]:
    """Every kind of job config: :data:`CONFIG_KINDS`, plus ``sweep`` when
    :mod:`kdcache.jobs.sweep` exists (imported here, lazily: it may need Ray Tune).

    Returns:
        ``{kind: config class}``, in help order.
    """
    import importlib.util

    kinds = dict(CONFIG_KINDS)
    if importlib.util.find_spec("kdcache.jobs.sweep") is not None:
        sweep = importlib.import_module("kdcache.jobs.sweep")
        if hasattr(sweep, "SweepConfig"):
            kinds["sweep"] = sweep.SweepConfig
    return kinds


def detect_kind(data: Mapping[str, Any], where: str = "config") -> str:
    """The kind of job config ``data`` is, from its top-level keys.

    The kind whose fields hold every key and whose required keys are all given; failing
    that, the one sharing the most keys (its validation then names what is wrong).

    Args:
        data: A config as read from its file.
        where: The file, for the message.

    Returns:
        A key of :func:`config_kinds`.

    Raises:
        ConfigError: no kind, or several, fit; the message says to pass ``--kind``.
    """
    kinds = config_kinds()
    keys = set(data)

    def fields(cls: type) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    def required(cls: type) -> set[str]:
        return {
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        }

    exact = [k for k, c in kinds.items() if keys <= fields(c) and required(c) <= keys]
    if len(exact) == 1:
        return exact[0]
    overlap = {k: len(keys & fields(c)) for k, c in kinds.items()}
    best = [k for k, n in overlap.items() if n and n == max(overlap.values())]
    if not exact and len(best) == 1:
        return best[0]
    raise ConfigError(
        f"cannot tell which kind of config {where} is (keys: {', '.join(sorted(keys)) or 'none'}"
        f"; it fits {' and '.join(exact or best) or 'none of ' + ', '.join(kinds)}): pass "
        f"--kind {'|'.join(kinds)}"
    )
