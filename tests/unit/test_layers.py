"""Imports go one way: a module never imports from a layer above its own.

Every module under ``kdcache/`` is parsed with :mod:`ast` (imports at any depth: module
level, in functions, under ``TYPE_CHECKING``; ``import x``, ``from x import y`` and
relative imports). Each module is mapped to its layer by the longest matching prefix in
:data:`LAYERS`; an import of a higher layer, or of ``pipelines``, fails the test with the
importing file, the line and the imported module. Modules in one layer may import each
other. ``docs/architecture.md`` describes the layers.

``kdcache demo`` runs a pipeline with ``runpy`` as ``__main__``; that is not an import and
is not checked here.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "kdcache"

#: Layers, lowest first; a module may import its own layer and every layer below it.
LAYERS: tuple[tuple[str, ...], ...] = (
    (
        "kdcache._version",
        "kdcache.errors",
        "kdcache.imports",
        "kdcache.validation",
        "kdcache.schema",
        "kdcache.progress",
        "kdcache.quiet",
        "kdcache.local_ray",
    ),
    ("kdcache.targets",),
    ("kdcache.losses",),  # losses may import targets, not the reverse
    ("kdcache.stores",),
    ("kdcache.data",),
    ("kdcache.teachers",),
    ("kdcache.build.task", "kdcache.build.report"),
    ("kdcache.executors",),
    ("kdcache.build.stage", "kdcache.build"),  # ``kdcache.build`` is the package itself
    ("kdcache.stream",),
    ("kdcache.train",),
    ("kdcache.jobs",),
    ("kdcache.cli",),
    ("kdcache.testing", "kdcache.__main__", "kdcache"),  # ``kdcache`` is kdcache/__init__.py
)

_RANK = {prefix: rank for rank, prefixes in enumerate(LAYERS) for prefix in prefixes}


def layer_of(module: str) -> int:
    """Rank of the layer holding ``module`` (longest matching prefix in :data:`LAYERS`)."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        rank = _RANK.get(".".join(parts[:n]))
        if rank is not None:
            return rank
    raise KeyError(module)


def _layer_name(rank: int) -> str:
    return " / ".join(LAYERS[rank])


