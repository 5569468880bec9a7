"""Token datasets for causal language models: ragged sequences, corpora, tokenizers,
generation (sequence-level distillation) and perplexity.

A :class:`TokenDataset` holds token sequences **ragged** (one flat token array plus
offsets, never padded to a common length), each with a stable ``sample_id`` and an
optional prompt length. It is a :class:`kdcache.data.ShardedDataset`, so the teacher stage
(:func:`kdcache.build.build_cache`) caches per-token targets for it, and
:class:`kdcache.token_stream.TokenSoftTargetDataset` streams them to a student.

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
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kdcache.errors import ConfigError, DataError, DataFileNotFoundError, require

log = logging.getLogger(__name__)

#: Where the Debian package ``fortunes`` (and ``fortunes-min``) installs its text files.
FORTUNES_DIR = "/usr/share/games/fortunes"


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

    @property
    def token_level(self) -> bool:
        """True: the teacher stage caches one row per target position (see module doc)."""
        return True

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


# --------------------------------------------------------------------------------------
# Corpus and tokenizer
# --------------------------------------------------------------------------------------


def read_fortunes(directory: str = FORTUNES_DIR) -> list[tuple[int, str]]:
    """Read the records of the Debian ``fortunes`` text files, with stable ids.

    Files are the plain-text ones in ``directory`` (``*.dat`` indexes, ``*.u8`` links and
    subdirectories are skipped), read in name order as UTF-8 (invalid bytes replaced);
    records are separated by lines holding only ``%``; empty records are dropped.

    Args:
        directory: The fortunes directory.

    Returns:
        ``[(sample_id, text), ...]`` with ``sample_id = crc32(file name) * 2**20 + record
        index``: stable as long as a file keeps its name and record order (adding a file
        never renumbers another file's records).

    Raises:
        DataFileNotFoundError: no such directory, or no text file in it (names the fix).
    """
    if not os.path.isdir(directory):
        raise DataFileNotFoundError(
            f"{directory} does not exist: install the corpus with "
            "'sudo apt-get install fortunes' (Debian/Ubuntu) or pass its directory"
        )
    out: list[tuple[int, str]] = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name.endswith((".dat", ".u8")) or os.path.islink(path) or not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            records = f.read().split("\n%\n")
        base = zlib.crc32(name.encode()) * (1 << 20)
        for i, rec in enumerate(records):
            text = rec.strip("\n%").strip()
            if text:
                out.append((base + i, text))
    if not out:
        raise DataFileNotFoundError(
            f"{directory} holds no fortune text files; install 'fortunes' or pass another dir"
        )
    return out


def split_by_id(sample_ids: np.ndarray, validation_fraction: float) -> np.ndarray:
    """bool [N]: True for validation records, chosen by a hash of each id (stable, no RNG).

    Raises:
        ConfigError: the fraction is outside (0, 1).
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ConfigError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    ids = np.asarray(sample_ids, dtype=np.int64)
    # splitmix64-style mixing of the id, then a uniform draw in [0, 1).
    x = ids.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53) < validation_fraction


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    *,
    special_tokens: Sequence[str] = ("<|pad|>", "<|endoftext|>"),
    min_frequency: int = 2,
) -> Any:
    """Train a byte-level BPE tokenizer (GPT-2 style) with Hugging Face tokenizers.

    Deterministic for the same texts and settings. Special tokens get ids 0, 1, ... in the
    order given (by default pad = 0, end of text = 1).

    Args:
        texts: Training texts.
        vocab_size: Vocabulary size V (including the 256 byte tokens and specials).
        special_tokens: Tokens that are never split.
        min_frequency: Fewest occurrences for a merge.

    Returns:
        A ``tokenizers.Tokenizer``.

    Raises:
        MissingDependencyError: ``tokenizers`` is missing (extra ``hf``).

    Source: Sennrich et al., "Neural Machine Translation of Rare Words with Subword Units",
    ACL 2016; byte-level BPE as in GPT-2 (Radford et al. 2019).
    """
    tk = require("tokenizers", "hf")
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=int(vocab_size),
        min_frequency=int(min_frequency),
        special_tokens=list(special_tokens),
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return tok


