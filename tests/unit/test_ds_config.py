"""What kdcache fills in a user's DeepSpeed config, and only that."""

from __future__ import annotations

import pytest

from kdcache.errors import ConfigError
from kdcache.train.distributed import prepare_ds_config


def _config(**params):
    return {
        "optimizer": {"type": "AdamW", "params": {"lr": 0.01}},
        "scheduler": {"type": "WarmupCosineLR", "params": params},
    }


def test_auto_scheduler_steps_follow_the_run():
    """``total_num_steps`` absent or "auto" and ``warmup_num_steps: auto`` are filled from
    the run's steps (10% warm-up), so a shortened run keeps the schedule's shape."""
    for steps in (3744, 3, 1):
        out = prepare_ds_config(
            _config(total_num_steps="auto", warmup_num_steps="auto", warmup_type="linear"),
            micro_batch_size=128,
            total_steps=steps,
        )
        params = out["scheduler"]["params"]
        assert params["total_num_steps"] == steps
        assert params["warmup_num_steps"] == max(1, steps // 10)
        assert params["warmup_type"] == "linear" and out["train_micro_batch_size_per_gpu"] == 128
    assert prepare_ds_config(_config(), micro_batch_size=8, total_steps=50)["scheduler"][
        "params"
    ] == {"total_num_steps": 50}


def test_what_the_user_wrote_is_kept():
    given = _config(total_num_steps=100, warmup_num_steps=7)
    out = prepare_ds_config(given, micro_batch_size=16, total_steps=3)
    assert out["scheduler"]["params"] == {"total_num_steps": 100, "warmup_num_steps": 7}
    assert given["scheduler"]["params"] == {"total_num_steps": 100, "warmup_num_steps": 7}
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu=32"):
        prepare_ds_config(
            {**given, "train_micro_batch_size_per_gpu": 32}, micro_batch_size=16, total_steps=3
        )
