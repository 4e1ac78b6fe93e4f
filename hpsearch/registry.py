"""Name → builder tables: the one plug-in mechanism for models, datasets, optimizers and the rest.

Every registry is filled the same way, ``REG.register(builder, **facts)`` or ``@REG.register(**facts)``:
the key is the builder's own ``__name__`` (or ``name=`` for a class from another package), and the
facts a registry needs before anything is built (a model's input size and task, when a scheduler
steps) are typed keyword arguments, checked when the entry is registered.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar, overload

from hpsearch.errors import HpsearchError

F = TypeVar("F", bound=Callable[..., Any])
M = TypeVar("M")
G = TypeVar("G", bound=Callable[..., Any])


class UnknownName(HpsearchError, KeyError):
    """A name that is not in a registry; the message lists the known names."""

    def __str__(self) -> str:
        return str(self.args[0])


class NoFacts:
    """The facts of a registry whose entries need none."""


class Registry(Generic[F, M]):
    """A named table of builders, each with the facts (an instance of ``facts``) it registered with."""

    def __init__(
        self,
        kind: str,
        facts: Callable[..., M] = NoFacts,  # type: ignore[assignment]
        fixed: tuple[str, ...] = (),
        hidden: frozenset[str] = frozenset(),
    ) -> None:
        self.kind = kind
        self._facts_type = facts
        # Arguments the caller always supplies itself; a study file may not set them.
        self.fixed = fixed
        # Keyword arguments that are implementation switches (torch's ``foreach``), not hyperparameters.
        self.hidden = hidden
        self._entries: dict[str, tuple[F, M]] = {}

    @overload
    def register(self, fn: G, /, *, name: str | None = None, **facts: Any) -> G: ...
    @overload
    def register(self, fn: None = None, /, *, name: str | None = None, **facts: Any) -> Callable[[G], G]: ...

    def register(self, fn: Any = None, /, *, name: str | None = None, **facts: Any) -> Any:
        """Add ``fn`` under ``name`` (default: its ``__name__``); a decorator when ``fn`` is None.

        The facts are checked now, so a missing or misspelled one fails when the module is imported.
        """
        built = self._facts_type(**facts)

        def add(f: G) -> G:
            key = name or f.__name__
            if key in self._entries:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._entries[key] = (f, built)  # type: ignore[assignment]
            return f

        return add(fn) if fn is not None else add

    def __getitem__(self, name: str) -> F:
        return self._entry(name)[0]

    def facts(self, name: str) -> M:
        """The facts ``name`` was registered with."""
        return self._entry(name)[1]

    def _entry(self, name: str) -> tuple[F, M]:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise UnknownName(f"unknown {self.kind} {name!r}; valid: {', '.join(self.names())}") from None

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def params(self, name: str) -> dict[str, inspect.Parameter]:
        """Keyword arguments a study file may set for ``name``: its signature less fixed and hidden ones."""
        return {k: p for k, p in keywords(self[name]).items() if k not in self.fixed and k not in self.hidden}

    def doc(self, name: str) -> str:
        """First line of the entry's docstring, for ``hpsearch list``."""
        text = inspect.getdoc(self[name]) or ""
        return text.splitlines()[0] if text else ""


def keywords(fn: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    """``fn``'s keyword arguments, annotations resolved to real types where they can be."""
    target = fn.__init__ if inspect.isclass(fn) else fn
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # a forward reference the other package never defines: use the raw annotations
        hints = {}
    return {
        p.name: p.replace(annotation=hints.get(p.name, p.annotation))
        for p in inspect.signature(target).parameters.values()
        if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def value_kind(param: inspect.Parameter) -> type | None:
    """The kind of value ``param`` takes: bool, int, float, str or list (any sequence), else None.

    The annotation decides where there is one (``momentum: float = 0`` is a float), else the
    default's type; a float anywhere in a union wins over int, since an int is a valid float.
    """
    kinds = _kinds(param.annotation)
    for kind in (float, int, bool, str, list):
        if kind in kinds:
            return float if kind is int and float in kinds else kind
    default = param.default
    if default is param.empty or default is None:
        return None
    if isinstance(default, bool):
        return bool
    for kind in (int, float, str):
        if isinstance(default, kind):
            return kind
    return list if isinstance(default, list | tuple) else None


def _kinds(annotation: Any) -> set[type]:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_kinds(a) for a in typing.get_args(annotation)))
    if annotation in (list, tuple) or origin in (list, tuple):
        return {list}
    if annotation in (bool, int, float, str):
        # bool is an int subclass: keep them apart so a flag is never searched as a number.
        return {annotation}
    return set()


def sequence_length(param: inspect.Parameter) -> int | None:
    """The fixed length of a ``tuple[X, Y]`` argument (Adam's ``betas``: 2), else None."""
    ann = param.annotation
    union = typing.get_origin(ann) in (typing.Union, types.UnionType)
    for option in typing.get_args(ann) if union else (ann,):
        if typing.get_origin(option) is tuple:
            args = typing.get_args(option)
            if args and Ellipsis not in args:
                return len(args)
    return None
