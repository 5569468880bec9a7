"""The main job: an ensemble of teachers distilled into a small student through the cache.

Run it as ``kdcache demo fashion-mnist`` or ``python -m pipelines.fashion_mnist``.

1. Read Fashion-MNIST from its IDX files and cut the training set into shards.
2. Train (or reuse) three teachers and save them as safetensors with their config.
3. Teacher stage on Ray: cache each teacher's scaled logits (Arrow IPC) under a
   content-addressed key; a rerun is a cache hit.
4. Student stage on DeepSpeed: the same tiny student trained twice with the same number
   of steps, on hard labels alone and from the cached ensemble soft targets.
5. Report: accuracy, parameters, checkpoint bytes and throughput of every model, and the
   cache key, hit, shards and bytes, on the terminal and as JSON.

The setting (README, "The main job"): the student sees only ``--student-labels`` labelled
images, while the teachers' soft targets cover all 60,000 training images; this is the
transfer-set setting of Hinton et al. (2015, sec. 3), where distillation matters most.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

import kdcache
from kdcache import losses
from kdcache.data.base import ArrayDataset
from kdcache.errors import DataError, KDCacheError
from kdcache.stream.dataset import ShardedStream
from kdcache.teachers.spec import TeacherSpec
from kdcache.train.distributed import cpu_ds_config
from kdcache.train.export import save_safetensors
from kdcache.train.loop import train_student
from kdcache.train.report import throughputs
from pipelines.common import add_executor_args, executor_from_args
from pipelines.corpora import read_idx
from pipelines.models import build_model

log = logging.getLogger("kdcache.demo")

DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
#: sample_id of test image i is TEST_ID_OFFSET + i, so ids never collide across splits.
TEST_ID_OFFSET = 1_000_000

TEACHERS: list[dict[str, Any]] = [
    {"name": "convnet-a", "arch": "convnet", "kwargs": {"width": 32, "hidden": 128}, "seed": 1},
    {"name": "convnet-b", "arch": "convnet", "kwargs": {"width": 24, "hidden": 128}, "seed": 2},
    {"name": "mlp", "arch": "mlp", "kwargs": {"hidden": [512, 256]}, "seed": 3},
]
STUDENT: dict[str, Any] = {"arch": "mlp", "kwargs": {"hidden": [16]}}


def _find(data_dir: str, stem: str) -> str:
    for name in (stem, stem + ".gz"):
        path = os.path.join(data_dir, name)
        if os.path.exists(path):
            return path
    raise kdcache.errors.DataFileNotFoundError(
        f"{os.path.join(data_dir, stem)}[.gz] not found. Install the data with "
        "'sudo apt-get install dataset-fashion-mnist' (Debian/Ubuntu), or pass "
        "--data-dir DIR pointing at the four Fashion-MNIST IDX files."
    )


def load_fashion_mnist(data_dir: str) -> dict[str, np.ndarray]:
    """Images (uint8 [N, 28, 28]) and labels (int64 [N]) of both splits, checked.

    Raises:
        DataFileNotFoundError: a file is missing (names it and the fix).
        DataError: a file is malformed or the splits are inconsistent (names the file).
    """
    out = {}
    for key, stem in FILES.items():
        path = _find(data_dir, stem)
        try:
            arr = read_idx(path)
        except DataError as exc:
            raise DataError(
                f"{exc}. Reinstall it with 'sudo apt-get install --reinstall "
                "dataset-fashion-mnist' or pass --data-dir."
            ) from exc
        want = 3 if key.endswith("images") else 1
        if arr.ndim != want or (want == 3 and arr.shape[1:] != (28, 28)):
            raise DataError(
                f"{path}: expected {'[N, 28, 28] images' if want == 3 else '[N] labels'},"
                f" found shape {arr.shape}"
            )
        out[key] = arr if want == 3 else arr.astype(np.int64)
    for split in ("train", "test"):
        if len(out[f"{split}_images"]) != len(out[f"{split}_labels"]):
            raise DataError(
                f"{split}: {len(out[f'{split}_images'])} images but "
                f"{len(out[f'{split}_labels'])} labels in {data_dir}"
            )
    return out


PREPROCESSING = {"source": "fashion-mnist", "split": "train", "inputs": "uint8 [28, 28]"}


def _subset(
    data: dict[str, np.ndarray], subset: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x_train, y_train = data["train_images"], data["train_labels"]
    x_test, y_test = data["test_images"], data["test_labels"]
    if subset:
        num_test = max(subset // 6, 100)
        x_train, y_train = x_train[:subset], y_train[:subset]
        x_test, y_test = x_test[:num_test], y_test[:num_test]
    return x_train, y_train, x_test, y_test


def train_dataset(
    data_dir: str = DEFAULT_DATA_DIR, num_shards: int = 8, subset: int | None = None
) -> ArrayDataset:
    """The Fashion-MNIST training set as a sharded dataset (``sample_id`` = IDX index).

    This is the dataset factory that ``kdcache build`` configs name
    (``pipelines.fashion_mnist:train_dataset``); the demo builds the same records.
    """
    x_train, y_train, _, _ = _subset(load_fashion_mnist(data_dir), subset)
    return ArrayDataset(
        np.arange(len(x_train)),
        x_train,
        y_train,
        num_shards=num_shards,
        preprocessing=PREPROCESSING,
    )


def _student_labels(
    y_train: np.ndarray, student_labels: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The labelled images the students may use, and the labels with the rest masked (-100)."""
    n = len(y_train)
    labelled = _labelled_ids(student_labels, n, seed)
    masked = np.full(n, losses.IGNORE_INDEX, dtype=np.int64)
    masked[labelled] = y_train[labelled]
    return labelled, masked


