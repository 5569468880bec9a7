"""Fakes and fixtures shared by kdcache's tests and by users' own tests.

Everything here is small, deterministic and CPU-only. The store conformance suite,
:mod:`kdcache.testing.store_suite` (``StoreSuite``), needs pytest and is imported only
on demand: ``from kdcache.testing.store_suite import StoreSuite``.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import torch

from kdcache.data.base import ArrayDataset
from kdcache.teachers.teacher import Teacher

if "pytest" in sys.modules:
    # Under pytest, let the suite's plain asserts explain their failures (as in a test
    # file); this must run before the suite module is imported.
    sys.modules["pytest"].register_assert_rewrite("kdcache.testing.store_suite")


def __getattr__(name: str) -> Any:
    """``kdcache.testing.StoreSuite`` imports the suite (and pytest) on first use."""
    if name == "StoreSuite":
        from kdcache.testing.store_suite import StoreSuite

        return StoreSuite
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def toy_dataset(
    num_records: int = 64,
    num_features: int = 8,
    num_classes: int = 5,
    *,
    num_shards: int = 4,
    seed: int = 0,
    id_offset: int = 1000,
) -> ArrayDataset:
    """A random float32 dataset [N, F] with labels in [0, C) and ids ``id_offset + i``."""
    rng = np.random.default_rng(seed)
    return ArrayDataset(
        sample_ids=np.arange(num_records, dtype=np.int64) + id_offset,
        inputs=rng.standard_normal((num_records, num_features)).astype(np.float32),
        labels=rng.integers(0, num_classes, num_records),
        num_shards=num_shards,
        preprocessing={"toy": True, "seed": seed},
    )


def linear_teacher(
    num_features: int = 8,
    num_classes: int = 5,
    *,
    seed: int = 0,
    name: str | None = None,
    scale: float = 3.0,
) -> Teacher:
    """A Teacher wrapping a seeded ``nn.Linear(F, C)`` (weights scaled by ``scale``)."""
    g = torch.Generator().manual_seed(seed)
    module = torch.nn.Linear(num_features, num_classes)
    with torch.no_grad():
        module.weight.copy_(torch.randn(num_classes, num_features, generator=g) * scale)
        module.bias.copy_(torch.randn(num_classes, generator=g))
    return Teacher.from_module(
        module, name=name or f"linear-{seed}", config={"in": num_features, "out": num_classes}
    )


class NaNAt(torch.nn.Module):
    """Wraps a module and returns NaN logits for rows whose first feature equals ``value``."""

    def __init__(self, inner: torch.nn.Module, value: float) -> None:
        super().__init__()
        self.inner = inner
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        bad = x[:, 0] == self.value
        return torch.where(bad[:, None], torch.full_like(out, float("nan")), out)


class CrashOnce(torch.nn.Module):
    """Fault injection: kills its process (as a lost node would) the first time it sees a
    row whose first feature equals ``value``; a marker file makes it fire only once."""

    def __init__(self, inner: torch.nn.Module, value: float, marker_path: str) -> None:
        super().__init__()
        self.inner = inner
        self.value = value
        self.marker_path = marker_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import os

        if bool((x[:, 0] == self.value).any()) and not os.path.exists(self.marker_path):
            with open(self.marker_path, "w") as f:
                f.write(str(os.getpid()))
            os._exit(1)
        return self.inner(x)


class SlowLinear(torch.nn.Linear):
    """``nn.Linear`` that sleeps ``$KDCACHE_TEST_DELAY_S`` seconds per forward pass.

    The delay comes from the environment, not the config, so a slow run and a fast run of
    the same teacher share a cache key (used to interrupt builds in tests).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import os
        import time

        time.sleep(float(os.environ.get("KDCACHE_TEST_DELAY_S", "0")))
        return super().forward(x)


def linear_module(num_features: int = 8, num_classes: int = 5) -> torch.nn.Module:
    """A factory for build configs: a :class:`SlowLinear` (weights come from a checkpoint)."""
    return SlowLinear(num_features, num_classes)
