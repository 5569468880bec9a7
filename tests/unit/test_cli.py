"""The `kdcache` command's cache tools, run in-process."""

from __future__ import annotations

import json
import os

import pytest

import kdcache
from kdcache.cli import main
from kdcache.testing import linear_teacher, toy_dataset


@pytest.fixture
def view(root):
    teachers = [linear_teacher(seed=s) for s in range(2)]
    return kdcache.build_cache(
        toy_dataset(), teachers, temperature=2.0, root=root, executor="local", progress=False
    )


def test_ls_inspect_alias(view, root, capsys):
    assert main(["ls", root]) == 0
    out = capsys.readouterr().out
    assert out.count("complete") == 2 and view.key in out
    assert main(["inspect", view.key, "--root", root]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "ensemble" and info["num_rows"] == 64 and len(info["teachers"]) == 2
    assert len(info["samples"]) == 3
    probs = info["samples"][0]["top_probs"]  # probabilities (not logits), best first
    assert all(0 <= p <= 1 for p in probs) and probs == sorted(probs, reverse=True)
    assert sum(probs) <= 1 + 1e-3
    assert main(["alias", root, "mine", view.key]) == 0
    capsys.readouterr()
    assert main(["inspect", "mine", "--root", root, "--samples", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["key"] == view.key


def test_verify_ok_then_fault_named_with_nonzero_exit(view, root, capsys):
    assert main(["verify", view.key, "--root", root]) == 0
    assert "8 shard(s), 128 row(s): ok" in capsys.readouterr().out
    victim = view.entries[1]
    path = os.path.join(victim.shards_location.uri, "shard-00003.arrow")
    with open(path, "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01\x02")
    assert main(["verify", view.key, "--root", root]) == 1
    out = capsys.readouterr().out
    assert f"FAULT {victim.key}/shard-00003.arrow" in out


def test_unknown_name_is_a_clear_error(root, capsys):
    os.makedirs(root)
    assert main(["inspect", "nope", "--root", root]) == 2
    assert "kdcache ls" in capsys.readouterr().err
