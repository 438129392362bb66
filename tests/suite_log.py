"""A running log of the suite: each test's start and total time, written as it happens.

pytest prints ``--durations`` only when the session ends; a session killed by a hang or by the suite budget
(``.ci/run``) would print nothing. This plugin appends one tab-separated line per event to
``$HOLEFILL_SUITE_LOG`` (default ``.pytest-suite.tsv`` in the repository), flushed at once:
``start <nodeid>`` when a test begins and ``<seconds> <outcome> <nodeid>`` when its setup, call and teardown
are done, so ``.ci/run`` can list the slowest tests, and the one that was running, whatever happened.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
_started: dict[str, float] = {}
_outcomes: dict[str, str] = {}


def _log_path() -> Path:
    return Path(os.environ.get("HOLEFILL_SUITE_LOG") or _REPO / ".pytest-suite.tsv")


def _write(*fields: str) -> None:
    with open(_log_path(), "a", encoding="utf-8") as log:
        log.write("\t".join(fields) + "\n")


def pytest_sessionstart(session) -> None:
    if not hasattr(session.config, "workerinput"):  # one log per session, started afresh
        _log_path().write_text("", encoding="utf-8")


def pytest_runtest_logstart(nodeid: str, location) -> None:
    _started[nodeid] = time.monotonic()
    _write("start", nodeid)


def pytest_runtest_logreport(report) -> None:
    # One outcome per test over its three phases: failed beats skipped beats passed.
    if report.failed:
        _outcomes[report.nodeid] = "failed"
    elif report.skipped:
        _outcomes.setdefault(report.nodeid, "skipped")


def pytest_runtest_logfinish(nodeid: str, location) -> None:
    seconds = time.monotonic() - _started.pop(nodeid, time.monotonic())
    _write(f"{seconds:.1f}", _outcomes.pop(nodeid, "passed"), nodeid)
