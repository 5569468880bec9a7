"""`import kdcache` works without Ray, DeepSpeed or Zarr; using them names the extra."""

from __future__ import annotations

import subprocess
import sys

BLOCKER = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"ray", "deepspeed", "zarr"}:
            raise ImportError(f"blocked {name}")
sys.meta_path.insert(0, _Block())
"""


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + code], capture_output=True, text=True, timeout=120
    )


def test_import_without_optional_dependencies():
    proc = _run(
        "import kdcache, kdcache.cli, kdcache.stores.admin, kdcache.train; print(kdcache.__all__)"
    )
    assert proc.returncode == 0, proc.stderr
    assert "build_cache" in proc.stdout


def test_missing_ray_error_names_the_extra():
    proc = _run(
        "import kdcache\n"
        "from kdcache.testing import toy_dataset, linear_teacher\n"
        "from kdcache.errors import MissingDependencyError\n"
        "import tempfile\n"
        "try:\n"
        "    kdcache.build_cache(toy_dataset(), linear_teacher(), temperature=1.0,\n"
        "                        root=tempfile.mkdtemp(), executor='ray', progress=False)\n"
        "except MissingDependencyError as e:\n"
        "    print('ERR', e)\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert "pip install 'kdcache[ray]'" in proc.stdout
