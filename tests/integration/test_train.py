"""The student stage: two gloo ranks from one cache, exact resume, cached = online
distillation, and one Born-Again generation, all on toy data with tiny students."""

from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest
import torch
import yaml
from netcheck import LOOPBACK, ListeningSockets

import kdcache
from kdcache import losses
from kdcache.cli import main as cli
from kdcache.stream.dataset import ShardedStream
from kdcache.testing import linear_teacher, toy_dataset
from kdcache.train.distributed import cpu_ds_config, init_distributed
from kdcache.train.export import read_safetensors_metadata
from kdcache.train.loop import train_student
from kdcache.train.metrics import read_metrics

pytestmark = pytest.mark.integration

NUM_RECORDS, NUM_SHARDS, TEMPERATURE = 200, 5, 2.0
DATASET = {
    "factory": "kdcache.testing:toy_dataset",
    "kwargs": {"num_records": NUM_RECORDS, "num_shards": NUM_SHARDS},
}


def _ensemble():
    return kdcache.TeacherEnsemble([linear_teacher(seed=s) for s in range(2)], rule="mean_probs")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("train") / "cache")
    ds = toy_dataset(num_records=NUM_RECORDS, num_shards=NUM_SHARDS)
    return kdcache.build_cache(
        ds, _ensemble(), temperature=TEMPERATURE, root=root, executor="local", progress=False
    )


def _config(tmp_path, cache, name, **extra):
    cfg = {
        "output_dir": str(tmp_path / name),
        "student": {"factory": "torch.nn:Linear", "kwargs": {"in_features": 8, "out_features": 5}},
        "cache": {"uri": cache.key, "root": str(cache.root.uri)},
        "dataset": DATASET,
        "eval_dataset": {
            "factory": "kdcache.testing:toy_dataset",
            "kwargs": {"num_records": 60, "num_shards": 2, "seed": 9},
        },
        "loss": {"alpha": 0.7},
        "stream": {"global_batch_size": 16, "num_lanes": 2},
        "max_steps": 15,  # an epoch is 200 // 16 = 12 steps: the run crosses an epoch
        "eval_every": 5,
        "tensorboard": False,
        "deepspeed": {
            "optimizer": {"type": "AdamW", "params": {"lr": 0.05, "torch_adam": True}},
            "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": 3}},
            "steps_per_print": 10**9,
        },
        **extra,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path), cfg["output_dir"]


def _train(*args):
    assert cli(["train", *args, "--no-progress"]) == 0


def test_stop_mid_epoch_and_resume_gives_the_same_losses_and_weights(tmp_path, cache, capsys):
    full_cfg, full_out = _config(tmp_path, cache, "full")
    _train(full_cfg)
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 15 and summary["cache"]["key"] == cache.key

    cut_cfg, cut_out = _config(tmp_path, cache, "cut", checkpoint_every=7)
    _train(cut_cfg)
    # simulate a crash right after the step-7 checkpoint (mid-epoch: 7 of 12 steps)
    with open(os.path.join(cut_out, "checkpoints", "latest"), "w") as f:
        f.write("step7")
    _train(cut_cfg, "--resume")
    resumed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert resumed["start_step"] == 7 and resumed["steps"] == 15

    a = read_metrics(os.path.join(full_out, "metrics.csv"))
    b = read_metrics(os.path.join(cut_out, "metrics.csv"))
    assert [s for s, _ in b["train/loss"]] == list(range(1, 16))  # each step once
    assert a["train/loss"] == b["train/loss"]  # bit-identical on the CPU
    assert a["train/lr"] == b["train/lr"]  # the scheduler state came back too
    assert a["eval/accuracy"] == b["eval/accuracy"]
    wa = kdcache.teachers.load_state_dict(os.path.join(full_out, "student.safetensors"))
    wb = kdcache.teachers.load_state_dict(os.path.join(cut_out, "student.safetensors"))
    for k in wa:
        assert torch.equal(wa[k], wb[k])
    meta = read_safetensors_metadata(os.path.join(full_out, "student.safetensors"))
    assert meta["cache_key"] == cache.key
    assert meta["cache_entries"] == [e.key for e in cache.entries]
    assert meta["student"]["factory"] == "torch.nn:Linear"
    assert meta["config"]["deepspeed"]["scheduler"]["params"] == {"warmup_num_steps": 3}


