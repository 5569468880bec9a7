"""torch.distributed and DeepSpeed set-up: process group, DeepSpeed configs (passed through
with only kdcache's values filled in), means over ranks, the loss normalizer that makes a
loss world-size independent, and gathered weights."""

from __future__ import annotations

import json
import logging
import os
import socket
from typing import Any

import torch

from kdcache import quiet
from kdcache.errors import ConfigError, require

log = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: Rendezvous hosts that mean "this machine only".
LOOPBACK_HOSTS = ("127.0.0.1", "localhost")


def _init_on_loopback(backend: str) -> None:
    """The process group of a rendezvous on 127.0.0.1, listening there only.

    torch's own ``env://`` rendezvous makes rank 0's TCPStore server listen on every
    interface, whatever MASTER_ADDR says; here rank 0 binds the listening socket to
    127.0.0.1 itself and hands it to the store. With gloo, its sockets are kept on the
    loopback interface too (``GLOO_SOCKET_IFNAME=lo`` unless set: gloo otherwise binds the
    address the host name resolves to).
    """
    import datetime

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    port = int(os.environ["MASTER_PORT"])
    if backend == "gloo" and os.path.exists("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    timeout = datetime.timedelta(minutes=30)  # torch's default for process groups
    if rank == 0:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            sock.close()
            raise ConfigError(
                f"cannot listen on 127.0.0.1:{port} for the ranks' rendezvous (MASTER_PORT): "
                f"{exc}; pick a free MASTER_PORT"
            ) from exc
        sock.listen(2048)
        store = torch.distributed.TCPStore(
            "127.0.0.1", port, world, True, timeout, master_listen_fd=sock.detach()
        )
    else:
        store = torch.distributed.TCPStore("127.0.0.1", port, world, False, timeout)
    torch.distributed.init_process_group(
        backend, store=store, rank=rank, world_size=world, timeout=timeout
    )


def init_distributed() -> tuple[int, int]:
    """Initialise torch.distributed for DeepSpeed, also for a plain single-process run.

    Launchers (``deepspeed``, ``torchrun``, Ray Train) set RANK/WORLD_SIZE/MASTER_*; when
    they are absent this is a single rank on 127.0.0.1. Without CUDA the CPU accelerator
    and the gloo backend are used. A rendezvous on this machine (MASTER_ADDR 127.0.0.1 or
    localhost, the single rank's included; not torchrun's agent store) listens on
    127.0.0.1 only (torch's ``env://`` store would listen on every interface).

    Returns:
        ``(rank, world_size)``.

    Raises:
        MissingDependencyError: DeepSpeed is not installed (extra ``deepspeed``).
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    # DeepSpeed's start-up lines (op built, banners) to debug level, real output through
    with quiet.deepspeed_output():
        deepspeed = require("deepspeed", "deepspeed")
        added: list[str] = []
        if not torch.distributed.is_initialized():
            # A single rank of our own. The rendezvous address is set for the init only and
            # removed after, so that processes this one starts later (a demo's subprocess,
            # a Ray worker) never inherit a port this process still holds; the rank
            # variables stay (DeepSpeed's engine reads LOCAL_RANK).
            for k, v in (
                ("RANK", "0"),
                ("LOCAL_RANK", "0"),
                ("WORLD_SIZE", "1"),
                ("MASTER_ADDR", "127.0.0.1"),
                ("MASTER_PORT", None),
            ):
                if k not in os.environ:
                    os.environ[k] = v if v is not None else str(_free_port())
                    added.append(k)
        try:
            if (
                not torch.distributed.is_initialized()
                and os.environ.get("MASTER_ADDR") in LOOPBACK_HOSTS
                and os.environ.get("MASTER_PORT", "").isdigit()
                and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
            ):
                _init_on_loopback(backend)
            # With a process group already there (Ray Train, torchrun, the one above)
            # this only makes DeepSpeed's communication backend, as deepspeed.initialize
            # would.
            deepspeed.init_distributed(dist_backend=backend, verbose=False)
        finally:
            for k in added:
                if k.startswith("MASTER_"):
                    os.environ.pop(k, None)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def load_ds_config(ds_config: dict[str, Any] | str) -> dict[str, Any]:
    """A DeepSpeed config from a dict or a JSON file path (returned as a new dict).

    Raises:
        ConfigError: the file does not exist or is not JSON.
    """
    if isinstance(ds_config, dict):
        return json.loads(json.dumps(ds_config))
    try:
        with open(ds_config) as f:
            return dict(json.load(f))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read DeepSpeed config {ds_config}: {exc}") from exc


def cpu_ds_config(lr: float = 1e-3, micro_batch_size: int = 128) -> dict[str, Any]:
    """A minimal DeepSpeed config that runs on the CPU (gloo, torch Adam, fp32)."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": lr, "weight_decay": 0.0, "torch_adam": True},
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def prepare_ds_config(
    ds_config: dict[str, Any] | str, *, micro_batch_size: int, total_steps: int
) -> dict[str, Any]:
    """The user's DeepSpeed config with only the values kdcache owns filled in.

    Everything the user wrote passes through untouched. Filled when absent or ``"auto"``:
    ``train_micro_batch_size_per_gpu`` (the stream's per-rank batch) and, for the
    schedulers that need it (``WarmupDecayLR``, ``WarmupCosineLR``), the scheduler's
    ``total_num_steps`` (optimizer steps of the whole run, from the manifest's row
    count, the epochs and the batch). Filled only when ``"auto"``: a scheduler's
    ``warmup_num_steps``, as 10% of the run's optimizer steps (at least 1), so that a
    config whose run is shortened or lengthened by an override (``max_steps=``,
    ``epochs=``) keeps the shape of its schedule.

    Args:
        ds_config: Dict or JSON path.
        micro_batch_size: Rows per rank per micro-step.
        total_steps: Optimizer steps of the run.

    Returns:
        A new dict.

    Raises:
        ConfigError: the file cannot be read, or the config sets a micro-batch that
            differs from the stream's.
    """
    config = load_ds_config(ds_config)
    micro = config.get("train_micro_batch_size_per_gpu", "auto")
    if micro == "auto":
        config["train_micro_batch_size_per_gpu"] = micro_batch_size
    elif int(micro) != micro_batch_size:
        raise ConfigError(
            f"the DeepSpeed config sets train_micro_batch_size_per_gpu={micro}, but the stream "
            f"gives each rank {micro_batch_size} rows per micro-step; remove the key (kdcache "
            "fills it) or make the batch sizes agree"
        )
    scheduler = config.get("scheduler")
    if isinstance(scheduler, dict) and scheduler.get("type") in TOTAL_STEP_SCHEDULERS:
        params = scheduler.setdefault("params", {})
        if params.get("total_num_steps", "auto") == "auto":
            params["total_num_steps"] = int(total_steps)
            log.info("DeepSpeed scheduler %s: total_num_steps=%d", scheduler["type"], total_steps)
    if isinstance(scheduler, dict) and isinstance(scheduler.get("params"), dict):
        params = scheduler["params"]
        if params.get("warmup_num_steps") == "auto":
            params["warmup_num_steps"] = max(1, int(total_steps) // 10)
            log.info(
                "DeepSpeed scheduler %s: warmup_num_steps=%d (10%% of %d steps)",
                scheduler.get("type"),
                params["warmup_num_steps"],
                total_steps,
            )
    return config


#: DeepSpeed schedulers whose ``total_num_steps`` kdcache fills when the config leaves it.


TOTAL_STEP_SCHEDULERS = ("WarmupDecayLR", "WarmupCosineLR")


def data_parallel_normalizer(count: int) -> float:
    """The divisor that turns a rank's loss sum into its share of the global-batch mean.

    DeepSpeed (like DDP) averages the gradients of the W data-parallel ranks. A rank whose
    loss term is ``sum_local / (N_global / W)``, with ``N_global`` the rows that count in
    the term summed over the ranks, therefore contributes exactly its share of
    ``sum_all / N_global``: the gradient one process would get from the whole global
    batch, however the labelled (or unmasked) rows fall on the ranks. Pass it as
    ``normalizer=`` to the losses of :mod:`kdcache.losses` on every rank.

    It is a collective (one all-reduce of one number): every rank must call it the same
    number of times in the same order, which the kdcache losses do (once per term, also
    when a rank has no such row). With gradient accumulation each micro-step is averaged
    over its own global micro-batch, as DeepSpeed averages the micro-steps.

    Args:
        count: This rank's number of rows that count in the term, >= 0.

    Returns:
        ``N_global / W`` as a float; ``count`` itself without a process group or with a
        single rank (so a one-process run is unchanged, bit for bit).

    Example:
        >>> data_parallel_normalizer(7)  # no process group: the count itself
        7.0
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return float(count)
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    total = torch.tensor([float(count)], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return float(total.item()) / dist.get_world_size()


def skip_single_rank_allreduce(engine: Any) -> bool:
    """Turn off a DeepSpeed engine's gradient all-reduce where it is the identity.

    After each backward DeepSpeed all-reduces the gradients over the data-parallel ranks:
    a flatten, a pass through the communication backend and an unflatten copied back.
    Over one rank in float32 without ZeRO that changes no value, so it is switched off
    (``engine.enable_backward_allreduce``); the gradients, and so every weight, are
    bit-identical. Anything else keeps it: several ranks, ZeRO (its optimizer partitions
    the gradients in that step), fp16/bf16, a communication dtype other than the
    gradients' float32, or a gradient pre-divide factor other than 1 (its divide and
    multiply round).

    Args:
        engine: The engine ``deepspeed.initialize`` returned.

    Returns:
        True where the all-reduce was switched off.
    """
    keeps = (
        not getattr(engine, "enable_backward_allreduce", False)
        or int(getattr(engine, "dp_world_size", 0)) != 1
        or (torch.distributed.is_initialized() and torch.distributed.get_world_size() != 1)
        or engine.zero_optimization_stage() != 0
        or engine.fp16_enabled()
        or engine.bfloat16_enabled()
        or engine.communication_data_type != torch.float32
        or float(engine.gradient_predivide_factor()) != 1.0
        or any(p.dtype != torch.float32 for p in engine.module.parameters() if p.requires_grad)
    )
    if keeps:
        return False
    engine.enable_backward_allreduce = False
    return True


def _mean_over_ranks(value: float, world: int) -> float:
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return float(t.item()) / world


def _gathered_state(engine: Any) -> dict[str, torch.Tensor]:
    """The module's weights as float32 CPU tensors, gathered first under ZeRO-3."""
    module = engine.module
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    else:
        state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
