"""Collation: the only layout-specific part of the student stream.

A layout has three steps. ``load(shard)`` runs in the stream's prefetch thread (or a
loader worker): it reads one input shard and, with a cache, its cache shard(s), joined by
``sample_id`` (:mod:`kdcache.stream.join`), with numpy and pyarrow only. ``finish(raw)``
does the shard's torch work once (re-tempering, the ensemble combination): in the
prefetch thread where torch runs a single thread there, else in the thread that consumes
the batches, so that the prefetch thread never starts a torch thread team of its own
that would fight the training thread's for the cores. ``collate(loaded, shard_B, row_B)``
builds one batch from sample ``row_B[i]`` of finished shard ``shard_B[i]``, in that order.
Where ``finish`` runs changes no value: it is the same call on the same shard.

Batches, by layout (all tensors; B samples on this rank):

* :class:`RecordLayout`: ``sample_id`` int64 [B], ``inputs`` [B, ...], ``labels`` int64
  [B] when the dataset has them (-100 = unlabelled).
* :class:`DenseLayout`: + ``teacher_log_probs`` float32 [B, V], the (ensemble-combined)
  log soft targets at the stream's temperature.
* :class:`FeatureLayout`: + ``teacher_features`` float32 [B, D] (one entry) or [B, K, D].
* :class:`SparseLayout`: + ``targets``: one :class:`kdcache.targets.SparseTargets` with B
  rows (one teacher, or K top-k/top-p teachers combined per batch by
  :func:`kdcache.targets.combine_sparse_ensemble`), or a list of K of them (sampled
  teachers, or ``combine=False``: sum their losses).
* :class:`TokenLayout`: ``sample_id`` [B], ``inputs`` int64 [B, T] right-padded,
  ``lengths`` [B], ``mask`` bool [B, T] (positions with a target), ``labels`` int64
  [B, T] (next token where ``mask``, else -100) and, with a cache, ``targets`` on the
  B * T grid: SparseTargets with B * T rows (empty rows off the mask), a list of K of
  them, or float32 log-probabilities [B, T, V] for dense entries.

Shape legend: B batch, T padded tokens, V classes or vocabulary, K teachers, D features,
M target positions in a batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from kdcache import schema, targets
from kdcache.data.base import ShardedDataset
from kdcache.data.tokens import pad_batch, target_positions
from kdcache.errors import ConfigError
from kdcache.losses import IGNORE_INDEX
from kdcache.stores.view import EnsembleView
from kdcache.stream.join import TokenShard, input_order, read_inputs, read_token_shard
from kdcache.targets.sparse import PAD_ID, SparseTargets, concat_sparse


class Layout(Protocol):
    """How one kind of sample is read and batched (see the module docstring)."""

    def load(self, shard: int) -> Any: ...

    def finish(self, raw: Any) -> Any: ...

    def collate(self, loaded: dict[int, Any], shard_B: np.ndarray, row_B: np.ndarray) -> Any: ...


def gather_rows(
    loaded: dict[int, Any],
    shard_B: np.ndarray,
    row_B: np.ndarray,
    take: Callable[[Any, np.ndarray], Any],
    concat: Callable[[list[Any]], Any],
) -> Any:
    """Rows ``row_B[i]`` of shards ``shard_B[i]``, in that order, for any row container.

    ``take(part, rows)`` selects rows of one shard's container, ``concat(parts)`` stacks
    several; a batch from one shard (the common case) is one ``take``.
    """
    shards = list(dict.fromkeys(shard_B.tolist()))
    if len(shards) == 1:
        return take(loaded[shards[0]], row_B)
    parts, where = [], []
    for s in shards:
        at = np.flatnonzero(shard_B == s)
        parts.append(take(loaded[s], row_B[at]))
        where.append(at)
    back = np.argsort(np.concatenate(where), kind="stable")
    return take(concat(parts), back)


def _take_columns(cols: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[rows] for k, v in cols.items()}


def _concat_columns(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _to_torch(batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """Tensors of a batch's columns; read-only columns (views of a file-backed dataset's
    Arrow buffers) are copied, never handed to torch as writable memory they are not."""
    out = {}
    for k, v in batch.items():
        v = np.ascontiguousarray(v)
        out[k] = torch.from_numpy(v if v.flags.writeable else v.copy())
    return out


def _take_sparse(t: SparseTargets, rows: np.ndarray) -> SparseTargets:
    return t.rows(torch.from_numpy(np.asarray(rows, dtype=np.int64)))


def _concat_sparse(parts: list[SparseTargets]) -> SparseTargets:
    return concat_sparse(parts)


def _rule_columns(view: EnsembleView, columns: dict[str, Any]) -> dict[str, Any]:
    """The per-row inputs the view's rule needs, as keywords of the combine functions:
    ``labels_B`` (``best_on_label``) and ``route_keys_B`` (``route``), taken from the
    joined rows' columns.

    Raises:
        ConfigError: a column the rule needs is not among the rows' columns.
    """
    rule = view.ensemble_rule
    out: dict[str, Any] = {}
    if rule.needs_labels:
        if "labels" not in columns:
            raise ConfigError(
                f"ensemble rule {rule.rule!r} needs labels, and the dataset's rows have none "
                "(give the dataset a label column, or use another rule)"
            )
        out["labels_B"] = columns["labels"]
    if rule.needs_route_keys:
        name = rule.route_column
        if name is None or name not in columns:
            raise ConfigError(
                f"ensemble rule 'route' reads the column {name!r}, which the dataset's rows "
                f"do not have (they have {sorted(columns)}); name an input column in "
                "route_column"
            )
        out["route_keys_B"] = np.asarray(columns[name])
    return out


class RecordLayout:
    """Records of a ``"records"`` dataset, no soft targets (hard labels)."""

    def __init__(self, dataset: ShardedDataset) -> None:
        self.dataset = dataset

    def load(self, shard: int) -> dict[str, np.ndarray]:
        return self.dataset.read_shard(shard)

    def finish(self, raw: Any) -> Any:
        """The shard as loaded (no torch work)."""
        return raw

    def collate(self, loaded: dict[int, Any], shard_B: np.ndarray, row_B: np.ndarray) -> Any:
        return _to_torch(gather_rows(loaded, shard_B, row_B, _take_columns, _concat_columns))


class DenseLayout(RecordLayout):
    """Records joined to dense soft targets: ``teacher_log_probs`` [B, V] at ``temperature``,
    re-tempered exactly from the cache's tau when they differ, combined by the view's rule."""

    def __init__(
        self, dataset: ShardedDataset, view: EnsembleView, *, temperature: float, verify: bool
    ) -> None:
        super().__init__(dataset)
        self.view, self.temperature, self.verify = view, float(temperature), verify
        self.combined = view.is_combined

    def _joined(self, shard: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        inputs = read_inputs(self.view, self.dataset, shard, verify=self.verify)
        if self.combined:  # one entry, read as it is (no [1, n, V] copy)
            ids, vals_NV = self.view.entries[0].read_shard(shard, verify=self.verify)
            scaled_KNV = vals_NV[None]
        else:
            ids, scaled_KNV = self.view.read_shard(shard, verify=self.verify)
        perm = input_order(ids, inputs["sample_id"], f"shard {shard}")
        return inputs, scaled_KNV if perm is None else scaled_KNV[:, perm]

    def load(self, shard: int) -> Any:
        """``(inputs, scaled_KNV)``: the joined shard, the K teachers' stored ``z / tau``
        float32 [K, n, V], before re-tempering and combination (see :meth:`finish`)."""
        return self._joined(shard)

    def finish(self, raw: Any) -> dict[str, np.ndarray]:
        """Re-temper and combine a loaded shard: its columns and ``teacher_log_probs``
        float32 [n, V] (log-probabilities at the stream's temperature)."""
        inputs, scaled_KNV = raw
        if self.combined:  # stored as the final log-probabilities, float32
            return {**inputs, "teacher_log_probs": np.asarray(scaled_KNV[0], dtype=np.float32)}
        scaled = torch.from_numpy(scaled_KNV)
        if self.temperature != self.view.temperature:
            scaled = targets.retemper(scaled, self.view.temperature, self.temperature)
        log_probs = targets.combine_ensemble(
            scaled, rule=self.view.ensemble_rule, **_rule_columns(self.view, inputs)
        )
        return {**inputs, "teacher_log_probs": log_probs.numpy()}


class FeatureLayout(DenseLayout):
    """Records joined to feature entries (:meth:`kdcache.Teacher.feature`): the stored
    values times the cache's temperature, i.e. the raw features."""

    def load(self, shard: int) -> Any:
        inputs, scaled_KNV = self._joined(shard)
        feats = np.asarray(scaled_KNV, dtype=np.float32) * np.float32(self.view.temperature)
        feats = feats[0] if len(feats) == 1 else np.ascontiguousarray(feats.transpose(1, 0, 2))
        return {**inputs, "teacher_features": feats}

    def finish(self, raw: Any) -> Any:
        """The shard as loaded (numpy only, done in :meth:`load`)."""
        return raw


def _combine_sparse(
    per_teacher: list[SparseTargets],
    view: EnsembleView,
    combine: bool,
    rule_columns: dict[str, Any] | None = None,
) -> SparseTargets | list[SparseTargets]:
    if len(per_teacher) == 1:
        return per_teacher[0]
    if combine and all(t.kind not in schema.COUNT_KINDS for t in per_teacher):
        return targets.combine_sparse_ensemble(
            per_teacher, rule=view.ensemble_rule, **(rule_columns or {})
        )
    return per_teacher


class SparseLayout:
    """Records joined to sparse soft targets (top-k, top-p, sampled): ``targets``."""

    def __init__(
        self,
        dataset: ShardedDataset,
        view: EnsembleView,
        *,
        temperature: float,
        verify: bool,
        combine: bool,
    ) -> None:
        self.dataset = dataset
        self.view, self.temperature = view, float(temperature)
        self.verify, self.combine = verify, combine

    def load(self, shard: int) -> Any:
        """``(inputs, per_teacher, perm)``: the shard's columns, its K teachers' targets as
        stored, and the permutation that puts them in input order (None: already are)."""
        inputs = read_inputs(self.view, self.dataset, shard, verify=self.verify)
        ids, per_teacher = self.view.read_sparse_shard(shard, verify=self.verify)
        perm = input_order(ids, inputs["sample_id"], f"shard {shard}")
        return inputs, per_teacher, perm

    def finish(self, raw: Any) -> tuple[dict[str, np.ndarray], list[SparseTargets]]:
        """``(inputs, per_teacher)``: the targets in input order, re-tempered to the
        stream's temperature."""
        inputs, per_teacher, perm = raw
        if perm is not None:
            per_teacher = [_take_sparse(t, perm) for t in per_teacher]
        if self.temperature != self.view.temperature:
            per_teacher = [
                targets.retemper_sparse(t, self.view.temperature, self.temperature)
                for t in per_teacher
            ]
        return inputs, per_teacher

    def collate(self, loaded: dict[int, Any], shard_B: np.ndarray, row_B: np.ndarray) -> Any:
        cols = {s: v[0] for s, v in loaded.items()}
        rows = gather_rows(cols, shard_B, row_B, _take_columns, _concat_columns)
        rule_columns = _rule_columns(self.view, rows) if len(self.view.entries) > 1 else {}
        batch = _to_torch(rows)
        per_teacher = [
            gather_rows(
                {s: v[1][k] for s, v in loaded.items()},
                shard_B,
                row_B,
                _take_sparse,
                _concat_sparse,
            )
            for k in range(len(self.view.entries))
        ]
        batch["targets"] = _combine_sparse(per_teacher, self.view, self.combine, rule_columns)
        return batch


def scatter_sparse(sel: SparseTargets, flat_M: torch.Tensor, num_rows: int) -> SparseTargets:
    """Place M rows of targets at rows ``flat_M`` of a B * T grid; other rows are empty
    (all pads, tail -inf): they are masked out of every loss."""
    s = sel.num_slots
    ids = torch.full((num_rows, s), PAD_ID, dtype=torch.int64)
    ids[flat_M] = sel.ids_BS
    values = torch.full((num_rows, s), float("-inf"), dtype=sel.values_BS.dtype)
    values[flat_M] = sel.values_BS
    log_z = torch.zeros(num_rows)
    log_z[flat_M] = sel.log_partition_B.float()
    counts = None
    if sel.counts_BS is not None:
        counts = torch.zeros((num_rows, s), dtype=torch.int64)
        counts[flat_M] = sel.counts_BS
    grid = None
    if sel.log_partition_grid_BG is not None:
        grid = torch.zeros((num_rows, sel.log_partition_grid_BG.shape[1]))
        grid[flat_M] = sel.log_partition_grid_BG.float()
    tail = None
    if sel.tail_log_mass_B is not None:
        tail = torch.full((num_rows,), float("-inf"))
        tail[flat_M] = sel.tail_log_mass_B.float()
    return SparseTargets(ids, values, log_z, sel.kind, counts, sel.grid_temperatures, grid, tail)


def _take_token_rows(tgt: SparseTargets | np.ndarray, idx: np.ndarray) -> Any:
    if isinstance(tgt, SparseTargets):
        return _take_sparse(tgt, idx)
    return torch.from_numpy(np.asarray(tgt)[idx])


def _concat_token_rows(parts: Sequence[Any]) -> Any:
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(list(parts))
    return concat_sparse(list(parts))


class TokenLayout:
    """Sequences of a ``"tokens"`` dataset, with their per-token soft targets if a cache
    is given (see the module docstring for the batch)."""

    def __init__(
        self,
        dataset: ShardedDataset,
        view: EnsembleView | None,
        *,
        verify: bool = True,
        combine: bool = True,
    ) -> None:
        self.dataset, self.view, self.verify, self.combine = dataset, view, verify, combine
        self.pad_token_id = int(getattr(dataset, "pad_token_id", 0))

    def load(self, shard: int) -> tuple[dict[str, np.ndarray], list[TokenShard]]:
        inp = (
            self.dataset.read_shard(shard)
            if self.view is None
            else read_inputs(self.view, self.dataset, shard, verify=self.verify)
        )
        teachers: list[TokenShard] = []
        if self.view is not None:
            teachers = [
                read_token_shard(e, shard, self.dataset, verify=self.verify, inputs=inp)
                for e in self.view.entries
            ]
        return inp, teachers

    def finish(self, raw: Any) -> Any:
        """The shard as loaded (its targets are combined per batch, in :meth:`collate`)."""
        return raw

    def collate(self, loaded: dict[int, Any], shard_B: np.ndarray, row_B: np.ndarray) -> Any:
        seqs, sids, b_idx, t_idx = [], [], [], []
        for b, (s, j) in enumerate(zip(shard_B.tolist(), row_B.tolist(), strict=True)):
            inp = loaded[s][0]
            off = inp["token_offsets"]
            seq = inp["tokens"][off[j] : off[j + 1]]
            seqs.append(seq)
            sids.append(int(inp["sample_id"][j]))
            pos = target_positions(len(seq), int(inp["prompt_lengths"][j]))
            b_idx.append(np.full(len(pos), b))
            t_idx.append(pos)
        inputs = pad_batch(seqs, self.pad_token_id)
        num_b, width = inputs.shape
        bb = torch.from_numpy(np.concatenate(b_idx))
        tt = torch.from_numpy(np.concatenate(t_idx))
        mask = torch.zeros((num_b, width), dtype=torch.bool)
        mask[bb, tt] = True
        labels = torch.full((num_b, width), IGNORE_INDEX, dtype=torch.int64)
        labels[bb, tt] = inputs[bb, tt + 1]
        batch: dict[str, Any] = {
            "sample_id": torch.tensor(sids, dtype=torch.int64),
            "inputs": inputs,
            "lengths": torch.tensor([len(x) for x in seqs], dtype=torch.int64),
            "mask": mask,
            "labels": labels,
        }
        if self.view is None:
            return batch
        # each sample's target rows, in batch order: a sequence is a run of rows, and
        # consecutive samples of one shard are gathered in one take
        per_teacher = []
        pairs = list(zip(shard_B.tolist(), row_B.tolist(), strict=True))
        for k in range(len(self.view.entries)):
            parts: list[Any] = []
            run: list[np.ndarray] = []
            run_shard = pairs[0][0]
            for s, j in [*pairs, (-1, -1)]:
                if s != run_shard:
                    tgt = loaded[run_shard][1][k].targets
                    parts.append(_take_token_rows(tgt, np.concatenate(run)))
                    run, run_shard = [], s
                if s >= 0:
                    ts: TokenShard = loaded[s][1][k]
                    run.append(np.arange(ts.row_offsets[j], ts.row_offsets[j + 1]))
            per_teacher.append(parts[0] if len(parts) == 1 else _concat_token_rows(parts))
        flat_M = bb * width + tt
        rule_columns: dict[str, Any] = {}
        if len(self.view.entries) > 1:
            # per target row: its next token as the label, its sequence's route key
            columns: dict[str, Any] = {"labels": labels.reshape(-1)[flat_M]}
            name = self.view.ensemble_rule.route_column
            if self.view.ensemble_rule.needs_route_keys and name is not None:
                if not all(name in loaded[s][0] for s in set(shard_B.tolist())):
                    columns.pop(name, None)
                else:
                    keys = np.asarray(
                        [loaded[s][0][name][j] for s, j in pairs]  # one per sequence
                    )
                    columns[name] = keys[bb.numpy()]
            rule_columns = _rule_columns(self.view, columns)
        batch["targets"] = self._combine(per_teacher, flat_M, num_b, width, rule_columns)
        return batch

    def _combine(
        self,
        per_teacher: list[Any],
        flat_M: torch.Tensor,
        num_b: int,
        width: int,
        rule_columns: dict[str, Any] | None = None,
    ) -> Any:
        assert self.view is not None
        num_rows = num_b * width
        if isinstance(per_teacher[0], torch.Tensor):  # dense: scaled logits [M, V]
            lp = torch.stack([torch.log_softmax(t.float(), dim=-1) for t in per_teacher])
            comb = targets.combine_ensemble(
                lp, rule=self.view.ensemble_rule, **(rule_columns or {})
            )
            full = torch.zeros((num_rows, comb.shape[-1]))
            full[flat_M] = comb
            return full.reshape(num_b, width, -1)
        mixed = _combine_sparse(per_teacher, self.view, self.combine, rule_columns)
        if isinstance(mixed, list):
            return [scatter_sparse(t, flat_M, num_rows) for t in mixed]
        return scatter_sparse(mixed, flat_M, num_rows)
