"""Name → builder tables: the one plug-in mechanism for models, datasets, optimizers and the rest."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class UnknownName(KeyError):
    """A name that is not in a registry; the message lists the known names."""

    def __str__(self) -> str:
        return str(self.args[0])


class Registry(Generic[F]):
    """A named table of builders. The key is the builder's own ``__name__``.

    ``meta`` holds per-entry facts the rest of the package needs before building (a model's fixed
    input size, say), so they can be checked when a study file loads.
    """

    def __init__(self, kind: str, fixed: tuple[str, ...] = ()) -> None:
        self.kind = kind
        # Arguments the caller always supplies itself; a study file may not set them.
        self.fixed = fixed
        self._entries: dict[str, F] = {}
        self.meta: dict[str, dict[str, Any]] = {}

    def register(self, fn: F | None = None, /, **meta: Any) -> Any:
        """Decorator: ``@REG.register`` or ``@REG.register(input_size=224)``."""

        def add(f: F) -> F:
            name = f.__name__
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = f
            self.meta[name] = meta
            return f

        return add(fn) if fn is not None else add

    def add(self, name: str, fn: F, **meta: Any) -> None:
        """Register ``fn`` under an explicit name (for classes from other packages)."""
        self._entries[name] = fn
        self.meta[name] = meta

    def __getitem__(self, name: str) -> F:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownName(f"unknown {self.kind} {name!r}; valid: {', '.join(self.names())}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def params(self, name: str) -> dict[str, inspect.Parameter]:
        """Keyword arguments a study file may set for ``name`` (its signature minus ``fixed``)."""
        fn = self[name]
        target = fn.__init__ if inspect.isclass(fn) else fn
        sig = inspect.signature(target)
        return {
            p.name: p
            for p in sig.parameters.values()
            if p.name not in self.fixed
            and p.name != "self"
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        }

    def doc(self, name: str) -> str:
        """First line of the entry's docstring, for ``hpsearch list``."""
        text = inspect.getdoc(self[name]) or ""
        return text.splitlines()[0] if text else ""
