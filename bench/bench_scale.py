"""Out-of-core scaling of the data plane: memory and time per sample at 1x, 4x and 16x.

One run writes a synthetic image dataset to Parquet (uint8 28x28 images as a
``fixed_size_binary(784)`` column ``image``, int64 ``sample_id`` and ``label``,
uncompressed, row groups of 65,536 rows; 16 files of 196,608 rows = 157 MB each; the
1x dataset is the first file, 4x the first 4, 16x all 16 = 2.5 GB) under ``--workdir``,
one row group at a time (bounded memory), and deletes it at the end. For each size, through
``kdcache.data.files.ParquetDataset`` (``rows_per_shard`` = one row group per shard):

* ``stage``: ``build_cache`` of one cheap teacher (a linear layer 784->10; the uint8 to
  float conversion is inside the teacher module) on a ``RayExecutor`` with one actor of
  one CPU, dense float32, batch 4,096, into a fresh cache root. The driver is a
  subprocess (``--role driver``) that starts Ray on 127.0.0.1 and warms the executor with
  a tiny build, so Ray and actor start-up are not timed;
* ``student``: an epoch of ``SoftTargetDataset`` over that cache and the same dataset, a
  linear student, plain torch SGD and ``kdcache.losses.kd_loss``, batch 4,096, one torch
  thread, in its own subprocess (``--role student``).

Memory: the peak anonymous resident memory (``RssAnon`` of ``/proc/PID/status``,
sampled every 20 ms by this process; page-cache and memory-mapped file pages do not
count) of the driver, of the teacher actor (the process titled ``ray::TeacherActor``
under the driver) and of the student, during the first build and the first epoch.
Time: the best of ``--rounds`` builds / epochs, with that round's CPU seconds.

On the 16x data, in the same run (``--role compare``, a subprocess with
``OMP_NUM_THREADS=1`` and one torch thread, as the actor has; rounds interleaved):

* ``raw read``: ``pyarrow.parquet.ParquetFile(f).iter_batches`` of the same three
  columns, batch 4,096, as numpy views (no digest);
* ``dataset read``: every shard's ``open_shard`` batches (decode plus content digest);
* ``plain``: the raw read plus the same teacher (``Teacher.logits``, ``scale_logits``,
  outputs concatenated per file), no cache writes;
* ``local stage``: ``build_cache(executor="local")``: the stage without Ray.

Ratios (time: lower is better; speed: higher is better): ``driver_rss_16x_over_1x``,
``actor_rss_16x_over_1x``, ``student_rss_16x_over_1x`` (goal <= 1.2 each),
``stage_time_per_sample_16x_over_1x``, ``student_time_per_sample_16x_over_1x`` (goal
<= 1.15 each), ``input_read_speed_over_raw`` (raw read time / dataset read time, goal
>= 0.7), ``stage_time_over_plain`` (Ray stage / plain loop, goal <= 1.05). The figures
hold the raw numbers, 16x-over-4x and CPU-per-sample ratios, and the load average.

    python bench/bench_scale.py --quick --json bench_scale.json   # 2 rounds, ~2-3 min
    python bench/bench_scale.py --json bench_scale.json           # 5 rounds, ~4 min
    python bench/bench_scale.py --quick --profile                 # + cProfile tables

The ``--role`` modes are the subprocesses this script starts, not for use by hand.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch

ROWS_PER_GROUP = 65_536
GROUPS_PER_FILE = 3  # one file = the 1x dataset: 196,608 rows, 157 MB
NUM_FILES = 16
SIZES = (1, 4, 16)
PIXELS = 784
NUM_CLASSES = 10
BATCH = 4096
TEMPERATURE, ALPHA = 4.0, 0.9
COLUMNS = ["sample_id", "image", "label"]
MIB = 1 << 20


# -- models ------------------------------------------------------------------------------
class U8Linear(torch.nn.Module):
    """uint8 images [B, 784] (or [B, 28, 28]) in, logits [B, 10] out: the conversion to
    float is part of the model, so the dataset hands over the bytes as stored."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.linear = torch.nn.Linear(PIXELS, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1).float().div_(255.0))


def make_teacher() -> Any:
    import kdcache

    return kdcache.Teacher.from_module(U8Linear(seed=0), name="linear", config={"bench": "scale"})


