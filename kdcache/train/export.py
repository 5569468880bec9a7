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


#: The key under which :func:`save_pretrained_student` records kdcache's metadata, in
#: ``config.json`` and in the metadata of each safetensors file.
METADATA_KEY = "kdcache"


def save_pretrained_student(
    model: Any, tokenizer: Any, directory: str, metadata: dict[str, Any]
) -> int:
    """Export a Hugging Face student so that transformers loads it directly.

    ``model.save_pretrained(directory)`` (safetensors) and
    ``tokenizer.save_pretrained(directory)``; then ``metadata`` (the cache keys the
    student was distilled from, the teachers' names, the resolved config, versions) is
    recorded twice: under ``"kdcache"`` in ``config.json`` (transformers keeps unknown
    config keys as attributes: ``AutoConfig.from_pretrained(directory).kdcache``) and as
    the ``"kdcache"`` JSON string in each safetensors file's metadata (beside the
    ``"format": "pt"`` transformers writes), read back by :func:`read_safetensors_metadata`.
    Afterwards ``AutoModelForCausalLM.from_pretrained(directory)`` and
    ``AutoTokenizer.from_pretrained(directory)`` load the student and its tokenizer.

    Args:
        model: A transformers ``PreTrainedModel`` (float32 weights on any device).
        tokenizer: A transformers tokenizer (``PreTrainedTokenizerBase``).
        directory: Output directory (created; existing model files are overwritten).
        metadata: JSON-able.

    Returns:
        Bytes of the weight files written (``*.safetensors``).

    Raises:
        ValueError: ``metadata`` is not JSON-serialisable.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    text = json.dumps(metadata, sort_keys=True)
    os.makedirs(directory, exist_ok=True)
    setattr(model.config, METADATA_KEY, json.loads(text))
    try:
        model.save_pretrained(directory, safe_serialization=True)
    finally:
        delattr(model.config, METADATA_KEY)
    tokenizer.save_pretrained(directory)
    total = 0
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".safetensors"):
            continue
        path = os.path.join(directory, name)
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta[METADATA_KEY] = text
        tmp = f"{path}.tmp-{os.getpid()}"
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
        total += os.path.getsize(path)
    return total