def module_name(path: Path, root: Path = ROOT) -> str:
    """``kdcache/stores/entry.py`` -> ``kdcache.stores.entry``; packages drop ``__init__``."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str, root: Path) -> bool:
    """Whether ``name`` is a module or package in the tree at ``root``."""
    base = root.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


@dataclass(frozen=True)
class Import:
    file: str  # repository-relative path of the importing module
    line: int
    importer: str  # dotted name of the importing module
    imported: str  # dotted name of the most specific module the statement names

    def __str__(self) -> str:
        what = "kdcache (kdcache/__init__.py)" if self.imported == "kdcache" else self.imported
        return f"{self.file}:{self.line}: {self.importer} imports {what}"


def imports_of(path: Path, root: Path = ROOT) -> list[Import]:
    """Every import statement in one file, resolved to absolute module names."""
    name = module_name(path, root)
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    rel = str(path.relative_to(root))
    found: list[Import] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=rel)):
        if isinstance(node, ast.Import):
            found += [Import(rel, node.lineno, name, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                assert node.level - 1 < len(parts), f"{rel}:{node.lineno}: relative import too deep"
                base = ".".join(parts[: len(parts) - (node.level - 1)])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            for alias in node.names:
                # ``from pkg import sub`` imports the submodule when there is one
                sub = f"{base}.{alias.name}"
                target = sub if alias.name != "*" and _is_module(sub, root) else base
                found.append(Import(rel, node.lineno, name, target))
    return sorted(found, key=lambda imp: imp.line)


def _all_imports() -> list[Import]:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20, f"found only {len(files)} modules under {PACKAGE}"
    return [imp for path in files for imp in imports_of(path)]


def _is_ours(module: str, top: str) -> bool:
    return module == top or module.startswith(top + ".")


def layer_violations(imports: list[Import]) -> list[str]:
    """One line per import of a higher layer or of ``pipelines``."""
    problems = []
    for imp in imports:
        if _is_ours(imp.imported, "pipelines"):
            problems.append(f"{imp}: kdcache never imports pipelines/ (recipes)")
        elif _is_ours(imp.imported, "kdcache"):
            own, other = layer_of(imp.importer), layer_of(imp.imported)
            if other > own:
                problems.append(
                    f"{imp}: layer {_layer_name(own)!r} may not import the higher layer "
                    f"{_layer_name(other)!r}"
                )
    return problems


def test_every_module_has_a_layer():
    unmapped = []
    for path in sorted(PACKAGE.rglob("*.py")):
        try:
            layer_of(module_name(path))
        except KeyError:
            unmapped.append(str(path.relative_to(ROOT)))
    assert not unmapped, f"modules outside every layer (add them to LAYERS): {unmapped}"


def test_imports_go_one_way():
    problems = layer_violations(_all_imports())
    assert not problems, "imports against the layer order:\n" + "\n".join(problems)


# -- the checker itself -----------------------------------------------------------------


def test_layer_of_uses_the_longest_prefix():
    assert layer_of("kdcache.errors") == layer_of("kdcache.schema") == 0
    assert layer_of("kdcache.targets.sparse") < layer_of("kdcache.losses.kd")
    assert layer_of("kdcache.build.task") < layer_of("kdcache.executors.ray")
    assert layer_of("kdcache.executors.ray") < layer_of("kdcache.build")
    assert layer_of("kdcache.build") == layer_of("kdcache.build.stage")
    assert layer_of("kdcache") == layer_of("kdcache.testing.store_suite") == len(LAYERS) - 1
    with pytest.raises(KeyError):
        layer_of("pipelines.models")


def test_checker_resolves_relative_and_nested_imports_and_flags_upward_ones(tmp_path):
    pkg = tmp_path / "kdcache" / "targets"
    pkg.mkdir(parents=True)
    (tmp_path / "kdcache" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("from . import dense\n")
    source = (
        "from __future__ import annotations\n"
        "from .dense import x\n"  # same layer
        "from ..errors import KDCacheError\n"  # below
        "def f():\n"
        "    from ..losses import kd\n"  # above, inside a function
        "    import pipelines.models\n"
        "    return kd\n"
    )
    (pkg / "sparse.py").write_text(source)
    found = imports_of(pkg / "sparse.py", root=tmp_path)
    assert [i.imported for i in found] == [
        "__future__",
        "kdcache.targets.dense",
        "kdcache.errors",
        "kdcache.losses",
        "pipelines.models",
    ]
    problems = layer_violations(found)
    assert len(problems) == 2
    assert problems[0].startswith("kdcache/targets/sparse.py:5: kdcache.targets.sparse imports")
    assert "kdcache.losses" in problems[0]
    assert ":6:" in problems[1] and "pipelines" in problems[1]


# -- what importing costs -----------------------------------------------------------------

_HEAVY = ("ray", "deepspeed", "zarr")


def test_import_kdcache_loads_no_optional_dependency():
    """Unlike ``test_optional_deps.py`` (which blocks the imports), these packages are
    installed here: ``import kdcache`` must still not load them (they cost seconds)."""
    code = (
        "import sys, kdcache, kdcache.stores, kdcache.stream, kdcache.testing\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {_HEAVY!r}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", f"import kdcache loaded {proc.stdout.strip()}"


def test_kdcache_testing_imports_without_pytest():
    """The store suite needs pytest; ``kdcache.testing`` itself must not."""
    code = (
        "import sys\n"
        "class _Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'pytest', '_pytest'}:\n"
        "            raise ImportError(f'blocked {name}')\n"
        "sys.meta_path.insert(0, _Block())\n"
        "import kdcache.testing\n"
        "kdcache.testing.toy_dataset()\n"
        "assert 'kdcache.testing.store_suite' not in sys.modules\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