def make_dataset(files: list[str]) -> Any:
    from kdcache.data.files import ParquetDataset

    return ParquetDataset(
        files,
        id_column="sample_id",
        input_columns=["image"],
        label_column="label",
        input_shape=(PIXELS,),
        rows_per_shard=ROWS_PER_GROUP,
    )


# -- data --------------------------------------------------------------------------------
def write_files(data_dir: str) -> tuple[list[str], float]:
    """Write the 16 files one row group at a time (memory: one row group, 52 MB).

    Images are one random block XOR the row group's index (distinct bytes per group at
    the cost of one pass); labels are random. Returns (paths, seconds).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    start = time.perf_counter()
    rng = np.random.default_rng(0)
    block = rng.integers(0, 256, (ROWS_PER_GROUP, PIXELS), dtype=np.uint8)
    schema = pa.schema(
        [("sample_id", pa.int64()), ("image", pa.binary(PIXELS)), ("label", pa.int64())]
    )
    paths = []
    group = 0
    for f in range(NUM_FILES):
        path = os.path.join(data_dir, f"part-{f:02d}.parquet")
        with pq.ParquetWriter(
            path,
            schema,
            compression="none",
            use_dictionary=False,
            write_statistics=["sample_id", "label"],  # id ranges spare the unique-id check
        ) as writer:
            for _ in range(GROUPS_PER_FILE):
                images = block ^ np.uint8(group)
                first = group * ROWS_PER_GROUP
                table = pa.Table.from_arrays(
                    [
                        pa.array(np.arange(first, first + ROWS_PER_GROUP, dtype=np.int64)),
                        pa.FixedSizeBinaryArray.from_buffers(
                            pa.binary(PIXELS), ROWS_PER_GROUP, [None, pa.py_buffer(images)]
                        ),
                        pa.array(rng.integers(0, NUM_CLASSES, ROWS_PER_GROUP, dtype=np.int64)),
                    ],
                    schema=schema,
                )
                writer.write_table(table, row_group_size=ROWS_PER_GROUP)
                group += 1
        paths.append(path)
    return paths, time.perf_counter() - start


def rows_of(files: list[str]) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


# -- sampling anonymous memory ---------------------------------------------------------
def rss_anon_bytes(pid: int) -> int | None:
    """RssAnon of ``pid`` in bytes (None when the process is gone)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


class Sampler(threading.Thread):
    """Samples the RssAnon of a child process (``"self"``) and of its descendants whose
    title starts with a given prefix (``"actor"``) every ``interval`` seconds, keeping
    the peak of each while :attr:`active` is set (the child's measured phase).

    Descendants are rescanned every ``rescan`` seconds; every pid seen is remembered (with
    its start time) so that leftovers can be found after the child exits.
    """

    def __init__(
        self,
        pid: int,
        actor_prefix: str | None = None,
        interval: float = 0.02,
        rescan: float = 0.25,
    ) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        import psutil

        self._psutil = psutil
        self.pid = pid
        self.actor_prefix = actor_prefix
        self.interval, self.rescan = interval, rescan
        self.active = threading.Event()
        self.stop = threading.Event()
        self.peak: dict[str, int] = {"self": 0, "actor": 0}
        self.samples = 0
        self.actor_pids: set[int] = set()
        self.seen: dict[int, float] = {}  # pid -> create_time of every descendant seen

    def actor_cpu_s(self) -> float:
        """User + system CPU seconds of the actor processes so far (all threads)."""
        total = 0.0
        for a in list(self.actor_pids):
            try:
                t = self._psutil.Process(a).cpu_times()
                total += t.user + t.system
            except self._psutil.Error:
                continue
        return total

    def _scan(self) -> None:
        psutil = self._psutil
        try:
            kids = psutil.Process(self.pid).children(recursive=True)
        except psutil.Error:
            return
        for p in kids:
            try:
                if p.pid not in self.seen:
                    self.seen[p.pid] = p.create_time()
                if self.actor_prefix and p.pid not in self.actor_pids:
                    cmd = p.cmdline()
                    if cmd and cmd[0].startswith(self.actor_prefix):
                        self.actor_pids.add(p.pid)
            except psutil.Error:
                continue

    def run(self) -> None:
        next_scan = 0.0
        while not self.stop.is_set():
            now = time.monotonic()
            if now >= next_scan:
                self._scan()
                next_scan = now + self.rescan
            if self.active.is_set():
                v = rss_anon_bytes(self.pid)
                if v is not None:
                    self.peak["self"] = max(self.peak["self"], v)
                for a in list(self.actor_pids):
                    v = rss_anon_bytes(a)
                    if v is not None:
                        self.peak["actor"] = max(self.peak["actor"], v)
                self.samples += 1
            self.stop.wait(self.interval)


