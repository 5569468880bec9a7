"""Pure tensor math for soft targets: temperature, dense and sparse (top-k, top-p, sampled) targets,
ensemble rules and re-tempering. No I/O (see docs/architecture.md)."""

from __future__ import annotations

from kdcache.targets.dense import (
    ENSEMBLE_RULES,
    check_finite,
    check_vocabularies,
    combine_ensemble,
    log_probs,
    retemper,
    scale_logits,
    trim_vocab,
)
from kdcache.targets.sparse import (
    MAX_LOGITS_PER_PASS,
    PAD_ID,
    SparseTargets,
    combine_sparse_ensemble,
    concat_sparse,
    counts_only,
    retemper_sparse,
    sampled_targets,
    sparsify,
    topk_targets,
    topp_targets,
)

__all__ = [
    "ENSEMBLE_RULES",
    "MAX_LOGITS_PER_PASS",
    "PAD_ID",
    "SparseTargets",
    "check_finite",
    "check_vocabularies",
    "combine_ensemble",
    "combine_sparse_ensemble",
    "concat_sparse",
    "counts_only",
    "log_probs",
    "retemper",
    "retemper_sparse",
    "sampled_targets",
    "scale_logits",
    "sparsify",
    "topk_targets",
    "topp_targets",
    "trim_vocab",
]
