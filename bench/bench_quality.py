"""Better students from the same cache: test accuracy of one student per target, side by side.

On Fashion-MNIST, with the demo's data, teachers and student (``pipelines/fashion_mnist.py``:
3 teachers, an MLP 784-16-10 student that sees 1,000 labels, tau = 4, alpha = 0.9; the
teachers are trained into the demo's work dir when missing and reused when present), the
same student from the same initial weights is trained with the same plain torch loop
(Adam, the demo's learning rate and batch), for the same number of steps, once per row:

* ``hard labels``: cross-entropy on the 1,000 labelled images alone;
* ``KD mean_probs``: distilled from the dense cache of the 3 teachers, mean of
  probabilities (``SoftTargetDataset``, as the demo does today);
* ``KD <rule>``: the per-sample ensemble rules of ``kdcache.targets.combine_ensemble``
  (``confidence_max``, ``confidence_entropy``, ``best_on_label`` with the label where
  there is one and mean_probs elsewhere, ``route`` by the ensemble's predicted class to
  the teacher most accurate on that class over the 1,000 labelled images), each from the
  same three entries (one stream per entry, zipped: the same order);
* ``KD views K=4``, ``KD views K=16``: targets cached per augmented view
  (``kdcache.data.AugmentedViews``: shift up to 2 pixels and horizontal flip,
  ``pipelines.augment:shift_flip``), the student stream replaying the same augmentation;
* ``online KD + aug``: the reference the view caches must match: the teachers run every
  step on the batch augmented afresh (a new draw per sample and epoch, never repeated);
* ``DKD``: decoupled KD (``kdcache.losses.dkd_loss``, alpha 1, beta 8) from the
  mean_probs cache; DKD needs a target class, so a row without a label takes the
  ensemble's predicted class, and the hard-label term is on real labels only.

* **The recipe study** (``--no-recipes`` leaves it out): the same student, labels and
  steps, with the learning rate and its schedule (constant, or a linear warm-up over 10%
  of the steps then a cosine decay, as DeepSpeed's ``WarmupCosineLR``) and, for KD, the
  temperature (the tau = 4 cache re-tempered exactly) and alpha varied: 4 hard-label and
  10 KD recipes, 2 seeds each (``--recipe-seeds``). The hard-label and the KD recipe are
  each *chosen on held-out training images* (the last 5,000, less the labelled ones; their
  labels are used for nothing else), never on the test set; their test accuracies are
  reported, the gap closed measured against the *tuned* hard-label student. Then each
  per-sample rule and DKD run with the chosen KD recipe.

Columns: test accuracy; gap closed = (student - hard) / (ensemble - hard), with the
hard-label student and the ensemble (mean of probabilities) measured in this run; cache
bytes; the teacher stage's time for that cache in this run (0 when it was a hit) and the
student's training time. Rows whose library part is missing are skipped with a line
saying so.

Names in ``--json``: ``ratios.best_gap_closed`` (the best row's gap closed, a fraction,
over the rows and the recipe study's rows, each against its own hard-label student;
goal >= 0.6) and ``figures.views16_minus_online_aug_points`` (test accuracy of the K = 16
view cache minus online KD with the same augmentation, percentage points; goal >= -0.5);
per row ``figures.<row>_test_accuracy`` and ``_gap_closed``; the K = 16 entry's bytes and
teacher-stage throughput (``figures.views16_entry_bytes``, ``views16_images_x_views_per_s``).

    python bench/bench_quality.py --quick    # the first 10,000 images, teachers 2 epochs
    python bench/bench_quality.py --json bench_quality.json   # 60,000 images, as the demo
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import kdcache
from kdcache import losses, targets
from kdcache.data.views import Augmentation, AugmentedViews, ViewRandom
from kdcache.stream.dataset import ShardedStream
from kdcache.teachers.spec import TeacherSpec
from pipelines import fashion_mnist as fm
from pipelines.models import build_model

log = logging.getLogger("bench.quality")

AUGMENTATION = Augmentation("pipelines.augment:shift_flip", {"max_shift": 2})
VIEW_SEED = 0
#: Seed of the online rows' fresh draws (never equal to a cached view's: other stream).
ONLINE_SEED = 1_000_003
RULES = ("confidence_max", "confidence_entropy", "best_on_label", "route")


@dataclass
class Row:
    name: str
    test_accuracy: float
    cache_bytes: int
    build_s: float
    train_s: float
    gap_closed: float = 0.0


def _batches(stream: Any) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of a stream, epoch after epoch, without end."""
    while True:
        empty = True
        for batch in stream:
            empty = False
            yield batch
        if empty:
            raise RuntimeError("the stream yields no batches")