def run_child(
    role_args: list[str], log_path: str, actor_prefix: str | None = None, env: dict | None = None
) -> tuple[dict[str, Any], Sampler, float]:
    """Run this script in ``--role ...`` mode, sampling its memory during the phase it
    marks with ``@@begin`` / ``@@end`` lines; returns (its ``@@result``, sampler, wall s).

    Raises:
        RuntimeError: the child failed (its log's tail is in the message).
    """
    start = time.perf_counter()
    with open(log_path, "a") as log:
        proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), *role_args],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env={**os.environ, **(env or {})},
        )
        sampler = Sampler(proc.pid, actor_prefix)
        sampler.start()
        result: dict[str, Any] = {}
        marks: dict[str, float] = {}
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("@@begin"):
                sampler._scan()
                sampler.active.set()
            elif line.startswith("@@end"):
                sampler.active.clear()
            elif line.startswith("@@cpu "):  # actor CPU seconds at a point the child names
                sampler._scan()
                marks[line.split()[1]] = sampler.actor_cpu_s()
            elif line.startswith("@@result "):
                result = json.loads(line[len("@@result ") :])
            else:
                log.write(line)
        rc = proc.wait()
        sampler.stop.set()
        sampler.join()
    if rc != 0 or not result:
        with open(log_path) as fh:
            tail = "".join(fh.readlines()[-30:])
        raise RuntimeError(f"{' '.join(role_args[:2])} failed (exit {rc}); log tail:\n{tail}")
    result["cpu_marks"] = marks
    return result, sampler, time.perf_counter() - start


def leftovers(samplers: list[Sampler]) -> list[str]:
    """Processes started under our children that are still alive; killed by pid here."""
    import psutil

    left = []
    for s in samplers:
        for pid, created in s.seen.items():
            try:
                p = psutil.Process(pid)
                if abs(p.create_time() - created) > 1e-3:
                    continue  # the pid was reused by someone else
                left.append(f"{pid} {' '.join(p.cmdline())[:60]}")
                p.kill()
            except psutil.Error:
                continue
    return left


# -- roles (subprocesses) ----------------------------------------------------------------
def phase(mark: str) -> None:
    """Tell the parent: ``begin`` / ``end`` of the phase whose memory is sampled, or
    ``cpu NAME`` (read the actors' CPU seconds now, under NAME)."""
    print(f"@@{mark}", flush=True)


def cpu_s() -> float:
    """CPU seconds of this process (all threads), user + system."""
    t = os.times()
    return t.user + t.system


