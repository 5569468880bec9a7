"""Language-model distillation on real English text: the Debian ``fortunes`` corpus.

Run it as ``kdcache demo fortunes-lm`` or ``python -m pipelines.lm_fortunes``.

1. Read the fortunes records (stable ``sample_id`` per file and record), split them into
   training and validation by a hash of the id, and train a byte-level BPE tokenizer
   (Hugging Face tokenizers) on the training records.
2. Train (or reuse) an ensemble of GPT-2-style teachers of different sizes and seeds on
   the training text, saved with ``save_pretrained`` next to the tokenizer, and describe
   them as ``kdcache.TeacherSpec.hf`` (tokenizer files in the fingerprint), loaded where
   they run, as ``kdcache build`` does.
3. Teacher stage (Ray by default): per-token targets of every teacher over the training
   sequences, cached twice: top-k with the exact log-partition and tail, and sampled ids
   with counts (Anshumann et al. 2025). A rerun is a cache hit.
4. Student stage (DeepSpeed): the same small GPT-2 student trained three ways with the
   same steps and seed: hard labels (next-token cross-entropy), the top-k cache (the two
   teachers combined by mean of probabilities) and the sampled cache (sum of the two
   teachers' losses). With ``--seq-kd`` a fourth student trains on text the teachers
   generated for training prompts, with those texts' per-token targets (Kim and Rush 2016).
5. Report: validation perplexity of every model, cache bytes per token for each
   sparsification, and the wall time of each stage (terminal table and JSON).
6. Configs: the teacher stages and the students as ``kdcache build`` / ``kdcache train``
   files in the work directory (``build.yaml``, ``train.yaml``, ...; see ``docs/lm.md``),
   which reproduce them: the same cache keys, the same students.
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
from kdcache.build.stage import build_cache
from kdcache.data.tokens import TokenDataset, encode_texts, tokenizer_files_sha256
from kdcache.errors import KDCacheError, require
from kdcache.executors import get_executor
from kdcache.losses.kd import token_distill_loss
from kdcache.stores.view import as_view
from kdcache.stream import ShardedStream, SoftTargetDataset, check_student_vocabulary
from kdcache.teachers.generate import generate_continuations
from kdcache.teachers.loaders import HFLogits
from kdcache.train.evaluate import evaluate_perplexity
from kdcache.train.loop import train_student
from pipelines.bpe import save_tokenizer, train_bpe_tokenizer
from pipelines.common import add_executor_args, executor_from_args
from pipelines.corpora import FORTUNES_DIR, read_fortunes, split_by_id

log = logging.getLogger("kdcache.demo")

PAD, EOS = "<|pad|>", "<|endoftext|>"
PAD_ID, EOS_ID = 0, 1

TEACHERS: list[dict[str, Any]] = [
    {"name": "gpt-a", "n_layer": 3, "n_embd": 96, "n_head": 4, "seed": 1},
    {"name": "gpt-b", "n_layer": 2, "n_embd": 64, "n_head": 4, "seed": 2},
]
STUDENT: dict[str, Any] = {"n_layer": 2, "n_embd": 32, "n_head": 2}
#: A padded output layer (a multiple of 64, as many LMs do); kdcache trims it to V.
LOGIT_MULTIPLE = 64


@dataclass
class Settings:
    fortunes_dir: str
    work_dir: str
    cache_root: str
    report: str
    executor: kdcache.ExecutorConfig
    num_shards: int
    subset: int | None
    vocab_size: int
    max_tokens: int
    temperature: float
    alpha: float
    top_k: int
    num_samples: int
    storage_dtype: str
    teacher_steps: int
    student_steps: int
    batch_size: int
    lr: float
    seq_kd: bool
    num_prompts: int
    prompt_tokens: int
    new_tokens: int
    seed: int
    progress: bool
    threads: int = 1


def parse_args(argv: list[str] | None = None) -> Settings:
    p = argparse.ArgumentParser(
        prog="kdcache demo fortunes-lm",
        description="Distil an ensemble of GPT-2-style teachers into a small student on the "
        "fortunes corpus through per-token top-k and sampled caches.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--fortunes-dir", default=FORTUNES_DIR, help="fortunes text files")
    p.add_argument("--work-dir", default="runs/lm-fortunes", help="teachers, cache, report")
    p.add_argument("--cache-root", default=None, help="cache root (default WORK_DIR/cache)")
    p.add_argument("--report", default=None, help="JSON report (default WORK_DIR/report.json)")
    add_executor_args(p)
    p.add_argument("--num-shards", type=int, default=8)
    p.add_argument(
        "--subset",
        type=int,
        default=0,
        help="use the first N records only (0: all ~15,000)",
    )
    p.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary size V")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens kept per record")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature tau")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the distillation term")
    p.add_argument("--top-k", type=int, default=16, help="k of the top-k cache")
    p.add_argument("--num-samples", type=int, default=32, help="draws per token (sampled)")
    p.add_argument("--storage-dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--teacher-steps", type=int, default=1000)
    p.add_argument("--student-steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32, help="sequences per step")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (all models)")
    p.add_argument("--seq-kd", action="store_true", help="also a sequence-level KD student")
    p.add_argument("--num-prompts", type=int, default=512, help="prompts for --seq-kd")
    p.add_argument("--prompt-tokens", type=int, default=8, help="prompt length for --seq-kd")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny settings for tests (~2 min)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads in this process; 1 is the robust choice on a shared 2-core "
        "machine (2 threads measured 10x slower per step with other jobs running)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    a = p.parse_args(argv)
    if a.quick:
        a.subset = min(a.subset or 600, 600)
        a.vocab_size = min(a.vocab_size, 512)
        a.max_tokens = min(a.max_tokens, 48)
        a.teacher_steps = min(a.teacher_steps, 30)
        a.student_steps = min(a.student_steps, 20)
        a.num_shards = min(a.num_shards, 4)
        a.num_prompts = min(a.num_prompts, 32)
        a.new_tokens = min(a.new_tokens, 8)
    work = a.work_dir
    return Settings(
        fortunes_dir=a.fortunes_dir,
        work_dir=work,
        cache_root=a.cache_root or os.path.join(work, "cache"),
        report=a.report or os.path.join(work, "report.json"),
        executor=executor_from_args(p, a, batch_size=64),
        num_shards=a.num_shards,
        subset=a.subset,
        vocab_size=a.vocab_size,
        max_tokens=a.max_tokens,
        temperature=a.temperature,
        alpha=a.alpha,
        top_k=a.top_k,
        num_samples=a.num_samples,
        storage_dtype=a.storage_dtype,
        teacher_steps=a.teacher_steps,
        student_steps=a.student_steps,
        batch_size=a.batch_size,
        lr=a.lr,
        seq_kd=a.seq_kd,
        num_prompts=a.num_prompts,
        prompt_tokens=a.prompt_tokens,
        new_tokens=a.new_tokens,
        seed=a.seed,
        progress=not a.no_progress,
        threads=a.threads,
    )


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def ds_config(lr: float, batch_size: int, steps: int) -> dict[str, Any]:
    """CPU DeepSpeed config: AdamW (torch), linear warm-up then linear decay."""
    return {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": lr, "weight_decay": 0.01, "torch_adam": True},
        },
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {
                "total_num_steps": max(steps, 2),
                "warmup_num_steps": max(1, steps // 20),
                "warmup_max_lr": lr,
                "warmup_min_lr": 0.0,
                "warmup_type": "linear",
            },
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def gpt2(arch: dict[str, Any], vocab_size: int, n_positions: int) -> torch.nn.Module:
    transformers = require("transformers", "hf")
    padded = -(-vocab_size // LOGIT_MULTIPLE) * LOGIT_MULTIPLE
    cfg = transformers.GPT2Config(
        vocab_size=padded,
        n_positions=n_positions,
        n_embd=arch["n_embd"],
        n_layer=arch["n_layer"],
        n_head=arch["n_head"],
        bos_token_id=EOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        # Exact GELU is one fused op; GPT-2's tanh form ("gelu_new") is several, and cost
        # a third of a CPU forward pass here.
        activation_function="gelu",
    )
    return transformers.GPT2LMHeadModel(cfg)


def prepare_data(s: Settings) -> dict[str, Any]:
    """Records, split, tokenizer (trained on the training split) and token datasets."""
    return load_data(
        fortunes_dir=s.fortunes_dir,
        work_dir=s.work_dir,
        subset=s.subset,
        vocab_size=s.vocab_size,
        max_tokens=s.max_tokens,
        num_shards=s.num_shards,
    )


def data_kwargs(s: Settings) -> dict[str, Any]:
    """The keyword arguments of :func:`fortunes_dataset` for this run's data."""
    return {
        "fortunes_dir": os.path.abspath(s.fortunes_dir),
        "work_dir": os.path.abspath(s.work_dir),
        "subset": s.subset or 0,
        "vocab_size": s.vocab_size,
        "max_tokens": s.max_tokens,
        "num_shards": s.num_shards,
    }


