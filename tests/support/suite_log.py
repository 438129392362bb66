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

_REPO = Path(__file__).resolve().parents[2]


def _log_path() -> Path:
    return Path(os.environ.get("HOLEFILL_SUITE_LOG") or _REPO / ".pytest-suite.tsv")


def pytest_configure(config) -> None:
    # Under pytest-xdist the controller writes the log (its workers forward it their events) and each worker
    # watches its own tests; in one process, the log is written here and pytest-timeout watches.
    if hasattr(config, "workerinput"):
        config.pluginmanager.register(WorkerWatchdog(config.workerinput["workerid"]), "holefill-watchdog")
    else:
        config.pluginmanager.register(SuiteLog(), "holefill-suite-log")


class SuiteLog:
    """Writes ``start`` and outcome lines to the suite log as tests begin and end."""

    def __init__(self) -> None:
        self.started: dict[str, float] = {}
        self.outcomes: dict[str, str] = {}

    @staticmethod
    def write(*fields: str) -> None:
        with open(_log_path(), "a", encoding="utf-8") as log:
            log.write("\t".join(fields) + "\n")

    def pytest_sessionstart(self, session) -> None:
        _log_path().write_text("", encoding="utf-8")  # one log per session, started afresh

    def pytest_runtest_logstart(self, nodeid: str, location) -> None:
        self.started[nodeid] = time.monotonic()
        self.write("start", nodeid)

    def pytest_runtest_logreport(self, report) -> None:
        # One outcome per test over its three phases: failed beats skipped beats passed.
        if report.failed:
            self.outcomes[report.nodeid] = "failed"
        elif report.skipped:
            self.outcomes.setdefault(report.nodeid, "skipped")

    def pytest_runtest_logfinish(self, nodeid: str, location) -> None:
        seconds = time.monotonic() - self.started.pop(nodeid, time.monotonic())
        self.write(f"{seconds:.1f}", self.outcomes.pop(nodeid, "passed"), nodeid)


class WorkerWatchdog:
    """pytest-timeout's timer in an xdist worker: faulthandler's, dumping every thread's stack to a file."""

    def __init__(self, worker_id: str) -> None:
        self.stacks = open(f"{_log_path()}.{worker_id}.stacks", "w", encoding="utf-8")

    @pytest.hookimpl(tryfirst=True)
    def pytest_timeout_set_timer(self, item, settings):
        if settings.timeout and settings.timeout > 0:
            self.stacks.write(f"{item.nodeid}: past its budget of {settings.timeout:.0f} s; every thread's stack:\n")
            self.stacks.flush()
            faulthandler.dump_traceback_later(settings.timeout, exit=True, file=self.stacks)
        return True

    @pytest.hookimpl(tryfirst=True)
    def pytest_timeout_cancel_timer(self, item):
        faulthandler.cancel_dump_traceback_later()
        self.stacks.seek(0)
        self.stacks.truncate()  # the test ended in time: nothing to show
        return True