def role_driver(a: argparse.Namespace) -> dict[str, Any]:
    """Start Ray on 127.0.0.1, warm a one-actor RayExecutor, then time ``rounds`` builds
    of the whole dataset into fresh cache roots (the last one is kept)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local benchmark cluster only
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    import ray

    import kdcache
    from kdcache.executors import ExecutorConfig
    from kdcache.executors.ray import RayExecutor

    files = json.loads(a.files)
    teacher = make_teacher()
    for attempt in range(5):  # another local Ray may be starting or stopping: retry
        try:
            ray.init(
                address="local",
                _node_ip_address="127.0.0.1",
                num_cpus=2,
                include_dashboard=False,
                logging_level=logging.ERROR,
            )
            break
        except Exception as exc:
            if attempt == 4:
                raise
            print(f"ray.init failed ({exc}); retrying in 15 s", file=sys.stderr, flush=True)
            time.sleep(15)
    ex = RayExecutor(ExecutorConfig(kind="ray", num_actors=1, batch_size=BATCH))
    walls, busy = [], []
    key = ""
    try:
        rng = np.random.default_rng(1)
        tiny = kdcache.ArrayDataset(
            np.arange(BATCH), rng.integers(0, 256, (BATCH, PIXELS), dtype=np.uint8), num_shards=1
        )
        warm_root = tempfile.mkdtemp(prefix="warm-", dir=a.root_parent)
        kdcache.build_cache(
            tiny, teacher, temperature=TEMPERATURE, root=warm_root, executor=ex, progress=False
        )
        shutil.rmtree(warm_root, ignore_errors=True)
        ds = make_dataset(files)
        for r in range(a.rounds):
            root = os.path.join(a.root_parent, f"cache-{r}")
            if r == 0:
                phase("begin")  # memory: the first build only, one pass over the data
            phase(f"cpu start-{r}")
            start = time.perf_counter()
            cache = kdcache.build_cache(
                ds, teacher, temperature=TEMPERATURE, root=root, executor=ex, progress=False
            )
            walls.append(time.perf_counter() - start)
            phase(f"cpu end-{r}")
            if r == 0:
                phase("end")
            report = cache.build_report  # type: ignore[union-attr]  # set by build_cache
            busy.append(sum(v["seconds"] for v in report.per_actor.values()))
            key = cache.key
            if r < a.rounds - 1:
                shutil.rmtree(root, ignore_errors=True)
    finally:
        ex.close()
        ray.shutdown()
    return {
        "walls": walls,
        "busy": busy,
        "root": os.path.join(a.root_parent, f"cache-{a.rounds - 1}"),
        "key": key,
        "num_shards": ds.num_shards,
    }


def role_student(a: argparse.Namespace) -> dict[str, Any]:
    """``rounds`` epochs of a linear student distilled from the cache; each epoch timed
    from its first batch request to its last optimizer step."""
    import kdcache
    from kdcache import losses

    torch.set_num_threads(1)
    ds = make_dataset(json.loads(a.files))
    cache = kdcache.CacheEntry(a.root, a.key)
    stream = kdcache.SoftTargetDataset(cache, ds, batch_size=BATCH, seed=0)
    student = U8Linear(seed=1)
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    epochs, cpus, samples, last_loss = [], [], 0, float("nan")
    for r in range(a.rounds):
        if r == 0:
            phase("begin")  # memory: the first epoch only
        samples = 0
        start, cpu0 = time.perf_counter(), cpu_s()
        for batch in stream:
            logits = student(batch["inputs"])
            loss = losses.kd_loss(
                logits,
                batch["teacher_log_probs"],
                temperature=TEMPERATURE,
                alpha=ALPHA,
                labels_B=batch.get("labels"),
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            samples += len(logits)
        epochs.append(time.perf_counter() - start)
        cpus.append(cpu_s() - cpu0)
        if r == 0:
            phase("end")
        last_loss = float(loss.detach())
    return {
        "epochs": epochs,
        "cpus": cpus,
        "samples": samples,
        "steps": len(stream),
        "loss": last_loss,
    }


def raw_read(files: list[str]) -> int:
    """pyarrow alone: the same columns, batches of BATCH, as numpy (zero-copy views)."""
    import pyarrow.parquet as pq

    n = 0
    for path in files:
        for b in pq.ParquetFile(path).iter_batches(batch_size=BATCH, columns=COLUMNS):
            ids = b.column(0).to_numpy()
            img = b.column(1)
            np.frombuffer(img.buffers()[1], np.uint8, len(img) * PIXELS, img.offset * PIXELS)
            b.column(2).to_numpy()
            n += len(ids)
    return n


def dataset_read(ds: Any) -> int:
    """Every shard's ``open_shard`` batches, through the dataset (with its digest)."""
    from kdcache.data.base import open_shard

    n = 0
    for i in range(ds.num_shards):
        reader = open_shard(ds, i, BATCH)
        for b in reader:
            n += len(b["sample_id"])
        assert reader.digest, f"shard {i}: no content digest after a complete read"
    return n


