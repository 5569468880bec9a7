"""Typed configs for all of kdcache: pydantic dataclasses that forbid unknown keys and
convert nothing silently, with errors that name the dotted path.

:func:`config_dataclass` makes a class a pydantic dataclass, and :func:`config_error` turns
pydantic's ``ValidationError`` into a :class:`kdcache.errors.ConfigError` that names the
dotted path, what was expected and what was found. Every config class uses them: the
executor's (:mod:`kdcache.executors.config`) and the jobs' (:mod:`kdcache.jobs.config`).
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, TypeVar, Union, get_args, get_origin

import pydantic.dataclasses
from pydantic import ConfigDict, ValidationError
from typing_extensions import dataclass_transform

from kdcache.errors import ConfigError, redact

T = TypeVar("T")

#: Every config: unknown keys are errors, and types are strict: 1.5 or "3" is no int, 1 is
#: no bool, "2.0" is no number (an int is). Constructed in Python, a nested config must be
#: an instance; config files validate in pydantic's JSON mode, where it is a mapping.
CONFIG = ConfigDict(extra="forbid", strict=True)

#: What a pydantic type error expected, in the words a config's author uses.
_EXPECTED = {
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "dict_type": "a mapping",
    "dataclass_type": "a mapping",
    "dataclass_exact_type": "an instance of {class_name}",
    "list_type": "a list",
    "tuple_type": "a list",
    "none_required": "null",
}


@dataclass_transform(field_specifiers=(dataclasses.field,))
def config_dataclass(cls: type[T]) -> type[T]:
    """Make ``cls`` a pydantic dataclass with :data:`CONFIG` whose errors are ConfigErrors.

    It stays a standard dataclass (``dataclasses.asdict``, ``replace`` and ``fields``
    work); ``__post_init__`` runs after the fields are validated. Constructing it directly
    raises :class:`ConfigError` rather than pydantic's ``ValidationError``.

    Args:
        cls: A class with dataclass field annotations.

    Returns:
        The same class, now a pydantic dataclass.
    """
    out = typing.cast("type[T]", pydantic.dataclasses.dataclass(cls, config=CONFIG))
    init = out.__init__

    @functools.wraps(init)
    def init_raising_config_error(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            init(self, *args, **kwargs)
        except ValidationError as exc:
            raise config_error(exc, type(self)) from exc

    out.__init__ = init_raising_config_error  # type: ignore[method-assign]
    return out


def config_error(exc: ValidationError, cls: type) -> ConfigError:
    """The :class:`ConfigError` for a failed validation of config class ``cls``.

    One line per problem (after a count line when there are several), each naming the
    dotted path from ``cls`` (``teachers.0.kwargs``, ``stream.num_lanes``), what was
    expected and what was found. A ``ConfigError`` raised by a ``__post_init__`` keeps its
    message, prefixed with the path of its config unless the message starts with it.

    Args:
        exc: The error pydantic raised while validating ``cls``.
        cls: The config class validated (the root of the dotted paths).

    Returns:
        The error to raise (the caller chains it to ``exc``).
    """
    lines: list[str | tuple[str, str]] = []
    wanted: dict[tuple[str, str], list[str]] = {}  # (path, found) -> types expected there
    for err in exc.errors(include_url=False):
        path, owner = _resolve(cls, err["loc"])
        kind = err["type"]
        if kind in _EXPECTED:  # a union gives one error per member: say them together
            key = (path or cls.__name__, repr(err["input"]))
            if key not in wanted:
                wanted[key] = []
                lines.append(key)
            class_name = (err.get("ctx") or {}).get("class_name", "")
            wanted[key].append(_EXPECTED[kind].format(class_name=class_name))
        elif kind == "missing":
            lines.append(f"missing required key {path!r} ({_name(owner)})")
        elif kind == "unexpected_keyword_argument" and dataclasses.is_dataclass(owner):
            accepts = ", ".join(f.name for f in dataclasses.fields(owner))
            lines.append(f"unknown key {path!r}; {_name(owner)} accepts: {accepts}")
        else:
            cause = (err.get("ctx") or {}).get("error")
            message = str(cause) if isinstance(cause, ConfigError) else err["msg"]
            if not _names_its_path(message, path, cls):  # "stream.num_lanes ..." names it
                message = f"{path or cls.__name__}: {message}"
            lines.append(message)
    text = [
        line
        if isinstance(line, str)
        else f"{line[0]}: expected {' or '.join(dict.fromkeys(wanted[line]))}, got {line[1]}"
        for line in lines
    ]
    text = list(dict.fromkeys(redact(t) for t in text))  # never echo a credential
    if len(text) == 1:
        return ConfigError(text[0])
    return ConfigError(
        f"{len(text)} problems in {cls.__name__}:" + "".join(f"\n  {t}" for t in text)
    )


def _names_its_path(message: str, path: str, cls: type) -> bool:
    """Whether ``message`` already starts with where it happened: the dotted ``path``, or
    at the root (``path`` empty) a field of ``cls`` and a colon (``"output_dir: ..."``)."""
    if path:
        return message.startswith(path)
    fields = dataclasses.fields(cls) if dataclasses.is_dataclass(cls) else ()
    return any(message.startswith(f"{f.name}:") for f in fields)


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp)


def _unwrap(tp: Any) -> Any:
    """``X | None`` -> ``X``; ``Annotated[X, ...]`` -> ``X``."""
    if get_origin(tp) is typing.Annotated:
        return _unwrap(get_args(tp)[0])
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _unwrap(args[0])
    return tp


def resolve_path(cls: type, loc: tuple[int | str, ...]) -> tuple[str, Any]:
    """The dotted path of a location in config class ``cls`` and the type its last key
    belongs to (``("stream", "global_batch_size")`` -> ``StreamConfig``).

    Args:
        cls: A config dataclass, the root of the path.
        loc: Keys and list indexes from ``cls`` down, as pydantic reports them.

    Returns:
        ``(dotted path, owner)``; the owner is ``Any`` where the types stop (free-form
        mappings, unknown keys).
    """
    return _resolve(cls, loc)


def _resolve(cls: type, loc: tuple[int | str, ...]) -> tuple[str, Any]:
    """The dotted path of a pydantic error location, and the type its last key belongs to.

    Pydantic tags a union member it tried (``deepspeed.str``); the tag is not a key, so the
    walk follows the types and drops it.
    """
    parts: list[str] = []
    owner: Any = cls
    tp: Any = cls
    for item in loc:
        tp = _unwrap(tp)
        if get_origin(tp) in (Union, types.UnionType):
            tags = {_name(get_origin(a) or a): a for a in get_args(tp)}
            tp = next((a for name, a in tags.items() if str(item).startswith(name)), Any)
            continue
        parts.append(str(item))
        owner = tp
        if dataclasses.is_dataclass(tp):
            try:
                tp = typing.get_type_hints(tp).get(str(item), Any)
            except (NameError, TypeError):  # an unresolvable annotation: stop typing
                tp = Any
        elif get_origin(tp) in (list, tuple):
            tp = (get_args(tp) or (Any,))[0]
        elif get_origin(tp) is dict:
            tp = (get_args(tp) or (Any, Any))[-1]
        else:
            tp = Any
    return ".".join(parts), owner
