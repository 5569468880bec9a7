"""The language-model job end to end on a small subset of the real fortunes corpus,
through the real Ray, Arrow and DeepSpeed code, run as a user runs it (`kdcache demo`)."""

from __future__ import annotations

import os

import pytest
from demo_runner import run_demo

from pipelines.corpora import FORTUNES_DIR

pytestmark = pytest.mark.integration

ARGS = [
    "--quick",
    "--subset",
    "240",
    "--vocab-size",
    "320",
    "--max-tokens",
    "32",
    "--teacher-steps",
    "6",
    "--student-steps",
    "4",
    "--batch-size",
    "16",
    "--num-shards",
    "3",
    "--seq-kd",
    "--num-prompts",
    "16",
    "--new-tokens",
    "6",
    "--no-progress",
]


def _demo(work, *extra):
    return run_demo("fortunes-lm", work, *ARGS, *extra)


def test_lm_demo_end_to_end_then_cache_hit(tmp_path):
    """Teachers, both caches, sequence-level data, four students, report; then a hit."""
    assert os.path.isdir(FORTUNES_DIR), "the fortunes corpus is missing: apt-get install fortunes"
    report, proc = _demo(tmp_path)
    names = [m["name"] for m in report["models"]]
    assert names == [
        "gpt-a",
        "gpt-b",
        "ensemble",
        "student-hard",
        "student-topk",
        "student-sampled",
        "student-seqkd",
    ]
    vocab = report["data"]["vocab_size"]
    for m in report["models"]:
        # a model no better than uniform would have perplexity ~V; these are trained a bit
        assert 1.0 < m["perplexity"] < 2 * vocab, m
        assert m["tokens"] == report["data"]["validation_tokens"] > 0
    caches = {c["name"].split(" (")[0]: c for c in report["caches"]}
    assert set(caches) == {"top-k", "sampled", "seq-kd top-k"}
    for c in caches.values():
        assert c["teachers"] == 2 and not c["hit"]
        assert 0 < c["bytes_per_token"] < c["dense_fp32_bytes_per_token"]
    assert caches["top-k"]["tokens"] == report["data"]["train_target_tokens"]
    for stage in ("teachers (train)", "teacher stage: top-k", "student: student-topk", "total"):
        assert report["timings_s"][stage] > 0
    assert "val ppl" in proc.stdout and "bytes/token" in proc.stdout

    # A rerun finds every entry by key: rebuild the same data and teachers in-process
    # (cheaper than a second job) and ask the teacher stage again.
    import kdcache
    from pipelines import lm_fortunes as lm

    s = lm.parse_args(["--work-dir", str(tmp_path), *ARGS, "--executor", "local"])
    data = lm.prepare_data(s)
    specs = lm.teacher_specs([lm.train_or_load_teacher(t, data, s) for t in lm.TEACHERS])
    again = lm._build(s, data["train"], kdcache.TeacherEnsemble(specs), "topk", {"k": s.top_k})
    assert again.build_report.hit
    assert again.key == caches["top-k"]["key"]
