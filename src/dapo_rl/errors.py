"""Errors as one line: what a user sees of an exception raised below a command."""

from __future__ import annotations


def one_line(exc: BaseException, limit: int | None = None) -> str:
    """``exc``'s message with its white space (newlines included) folded to single spaces, cut to
    ``limit`` characters when given; the exception's type name when it has no message."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if limit is None or len(text) <= limit else text[: max(0, limit - 1)] + "…"
