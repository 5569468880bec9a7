"""Teacher specs (teachers described by their files, loaded where they run), actor-pool
planning, and the streaming shard reads of the teacher stage; in-process, no Ray."""

from __future__ import annotations

import hashlib
import os
import pickle
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import kdcache
from kdcache import schema, targets
from kdcache.build.task import check_teacher_vocabularies
from kdcache.data.base import ArrayDataset, ShardBatches, StreamingDataset
from kdcache.errors import ConfigError, DataFileNotFoundError
from kdcache.executors import ExecutorConfig, LocalExecutor, TaskContext
from kdcache.executors.pools import PoolPlan, plan_pools, pool_sizes, unplaceable
from kdcache.schema import TargetSpec
from kdcache.stores.admin import verify
from kdcache.stores.entry import CacheEntry
from kdcache.teachers import TeacherResources, TeacherSpec, file_sha256
from kdcache.teachers import spec as spec_module
from kdcache.testing import linear_teacher, toy_dataset

HERE = __name__  # the import path of this module, for the factories below


def recording_linear(log: str, seed: int = 0) -> torch.nn.Module:
    """A factory that records each call (its pid) in ``log``: the model is built there."""
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\n")
    return linear_teacher(seed=seed).module


def not_a_module() -> str:
    return "nope"


def _calls(log) -> list[int]:
    return [int(x) for x in Path(log).read_text().split()] if os.path.exists(log) else []


def _build(ds, teachers, root, executor="local", **kw):
    kw.setdefault("temperature", 2.0)
    return kdcache.build_cache(ds, teachers, root=root, executor=executor, progress=False, **kw)


@pytest.fixture
def weights(tmp_path):
    """linear_teacher(seed=0)'s weights in a safetensors file."""
    from safetensors.torch import save_file

    path = str(tmp_path / "lin.safetensors")
    save_file(linear_teacher(seed=0).module.state_dict(), path)
    return path


# -- fingerprints --------------------------------------------------------------------------


def test_file_sha256_streams_in_chunks_and_is_memoised(tmp_path, monkeypatch):
    path = tmp_path / "blob.bin"
    data = os.urandom(10_000)
    path.write_bytes(data)
    monkeypatch.setattr(spec_module, "_CHUNK_BYTES", 777)  # many chunks, one partial
    monkeypatch.setattr(spec_module, "_FILE_SHA256", {})
    assert file_sha256(str(path)) == hashlib.sha256(data).hexdigest()
    assert len(spec_module._FILE_SHA256) == 1
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    assert file_sha256(str(path)) == hashlib.sha256(data).hexdigest()
    assert opened == []  # unchanged file: one stat, no read
    monkeypatch.undo()
    with pytest.raises(DataFileNotFoundError, match=r"nope\.bin"):
        file_sha256(str(tmp_path / "nope.bin"))


def test_checkpoint_spec_fingerprint_is_stable_and_follows_the_weights_file(tmp_path, weights):
    log = str(tmp_path / "calls")
    kw = {"log": log}
    spec = TeacherSpec.checkpoint("lin", f"{HERE}:recording_linear", weights, kwargs=kw)
    fp = spec.fingerprint()
    assert fp["spec"] == "checkpoint" and fp["kwargs"] == kw
    assert fp["weights_sha256"] == hashlib.sha256(Path(weights).read_bytes()).hexdigest()
    # stable; the name and the resources are not part of it
    again = TeacherSpec.checkpoint(
        "other", f"{HERE}:recording_linear", weights, kwargs=kw, resources=TeacherResources(2)
    )
    assert again.fingerprint() == fp == spec.fingerprint()
    assert spec.with_resources(TeacherResources(gpus_per_actor=1)).fingerprint() == fp
    # other kwargs, autocast: other fingerprints
    assert (
        TeacherSpec.checkpoint(
            "lin", f"{HERE}:recording_linear", weights, kwargs={**kw, "seed": 1}
        ).fingerprint()
        != fp
    )
    bf16 = TeacherSpec.checkpoint(
        "lin", f"{HERE}:recording_linear", weights, kwargs=kw, autocast_dtype=torch.bfloat16
    )
    assert bf16.fingerprint()["autocast_dtype"] == "torch.bfloat16"
    # the weights file changes: the same spec object's fingerprint changes
    from safetensors.torch import save_file

    save_file(linear_teacher(seed=1).module.state_dict(), weights)
    st = os.stat(weights)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert spec.fingerprint()["weights_sha256"] != fp["weights_sha256"]
    # and it differs from an in-memory Teacher's (whose keys do not change)
    assert fp != linear_teacher(seed=0).fingerprint()
    assert _calls(log) == []  # no model was built for any of this