#: The recipe study's schedule: linear warm-up over the first 10% of the steps, then a
#: cosine decay to 1e-4 of the peak (DeepSpeed's ``WarmupCosineLR`` with
#: ``warmup_type: linear``, ``cos_min_ratio: 1e-4``).
WARMUP_FRACTION, COS_MIN_RATIO = 0.1, 1e-4


def warmup_cosine(step: int, steps: int) -> float:
    """The learning-rate factor at optimizer step ``step`` (0-based) of ``steps``."""
    warm = max(1, int(WARMUP_FRACTION * steps))
    if step < warm:
        return (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    return COS_MIN_RATIO + (1 - COS_MIN_RATIO) * 0.5 * (1 + math.cos(math.pi * t))


def train(
    batches: Iterator[dict[str, Any]],
    loss_fn: Callable[[torch.Tensor, dict[str, Any]], torch.Tensor],
    steps: int,
    s: fm.Settings,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    lr: float | None = None,
    schedule: str = "constant",
    seed: int | None = None,
    x_val: np.ndarray | None = None,
    y_val: np.ndarray | None = None,
) -> tuple[float, float, float]:
    """The one loop of every row: the demo's student from seed ``s.seed`` (or ``seed``),
    Adam at the demo's learning rate (or ``lr``; ``schedule`` ``"constant"`` or
    ``"warmup_cosine"``), ``steps`` steps. Returns (test accuracy, validation accuracy or
    NaN, seconds)."""
    t0 = time.perf_counter()
    torch.manual_seed(s.seed if seed is None else seed)
    model = build_model(fm.STUDENT["arch"], **fm.STUDENT["kwargs"])
    opt = torch.optim.Adam(model.parameters(), lr=s.lr if lr is None else lr)
    sched = None
    if schedule == "warmup_cosine":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: warmup_cosine(t, steps))
    elif schedule != "constant":
        raise ValueError(f"unknown schedule {schedule!r}")
    model.train()
    for _ in range(steps):
        batch = next(batches)
        loss = loss_fn(model(batch["inputs"]), batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
    acc = fm.accuracy(fm.predict_logits(model, x_test), y_test)
    val = float("nan")
    if x_val is not None and y_val is not None:
        val = fm.accuracy(fm.predict_logits(model, x_val), y_val)
    return acc, val, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--quick",
        action="store_true",
        help="the first 10,000 training images (and 1,666 test images), teachers trained "
        "2 epochs on them (their own files in the work dir), so about 4 minutes cold",
    )
    p.add_argument("--work-dir", default="runs/fashion-mnist", help="the demo's work dir")
    p.add_argument("--data-dir", default=fm.DEFAULT_DATA_DIR)
    p.add_argument("--executor", default="local", choices=["local", "ray"])
    p.add_argument("--views", default="4,16", help="K of the view caches, comma-separated")
    p.add_argument(
        "--no-recipes",
        dest="recipes",
        action="store_false",
        help="leave out the recipe study (tau, alpha, learning rate and schedule chosen on "
        "held-out training images; 28 students)",
    )
    p.add_argument("--recipe-seeds", type=int, default=2, help="seeds per recipe (default 2)")
    p.add_argument("--json", default=None, help="write {name, figures, ratios} here")
    a = p.parse_args(argv)
    views_k = [int(k) for k in a.views.split(",") if k]
    demo_args = ["--work-dir", a.work_dir, "--data-dir", a.data_dir, "--no-progress"]
    demo_args += ["--executor", a.executor]
    if a.quick:
        demo_args += ["--subset", "10000", "--teacher-epochs", "2"]
    s = fm.parse_args(demo_args)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    t_all = time.perf_counter()

    # -- the demo's data and teachers ---------------------------------------------------------
    x_train, y_train, x_test, y_test = fm._subset(fm.load_fashion_mnist(s.data_dir), s.subset)
    n = len(x_train)
    train_mem = kdcache.ArrayDataset(
        np.arange(n), x_train, y_train, num_shards=s.num_shards, preprocessing=fm.PREPROCESSING
    )
    train_path = fm.write_parquet_split(
        fm.split_path(s, "train"), np.arange(n), x_train, y_train, s.num_shards
    )
    train_files = fm.parquet_dataset(train_path, s.num_shards)
    t = time.perf_counter()
    teachers, paths = zip(
        *(fm.train_or_load_teacher(spec, train_mem, s) for spec in fm.TEACHERS), strict=True
    )
    teachers_s = time.perf_counter() - t
    ensemble = kdcache.TeacherEnsemble(list(teachers), rule="mean_probs")
    specs = [
        TeacherSpec.checkpoint(tt.name, "pipelines.models:build_model", pp, kwargs=tt.config)
        for tt, pp in zip(teachers, paths, strict=True)
    ]
    ensemble_acc = fm.accuracy(ensemble.log_probs(x_test), y_test)
    teacher_accs = {tt.name: fm.accuracy(tt.logits(x_test), y_test) for tt in teachers}

    def build(dataset: Any) -> tuple[Any, float]:
        t = time.perf_counter()
        cache = kdcache.build_cache(
            dataset,
            kdcache.TeacherEnsemble(specs, rule="mean_probs"),
            temperature=s.temperature,
            root=s.cache_root,
            executor=s.executor,
            progress=False,
        )
        report = cache.build_report
        return cache, 0.0 if report.hit else time.perf_counter() - t

    labelled, _ = fm._student_labels(y_train, s.student_labels, s.seed)
    label_tf = fm.student_label_transform(s, n)
    batch = min(s.batch_size, s.student_labels)

    def kd_data() -> Any:
        return fm.parquet_dataset(train_path, s.num_shards, label_tf)

    steps = max(1, s.student_epochs * (n // batch))
    tau, alpha = s.temperature, s.alpha

    def kd(logits: torch.Tensor, b: dict[str, Any]) -> torch.Tensor:
        return losses.kd_loss(
            logits, b["teacher_log_probs"], temperature=tau, alpha=alpha, labels_B=b["labels"]
        )

    rows: list[Row] = []

    def run(
        name: str, batches: Iterator[dict[str, Any]], loss_fn: Any, nbytes: int, build_s: float
    ) -> None:
        acc, _, secs = train(batches, loss_fn, steps, s, x_test, y_test)
        rows.append(Row(name, acc, nbytes, build_s, secs))
        log.info("%s: test accuracy %.4f (%.0f s)", name, acc, secs)

    # -- hard labels ------------------------------------------------------------------------------
    hard = ShardedStream(train_mem.subset(labelled, num_shards=1), batch_size=batch, seed=s.seed)
    run("hard labels", _batches(hard), lambda lg, b: losses.cross_entropy(lg, b["labels"]), 0, 0.0)

    # -- the dense cache: mean_probs (today) ------------------------------------------------------
    cache, cache_s = build(train_files)
    stream = kdcache.SoftTargetDataset(cache, kd_data(), batch_size=batch, seed=s.seed)
    run("KD mean_probs", _batches(stream), kd, cache.num_bytes, cache_s)

    # -- the per-sample ensemble rules, from the same entries ----------------------------------
    have = set(getattr(targets, "ALL_ENSEMBLE_RULES", targets.ENSEMBLE_RULES))
    routes = _class_routes(teachers, x_train[labelled], y_train[labelled])
    for rule in RULES:
        if rule not in have:
            print(f"skipped: KD {rule} (kdcache.targets.combine_ensemble has no rule {rule!r} yet)")
            continue
        per_entry = [
            kdcache.SoftTargetDataset(e, kd_data(), batch_size=batch, seed=s.seed)
            for e in cache.entries
        ]
        run(
            f"KD {rule}",
            _ruled(per_entry, rule, routes),
            kd,
            cache.num_bytes,
            0.0,
        )

    # -- K-view caches --------------------------------------------------------------------------
    views_info: dict[int, dict[str, float]] = {}
    for k in views_k:
        views = AugmentedViews(train_files, AUGMENTATION, num_views=k, seed=VIEW_SEED)
        vcache, vs = build(views)
        student_views = AugmentedViews(kd_data(), AUGMENTATION, num_views=k, seed=VIEW_SEED)
        vstream = kdcache.SoftTargetDataset(vcache, student_views, batch_size=batch, seed=s.seed)
        run(f"KD views K={k}", _batches(vstream), kd, vcache.num_bytes, vs)
        views_info[k] = {
            "bytes": float(vcache.num_bytes),
            "build_s": vs,
            "images_x_views_per_s": n * k / vs if vs else float("nan"),
        }

    # -- online KD with the same augmentation --------------------------------------------------
    online = ShardedStream(kd_data(), batch_size=batch, seed=s.seed)
    run("online KD + aug", _online(online, ensemble, tau), kd, 0, 0.0)

    # -- DKD --------------------------------------------------------------------------------------
    if hasattr(losses, "dkd_loss"):
        stream = kdcache.SoftTargetDataset(cache, kd_data(), batch_size=batch, seed=s.seed)
        run("DKD", _batches(stream), _dkd_loss(tau, alpha), cache.num_bytes, 0.0)
    else:
        print("skipped: DKD (kdcache.losses has no dkd_loss yet)")

    # -- the recipe study: temperature, alpha, learning rate and schedule, chosen on a
    # validation split (never on the test set), for the hard-label student and KD alike
    study: list[dict[str, Any]] = []
    tuned: dict[str, Row] = {}
    if a.recipes:
        val_ids = np.setdiff1d(np.arange(n - min(5000, n // 6), n), labelled)
        x_val, y_val = x_train[val_ids], y_train[val_ids]
        seeds = [s.seed + i for i in range(a.recipe_seeds)]

        def kd_at(t: float, al: float) -> Callable[[torch.Tensor, dict[str, Any]], torch.Tensor]:
            def loss(logits: torch.Tensor, b: dict[str, Any]) -> torch.Tensor:
                return losses.kd_loss(
                    logits, b["teacher_log_probs"], temperature=t, alpha=al, labels_B=b["labels"]
                )

            return loss

        def soft(entry: Any, t: float) -> kdcache.SoftTargetDataset:
            return kdcache.SoftTargetDataset(
                entry,
                kd_data(),
                batch_size=batch,
                seed=s.seed,
                temperature=t,
                retemper=t != cache.temperature,
            )

        def batches_and_loss(kind: str, t: float | None, al: float | None) -> tuple[Any, Any]:
            if kind == "hard":
                src = ShardedStream(
                    train_mem.subset(labelled, num_shards=1), batch_size=batch, seed=s.seed
                )
                return _batches(src), lambda lg, b: losses.cross_entropy(lg, b["labels"])
            assert t is not None and al is not None
            if kind == "kd":
                return _batches(soft(cache, t)), kd_at(t, al)
            if kind == "dkd":
                return _batches(soft(cache, t)), _dkd_loss(t, al)
            rule = kind.removeprefix("kd ")  # a per-sample rule over the same entries
            return _ruled([soft(e, t) for e in cache.entries], rule, routes), kd_at(t, al)

        def study_row(kind: str, t: float | None, al: float | None, lr: float, sch: str) -> None:
            tests, vals, secs = [], [], 0.0
            for seed in seeds:
                src_batches, fn = batches_and_loss(kind, t, al)
                acc, val, sec = train(
                    src_batches,
                    fn,
                    steps,
                    s,
                    x_test,
                    y_test,
                    lr=lr,
                    schedule=sch,
                    seed=seed,
                    x_val=x_val,
                    y_val=y_val,
                )
                tests.append(acc)
                vals.append(val)
                secs += sec
            study.append(
                {
                    "kind": kind,
                    "temperature": t,
                    "alpha": al,
                    "lr": lr,
                    "schedule": sch,
                    "val_accuracy": float(np.mean(vals)),
                    "test_accuracy": float(np.mean(tests)),
                    "test_accuracies": tests,
                    "train_s": secs,
                }
            )
            r = study[-1]
            log.info(
                "recipe %s tau %s alpha %s lr %g %s: val %.4f, test %.4f",
                kind,
                t,
                al,
                lr,
                sch,
                r["val_accuracy"],
                r["test_accuracy"],
            )

        for lr in (s.lr, 0.01):
            for sch in ("constant", "warmup_cosine"):
                study_row("hard", None, None, lr, sch)
        for t, al in ((1.0, 1.0), (1.0, 0.9), (1.5, 1.0), (2.0, 0.9), (tau, alpha)):
            for lr in (0.01, 0.02):
                study_row("kd", t, al, lr, "warmup_cosine")
        for kind in ("hard", "kd"):
            best_r = max((r for r in study if r["kind"] == kind), key=lambda r: r["val_accuracy"])
            what = (
                f"lr {best_r['lr']:g} {best_r['schedule']}"
                if kind == "hard"
                else f"tau {best_r['temperature']:g}, alpha {best_r['alpha']:g}, "
                f"lr {best_r['lr']:g} {best_r['schedule']}"
            )
            name = f"{'hard labels' if kind == 'hard' else 'KD mean_probs'}, tuned ({what})"
            tuned[kind] = Row(
                name,
                best_r["test_accuracy"],
                0 if kind == "hard" else cache.num_bytes,
                0.0,
                best_r["train_s"],
            )
        # the other parts, each with the chosen KD recipe (the same seeds)
        kd_best = max((r for r in study if r["kind"] == "kd"), key=lambda r: r["val_accuracy"])
        t_b, al_b, lr_b = kd_best["temperature"], kd_best["alpha"], kd_best["lr"]
        for kind in (*(f"kd {r}" for r in RULES), "dkd"):
            study_row(kind, t_b, al_b, lr_b, "warmup_cosine")
            rec = study[-1]
            label = "DKD" if kind == "dkd" else f"KD {kind.removeprefix('kd ')}"
            tuned[kind] = Row(
                f"{label}, the same recipe",
                rec["test_accuracy"],
                cache.num_bytes,
                0.0,
                rec["train_s"],
            )

    # -- report ---------------------------------------------------------------------------------
    hard_acc = rows[0].test_accuracy
    span = ensemble_acc - hard_acc
    for r in rows:
        r.gap_closed = (r.test_accuracy - hard_acc) / span if span > 0 else float("nan")
    if tuned:
        t_hard = tuned["hard"].test_accuracy
        t_span = ensemble_acc - t_hard
        for r in tuned.values():
            r.gap_closed = (r.test_accuracy - t_hard) / t_span if t_span > 0 else float("nan")
    print()
    print(
        f"Fashion-MNIST, {n:,} training images, {s.student_labels:,} labels, student MLP "
        f"784-16-10, {steps:,} steps of {batch}, tau={tau}, alpha={alpha}"
    )
    print(
        "teachers: "
        + ", ".join(f"{k} {v:.4f}" for k, v in teacher_accs.items())
        + f"; ensemble (mean_probs) {ensemble_acc:.4f}"
    )
    print(_table(rows))
    if tuned:
        print()
        print(
            f"recipe study ({len(study)} recipes x {a.recipe_seeds} seeds, each chosen by "
            f"accuracy on {len(x_val):,} held-out training images, never the test set; "
            "gap closed against the tuned hard-label student):"
        )
        print(_table(list(tuned.values())))
        print(_study_table(study))
    candidates = [*rows[1:], *(r for k, r in tuned.items() if k != "hard")]
    best = max(candidates, key=lambda r: r.gap_closed)
    by_name = {r.name: r for r in rows}
    figures: dict[str, Any] = {
        "ensemble_test_accuracy": ensemble_acc,
        "hard_test_accuracy": hard_acc,
        "student_steps": steps,
        "num_images": n,
        "teachers_s": teachers_s,
        "total_s": time.perf_counter() - t_all,
    }
    if tuned:
        figures["tuned_hard_test_accuracy"] = tuned["hard"].test_accuracy
        figures["tuned_kd_test_accuracy"] = tuned["kd"].test_accuracy
        figures["tuned_kd_gap_closed"] = tuned["kd"].gap_closed
        figures["tuned_kd_recipe"] = tuned["kd"].name
        figures["recipe_study"] = study
    for r in rows:
        key = r.name.lower().replace(" + ", "_").replace(" ", "_").replace("=", "")
        figures[f"{key}_test_accuracy"] = r.test_accuracy
        figures[f"{key}_gap_closed"] = r.gap_closed
        figures[f"{key}_cache_bytes"] = r.cache_bytes
        figures[f"{key}_train_s"] = r.train_s
    ratios: dict[str, Any] = {"best_gap_closed": best.gap_closed}
    print()
    print(f"best_gap_closed: {best.gap_closed:.3f} ({best.name}; goal >= 0.6)")
    top = max(views_k) if views_k else None
    if top is not None and f"KD views K={top}" in by_name:
        pts = 100 * (
            by_name[f"KD views K={top}"].test_accuracy - by_name["online KD + aug"].test_accuracy
        )
        figures[f"views{top}_minus_online_aug_points"] = pts
        print(f"views{top}_minus_online_aug_points: {pts:+.2f} (goal >= -0.5)")
    for k, info in views_info.items():
        figures[f"views{k}_entry_bytes"] = info["bytes"]
        figures[f"views{k}_images_x_views_per_s"] = info["images_x_views_per_s"]
        rate = info["images_x_views_per_s"]
        print(
            f"K={k} view cache of {n:,} images: {info['bytes'] / 1e6:,.1f} MB (3 teachers), "
            + (
                f"teacher stage {info['build_s']:.0f} s = {rate:,.0f} images x views per s"
                if info["build_s"]
                else "a cache hit (delete it to time the teacher stage)"
            )
        )
    print(f"total wall time {figures['total_s']:.0f} s (teachers {teachers_s:.0f} s)")
    out = {"name": "quality", "figures": figures, "ratios": ratios}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


def _class_routes(teachers: Any, x_labelled: np.ndarray, y_labelled: np.ndarray) -> dict[int, int]:
    """Class -> the teacher most accurate on the labelled images of that class (ties: the
    first), the fixed gate of the ``route`` rule."""
    correct = np.stack(
        [(t.logits(x_labelled).argmax(1).numpy() == y_labelled) for t in teachers]
    )  # [K, L]
    routes = {}
    for c in range(10):
        here = y_labelled == c
        routes[c] = int(np.argmax(correct[:, here].mean(1))) if here.any() else 0
    return routes


def _ruled(per_entry: list[Any], rule: str, routes: dict[int, int]) -> Iterator[dict[str, Any]]:
    """Batches of K single-teacher streams (same seed, same order) combined by ``rule``."""
    iters = [_batches(st) for st in per_entry]
    while True:
        parts = [next(it) for it in iters]
        first = parts[0]
        for other in parts[1:]:
            assert torch.equal(other["sample_id"], first["sample_id"])
        logp_KBV = torch.stack([b["teacher_log_probs"] for b in parts])
        kwargs: dict[str, Any] = {}
        if rule == "best_on_label":
            kwargs["labels_B"] = first["labels"]
        elif rule == "route":
            predicted = targets.combine_ensemble(logp_KBV, rule="mean_probs").argmax(-1)
            kwargs.update(route_keys_B=predicted, routes=routes)
        combined = targets.combine_ensemble(logp_KBV, rule=rule, **kwargs)
        yield {**first, "teacher_log_probs": combined}


def _online(
    stream: ShardedStream, ensemble: kdcache.TeacherEnsemble, tau: float
) -> Iterator[dict[str, Any]]:
    """The base stream, each sample augmented afresh every epoch (view = epoch of a seed
    of its own), the teachers run on the augmented batch."""
    epoch = 0
    while True:
        for b in stream:
            ids = b["sample_id"].numpy()
            rng = ViewRandom(ONLINE_SEED, ids, np.full(len(ids), epoch, np.int64))
            params = AUGMENTATION.draw(rng, where="online batch")
            images = AUGMENTATION.apply(b["inputs"].numpy(), params, where="online batch")
            inputs = torch.from_numpy(np.ascontiguousarray(images))
            yield {**b, "inputs": inputs, "teacher_log_probs": ensemble.log_probs(inputs, tau)}
        epoch += 1


def _dkd_loss(tau: float, alpha: float) -> Callable[[torch.Tensor, dict[str, Any]], torch.Tensor]:
    def loss(logits: torch.Tensor, b: dict[str, Any]) -> torch.Tensor:
        labels = b["labels"]
        target = torch.where(
            labels == losses.IGNORE_INDEX, b["teacher_log_probs"].argmax(-1), labels
        )
        dkd = losses.dkd_loss(
            logits, b["teacher_log_probs"], labels_B=target, temperature=tau, ce_weight=0.0
        )
        return alpha * dkd + (1 - alpha) * losses.cross_entropy(logits, labels)

    return loss


def _study_table(study: list[dict[str, Any]]) -> str:
    head = ("recipe", "val acc", "test acc", "seeds' test acc")
    body = []
    for r in study:
        label = {"hard": "hard", "kd": "KD", "dkd": "DKD"}.get(r["kind"])
        if label is None:  # "kd <rule>"
            label = "KD " + r["kind"].removeprefix("kd ")
        what = label
        if r["kind"] != "hard":
            what += f" tau {r['temperature']:g} alpha {r['alpha']:g}"
        body.append(
            (
                f"{what}, lr {r['lr']:g} {r['schedule']}",
                f"{r['val_accuracy']:.4f}",
                f"{r['test_accuracy']:.4f}",
                " ".join(f"{x:.4f}" for x in r["test_accuracies"]),
            )
        )
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in [head, *body]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _table(rows: list[Row]) -> str:
    head = ("row", "test acc", "gap closed", "cache bytes", "build s", "train s")
    body = [
        (
            r.name,
            f"{r.test_accuracy:.4f}",
            f"{r.gap_closed:+.3f}",
            f"{r.cache_bytes:,}",
            f"{r.build_s:.1f}",
            f"{r.train_s:.1f}",
        )
        for r in rows
    ]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    fmt = [lambda c, w: c.ljust(w)] + [lambda c, w: c.rjust(w)] * (len(head) - 1)
    lines = [
        "  ".join(f(c, w) for f, c, w in zip(fmt, line, widths, strict=True))
        for line in [head, *body]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    main()