def student_dataset(
    data_dir: str = DEFAULT_DATA_DIR,
    num_shards: int = 8,
    subset: int | None = None,
    student_labels: int = 1000,
    seed: int = 0,
) -> ArrayDataset:
    """The training set as the distilled student sees it: every image, but only
    ``student_labels`` of them labelled (the rest -100). Same records, so the same
    fingerprint and cache, as :func:`train_dataset`; ``kdcache train`` configs name it."""
    x_train, y_train, _, _ = _subset(load_fashion_mnist(data_dir), subset)
    _, masked = _student_labels(y_train, student_labels, seed)
    return ArrayDataset(
        np.arange(len(x_train)), x_train, masked, num_shards=num_shards, preprocessing=PREPROCESSING
    )


def heldout_dataset(
    data_dir: str = DEFAULT_DATA_DIR, subset: int | None = None, num_shards: int = 1
) -> ArrayDataset:
    """The Fashion-MNIST test set (``sample_id`` = TEST_ID_OFFSET + index), held out."""
    _, _, x_test, y_test = _subset(load_fashion_mnist(data_dir), subset)
    return ArrayDataset(
        TEST_ID_OFFSET + np.arange(len(x_test)),
        x_test,
        y_test,
        num_shards=num_shards,
        preprocessing={**PREPROCESSING, "split": "test"},
    )


#: Columns of the demo's Parquet splits.
ID_COLUMN, IMAGE_COLUMN, LABEL_COLUMN = "sample_id", "image", "label"
#: Modification time of the demo's Parquet splits (2026-01-01T00:00:00Z, in ns): fixed,
#: so that a fresh clone plans the same fingerprint (see :func:`write_parquet_split`).
DATA_MTIME_NS = 1_767_225_600 * 1_000_000_000
#: Key of the Parquet key-value metadata that records what a split file was written from.
SOURCE_KEY = b"kdcache.demo.source"