def test_cached_distillation_equals_online_distillation(cache):
    ds = toy_dataset(num_records=NUM_RECORDS, num_shards=NUM_SHARDS)
    ensemble = _ensemble()
    order = {"batch_size": 20, "seed": 4, "shuffle_window": 30}

    def kd(logits, teacher_log_probs, labels):
        return losses.kd_loss(
            logits, teacher_log_probs, temperature=TEMPERATURE, alpha=0.5, labels_B=labels
        )

    def cached(logits, b):
        return kd(logits, b["teacher_log_probs"], b["labels"])

    def online(logits, b):  # the teachers run in the loop
        return kd(logits, ensemble.log_probs(b["inputs"], temperature=TEMPERATURE), b["labels"])

    runs = []
    for stream, fn in (
        (kdcache.SoftTargetDataset(cache, ds, **order), cached),
        (ShardedStream(ds, **order), online),
    ):
        torch.manual_seed(0)
        _, result = train_student(
            torch.nn.Linear(8, 5),
            stream,
            fn,
            ds_config=cpu_ds_config(lr=0.05, micro_batch_size=20),
            max_steps=14,
            progress=False,
        )
        runs.append(result)
    assert len(runs[0].losses) == 14
    torch.testing.assert_close(runs[0].losses, runs[1].losses, rtol=1e-6, atol=1e-7)
    for k, v in runs[0].state_dict.items():
        torch.testing.assert_close(v, runs[1].state_dict[k], rtol=1e-6, atol=1e-7)


def test_born_again_generation_through_a_new_cache_entry(tmp_path, cache, capsys):
    gen1_cfg, gen1_out = _config(
        tmp_path, cache, "gen1", max_steps=12, compare_hard_labels=True, quantize_int8=True
    )
    _train(gen1_cfg)
    gen1 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert os.path.exists(gen1["plot"]) and os.path.exists(os.path.join(gen1_out, "hard"))
    q = gen1["quantized"]
    assert q["int8_bytes"] > 0 and q["float_bytes"] > 0 and q["int8_samples_per_s"] > 0
    assert 0.0 <= q["int8_accuracy"] <= 1.0

    path = os.path.join(gen1_out, "student.safetensors")
    meta = read_safetensors_metadata(path)
    teacher = kdcache.Teacher.from_checkpoint(
        torch.nn.Linear, path, name="born-again-1", config=meta["student"]["kwargs"]
    )
    ds = toy_dataset(num_records=NUM_RECORDS, num_shards=NUM_SHARDS)
    gen1_cache = kdcache.build_cache(
        ds,
        teacher,
        temperature=TEMPERATURE,
        root=str(cache.root.uri),
        executor="local",
        progress=False,
    )
    assert gen1_cache.key not in [e.key for e in cache.entries]
    # the new entry holds the trained student's logits
    _, scaled = gen1_cache.read_shard(0)
    x = torch.from_numpy(ds.read_shard(0)["inputs"])
    w = kdcache.teachers.load_state_dict(path)
    torch.testing.assert_close(
        torch.from_numpy(np.array(scaled)), (x @ w["weight"].T + w["bias"]) / TEMPERATURE
    )

    gen2_cfg, gen2_out = _config(tmp_path, cache, "gen2", max_steps=12)
    _train(gen2_cfg, f"cache.uri={gen1_cache.key}", "loss.alpha=1.0")
    gen2 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert gen2["cache"]["key"] == gen1_cache.key
    meta2 = read_safetensors_metadata(os.path.join(gen2_out, "student.safetensors"))
    assert meta2["cache_entries"] == [gen1_cache.key]
    losses2 = [v for _, v in read_metrics(os.path.join(gen2_out, "metrics.csv"))["train/loss"]]
    assert np.mean(losses2[-4:]) < np.mean(losses2[:4])  # the second generation learns


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, root, key, out):
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        DS_ACCELERATOR="cpu",
    )
    torch.set_num_threads(1)
    assert init_distributed() == (rank, world)  # before the stream, which reads the world
    ds = toy_dataset(num_records=103, num_shards=5)  # shards of 20 or 21 rows
    cache = kdcache.open_cache(key, root=root)
    stream = kdcache.SoftTargetDataset(cache, ds, batch_size=4, seed=2, num_lanes=2)
    seen = []

    def loss_fn(logits, b):
        seen.append(b["sample_id"].tolist())
        return losses.kd_loss(logits, b["teacher_log_probs"], temperature=TEMPERATURE)

    torch.manual_seed(0)
    _, result = train_student(
        torch.nn.Linear(8, 5),
        stream,
        loss_fn,
        ds_config=cpu_ds_config(lr=0.05, micro_batch_size=4),
        max_steps=2 * len(stream),
        progress=False,
    )
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(
            {
                "seen": seen,
                "steps": result.steps,
                "len": len(stream),
                "weight": result.state_dict["weight"].tolist(),
            },
            f,
        )
    torch.distributed.destroy_process_group()


