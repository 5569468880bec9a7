"""The compact token-level caches of format 2: bit-packing, the sequence-major layout,
counts-only sampled targets and quantised values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdcache import schema
from kdcache.errors import CacheCorruptError, ConfigError, FormatVersionError
from kdcache.losses import divergence, token_kd_loss
from kdcache.schema import TargetSpec
from kdcache.stores.backends import BACKENDS, ShardColumns
from kdcache.stores.bitpack import bits_for, pack, unpack
from kdcache.stores.codec import sparse_to_columns
from kdcache.stores.entry import CacheEntry
from kdcache.stores.sequence import compact_token_columns, expand_token_columns
from kdcache.targets import SparseTargets, counts_only, retemper_sparse, sparsify

# --------------------------------------------------------------------------------------
# bit-packing
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [0, 1, 3, 7, 8, 9, 11, 16, 17, 18, 31, 32, 33, 57])
def test_pack_round_trip_every_width(bits: int) -> None:
    rng = np.random.default_rng(bits)
    counts = rng.integers(0, 40, size=17)
    groups = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    top = (1 << bits) - 1
    values = rng.integers(0, top + 1, size=int(groups[-1]), dtype=np.uint64) if bits else None
    if values is None:
        values = np.zeros(int(groups[-1]), np.uint64)
    values[: min(3, len(values))] = top  # the extremes
    data, byte_off = pack(values, bits, groups)
    assert len(data) == int(byte_off[-1]) == sum(-(-int(c) * bits // 8) for c in counts)
    assert np.array_equal(unpack(data, byte_off, bits, groups, "t").astype(np.uint64), values)
    for m in range(len(counts)):  # every group stands alone on its bytes
        lo, hi = int(byte_off[m]), int(byte_off[m + 1])
        got = unpack(data[lo:hi], np.array([0, hi - lo]), bits, np.array([0, counts[m]]), "t")
        assert np.array_equal(got.astype(np.uint64), values[groups[m] : groups[m + 1]])


def test_pack_refuses_values_that_do_not_fit() -> None:
    with pytest.raises(ConfigError, match="do not fit 3 unsigned bits"):
        pack(np.array([8]), 3, np.array([0, 1]))
    with pytest.raises(ConfigError, match="negative"):
        bits_for(-1)
    assert bits_for(0) == 0 and bits_for(1) == 1 and bits_for(2047) == 11 and bits_for(2048) == 12


def test_unpack_refuses_bytes_that_disagree_with_the_sizes() -> None:
    data, off = pack(np.arange(10), 4, np.array([0, 10]))
    with pytest.raises(CacheCorruptError, match="packed bytes do not match"):
        unpack(data[:-1], off, 4, np.array([0, 10]), "shard x")
    with pytest.raises(CacheCorruptError, match="packed bytes do not match"):
        unpack(data, off, 4, np.array([0, 12]), "shard x")


# --------------------------------------------------------------------------------------
# the sequence-major layout, column by column
# --------------------------------------------------------------------------------------


def _token_rows(num_seqs: int = 7, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 25, size=num_seqs)
    first = rng.integers(0, 5, size=num_seqs)
    ids = np.repeat(np.arange(100, 100 + num_seqs, dtype=np.int64) * 3, lengths)
    pos = np.concatenate([np.arange(f, f + n) for f, n in zip(first, lengths, strict=True)])
    return ids, pos.astype(np.int32)


def _v1_columns(spec: TargetSpec, vocab: int, seed: int = 0) -> tuple[ShardColumns, dict]:
    ids, pos = _token_rows(seed=seed)
    torch.manual_seed(seed)
    z = torch.randn(len(ids), vocab) * 4
    labels = torch.randint(0, vocab, (len(ids),))
    if spec.kind == "dense":
        from kdcache.stores.codec import dense_to_columns

        cols, extra = dense_to_columns(ids, z.numpy(), spec, vocab, "t")
    else:
        targets = sparsify(z, spec, labels_M=labels, row_sample_ids_M=ids)
        cols, extra = sparse_to_columns(ids, targets, spec, vocab, "t")
    cols.rows[schema.COL_POSITION] = pos
    cols.meta["token_level"] = True
    return cols, extra


SPECS = [
    TargetSpec(2.0, "dense", "float32"),
    TargetSpec(2.0, "dense", "bfloat16"),
    TargetSpec(1.0, "topk", "float32", params={"k": 8}),
    TargetSpec(1.0, "topk", "float16", params={"k": 8, "labels": True}),
    TargetSpec(1.0, "topk", "bfloat16", params={"k": 8, "grid_temperatures": [1.0, 2.0]}),
    TargetSpec(1.0, "topk", params={"k": 8, "value_bits": 8}),
    TargetSpec(1.0, "topk", params={"k": 8, "value_bits": 12, "labels": True}),
    TargetSpec(1.0, "topp", "float16", params={"top_p": 0.8, "max_k": 12}),
    TargetSpec(1.0, "sampled", "float32", params={"num_samples": 16, "seed": 3}),
    TargetSpec(1.0, "sampled", "bfloat16", params={"num_samples": 4, "labels": True}),
    TargetSpec(1.0, "sampled_counts", params={"num_samples": 16, "seed": 3}),
    TargetSpec(1.0, "sampled_counts", params={"num_samples": 16, "compression": "zstd"}),
    TargetSpec(1.0, "topk", "bfloat16", params={"k": 8, "compression": "zstd"}),
]


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.kind}-{s.storage_dtype}-{s.params}")
@pytest.mark.parametrize("vocab", [50, 70_000, 140_000])
def test_compact_layout_round_trips_exactly(spec: TargetSpec, backend: str, vocab: int) -> None:
    """Row-major -> sequence-major -> file -> row-major gives every column, dtype and
    value back bit for bit, for every kind and dtype, V above 2^16 and 2^17 too."""
    if spec.kind == "dense" and vocab > 50:
        pytest.skip("dense rows of 70k floats add nothing here but time")
    cols, _ = _v1_columns(spec, vocab)
    impl = BACKENDS[backend]
    got = expand_token_columns(impl.decode(impl.encode(compact_token_columns(cols, "t")), "t"), "t")
    assert np.array_equal(got.sample_ids_N, cols.sample_ids_N)
    assert set(got.rows) == set(cols.rows) and set(got.entries) == set(cols.entries)
    for name, col in [*cols.rows.items(), *cols.entries.items()]:
        back = got.rows.get(name, got.entries.get(name))
        assert back is not None and back.dtype == col.dtype and back.shape == col.shape, name
        assert np.array_equal(back.view(np.uint8), np.ascontiguousarray(col).view(np.uint8)), name
    if cols.entries:
        assert np.array_equal(got.offsets_N1, cols.offsets_N1)
    assert got.meta == cols.meta
    if spec.kind != "dense":
        packed = compact_token_columns(cols, "t").meta["packed"]
        assert packed[schema.COL_IDS]["bits"] == max(1, math.ceil(math.log2(vocab)))


def test_compact_layout_refuses_positions_that_are_not_one_run() -> None:
    cols, _ = _v1_columns(TargetSpec(1.0, "topk", params={"k": 4}), 50)
    cols.rows[schema.COL_POSITION] = cols.rows[schema.COL_POSITION].copy()
    cols.rows[schema.COL_POSITION][2] += 1  # a gap inside the first sequence
    with pytest.raises(ConfigError, match="not consecutive"):
        compact_token_columns(cols, "t")


# --------------------------------------------------------------------------------------
# entries: format 2 written, format 1 still read
# --------------------------------------------------------------------------------------


def _entry(tmp_path, spec: TargetSpec, token_level: bool, name: str = "x") -> CacheEntry:
    material = schema.entry_spec({"d": name}, {"t": 1}, spec, token_level=token_level)
    entry = CacheEntry(str(tmp_path / "cache"), schema.content_key(material))
    entry.write_spec(material)
    return entry


def _write(
    entry: CacheEntry, spec: TargetSpec, vocab: int = 2048
) -> tuple[np.ndarray, torch.Tensor]:
    ids, pos = _token_rows(num_seqs=12, seed=1)
    torch.manual_seed(1)
    z = torch.randn(len(ids), vocab) * 3
    values = sparsify(z, spec, row_sample_ids_M=ids) if spec.is_sparse else z.numpy()
    entry.write_shard(0, ids, values, vocab_size=vocab, positions_N=pos)
    entry.commit(1, {})
    return ids, z


@pytest.mark.parametrize(
    "spec",
    [
        TargetSpec(1.0, "topk", "bfloat16", params={"k": 16}),
        TargetSpec(1.0, "sampled", params={"num_samples": 16}),
        TargetSpec(1.0, "dense", "float16"),
    ],
    ids=lambda s: s.kind,
)
def test_format_2_entries_read_like_format_1_and_are_smaller(tmp_path, spec: TargetSpec) -> None:
    old = _entry(tmp_path, spec, token_level=False)  # format 1: the row-major layout
    new = _entry(tmp_path, spec, token_level=True)
    assert old.spec["format_version"] == 1 and new.spec["format_version"] == 2
    assert old.key != new.key
    _write(old, spec)
    _write(new, spec)
    assert new.manifest["format_version"] == 2
    a, b = old.read_columns(0), new.read_columns(0)
    assert np.array_equal(a.sample_ids_N, b.sample_ids_N)
    for name in a.rows:
        assert np.array_equal(a.rows[name], b.rows[name]), name
    for name in a.entries:
        assert np.array_equal(a.entries[name], b.entries[name]), name
    # dense rows are V values each: only the per-token id and position are saved
    assert new.num_bytes < (0.85 if spec.is_sparse else 1.0) * old.num_bytes
    if spec.is_sparse:
        ta, tb = old.read_sparse_shard(0)[1], new.read_sparse_shard(0)[1]
        assert torch.equal(ta.ids_BS, tb.ids_BS)
        assert torch.equal(ta.values_BS.float(), tb.values_BS.float())
        assert torch.equal(ta.log_partition_B, tb.log_partition_B)


def test_a_newer_format_is_refused(tmp_path) -> None:
    spec = TargetSpec(1.0, "topk", params={"k": 4})
    material = schema.entry_spec({"d": 1}, {"t": 1}, spec, token_level=True)
    material["format_version"] = schema.FORMAT_VERSION + 1
    entry = CacheEntry(str(tmp_path), schema.content_key(material))
    entry.write_spec(material)
    with pytest.raises(FormatVersionError, match="upgrade kdcache"):
        _ = entry.spec


def test_a_tampered_compact_shard_is_caught_without_the_checksum(tmp_path) -> None:
    """Even with verify=False (no SHA-256), packed columns that disagree with the run
    lengths are refused rather than decoded into wrong targets."""
    spec = TargetSpec(1.0, "topk", params={"k": 16})
    entry = _entry(tmp_path, spec, token_level=True)
    _write(entry, spec)
    rec = entry.manifest_record(0)
    path = tmp_path / "cache" / "entries" / entry.key / "shards" / rec.file
    import pyarrow as pa

    table = pa.ipc.open_file(pa.BufferReader(path.read_bytes())).read_all()
    col = table.column("num_positions").to_numpy().copy()
    col[0] += 1  # one more token than the packed columns hold
    i = table.schema.get_field_index("num_positions")
    table = table.set_column(i, table.schema.field(i), pa.array(col))
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    path.write_bytes(sink.getvalue().to_pybytes())
    with pytest.raises(CacheCorruptError):
        entry.read_columns(0, verify=False)


# --------------------------------------------------------------------------------------
# counts-only sampled targets
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampling", ["systematic", "multinomial"])
def test_counts_only_keeps_the_draws_of_kind_sampled(sampling: str) -> None:
    """sampled_counts (default: systematic draws) keeps the draws of kind sampled with the
    same seed and scheme; the scheme each kind defaults to is left out of its key."""
    z = torch.randn(40, 300) * 2
    rows = np.repeat(np.arange(4), 10)
    both = {"num_samples": 16, "seed": 5, "sampling": sampling}
    sampled = sparsify(z, TargetSpec(1.0, "sampled", params=both), row_sample_ids_M=rows)
    own = {"num_samples": 16, "seed": 5} if sampling == "systematic" else both
    counts = sparsify(z, TargetSpec(1.0, "sampled_counts", params=own), row_sample_ids_M=rows)
    assert isinstance(sampled, SparseTargets) and isinstance(counts, SparseTargets)
    assert counts.kind == "sampled_counts"
    assert torch.equal(counts.ids_BS, sampled.ids_BS)
    assert torch.equal(counts.counts_BS, sampled.counts_BS)
    p_hat = counts.log_probs().exp()
    assert torch.allclose(p_hat.sum(-1), torch.ones(40))
    assert torch.equal(p_hat, torch.nan_to_num(sampled.estimate_log_probs().exp(), nan=0.0))
    assert bool(torch.isneginf(counts.tail_log_mass()).all())


def test_counts_only_estimate_is_unbiased() -> None:
    """E[p_hat] = p: averaged over many independent rows of one distribution, the
    estimate approaches p (within 4 standard errors at every id)."""
    z = torch.randn(1, 20) * 1.5
    p = torch.softmax(z.double(), -1)[0]
    many = z.repeat(4000, 1)
    t = sparsify(many, TargetSpec(1.0, "sampled_counts", params={"num_samples": 16}))
    assert isinstance(t, SparseTargets)
    dense = torch.zeros(4000, 20, dtype=torch.float64)
    dense.scatter_add_(
        1, t.ids_BS.clamp(min=0), t.log_probs().exp().double().masked_fill(t.ids_BS < 0, 0)
    )
    mean = dense.mean(0)
    se = torch.sqrt(p * (1 - p) / (16 * 4000))
    assert bool(((mean - p).abs() < 4 * se + 1e-12).all())


def test_counts_only_forward_kl_gradient_matches_the_sampled_kind() -> None:
    z = torch.randn(30, 64) * 2
    spec = {"num_samples": 16, "seed": 1, "sampling": "systematic"}
    a = sparsify(z, TargetSpec(1.0, "sampled", params=spec))
    b = sparsify(z, TargetSpec(1.0, "sampled_counts", params=spec))
    s1 = torch.randn(30, 64, requires_grad=True)
    s2 = s1.detach().clone().requires_grad_(True)
    divergence(s1, a, temperature=1.0, kind="forward_kl").sum().backward()
    divergence(s2, b, temperature=1.0, kind="forward_kl").sum().backward()
    assert torch.allclose(s1.grad, s2.grad, atol=1e-6)


@pytest.mark.parametrize("kind", ["reverse_kl", "jsd"])
def test_counts_only_refuses_divergences_that_are_not_linear_in_p(kind: str) -> None:
    t = sparsify(torch.randn(4, 32), TargetSpec(1.0, "sampled_counts", params={"num_samples": 8}))
    with pytest.raises(ConfigError, match="refused for sampled_counts"):
        divergence(torch.randn(4, 32), t, temperature=1.0, kind=kind)


def test_counts_only_refuses_retempering_and_meaningless_params() -> None:
    t = sparsify(torch.randn(4, 32), TargetSpec(1.0, "sampled_counts", params={"num_samples": 8}))
    assert isinstance(t, SparseTargets)
    with pytest.raises(ConfigError, match="cannot re-temper"):
        retemper_sparse(t, 1.0, 2.0)
    for bad in ({"labels": True}, {"value_bits": 8}, {"grid_temperatures": [2.0]}):
        with pytest.raises(ConfigError, match="sampled_counts targets take no"):
            TargetSpec(1.0, "sampled_counts", params={"num_samples": 8, **bad})
    with pytest.raises(ConfigError, match="store no values"):
        TargetSpec(1.0, "sampled_counts", "bfloat16", params={"num_samples": 8})
    with pytest.raises(ConfigError, match="needs kind='sampled'"):
        counts_only(t)


# --------------------------------------------------------------------------------------
# quantised values
# --------------------------------------------------------------------------------------


def test_quantised_values_error_is_measured_and_small(tmp_path) -> None:
    spec = TargetSpec(1.0, "topk", params={"k": 64, "value_bits": 8})
    exact_spec = TargetSpec(1.0, "topk", params={"k": 64})
    entry = _entry(tmp_path, spec, token_level=True)
    _, z = _write(entry, spec)
    err = entry.quantization_error()
    assert 0 < err["kl_nats_mean"] <= err["kl_nats_max"] < 1e-3
    got = entry.read_sparse_shard(0)[1]
    exact = sparsify(z, exact_spec)
    assert isinstance(exact, SparseTargets)
    assert torch.equal(got.ids_BS, exact.ids_BS)
    # recomputed independently in float64 from what a reader gets
    lp, lq = exact.log_probs().double(), got.log_probs().double()
    p = (lp - torch.logsumexp(lp, -1, keepdim=True)).exp()
    lq = lq - torch.logsumexp(lq, -1, keepdim=True)
    lpn = lp - torch.logsumexp(lp, -1, keepdim=True)
    kl = (p * (lpn - lq)).sum(-1)
    assert math.isclose(float(kl.mean()), err["kl_nats_mean"], rel_tol=0.05)
    # the kept mass is the exact one, so kept + tail sums to one
    kept = torch.logsumexp(got.log_probs().double(), -1).exp()
    total = kept + got.tail_log_mass().double().exp()
    assert torch.allclose(total, torch.ones_like(total), atol=1e-6)
    with pytest.raises(ConfigError, match="unquantised"):
        _entry(tmp_path, exact_spec, True, "other").quantization_error()


def test_zstd_compression_is_lossless_smaller_and_in_the_key(tmp_path) -> None:
    plain = TargetSpec(1.0, "topk", "bfloat16", params={"k": 16})
    packed = TargetSpec(1.0, "topk", "bfloat16", params={"k": 16, "compression": "zstd"})
    a, b = _entry(tmp_path, plain, True), _entry(tmp_path, packed, True)
    assert a.key != b.key
    _write(a, plain)
    _write(b, packed)
    assert b.num_bytes < a.num_bytes
    ta, tb = a.read_sparse_shard(0)[1], b.read_sparse_shard(0)[1]
    assert torch.equal(ta.ids_BS, tb.ids_BS) and torch.equal(ta.values_BS, tb.values_BS)
    with pytest.raises(ConfigError, match="compression must be one of"):
        TargetSpec(1.0, "topk", params={"k": 4, "compression": "gzip"})


def test_value_bits_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"value_bits must be an int in 2\.\.16"):
        TargetSpec(1.0, "topk", params={"k": 4, "value_bits": 1})
    with pytest.raises(ConfigError, match="leave storage_dtype"):
        TargetSpec(1.0, "topk", "bfloat16", params={"k": 4, "value_bits": 8})


# --------------------------------------------------------------------------------------
# a student that copies the teacher has zero loss through the compact layout
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        TargetSpec(1.0, "topk", params={"k": 16}),
        TargetSpec(1.0, "dense"),
        TargetSpec(1.0, "topp", params={"top_p": 0.9, "max_k": 64}),
    ],
    ids=lambda s: s.kind,
)
def test_teacher_copy_has_zero_loss_at_every_position(tmp_path, spec: TargetSpec) -> None:
    entry = _entry(tmp_path, spec, token_level=True)
    ids, z = _write(entry, spec, vocab=300)
    if spec.is_sparse:
        _, targets = entry.read_sparse_shard(0)
    else:
        targets = torch.log_softmax(torch.from_numpy(np.array(entry.read_shard(0)[1])), -1)
    per_row = divergence(z, targets, temperature=1.0, kind="forward_kl")
    assert per_row.shape == (len(ids),)
    assert float(per_row.abs().max()) < 1e-5
    labels = torch.zeros(1, len(ids), dtype=torch.int64)
    dense_or_sparse = targets if spec.is_sparse else targets[None]
    loss = token_kd_loss(z[None], dense_or_sparse, temperature=1.0, labels_BT=labels)
    assert abs(float(loss)) < 1e-5


def test_format_doc_lists_the_layout_columns() -> None:
    from pathlib import Path

    doc = (Path(__file__).parents[2] / "docs" / "format.md").read_text()
    for col in (
        schema.COL_FIRST_POSITION,
        schema.COL_NUM_POSITIONS,
        schema.COL_ROW_LENGTH,
        schema.COL_VALUE_CODES,
        schema.COL_VALUE_MAX,
        schema.COL_VALUE_STEP,
        "sampled_counts",
    ):
        assert f"`{col}`" in doc, col
    assert f"(version {schema.FORMAT_VERSION})" in doc


def test_systematic_sampling_is_unbiased_with_less_variance() -> None:
    """``sampling: systematic`` (one uniform offset per row, Kitagawa 1996): every draw is
    marginally from p, so E[p_hat] = p, and the estimate varies far less than with
    independent draws; the default (multinomial) stays out of the params, so old keys
    stand."""
    z = torch.randn(1, 20) * 1.5
    p = torch.softmax(z.double(), -1)[0]
    many = z.repeat(4000, 1)
    means, variances = {}, {}
    for scheme in ("multinomial", "systematic"):
        spec = TargetSpec(1.0, "sampled_counts", params={"num_samples": 16, "sampling": scheme})
        t = sparsify(many, spec)
        assert isinstance(t, SparseTargets)
        dense = torch.zeros(4000, 20, dtype=torch.float64)
        p_hat = t.log_probs().exp().double().masked_fill(t.ids_BS < 0, 0)
        dense.scatter_add_(1, t.ids_BS.clamp(min=0), p_hat)
        assert torch.allclose(dense.sum(-1), torch.ones(4000, dtype=torch.float64))
        means[scheme], variances[scheme] = dense.mean(0), dense.var(0).sum()
    se = torch.sqrt(p * (1 - p) / (16 * 4000))
    assert bool(((means["systematic"] - p).abs() < 4 * se + 1e-12).all())
    assert variances["systematic"] < 0.5 * variances["multinomial"]
    assert TargetSpec(1.0, "sampled", params={"num_samples": 8, "sampling": "multinomial"}) == (
        TargetSpec(1.0, "sampled", params={"num_samples": 8})
    )
    default = TargetSpec(1.0, "sampled_counts", params={"num_samples": 8})
    assert default == TargetSpec(
        1.0, "sampled_counts", params={"num_samples": 8, "sampling": "systematic"}
    )
    assert default.param("sampling") is None  # the kind's default, left out of the key
    with pytest.raises(ConfigError, match="sampling is a parameter of the sampled kinds"):
        TargetSpec(1.0, "topk", params={"k": 4, "sampling": "systematic"})
    with pytest.raises(ConfigError, match="sampling is a parameter of the sampled kinds"):
        TargetSpec(1.0, "sampled", params={"num_samples": 4, "sampling": "stratified"})