def write_parquet_split(
    path: str, sample_ids: np.ndarray, images: np.ndarray, labels: np.ndarray, num_shards: int
) -> str:
    """Write one split as Parquet (once): ``sample_id`` int64, ``image`` 784 raw bytes
    (``fixed_size_binary(784)``, row-major 28 x 28 uint8), ``label`` int64; one row group
    per shard (``ceil(N / num_shards)`` rows), uncompressed (the pixels barely compress).

    A file already there is reused, unread, when its metadata records the same source
    (SHA-256 of ids, pixels and labels) and row-group size: then its bytes, size and
    modification time are unchanged, and so is the cache key of everything built over
    it. Otherwise it is rewritten atomically. Its modification time is set to
    :data:`DATA_MTIME_NS`, as reproducible builds set ``SOURCE_DATE_EPOCH``: the file is a
    pure function of the IDX files, so every machine that writes it gets the same plan
    fingerprint and the same cache keys (the README's key), while a file edited later
    gets a new time, and an edit that restores the time is caught by the shard digests.

    Returns:
        ``path``.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(sample_ids)
    rows_per_group = -(-n // num_shards)
    source = json.dumps(
        {"sha256": _content_hash(sample_ids, images, labels), "rows_per_group": rows_per_group},
        sort_keys=True,
    ).encode()
    if os.path.exists(path):
        try:
            meta = pq.read_metadata(path).metadata or {}
        except (OSError, pa.ArrowInvalid):
            meta = {}
        if meta.get(SOURCE_KEY) == source:
            if os.stat(path).st_mtime_ns != DATA_MTIME_NS:
                os.utime(path, ns=(DATA_MTIME_NS, DATA_MTIME_NS))
            return path
    flat = np.ascontiguousarray(images, dtype=np.uint8).reshape(n, -1)
    width = flat.shape[1]
    table = pa.table(
        {
            ID_COLUMN: pa.array(np.asarray(sample_ids, dtype=np.int64)),
            IMAGE_COLUMN: pa.FixedSizeBinaryArray.from_buffers(
                pa.binary(width), n, [None, pa.py_buffer(flat.tobytes())]
            ),
            LABEL_COLUMN: pa.array(np.asarray(labels, dtype=np.int64)),
        }
    ).replace_schema_metadata({SOURCE_KEY: source})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    pq.write_table(table, tmp, row_group_size=rows_per_group, compression="none")
    os.utime(tmp, ns=(DATA_MTIME_NS, DATA_MTIME_NS))
    os.replace(tmp, path)
    log.info("data: wrote %s (%d rows, %d row groups)", path, n, -(-n // rows_per_group))
    return path


def keep_labels(
    labels_B: np.ndarray,
    sample_ids_B: np.ndarray,
    *,
    num_labels: int,
    num_records: int,
    seed: int,
) -> np.ndarray:
    """Label transform of the student's view of the training set: keep the labels of
    ``num_labels`` of the ``num_records`` images (chosen by ``seed``, the same images as
    the demo's in-process students), -100 for the rest.

    Args:
        labels_B: int64 [B] labels as stored.
        sample_ids_B: int64 [B] ids (image indices 0..num_records-1).

    Returns:
        int64 [B] labels, -100 where unlabelled.
    """
    labelled = _labelled_ids(num_labels, num_records, seed)
    out = np.asarray(labels_B, dtype=np.int64).copy()
    out[~np.isin(sample_ids_B, labelled)] = losses.IGNORE_INDEX
    return out


def _labelled_ids(num_labels: int, num_records: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num_records, size=num_labels, replace=False))


def split_path(s: Settings, split: str) -> str:
    """WORK_DIR/data/<split>.parquet (``-subset<N>`` when ``--subset`` is given)."""
    suffix = f"-subset{s.subset}" if s.subset else ""
    return os.path.join(s.work_dir, "data", f"{split}{suffix}.parquet")


def student_label_transform(s: Settings, num_records: int) -> dict[str, Any]:
    """The label transform (:func:`keep_labels`) of the distilled student's dataset."""
    return {
        "fn": "pipelines.fashion_mnist:keep_labels",
        "kwargs": {"num_labels": s.student_labels, "num_records": num_records, "seed": s.seed},
    }


def parquet_dataset(
    path: str, num_shards: int, label_transform: dict[str, Any] | None = None
) -> Any:
    """The file-backed dataset over one split written by :func:`write_parquet_split`."""
    from kdcache.data.files import ParquetDataset
    from kdcache.data.transforms import Transform

    n = pq_num_rows(path)
    return ParquetDataset(
        path,
        id_column=ID_COLUMN,
        input_columns=IMAGE_COLUMN,
        input_shape=(28, 28),
        label_column=LABEL_COLUMN,
        rows_per_shard=-(-n // num_shards),
        label_transform=None if label_transform is None else Transform(**label_transform),
    )


def pq_num_rows(path: str) -> int:
    import pyarrow.parquet as pq

    return int(pq.read_metadata(path).num_rows)


def _content_hash(*arrays: np.ndarray | None) -> str:
    h = hashlib.sha256()
    for a in arrays:
        if a is not None:
            h.update(np.ascontiguousarray(a).data)
    return h.hexdigest()[:16]


def _config_hash(cfg: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:10]


@torch.inference_mode()
def predict_logits(model: torch.nn.Module, images: np.ndarray, batch: int = 1000) -> torch.Tensor:
    model.eval()
    return torch.cat(
        [
            model(torch.from_numpy(images[i : i + batch])).float()
            for i in range(0, len(images), batch)
        ]
    )


def accuracy(logits: torch.Tensor, labels: np.ndarray) -> float:
    return float((logits.argmax(1).numpy() == labels).mean())


@dataclass
class Settings:
    data_dir: str
    work_dir: str
    cache_root: str
    report: str
    executor: kdcache.ExecutorConfig
    num_shards: int
    temperature: float
    alpha: float
    student_temperature: float
    lr_schedule: str
    teacher_epochs: int
    student_epochs: int
    student_labels: int
    batch_size: int
    lr: float
    subset: int | None
    seed: int
    progress: bool
    sweep: bool = False


def parse_args(argv: list[str] | None = None) -> Settings:
    p = argparse.ArgumentParser(
        prog="kdcache demo fashion-mnist",
        description="Distil an ensemble of Fashion-MNIST teachers into a tiny student "
        "through the kdcache cache (Ray teacher stage, DeepSpeed student stage).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="directory of the IDX files")
    p.add_argument(
        "--work-dir", default="runs/fashion-mnist", help="teachers, students and the report go here"
    )
    p.add_argument(
        "--cache-root",
        default=None,
        help="cache root (default WORK_DIR/cache); a local path, file:// or s3:// URI",
    )
    p.add_argument("--report", default=None, help="JSON report path (default WORK_DIR/report.json)")
    add_executor_args(p)
    p.add_argument("--num-shards", type=int, default=8, help="input shards of the training set")
    p.add_argument("--temperature", type=float, default=4.0, help="softmax temperature tau")
    p.add_argument("--alpha", type=float, default=1.0, help="weight of the distillation term")
    p.add_argument(
        "--student-temperature",
        type=float,
        default=1.0,
        help="tau of the distilled student's loss; a value other than --temperature (the "
        "cache's) re-tempers the cached targets exactly, with no teacher recomputed",
    )
    p.add_argument(
        "--lr-schedule",
        choices=LR_SCHEDULES,
        default="warmup_cosine",
        help="both students' learning rate: constant, or warmup_cosine (DeepSpeed's "
        "WarmupCosineLR: linear warm-up over 10%% of the steps, then a cosine decay)",
    )
    p.add_argument(
        "--teacher-epochs", type=int, default=5, help="passes of each teacher's training"
    )
    p.add_argument(
        "--student-epochs",
        type=int,
        default=8,
        help="student steps = this many passes over the training set",
    )
    p.add_argument(
        "--student-labels",
        type=int,
        default=None,
        help="labelled training images the students may use (0 < n <= N); default 1,000, "
        "or a sixth of --subset when that is smaller",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=128,
        help="rows per step for teachers and students (the students' is at most "
        "--student-labels, the labelled set the hard-label student sees)",
    )
    p.add_argument("--lr", type=float, default=1e-2, help="student (peak) learning rate")
    p.add_argument(
        "--subset",
        type=int,
        default=None,
        help="use only the first N training and N/6 test images (for quick runs)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="initial weights, labelled subset and sample order"
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument(
        "--sweep",
        action="store_true",
        help="then sweep 4 short students (alpha x temperature) from the same cache as Ray "
        "Tune trials; the table and plot go to REPORT_DIR/sweep/",
    )
    a = p.parse_args(argv)
    # Refuse nonsense before minutes of training, naming the option.
    checks = [
        (0.0 <= a.alpha <= 1.0, "--alpha must be in [0, 1]", a.alpha),
        (a.teacher_epochs >= 1, "--teacher-epochs must be >= 1", a.teacher_epochs),
        (a.student_epochs >= 1, "--student-epochs must be >= 1", a.student_epochs),
        (a.lr > 0, "--lr must be > 0", a.lr),
        (a.batch_size >= 1, "--batch-size must be >= 1", a.batch_size),
        (a.num_shards >= 1, "--num-shards must be >= 1", a.num_shards),
        (a.subset is None or a.subset >= 100, "--subset must be >= 100 images", a.subset),
        (
            a.temperature > 0 and np.isfinite(a.temperature),
            "--temperature must be > 0",
            a.temperature,
        ),
        (
            a.student_temperature > 0 and np.isfinite(a.student_temperature),
            "--student-temperature must be > 0",
            a.student_temperature,
        ),
    ]
    for ok, message, value in checks:
        if not ok:
            p.error(f"{message}, got {value}")
    work = a.work_dir
    return Settings(
        data_dir=a.data_dir,
        work_dir=work,
        cache_root=a.cache_root or os.path.join(work, "cache"),
        report=a.report or os.path.join(work, "report.json"),
        executor=executor_from_args(p, a),
        num_shards=a.num_shards,
        temperature=a.temperature,
        alpha=a.alpha,
        student_temperature=a.student_temperature,
        lr_schedule=a.lr_schedule,
        teacher_epochs=a.teacher_epochs,
        student_epochs=a.student_epochs,
        student_labels=(
            a.student_labels
            if a.student_labels is not None
            else min(1000, max(1, (a.subset or 60000) // 6))
        ),
        batch_size=a.batch_size,
        lr=a.lr,
        subset=a.subset,
        seed=a.seed,
        progress=not a.no_progress,
        sweep=a.sweep,
    )


def train_or_load_teacher(
    spec: dict[str, Any], train: ArrayDataset, s: Settings
) -> tuple[kdcache.Teacher, str]:
    """Reuse ``WORK_DIR/teachers/<name>-<config hash>.safetensors`` or train and save it."""
    cfg = {
        "arch": spec["arch"],
        "kwargs": spec["kwargs"],
        "seed": spec["seed"],
        "epochs": s.teacher_epochs,
        # the data and labels themselves (not how they are sharded) and the batch size
        "train": _content_hash(train.inputs, train.labels),
        "batch_size": s.batch_size,
    }
    path = os.path.join(s.work_dir, "teachers", f"{spec['name']}-{_config_hash(cfg)}.safetensors")

    config = {"arch": spec["arch"], **spec["kwargs"]}
    if os.path.exists(path):
        log.info("teacher %s: reusing %s", spec["name"], path)
    else:
        torch.manual_seed(spec["seed"])
        model = build_model(**config)
        stream = ShardedStream(train, batch_size=s.batch_size, seed=spec["seed"])
        steps = s.teacher_epochs * len(stream)

        def ce(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            return losses.cross_entropy(logits, batch["labels"])

        model, _ = train_student(
            model,
            stream,
            ce,
            ds_config=cpu_ds_config(lr=1e-3, micro_batch_size=s.batch_size),
            max_steps=steps,
            progress=s.progress,
            desc=f"teacher {spec['name']}",
        )
        save_safetensors(model, path, {"name": spec["name"], **cfg})
    teacher = kdcache.Teacher.from_checkpoint(build_model, path, name=spec["name"], config=config)
    return teacher, path


def run(s: Settings) -> dict[str, Any]:
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    data = load_fashion_mnist(s.data_dir)
    x_train, y_train, x_test, y_test = _subset(data, s.subset)
    n = len(x_train)
    if not 0 < s.student_labels <= n:
        raise kdcache.errors.ConfigError(
            f"--student-labels must be in 1..{n}, got {s.student_labels}"
        )
    if not 1 <= s.num_shards <= n:
        raise kdcache.errors.ConfigError(f"--num-shards must be in 1..{n}, got {s.num_shards}")
    # The teachers train from the IDX arrays in memory; both kdcache stages read the
    # splits from Parquet, through the file-backed dataset, where they are used.
    train = ArrayDataset(
        np.arange(n), x_train, y_train, num_shards=s.num_shards, preprocessing=PREPROCESSING
    )
    train_path = write_parquet_split(
        split_path(s, "train"), np.arange(n), x_train, y_train, s.num_shards
    )
    write_parquet_split(
        split_path(s, "test"), TEST_ID_OFFSET + np.arange(len(x_test)), x_test, y_test, 1
    )
    train_files = parquet_dataset(train_path, s.num_shards)
    log.info(
        "data: %d training images in %d shards (%s), %d test images",
        n,
        train_files.num_shards,
        train_path,
        len(x_test),
    )

    # -- teachers ----------------------------------------------------------------------
    t = time.perf_counter()
    teachers, paths = zip(
        *(train_or_load_teacher(spec, train, s) for spec in TEACHERS), strict=True
    )
    ensemble = kdcache.TeacherEnsemble(list(teachers), rule="mean_probs")
    timings["teachers_s"] = time.perf_counter() - t

    # -- teacher stage on Ray ------------------------------------------------------------
    # The teachers go to the actors as specs (a factory and a weights file): each actor
    # loads them where it runs; the driver only hashes the files. Same key as build.yaml.
    specs = [
        TeacherSpec.checkpoint(t.name, "pipelines.models:build_model", p, kwargs=t.config)
        for t, p in zip(teachers, paths, strict=True)
    ]
    t = time.perf_counter()
    cache = kdcache.build_cache(
        train_files,
        kdcache.TeacherEnsemble(specs, rule="mean_probs"),
        temperature=s.temperature,
        root=s.cache_root,
        executor=s.executor,
        progress=s.progress,
    )
    report_b = cache.build_report  # type: ignore[union-attr]
    timings["teacher_stage_s"] = time.perf_counter() - t
    if not report_b.hit:  # a hit is logged by build_cache itself
        log.info(
            "teacher stage: %d teacher-shards computed (%d reused) in %.1fs; key %s",
            report_b.computed,
            report_b.reused,
            report_b.wall_s,
            cache.key,
        )

    build_yaml = write_build_config(s, list(zip(teachers, paths, strict=True)))

    # -- student stage on DeepSpeed ---------------------------------------------------------
    labelled, _ = _student_labels(y_train, s.student_labels, s.seed)
    kd_data = parquet_dataset(train_path, s.num_shards, student_label_transform(s, n))
    hard_data = train.subset(labelled, num_shards=1)
    batch = min(s.batch_size, s.student_labels)
    t = time.perf_counter()
    kd_stream = kdcache.SoftTargetDataset(
        cache,
        kd_data,
        batch_size=batch,
        seed=s.seed,
        temperature=s.student_temperature,
        retemper=s.student_temperature != s.temperature,  # exact, from the stored z / tau
        # the ensemble combined once at the student's temperature, stored as one entry
        # (a hit on a rerun): every epoch reads one file per shard, no arithmetic
        combined=True,
    )
    timings["combine_s"] = time.perf_counter() - t
    steps = max(1, s.student_epochs * len(kd_stream))
    hard_stream = ShardedStream(hard_data, batch_size=batch, seed=s.seed)
    ds = student_ds_config(s, batch, steps)

    def hard_loss(logits: torch.Tensor, b: dict[str, torch.Tensor]) -> torch.Tensor:
        return losses.cross_entropy(logits, b["labels"])

    def kd(logits: torch.Tensor, b: dict[str, torch.Tensor]) -> torch.Tensor:
        return losses.kd_loss(
            logits,
            b["teacher_log_probs"],
            temperature=s.student_temperature,
            alpha=s.alpha,
            labels_B=b["labels"],
        )

    def test_accuracy(module: torch.nn.Module) -> dict[str, float]:
        return {"test_accuracy": accuracy(predict_logits(module, x_test), y_test)}

    train_yaml = write_train_config(s, cache.key, batch, steps, max(1, steps // 25))

    students = {}
    curves: dict[str, list[tuple[int, float]]] = {}
    for role, stream, loss_fn in (
        ("student_hard", hard_stream, hard_loss),
        ("student_kd", kd_stream, kd),
    ):
        t = time.perf_counter()
        torch.manual_seed(s.seed)  # the same initial student for both
        model = build_model(STUDENT["arch"], **STUDENT["kwargs"])
        model, result = train_student(
            model,
            stream,
            loss_fn,
            ds_config=ds,
            max_steps=steps,
            eval_fn=test_accuracy,
            eval_every=max(1, steps // 25),
            progress=s.progress,
            desc=role,
        )
        curves[role] = [(step, m["test_accuracy"]) for step, m in result.evals]
        path = os.path.join(s.work_dir, "students", f"{role}.safetensors")
        save_safetensors(
            model,
            path,
            {
                **STUDENT,
                "role": role,
                "steps": result.steps,
                "cache_key": cache.key if role == "student_kd" else None,
                "temperature": s.student_temperature,
                "alpha": s.alpha,
                "student_labels": s.student_labels,
            },
        )
        students[role] = (model, path)
        timings[f"{role}_s"] = time.perf_counter() - t

    # -- report ------------------------------------------------------------------------------
    rows: list[tuple[str, str, Any, int, int]] = [
        (t.name, "teacher", t.module, t.num_parameters, os.path.getsize(p))
        for t, p in zip(teachers, paths, strict=True)
    ]
    rows.append(
        (
            "ensemble (" + ", ".join(t.name for t in teachers) + ")",
            "ensemble",
            None,
            ensemble.num_parameters,
            sum(os.path.getsize(p) for p in paths),
        )
    )
    for role, (model, path) in students.items():
        name = f"student ({'hard labels' if role == 'student_hard' else 'distilled'})"
        params = sum(p.numel() for p in model.parameters())
        rows.append((name, role, model, params, os.path.getsize(path)))

    def predictor(module: Any) -> Any:
        if module is None:
            return lambda x: ensemble.log_probs(x)
        return lambda x: predict_logits(module, x)

    speeds = throughputs([predictor(m) for _, _, m, _, _ in rows], x_test)
    models: list[dict[str, Any]] = [
        {
            "name": name,
            "role": role,
            "test_accuracy": accuracy(predictor(module)(x_test), y_test),
            "num_parameters": params,
            "checkpoint_bytes": ckpt,
            "samples_per_s": speed,
        }
        for (name, role, module, params, ckpt), speed in zip(rows, speeds, strict=True)
    ]
    # the teachers' and the ensemble's accuracy: the reference lines of the curves
    references = {
        m["name"]: m["test_accuracy"] for m in models if m["role"] in ("teacher", "ensemble")
    }
    plot = plot_curves(
        curves, os.path.join(s.work_dir, "student_curves.png"), s, rows[-1][3], references
    )
    timings["total_s"] = time.perf_counter() - t0
    report = {
        "job": "fashion-mnist",
        "models": models,
        "cache": {
            "key": cache.key,
            "hit": report_b.hit,
            "num_shards": cache.num_shards,
            "bytes": cache.num_bytes,
            "root": s.cache_root,
            "entries": report_b.keys,
        },
        "settings": {k: v for k, v in asdict(s).items() if k not in ("progress",)},
        "build_config": build_yaml,
        "train_config": train_yaml,
        "student_steps": steps,
        "student_batch_size": batch,
        "student_curves": {role: [list(p) for p in c] for role, c in curves.items()},
        "plot": plot,
        "timings_s": timings,
        "versions": {"kdcache": kdcache.__version__, "torch": torch.__version__},
    }
    if s.sweep:
        report["sweep"] = sweep_students(s, train_yaml, steps)
    os.makedirs(os.path.dirname(os.path.abspath(s.report)), exist_ok=True)
    with open(s.report, "w") as f:
        json.dump(report, f, indent=2)
    return report


def sweep_students(s: Settings, train_yaml: str, steps: int) -> dict[str, Any]:
    """``--sweep``: four short students (alpha x temperature) from the cache this run
    built, as Ray Tune trials of ``kdcache sweep`` over the run's train config (the dense
    cache re-tempers exactly). The table and plot go to REPORT_DIR/sweep/."""
    from kdcache.jobs.config import from_dict, read_file
    from kdcache.jobs.sweep import SweepConfig, format_table, run_sweep

    # the train config's schedule is "auto": kdcache train fits it to the shorter runs
    train = {**read_file(train_yaml), "max_steps": max(1, steps // 4), "eval_every": 0}
    out = os.path.join(os.path.dirname(os.path.abspath(s.report)), "sweep")
    cfg = from_dict(
        SweepConfig,
        {
            "train": train,
            "output_dir": out,
            "parameters": {
                "loss.alpha": [0.5, 0.9],
                "loss.temperature": (
                    sorted({s.student_temperature, s.temperature})
                    if s.student_temperature != s.temperature
                    else [s.temperature / 2, s.temperature]
                ),
            },
            "address": s.executor.address if s.executor.kind == "ray" else None,
        },
    )
    result = run_sweep(cfg)
    table = format_table(result.rows, result.columns)
    log.info("sweep of %d students:\n%s", len(result.rows), table)
    return {"table": result.csv_path, "plot": result.plot_path, "best": result.best}


def dataset_config(s: Settings, split: str) -> dict[str, Any]:
    """A config's ``dataset`` mapping for one Parquet split of this run (by path and
    columns, as :class:`kdcache.jobs.config.DatasetConfig` reads it)."""
    path = os.path.abspath(split_path(s, split))
    n = pq_num_rows(path)
    return {
        "path": path,
        "id_column": ID_COLUMN,
        "input_columns": IMAGE_COLUMN,
        "input_shape": [28, 28],
        "label_column": LABEL_COLUMN,
        "rows_per_shard": -(-n // (s.num_shards if split == "train" else 1)),
    }


def write_build_config(s: Settings, teachers: list[tuple[kdcache.Teacher, str]]) -> str:
    """Write WORK_DIR/build.yaml: the teacher stage of this run as a ``kdcache build``
    config, so it can be rerun or submitted to a cluster without the demo."""
    import yaml

    config = {
        "root": os.path.abspath(s.cache_root) if "://" not in s.cache_root else s.cache_root,
        "alias": "fashion-mnist-ensemble",
        "dataset": dataset_config(s, "train"),
        "teachers": [
            {
                "name": t.name,
                "factory": "pipelines.models:build_model",
                "kwargs": t.config,
                "checkpoint": os.path.abspath(p),
            }
            for t, p in teachers
        ],
        "ensemble": {"rule": "mean_probs"},
        "targets": {"temperature": s.temperature},
        "executor": {
            "kind": s.executor.kind,
            "address": s.executor.address,
            "num_actors": s.executor.num_actors,
        },
    }
    path = os.path.join(s.work_dir, "build.yaml")
    with open(path, "w") as f:
        f.write("# The teacher stage of `kdcache demo fashion-mnist`, as a build config.\n")
        f.write("# Rerun it with: kdcache build " + path + "\n")
        yaml.safe_dump(config, f, sort_keys=False)
    return path


#: ``--lr-schedule`` choices.
LR_SCHEDULES = ("constant", "warmup_cosine")


def student_ds_config(s: Settings, batch: int, steps: int | str) -> dict[str, Any]:
    """Both students' DeepSpeed config: AdamW at ``--lr`` (no weight decay), and with
    ``--lr-schedule warmup_cosine`` DeepSpeed's ``WarmupCosineLR``: linear warm-up from 0
    over the first 10% of the ``steps``, then a cosine decay to 1e-4 of the peak.
    ``steps="auto"`` (the train config's): ``kdcache train`` fills both from the run's
    steps (:func:`kdcache.train.distributed.prepare_ds_config`), the same numbers for the
    same steps, and the right ones for a run an override shortens."""
    config = cpu_ds_config(lr=s.lr, micro_batch_size=batch)
    if s.lr_schedule == "warmup_cosine":
        config["scheduler"] = {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": steps,
                "warmup_num_steps": steps if steps == "auto" else max(1, int(steps) // 10),
                "warmup_min_ratio": 0.0,
                "warmup_type": "linear",
                "cos_min_ratio": 1e-4,
            },
        }
    return config


def write_train_config(s: Settings, cache_key: str, batch: int, steps: int, eval_every: int) -> str:
    """Write WORK_DIR/train.yaml: the distilled student of this run as a ``kdcache train``
    config (same initial weights, sample order, loss, optimizer and steps), so
    ``kdcache train WORK_DIR/train.yaml`` reproduces it without the demo."""
    import yaml

    n = pq_num_rows(split_path(s, "train"))
    config = {
        "output_dir": os.path.abspath(os.path.join(s.work_dir, "train")),
        "student": {
            "factory": "pipelines.models:build_model",
            "kwargs": {"arch": STUDENT["arch"], **STUDENT["kwargs"]},
        },
        "cache": {
            "uri": cache_key,
            "root": os.path.abspath(s.cache_root) if "://" not in s.cache_root else s.cache_root,
        },
        "dataset": {
            **dataset_config(s, "train"),
            "label_transform": student_label_transform(s, n),
        },
        "eval_dataset": dataset_config(s, "test"),
        **(
            {"lr": s.lr}
            if s.lr_schedule == "constant"
            else {"deepspeed": student_ds_config(s, batch, "auto")}
        ),
        "loss": {"kind": "forward_kl", "temperature": s.student_temperature, "alpha": s.alpha},
        "stream": {"global_batch_size": batch},  # one rank: batch rows per step
        "max_steps": steps,
        "seed": s.seed,
        "eval_every": eval_every,
    }
    path = os.path.join(s.work_dir, "train.yaml")
    with open(path, "w") as f:
        f.write("# The distilled student of `kdcache demo fashion-mnist`, as a train config.\n")
        f.write("# Rerun it with: kdcache train " + path + "\n")
        yaml.safe_dump(config, f, sort_keys=False)
    return path


def plot_curves(
    curves: dict[str, list[tuple[int, float]]],
    path: str,
    s: Settings,
    num_parameters: int,
    references: dict[str, float] | None = None,
) -> str | None:
    """Test accuracy against step for both students, as a PNG; returns its path.

    ``references`` (``{name: test accuracy}``, the teachers' and the ensemble's rows of
    the report) are drawn as dashed horizontal lines: what the students are measured
    against.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plot (pip install 'kdcache[plot]')")
        return None
    labels = {"student_hard": "hard labels only", "student_kd": "distilled from the cache"}
    fig, ax = plt.subplots(figsize=(7.2, 4.4), dpi=120)
    for role, points in curves.items():
        steps, acc = zip(*points, strict=True)
        ax.plot(steps, acc, marker="o", markersize=3, label=labels.get(role, role))
    teacher_colours = ["tab:gray", "tab:purple", "tab:olive", "tab:brown"]
    for i, (name, value) in enumerate(sorted((references or {}).items(), key=lambda kv: kv[1])):
        ensemble = name.startswith("ensemble")
        ax.axhline(
            value,
            color="tab:red" if ensemble else teacher_colours[i % len(teacher_colours)],
            linestyle="--" if ensemble else ":",
            linewidth=1.4 if ensemble else 1.1,
            label=f"{'ensemble' if ensemble else 'teacher ' + name} ({value:.3f})",
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("test accuracy")
    ax.set_title(
        f"Fashion-MNIST student ({num_parameters:,} params), {s.student_labels:,} labels, "
        f"tau={s.student_temperature}",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def format_report(report: dict[str, Any]) -> str:
    rows = [("model", "role", "test acc", "params", "ckpt bytes", "samples/s")]
    for m in report["models"]:
        rows.append(
            (
                m["name"],
                m["role"],
                f"{m['test_accuracy']:.4f}",
                f"{m['num_parameters']:,}",
                f"{m['checkpoint_bytes']:,}",
                f"{m['samples_per_s']:,.0f}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    c = report["cache"]
    lines += [
        "",
        f"cache: key {c['key']}  hit={c['hit']}  shards={c['num_shards']}  "
        f"bytes={c['bytes']:,}  root={c['root']}",
        f"student steps: {report['student_steps']}   wall time: "
        + ", ".join(f"{k} {v:.1f}" for k, v in report["timings_s"].items()),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    settings = parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    try:
        report = run(settings)
    except KDCacheError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print()
    print(format_report(report))
    if report.get("plot"):
        print(f"training curves: {os.path.abspath(report['plot'])}")
    print(f"\nreport written to {os.path.abspath(settings.report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