def save_tokenizer(tokenizer: Any, directory: str, *, pad_token: str, eos_token: str) -> None:
    """Save a ``tokenizers.Tokenizer`` as a transformers fast tokenizer in ``directory``
    (``tokenizer.json`` and ``tokenizer_config.json``), so that
    :meth:`kdcache.Teacher.from_hf` loads it and hashes its files into the fingerprint.

    Raises:
        MissingDependencyError: transformers is missing (extra ``hf``).
    """
    transformers = require("transformers", "hf")
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=pad_token, eos_token=eos_token
    )
    fast.save_pretrained(directory)


def tokenizer_files_sha256(directory: str) -> str | None:
    """SHA-256 over a model directory's tokenizer files, exactly as
    :meth:`kdcache.Teacher.from_hf` puts it in a teacher's fingerprint
    (``config["tokenizer_sha256"]``); None when the directory has no tokenizer file.

    Record it as ``preprocessing["tokenizer_files_sha256"]`` of a :class:`TokenDataset`
    and the teacher stage refuses teachers with another tokenizer.
    """
    from kdcache.teachers import _TOKENIZER_FILES

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


# --------------------------------------------------------------------------------------
# Evaluation and generation
# --------------------------------------------------------------------------------------

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


@torch.inference_mode()
def evaluate_perplexity(
    logits_fn: LogitsFn,
    dataset: TokenDataset,
    *,
    batch_size: int = 32,
    vocab_size: int | None = None,
) -> dict[str, float]:
    """Perplexity of a causal LM on every target position of ``dataset``.

    Args:
        logits_fn: ``input_ids [B, T] int64 -> logits [B, T, V']`` (a student module, or
            ``Teacher.logits``), V' >= V; columns beyond ``vocab_size`` are dropped.
        dataset: Sequences; positions as :func:`target_positions`.
        batch_size: Sequences per forward pass.
        vocab_size: Real vocabulary size V (None: the logits' width).

    Returns:
        ``{"nll": mean negative log-likelihood in nats per token, "perplexity":
        exp(nll), "tokens": positions scored}``.
    """
    total, count = 0.0, 0
    assert dataset.prompt_lengths is not None
    for lo in range(0, len(dataset), batch_size):
        idx = range(lo, min(lo + batch_size, len(dataset)))
        seqs = [dataset.sequence(i) for i in idx]
        ids_BT = pad_batch(seqs, dataset.pad_token_id)
        logits = logits_fn(ids_BT).float()
        if vocab_size is not None:
            logits = logits[..., :vocab_size]
        logp = torch.log_softmax(logits, dim=-1)
        for b, i in enumerate(idx):
            pos = torch.from_numpy(target_positions(len(seqs[b]), int(dataset.prompt_lengths[i])))
            nxt = ids_BT[b, pos + 1]
            total -= float(logp[b, pos, nxt].sum())
            count += len(pos)
    nll = total / max(count, 1)
    return {"nll": nll, "perplexity": float(np.exp(nll)), "tokens": float(count)}


