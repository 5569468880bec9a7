from __future__ import annotations

import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture
def root(tmp_path):
    """A fresh cache root (local directory)."""
    return str(tmp_path / "cache")
