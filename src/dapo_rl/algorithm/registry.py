"""Named registries of the algorithm's plug points: policy losses, advantage estimators, KL
estimators and loss aggregation modes (and, outside this package, reward functions and rollout
engines).

Each plug point is a :class:`Registry`: functions (or classes) with one shared signature,
registered under a name with ``@REGISTRY.register("name")`` and looked up by the name a
configuration gives. A name of the form ``package.module:function`` imports that object, so a
user's own loss needs no change to this library. An unknown name raises ``ValueError`` listing
the choices (the configuration turns it into a one-line error).

This module imports only the standard library: every layer of the package may use it.
"""

from __future__ import annotations

import importlib
import threading
from typing import Any, Callable, Generic, Iterator, TypeVar

T = TypeVar("T")

_MISSING: Any = object()


class Registry(Generic[T]):
    """Name → function or class for one plug point.

    Args:
        kind: what an entry is, for error messages (``"policy loss"``).
        adapt: ``adapt(path, obj) -> entry`` turns an object imported by path into an entry,
            raising ``ValueError`` (naming ``path``) when the object is not fit; the default
            takes any callable as it is.
    """

    def __init__(self, kind: str, adapt: Callable[[str, Any], T] | None = None):
        self.kind = kind
        self._adapt = adapt if adapt is not None else self._require_callable
        self._entries: dict[str, T] = {}
        self._imported: dict[str, T] = {}  # import paths resolved so far
        self._lock = threading.Lock()

    def register(self, name: str, entry: T | None = None, *, overwrite: bool = False) -> Any:
        """Register ``entry`` under ``name``; without ``entry``, a decorator that does.

        Registering the same object again is a no-op, so a module may be imported twice.

        Raises:
            ValueError: ``name`` is empty, has surrounding spaces or contains ``:`` (the mark of
                an import path), or is taken by a different object and ``overwrite`` is false,
                so that two plugins cannot silently replace each other.
        """

        def add(obj: T) -> T:
            if not name or name != name.strip() or ":" in name:
                raise ValueError(f"invalid {self.kind} name {name!r}: use a non-empty name without ':' or surrounding spaces")
            with self._lock:
                taken = self._entries.get(name, _MISSING)
                if taken is not _MISSING and taken is not obj and not overwrite:
                    raise ValueError(f"{self.kind} {name!r} is already registered; pass overwrite=True to replace it")
                self._entries[name] = obj
            return obj

        return add if entry is None else add(entry)

    def get(self, name: str) -> T:
        """The entry registered as ``name``; an import path ``pkg.module:attr`` is imported (once).

        ``attr`` may be dotted (``pkg.module:Class.method``).

        Raises:
            ValueError: unknown name, or an import path that does not resolve to a fit object.
        """
        with self._lock:
            entry = self._entries.get(name, self._imported.get(name, _MISSING))
        if entry is not _MISSING:
            return entry
        if ":" not in name:
            raise ValueError(self._unknown(name))
        entry = self._adapt(name, self._import(name))
        with self._lock:
            return self._imported.setdefault(name, entry)

    def names(self) -> list[str]:
        """The registered names, in registration order (import paths resolved so far not included)."""
        with self._lock:
            return list(self._entries)

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._entries or name in self._imported

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def _unknown(self, name: str) -> str:
        message = f"unknown {self.kind} {name!r}; choose one of {', '.join(self.names())} or an import path package.module:function"
        if "." in name:
            module_name, _, attr = name.rpartition(".")
            message += f" (did you mean the import path '{module_name}:{attr}'?)"
        return message

    def _import(self, path: str) -> Any:
        return import_path(path, self.kind)

    def _require_callable(self, path: str, obj: Any) -> T:
        if not callable(obj):
            raise ValueError(f"{self.kind} {path!r} is a {type(obj).__name__}, not a function or class")
        return obj


def import_path(path: str, kind: str) -> Any:
    """The object ``package.module:name`` names (``name`` may be dotted: ``module:Class.method``).

    Raises:
        ValueError: not an import path, a module that does not import (or raises while importing),
            or no such attribute; the message names ``kind`` and ``path`` and says what to fix.
    """
    module_name, _, attr_path = (part.strip() for part in path.partition(":"))
    if not module_name or not attr_path:
        raise ValueError(f"invalid {kind} {path!r}: an import path must look like package.module:function")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {kind} {path!r} ({exc}); install the module or put its folder on "
                         "sys.path (PYTHONPATH), and check the spelling") from exc
    except Exception as exc:
        raise ValueError(f"cannot import {kind} {path!r}: importing module {module_name!r} raised "
                         f"{type(exc).__name__}: {exc}; fix the error in that module") from exc
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"cannot import {kind} {path!r}: module {module_name!r} has no attribute "
                             f"{attr_path!r}; check the name after ':'") from None
    return obj
