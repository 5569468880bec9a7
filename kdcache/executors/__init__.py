"""Executors of the teacher stage: where the per-shard tasks run (this process, or Ray actors)."""

from __future__ import annotations

#: Names of the built-in executors.
EXECUTORS = ("ray", "local")
