"""kdcache: offline knowledge distillation at scale.

Teachers' soft targets are computed once (on Ray), stored under a content-addressed key
(Arrow IPC), and streamed to students (trained with DeepSpeed). ``import kdcache`` needs
neither Ray, DeepSpeed nor Zarr; each is imported where it is used.
"""

from __future__ import annotations

from kdcache import losses, targets
from kdcache._version import __version__
from kdcache.build.stage import BuildReport, build_cache
from kdcache.data.base import ArrayDataset, ShardedDataset
from kdcache.data.files import ArrowDataset, HFDiskDataset, ParquetDataset, open_dataset
from kdcache.data.text import TextDataset
from kdcache.data.tokens import TokenDataset
from kdcache.data.transforms import Transform
from kdcache.errors import KDCacheError
from kdcache.executors.config import ExecutorConfig
from kdcache.stores.catalog import open_cache
from kdcache.stores.entry import CacheEntry
from kdcache.stores.view import EnsembleView
from kdcache.stream.dataset import ShardedStream, SoftTargetDataset
from kdcache.targets.dense import EnsembleRule
from kdcache.teachers.spec import TeacherResources, TeacherSpec
from kdcache.teachers.teacher import Teacher, TeacherEnsemble

__all__ = [
    "ArrayDataset",
    "ArrowDataset",
    "BuildReport",
    "CacheEntry",
    "EnsembleRule",
    "EnsembleView",
    "ExecutorConfig",
    "HFDiskDataset",
    "KDCacheError",
    "ParquetDataset",
    "ShardedDataset",
    "ShardedStream",
    "SoftTargetDataset",
    "Teacher",
    "TeacherEnsemble",
    "TeacherResources",
    "TeacherSpec",
    "TextDataset",
    "TokenDataset",
    "Transform",
    "__version__",
    "build_cache",
    "losses",
    "open_cache",
    "open_dataset",
    "targets",
]