def test_specs_are_small_picklable_plans_never_built_on_the_driver(tmp_path):
    from safetensors.torch import save_file

    log = str(tmp_path / "calls")
    big = torch.nn.Linear(512, 256)  # 0.5 MB of weights
    path = str(tmp_path / "big.safetensors")
    save_file(big.state_dict(), path)
    spec = TeacherSpec.checkpoint("big", f"{HERE}:recording_linear", path, kwargs={"log": log})
    blob = pickle.dumps(spec)
    assert len(blob) < 2_000 < os.path.getsize(path) // 100
    back = pickle.loads(blob)
    assert back == spec and back.fingerprint() == spec.fingerprint()
    ens = kdcache.TeacherEnsemble([spec, linear_teacher(seed=1)])
    assert ens.teachers[0] is spec
    assert _calls(log) == []


def test_a_spec_is_loaded_once_where_it_runs_and_kept_across_builds(tmp_path, weights, root):
    log = str(tmp_path / "calls")
    spec = TeacherSpec.checkpoint(
        "lin", f"{HERE}:recording_linear", weights, kwargs={"log": log, "seed": 0}
    )
    with LocalExecutor() as ex:
        a = _build(toy_dataset(seed=0), spec, root, executor=ex)
        b = _build(toy_dataset(seed=1), spec, root, executor=ex)
        assert a.key != b.key and not b.build_report.hit
        assert _calls(log) == [os.getpid()]  # loaded once, in the process that ran it
        assert ex.loaded.names == ["lin"] and ex.loaded.num_loads == 1
        _build(toy_dataset(seed=2), linear_teacher(), root, executor=ex)
        assert ex.loaded.names == []  # a build without the spec let go of it
    assert verify(a).ok and verify(b).ok


# -- values: a spec-built entry is the in-memory teacher's ---------------------------------


def test_spec_built_entries_hold_the_in_memory_teachers_values(tmp_path, weights, root):
    ds = toy_dataset()
    t = linear_teacher(seed=0)
    script = str(tmp_path / "lin.pt")
    with warnings.catch_warnings():  # TorchScript is deprecated; teachers still ship in it
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(t.module).save(script)
    specs = [
        TeacherSpec.checkpoint(
            "ckpt", "kdcache.testing:linear_module", weights, kwargs={"num_features": 8}
        ),
        TeacherSpec.torchscript("script", script, config={"in": 8, "out": 5}),
        TeacherSpec.factory("fac", "kdcache.testing:linear_teacher", {"seed": 0}, version=1),
    ]
    want = _build(ds, t, root)
    # mixed: a Teacher object and specs in one ensemble
    view = _build(ds, [linear_teacher(seed=1, name="obj"), *specs], root)
    assert view.build_report.computed == 4 * 4
    assert want.key not in [e.key for e in view.entries]  # spec keys come from the specs
    for spec, entry in zip(specs, view.entries[1:], strict=True):
        assert entry.manifest["teacher"] == spec.fingerprint()
        assert entry.manifest["teacher_name"] == spec.name
        assert verify(entry).ok
        for i in range(ds.num_shards):
            ids, vals = entry.read_shard(i)
            want_ids, want_vals = want.read_shard(i)
            np.testing.assert_array_equal(ids, want_ids)
            np.testing.assert_array_equal(vals, want_vals)
    # the in-memory Teacher's key is what it always was
    material = schema.entry_spec(ds.fingerprint(), t.fingerprint(), TargetSpec(2.0))
    assert want.key == schema.content_key(material)
    again = _build(ds, [linear_teacher(seed=1, name="obj"), *specs], root)
    assert again.build_report.hit


