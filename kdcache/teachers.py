"""Teachers and ensembles of teachers.

A :class:`Teacher` wraps a model that maps a batch of inputs to logits [B, V], with a
fingerprint (weights hash, architecture, config, dtype) that goes into cache keys.
A :class:`TeacherEnsemble` is an ordered list of teachers with a combination rule; the
teacher stage caches each member separately and the ensemble is a view at read time.

Shape legend: K teachers, B batch, V classes or vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from kdcache import targets
from kdcache.errors import ConfigError, DataFileNotFoundError, TeacherOutputError


def weights_sha256(module: torch.nn.Module) -> str:
    """SHA-256 over a module's state dict: names, dtypes, shapes and bytes, sorted by name."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Load weights from a ``.safetensors`` file, or a torch file with ``weights_only=True``.

    Raises:
        DataFileNotFoundError: the file does not exist.
    """
    if not os.path.exists(path):
        raise DataFileNotFoundError(f"checkpoint {path} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


class Teacher:
    """A model that produces logits for the teacher stage.

    Use the constructors: :meth:`from_module`, :meth:`from_checkpoint`,
    :meth:`from_torchscript`.

    Args:
        name: Human-readable name (reports, manifests); not part of the cache key.
        module: ``torch.nn.Module`` mapping inputs [B, ...] to logits [B, V].
        config: JSON-able architecture/config description (part of the fingerprint).

    Raises:
        ConfigError: ``config`` is not JSON-serialisable.
    """

    def __init__(
        self, name: str, module: torch.nn.Module, config: dict[str, Any] | None = None
    ) -> None:
        self.name = name
        self.module = module.eval()
        self.config = dict(config or {})
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
    ) -> Teacher:
        """Wrap an in-memory module."""
        return cls(name or type(module).__name__, module, config)

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
            RuntimeError: the weights do not fit the architecture (strict load).
        """
        module = factory(**(config or {}))
        module.load_state_dict(load_state_dict(path), strict=True)
        return cls(name or os.path.basename(path).split(".")[0], module, config)

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
        return self._fingerprint

    @torch.inference_mode()
    def logits(self, inputs: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Run the teacher in eval mode under ``torch.inference_mode``.

        Args:
            inputs: A batch [B, ...] in whatever form the module expects.

        Returns:
            float32 logits [B, V].

        Raises:
            TeacherOutputError: the output is not a 2-D tensor with B rows.
        """
        # np.array copies: inputs may be read-only views (Ray's object store, memory maps).
        x = torch.from_numpy(np.array(inputs)) if isinstance(inputs, np.ndarray) else inputs
        out = self.module(x)
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != x.shape[0]:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise TeacherOutputError(
                f"teacher {self.name!r} must return logits [B, V] for B={x.shape[0]}, got {shape}"
            )
        return out.float()


class TeacherEnsemble:
    """An ordered list of teachers combined by a rule at read time.

    Args:
        teachers: One or more :class:`Teacher` objects with the same V.
        weights: K non-negative weights (normalised), or None for uniform.
        rule: ``"mean_probs"`` (mean of probabilities) or ``"mean_logprobs"`` (product of
            experts, renormalised); see :func:`kdcache.targets.combine_ensemble`.

    Raises:
        ConfigError: empty list, duplicate names, or bad weights/rule.
    """

    def __init__(
        self,
        teachers: Sequence[Teacher],
        weights: Sequence[float] | None = None,
        rule: str = "mean_probs",
    ) -> None:
        if not teachers:
            raise ConfigError("a TeacherEnsemble needs at least one teacher")
        names = [t.name for t in teachers]
        if len(set(names)) != len(names):
            raise ConfigError(f"teacher names must be unique, got {names}")
        if rule not in targets.ENSEMBLE_RULES:
            raise ConfigError(f"unknown rule {rule!r}; expected one of {targets.ENSEMBLE_RULES}")
        if weights is not None and len(weights) != len(teachers):
            raise ConfigError(f"{len(weights)} weights for {len(teachers)} teachers")
        self.teachers = list(teachers)
        self.weights = None if weights is None else [float(w) for w in weights]
        self.rule = rule

    def __len__(self) -> int:
        return len(self.teachers)

    def __iter__(self):
        return iter(self.teachers)

    @property
    def num_parameters(self) -> int:
        return sum(t.num_parameters for t in self.teachers)

    def log_probs(
        self, inputs: torch.Tensor | np.ndarray, temperature: float = 1.0
    ) -> torch.Tensor:
        """Online ensemble target: combined log-probabilities [B, V] float32 at ``temperature``.

        Raises:
            TeacherOutputError: the teachers disagree on V.
        """
        logits = [targets.scale_logits(t.logits(inputs), temperature) for t in self.teachers]
        if len({x.shape for x in logits}) != 1:
            raise TeacherOutputError(
                f"teachers disagree on output shape: {[tuple(x.shape) for x in logits]}"
            )
        return targets.combine_ensemble(torch.stack(logits), rule=self.rule, weights=self.weights)
