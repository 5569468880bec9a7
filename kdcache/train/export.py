"""Exporting a trained student: safetensors weights with kdcache's JSON metadata."""

from __future__ import annotations

import json
import os
from typing import Any

import torch


def save_safetensors(module: torch.nn.Module, path: str, metadata: dict[str, Any]) -> int:
    """Save a module's weights as safetensors with JSON metadata; returns bytes on disk.

    Args:
        module: The model.
        path: Output ``.safetensors`` path (written atomically).
        metadata: JSON-able config (architecture, cache keys, ...), stored under the
            ``kdcache`` metadata key.
    """
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(state, tmp, metadata={"kdcache": json.dumps(metadata, sort_keys=True)})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors creates 0600; checkpoints are for sharing
    os.replace(tmp, path)
    return os.path.getsize(path)


def read_safetensors_metadata(path: str) -> dict[str, Any]:
    """The ``kdcache`` metadata saved by :func:`save_safetensors` (empty if none)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    return dict(json.loads(meta["kdcache"])) if "kdcache" in meta else {}


def _file_bytes(path: str) -> int:
    return os.path.getsize(path) if os.path.exists(path) else 0