def test_factory_spec_of_a_module_and_its_errors(root):
    spec = TeacherSpec.factory(
        "mod", f"{HERE}:recording_linear", {"log": os.devnull}, version={"v": 2}
    )
    assert spec.config == {"v": 2}
    loaded = spec.load()
    assert loaded.name == "mod" and loaded.config == {"v": 2}
    with pytest.raises(ConfigError, match="non-empty version"):
        TeacherSpec.factory("x", "kdcache.testing:linear_teacher", {})
    with pytest.raises(ConfigError, match="returned str"):
        TeacherSpec.factory("x", f"{HERE}:not_a_module", version=1).load()
    with pytest.raises(ConfigError, match="has no attribute"):
        TeacherSpec.factory("x", "kdcache.testing:no_such_factory", version=1)
    with pytest.raises(ConfigError, match="JSON"):
        TeacherSpec.factory("x", "kdcache.testing:linear_teacher", {"a": object()}, version=1)


def test_missing_files_are_errors_on_creation_naming_the_file(tmp_path, weights):
    with pytest.raises(DataFileNotFoundError, match=r"'a'.*nope\.safetensors"):
        TeacherSpec.checkpoint(
            "a", "kdcache.testing:linear_module", str(tmp_path / "nope.safetensors")
        )
    with pytest.raises(DataFileNotFoundError, match=r"TorchScript file .*gone\.pt"):
        TeacherSpec.torchscript("b", str(tmp_path / "gone.pt"))
    with pytest.raises(DataFileNotFoundError, match=r"model directory .*missing"):
        TeacherSpec.hf("c", str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataFileNotFoundError, match=r"config\.json does not exist"):
        TeacherSpec.hf("d", str(empty))
    (empty / "config.json").write_text("{}")
    with pytest.raises(DataFileNotFoundError, match=r"no weights file in .*empty"):
        TeacherSpec.hf("d", str(empty))
    with pytest.raises(ConfigError, match="task must be one of"):
        TeacherSpec.hf("d", str(empty), task="vision")
    with pytest.raises(ConfigError, match="import path"):
        TeacherSpec.checkpoint("e", "", weights)
    # a file removed after the spec was made: named when the fingerprint is taken
    spec = TeacherSpec.checkpoint("f", "kdcache.testing:linear_module", weights)
    os.unlink(weights)
    with pytest.raises(DataFileNotFoundError, match=r"'f'.*lin\.safetensors no longer exists"):
        spec.fingerprint()


def test_ensemble_of_specs_counts_parameters_only_once_loaded(weights):
    spec = TeacherSpec.checkpoint("s", "kdcache.testing:linear_module", weights)
    ens = kdcache.TeacherEnsemble([spec, linear_teacher(seed=1)])
    with pytest.raises(ConfigError, match=r"\['s'\].*ensemble\.load\(\)"):
        _ = ens.num_parameters
    x = toy_dataset().inputs[:7]
    lp = ens.log_probs(x, temperature=2.0)  # loads the spec here, once
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(7))
    assert ens.num_parameters == 2 * (8 * 5 + 5)
    assert ens.load()[0] is ens.load()[0] and ens.teachers[0] is spec
    with pytest.raises(ConfigError, match=r"Teacher or kdcache\.teachers\.TeacherSpec"):
        kdcache.TeacherEnsemble([torch.nn.Linear(2, 2)])  # type: ignore[list-item]


# -- Hugging Face specs ---------------------------------------------------------------------


def _hf_tokenizer(transformers, path, vocab_words):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", *vocab_words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]"
    )
    fast.save_pretrained(str(path))


