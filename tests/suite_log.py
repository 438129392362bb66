"""A running log of the suite: each test's start and total time, written as it happens.

pytest prints ``--durations`` only when the session ends; a session killed by a hang or by the suite budget
(``.ci/run``) would print nothing. This plugin appends one tab-separated line per event to
``$HOLEFILL_SUITE_LOG`` (default ``.pytest-suite.tsv`` in the repository), flushed at once:
``start <nodeid>`` when a test begins and ``<seconds> <outcome> <nodeid>`` when its setup, call and teardown
are done, so ``.ci/run`` can list the slowest tests, and the one that was running, whatever happened.

Under pytest-xdist a test past its budget is stopped by a watchdog of its own here: pytest-timeout's stack dump
goes to a terminal that xdist workers do not have. ``faulthandler``'s watchdog is a C thread, so it fires while the
main thread waits in Ray's C++ core too; it writes every thread's stack to ``<log>.<worker>.stacks`` (printed by
``.ci/run``) and ends the worker, which xdist reports as crashed in that test and replaces.
"""

from __future__ import annotations

import faulthandler
import os
import time
from pathlib import Path

import pytest

_REPO = Path(__file__).resolve().parents[1]
_started: dict[str, float] = {}
_outcomes: dict[str, str] = {}
_is_xdist_worker = False  # under pytest-xdist the controller writes the log; its workers forward it their events


def _log_path() -> Path:
    return Path(os.environ.get("HOLEFILL_SUITE_LOG") or _REPO / ".pytest-suite.tsv")


def _write(*fields: str) -> None:
    with open(_log_path(), "a", encoding="utf-8") as log:
        log.write("\t".join(fields) + "\n")


_stacks = None  # the worker's stack-dump file, opened when the worker starts


def pytest_configure(config) -> None:
    global _is_xdist_worker, _stacks
    _is_xdist_worker = hasattr(config, "workerinput")
    if _is_xdist_worker:
        _stacks = open(f"{_log_path()}.{config.workerinput['workerid']}.stacks", "w", encoding="utf-8")


@pytest.hookimpl(tryfirst=True)
def pytest_timeout_set_timer(item, settings):
    if not _is_xdist_worker:
        return None  # pytest-timeout's own watchdog
    if settings.timeout and settings.timeout > 0:
        _stacks.write(f"{item.nodeid}: past its budget of {settings.timeout:.0f} s; every thread's stack:\n")
        _stacks.flush()
        faulthandler.dump_traceback_later(settings.timeout, exit=True, file=_stacks)
    return True


@pytest.hookimpl(tryfirst=True)
def pytest_timeout_cancel_timer(item):
    if not _is_xdist_worker:
        return None
    faulthandler.cancel_dump_traceback_later()
    _stacks.seek(0)
    _stacks.truncate()  # the test ended in time: nothing to show
    return True


def pytest_sessionstart(session) -> None:
    if not _is_xdist_worker:  # one log per session, started afresh
        _log_path().write_text("", encoding="utf-8")


def pytest_runtest_logstart(nodeid: str, location) -> None:
    if _is_xdist_worker:
        return
    _started[nodeid] = time.monotonic()
    _write("start", nodeid)


def pytest_runtest_logreport(report) -> None:
    # One outcome per test over its three phases: failed beats skipped beats passed.
    if _is_xdist_worker:
        return
    if report.failed:
        _outcomes[report.nodeid] = "failed"
    elif report.skipped:
        _outcomes.setdefault(report.nodeid, "skipped")


def pytest_runtest_logfinish(nodeid: str, location) -> None:
    if _is_xdist_worker:
        return
    seconds = time.monotonic() - _started.pop(nodeid, time.monotonic())
    _write(f"{seconds:.1f}", _outcomes.pop(nodeid, "passed"), nodeid)
