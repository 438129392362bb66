"""One line for an exception: what a job's error message, a log line or an HTTP answer shows of it."""

from __future__ import annotations

__all__ = ["one_line"]


def one_line(exc: BaseException, limit: int | None = None, *, typed: bool = False) -> str:
    """The first line of ``str(exc)`` (surrounding blank lines dropped), at most ``limit`` characters.

    An exception with no message gives its type name. ``typed=True`` puts the type name first
    (``"TimeoutError: read timed out"``, or ``"TimeoutError"`` alone).
    """
    text = str(exc).strip()
    line = text.splitlines()[0][:limit] if text else ""
    name = type(exc).__name__
    if typed:
        return f"{name}: {line}" if line else name
    return line or name
