"""Teachers and ensembles of teachers.

A :class:`Teacher` wraps a model that maps a batch of inputs to logits [B, V], with a
fingerprint (weights hash, architecture, config, dtype) that goes into cache keys.
A :class:`TeacherEnsemble` is an ordered list of teachers with a combination rule; the
teacher stage caches each member separately and the ensemble is a view at read time. Its
members may also be :class:`kdcache.teachers.TeacherSpec` objects: teachers described by
their files and loaded where they run (the Ray actors), never on the driver.

Shape legend: K teachers, B batch, V classes or vocabulary.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from kdcache import quiet, targets
from kdcache.errors import ConfigError, DataFileNotFoundError, TeacherOutputError
from kdcache.teachers.loaders import (
    FeatureTap,
    HFLogits,
    _CallableModule,
    _tokenizer_facts,
    load_state_dict,
    weights_sha256,
)
from kdcache.teachers.spec import TeacherResources, TeacherSpec


class Teacher:
    """A model that produces logits for the teacher stage.

    Use the constructors: :meth:`from_module`, :meth:`from_checkpoint`,
    :meth:`from_torchscript`.

    A Teacher holds its module, so it travels with its weights: the Ray executor ships it
    (pickled, through the object store) once per actor and build. That is right for small
    teachers (a module built in code, a few MB). A large teacher is better given as a
    :class:`kdcache.teachers.TeacherSpec`, which the actors load from its files and the
    driver never holds.

    Args:
        name: Human-readable name (reports, manifests); not part of the cache key.
        module: ``torch.nn.Module`` mapping inputs [B, ...] to logits [B, V].
        config: JSON-able architecture/config description (part of the fingerprint).
        autocast_dtype: Run the forward pass under ``torch.autocast`` with this dtype
            (e.g. ``torch.bfloat16`` on GPUs); part of the fingerprint, since it changes
            the outputs. None runs in the weights' dtype.
        resources: What the teacher's Ray actors need
            (:class:`kdcache.teachers.TeacherResources`): with any field set the teacher
            gets an actor pool of its own (or its group's); None: the shared default pool.
            Not part of the fingerprint. Also settable as the attribute ``resources``.

    Raises:
        ConfigError: ``config`` is not JSON-serialisable, or ``resources`` is not a
            TeacherResources.
    """

    def __init__(
        self,
        name: str,
        module: torch.nn.Module,
        config: dict[str, Any] | None = None,
        *,
        autocast_dtype: torch.dtype | None = None,
        resources: TeacherResources | None = None,
    ) -> None:
        if resources is not None and not isinstance(resources, TeacherResources):
            raise ConfigError(
                f"teacher {name!r}: resources must be a kdcache.teachers.TeacherResources, "
                f"got {type(resources).__name__}"
            )
        self.resources = resources
        self.name = name
        self.module = module.eval()
        self.config = dict(config or {})
        self.autocast_dtype = autocast_dtype
        try:
            json.dumps(self.config, sort_keys=True)
        except TypeError as exc:
            raise ConfigError(
                f"teacher {name!r}: config must be JSON-serialisable ({exc})"
            ) from exc
        self._fingerprint: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"Teacher({self.name!r}, {type(self.module).__name__}, {self.num_parameters} params)"

    @classmethod
    def from_module(
        cls,
        module: torch.nn.Module,
        *,
        name: str | None = None,
        config: dict[str, Any] | None = None,
        resources: TeacherResources | None = None,
    ) -> Teacher:
        """Wrap an in-memory module (the small-teacher path: it is shipped to each actor
        with its weights; see :class:`Teacher`)."""
        return cls(name or type(module).__name__, module, config, resources=resources)

    @classmethod
    def from_checkpoint(
        cls,
        factory: Callable[..., torch.nn.Module],
        path: str,
        *,
        name: str | None = None,
        config: dict[str, Any] | None = None,
    ) -> Teacher:
        """Build ``factory(**config)`` and load weights from ``path`` (safetensors or a
        torch state dict, loaded with ``weights_only=True``).

        Raises:
            DataFileNotFoundError: ``path`` does not exist.
            ConfigError: the weights do not fit the architecture (strict load: missing or
                unexpected keys, or other shapes); names the file and the config.
        """
        module = factory(**(config or {}))
        try:
            module.load_state_dict(load_state_dict(path), strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()
            raise ConfigError(
                f"the weights in {path} do not fit the architecture built from config "
                f"{config!r} ({type(module).__name__}): {' '.join(first[:3])[:400]}; give the "
                "config the checkpoint was trained with"
            ) from exc
        return cls(name or os.path.basename(path).split(".")[0], module, config)

    @classmethod
    def from_callable(
        cls,
        fn: Callable[[torch.Tensor], torch.Tensor],
        *,
        name: str,
        config: dict[str, Any],
    ) -> Teacher:
        """Wrap a plain function ``fn(inputs [B, ...]) -> logits [B, V]`` (no weights).

        A function has no weights to hash, so its fingerprint is its qualified name plus
        ``config``: put in ``config`` everything that determines its outputs (a version,
        the parameters it closes over), or its cache entries will be reused after it
        changes. It must be picklable (a module-level function) to run on Ray actors.

        Raises:
            ConfigError: ``config`` is empty (nothing would tell two versions apart).
        """
        if not config:
            raise ConfigError(
                f"teacher {name!r}: a plain callable needs a non-empty config describing "
                "what determines its outputs (e.g. {'version': 1})"
            )
        qualname = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"
        return cls(name, _CallableModule(fn), {"callable": qualname, **config})

    @classmethod
    def from_torchscript(
        cls, path: str, *, name: str | None = None, config: dict[str, Any] | None = None
    ) -> Teacher:
        """Load a TorchScript archive on the CPU.

        torch >= 2.13 deprecates TorchScript; teachers still ship as TorchScript archives,
        so the deprecation warning of ``torch.jit.load`` is silenced here on purpose.

        Raises:
            DataFileNotFoundError: ``path`` does not exist.
        """
        if not os.path.exists(path):
            raise DataFileNotFoundError(f"TorchScript file {path} does not exist")
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=".*torch.jit.load.*", category=DeprecationWarning
            )
            module = torch.jit.load(path, map_location="cpu")
        return cls(name or os.path.basename(path), module, config)

    @classmethod
    def from_hf(
        cls,
        path: str,
        *,
        task: str = "sequence-classification",
        name: str | None = None,
        dtype: torch.dtype = torch.float32,
        vocab_size: int | None = None,
        autocast_dtype: torch.dtype | None = None,
    ) -> Teacher:
        """Load a Hugging Face transformers model from a local directory (never a hub).

        The teacher takes token ids [B, T] (int64; the attention mask is ``ids != pad``)
        and returns logits [B, V] for ``task="sequence-classification"`` or [B, T, V]
        for ``task="causal-lm"`` (next-token logits at every position).

        Args:
            path: A directory written by ``save_pretrained`` (config, weights and, for
                language models, the tokenizer).
            task: ``"sequence-classification"`` or ``"causal-lm"``.
            name: Teacher name (default: the directory name).
            dtype: Weights dtype to load in.
            vocab_size: Causal LMs only: the real vocabulary size; logits padded beyond it
                (a common trick for fast matmuls) are trimmed. Default: the tokenizer's
                length, if the directory has a tokenizer, else no trimming.
            autocast_dtype: See :class:`Teacher`.

        Returns:
            A Teacher whose fingerprint covers the weights, the model config, the
            tokenizer files and the dtype.

        Raises:
            DataFileNotFoundError: ``path`` is not a directory.
            ConfigError: unknown task, or ``vocab_size`` larger than the logit dimension.
            MissingDependencyError: transformers is not installed (extra ``hf``).
        """
        from kdcache.errors import require

        if not os.path.isdir(path):
            raise DataFileNotFoundError(f"Hugging Face model directory {path} does not exist")
        transformers = require("transformers", "hf")
        auto = {
            "sequence-classification": transformers.AutoModelForSequenceClassification,
            "causal-lm": transformers.AutoModelForCausalLM,
        }
        if task not in auto:
            raise ConfigError(f"task must be one of {sorted(auto)}, got {task!r}")
        with quiet.hf_loading():  # no weight-loading bars for a local model
            model = auto[task].from_pretrained(path, dtype=dtype, local_files_only=True)
            tokenizer_sha, tokenizer_len, pad_id = _tokenizer_facts(path)
        if vocab_size is None and task == "causal-lm":
            vocab_size = tokenizer_len  # classifiers' V is their number of labels
        if pad_id is None:
            pad_id = getattr(model.config, "pad_token_id", None)
        hf_config = {
            k: v
            for k, v in model.config.to_dict().items()
            if k not in ("_name_or_path", "transformers_version", "torch_dtype", "dtype")
        }
        config = {
            "task": task,
            "hf_config": hf_config,
            "tokenizer_sha256": tokenizer_sha,
            "vocab_size": vocab_size,
            "pad_token_id": pad_id,
        }
        module = HFLogits(model, pad_token_id=pad_id, vocab_size=vocab_size)
        return cls(
            name or os.path.basename(os.path.normpath(path)),
            module,
            json.loads(json.dumps(config, default=str)),
            autocast_dtype=autocast_dtype,
        )

    def feature(self, module_path: str, *, name: str | None = None) -> Teacher:
        """A teacher whose output is a hidden feature of this one, for feature-based
        (FitNets, Romero et al. 2015) and relation-based (RKD, Park et al. 2019)
        distillation.

        Cache it like any teacher at ``temperature=1.0``: the entry then stores the raw
        features [N, D] (float32) as its own entry, keyed by the weights *and* the
        submodule, and :class:`kdcache.SoftTargetDataset` with ``output="features"``
        streams them back.

        Args:
            module_path: Dotted submodule name, e.g. ``"net.9"`` (see
                ``module.named_modules()``); its output is flattened to [B, D].
            name: Name of the new teacher (default ``"<name>:<module_path>"``).

        Raises:
            ConfigError: no such submodule.
        """
        return Teacher(
            name or f"{self.name}:{module_path}",
            FeatureTap(self.module, module_path),
            {**self.config, "feature": module_path},
            autocast_dtype=self.autocast_dtype,
            resources=self.resources,
        )

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def fingerprint(self) -> dict[str, Any]:
        """Weights hash, architecture (class), config and parameter dtypes."""
        if self._fingerprint is None:
            dtypes = sorted({str(p.dtype) for p in self.module.state_dict().values()})
            self._fingerprint = {
                "weights_sha256": weights_sha256(self.module),
                "architecture": f"{type(self.module).__module__}.{type(self.module).__qualname__}",
                "config": self.config,
                "dtypes": dtypes,
            }
            if self.autocast_dtype is not None:
                self._fingerprint["autocast_dtype"] = str(self.autocast_dtype)
        return self._fingerprint

    @property
    def device(self) -> torch.device:
        for p in self.module.parameters():
            return p.device
        return torch.device("cpu")

    def to(self, device: str | torch.device) -> Teacher:
        """Move the module to ``device`` (in place); returns self."""
        self.module.to(device)
        return self

    @torch.inference_mode()
    def logits(self, inputs: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Run the teacher in eval mode under ``torch.inference_mode``.

        Args:
            inputs: A batch [B, ...] in whatever form the module expects.

        Returns:
            float32 logits [B, V] (or [B, T, V] for token-level models), on the CPU.

        Raises:
            TeacherOutputError: the output is not a [B, V] or [B, T, V] tensor.
        """
        # np.array copies: inputs may be read-only views (Ray's object store, memory maps).
        x = torch.from_numpy(np.array(inputs)) if isinstance(inputs, np.ndarray) else inputs
        device = self.device
        x = x.to(device)
        if self.autocast_dtype is not None:
            with torch.autocast(device_type=device.type, dtype=self.autocast_dtype):
                out = self.module(x)
        else:
            out = self.module(x)
        if (
            not isinstance(out, torch.Tensor)
            or out.dim() not in (2, 3)
            or out.shape[0] != x.shape[0]
        ):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise TeacherOutputError(
                f"teacher {self.name!r} must return logits [B, V] (or [B, T, V] for token "
                f"models) for B={x.shape[0]}, got {shape}"
            )
        return out.float().cpu()


class TeacherEnsemble:
    """An ordered list of teachers combined by a rule at read time.

    Args:
        teachers: One or more :class:`Teacher` or :class:`kdcache.teachers.TeacherSpec`
            objects (mixed), with the same V. A spec stays a spec: the teacher stage
            loads it where it runs; :meth:`load` loads it here, for online use.
        weights: K non-negative weights (normalised), or None for uniform.
        rule: ``"mean_probs"`` (mean of probabilities), ``"mean_logprobs"`` (product of
            experts, renormalised), or a per-sample rule by name or as a
            :class:`kdcache.EnsembleRule` with its parameters (``confidence_max``,
            ``confidence_entropy``, ``best_on_label``, ``route``); see
            :func:`kdcache.targets.combine_ensemble`. The rule is applied when targets are
            read, never when they are computed: it is in the ensemble view's key, not in
            any entry's, so changing it recomputes no teacher.

    Attributes:
        ensemble_rule: The rule with its parameters (weights included).
        rule: Its name. weights: Its static weights as a list, or None.

    Raises:
        ConfigError: empty list, an item that is neither a Teacher nor a TeacherSpec,
            duplicate names, or bad weights/rule.
    """

    def __init__(
        self,
        teachers: Sequence[Teacher | TeacherSpec],
        weights: Sequence[float] | None = None,
        rule: str | targets.EnsembleRule = "mean_probs",
    ) -> None:
        if not teachers:
            raise ConfigError("a TeacherEnsemble needs at least one teacher")
        for t in teachers:
            if not isinstance(t, Teacher | TeacherSpec):
                raise ConfigError(
                    f"a TeacherEnsemble holds kdcache.Teacher or kdcache.teachers.TeacherSpec "
                    f"objects, got {type(t).__name__} ({t!r:.80}); wrap a module with "
                    "Teacher.from_module or describe its files with a TeacherSpec"
                )
        names = [t.name for t in teachers]
        if len(set(names)) != len(names):
            raise ConfigError(f"teacher names must be unique, got {names}")
        if isinstance(rule, str) and rule not in targets.ALL_ENSEMBLE_RULES:
            raise ConfigError(
                f"unknown rule {rule!r}; expected one of {targets.ALL_ENSEMBLE_RULES}"
            )
        if weights is not None and len(weights) != len(teachers):
            raise ConfigError(f"{len(weights)} weights for {len(teachers)} teachers")
        spec = targets.as_ensemble_rule(rule, weights=weights)
        spec.check_num_teachers(len(teachers))
        spec.check_readable()  # before any compute
        self.teachers: list[Teacher | TeacherSpec] = list(teachers)
        self.ensemble_rule = spec
        self.weights = None if spec.weights is None else list(spec.weights)
        self.rule = spec.rule
        self._loaded: dict[int, Teacher] = {}  # spec position -> the spec loaded here

    def __len__(self) -> int:
        return len(self.teachers)

    def __iter__(self) -> Iterator[Teacher | TeacherSpec]:
        return iter(self.teachers)

    def load(self) -> list[Teacher]:
        """The members as loaded teachers, in order: specs are loaded in this process on
        the first call (:meth:`TeacherSpec.load`) and kept by the ensemble.

        ``self.teachers`` is left as given, so cache keys still come from the specs.

        Raises:
            As :meth:`TeacherSpec.load`.
        """
        out = []
        for k, t in enumerate(self.teachers):
            if isinstance(t, TeacherSpec):
                if k not in self._loaded:
                    self._loaded[k] = t.load()
                out.append(self._loaded[k])
            else:
                out.append(t)
        return out

    @property
    def num_parameters(self) -> int:
        """Parameters summed over the members.

        Raises:
            ConfigError: a member is a spec not loaded yet (call :meth:`load` first: the
                count needs the model, which a spec does not hold).
        """
        pending = [
            t.name
            for k, t in enumerate(self.teachers)
            if isinstance(t, TeacherSpec) and k not in self._loaded
        ]
        if pending:
            raise ConfigError(
                f"teacher(s) {pending} are TeacherSpecs, not loaded in this process, so their "
                "parameters cannot be counted; call ensemble.load() first (it builds them "
                "here) or count them where they run"
            )
        return sum(t.num_parameters for t in self.load())

    def log_probs(
        self,
        inputs: torch.Tensor | np.ndarray,
        temperature: float = 1.0,
        *,
        labels_B: Any = None,
        route_keys_B: Any = None,
    ) -> torch.Tensor:
        """Online ensemble target: combined log-probabilities [B, V] float32 at ``temperature``.

        Specs are loaded in this process on the first call (see :meth:`load`).

        Args:
            inputs: A batch [B, ...] for the teachers.
            temperature: tau > 0.
            labels_B: ``best_on_label`` only: int labels [B] (``-100`` where none).
            route_keys_B: ``route`` only: each sample's key [B].

        Raises:
            TeacherOutputError: the teachers disagree on V.
            ConfigError: what :func:`kdcache.targets.combine_ensemble` refuses (a
                per-sample rule without its labels or keys).
        """
        logits = [targets.scale_logits(t.logits(inputs), temperature) for t in self.load()]
        if len({x.shape for x in logits}) != 1:
            raise TeacherOutputError(
                f"teachers disagree on output shape: {[tuple(x.shape) for x in logits]}"
            )
        extra: dict[str, Any] = {}
        if labels_B is not None:
            extra["labels_B"] = labels_B
        if route_keys_B is not None:
            extra["route_keys_B"] = route_keys_B
        return targets.combine_ensemble(torch.stack(logits), rule=self.ensemble_rule, **extra)