def plain_loop(files: list[str], teacher: Any) -> int:
    """The raw read plus the teacher on every batch, outputs concatenated per file (the
    stage keeps them per shard), nothing written."""
    import pyarrow.parquet as pq

    from kdcache import targets

    n = 0
    for path in files:
        parts = []
        for b in pq.ParquetFile(path).iter_batches(batch_size=BATCH, columns=COLUMNS):
            img = b.column(1)
            x = np.frombuffer(img.buffers()[1], np.uint8, len(img) * PIXELS, img.offset * PIXELS)
            logits = teacher.logits(x.reshape(len(img), PIXELS))
            parts.append(targets.scale_logits(logits, TEMPERATURE).numpy())
            n += len(img)
        np.concatenate(parts)
    return n


def local_stage(ds: Any, teacher: Any, parent: str) -> int:
    """``build_cache(executor="local")`` into a fresh root: the stage without Ray."""
    import kdcache
    from kdcache.executors import ExecutorConfig

    root = tempfile.mkdtemp(prefix="local-", dir=parent)
    try:
        cache = kdcache.build_cache(
            ds,
            teacher,
            temperature=TEMPERATURE,
            root=root,
            executor=ExecutorConfig(kind="local", batch_size=BATCH),
            progress=False,
        )
        return int(cache.build_report.num_samples)  # type: ignore[union-attr]
    finally:
        shutil.rmtree(root, ignore_errors=True)


