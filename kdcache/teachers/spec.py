"""Teachers described, not built: a :class:`TeacherSpec` is loaded where it runs.

A :class:`kdcache.Teacher` holds its module and weights; shipping one to every Ray actor
means the driver holds every teacher's weights and the object store copies them. A
:class:`TeacherSpec` is the plan of a teacher instead (a checkpoint file and the factory
that builds its architecture, a TorchScript archive, a Hugging Face directory, or a
factory for teachers built in code): a few hundred bytes that pickle to the actors,
which call :meth:`TeacherSpec.load` on first use and keep the teacher for later builds.

Its :meth:`TeacherSpec.fingerprint` (what goes into cache keys) never builds the model:
it hashes the weight files, streamed in chunks (constant memory, memoised per process by
path, size and modification time), with the kind, the factory, its arguments and the
dtypes. :class:`TeacherResources` says what a teacher's actors need (CPUs, GPUs,
memory, how many), so that a large teacher gets a pool of its own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from kdcache import quiet
from kdcache.errors import ConfigError, DataFileNotFoundError, require
from kdcache.imports import call_factory, import_object

if TYPE_CHECKING:
    from kdcache.teachers.teacher import Teacher

#: The kinds of :class:`TeacherSpec`.
SPEC_KINDS = ("checkpoint", "torchscript", "hf", "factory")

#: Tasks of a Hugging Face spec (as :meth:`kdcache.Teacher.from_hf`).
HF_TASKS = ("sequence-classification", "causal-lm")

#: Files of a Hugging Face directory that hold weights (or index them), hashed into the
#: fingerprint of an ``hf`` spec.
HF_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")

#: Keys of ``config.json`` that name where or with what a model was saved, not what it
#: computes (left out of the fingerprint, as :meth:`kdcache.Teacher.from_hf` does).
_HF_VOLATILE_KEYS = ("_name_or_path", "transformers_version", "torch_dtype", "dtype")

_CHUNK_BYTES = 8 << 20
_FILE_SHA256: dict[tuple[str, int, int], str] = {}
_FILE_SHA256_LOCK = threading.Lock()


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file's bytes, read in 8 MiB chunks (constant memory).

    Memoised per process by (real path, size, modification time in ns): a second call on
    an unchanged file costs one ``stat``; a rewritten file is hashed again.

    Raises:
        DataFileNotFoundError: the file does not exist.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DataFileNotFoundError(f"weights file {path} does not exist") from None
    memo_key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    with _FILE_SHA256_LOCK:
        hit = _FILE_SHA256.get(memo_key)
    if hit is not None:
        return hit
    h = hashlib.sha256()
    buf = bytearray(_CHUNK_BYTES)
    view = memoryview(buf)
    with open(path, "rb") as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    digest = h.hexdigest()
    with _FILE_SHA256_LOCK:
        _FILE_SHA256[memo_key] = digest
    return digest


@dataclasses.dataclass(frozen=True)
class TeacherResources:
    """What the Ray actors of one teacher (or of one group of teachers) need.

    Teachers without resources share one actor pool sized by
    :class:`kdcache.ExecutorConfig` (several small teachers per actor, as they always
    did). A teacher with resources gets a pool of its own with these Ray resources;
    teachers with the same ``group`` share one pool (its resources: the fields its
    members set, which must agree). Unset fields fall back to the ``ExecutorConfig``.
    None of this changes a cache key or the bytes written.

    Attributes:
        num_actors: Actors of the pool, >= 1; None: a share of the cluster (as
            ``ExecutorConfig.num_actors=None``), at most one per shard.
        cpus_per_actor: Ray ``num_cpus`` of each actor (and its torch threads), > 0.
        gpus_per_actor: Ray ``num_gpus`` of each actor, >= 0 (fractions share a GPU);
            > 0 runs the teachers on CUDA.
        memory_bytes: Ray ``memory`` of each actor in bytes (the scheduler's
            reservation, not a limit), > 0.
        group: Pool name shared by several teachers; None: a pool of its own when any
            other field is set, else the shared default pool.

    Raises:
        ConfigError: a value of the wrong type or out of range.
    """

    num_actors: int | None = None
    cpus_per_actor: float | None = None
    gpus_per_actor: float | None = None
    memory_bytes: int | None = None
    group: str | None = None

    def __post_init__(self) -> None:
        def bad(field: str, want: str) -> ConfigError:
            return ConfigError(
                f"TeacherResources.{field} must be {want} or None, got {getattr(self, field)!r}"
            )

        for field in ("num_actors", "memory_bytes"):
            v = getattr(self, field)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise bad(field, "an int >= 1")
        for field, positive in (("cpus_per_actor", True), ("gpus_per_actor", False)):
            v = getattr(self, field)
            if v is None:
                continue
            if (
                isinstance(v, bool)
                or not isinstance(v, int | float)
                or (v <= 0 if positive else v < 0)
            ):
                raise bad(field, "a number > 0" if positive else "a number >= 0")
            object.__setattr__(self, field, float(v))
        if self.group is not None and (not isinstance(self.group, str) or not self.group):
            raise bad("group", "a non-empty string")

    @property
    def is_default(self) -> bool:
        """True when nothing is set: the teacher runs in the shared default pool."""
        return all(getattr(self, f.name) is None for f in dataclasses.fields(self))


def _dtype_name(value: torch.dtype | str | None, what: str) -> str | None:
    """``torch.bfloat16`` / ``"bfloat16"`` / ``"torch.bfloat16"`` -> ``"bfloat16"``."""
    if value is None:
        return None
    name = str(value).removeprefix("torch.")
    if not isinstance(getattr(torch, name, None), torch.dtype):
        raise ConfigError(f"{what} must be a torch dtype such as 'float32', got {value!r}")
    return name


def _torch_dtype(name: str | None) -> torch.dtype | None:
    return None if name is None else getattr(torch, name)


def _json_copy(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value, sort_keys=True))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{what} must be JSON-serialisable ({exc})") from exc


def _hf_facts(name: str, path: str, task: str, vocab_size: int | None) -> dict[str, Any]:
    """What an ``hf`` spec reads on the driver: ``config.json``, tokenizer facts."""
    from kdcache.data.tokens import tokenizer_files_sha256
    from kdcache.teachers.loaders import _tokenizer_facts

    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise DataFileNotFoundError(
            f"teacher {name!r}: {config_path} does not exist; a Hugging Face teacher needs "
            "a directory written by save_pretrained (config.json and the weights)"
        )
    with open(config_path, encoding="utf-8") as f:
        try:
            hf_config = json.load(f)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"teacher {name!r}: {config_path} is not valid JSON ({exc})") from exc
    weights = sorted(
        f for f in os.listdir(path) if f.endswith(HF_WEIGHT_SUFFIXES) or f.endswith(".index.json")
    )
    if not any(f.endswith(HF_WEIGHT_SUFFIXES) for f in weights):
        raise DataFileNotFoundError(
            f"teacher {name!r}: no weights file in {path} (expected one ending in "
            f"{', '.join(HF_WEIGHT_SUFFIXES)}, e.g. model.safetensors)"
        )
    tokenizer_len = pad_id = None
    if tokenizer_files_sha256(path) is not None:
        require("transformers", "hf")
        with quiet.hf_loading():
            _, tokenizer_len, pad_id = _tokenizer_facts(path)
    if vocab_size is None and task == "causal-lm":
        vocab_size = tokenizer_len  # classifiers' V is their number of labels
    if pad_id is None:
        pad_id = hf_config.get("pad_token_id")
    return {
        "hf_config": {k: v for k, v in hf_config.items() if k not in _HF_VOLATILE_KEYS},
        "weight_files": weights,
        "vocab_size": vocab_size,
        "pad_token_id": pad_id,
    }


@dataclasses.dataclass(frozen=True)
class TeacherSpec:
    """A teacher described by where its weights are, loaded where it runs.

    Make one with a constructor: :meth:`checkpoint`, :meth:`torchscript`, :meth:`hf` or
    :meth:`factory`. The spec is small and picklable (paths, an import path, JSON
    arguments, never weights); the files it names are checked on creation, so that a
    missing file fails on the driver before any actor starts. ``build_cache`` accepts
    specs and :class:`kdcache.Teacher` objects mixed; each Ray actor loads its specs once
    (:meth:`load`) and keeps them for later builds while their fingerprint is the same.

    Attributes:
        name: Teacher name (reports, manifests); not part of the cache key.
        kind: One of :data:`SPEC_KINDS`.
        path: Weights file (``checkpoint``), archive (``torchscript``) or model
            directory (``hf``); None for ``factory``.
        factory_path: Import path ``"package.module:function"`` of the factory
            (``checkpoint``: builds the architecture; ``factory``: builds the teacher).
        kwargs: JSON keyword arguments of the factory (``torchscript``: the config).
        task: ``hf`` only: one of :data:`HF_TASKS`.
        dtype: ``hf`` only: the weights dtype to load in (``"float32"``).
        vocab_size: ``hf`` only: as :meth:`kdcache.Teacher.from_hf`.
        version: ``factory`` only: what tells two versions of the code apart.
        autocast_dtype: Forward pass under ``torch.autocast`` with this dtype (see
            :class:`kdcache.Teacher`), or None.
        resources: What the teacher's actors need (:class:`TeacherResources`); None:
            the shared default pool.

    Raises:
        ConfigError: unknown kind or task, a malformed or missing factory, arguments that
            are not JSON, a ``factory`` spec without a version.
        DataFileNotFoundError: a file the spec names does not exist (names the file).
    """

    name: str
    kind: str
    path: str | None = None
    factory_path: str | None = None
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False)
    task: str | None = None
    dtype: str | None = None
    vocab_size: int | None = None
    version: Any = dataclasses.field(default=None, hash=False)
    autocast_dtype: str | None = None
    resources: TeacherResources | None = None
    #: What was read on the driver on creation (``hf``: config.json, tokenizer facts).
    _facts: Mapping[str, Any] = dataclasses.field(
        init=False, repr=False, compare=False, hash=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"a teacher spec needs a non-empty name, got {self.name!r}")
        who = f"teacher {self.name!r}"
        if self.kind not in SPEC_KINDS:
            raise ConfigError(f"{who}: spec kind must be one of {SPEC_KINDS}, got {self.kind!r}")
        if self.resources is not None and not isinstance(self.resources, TeacherResources):
            raise ConfigError(
                f"{who}: resources must be a TeacherResources, got {type(self.resources).__name__}"
            )
        set_(self, "kwargs", _json_copy(dict(self.kwargs or {}), f"{who}: kwargs"))
        set_(self, "autocast_dtype", _dtype_name(self.autocast_dtype, f"{who}: autocast_dtype"))
        if self.kind in ("checkpoint", "factory"):
            if not isinstance(self.factory_path, str) or not self.factory_path:
                raise ConfigError(
                    f"{who}: a {self.kind!r} spec needs the factory's import path as a string "
                    "like 'package.module:function'"
                )
            # Imported (not called) here, so that a typo fails on the driver.
            if not callable(import_object(self.factory_path)):
                raise ConfigError(f"{who}: factory {self.factory_path!r} is not callable")
        if self.kind == "factory":
            if self.version is None or self.version in ("", {}, []):
                raise ConfigError(
                    f"{who}: a factory spec needs a non-empty version describing what "
                    "determines its outputs (e.g. version=1, or a config dict), since it has "
                    "no weights file to hash"
                )
            set_(self, "version", _json_copy(self.version, f"{who}: version"))
            return
        if not isinstance(self.path, str) or not self.path:
            raise ConfigError(f"{who}: a {self.kind!r} spec needs a path")
        set_(self, "path", os.path.abspath(self.path))
        assert self.path is not None
        if self.kind in ("checkpoint", "torchscript"):
            if not os.path.isfile(self.path):
                what = "checkpoint" if self.kind == "checkpoint" else "TorchScript file"
                raise DataFileNotFoundError(
                    f"{who}: {what} {self.path} does not exist; check the path (it is read on "
                    "the actors, so it must be on storage they share)"
                )
            return
        # hf
        if self.task not in HF_TASKS:
            raise ConfigError(f"{who}: task must be one of {list(HF_TASKS)}, got {self.task!r}")
        set_(self, "dtype", _dtype_name(self.dtype or "float32", f"{who}: dtype"))
        if self.vocab_size is not None and (
            isinstance(self.vocab_size, bool)
            or not isinstance(self.vocab_size, int)
            or self.vocab_size < 1
        ):
            raise ConfigError(f"{who}: vocab_size must be an int >= 1, got {self.vocab_size!r}")
        if not os.path.isdir(self.path):
            raise DataFileNotFoundError(
                f"{who}: Hugging Face model directory {self.path} does not exist"
            )
        set_(self, "_facts", _hf_facts(self.name, self.path, self.task, self.vocab_size))

    # -- constructors ---------------------------------------------------------------
    @classmethod
    def checkpoint(
        cls,
        name: str,
        factory: str,
        path: str,
        kwargs: Mapping[str, Any] | None = None,
        *,
        autocast_dtype: torch.dtype | str | None = None,
        resources: TeacherResources | None = None,
    ) -> TeacherSpec:
        """A module built by ``factory(**kwargs)``, with the weights of ``path``.

        Loads as :meth:`kdcache.Teacher.from_checkpoint` (a strict load of a safetensors
        file or a weights-only torch state dict; ``kwargs`` is the teacher's config).

        Args:
            name: Teacher name.
            factory: Import path of ``factory(**kwargs) -> nn.Module``.
            path: The weights file.
            kwargs: JSON arguments of the factory (part of the fingerprint).
            autocast_dtype: See :class:`kdcache.Teacher`.
            resources: See :class:`TeacherResources`.

        Raises:
            DataFileNotFoundError: ``path`` does not exist.
            ConfigError: the factory does not import, or ``kwargs`` is not JSON.
        """
        return cls(
            name,
            "checkpoint",
            path=path,
            factory_path=factory,
            kwargs=dict(kwargs or {}),
            autocast_dtype=_dtype_name(autocast_dtype, "autocast_dtype"),
            resources=resources,
        )

    @classmethod
    def torchscript(
        cls,
        name: str,
        path: str,
        *,
        config: Mapping[str, Any] | None = None,
        autocast_dtype: torch.dtype | str | None = None,
        resources: TeacherResources | None = None,
    ) -> TeacherSpec:
        """A TorchScript archive (loaded on the actor's CPU, as
        :meth:`kdcache.Teacher.from_torchscript`); ``config`` is the teacher's config.

        Raises:
            DataFileNotFoundError: ``path`` does not exist.
        """
        return cls(
            name,
            "torchscript",
            path=path,
            kwargs=dict(config or {}),
            autocast_dtype=_dtype_name(autocast_dtype, "autocast_dtype"),
            resources=resources,
        )

    @classmethod
    def hf(
        cls,
        name: str,
        path: str,
        *,
        task: str = "sequence-classification",
        dtype: torch.dtype | str = "float32",
        vocab_size: int | None = None,
        autocast_dtype: torch.dtype | str | None = None,
        resources: TeacherResources | None = None,
    ) -> TeacherSpec:
        """A Hugging Face model in a local directory (loaded as
        :meth:`kdcache.Teacher.from_hf`: token ids [B, T] in, logits [B, V] or
        [B, T, V] out).

        On creation the driver reads the small files only: ``config.json``, the list of
        weight files, and the tokenizer (its length and pad id, as ``from_hf`` does), so
        that :attr:`config` offers ``vocab_size``, ``tokenizer_sha256`` and
        ``pad_token_id`` like a loaded teacher. These are a snapshot (make a new spec
        after changing them); the weight files and the tokenizer files are hashed
        whenever :meth:`fingerprint` is called.

        Raises:
            DataFileNotFoundError: the directory, its ``config.json`` or its weights file
                does not exist.
            ConfigError: unknown task or dtype.
            MissingDependencyError: the directory has a tokenizer and transformers is not
                installed (extra ``hf``).
        """
        return cls(
            name,
            "hf",
            path=path,
            task=task,
            dtype=_dtype_name(dtype, "dtype"),
            vocab_size=vocab_size,
            autocast_dtype=_dtype_name(autocast_dtype, "autocast_dtype"),
            resources=resources,
        )

    @classmethod
    def factory(
        cls,
        name: str,
        factory: str,
        kwargs: Mapping[str, Any] | None = None,
        version: Any = None,
        *,
        autocast_dtype: torch.dtype | str | None = None,
        resources: TeacherResources | None = None,
    ) -> TeacherSpec:
        """A teacher built in code by ``factory(**kwargs)``, which returns an
        ``nn.Module`` (logits [B, V]) or a :class:`kdcache.Teacher`.

        Nothing tells the weights apart but ``version``: it is the fingerprint, with
        the factory's path and ``kwargs``. Change it whenever the outputs change, or old
        cache entries are reused. A dict ``version`` is also the teacher's
        :attr:`config` on the driver (put ``vocab_size`` and ``tokenizer_sha256`` there
        for token datasets).

        Raises:
            ConfigError: ``version`` is missing or empty, the factory does not import.
        """
        return cls(
            name,
            "factory",
            factory_path=factory,
            kwargs=dict(kwargs or {}),
            version=version,
            autocast_dtype=_dtype_name(autocast_dtype, "autocast_dtype"),
            resources=resources,
        )

    def with_resources(self, resources: TeacherResources | None) -> TeacherSpec:
        """This spec with other :class:`TeacherResources` (same fingerprint)."""
        return dataclasses.replace(self, resources=resources)

    # -- what the driver knows -----------------------------------------------------
    @property
    def config(self) -> dict[str, Any]:
        """The teacher's config as far as the driver knows it without loading it.

        ``checkpoint``: the factory's ``kwargs``; ``torchscript``: its config; ``hf``:
        ``task``, ``vocab_size``, ``tokenizer_sha256``, ``pad_token_id`` (as a loaded
        Hugging Face teacher's config has them); ``factory``: ``version`` (a dict
        version as is).
        """
        if self.kind == "hf":
            from kdcache.data.tokens import tokenizer_files_sha256

            assert self.path is not None
            return {
                "task": self.task,
                "vocab_size": self._facts["vocab_size"],
                "tokenizer_sha256": tokenizer_files_sha256(self.path),
                "pad_token_id": self._facts["pad_token_id"],
            }
        if self.kind == "factory":
            if isinstance(self.version, Mapping):
                return dict(self.version)
            return {"version": self.version}
        return dict(self.kwargs)

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the teacher's outputs (goes into cache keys), without building
        the model or reading the weights into memory.

        Returns:
            A JSON-able dict: ``spec`` (the kind), the SHA-256 of the weight files
            (streamed, memoised per process by path, size and mtime), the factory's
            import path and ``kwargs``, the version (``factory``), for ``hf`` the model's
            ``config.json`` (without save-time keys), the task, dtype, vocabulary size,
            tokenizer files' SHA-256 and pad id; ``autocast_dtype`` when set. The name
            and the resources are not part of it.

        Raises:
            DataFileNotFoundError: a weights file is gone since the spec was made.
        """
        fp: dict[str, Any] = {"spec": self.kind}
        if self.kind == "checkpoint":
            assert self.path is not None
            fp.update(
                factory=self.factory_path,
                kwargs=dict(self.kwargs),
                weights_sha256=self._weights_sha256(self.path),
            )
        elif self.kind == "torchscript":
            assert self.path is not None
            fp.update(config=dict(self.kwargs), weights_sha256=self._weights_sha256(self.path))
        elif self.kind == "factory":
            fp.update(factory=self.factory_path, kwargs=dict(self.kwargs), version=self.version)
        else:
            assert self.path is not None
            cfg = self.config
            fp.update(
                task=self.task,
                dtype=self.dtype,
                hf_config=self._facts["hf_config"],
                weights={
                    f: self._weights_sha256(os.path.join(self.path, f))
                    for f in self._facts["weight_files"]
                },
                vocab_size=cfg["vocab_size"],
                tokenizer_sha256=cfg["tokenizer_sha256"],
                pad_token_id=cfg["pad_token_id"],
            )
        if self.autocast_dtype is not None:
            fp["autocast_dtype"] = f"torch.{self.autocast_dtype}"
        return fp

    def _weights_sha256(self, path: str) -> str:
        try:
            return file_sha256(path)
        except DataFileNotFoundError:
            raise DataFileNotFoundError(
                f"teacher {self.name!r}: weights file {path} no longer exists (it did when "
                "the spec was made)"
            ) from None

    # -- where it runs ----------------------------------------------------------------
    def load(self) -> Teacher:
        """Build the teacher in this process, on the CPU (what an actor does on first use).

        Returns:
            A :class:`kdcache.Teacher` named :attr:`name`, with this spec's
            ``autocast_dtype`` and ``resources``. Its own ``fingerprint()`` hashes its
            state dict; cache keys use the spec's :meth:`fingerprint`.

        Raises:
            DataFileNotFoundError: a file is missing (where the teacher is loaded).
            ConfigError: the factory fails or returns neither an ``nn.Module`` nor a
                Teacher; the weights do not fit the architecture.
            MissingDependencyError: ``hf`` without transformers installed (extra ``hf``).
        """
        from kdcache.teachers.teacher import Teacher

        who = f"teacher {self.name!r}"
        autocast = _torch_dtype(self.autocast_dtype)
        teacher: Teacher
        if self.kind == "checkpoint":
            assert self.path is not None and self.factory_path is not None
            fn = import_object(self.factory_path)
            what = f"{who} (factory {self.factory_path!r})"
            teacher = Teacher.from_checkpoint(
                lambda **kw: call_factory(fn, kw, what),
                self.path,
                name=self.name,
                config=dict(self.kwargs),
            )
            teacher.autocast_dtype = autocast
        elif self.kind == "torchscript":
            assert self.path is not None
            teacher = Teacher.from_torchscript(self.path, name=self.name, config=dict(self.kwargs))
            teacher.autocast_dtype = autocast
        elif self.kind == "hf":
            assert self.path is not None and self.task is not None
            teacher = Teacher.from_hf(
                self.path,
                task=self.task,
                name=self.name,
                dtype=_torch_dtype(self.dtype) or torch.float32,
                vocab_size=self._facts["vocab_size"],
                autocast_dtype=autocast,
            )
        else:
            assert self.factory_path is not None
            what = f"{who} (factory {self.factory_path!r})"
            built = call_factory(import_object(self.factory_path), dict(self.kwargs), what)
            if isinstance(built, Teacher):
                teacher = built
                teacher.name = self.name
                if autocast is not None:
                    teacher.autocast_dtype = autocast
            elif isinstance(built, torch.nn.Module):
                teacher = Teacher(self.name, built, self.config, autocast_dtype=autocast)
            else:
                raise ConfigError(
                    f"{what} returned {type(built).__name__}; expected a torch.nn.Module "
                    "(logits [B, V]) or a kdcache.Teacher"
                )
        teacher.resources = self.resources
        return teacher