def test_two_gloo_ranks_see_each_sample_once_per_epoch_with_equal_steps(tmp_path):
    ds = toy_dataset(num_records=103, num_shards=5)
    cache = kdcache.build_cache(
        ds,
        _ensemble(),
        temperature=TEMPERATURE,
        root=str(tmp_path / "c"),
        executor="local",
        progress=False,
    )
    torch.multiprocessing.start_processes(
        _rank_main,
        args=(2, _free_port(), str(tmp_path / "c"), cache.key, str(tmp_path)),
        nprocs=2,
        start_method="spawn",
    )
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    steps_per_epoch = 103 // 8
    assert [r["len"] for r in ranks] == [steps_per_epoch] * 2
    assert [r["steps"] for r in ranks] == [2 * steps_per_epoch] * 2
    assert ranks[0]["weight"] == ranks[1]["weight"]  # data parallel: one model
    single = ShardedStream(ds, batch_size=8, seed=2, num_lanes=2)
    # the global batches are those of one rank with the same global batch, both epochs
    want = [b["sample_id"].tolist() for _ in range(2) for b in single]
    got = [a + b for a, b in zip(ranks[0]["seen"], ranks[1]["seen"], strict=True)]
    assert [sorted(b) for b in got] == [sorted(b) for b in want]
    for epoch in range(2):
        union = [i for b in got[epoch * steps_per_epoch : (epoch + 1) * steps_per_epoch] for i in b]
        assert len(union) == len(set(union)) == 96  # each sample at most once, 8 x 12


def test_ray_train_two_workers_match_one_process(tmp_path, cache, capsys):
    """The same config on Ray Train (TorchTrainer, two gloo workers) and in one process:
    the same global batches, so the same losses up to summation order."""
    pytest.importorskip("ray.train", reason="needs the raytrain extra")
    common = {"max_steps": 6, "eval_every": 0, "eval_dataset": None}
    one_cfg, one_out = _config(tmp_path, cache, "one", **common)
    _train(one_cfg)
    ray_cfg, ray_out = _config(tmp_path, cache, "ray", **common)
    env = {"RAY_ADDRESS": None, "RAY_AUTH_MODE": "disabled", "DS_ACCELERATOR": "cpu"}
    saved = {k: os.environ.pop(k, None) for k in env}
    os.environ.update({k: v for k, v in env.items() if v is not None})
    sockets = ListeningSockets()  # of this process and all below it, while Ray runs
    try:
        with sockets:
            _train(ray_cfg, "--ray", "--num-workers", "2", "ray.cpus_per_worker=0.5")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["world_size"] == 2 and summary["steps"] == 6
    a = read_metrics(os.path.join(one_out, "metrics.csv"))["train/loss"]
    b = read_metrics(os.path.join(ray_out, "metrics.csv"))["train/loss"]
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 7))
    np.testing.assert_allclose([v for _, v in a], [v for _, v in b], rtol=1e-4)
    # the local Ray that `kdcache train --ray` started for itself (GCS, raylet, object
    # manager, agents, workers) listened on 127.0.0.1 only. Known exception: the torch
    # rendezvous store that Ray Train's rank 0 creates (tcp://127.0.0.1:PORT) listens on
    # every interface, as torch's TCPStore does; Ray Train offers no pre-bound socket. It
    # lives in a Ray worker process, whose title names the task it ran last (RayTrain's, or
    # one before it such as execute._propagate_data_context), so it is recognised as the
    # one socket beyond loopback held by a worker ("ray::...") process.
    names = {name for name, _, _ in sockets.seen}
    assert {"gcs_server", "raylet"} <= names, sockets.seen
    beyond = sorted(x for x in sockets.seen if x[1] not in LOOPBACK)
    stores = [x for x in beyond if x[0].startswith("ray::")]
    assert len({port for _, _, port in stores}) <= 1, stores  # one rendezvous store
    assert not [x for x in beyond if x not in stores], beyond


