"""The student-stage job: a typed train config run on this rank (DeepSpeed) or on Ray Train
workers: stream, loss, checkpoints, export and the summary."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import uuid
from typing import Any

import torch

from kdcache.data.base import dataset_layout
from kdcache.errors import ConfigError, require
from kdcache.local_ray import loopback_ray, starts_a_local_ray
from kdcache.stores.fs import Location
from kdcache.stores.view import as_view
from kdcache.teachers.loaders import HFLogits
from kdcache.train.distributed import (
    cpu_ds_config,
    data_parallel_normalizer,
    init_distributed,
    load_ds_config,
    prepare_ds_config,
)
from kdcache.train.evaluate import evaluate_classifier, evaluate_perplexity
from kdcache.train.export import save_pretrained_student, save_safetensors
from kdcache.train.loop import EvalCallback, LossFn, TrainResult, train_student
from kdcache.train.metrics import MetricsLogger, read_metrics
from kdcache.train.report import _report_int8, plot_curves

log = logging.getLogger(__name__)


def local_output_dir(output_dir: str) -> str:
    """The local directory a run with ``output_dir`` writes to.

    A local path or ``file://`` URI is itself (absolute). A remote URI (``s3://...``,
    see :data:`kdcache.jobs.config.REMOTE_SCHEMES`) gets a staging directory on this
    machine, the same for every rank and every rerun with that URI
    (``$TMPDIR/kdcache-output-<hash>``), because DeepSpeed writes its checkpoints to a
    local file system: checkpoints stay there (``--resume`` works on the same machine),
    and :func:`upload_outputs` copies the rest to the URI at the end.

    Args:
        output_dir: ``TrainConfig.output_dir``.

    Returns:
        An absolute local path (not created here).
    """
    import hashlib
    import tempfile

    loc = Location(output_dir)
    if loc.is_local:
        return loc.uri
    digest = hashlib.sha256(loc.uri.encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), f"kdcache-output-{digest}")


def upload_outputs(staging: str, output_dir: str, summary: dict[str, Any]) -> dict[str, Any]:
    """Copy a finished run's artefacts from ``staging`` to the remote ``output_dir``.

    Every file under ``staging`` except ``checkpoints/`` directories (DeepSpeed's, kept
    locally for ``--resume``) is copied to the same relative path: ``metrics.csv``,
    ``tensorboard/``, ``curves.png``, ``student.safetensors``, ``student-int8.pt``,
    ``hard/``. The caller writes ``summary.json`` itself.

    Args:
        staging: The local directory the run wrote (:func:`local_output_dir`).
        output_dir: The remote URI.
        summary: The run's summary; its paths under ``staging`` are rewritten.

    Returns:
        The summary with ``output_dir``, ``staging_dir`` and every path under
        ``staging`` given as its remote URI (without the URI's query options).
    """
    import pyarrow.fs as pafs

    dest = Location(output_dir)
    dest.makedirs()
    for directory, subdirs, files in os.walk(staging):
        subdirs[:] = sorted(d for d in subdirs if d != "checkpoints")
        for name in sorted(files):
            if name == "summary.json":
                continue
            rel = os.path.relpath(os.path.join(directory, name), staging).replace(os.sep, "/")
            pafs.copy_files(
                os.path.join(directory, name),
                f"{dest.path.rstrip('/')}/{rel}",
                source_filesystem=pafs.LocalFileSystem(),
                destination_filesystem=dest.fs,
            )

    def remote(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: remote(v) for k, v in value.items()}
        if isinstance(value, list):
            return [remote(v) for v in value]
        if isinstance(value, str) and value.startswith(staging + os.sep):
            return dest.display(os.path.relpath(value, staging).replace(os.sep, "/"))
        return value

    out: dict[str, Any] = remote(summary)
    out["output_dir"], out["staging_dir"] = dest.display(), staging
    return out


def _latest_step(checkpoint_dir: str) -> int | None:
    path = os.path.join(checkpoint_dir, "latest")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        tag = f.read().strip()
    return int(tag[4:]) if tag.startswith("step") and tag[4:].isdigit() else None


def token_eval_data(dataset: Any) -> Any:
    """A token dataset as an in-memory :class:`kdcache.data.tokens.TokenDataset`, which
    :func:`kdcache.train.evaluate.evaluate_perplexity` takes: itself when it is one,
    else every shard read once (a validation set: it is held in memory whole).

    Args:
        dataset: A ``ShardedDataset`` of layout ``"tokens"`` (e.g. a
            ``kdcache.data.text.TextDataset``).

    Returns:
        The same sequences, ids, prompt lengths and pad id, in shard order.
    """
    import numpy as np

    from kdcache.data.tokens import TokenDataset

    if isinstance(dataset, TokenDataset):
        return dataset
    ids, seqs, prompts = [], [], []
    for index in range(dataset.num_shards):
        shard = dataset.read_shard(index)
        offsets = shard["token_offsets"]
        ids.append(np.asarray(shard["sample_id"], dtype=np.int64))
        prompts.append(np.asarray(shard["prompt_lengths"], dtype=np.int64))
        seqs += [shard["tokens"][offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
    return TokenDataset.from_sequences(
        np.concatenate(ids),
        seqs,
        prompt_lengths=np.concatenate(prompts),
        num_shards=1,
        pad_token_id=int(getattr(dataset, "pad_token_id", 0)),
    )


def _load_tokenizer(path: str) -> Any:
    """A transformers tokenizer from a model directory or a ``tokenizer.json`` file."""
    from kdcache import quiet

    transformers = require("transformers", "hf")
    with quiet.hf_loading():
        if os.path.isdir(path):
            return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        return transformers.PreTrainedTokenizerFast(tokenizer_file=path)


def _is_hf_model(model: Any) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # no transformers: no Hugging Face model either
        return False
    return isinstance(model, PreTrainedModel)


@dataclasses.dataclass
class LMStudent:
    """The causal-LM student of a token-level ``kdcache train`` job: its tokenizer and
    how the module the config names is wrapped for the trainer.

    A transformers model (``student.hf_config``, ``student.hf``, or a factory returning
    one) is wrapped in :class:`kdcache.teachers.loaders.HFLogits` (input ids [B, T]
    int64 -> float32 logits [B, T, V], attention mask ``ids != pad``, columns beyond the
    tokenizer's V dropped), as the teachers are; any other module is used as it is.

    Attributes:
        tokenizer: The student's transformers tokenizer, or None (a factory's module
            without one).
        tokenizer_key: The config key that named it (for messages).
        vocab_size: V: the tokenizer's length, else the teachers', else None.
        tokenizer_sha256: SHA-256 of the tokenizer files (a directory), else None.
        pad_token_id: The tokenizer's pad id, or None (then the model config's).
    """

    tokenizer: Any
    tokenizer_key: str | None
    vocab_size: int | None
    tokenizer_sha256: str | None
    pad_token_id: int | None

    @classmethod
    def resolve(cls, cfg: Any, cache: Any) -> LMStudent:
        """The student's tokenizer and V for ``cfg``; checked against the teachers'.

        Args:
            cfg: The :class:`kdcache.jobs.config.TrainConfig`.
            cache: The entry or view distilled from, or None (hard labels alone).

        Raises:
            ConfigError: a Hugging Face student without a tokenizer; the tokenizer is
                missing; or its V or files differ from the teachers' (names the key).
        """
        from kdcache.data.tokens import tokenizer_files_sha256
        from kdcache.stream.join import check_student_vocabulary

        student = cfg.student
        path = student.tokenizer_path(cfg.dataset)
        if path is None:
            if student.is_hf:
                raise ConfigError(
                    "student.tokenizer: a Hugging Face student needs its tokenizer (its V, "
                    "its pad id and the files exported beside the weights); give "
                    "student.tokenizer (a tokenizer.json or a model directory), or a "
                    "dataset.text whose tokenizer it shares"
                )
            vocab = None
            if cache is not None:
                vocab = int(as_view(cache).entries[0].vocab_size)
            return cls(None, None, vocab, None, None)
        if student.tokenizer is not None:
            key = "student.tokenizer"
        elif path in (student.hf, student.hf_config):
            key = "student.hf" if path == student.hf else "student.hf_config"
        else:
            key = "dataset.text.tokenizer"
        from kdcache.jobs.config import tokenizer_file_error

        tokenizer_file_error(path, key)
        tokenizer = _load_tokenizer(path)
        sha = tokenizer_files_sha256(path) if os.path.isdir(path) else None
        vocab = len(tokenizer)
        if cache is not None:
            try:
                check_student_vocabulary(cache, vocab_size=vocab, tokenizer_sha256=sha)
            except ConfigError as exc:
                raise ConfigError(
                    f"{key}: the student's tokenizer ({path}) does not fit the teachers of "
                    f"the cache: {exc}"
                ) from None
        return cls(tokenizer, key, vocab, sha, tokenizer.pad_token_id)

    def is_hf(self, module: torch.nn.Module) -> bool:
        """Whether ``module`` (as :meth:`build` returned it) wraps a transformers model."""
        return isinstance(module, HFLogits) and _is_hf_model(module.model)

    def build(self, student: Any) -> torch.nn.Module:
        """The module to train: ``student.build()``, a transformers model wrapped in
        ``HFLogits``.

        Raises:
            ConfigError: a transformers model without a tokenizer, or whose logits are
                narrower than the tokenizer's V.
        """
        model = student.build()
        if not _is_hf_model(model):
            return model
        if self.tokenizer is None:
            raise ConfigError(
                f"student.tokenizer: the factory {student.factory!r} returned a transformers "
                "model, which is exported with its tokenizer; give student.tokenizer"
            )
        width = model.get_output_embeddings().weight.shape[0]
        if self.vocab_size is not None and width < self.vocab_size:
            where = "student.hf_config" if student.hf_config is not None else "student"
            raise ConfigError(
                f"{where}: the model has {width} logits but its tokenizer ({self.tokenizer_key}) "
                f"has {self.vocab_size} tokens; set vocab_size >= {self.vocab_size} in the "
                "model config"
            )
        pad = self.pad_token_id
        if pad is None:
            pad = getattr(model.config, "pad_token_id", None)
        return HFLogits(model, pad, self.vocab_size)

    def losses(self, loss: Any, temperature: float) -> tuple[LossFn, LossFn]:
        """(distilled, hard-label) loss functions of token batches:
        :func:`kdcache.losses.token_distill_loss` with ``loss.alpha`` and
        ``loss.kind`` as the divergence, and with ``alpha = 0`` (next-token
        cross-entropy); both average over the global batch's target positions.

        Raises:
            ConfigError: ``loss.beta``, ``loss.skew`` or ``loss.scale_by_temperature_squared``
                changed from their defaults (token-level losses do not take them).
        """
        from kdcache import losses
        from kdcache.jobs.config import LossConfig

        default = LossConfig()
        changed = [
            k
            for k in ("beta", "skew", "scale_by_temperature_squared")
            if getattr(loss, k) != getattr(default, k)
        ]
        if changed:
            raise ConfigError(
                f"loss.{changed[0]}: not taken by the token-level loss "
                "(kdcache.losses.token_distill_loss); drop it for a token dataset"
            )
        vocab = self.vocab_size

        def distilled(logits: torch.Tensor, b: dict[str, Any]) -> torch.Tensor:
            return losses.token_distill_loss(
                logits,
                b,
                temperature=temperature,
                alpha=loss.alpha,
                divergence=loss.kind,
                vocab_size=vocab,
                normalizer=data_parallel_normalizer,
            )

        def hard(logits: torch.Tensor, b: dict[str, Any]) -> torch.Tensor:
            return losses.token_distill_loss(
                logits,
                b,
                temperature=temperature,
                alpha=0.0,
                vocab_size=vocab,
                normalizer=data_parallel_normalizer,
            )

        return distilled, hard


def _combined_entry(cfg: Any, view: Any, dataset: Any, temperature: float, rank: int) -> Any:
    """The combined entry the students read (``cache.combined``), made if missing; None
    when the view is not combined (one teacher, sparse or token-level, a rule that reads
    the stream's rows, ``combined: false``, a hard-label loss, or a read-only cache root).
    Every rank calls it: the entry's lease lets one make it while the others wait."""
    from kdcache.stores.combined import combinable

    if cfg.cache is None or not cfg.cache.combined or combinable(view) is not None:
        return None
    if cfg.loss.kind == "cross_entropy":
        return None
    from kdcache.errors import CacheReadOnlyError
    from kdcache.stream.join import check_same_dataset

    check_same_dataset(view, dataset)  # before a pass over the cache, not after
    try:
        return view.materialize(temperature, verify=cfg.stream.verify, progress=rank == 0)
    except CacheReadOnlyError as exc:  # a read-only cache root: combine at read time
        log.warning("cache.combined: %s; combining at read time", exc)
        return None


def train_from_config(
    cfg: Any,
    *,
    resume: bool = False,
    progress: bool = True,
    on_eval: EvalCallback | None = None,
) -> dict[str, Any]:
    """Run a :class:`kdcache.jobs.config.TrainConfig` on this process's rank.

    Launch it on every rank (``torchrun``, ``deepspeed``, Ray Train, or a single process).
    Writes under ``cfg.output_dir`` (see :func:`local_output_dir` for a remote one, such
    as ``s3://``: the run writes to a local staging directory, and rank 0 uploads the
    finished artefacts, all but ``checkpoints/``, at the end):
    ``checkpoints/`` (engine and loader state),
    ``metrics.csv`` and ``tensorboard/``, ``student.safetensors`` (float32 weights with
    the student config, the cache keys and the resolved config as metadata), with
    ``quantize_int8`` also ``student-int8.pt``, with ``compare_hard_labels`` a ``hard/``
    run, ``curves.png`` and ``summary.json``.

    Args:
        cfg: The job.
        resume: Continue each run from its latest checkpoint (fresh when none).
        progress: Progress bars on rank 0.
        on_eval: Passed to :func:`kdcache.train.loop.train_student` for the distilled run
            (not the ``compare_hard_labels`` one): each evaluation's step, metrics and
            checkpoint directory (Ray Train reports them).

    Returns:
        The summary (rank 0 writes it to ``summary.json``): steps, metrics, cache keys,
        paths, and the float and int8 students' accuracy, bytes and samples/s.

    Raises:
        ConfigError: the global batch does not split over the ranks, or a bad setting.
        CacheNotFoundError, SpecMismatchError: the cache is missing or does not fit the
            dataset or temperature.
    """
    import math

    from kdcache import losses
    from kdcache._version import __version__
    from kdcache.jobs.config import DEFAULT_LR, to_dict
    from kdcache.stores.catalog import open_cache
    from kdcache.stream.dataset import ShardedStream, SoftTargetDataset

    rank, world = init_distributed()
    if cfg.stream.global_batch_size % world:
        raise ConfigError(
            f"stream.global_batch_size {cfg.stream.global_batch_size} does not split over "
            f"{world} ranks; use a multiple of the world size"
        )
    per_rank = cfg.stream.global_batch_size // world
    out = local_output_dir(cfg.output_dir)
    os.makedirs(out, exist_ok=True)
    dataset = cfg.dataset.build()
    tokens = dataset_layout(dataset) == "tokens"
    eval_data = cfg.eval_dataset.build() if cfg.eval_dataset is not None else None
    if tokens and eval_data is not None:
        if dataset_layout(eval_data) != "tokens":
            raise ConfigError(
                "eval_dataset: the training dataset is a token dataset, so validation is "
                "perplexity on a token dataset too; give eval_dataset a token dataset "
                "(text: ...)"
            )
        eval_data = token_eval_data(eval_data)
    cache = view = None
    if cfg.cache is not None:
        cache = open_cache(cfg.cache.uri, root=cfg.cache.root)
        view = as_view(cache)
        if cfg.cache.ensemble is not None:
            if len(view.entries) < 2:
                raise ConfigError(
                    f"cache.ensemble: {cfg.cache.uri!r} holds one teacher's targets; a rule "
                    "combines two or more (point cache.uri at an ensemble view, or drop "
                    "cache.ensemble)"
                )
            names = [e.teacher_name for e in view.entries]
            rule = cfg.cache.ensemble.to_rule(names, where="cache.ensemble")
            try:
                view = view.with_rule(rule)  # the same entries: no teacher recomputed
            except ConfigError as exc:
                raise ConfigError(f"cache.ensemble: {exc} (the teachers are {names})") from None
            if rank == 0:  # so that the key the run records opens (kdcache inspect KEY)
                try:
                    view.save()
                except OSError as exc:  # a read-only cache root: the run goes on
                    log.warning(
                        "cache.ensemble: the view %s was not saved under %s (%s); the key "
                        "this run records will not open there until the view is saved",
                        view.key,
                        view.root.uri,
                        exc,
                    )
            cache = view
    loss_cfg = cfg.loss
    if loss_cfg.temperature is not None:
        temperature = loss_cfg.temperature
    else:
        temperature = view.temperature if view is not None else 1.0
    combined = _combined_entry(cfg, view, dataset, temperature, rank) if view is not None else None
    lm = LMStudent.resolve(cfg, cache) if tokens else None
    if lm is not None and cfg.quantize_int8:
        raise ConfigError(
            "quantize_int8 reports a classifier's accuracy; it is not offered for a "
            "causal-LM student (a token dataset): drop quantize_int8"
        )
    order = {
        "batch_size": per_rank,
        "seed": cfg.seed,
        "shuffle_window": cfg.stream.shuffle_window,
        "num_lanes": cfg.stream.num_lanes,
        "num_workers": cfg.stream.num_workers,
        "prefetch_shards": cfg.stream.prefetch_shards,
    }

    def make_stream(hard: bool) -> ShardedStream:
        if hard:
            return ShardedStream(dataset, **order)
        assert cache is not None and view is not None
        return SoftTargetDataset(
            cache,
            dataset,
            temperature=temperature,
            retemper=temperature != view.temperature,
            verify=cfg.stream.verify,
            combined=None if combined is not None else False,
            **order,
        )

    # Every term is averaged over the rows that count in the whole global batch (all ranks),
    # not over this rank's share: with scarce labels, the ranks hold different numbers of
    # labelled rows, and a mean per rank would make the model depend on the world size.
    def kd(logits: torch.Tensor, b: dict[str, torch.Tensor]) -> torch.Tensor:
        return losses.kd_loss(
            logits,
            b["teacher_log_probs"],
            temperature=temperature,
            alpha=loss_cfg.alpha,
            labels_B=b.get("labels"),
            divergence=loss_cfg.kind,
            beta=loss_cfg.beta,
            skew=loss_cfg.skew,
            scale_by_temperature_squared=loss_cfg.scale_by_temperature_squared,
            normalizer=data_parallel_normalizer,
        )

    def hard_loss(logits: torch.Tensor, b: dict[str, torch.Tensor]) -> torch.Tensor:
        if "labels" not in b:
            raise ConfigError("loss.kind=cross_entropy needs a dataset with labels")
        return losses.cross_entropy(logits, b["labels"], normalizer=data_parallel_normalizer)

    kd_fn, hard_fn = (kd, hard_loss) if lm is None else lm.losses(loss_cfg, temperature)

    eval_fn = None
    if eval_data is not None and lm is not None:

        def eval_fn(module: torch.nn.Module) -> dict[str, float]:
            m = evaluate_perplexity(module, eval_data, vocab_size=lm.vocab_size)
            return {"perplexity": m["perplexity"], "nll": m["nll"]}

    elif eval_data is not None:

        def eval_fn(module: torch.nn.Module) -> dict[str, float]:
            m = evaluate_classifier(module, eval_data, rank=rank, world_size=world)
            return {"accuracy": m["accuracy"], "cross_entropy": m["cross_entropy"]}

    lr = DEFAULT_LR if cfg.lr is None else cfg.lr  # TrainConfig refuses lr beside deepspeed
    base_ds = cfg.deepspeed if cfg.deepspeed is not None else cpu_ds_config(lr, per_rank)
    raw = load_ds_config(base_ds)
    accum = raw.get("gradient_accumulation_steps", 1)
    accum = int(accum) if accum != "auto" else 1
    probe = make_stream(hard=True)
    if cfg.max_steps is not None:
        total = cfg.max_steps
    else:
        total = max(1, math.ceil((cfg.epochs or 1.0) * len(probe) / accum))
    ds_config = prepare_ds_config(base_ds, micro_batch_size=per_rank, total_steps=total)

    only_hard = loss_cfg.kind == "cross_entropy" or cache is None
    runs = [("hard labels" if only_hard else "distilled", "", only_hard)]
    if cfg.compare_hard_labels and not only_hard:
        runs.append(("hard labels", "hard", True))
    results: dict[str, TrainResult] = {}
    for label, sub, hard in runs:
        directory = os.path.join(out, sub) if sub else out
        ckpt = os.path.join(directory, "checkpoints")
        metrics = MetricsLogger(
            directory,
            rank=rank,
            tensorboard=cfg.tensorboard,
            resume_from_step=_latest_step(ckpt) if resume else None,
        )
        torch.manual_seed(cfg.seed)  # the same initial student for every run
        model = cfg.student.build() if lm is None else lm.build(cfg.student)
        try:
            _, results[label] = train_student(
                model,
                make_stream(hard),
                hard_fn if hard else kd_fn,
                ds_config=ds_config,
                max_steps=total,
                eval_fn=eval_fn,
                eval_every=cfg.eval_every,
                progress=progress,
                desc=f"student ({label})",
                checkpoint_dir=ckpt,
                checkpoint_every=cfg.checkpoint_every,
                resume=resume,
                metrics=metrics,
                on_eval=on_eval if not sub else None,
            )
        finally:
            metrics.close()

    main = results[runs[0][0]]
    summary: dict[str, Any] = {
        "steps": main.steps,
        "start_step": main.start_step,
        "world_size": world,
        "global_batch_size": cfg.stream.global_batch_size,
        "cache": None
        if cache is None or view is None
        else {
            "uri": cfg.cache.uri if cfg.cache is not None else None,
            "key": cache.key,
            "entries": [e.key for e in view.entries],
            "teachers": [e.teacher_name for e in view.entries],
            "rule": view.rule if len(view.entries) > 1 else None,
            "ensemble_rule": view.ensemble_rule.to_json() if len(view.entries) > 1 else None,
            "temperature": view.temperature,
            "combined_entry": None if combined is None else combined.key,
        },
        "evals": {label: r.evals[-1][1] if r.evals else {} for label, r in results.items()},
    }
    if rank != 0:
        return summary
    student = cfg.student.build() if lm is None else lm.build(cfg.student)
    student.load_state_dict(main.state_dict)
    student.eval()
    cache_facts = summary["cache"] or {}
    meta = {
        "student": {
            k: v
            for k, v in dataclasses.asdict(cfg.student).items()
            if v is not None and (v != {} or k != "kwargs" or cfg.student.factory is not None)
        },
        "cache_key": cache_facts.get("key"),
        "cache_entries": cache_facts.get("entries", []),
        "teachers": cache_facts.get("teachers", []),
        "cache_temperature": cache_facts.get("temperature"),
        "steps": main.steps,
        "eval": summary["evals"][runs[0][0]],
        "config": to_dict(cfg),
        "versions": {"kdcache": __version__, "torch": torch.__version__},
    }
    if lm is not None and lm.is_hf(student):
        meta["vocab_size"] = lm.vocab_size
        meta["tokenizer_sha256"] = lm.tokenizer_sha256
        nbytes = save_pretrained_student(student.model, lm.tokenizer, out, meta)
        summary["student"] = {"path": out, "format": "transformers", "bytes": nbytes}
    else:
        path = os.path.join(out, "student.safetensors")
        summary["student"] = {"path": path, "bytes": save_safetensors(student, path, meta)}
    if cfg.quantize_int8:
        summary["quantized"] = _report_int8(student, eval_data, out, summary["student"]["path"])
    plot_runs = {
        label: read_metrics(os.path.join(out, sub, "metrics.csv")) for label, sub, _ in runs
    }
    summary["plot"] = plot_curves(
        plot_runs,
        os.path.join(out, "curves.png"),
        f"student ({sum(p.numel() for p in student.parameters()):,} params), tau={temperature}",
    )
    summary["metrics_csv"] = os.path.join(out, "metrics.csv")
    remote = not Location(cfg.output_dir).is_local
    if remote:
        summary = upload_outputs(out, cfg.output_dir, summary)
    text = json.dumps(summary, indent=2)
    with open(os.path.join(out, "summary.json"), "w") as f:
        f.write(text)
    if remote:  # last: a summary.json in output_dir means every artefact is there
        Location(cfg.output_dir).write_atomic("summary.json", text.encode())
    return summary


def _restore_ray_checkpoint(checkpoint: Any, checkpoint_dir: str, rank: int) -> None:
    """Make the Ray checkpoint (a DeepSpeed ``step<N>`` directory) the latest one in
    ``checkpoint_dir`` unless that already has one (rank 0 copies; every rank waits)."""
    import shutil

    import torch.distributed as dist

    if rank == 0 and not os.path.exists(os.path.join(checkpoint_dir, "latest")):
        with checkpoint.as_directory() as src:
            tag = os.path.basename(os.path.normpath(checkpoint.path))
            shutil.copytree(src, os.path.join(checkpoint_dir, tag), dirs_exist_ok=True)
            with open(os.path.join(checkpoint_dir, "latest"), "w") as f:
                f.write(tag)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _ray_train_loop(loop_config: dict[str, Any]) -> None:
    """The per-worker function of Ray Train's TorchTrainer (process group already set).

    Each evaluation, and the end of the run, is reported with ``ray.train.report``: every
    rank reports the metrics (``step`` and the evaluation's; a report is a barrier), and
    rank 0 attaches the DeepSpeed checkpoint saved at that step, which Ray persists as
    ``step<N>`` under ``ray.storage_path``/``ray.name``. When Ray restarts the ranks
    after a failure (``ray.max_failures``) they resume from the latest reported
    checkpoint, as ``resume`` does; so does ``resume`` on a fresh ``output_dir``.
    """
    import ray.train
    from ray.train import Checkpoint

    from kdcache.jobs.config import TrainConfig, from_dict

    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    cfg = from_dict(TrainConfig, loop_config["config"])
    if cfg.eval_every > 0 and (cfg.checkpoint_every == 0 or cfg.eval_every % cfg.checkpoint_every):
        # Under Ray Train each evaluation is reported with a checkpoint (Ray keeps the
        # metrics of checkpointed reports, and restarts resume from them).
        cfg = dataclasses.replace(cfg, checkpoint_every=cfg.eval_every)
    run_id, resume = loop_config["run_id"], loop_config["resume"]
    rank = ray.train.get_context().get_world_rank()
    restored = ray.train.get_checkpoint()
    if restored is not None:
        # This fit's own checkpoint: Ray restarted the ranks after a failure. Another
        # run's (Ray restores a run of the same name): only with resume.
        if resume or (restored.get_metadata() or {}).get("kdcache_run") == run_id:
            ckpt_dir = os.path.join(cfg.output_dir, "checkpoints")
            _restore_ray_checkpoint(restored, ckpt_dir, rank)
            resume = True

    def report(step: int, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        values = {"step": step, **metrics}
        if checkpoint_dir is None:
            ray.train.report(values)
            return
        name = os.path.basename(checkpoint_dir)
        checkpoint = None
        if rank == 0:  # the directory is on output_dir's shared file system: once
            checkpoint = Checkpoint.from_directory(checkpoint_dir)
            checkpoint.set_metadata({"kdcache_run": run_id, "step": step})
        ray.train.report(values, checkpoint=checkpoint, checkpoint_dir_name=name)

    train_from_config(cfg, resume=resume, progress=False, on_eval=report)


def train_on_ray(cfg: Any, *, resume: bool = False) -> dict[str, Any]:
    """Run :func:`train_from_config` on ``cfg.ray.num_workers`` Ray Train workers.

    Ray Train's ``TorchTrainer`` starts one process per rank and sets up the torch process
    group (gloo on CPUs, nccl with ``use_gpu``); each worker runs the same code as a
    ``torchrun`` rank. ``output_dir`` must be reachable from every node (a shared file
    system on a multi-node cluster). Each evaluation reports its metrics, and the
    checkpoint saved at that step, to Ray (see :func:`_ray_train_loop`), which keeps them
    under ``ray.storage_path`` (default ``OUTPUT_DIR/ray``; an ``s3://`` URI works) in the
    run ``ray.name`` and restarts failed ranks from them (``ray.max_failures``).

    Returns:
        The summary that rank 0 wrote to ``summary.json``, plus ``ray``: the run's
        ``path`` in storage and its latest ``checkpoint`` there (None without one).

    Raises:
        MissingDependencyError: Ray is not installed (extra ``ray``).
    """
    ray = require("ray", "ray")
    require("ray.train", "raytrain")
    started = False
    with contextlib.ExitStack() as stack:
        if not ray.is_initialized():
            # log_to_driver: the workers' logs reach this driver, and through it
            # `kdcache submit` / `kdcache logs` when the stage runs as a Ray job.
            from kdcache import quiet

            quiet.quiet_ray()  # no ANSI colour codes in the workers' lines in a log file
            local: dict[str, Any] = {}
            if starts_a_local_ray(cfg.ray.address):  # a Ray of our own: loopback only
                local = stack.enter_context(loopback_ray())
            ray.init(address=cfg.ray.address, log_to_driver=True, **local)
            started = True
        return _fit(ray, cfg, resume, started)


def _fit(ray: Any, cfg: Any, resume: bool, started: bool) -> dict[str, Any]:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from kdcache.jobs.config import to_dict

    out = os.path.abspath(cfg.output_dir)
    config = to_dict(cfg)
    config["output_dir"] = out
    try:
        trainer = TorchTrainer(
            _ray_train_loop,
            train_loop_config={
                "config": config,
                "resume": resume,
                "run_id": uuid.uuid4().hex,  # tells this fit's checkpoints from older runs'
            },
            scaling_config=ScalingConfig(
                num_workers=cfg.ray.num_workers,
                use_gpu=cfg.ray.use_gpu,
                resources_per_worker={"CPU": cfg.ray.cpus_per_worker},
            ),
            run_config=RunConfig(
                storage_path=cfg.ray.storage_path or os.path.join(out, "ray"),
                name=cfg.ray.name,
                failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            ),
        )
        result = trainer.fit()
    finally:
        if started:
            ray.shutdown()
    with open(os.path.join(out, "summary.json")) as f:
        summary = dict(json.load(f))
    checkpoint = result.checkpoint
    summary["ray"] = {"path": result.path, "checkpoint": checkpoint and checkpoint.path}
    return summary
