"""Token datasets for causal language models: ragged sequences, corpora, tokenizers,
generation (sequence-level distillation) and perplexity.

A :class:`TokenDataset` holds token sequences **ragged** (one flat token array plus
offsets, never padded to a common length), each with a stable ``sample_id`` and an
optional prompt length. It is a :class:`kdcache.data.ShardedDataset`, so the teacher stage
(:func:`kdcache.build.build_cache`) caches per-token targets for it, and
:class:`kdcache.SoftTargetDataset` streams them to a student.

Alignment (the one convention everything here follows): the target at position ``t`` of
a sequence is the teacher's distribution of token ``t + 1`` given tokens ``0..t``, i.e.
the teacher's logits at position ``t``. A sequence of L tokens with a prompt of P tokens
has targets at positions ``max(P - 1, 0) .. L - 2`` (:func:`target_positions`), the
positions whose next token is not prompt. A student that is an exact copy of the teacher
therefore has zero distillation loss at every one of them.

Shape legend: B sequences in a batch, T tokens (padded batch length), V vocabulary,
E tokens in a shard (sum of lengths), N sequences.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kdcache.errors import (
    ConfigError,
)

log = logging.getLogger(__name__)


def target_positions(length: int, prompt_length: int = 0) -> np.ndarray:
    """Positions of a sequence that carry a next-token target.

    Args:
        length: L, tokens in the sequence (>= 2).
        prompt_length: P, leading prompt tokens (0 <= P < L); their own prediction is not
            trained, but the last prompt position predicts the first continuation token.

    Returns:
        int64 [L - max(P, 1)]: ``max(P - 1, 0) .. L - 2``. Position t's target is token t + 1.
    """
    return np.arange(max(int(prompt_length) - 1, 0), int(length) - 1, dtype=np.int64)


@dataclass
class TokenDataset:
    """Token sequences held ragged, cut into contiguous shards; a ``ShardedDataset``.

    Args:
        sample_ids: int64 [N], unique, stable ids of the sequences.
        tokens: int [E], all sequences' token ids back to back (stored as int32).
        offsets: int64 [N + 1]: sequence n is ``tokens[offsets[n]:offsets[n + 1]]``.
        prompt_lengths: int64 [N] prompt tokens per sequence (no targets on the prompt,
            see :func:`target_positions`), or None for plain text (all zero).
        num_shards: Number of shards (1..N).
        preprocessing: JSON-able description of how the tokens were made (corpus,
            tokenizer SHA-256, truncation, generation settings); part of the fingerprint.
        pad_token_id: Id used to pad batches (not part of the fingerprint: padding never
            changes a valid position's output under causal attention).

    Raises:
        ConfigError: shapes disagree, ids repeat, a sequence is shorter than 2 tokens or
            has no token after its prompt, or num_shards is out of range.
    """

    sample_ids: np.ndarray
    tokens: np.ndarray
    offsets: np.ndarray
    prompt_lengths: np.ndarray | None = None
    num_shards: int = 8
    preprocessing: dict[str, Any] = field(default_factory=dict)
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        self.sample_ids = np.asarray(self.sample_ids, dtype=np.int64)
        self.tokens = np.ascontiguousarray(self.tokens, dtype=np.int32)
        self.offsets = np.asarray(self.offsets, dtype=np.int64)
        n = len(self.sample_ids)
        if self.offsets.shape != (n + 1,) or int(self.offsets[0]) != 0:
            raise ConfigError(f"offsets must have shape [{n + 1}] and start at 0")
        if int(self.offsets[-1]) != len(self.tokens):
            raise ConfigError(
                f"offsets end at {int(self.offsets[-1])} but there are {len(self.tokens)} tokens"
            )
        lengths = np.diff(self.offsets)
        if n and int(lengths.min()) < 2:
            bad = int(self.sample_ids[int(np.argmin(lengths))])
            raise ConfigError(
                f"sequence sample_id {bad} has {int(lengths.min())} token(s); a causal-LM "
                "sample needs at least 2 (drop or merge shorter ones)"
            )
        if self.prompt_lengths is None:
            self.prompt_lengths = np.zeros(n, np.int64)
        self.prompt_lengths = np.asarray(self.prompt_lengths, dtype=np.int64)
        if self.prompt_lengths.shape != (n,) or bool(
            ((self.prompt_lengths < 0) | (self.prompt_lengths >= lengths)).any()
        ):
            raise ConfigError("prompt_lengths must be [N] with 0 <= prompt < sequence length")
        if len(np.unique(self.sample_ids)) != n:
            raise ConfigError("sample_ids must be unique")
        if not 1 <= self.num_shards <= max(n, 1):
            raise ConfigError(f"num_shards must be in 1..{n}, got {self.num_shards}")
        self._bounds = np.linspace(0, n, self.num_shards + 1).round().astype(np.int64)

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def from_sequences(
        cls,
        sample_ids: Sequence[int] | np.ndarray,
        sequences: Iterable[Sequence[int] | np.ndarray],
        *,
        prompt_lengths: Sequence[int] | np.ndarray | None = None,
        **kwargs: Any,
    ) -> TokenDataset:
        """Build from a list of token-id sequences (each int [L])."""
        seqs = [np.asarray(s, dtype=np.int32) for s in sequences]
        offsets = np.zeros(len(seqs) + 1, np.int64)
        np.cumsum([len(s) for s in seqs], out=offsets[1:])
        flat = np.concatenate(seqs) if seqs else np.zeros(0, np.int32)
        pl = None if prompt_lengths is None else np.asarray(prompt_lengths, np.int64)
        return cls(np.asarray(sample_ids), flat, offsets, pl, **kwargs)

    # -- the ShardedDataset interface --------------------------------------------------------
    def __len__(self) -> int:
        return len(self.sample_ids)

    #: Samples are sequences: the teacher stage caches one row per target position and
    #: the student stream collates padded token batches (see the module docstring).
    layout = "tokens"

    @property
    def lengths(self) -> np.ndarray:
        """int64 [N]: tokens per sequence."""
        return np.diff(self.offsets)

    @property
    def num_targets(self) -> int:
        """Target positions over the whole dataset (rows of a token-level cache entry)."""
        assert self.prompt_lengths is not None
        return int((self.lengths - np.maximum(self.prompt_lengths, 1)).sum())

    def shard_slice(self, index: int) -> slice:
        if not 0 <= index < self.num_shards:
            raise IndexError(f"shard {index} out of range 0..{self.num_shards - 1}")
        return slice(int(self._bounds[index]), int(self._bounds[index + 1]))

    def sequence(self, i: int) -> np.ndarray:
        """int32 [L]: the tokens of sequence number ``i`` (not its sample_id)."""
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def read_shard(self, index: int) -> dict[str, np.ndarray]:
        """``{"sample_id": int64 [n], "tokens": int32 [E_shard], "token_offsets": int64
        [n + 1] (starting at 0), "prompt_lengths": int64 [n]}`` for shard ``index``."""
        s = self.shard_slice(index)
        lo, hi = int(self.offsets[s.start]), int(self.offsets[s.stop])
        assert self.prompt_lengths is not None
        return {
            "sample_id": self.sample_ids[s],
            "tokens": self.tokens[lo:hi],
            "token_offsets": self.offsets[s.start : s.stop + 1] - lo,
            "prompt_lengths": self.prompt_lengths[s],
        }

    def fingerprint(self) -> dict[str, Any]:
        """Per shard: sequences and SHA-256 over ids, tokens, offsets and prompt lengths;
        plus the preprocessing (tokenizer hash, truncation, generation settings)."""
        if not hasattr(self, "_fingerprint"):
            shards = []
            for i in range(self.num_shards):
                sh = self.read_shard(i)
                h = hashlib.sha256()
                for a in (sh["sample_id"], sh["tokens"], sh["token_offsets"], sh["prompt_lengths"]):
                    a = np.ascontiguousarray(a)
                    h.update(f"{a.dtype.str}{a.shape}".encode())
                    h.update(a.data)
                shards.append({"num_records": len(sh["sample_id"]), "sha256": h.hexdigest()})
            self._fingerprint = {
                "num_records": len(self),
                "preprocessing": {"token_level": "next-token", **self.preprocessing},
                "shards": shards,
            }
        return self._fingerprint

    def subset(self, indices: np.ndarray, num_shards: int | None = None) -> TokenDataset:
        """A new dataset over the sequences at ``indices`` (ids kept), resharded."""
        assert self.prompt_lengths is not None
        idx = np.asarray(indices, dtype=np.int64)
        return TokenDataset.from_sequences(
            self.sample_ids[idx],
            [self.sequence(int(i)) for i in idx],
            prompt_lengths=self.prompt_lengths[idx],
            num_shards=min(num_shards or self.num_shards, max(len(idx), 1)),
            preprocessing=self.preprocessing,
            pad_token_id=self.pad_token_id,
        )


def pad_batch(sequences: Sequence[np.ndarray], pad_token_id: int) -> torch.Tensor:
    """Right-pad token sequences to the longest one.

    Args:
        sequences: B int arrays [L_b].
        pad_token_id: Fill value.

    Returns:
        int64 [B, max L_b]. Right padding keeps every valid position's causal context, so
        a causal LM's output at a valid position does not depend on the padding.
    """
    width = max((len(s) for s in sequences), default=0)
    out = torch.full((len(sequences), width), int(pad_token_id), dtype=torch.int64)
    for b, s in enumerate(sequences):
        out[b, : len(s)] = torch.from_numpy(np.asarray(s, dtype=np.int64))
    return out


def tokenizer_files_sha256(directory: str) -> str | None:
    """SHA-256 over a model directory's tokenizer files, exactly as
    :meth:`kdcache.Teacher.from_hf` puts it in a teacher's fingerprint
    (``config["tokenizer_sha256"]``); None when the directory has no tokenizer file.

    Record it as ``preprocessing["tokenizer_files_sha256"]`` of a :class:`TokenDataset`
    and the teacher stage refuses teachers with another tokenizer.
    """
    from kdcache.data.tokens import _TOKENIZER_FILES

    present = [f for f in _TOKENIZER_FILES if os.path.exists(os.path.join(directory, f))]
    if not present:
        return None
    h = hashlib.sha256()
    for f in present:
        with open(os.path.join(directory, f), "rb") as fh:
            h.update(f.encode() + b"\0" + fh.read())
    return h.hexdigest()


def encode_texts(
    tokenizer: Any,
    records: Sequence[tuple[int, str]],
    *,
    max_tokens: int,
    eos_token_id: int,
    num_shards: int,
    pad_token_id: int,
    preprocessing: dict[str, Any],
) -> TokenDataset:
    """Tokenize records into a :class:`TokenDataset`: each text, then end-of-text,
    truncated to ``max_tokens``; records shorter than 2 tokens are dropped.

    Args:
        tokenizer: A ``tokenizers.Tokenizer``.
        records: ``[(sample_id, text)]``.
        max_tokens: Longest sequence kept (tokens beyond are cut).
        eos_token_id: Appended to every text.
        num_shards: Shards of the result (at most the number of sequences).
        pad_token_id: Batch padding id.
        preprocessing: Goes into the fingerprint (add the tokenizer's SHA-256 there).
    """
    encs = tokenizer.encode_batch([t for _, t in records])
    ids, seqs = [], []
    for (sid, _), enc in zip(records, encs, strict=True):
        seq = [*enc.ids, int(eos_token_id)][: int(max_tokens)]
        if len(seq) >= 2:
            ids.append(sid)
            seqs.append(seq)
    return TokenDataset.from_sequences(
        np.asarray(ids, np.int64),
        seqs,
        num_shards=max(1, min(num_shards, len(seqs))),
        preprocessing={**preprocessing, "max_tokens": int(max_tokens)},
        pad_token_id=pad_token_id,
    )


_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
