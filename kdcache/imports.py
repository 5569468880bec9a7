"""Objects named by import path (``"package.module:function"``) in configs and specs:
found as Python finds them, then in the current directory and beside the config files read.

The bottom layer, so that datasets (transforms), teachers (factories) and jobs all resolve
names the same way.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import sys
from typing import Any

from kdcache.errors import ConfigError

#: Directories of the config files :func:`load` read in this process, newest first; with
#: the current directory, where :func:`import_object` looks for modules it cannot import.
_CONFIG_DIRS: list[str] = []


def search_dirs() -> list[str]:
    """Where :func:`import_object` looks for a module that ``sys.path`` does not hold.

    Returns:
        The current working directory, then the directories of the config files
        :func:`load` read in this process (newest first), as absolute paths without
        duplicates.
    """
    return list(dict.fromkeys([os.getcwd(), *_CONFIG_DIRS]))


def _import_module(name: str, path: str) -> Any:
    """``importlib.import_module(name)``, falling back to :func:`search_dirs`.

    A module found only in a search directory is imported with that directory appended
    to ``sys.path`` for the duration of the import (so its own imports of sibling modules
    work) and removed after; the module stays in ``sys.modules``. Installed modules and
    ``sys.path`` always win, so a file in the current directory never shadows one.
    """
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        parts = name.split(".")
        if exc.name not in {".".join(parts[: i + 1]) for i in range(len(parts))}:
            raise ConfigError(f"cannot import module {name!r} (from {path!r}): {exc}") from exc
        missing = exc
    except ImportError as exc:
        raise ConfigError(f"cannot import module {name!r} (from {path!r}): {exc}") from exc
    top = name.partition(".")[0]
    dirs = search_dirs()
    for directory in dirs:
        if (
            directory in sys.path
            or importlib.machinery.PathFinder.find_spec(top, [directory]) is None
        ):
            continue
        sys.path.append(directory)
        try:
            return importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(
                f"cannot import module {name!r} (from {path!r}, found in {directory}): {exc}"
            ) from exc
        finally:
            if directory in sys.path:
                sys.path.remove(directory)
    raise ConfigError(
        f"cannot import module {name!r} (from {path!r}): {missing}; looked on sys.path, "
        f"in the current directory and beside the config ({', '.join(dirs)}); install it "
        "or set PYTHONPATH"
    ) from missing


def call_factory(factory: Any, kwargs: dict[str, Any], what: str) -> Any:
    """``factory(**kwargs)``, with a failure named: which factory, with which arguments.

    Raises:
        ConfigError: the factory raised (``TypeError`` for a wrong keyword or a wrongly
            typed value in ``kwargs``, or anything else); chained to the original error.
    """
    try:
        return factory(**kwargs)
    except Exception as exc:
        raise ConfigError(
            f"{what} failed with kwargs {kwargs!r}: {type(exc).__name__}: {exc}; check "
            "the factory's arguments in the config (their names and types)"
        ) from exc


def import_object(path: str) -> Any:
    """Import ``"package.module:attr"`` (or ``"package.module.attr"``).

    Modules are found as Python finds them (``sys.path``, installed packages) and, failing
    that, in the current working directory and in the directory of each config file
    :func:`load` read (see :func:`search_dirs`), so a ``byo_data.py`` beside a config
    imports as ``byo_data:make_dataset`` without ``PYTHONPATH=.``. Such a directory is on
    ``sys.path`` only while the module is imported. Processes that unpickle its objects
    elsewhere (Ray actors on other nodes, spawned DataLoader workers) need the module on
    their own path: ``ray job submit --working-dir .`` ships it.

    Args:
        path: The import path; ``attr`` may be dotted (``module:Class.method``).

    Returns:
        The object.

    Raises:
        ConfigError: the path is malformed, or the module or attribute does not exist.
    """
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ConfigError(f"expected an import path like 'package.module:function', got {path!r}")
    module = _import_module(module_name, path)
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"module {module_name!r} has no attribute {attr!r} (from {path!r})")
        obj = getattr(obj, part)
    return obj
