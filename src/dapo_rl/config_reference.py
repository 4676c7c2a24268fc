"""The configuration reference, read from :mod:`dapo_rl.config` itself: every key with its type,
default and the one-line comment written beside its field (a section's line is its class
docstring's first line). ``dapo train --help`` prints it, so the dataclasses stay the one source.

A key without a comment is a bug that ``tests/test_api.py`` catches.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import tokenize
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import dapo_rl.config as config_module
from dapo_rl.config import Config

__all__ = ["KeyInfo", "config_keys", "format_reference"]


@dataclass(frozen=True)
class KeyInfo:
    """One configuration key: ``key`` dotted (``clip.eps_high``), ``default`` as YAML writes it,
    ``description`` the field's comment; ``section`` is true for a section (``clip``)."""

    key: str
    default: str
    description: str
    section: bool = False


@lru_cache(maxsize=1)
def _comments() -> dict[tuple[str, str], str]:
    """(class name, field name) → the comment at the end of the field's line in config.py; a
    section's (class name, "") → its docstring's first line."""
    source = inspect.getsource(config_module)
    by_line = {tok.start[0]: tok.string.lstrip("#").strip()
               for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    found: dict[tuple[str, str], str] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        doc = ast.get_docstring(node)
        if doc:
            found[(node.name, "")] = " ".join(doc.split("\n\n")[0].split())
        for statement in node.body:
            if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
                # A multi-line field's comment sits on its last line.
                comment = by_line.get(statement.end_lineno or statement.lineno)
                if comment:
                    found[(node.name, statement.target.id)] = comment
    return found


def _declaring_class(cls: type, name: str) -> str:
    """The class (of ``cls``'s bases, e.g. ``PromptFields`` for ``DataConfig``) whose body declares ``name``."""
    for klass in cls.__mro__:
        if name in getattr(klass, "__annotations__", {}):
            return klass.__name__
    return cls.__name__


def _yaml_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml_value(v) for v in value) + "]"
    if isinstance(value, str) and (value == "" or ":" in value and not value.startswith("builtin:")):
        return repr(value)
    return str(value)


def config_keys(cls: type = Config, prefix: str = "") -> list[KeyInfo]:
    """Every key of ``cls`` (default: the whole :class:`~dapo_rl.config.Config`), depth first, in
    declaration order; a section comes before its keys."""
    comments = _comments()
    instance = cls()
    rows: list[KeyInfo] = []
    for f in dataclasses.fields(cls):
        value = getattr(instance, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(value):
            sub = type(value)
            description = comments.get((sub.__name__, ""), comments.get((_declaring_class(cls, f.name), f.name), ""))
            rows.append(KeyInfo(key, "", description, section=True))
            rows.extend(config_keys(sub, key + "."))
        else:
            rows.append(KeyInfo(key, _yaml_value(value), comments.get((_declaring_class(cls, f.name), f.name), "")))
    return rows


def format_reference(width: int = 44) -> str:
    """The reference as text: ``key=default`` then the description, one key per line, a blank
    line and the section's own line before each section."""
    lines = ["top-level keys:"]
    for row in config_keys():
        if row.section:
            lines += ["", f"{row.key}: {row.description}"]
            continue
        setting = f"  {row.key}={row.default}"
        lines.append(f"{setting:<{width}} {row.description}" if len(setting) < width else f"{setting}\n{'':<{width}} {row.description}")
    return "\n".join(lines)
