"""The README's Python quickstart runs as written (with the in-process executor, so the
unit tier needs no Ray)."""

from __future__ import annotations

import os
import re

README = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")


def test_quickstart_runs():
    with open(README) as f:
        text = f.read()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    (quickstart,) = [b for b in blocks if "kdcache.build_cache" in b and "toy_dataset" in b]
    code = quickstart.replace("root=root)", 'root=root, executor="local", progress=False)')
    assert code.count('executor="local"') == 2
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["again"].key == namespace["cache"].key
    assert namespace["loss"].item() >= 0
