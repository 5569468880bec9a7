"""Sequence-level distillation data: teachers write continuations of prompts (greedy or
sampled) as a new token dataset. Shape legend: B sequences, T tokens."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from kdcache.data.tokens import TokenDataset, pad_batch
from kdcache.errors import ConfigError, DataError

# --------------------------------------------------------------------------------------
# Evaluation and generation
# --------------------------------------------------------------------------------------


LogitsFn = Callable[[torch.Tensor], torch.Tensor]


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
