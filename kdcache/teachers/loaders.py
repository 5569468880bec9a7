"""Loading teachers' modules: weights (safetensors or weights-only torch files), their
SHA-256, Hugging Face causal LMs as logits functions and feature taps [B, D]."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from typing import Any

import torch

from kdcache.data.tokens import _TOKENIZER_FILES
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


def _tokenizer_facts(path: str) -> tuple[str | None, int | None, int | None]:
    """(SHA-256 over the tokenizer files, vocabulary size, pad id) of a model directory;
    Nones when the directory has no tokenizer."""
    present = [f for f in _TOKENIZER_FILES if os.path.exists(os.path.join(path, f))]
    if not present:
        return None, None, None
    h = hashlib.sha256()
    for f in present:
        with open(os.path.join(path, f), "rb") as fh:
            h.update(f.encode() + b"\0" + fh.read())
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return h.hexdigest(), len(tok), tok.pad_token_id


class HFLogits(torch.nn.Module):
    """Wraps a transformers model so that ``forward(input_ids) -> logits``.

    Args:
        model: A transformers model whose output has ``.logits``.
        pad_token_id: Padding id; the attention mask is ``input_ids != pad_token_id``
            (all ones when None).
        vocab_size: Keep only the first ``vocab_size`` logits (trims padded vocabularies).
    """

    def __init__(self, model: torch.nn.Module, pad_token_id: int | None, vocab_size: int | None):
        super().__init__()
        self.model = model
        self.pad_token_id = pad_token_id
        self.vocab_size = vocab_size

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        input_ids = input_ids.long()
        mask = (
            torch.ones_like(input_ids)
            if self.pad_token_id is None
            else (input_ids != self.pad_token_id).long()
        )
        logits = self.model(input_ids=input_ids, attention_mask=mask).logits
        if self.vocab_size is not None:
            if self.vocab_size > logits.shape[-1]:
                raise ConfigError(
                    f"vocab_size {self.vocab_size} exceeds the model's logit dimension "
                    f"{logits.shape[-1]}; the tokenizer does not belong to this model"
                )
            logits = logits[..., : self.vocab_size]
        return logits


class _CallableModule(torch.nn.Module):
    """A weightless module around a plain function (see :meth:`Teacher.from_callable`)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class FeatureTap(torch.nn.Module):
    """Runs a model and returns the output of one of its submodules, flattened to [B, D].

    The hook is registered for each call and removed after it, so the module pickles
    (it travels to Ray actors) and the wrapped model is left untouched.

    Args:
        model: The teacher's module.
        module_path: Dotted name of the submodule (as in ``model.named_modules()``).

    Raises:
        ConfigError: ``module_path`` names no submodule.
    """

    def __init__(self, model: torch.nn.Module, module_path: str) -> None:
        super().__init__()
        names = dict(model.named_modules())
        if module_path not in names or module_path == "":
            raise ConfigError(
                f"no submodule {module_path!r}; choose one of: " + ", ".join(n for n in names if n)
            )
        self.model = model
        self.module_path = module_path
        self._captured: torch.Tensor | None = None

    def _capture(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        self._captured = output[0] if isinstance(output, tuple) else output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sub = self.model.get_submodule(self.module_path)
        handle = sub.register_forward_hook(self._capture)
        try:
            self.model(x)
        finally:
            handle.remove()
        out, self._captured = self._captured, None
        if not isinstance(out, torch.Tensor):
            raise TeacherOutputError(f"submodule {self.module_path!r} did not output a tensor")
        return out.reshape(out.shape[0], -1)