@pytest.fixture
def local_ray(monkeypatch):
    """A Ray instance in this process, on 127.0.0.1 only, shut down after the test."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.train", reason="needs the raytrain extra")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from kdcache.jobs.train import loopback_ray

    with loopback_ray() as local:  # every server of this Ray on 127.0.0.1
        ray.init(num_cpus=2, include_dashboard=False, **local)
        try:
            yield ray
        finally:
            ray.shutdown()


def test_ray_train_reports_each_evaluation_with_a_checkpoint(tmp_path, cache, local_ray):
    """Under Ray Train every evaluation reaches Ray with its checkpoint, persisted under
    ray.storage_path/ray.name, and a resumed run on a fresh output_dir starts from it."""
    from ray.train import Result

    from kdcache.jobs.config import TrainConfig, load
    from kdcache.jobs.train import train_on_ray

    storage = str(tmp_path / "ray-storage")
    ray_settings = {
        "enabled": True,
        "num_workers": 2,
        "cpus_per_worker": 0.5,
        "storage_path": storage,
        "name": "kd-run",
    }
    path, out = _config(
        tmp_path, cache, "evals", max_steps=6, eval_every=2, checkpoint_every=0, ray=ray_settings
    )
    summary = train_on_ray(load(TrainConfig, path))
    assert summary["world_size"] == 2 and summary["steps"] == 6
    run = os.path.join(storage, "kd-run")
    assert summary["ray"]["path"] == run
    assert summary["ray"]["checkpoint"] == os.path.join(run, "step6")
    result = Result.from_path(run)
    frame = result.metrics_dataframe
    assert list(frame["step"]) == [2, 4, 6]  # each evaluation, not only the last step
    assert frame["accuracy"].notna().all() and frame["cross_entropy"].notna().all()
    assert result.metrics["step"] == 6
    with open(os.path.join(out, "metrics.csv")) as f:  # the same numbers as kdcache's log
        assert f"{frame['accuracy'].iloc[-1]:.4f}"[:4] in f.read()
    for step in (2, 4, 6):  # DeepSpeed's checkpoint, persisted by Ray
        files = os.listdir(os.path.join(run, f"step{step}"))
        assert "mp_rank_00_model_states.pt" in files, files

    # resume on a fresh output_dir: the latest checkpoint comes back from Ray's storage
    path2, out2 = _config(
        tmp_path, cache, "resumed", max_steps=8, eval_every=2, checkpoint_every=2, ray=ray_settings
    )
    resumed = train_on_ray(load(TrainConfig, path2), resume=True)
    assert resumed["start_step"] == 6 and resumed["steps"] == 8
    assert os.path.exists(os.path.join(out2, "checkpoints", "step6"))
    assert list(Result.from_path(run).metrics_dataframe["step"])[-1] == 8


def test_resume_checks_a_checkpoint_before_unpickling_it(tmp_path, cache, capsys):
    """A checkpoint is a pickle: one whose bytes do not match the record written when it was
    saved (altered, truncated, planted) is never loaded; the one before it is used."""
    cfg, out = _config(tmp_path, cache, "guarded", checkpoint_every=5)
    _train(cfg)
    ckpts = os.path.join(out, "checkpoints")
    assert os.path.exists(os.path.join(ckpts, "step10", "kdcache-integrity.json"))
    with open(os.path.join(ckpts, "latest"), "w") as f:
        f.write("step10")
    model = os.path.join(ckpts, "step10", "mp_rank_00_model_states.pt")
    with open(model, "r+b") as f:  # a planted or damaged pickle, same size
        f.seek(os.path.getsize(model) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    _train(cfg, "--resume")
    resumed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert resumed["start_step"] == 5  # fell back to the intact step5
    for tag in ("step5", "step10", "step15"):  # nothing intact left to resume from
        os.remove(os.path.join(ckpts, tag, "kdcache-integrity.json"))
    assert cli(["train", cfg, "--resume", "--no-progress"]) == 2
    assert "no intact checkpoint" in capsys.readouterr().err


def test_resume_with_another_batch_size_is_refused(tmp_path, cache, capsys):
    """A resume must continue the same run: a checkpoint (or a stream state) saved with
    another global batch, or another optimizer batch, is refused naming both sizes, also
    where the saved position happens to be a multiple of the new batch (step 10 of 16 rows
    is 160 samples, a multiple of 32: accepted silently before)."""
    from kdcache.errors import ConfigError

    cfg, _ = _config(tmp_path, cache, "batch", max_steps=10, checkpoint_every=5, eval_every=0)
    _train(cfg)
    capsys.readouterr()
    assert cli(["train", cfg, "--resume", "--no-progress", "stream.global_batch_size=32"]) == 2
    err = capsys.readouterr().err
    assert "global batch of 16 rows" in err and "this run has 32" in err, err
    assert "start a new run" in err and "Traceback" not in err
    accum = "deepspeed.gradient_accumulation_steps=2"
    assert cli(["train", cfg, "--resume", "--no-progress", accum]) == 2
    err = capsys.readouterr().err
    assert "optimizer batch of 16 rows" in err and "this run has 32" in err, err
    _train(cfg, "--resume")  # the same sizes resume (here: already done at step 10)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["start_step"] == 10

    ds = toy_dataset(num_records=NUM_RECORDS, num_shards=NUM_SHARDS)
    saved = ShardedStream(ds, batch_size=8, seed=1)
    for _, _ in zip(range(4), saved, strict=False):
        pass
    state = saved.state_dict()
    assert state["consumed"] == 32  # a multiple of 16 too
    with pytest.raises(ConfigError, match=r"global batch of 8 samples .* has 16 \(16 x 1\)"):
        ShardedStream(ds, batch_size=16, seed=1).load_state_dict(state)
    # another world size with the same global batch is a resume, not another run
    ShardedStream(ds, batch_size=4, seed=1, rank=1, world_size=2).load_state_dict(state)


def _rendezvous_main(rank, world, port, out):
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        DS_ACCELERATOR="cpu",
    )
    import psutil

    assert init_distributed() == (rank, world)
    t = torch.ones(1)
    torch.distributed.all_reduce(t)
    listening = [
        [c.laddr.ip, c.laddr.port]
        for c in psutil.Process().net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN
    ]
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"sum": t.item(), "listening": listening}, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_the_ranks_rendezvous_listens_on_loopback_only(tmp_path):
    """torch's env:// store listens on every interface; kdcache's rendezvous on 127.0.0.1
    (MASTER_ADDR on this machine, and the single rank's own) listens there only."""
    pytest.importorskip("psutil")
    port = _free_port()
    torch.multiprocessing.start_processes(
        _rendezvous_main, args=(2, port, str(tmp_path)), nprocs=2, start_method="spawn"
    )
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["sum"] for r in ranks] == [2.0, 2.0]
    assert port in [p for _, p in ranks[0]["listening"]]  # rank 0 holds the store
    for r in ranks:
        assert r["listening"] and all(ip in LOOPBACK for ip, _ in r["listening"]), r