def test_hf_spec_knows_the_tokenizer_facts_without_loading_the_model(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    path = tmp_path / "gpt"
    cfg = transformers.GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2, n_positions=16)
    transformers.GPT2LMHeadModel(cfg).eval().save_pretrained(str(path))
    _hf_tokenizer(transformers, path, [f"w{i}" for i in range(23)])  # 25 tokens, 32 logits

    def no_model(*a, **k):
        raise AssertionError("the model must not be loaded on the driver")

    with monkeypatch.context() as m:
        m.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model)
        spec = TeacherSpec.hf("gpt", str(path), task="causal-lm")
        fp = spec.fingerprint()
        cfg_facts = spec.config
    teacher = kdcache.Teacher.from_hf(str(path), task="causal-lm", name="gpt")
    for k in ("vocab_size", "tokenizer_sha256", "pad_token_id", "task"):
        assert cfg_facts[k] == teacher.config[k], k
    assert cfg_facts["vocab_size"] == 25
    assert fp["weights"] and fp["hf_config"]["n_embd"] == 16 and fp["dtype"] == "float32"
    assert "_name_or_path" not in fp["hf_config"]

    # token data: the spec's vocabulary is checked like the teacher's, values are equal
    rng = np.random.default_rng(0)
    seqs = [rng.integers(2, 25, n) for n in (5, 7, 4, 6)]
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in seqs])])
    ds = kdcache.TokenDataset(np.arange(4), np.concatenate(seqs), offsets, num_shards=2)
    assert check_teacher_vocabularies(kdcache.TeacherEnsemble([spec]), ds) == 25
    root = str(tmp_path / "cache")
    a = _build(ds, spec, root, kind="topk", params={"k": 4})
    b = _build(ds, teacher, root, kind="topk", params={"k": 4})
    assert a.key != b.key
    for i in range(2):
        ra, rb = a.read_sparse_shard(i), b.read_sparse_shard(i)
        np.testing.assert_array_equal(ra[0], rb[0])
        torch.testing.assert_close(ra[1].values_BS, rb[1].values_BS)
        torch.testing.assert_close(ra[1].ids_BS, rb[1].ids_BS)

    # rewriting the weights changes the fingerprint
    torch.manual_seed(1)
    transformers.GPT2LMHeadModel(cfg).eval().save_pretrained(str(path))
    assert spec.fingerprint()["weights"] != fp["weights"]


# -- actor pools (planned here; run on Ray in tests/integration/test_ray_pools.py) --------


def test_pools_default_groups_and_own_resources():
    cfg = ExecutorConfig(num_actors=3, cpus_per_actor=2.0)
    ts = [
        linear_teacher(seed=0, name="small-a"),
        kdcache.Teacher.from_module(
            torch.nn.Linear(8, 5), name="big", resources=TeacherResources(gpus_per_actor=1)
        ),
        linear_teacher(seed=1, name="small-b"),
        kdcache.Teacher.from_module(
            torch.nn.Linear(8, 5),
            name="g1",
            resources=TeacherResources(group="mid", memory_bytes=2**30),
        ),
        kdcache.Teacher.from_module(
            torch.nn.Linear(8, 5), name="g2", resources=TeacherResources(group="mid", num_actors=2)
        ),
        kdcache.Teacher.from_module(
            torch.nn.Linear(8, 5), name="plain", resources=TeacherResources()
        ),
    ]
    plans = plan_pools(ts, cfg)
    assert [(p.name, p.teachers) for p in plans] == [
        ("default", (0, 2, 5)),
        ("big", (1,)),
        ("mid", (3, 4)),
    ]
    default, big, mid = plans
    assert (default.num_actors, default.cpus_per_actor, default.gpus_per_actor) == (3, 2.0, 0.0)
    assert (big.num_actors, big.cpus_per_actor, big.gpus_per_actor) == (None, 2.0, 1.0)
    assert (mid.num_actors, mid.memory_bytes) == (2, 2**30)
    assert len({p.resources_key for p in plans}) == 3


