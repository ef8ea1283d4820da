"""Config plumbing shared by every xtx model: frozen dataclasses that round-trip.

Every model in xtx is configured by a frozen, keyword-only dataclass (hashable, so
it can be a Linen field and a static ``jax.jit`` argument). This module gives them
three things:

* ``to_dict`` / ``from_dict`` (and JSON): a run can be saved and rebuilt from its
  config file alone. Nested configs become nested dicts, tuples become lists and
  come back as tuples.
* readable printing: ``print(config)`` shows one field per line, nested configs
  indented, and only the fields that differ from their defaults.
* keyword checking: an unknown keyword raises ``TypeError`` naming it and the
  closest valid spelling.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

C = TypeVar("C", bound="Config")


def closest(name: str, choices: Iterable[str]) -> str:
    """Returns ``" (did you mean 'x'?)"`` for the nearest valid name, or ``""``."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def unknown_keyword_error(owner: str, name: str, valid: Iterable[str]) -> TypeError:
    return TypeError(f"{owner} got an unexpected keyword argument {name!r}{closest(name, valid)}")


def _unwrap_optional(tp: Any) -> Any:
    """``X | None`` -> ``X``; anything else unchanged."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [_to_plain(v) for v in value]
    return value


def _from_plain(tp: Any, value: Any) -> Any:
    if value is None:
        return None
    tp = _unwrap_optional(tp)
    if isinstance(tp, type) and issubclass(tp, Config):
        return tp.from_dict(value) if isinstance(value, Mapping) else value
    origin = typing.get_origin(tp)
    if origin is tuple and isinstance(value, list | tuple):
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_from_plain(args[0], v) for v in value)
        if args and len(args) == len(value):
            return tuple(_from_plain(a, v) for a, v in zip(args, value, strict=True))
        return tuple(value)
    if isinstance(value, list):
        # Unannotated or union-typed sequence fields are stored as tuples so that the
        # config stays hashable.
        return tuple(_from_plain(Any, v) for v in value)
    return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """Base class of every xtx config: dict/JSON round trip and readable printing."""

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-serialisable dict of every field (nested configs included)."""
        return _to_plain(self)

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
        """Rebuilds a config from ``to_dict`` output; unknown keys raise ``TypeError``."""
        if not isinstance(data, Mapping):
            raise TypeError(
                f"{cls.__name__}.from_dict expects a mapping, got {type(data).__name__}"
            )
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        kwargs = {}
        for key, value in data.items():
            if key not in names:
                raise unknown_keyword_error(f"{cls.__name__}.from_dict", key, names)
            kwargs[key] = _from_plain(hints[key], value)
        return cls(**kwargs)

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls: type[C], text: str) -> C:
        return cls.from_dict(json.loads(text))

    def replace(self: C, **changes: Any) -> C:
        """``dataclasses.replace`` with a helpful error for misspelt fields."""
        names = {f.name for f in dataclasses.fields(self)}
        for key in changes:
            if key not in names:
                raise unknown_keyword_error(f"{type(self).__name__}.replace", key, names)
        return dataclasses.replace(self, **changes)

    def __str__(self) -> str:
        return self._pretty(0)

    def _pretty(self, indent: int) -> str:
        pad = "    " * (indent + 1)
        lines = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.default is not dataclasses.MISSING and value == f.default:
                continue
            if f.default_factory is not dataclasses.MISSING and value == f.default_factory():
                continue
            shown = value._pretty(indent + 1) if isinstance(value, Config) else repr(value)
            lines.append(f"{pad}{f.name}={shown},")
        if not lines:
            return f"{type(self).__name__}()"
        closing = "    " * indent
        return f"{type(self).__name__}(\n" + "\n".join(lines) + f"\n{closing})"


def field_names(cls: type[Config]) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def split_prefixed(kwargs: dict[str, Any], prefix: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Splits ``kwargs`` into (``prefix``-stripped matches, the rest)."""
    matched = {k[len(prefix) :]: v for k, v in kwargs.items() if k.startswith(prefix)}
    rest = {k: v for k, v in kwargs.items() if not k.startswith(prefix)}
    return matched, rest
