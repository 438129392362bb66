"""Background service processes on this machine: launch detached, identify safely, wait, stop.

Every service of the local stack (a Ray node, the MLflow server) runs as the leader of its own
session (``start_new_session``), so the leader and everything it spawns share one session id
that belongs to nobody else (Ray's workers make their own process groups but stay in the
session). Stopping a service therefore never needs a machine-wide sweep by process name (which
is what ``ray stop`` does, and what would kill other people's Ray clusters).

A pid alone is not an identity: pids are reused. :class:`ProcessHandle` also records the process
creation time, and every signal is sent only after checking that both still match.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import psutil

__all__ = [
    "ProcessHandle",
    "ServiceStartError",
    "http_answers",
    "launch_detached",
    "log_tail",
    "stop_session",
    "wait_for",
]

# psutil reports creation times as floats rounded differently across calls; allow a little slack.
_CREATE_TIME_TOLERANCE_S = 0.05


class ServiceStartError(RuntimeError):
    """A service did not come up; the message names it and carries the end of its log."""


@dataclass(frozen=True)
class ProcessHandle:
    """A process identified by pid *and* creation time, so a reused pid is never mistaken for it."""

    pid: int
    create_time: float

    @classmethod
    def of(cls, pid: int) -> "ProcessHandle":
        """Identify the live process ``pid``; raises ``psutil.NoSuchProcess`` when there is none."""
        return cls(pid=pid, create_time=psutil.Process(pid).create_time())

    def process(self) -> psutil.Process | None:
        """The live, non-zombie process this handle names, or ``None`` once it has gone."""
        _reap_if_our_child(self.pid)
        try:
            proc = psutil.Process(self.pid)
            if abs(proc.create_time() - self.create_time) > _CREATE_TIME_TOLERANCE_S:
                return None  # the pid now belongs to somebody else
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return proc
        except psutil.Error:
            return None

    def is_alive(self) -> bool:
        """True while the recorded process is running."""
        return self.process() is not None


def _reap_if_our_child(pid: int) -> None:
    # A service launched by this very process (a pytest fixture) lingers as a zombie after it
    # exits until someone waits for it; reaping it here makes liveness checks truthful.
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def launch_detached(
    argv: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> ProcessHandle:
    """Start ``argv`` as the leader of a new session, stdout and stderr appended to ``log_path``.

    The child outlives the caller (the ``stack.py start`` CLI exits right after), never reads the
    terminal, and its session id equals its pid, which :func:`stop_session` relies on.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        child = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
            close_fds=True,
        )
    return ProcessHandle.of(child.pid)


def _session_members(sid: int, born_after: float) -> list[psutil.Process]:
    """Processes in session ``sid`` created no earlier than its leader (guards against sid reuse)."""
    members = []
    for proc in psutil.process_iter(["pid", "create_time"]):
        try:
            if os.getsid(proc.pid) == sid and proc.info["create_time"] >= born_after - _CREATE_TIME_TOLERANCE_S:
                members.append(proc)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return members


def _signal_all(processes: Iterable[psutil.Process], sig: signal.Signals) -> None:
    for proc in processes:
        try:
            proc.send_signal(sig)
        except psutil.Error:
            pass


def _gone(proc: psutil.Process) -> bool:
    """Exited: no longer running, or a zombie waiting for a parent that may not be us."""
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def _wait_gone(processes: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Wait up to ``timeout_s`` for ``processes`` to exit; returns those still running.

    Polls rather than ``psutil.wait_procs``: a process started by another process (``stack.py stop`` run
    from a fresh shell) stays a zombie until its own parent reaps it, and ``wait_procs`` would wait out the
    whole timeout on it.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        for proc in processes:
            _reap_if_our_child(proc.pid)
        survivors = [proc for proc in processes if not _gone(proc)]
        if not survivors or time.monotonic() >= deadline:
            return survivors
        time.sleep(0.1)


def stop_session(
    leader: ProcessHandle,
    grace_s: float = 20.0,
    terminate_all_first: bool = False,
    extra: Callable[[], list[psutil.Process]] | None = None,
) -> None:
    """Stop a service started by :func:`launch_detached` and everything it spawned.

    SIGTERM goes to the leader (or to every process of its session when ``terminate_all_first``),
    which gets ``grace_s`` to shut its children down; whatever is left of the session afterwards,
    plus the processes ``extra`` returns (children that left the session), is killed with SIGKILL.
    Safe to call when the service is already gone.
    """
    sid = leader.pid
    members = _session_members(sid, leader.create_time)
    leader_proc = leader.process()
    if leader_proc is not None:
        _signal_all(members if terminate_all_first else [leader_proc], signal.SIGTERM)
        _wait_gone([leader_proc], grace_s)
    leftovers = _session_members(sid, leader.create_time) + (extra() if extra else [])
    if leftovers:
        # Grace is over: anything still here would otherwise hold ports and files of a stopped stack.
        _signal_all(leftovers, signal.SIGKILL)
        still_there = _wait_gone(leftovers, 10.0)
        if still_there:
            pids = ", ".join(str(p.pid) for p in still_there)
            raise RuntimeError(f"processes {pids} of service session {sid} survived SIGKILL")
    _reap_if_our_child(leader.pid)


def http_answers(url: str, timeout_s: float = 2.0, headers: Mapping[str, str] | None = None) -> bool:
    """True when ``url`` answers an HTTP GET (with ``headers``, e.g. a token) with a 2xx status."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=dict(headers or {})), timeout=timeout_s) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def log_tail(log_path: Path, lines: int = 25) -> str:
    """The last ``lines`` lines of a log file (empty when it does not exist)."""
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def wait_for(
    ready: Callable[[], bool],
    what: str,
    timeout_s: float,
    leader: ProcessHandle | None = None,
    log_path: Path | None = None,
    poll_s: float = 0.25,
) -> None:
    """Poll ``ready`` until it is true; fail early if ``leader`` dies, else after ``timeout_s``.

    Raises :class:`ServiceStartError` naming ``what`` and quoting the end of ``log_path``.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        if ready():
            return
        if leader is not None and not leader.is_alive():
            reason = f"{what}: process {leader.pid} exited before it was ready"
            break
        if time.monotonic() >= deadline:
            reason = f"{what}: not ready after {timeout_s:.0f} s"
            break
        time.sleep(poll_s)
    tail = log_tail(log_path) if log_path is not None else ""
    where = f" (log {log_path})" if log_path is not None else ""
    raise ServiceStartError(f"{reason}{where}" + (f"\n--- end of log ---\n{tail}" if tail else ""))