def fortunes_dataset(split: str, **kwargs: Any) -> TokenDataset:
    """One split (``"train"`` or ``"validation"``) of the demo's token data, for configs
    (``dataset: {factory: "pipelines.lm_fortunes:fortunes_dataset", kwargs: {...}}``):
    the same records, tokenizer and sequences as the demo (the same fingerprint, so the
    same cache keys). ``kwargs``: those of :func:`load_data`."""
    splits = {"train": "train", "validation": "val"}
    if split not in splits:
        raise ValueError(f"split must be one of {sorted(splits)}, got {split!r}")
    dataset: TokenDataset = load_data(**kwargs)[splits[split]]
    return dataset


def load_data(
    *,
    fortunes_dir: str,
    work_dir: str,
    subset: int | None,
    vocab_size: int,
    max_tokens: int,
    num_shards: int,
) -> dict[str, Any]:
    """Records, split, tokenizer (trained on the training split, or reused from
    ``WORK_DIR/tokenizer/``) and the training and validation token datasets."""
    records = read_fortunes(fortunes_dir)
    if subset:
        records = records[:subset]
    ids = np.array([r[0] for r in records], np.int64)
    is_val = split_by_id(ids, 0.05)
    train_recs = [r for r, v in zip(records, is_val, strict=True) if not v]
    val_recs = [r for r, v in zip(records, is_val, strict=True) if v]
    tok_dir = os.path.join(work_dir, "tokenizer", f"bpe{vocab_size}-{_hash(ids.tolist())}")
    tokenizers = require("tokenizers", "hf")
    if os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        tok = tokenizers.Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
    else:
        tok = train_bpe_tokenizer([t for _, t in train_recs], vocab_size)
        save_tokenizer(tok, tok_dir, pad_token=PAD, eos_token=EOS)
    vocab = tok.get_vocab_size()
    prep = {
        "source": "debian fortunes",
        "tokenizer_files_sha256": tokenizer_files_sha256(tok_dir),
        "vocab_size": vocab,
    }
    common = dict(max_tokens=max_tokens, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    train = encode_texts(
        tok, train_recs, num_shards=num_shards, preprocessing={**prep, "split": "train"}, **common
    )
    val = encode_texts(
        tok, val_recs, num_shards=1, preprocessing={**prep, "split": "validation"}, **common
    )
    return {"tokenizer": tok, "tok_dir": tok_dir, "vocab": vocab, "train": train, "val": val}


def train_or_load_teacher(spec: dict[str, Any], data: dict[str, Any], s: Settings) -> str:
    """Reuse ``WORK_DIR/teachers/<name>-<hash>/`` or train the teacher and save it there."""
    cfg = {
        **spec,
        "vocab": data["vocab"],
        "steps": s.teacher_steps,
        "lr": s.lr,
        "batch": s.batch_size,
        "train": data["train"].fingerprint()["shards"][0]["sha256"],
    }
    path = os.path.join(s.work_dir, "teachers", f"{spec['name']}-{_hash(cfg)}")
    if os.path.exists(os.path.join(path, "config.json")):
        log.info("teacher %s: reusing %s", spec["name"], path)
        return path
    torch.manual_seed(spec["seed"])
    model = gpt2(spec, data["vocab"], s.max_tokens)
    stream = ShardedStream(data["train"], batch_size=s.batch_size, seed=spec["seed"])
    module = HFLogits(model, PAD_ID, data["vocab"])
    train_student(
        module,
        stream,
        lambda logits, b: token_distill_loss(logits, b, temperature=1.0, alpha=0.0),
        ds_config=ds_config(s.lr, s.batch_size, s.teacher_steps),
        max_steps=s.teacher_steps,
        progress=s.progress,
        desc=f"teacher {spec['name']}",
    )
    model.save_pretrained(path)
    save_tokenizer(data["tokenizer"], path, pad_token=PAD, eos_token=EOS)
    return path


def teacher_specs(paths: list[str]) -> list[kdcache.TeacherSpec]:
    """The teachers of :data:`TEACHERS` (model directories ``paths``, in that order) as
    the specs that ``teachers: [{name, hf, task: causal-lm}]`` of build.yaml makes: the
    same fingerprints, so the same cache keys as ``kdcache build``."""
    return [
        kdcache.TeacherSpec.hf(spec["name"], p, task="causal-lm")
        for p, spec in zip(paths, TEACHERS, strict=True)
    ]


def _build(
    s: Settings,
    dataset: Any,
    ensemble: Any,
    kind: str,
    params: dict[str, Any],
    executor: Any = None,
) -> Any:
    """One teacher-stage build; ``executor`` (one per job, its actors kept) or a new one
    from ``s.executor``."""
    return build_cache(
        dataset,
        ensemble,
        temperature=s.temperature,
        root=s.cache_root,
        storage_dtype=s.storage_dtype,
        executor=s.executor if executor is None else executor,
        progress=s.progress,
        kind=kind,
        params=params,
    )


def _cache_facts(name: str, cache: Any, num_tokens: int) -> dict[str, Any]:
    entries = as_view(cache).entries
    per_teacher = cache.num_bytes / max(len(entries), 1)
    return {
        "name": name,
        "key": cache.key,
        "kind": entries[0].target_spec.kind,
        "params": dict(entries[0].target_spec.params or ()),
        "storage_dtype": entries[0].target_spec.storage_dtype,
        "teachers": len(entries),
        "hit": bool(cache.build_report.hit),
        "bytes": int(cache.num_bytes),
        "tokens": int(num_tokens),
        "bytes_per_token": per_teacher / max(num_tokens, 1),
        "dense_fp32_bytes_per_token": 4 * entries[0].vocab_size,
    }


def run(s: Settings) -> dict[str, Any]:
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    tic = time.perf_counter()
    data = prepare_data(s)
    train, val, vocab = data["train"], data["val"], data["vocab"]
    timings["data+tokenizer"] = time.perf_counter() - tic
    log.info(
        "fortunes: %d training sequences (%d target tokens), %d validation; V=%d",
        len(train),
        train.num_targets,
        len(val),
        vocab,
    )

    tic = time.perf_counter()
    paths = [train_or_load_teacher(spec, data, s) for spec in TEACHERS]
    timings["teachers (train)"] = time.perf_counter() - tic
    # The teacher stage gets the teachers as specs (a model directory each), loaded where
    # they run, as `kdcache build` does with `hf:` teachers: the same keys as build.yaml.
    specs = teacher_specs(paths)
    ensemble = kdcache.TeacherEnsemble(specs, rule="mean_probs")
    teachers = [t.load() for t in specs]  # for perplexities and generation here

    # one executor for every build of the job: its Ray actors are started once
    executor = get_executor(s.executor)
    caches: dict[str, Any] = {}
    try:
        tic = time.perf_counter()
        caches["topk"] = _build(s, train, ensemble, "topk", {"k": s.top_k}, executor=executor)
        timings["teacher stage: top-k"] = time.perf_counter() - tic
        tic = time.perf_counter()
        caches["sampled"] = _build(
            s,
            train,
            ensemble,
            "sampled",
            {"num_samples": s.num_samples, "seed": s.seed},
            executor=executor,
        )
        timings["teacher stage: sampled"] = time.perf_counter() - tic
        seq_data = None
        if s.seq_kd:
            tic = time.perf_counter()
            seq_data = sequence_kd_data(s, train, teachers, vocab)
            caches["seq-kd top-k"] = _build(
                s, seq_data, ensemble, "topk", {"k": s.top_k}, executor=executor
            )
            timings["teacher stage: seq-kd (generate + top-k)"] = time.perf_counter() - tic
    finally:
        executor.close()

    student_sha = tokenizer_files_sha256(data["tok_dir"])
    models: list[dict[str, Any]] = []
    for t in teachers:
        ppl = evaluate_perplexity(t.logits, val, vocab_size=vocab)
        models.append(
            {"name": t.name, "role": "teacher", "num_parameters": t.num_parameters, **ppl}
        )
    ens = evaluate_perplexity(_ensemble_logits(teachers), val, vocab_size=vocab)
    num_params = sum(t.num_parameters for t in teachers)
    models.append({"name": "ensemble", "role": "ensemble", "num_parameters": num_params, **ens})
    student_dir = write_student_config(s, vocab)
    configs = write_configs(s, paths, caches, data["tok_dir"], student_dir)

    runs: list[tuple[str, Any, Any]] = [
        ("student-hard", None, train),
        ("student-topk", caches["topk"], train),
        ("student-sampled", caches["sampled"], train),
    ]
    if s.seq_kd:
        runs.append(("student-seqkd", caches["seq-kd top-k"], seq_data))
    for name, cache, dataset in runs:
        tic = time.perf_counter()
        if cache is not None:
            check_student_vocabulary(cache, vocab_size=vocab, tokenizer_sha256=student_sha)
        torch.manual_seed(s.seed)
        model = gpt2(STUDENT, vocab, student_n_positions(s))
        module = HFLogits(model, PAD_ID, vocab)
        order = {"batch_size": s.batch_size, "seed": s.seed}
        stream = (
            ShardedStream(dataset, **order)  # hard labels: the same order, no targets
            if cache is None
            else SoftTargetDataset(cache, dataset, **order)
        )
        alpha = 0.0 if cache is None else s.alpha

        def loss_fn(logits: torch.Tensor, b: dict[str, Any], alpha: float = alpha) -> torch.Tensor:
            return token_distill_loss(logits, b, temperature=s.temperature, alpha=alpha)

        module, result = train_student(
            module,
            stream,
            loss_fn,
            ds_config=ds_config(s.lr, s.batch_size, s.student_steps),
            max_steps=s.student_steps,
            progress=s.progress,
            desc=name,
        )
        ppl = evaluate_perplexity(module, val, vocab_size=vocab)
        models.append(
            {
                "name": name,
                "role": "student",
                "num_parameters": sum(p.numel() for p in module.parameters()),
                "steps": result.steps,
                "final_train_loss": float(np.mean(result.losses[-20:])),
                **ppl,
            }
        )
        timings[f"student: {name}"] = time.perf_counter() - tic

    cache_rows = [
        _cache_facts(f"top-k (k={s.top_k})", caches["topk"], train.num_targets),
        _cache_facts(f"sampled (n={s.num_samples})", caches["sampled"], train.num_targets),
    ]
    if seq_data is not None:
        cache_rows.append(
            _cache_facts(
                f"seq-kd top-k (k={s.top_k})", caches["seq-kd top-k"], seq_data.num_targets
            )
        )
    timings["total"] = time.perf_counter() - t0
    report = {
        "name": "lm-fortunes",
        "settings": asdict(s),
        "data": {
            "train_sequences": len(train),
            "train_target_tokens": train.num_targets,
            "validation_sequences": len(val),
            "validation_tokens": int(models[0]["tokens"]),
            "vocab_size": vocab,
        },
        "models": models,
        "caches": cache_rows,
        "student_steps": s.student_steps,
        "configs": configs,
        "timings_s": timings,
    }
    os.makedirs(os.path.dirname(os.path.abspath(s.report)), exist_ok=True)
    with open(s.report, "w") as f:
        json.dump(report, f, indent=2)
    return report


def _abs(uri: str) -> str:
    return uri if "://" in uri else os.path.abspath(uri)


def student_n_positions(s: Settings) -> int:
    """The student's context: the training sequences, plus the generated tokens of
    ``--seq-kd``."""
    return s.max_tokens + (s.new_tokens if s.seq_kd else 0)


def write_student_config(s: Settings, vocab: int) -> str:
    """Write WORK_DIR/student/config.json: the student's GPT-2 config, which
    ``student: {hf_config: ...}`` of a train config builds (the same initial weights
    under the same seed as :func:`gpt2`). Returns the directory."""
    directory = os.path.join(s.work_dir, "student")
    cfg = gpt2(STUDENT, vocab, student_n_positions(s)).config
    cfg.save_pretrained(directory)
    return directory


def write_configs(
    s: Settings, paths: list[str], caches: dict[str, Any], tok_dir: str, student_dir: str
) -> dict[str, str]:
    """Write this run's stages as ``kdcache build`` / ``kdcache train`` configs into
    WORK_DIR: ``build.yaml`` (the top-k cache), ``build-sampled.yaml``, and
    ``train.yaml`` (the top-k student), ``train-sampled.yaml`` and ``train-hard.yaml``.
    ``kdcache build`` on a build config is a cache hit on this run's entries (the same
    keys); ``kdcache train`` on a train config trains the same student (initial
    weights, sample order, loss, optimizer and steps) to the same validation
    perplexity. Returns ``{name: path}``."""
    import yaml

    dataset = {
        "factory": "pipelines.lm_fortunes:fortunes_dataset",
        "kwargs": {"split": "train", **data_kwargs(s)},
    }
    eval_dataset = {**dataset, "kwargs": {**dataset["kwargs"], "split": "validation"}}
    teachers = [
        {"name": spec["name"], "hf": os.path.abspath(p), "task": "causal-lm"}
        for p, spec in zip(paths, TEACHERS, strict=True)
    ]
    executor = {
        "kind": s.executor.kind,
        "address": s.executor.address,
        "num_actors": s.executor.num_actors,
        "batch_size": s.executor.batch_size,
    }
    targets = {
        "topk": {"kind": "topk", "params": {"k": s.top_k}},
        "sampled": {"kind": "sampled", "params": {"num_samples": s.num_samples, "seed": s.seed}},
    }
    written: dict[str, str] = {}

    def dump(name: str, title: str, command: str, config: dict[str, Any]) -> None:
        path = os.path.join(s.work_dir, name)
        with open(path, "w") as f:
            f.write(f"# {title} of `kdcache demo fortunes-lm`.\n")
            f.write(f"# Rerun it with: kdcache {command} {os.path.abspath(path)}\n")
            yaml.safe_dump(config, f, sort_keys=False)
        written[name] = path

    for kind, name in (("topk", "build.yaml"), ("sampled", "build-sampled.yaml")):
        dump(
            name,
            f"The {kind} teacher stage",
            "build",
            {
                "root": _abs(s.cache_root),
                "alias": f"fortunes-lm-{kind}",
                "dataset": dataset,
                "teachers": teachers,
                "ensemble": {"rule": "mean_probs"},
                "targets": {
                    "temperature": s.temperature,
                    **targets[kind],
                    "storage_dtype": s.storage_dtype,
                },
                "executor": executor,
            },
        )
    for role, name in (
        ("topk", "train.yaml"),
        ("sampled", "train-sampled.yaml"),
        ("hard", "train-hard.yaml"),
    ):
        config: dict[str, Any] = {
            "output_dir": os.path.abspath(os.path.join(s.work_dir, "students", role)),
            "student": {
                "hf_config": os.path.abspath(student_dir),
                "tokenizer": os.path.abspath(tok_dir),
            },
            "dataset": dataset,
            "eval_dataset": eval_dataset,
        }
        if role != "hard":
            config["cache"] = {"uri": caches[role].key, "root": _abs(s.cache_root)}
        config.update(
            {
                "deepspeed": ds_config(s.lr, s.batch_size, s.student_steps),
                "loss": {
                    "kind": "forward_kl",
                    "temperature": s.temperature,
                    "alpha": 0.0 if role == "hard" else s.alpha,
                },
                "stream": {"global_batch_size": s.batch_size},  # one rank: a batch a step
                "max_steps": s.student_steps,
                "seed": s.seed,
                "tensorboard": False,
            }
        )
        dump(name, f"The student-{role}", "train", config)
    return written


def _ensemble_logits(teachers: list[kdcache.Teacher]) -> Any:
    """input_ids -> log of the mean of the teachers' probabilities (a valid logit)."""

    def fn(ids: torch.Tensor) -> torch.Tensor:
        lp = torch.stack([torch.log_softmax(t.logits(ids), dim=-1) for t in teachers])
        return torch.logsumexp(lp, dim=0) - float(np.log(len(teachers)))

    return fn


def sequence_kd_data(
    s: Settings, train: TokenDataset, teachers: list[kdcache.Teacher], vocab: int
) -> TokenDataset:
    """Prompts (the first tokens of training records) continued by the teachers (greedy).

    Source: Kim and Rush, "Sequence-Level Knowledge Distillation", EMNLP 2016.
    """
    rng = np.random.default_rng(s.seed)
    pick = np.sort(rng.choice(len(train), size=min(s.num_prompts, len(train)), replace=False))
    prompts = TokenDataset.from_sequences(
        train.sample_ids[pick],
        [train.sequence(int(i))[: s.prompt_tokens] for i in pick],
        num_shards=min(s.num_shards, len(pick)),
        preprocessing={
            **train.preprocessing,
            "prompts_of": "train",
            "prompt_tokens": s.prompt_tokens,
        },
        pad_token_id=PAD_ID,
    )
    return generate_continuations(
        teachers,  # Teachers themselves: Hugging Face ones decode with their KV cache
        prompts,
        max_new_tokens=s.new_tokens,
        greedy=False,
        temperature=1.0,
        seed=s.seed,
        eos_token_id=EOS_ID,
        vocab_size=vocab,
        description={t.name: t.fingerprint()["weights_sha256"] for t in teachers},
    )


def format_report(report: dict[str, Any]) -> str:
    def table(rows: list[tuple[str, ...]]) -> list[str]:
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        out = [
            "  ".join(
                c.ljust(w) if i < 1 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
            for r in rows
        ]
        out.insert(1, "  ".join("-" * w for w in widths))
        return out

    rows = [("model", "role", "params", "val nll", "val ppl")]
    for m in report["models"]:
        rows.append(
            (
                m["name"],
                m["role"],
                f"{m['num_parameters']:,}",
                f"{m['nll']:.4f}",
                f"{m['perplexity']:.2f}",
            )
        )
    lines = table(rows)
    rows = [("cache", "teachers", "hit", "bytes", "tokens", "bytes/token/teacher", "dense fp32")]
    for c in report["caches"]:
        rows.append(
            (
                c["name"],
                str(c["teachers"]),
                str(c["hit"]),
                f"{c['bytes']:,}",
                f"{c['tokens']:,}",
                f"{c['bytes_per_token']:.1f}",
                f"{c['dense_fp32_bytes_per_token']:,}",
            )
        )
    lines += ["", *table(rows), ""]
    rows = [("stage", "wall s")]
    rows += [(k, f"{v:.1f}") for k, v in report["timings_s"].items()]
    lines += table(rows)
    d = report["data"]
    lines += [
        "",
        f"data: {d['train_sequences']:,} training sequences ({d['train_target_tokens']:,} "
        f"target tokens), {d['validation_sequences']:,} validation sequences "
        f"({d['validation_tokens']:,} tokens), V={d['vocab_size']}; "
        f"student steps {report['student_steps']}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    settings = parse_args(argv)
    torch.set_num_threads(max(1, settings.threads))
    try:
        report = run(settings)
    except KDCacheError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print()
    print(format_report(report))
    print(f"\nreport written to {os.path.abspath(settings.report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
