"""Evaluating a student: classifier accuracy and cross-entropy, causal-LM perplexity.

Shape legend: B batch, T tokens.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kdcache.data.tokens import TokenDataset, pad_batch, target_positions
from kdcache.errors import ConfigError
from kdcache.teachers.generate import LogitsFn


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


# -- the `kdcache train` job ---------------------------------------------------------------


def evaluate_classifier(
    module: torch.nn.Module,
    dataset: Any,
    *,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 1000,
) -> dict[str, float]:
    """Accuracy and mean cross-entropy (tau = 1) of a classifier on a labelled dataset.

    Rank ``r`` of ``W`` evaluates shards ``r, r + W, ...``; the sums are all-reduced, so
    every rank gets the metrics of the whole set. Rows labelled -100 are skipped.

    Args:
        module: Maps inputs [B, ...] to logits [B, V].
        dataset: A :class:`kdcache.data.ShardedDataset` with ``labels``.
        rank, world_size: Which shards this process evaluates.
        batch_size: Rows per forward pass.

    Returns:
        ``{"accuracy": in [0, 1], "cross_entropy": nats, "num_samples": n}``.

    Raises:
        ConfigError: the dataset has no labels.
    """
    totals = torch.zeros(3, dtype=torch.float64)  # correct, nll sum, count
    with torch.no_grad():
        for shard in range(rank, dataset.num_shards, world_size):
            cols = dataset.read_shard(shard)
            if "labels" not in cols:
                raise ConfigError("the eval dataset has no labels; give one with labels")
            # a copy: file-backed datasets give read-only views of their Arrow buffers
            inputs, labels = cols["inputs"], np.array(cols["labels"], dtype=np.int64)
            for lo in range(0, len(labels), batch_size):
                y = torch.from_numpy(labels[lo : lo + batch_size])
                keep = y != -100
                if not bool(keep.any()):
                    continue
                logits = module(torch.from_numpy(np.array(inputs[lo : lo + batch_size]))).float()
                logits, y = logits[keep], y[keep]
                totals[0] += float((logits.argmax(1) == y).sum())
                totals[1] += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
                totals[2] += float(y.numel())
    if world_size > 1:
        torch.distributed.all_reduce(totals)
    n = max(float(totals[2]), 1.0)
    return {
        "accuracy": float(totals[0]) / n,
        "cross_entropy": float(totals[1]) / n,
        "num_samples": float(totals[2]),
    }
