"""The student stage on DeepSpeed: loop, distributed setup, metrics, evaluation, export."""

from __future__ import annotations

from kdcache.train.distributed import (
    TOTAL_STEP_SCHEDULERS,
    cpu_ds_config,
    data_parallel_normalizer,
    init_distributed,
    load_ds_config,
    prepare_ds_config,
)
from kdcache.train.evaluate import evaluate_classifier, evaluate_perplexity
from kdcache.train.export import (
    read_safetensors_metadata,
    save_pretrained_student,
    save_safetensors,
)
from kdcache.train.loop import LossFn, TrainResult, train_student
from kdcache.train.metrics import MetricsLogger, read_metrics

__all__ = [
    "TOTAL_STEP_SCHEDULERS",
    "LossFn",
    "MetricsLogger",
    "TrainResult",
    "cpu_ds_config",
    "data_parallel_normalizer",
    "evaluate_classifier",
    "evaluate_perplexity",
    "init_distributed",
    "load_ds_config",
    "prepare_ds_config",
    "read_metrics",
    "read_safetensors_metadata",
    "save_pretrained_student",
    "save_safetensors",
    "train_student",
]
