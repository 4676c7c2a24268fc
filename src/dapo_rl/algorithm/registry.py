"""Named registries of the algorithm's plug points: policy losses, advantage estimators, KL
estimators and loss aggregation modes.

Each plug point is a :class:`Registry`: functions with one shared signature, registered under a
name with ``@REGISTRY.register("name")`` and looked up by the name a configuration gives. A name
of the form ``package.module:function`` imports that function and registers it under that name,
so a user's own loss needs no change to this library. An unknown name raises ``ValueError``
listing the choices (the configuration turns it into a one-line error).
"""

from __future__ import annotations

import importlib
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Name → function for one plug point (``kind`` names it in error messages)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the function under ``name`` (a later registration replaces it)."""

        def decorator(fn: T) -> T:
            self._entries[name] = fn
            return fn

        return decorator

    def get(self, name: str) -> T:
        """The function registered as ``name``; ``pkg.module:function`` is imported and registered.

        Raises:
            ValueError: unknown name, or an import path that does not resolve to a callable.
        """
        if name in self._entries:
            return self._entries[name]
        if ":" in name:
            module_name, _, attr = name.partition(":")
            try:
                fn = getattr(importlib.import_module(module_name), attr)
            except (ImportError, AttributeError) as exc:
                raise ValueError(f"cannot import {self.kind} {name!r} ({exc}); give an importable package.module:function") from None
            if not callable(fn):
                raise ValueError(f"{self.kind} {name!r} is not a function")
            self._entries[name] = fn
            return fn
        raise ValueError(f"unknown {self.kind} {name!r}; choose one of {', '.join(self.names())} "
                         f"or an import path package.module:function")

    def names(self) -> list[str]:
        """The registered names, in registration order."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