def test_pool_conflicts_are_named():
    def t(name, **r):
        return kdcache.Teacher.from_module(
            torch.nn.Linear(2, 2), name=name, resources=TeacherResources(**r)
        )

    cfg = ExecutorConfig()
    with pytest.raises(ConfigError, match=r"'a' and 'b' of group 'g'.*cpus_per_actor"):
        plan_pools([t("a", group="g", cpus_per_actor=1), t("b", group="g", cpus_per_actor=2)], cfg)
    with pytest.raises(ConfigError, match=r"two actor pools would be named 'x'"):
        plan_pools([t("x", num_actors=1), t("y", group="x")], cfg)
    with pytest.raises(ConfigError, match=r"pools would be named 'default'"):
        plan_pools([linear_teacher(), t("default", num_actors=1)], cfg)
    with pytest.raises(ConfigError, match="cpus_per_actor must be a number > 0"):
        TeacherResources(cpus_per_actor=0)
    with pytest.raises(ConfigError, match="num_actors must be an int >= 1"):
        TeacherResources(num_actors=0)
    with pytest.raises(ConfigError, match="resources must be"):
        kdcache.Teacher.from_module(torch.nn.Linear(2, 2), resources={"gpus": 1})  # type: ignore[arg-type]
    # the base executor refuses them before running anything, for every executor
    with pytest.raises(ConfigError, match="of group 'g'"):
        _build(
            toy_dataset(),
            [t("a", group="g", num_actors=1), t("b", group="g", num_actors=2)],
            "/nonexistent-never-written",
        )


def test_pool_sizes_share_the_cluster():
    def plan(name, n=None, cpus=1.0, gpus=0.0, mem=None):
        return PoolPlan(name, (0,), n, cpus, gpus, mem)

    cluster = {"CPU": 8.0, "GPU": 2.0, "memory": 16e9}
    # the default pool alone: one actor per CPU share, capped by the tasks
    assert pool_sizes([plan("d", cpus=2.0)], [100], cluster) == [4]
    assert pool_sizes([plan("d")], [3], cluster) == [3]
    assert pool_sizes([plan("d", gpus=0.5)], [100], cluster) == [4]
    # an explicit pool takes its share first; the others split what is left
    sizes = pool_sizes(
        [plan("d"), plan("big", n=2, cpus=2.0, gpus=1.0), plan("x")], [99] * 3, cluster
    )
    assert sizes == [2, 2, 2]
    assert pool_sizes([plan("d", gpus=1.0)], [9], {"CPU": 4.0}) == [1]  # no GPU: one waits
    assert unplaceable(plan("g", gpus=1.0), {"CPU": 4.0}) == ["1 GPU (the cluster has 0)"]
    assert unplaceable(plan("ok"), cluster) == []


# -- streaming shard reads ------------------------------------------------------------------


class TinyStreaming:
    """A StreamingDataset over an ArrayDataset: batches are cut lazily on the reader's
    thread and hashed as they go; ``read_shard`` is refused, so that only streaming works."""

    layout = "records"

    def __init__(self, base: ArrayDataset) -> None:
        self.base = base
        self.opened: list[int] = []
        self.threads: set[str] = set()

    @property
    def num_shards(self) -> int:
        return self.base.num_shards

    def fingerprint(self):
        return self.base.fingerprint()

    def read_shard(self, index):
        raise AssertionError("the teacher stage must stream records, not read whole shards")

    def open_shard(self, index: int, batch_size: int) -> ShardBatches:
        self.opened.append(index)
        shard = self.base.read_shard(index)
        n = len(shard["sample_id"])
        reader = ShardBatches(index, n, ())

        def batches():
            h = hashlib.sha256()
            for lo in range(0, n, batch_size):
                batch = {k: v[lo : lo + batch_size] for k, v in shard.items()}
                h.update(batch["sample_id"].tobytes() + batch["inputs"].tobytes())
                self.threads.add(threading.current_thread().name)
                yield batch
            reader.digest = "sha256:" + h.hexdigest()

        reader._batches = batches()
        return reader


def _old_compute_shard(ds, teacher, entry, i, batch_size):
    """The teacher stage's records path before streaming: whole shard, then batches."""
    shard = ds.read_shard(i)
    ids = np.array(shard["sample_id"], dtype=np.int64)
    tau = TargetSpec.from_json(entry.spec["targets"]).temperature
    parts = [
        targets.scale_logits(teacher.logits(shard["inputs"][lo : lo + batch_size]), tau).numpy()
        for lo in range(0, len(ids), batch_size)
    ]
    entry.write_shard(i, ids, np.concatenate(parts))


