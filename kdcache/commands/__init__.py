"""Subcommands of the ``kdcache`` command, one module per group.

Each module defines ``register(subparsers)``, which adds its parsers and sets
``func=handler`` on each; a handler takes ``(args, rest)`` and returns an exit code.
``rest`` holds unparsed arguments and is non-empty only for parsers that set
``passthrough=True`` (``demo`` forwards them to the job).
"""

from __future__ import annotations

#: The modules ``kdcache.cli`` loads, in help order.
COMMAND_MODULES = (
    "kdcache.commands.demo",
    "kdcache.commands.build",
    "kdcache.commands.train",
    "kdcache.commands.cache_tools",
    "kdcache.commands.submit",
)