def profiled(fn: Any, top: int = 22) -> str:
    """cProfile of ``fn()`` (this thread only), the ``top`` entries by cumulative time."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.runcall(fn)
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(top)
    return out.getvalue()


def role_compare(a: argparse.Namespace) -> dict[str, Any]:
    """Raw read, dataset read, the plain loop and the stage in this process (no Ray),
    interleaved, ``rounds`` times each; with ``--profile``, cProfile of the last two."""
    torch.set_num_threads(1)
    files = json.loads(a.files)
    ds = make_dataset(files)
    teacher = make_teacher()
    times: dict[str, list[float]] = {"raw": [], "dataset": [], "plain": [], "local": []}
    cpus: dict[str, list[float]] = {k: [] for k in times}
    rows: dict[str, int] = {}
    raw_read(files[:1])  # warm-up: imports, first-touch of allocator pages
    for _ in range(a.rounds):
        for name, fn in (
            ("raw", lambda: raw_read(files)),
            ("dataset", lambda: dataset_read(ds)),
            ("plain", lambda: plain_loop(files, teacher)),
            ("local", lambda: local_stage(ds, teacher, a.root_parent)),
        ):
            start, cpu0 = time.perf_counter(), cpu_s()
            rows[name] = fn()
            times[name].append(time.perf_counter() - start)
            cpus[name].append(cpu_s() - cpu0)
    profiles = {}
    if a.profile:
        profiles = {
            "plain loop": profiled(lambda: plain_loop(files, teacher)),
            "dataset read": profiled(lambda: dataset_read(ds)),
            "stage, local executor": profiled(lambda: local_stage(ds, teacher, a.root_parent)),
        }
    return {"times": times, "cpus": cpus, "rows": rows, "profiles": profiles}


# -- the benchmark -----------------------------------------------------------------------
def best_round(walls: list[float], other: list[float]) -> float:
    """``other`` of the round with the least wall time."""
    return other[int(np.argmin(walls))]


def actor_cpus(res: dict[str, Any]) -> list[float]:
    """Actor CPU seconds of each timed build (from the driver's ``cpu`` marks)."""
    m = res["driver"]["cpu_marks"]
    return [m[f"end-{r}"] - m[f"start-{r}"] for r in range(len(res["driver"]["walls"]))]


def child_args(role: str, rounds: int, **options: str | bool) -> list[str]:
    """``--role ROLE --rounds N --opt value ...`` (True: a bare flag, False: left out)."""
    out = ["--role", role, "--rounds", str(rounds)]
    for k, v in options.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            out.append(flag)
        elif v is not False:
            out += [flag, str(v)]
    return out


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="2 rounds instead of 5 (same sizes)")
    p.add_argument("--rounds", type=int, default=None, help="timed repeats; default 2 or 5")
    p.add_argument("--workdir", default=None, help="where the temp dir goes (default: TMPDIR)")
    p.add_argument("--json", default=None, metavar="PATH")
    p.add_argument(
        "--profile",
        action="store_true",
        help="also print cProfile of the plain loop, the dataset read and a local build",
    )
    p.add_argument("--role", choices=("driver", "student", "compare"), help=argparse.SUPPRESS)
    p.add_argument("--files", help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--root-parent", help=argparse.SUPPRESS)
    p.add_argument("--key", help=argparse.SUPPRESS)
    a = p.parse_args()
    rounds = a.rounds or (2 if a.quick else 5)
    if a.role:
        a.rounds = rounds
        fn = {"driver": role_driver, "student": role_student, "compare": role_compare}[a.role]
        print("@@result " + json.dumps(fn(a)), flush=True)
        return

    t_all = time.perf_counter()
    load = os.getloadavg()
    try:
        from kdcache.data.files import ParquetDataset  # noqa: F401
    except Exception as exc:  # absent, or mid-edit: say so before writing 2.5 GB
        raise SystemExit(f"bench_scale needs kdcache.data.files.ParquetDataset: {exc!r}") from exc
    work = tempfile.mkdtemp(prefix="kdcache-bench-scale-", dir=a.workdir)
    log_path = os.path.join(work, "children.log")
    samplers: list[Sampler] = []
    one_thread = {"OMP_NUM_THREADS": "1"}  # what a Ray actor of one CPU gets (torch, Arrow)
    res: dict[int, dict[str, Any]] = {}
    try:
        data_dir = os.path.join(work, "data")
        os.makedirs(data_dir)
        files, write_s = write_files(data_dir)
        size_bytes = {s: sum(os.path.getsize(f) for f in files[:s]) for s in SIZES}
        size_rows = {s: rows_of(files[:s]) for s in SIZES}
        print(
            f"bench_scale: {NUM_FILES} Parquet files written in {write_s:.1f} s "
            f"({size_bytes[16] / write_s / MIB:,.0f} MiB/s); 1x = {size_rows[1]:,} rows, "
            f"16x = {size_rows[16]:,} rows, {size_bytes[16] / 1e9:.2f} GB; "
            f"{rounds} round(s)",
            flush=True,
        )
        compare: dict[str, Any] = {}
        for s in SIZES:
            parent = os.path.join(work, f"caches-{s}x")
            os.makedirs(parent)
            fs = json.dumps(files[:s])
            drv, smp, drv_wall = run_child(
                child_args("driver", rounds, files=fs, root_parent=parent),
                log_path,
                actor_prefix="ray::TeacherActor",
            )
            samplers.append(smp)
            res[s] = {
                "driver": drv,
                "driver_rss": smp.peak["self"],
                "actor_rss": smp.peak["actor"],
                "actors": len(smp.actor_pids),
                "driver_wall": drv_wall,
            }
            if s == SIZES[-1]:  # right after the stage on the same data: side by side
                compare, csmp, _ = run_child(
                    child_args("compare", rounds, files=fs, root_parent=parent, profile=a.profile),
                    log_path,
                    env=one_thread,
                )
                samplers.append(csmp)
            stu, ssmp, _ = run_child(
                child_args("student", rounds, files=fs, root=drv["root"], key=drv["key"]),
                log_path,
                env=one_thread,
            )
            samplers.append(ssmp)
            res[s].update(student=stu, student_rss=ssmp.peak["self"])
            shutil.rmtree(parent, ignore_errors=True)
            st, ep = min(drv["walls"]), min(stu["epochs"])
            print(
                f"  {s:>2}x done: stage {st:.2f} s, student epoch {ep:.2f} s, "
                f"driver process {drv_wall:.1f} s with Ray start-up",
                flush=True,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    left = leftovers(samplers)

    # -- figures ---------------------------------------------------------------------------
    big = SIZES[-1]
    nbig = size_rows[big]
    ct = {k: min(v) for k, v in compare["times"].items()}
    ccpu = {k: best_round(compare["times"][k], compare["cpus"][k]) for k in ct}
    stage = {s: min(res[s]["driver"]["walls"]) for s in SIZES}
    busy = {s: best_round(res[s]["driver"]["walls"], res[s]["driver"]["busy"]) for s in SIZES}
    stage_cpu = {s: best_round(res[s]["driver"]["walls"], actor_cpus(res[s])) for s in SIZES}
    epoch = {s: min(res[s]["student"]["epochs"]) for s in SIZES}
    epoch_cpu = {
        s: best_round(res[s]["student"]["epochs"], res[s]["student"]["cpus"]) for s in SIZES
    }
    per = {s: stage[s] / size_rows[s] for s in SIZES}
    sper = {s: epoch[s] / res[s]["student"]["samples"] for s in SIZES}
    figures: dict[str, Any] = {
        "bytes_16x": size_bytes[16],
        "rounds": rounds,
        "batch_size": BATCH,
        "rows_per_shard": ROWS_PER_GROUP,
        "write_s": write_s,
    }
    for s in SIZES:
        r = res[s]
        figures.update(
            {
                f"bytes_{s}x": size_bytes[s],
                f"rows_{s}x": size_rows[s],
                f"shards_{s}x": r["driver"]["num_shards"],
                f"driver_rss_mib_{s}x": r["driver_rss"] / MIB,
                f"actor_rss_mib_{s}x": r["actor_rss"] / MIB,
                f"student_rss_mib_{s}x": r["student_rss"] / MIB,
                f"stage_s_{s}x": stage[s],
                f"stage_busy_s_{s}x": busy[s],
                f"stage_actor_cpu_s_{s}x": stage_cpu[s],
                f"stage_samples_per_s_{s}x": size_rows[s] / stage[s],
                f"student_epoch_s_{s}x": epoch[s],
                f"student_epoch_cpu_s_{s}x": epoch_cpu[s],
                f"student_samples_{s}x": r["student"]["samples"],
                f"student_samples_per_s_{s}x": r["student"]["samples"] / epoch[s],
                f"student_final_loss_{s}x": r["student"]["loss"],
            }
        )
    for proc in ("driver", "actor", "student"):  # growth once 4x has filled the pipelines
        figures[f"{proc}_rss_16x_over_4x"] = res[16][f"{proc}_rss"] / res[4][f"{proc}_rss"]
    # CPU seconds per sample: less sensitive than wall time to other jobs on the cores
    cper = {s: stage_cpu[s] / size_rows[s] for s in SIZES}
    scper = {s: epoch_cpu[s] / res[s]["student"]["samples"] for s in SIZES}
    figures["stage_cpu_per_sample_16x_over_1x"] = cper[16] / cper[1]
    figures["student_cpu_per_sample_16x_over_1x"] = scper[16] / scper[1]
    figures["stage_time_per_sample_16x_over_4x"] = per[16] / per[4]
    figures["student_time_per_sample_16x_over_4x"] = sper[16] / sper[4]
    figures.update(
        {
            "compare_size": f"{big}x",
            "compare_rows": nbig,
            "raw_read_s": ct["raw"],
            "dataset_read_s": ct["dataset"],
            "plain_s": ct["plain"],
            "local_stage_s": ct["local"],
            **{f"{k}_cpu_s": ccpu[k] for k in ("raw", "dataset", "plain", "local")},
            "load_average_1min_start": load[0],
            "load_average_1min_end": os.getloadavg()[0],
            "raw_read_mib_per_s": size_bytes[big] / ct["raw"] / MIB,
            "dataset_read_mib_per_s": size_bytes[big] / ct["dataset"] / MIB,
            "plain_samples_per_s": nbig / ct["plain"],
            "local_stage_over_plain": ct["local"] / ct["plain"],
            "stage_busy_over_plain": busy[big] / ct["plain"],
            "leftover_processes": len(left),
            "wall_s": time.perf_counter() - t_all,
        }
    )
    ratios = {
        "driver_rss_16x_over_1x": res[16]["driver_rss"] / res[1]["driver_rss"],
        "actor_rss_16x_over_1x": res[16]["actor_rss"] / res[1]["actor_rss"],
        "student_rss_16x_over_1x": res[16]["student_rss"] / res[1]["student_rss"],
        "stage_time_per_sample_16x_over_1x": per[16] / per[1],
        "student_time_per_sample_16x_over_1x": sper[16] / sper[1],
        "input_read_speed_over_raw": ct["raw"] / ct["dataset"],
        "stage_time_over_plain": stage[big] / ct["plain"],
    }

    # -- printed -------------------------------------------------------------------------
    print()
    print(
        f"peak RssAnon (MiB) in the first build / first epoch; time: best of {rounds}, "
        "with that round's CPU seconds (the actor's, the student's)"
    )
    print(
        f"{'size':<4} {'rows':>10} {'MB':>6} {'shards':>6} | {'driver':>6} {'actor':>6} "
        f"{'student':>7} | {'stage s':>7} {'busy s':>7} {'cpu s':>6} {'us/row':>6} | "
        f"{'epoch s':>7} {'cpu s':>6} {'us/row':>6}"
    )
    for s in SIZES:
        r = res[s]
        print(
            f"{s:>3}x {size_rows[s]:>10,} {size_bytes[s] / 1e6:>6,.0f} "
            f"{r['driver']['num_shards']:>6} | {r['driver_rss'] / MIB:>6.0f} "
            f"{r['actor_rss'] / MIB:>6.0f} {r['student_rss'] / MIB:>7.0f} | "
            f"{stage[s]:>7.2f} {busy[s]:>7.2f} {stage_cpu[s]:>6.2f} {per[s] * 1e6:>6.2f} | "
            f"{epoch[s]:>7.2f} {epoch_cpu[s]:>6.2f} {sper[s] * 1e6:>6.2f}"
        )
    print()
    print(f"on the {big}x data ({nbig:,} rows, {size_bytes[big] / 1e9:.2f} GB, page cache warm):")
    for name, secs, cpu in (
        ("raw read (pyarrow iter_batches)", ct["raw"], ccpu["raw"]),
        ("dataset read (open_shard + digest)", ct["dataset"], ccpu["dataset"]),
        ("plain loop (raw read + teacher)", ct["plain"], ccpu["plain"]),
        ("stage, local executor (no Ray)", ct["local"], ccpu["local"]),
        ("stage, Ray, 1 actor (build_cache)", stage[big], stage_cpu[big]),
        ("  of which the actor busy on shards", busy[big], None),
    ):
        print(
            f"  {name:<36} {secs:>7.2f} s {nbig / secs:>11,.0f} rows/s "
            f"{size_bytes[big] / secs / MIB:>7,.0f} MiB/s"
            + ("" if cpu is None else f"  cpu {cpu:>6.2f} s")
        )
    print()
    goals = {
        "driver_rss_16x_over_1x": ("<=", 1.2),
        "actor_rss_16x_over_1x": ("<=", 1.2),
        "student_rss_16x_over_1x": ("<=", 1.2),
        "stage_time_per_sample_16x_over_1x": ("<=", 1.15),
        "student_time_per_sample_16x_over_1x": ("<=", 1.15),
        "input_read_speed_over_raw": (">=", 0.7),
        "stage_time_over_plain": ("<=", 1.05),
    }
    for k, v in ratios.items():
        op, g = goals[k]
        ok = v <= g if op == "<=" else v >= g
        print(f"  {k:<36} {v:>7.3f}   goal {op} {g:<4}  {'met' if ok else 'MISSED'}")
    print(
        "  16x over 4x (pipelines full at both): RssAnon driver "
        f"{figures['driver_rss_16x_over_4x']:.3f}, actor {figures['actor_rss_16x_over_4x']:.3f}, "
        f"student {figures['student_rss_16x_over_4x']:.3f}; time per sample stage "
        f"{figures['stage_time_per_sample_16x_over_4x']:.3f}, student "
        f"{figures['student_time_per_sample_16x_over_4x']:.3f}"
    )
    print(
        "  16x over 1x in CPU seconds per sample (less noisy than wall time): stage "
        f"{figures['stage_cpu_per_sample_16x_over_1x']:.3f}, student "
        f"{figures['student_cpu_per_sample_16x_over_1x']:.3f}"
    )
    print(
        f"\nstage: Ray and actor start-up excluded (executor warmed by a tiny build); student: "
        f"batch {BATCH}, 1 torch thread; compare, local stage and student run with "
        f"OMP_NUM_THREADS=1 like the actor. Leftover processes: {len(left)}"
        + ("" if not left else " (killed: " + "; ".join(left) + ")")
        + f". Load average {load[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end "
        f"(2 cores: other jobs inflate wall times). Wall {figures['wall_s']:.0f} s."
    )
    for name, text in compare.get("profiles", {}).items():
        print(f"\n-- cProfile: {name} (main thread) --\n{text}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"name": "bench_scale", "figures": figures, "ratios": ratios}, fh, indent=2)


if __name__ == "__main__":
    main()