@torch.inference_mode()
def generate_continuations(
    logits_fns: Sequence[LogitsFn],
    prompts: TokenDataset,
    *,
    max_new_tokens: int,
    greedy: bool = True,
    temperature: float = 1.0,
    seed: int = 0,
    eos_token_id: int | None = None,
    batch_size: int = 32,
    vocab_size: int | None = None,
    description: dict[str, Any] | None = None,
    num_shards: int | None = None,
) -> TokenDataset:
    """Teachers write continuations of prompts: the data of sequence-level distillation.

    At each step the next token is drawn from the ensemble's mean probability (mean of
    ``softmax(logits / temperature)`` over the teachers) at each sequence's last position:
    its arg-max with ``greedy``, else a sample from a ``torch.Generator`` seeded with
    ``seed``. A sequence stops at ``eos_token_id`` (kept) or after ``max_new_tokens``.
    The prompts keep their ``sample_id``; ``prompt_lengths`` of the result are the prompts'
    lengths, so the teacher stage caches targets for the generated tokens only.

    Args:
        logits_fns: K teachers as ``input_ids [B, T] -> logits [B, T, V']``.
        prompts: Prompt sequences (each >= 1 token; their own prompt lengths are ignored).
        max_new_tokens: Most tokens appended, >= 1.
        greedy: Arg-max decoding (else ancestral sampling).
        temperature: Sampling temperature > 0 (ignored when greedy).
        seed: Seed of the sampling generator.
        eos_token_id: Stop token, or None.
        batch_size: Prompts decoded together.
        vocab_size: Real V; logit columns beyond it are never chosen.
        description: JSON-able facts about the teachers (e.g. their weight hashes) that go
            into the result's preprocessing, so a new teacher gives a new dataset key.
        num_shards: Shards of the result (default: the prompts').

    Returns:
        A :class:`TokenDataset` of prompt + continuation, sharded like the prompts.

    Raises:
        ConfigError: no teacher, max_new_tokens < 1, or temperature <= 0.

    Source: Kim and Rush, "Sequence-Level Knowledge Distillation", EMNLP 2016, sec. 3
    (train the student on the teacher's beam/greedy output).
    """
    if not logits_fns:
        raise ConfigError("generate_continuations needs at least one teacher")
    if int(max_new_tokens) < 1 or not temperature > 0:
        raise ConfigError("max_new_tokens must be >= 1 and temperature > 0")
    gen = torch.Generator().manual_seed(int(seed))
    out_seqs: list[np.ndarray] = []
    plens: list[int] = []
    for lo in range(0, len(prompts), batch_size):
        seqs = [list(prompts.sequence(i)) for i in range(lo, min(lo + batch_size, len(prompts)))]
        plens.extend(len(s) for s in seqs)
        done = [False] * len(seqs)
        for _ in range(int(max_new_tokens)):
            if all(done):
                break
            ids_BT = pad_batch([np.asarray(s) for s in seqs], prompts.pad_token_id)
            last = torch.tensor([len(s) - 1 for s in seqs])
            probs = None
            for fn in logits_fns:
                z = fn(ids_BT).float()[torch.arange(len(seqs)), last]
                if vocab_size is not None:
                    z = z[:, :vocab_size]
                p = torch.softmax(z / (1.0 if greedy else float(temperature)), dim=-1)
                probs = p if probs is None else probs + p
            assert probs is not None
            nxt = (
                probs.argmax(dim=-1)
                if greedy
                else torch.multinomial(probs / len(logits_fns), 1, generator=gen)[:, 0]
            )
            for b, tok in enumerate(nxt.tolist()):
                if not done[b]:
                    seqs[b].append(int(tok))
                    done[b] = eos_token_id is not None and int(tok) == int(eos_token_id)
        out_seqs.extend(np.asarray(s, np.int32) for s in seqs)
    if any(len(s) < 2 for s in out_seqs):
        raise DataError("a prompt plus its continuation is shorter than 2 tokens")
    return TokenDataset.from_sequences(
        prompts.sample_ids,
        out_seqs,
        prompt_lengths=np.asarray(plens, np.int64),
        num_shards=num_shards or prompts.num_shards,
        preprocessing={
            "source": prompts.preprocessing,
            "generation": {
                "max_new_tokens": int(max_new_tokens),
                "greedy": bool(greedy),
                "temperature": float(temperature),
                "seed": int(seed),
                "eos_token_id": eos_token_id,
                "teachers": description or {},
            },
        },
        pad_token_id=prompts.pad_token_id,
    )
