"""One line for an exception: what a job's error message, a log line or an HTTP answer shows of it."""

from __future__ import annotations

from typing import Iterator

__all__ = ["chain", "one_line"]


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


def chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception behind it, each once: causes, contexts and what Ray wraps (a worker's error as
    ``cause``, a worker group's ``worker_failures``), so a job can find the one line a failed worker raised."""
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending:
        error = pending.pop()
        if id(error) in seen:
            continue
        seen.add(id(error))
        yield error
        pending.extend(e for e in (error.__cause__, error.__context__, getattr(error, "cause", None))
                       if isinstance(e, BaseException))
        failures = getattr(error, "worker_failures", None)
        if isinstance(failures, dict):
            pending.extend(e for e in failures.values() if isinstance(e, BaseException))