def test_streaming_compute_shard_writes_the_bytes_of_before(tmp_path):
    ds = toy_dataset(num_records=50, num_shards=3)
    t = linear_teacher()
    ex = LocalExecutor(batch_size=7)
    new = _build(ds, t, str(tmp_path / "new"), executor=ex)
    old = CacheEntry(str(tmp_path / "old"), new.key)
    old.write_spec(new.spec)
    for i in range(ds.num_shards):
        _old_compute_shard(ds, t, old, i, 7)
    for i in range(ds.num_shards):
        rec_new, _ = new.committed_shard(i)
        rec_old, _ = old.committed_shard(i)
        assert rec_new.sha256 == rec_old.sha256
        assert rec_new.input_digest is None  # an ArrayDataset computes no digest


@pytest.mark.parametrize(("kind", "params"), [("dense", None), ("topk", {"k": 2, "labels": True})])
def test_a_streaming_dataset_is_read_once_per_shard_ahead_of_the_teachers(tmp_path, kind, params):
    base = toy_dataset(num_records=50, num_shards=3)
    stream = TinyStreaming(base)
    assert isinstance(stream, StreamingDataset)
    teachers = [linear_teacher(seed=0), linear_teacher(seed=1)]
    kw = {"kind": kind, "params": params}
    want = _build(
        base, teachers, str(tmp_path / "array"), executor=LocalExecutor(batch_size=7), **kw
    )
    got = _build(
        stream, teachers, str(tmp_path / "stream"), executor=LocalExecutor(batch_size=7), **kw
    )
    assert [e.key for e in got.entries] == [e.key for e in want.entries]  # same fingerprint
    assert sorted(stream.opened) == [0, 1, 2]  # once per shard, for both teachers
    assert stream.threads == {"kdcache-prefetch"}  # read on the prefetch thread
    for w, g in zip(want.entries, got.entries, strict=True):
        assert verify(g).ok
        for i in range(3):
            rec_w, _ = w.committed_shard(i)
            rec_g, _ = g.committed_shard(i)
            assert rec_g.sha256 == rec_w.sha256  # byte-identical to the whole-shard read
            reader = TinyStreaming(base).open_shard(i, 7)
            list(reader)
            assert rec_g.input_digest == reader.digest is not None


def test_prefetch_depth_and_an_error_mid_shard(monkeypatch, root):
    import kdcache.build.task as task_module
    from kdcache.testing import NaNAt

    depths = []
    real = task_module.prefetch
    monkeypatch.setattr(
        task_module, "prefetch", lambda items, depth: depths.append(depth) or real(items, depth)
    )
    base = toy_dataset(num_records=40, num_shards=2)
    bad_row = base.read_shard(1)["inputs"][15]
    nan = kdcache.Teacher.from_module(NaNAt(linear_teacher().module, float(bad_row[0])), name="n")
    stream = TinyStreaming(base)
    with pytest.raises(kdcache.errors.TeacherOutputError, match=r"'n'.*sample_id 1035"):
        _build(stream, nan, root, executor=LocalExecutor(batch_size=4))
    assert depths == [2, 2]
    entry = CacheEntry(root, os.listdir(os.path.join(root, "entries"))[0])
    assert entry.committed_shard(0) is not None and entry.committed_shard(1) is None
    # the reader thread of the failed shard was stopped
    assert not any(t.name == "kdcache-prefetch" and t.is_alive() for t in threading.enumerate())


def test_task_context_subset_keeps_keys_aligned(weights, root):
    ds = toy_dataset()
    spec = TeacherSpec.checkpoint("s", "kdcache.testing:linear_module", weights)
    t = linear_teacher(seed=3)
    entries = [CacheEntry(root, "a" * 32), CacheEntry(root, "b" * 32)]
    ctx = TaskContext(ds, [t, spec], entries, 8, teacher_keys=["k-t", "k-s"])
    sub = ctx.subset([1])
    assert list(sub.teachers) == [spec] and list(sub.entries) == [entries[1]]
    assert sub.key(0) == "s@k-s" and ctx.spec_keys() == ["s@k-s"]
    bare = TaskContext(ds, [spec], [entries[0]], 8)
    assert bare.key(0) == f"s@{schema.content_key(spec.fingerprint())}"
    with pytest.raises(ConfigError, match="one key per teacher"):
        TaskContext(ds, [t], [entries[0]], 8, teacher_keys=[])
