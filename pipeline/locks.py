"""The one lock of every job that changes shared state: retraining, promotion of a registered model, a shard
job's output folder.

A lock is one small JSON file (``{"token", "purpose", "host", "pid", "created_at", "renewed_at", ...}``) at a
local path or an fsspec URL. Its rules:

* **Created atomically with its record.** Locally the record is written to a unique temporary in the lock's
  folder, ``fsync``'d, then hard-linked to the lock's name (``link`` fails when the name exists, so exactly one
  creator wins and nobody ever sees a lock without its record), and the folder is ``fsync``'d. On S3 the record
  is one PUT with ``If-None-Match: *`` (fsspec's ``"xb"`` mode): AWS S3 honours it (since August 2024), as do
  MinIO (2024 and later) and moto 5; a store that ignores the condition (older MinIO, Ceph RGW before Squid,
  some S3 look-alikes) silently overwrites, so two creators could both "win": the re-read after acquisition
  (below) then catches the loser in most interleavings, not all. Use such a store for data, not for locks.
* **Renewed while its holder lives.** A daemon thread rewrites ``renewed_at`` every ``heartbeat_s``; before each
  renewal it re-reads the record, and a record that is no longer its own marks the lock *lost*
  (:meth:`Lock.check` then raises :class:`LockLost`: the job stops before it publishes anything).
* **Judged stale by its record**: not renewed for ``stale_after_s``, or written on this host by a process that
  is gone. A lock whose record cannot be parsed (empty after a disk-full or a power loss, truncated, not JSON)
  is judged by the file's age instead: older than ``stale_after_s`` is stale; younger is an error (non-zero exit,
  one line saying how to clear it), never "somebody else is busy".
* **Broken race-free** (local filesystems): the stale lock is renamed to a unique name (``rename`` is atomic, so
  of two breakers one gets ``FileNotFoundError``), and what was renamed is compared with the record judged stale;
  if it is not that record (a new holder took the lock in between), it is linked back. On S3 there is no atomic
  rename: the lock is re-read, compared and deleted, a window of one round trip in which a new holder's lock
  could be deleted; the new holder's heartbeat then finds its record gone and stops its job (:class:`LockLost`).
* **Re-read after acquisition**: the winner reads the lock back and only holds it when the record is its own.

Outcomes a job shows: :class:`LockBusy` (a live holder has it: the job says who and since when and exits 0,
cron's "nothing to do"), :class:`LockError` (a lock it cannot read or break: one line, non-zero exit; it is a
``ValueError``, so :func:`pipeline.jobcli.run_job` prints it as the job's one line and exits 2).

To clear a lock by hand, make sure no job of its ``purpose`` runs, then delete the file (``rm <folder>/.<name>.lock``
or ``aws s3 rm s3://…/.<name>.lock``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import random
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable

from pydantic import Field, model_validator

from pipeline.config import Config
from pipeline.errors import one_line
from pipeline.fsutil import StorageOptionsLike, fsync_folder, is_remote, url_to_fs

__all__ = ["Lock", "LockBusy", "LockError", "LockLost", "LockSettings", "LockState", "lock_url", "pid_alive"]

log = logging.getLogger("holefill.locks")

MAX_RECORD_BYTES = 64 * 1024
BROKEN_MARKER = ".broken-"


class LockBusy(RuntimeError):
    """A live holder has the lock; the message names it (one line). A job shows it and exits 0."""


class LockError(ValueError):
    """The lock cannot be read or broken (one line naming the lock, the cause and how to clear it)."""


class LockLost(LockError):
    """This holder's lock was taken over (its record is no longer its own); the job must stop before publishing."""


class LockSettings(Config):
    """A job's lock (:mod:`pipeline.locks`): its holder renews it every ``heartbeat_s``; a lock not renewed for
    ``stale_after_s`` (or, unreadable, a file that old) belongs to a job that died, and the next job breaks it."""

    stale_after_s: float = Field(default=600.0, gt=0)
    heartbeat_s: float = Field(default=60.0, gt=0)

    @model_validator(mode="after")
    def _beats_in_time(self) -> "LockSettings":
        if self.heartbeat_s * 2 > self.stale_after_s:
            raise ValueError(f"heartbeat_s ({self.heartbeat_s:g}) must be at most half of stale_after_s "
                             f"({self.stale_after_s:g}), or a live holder's lock looks stale")
        return self


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class LockState:
    """What is at the lock's name now: its raw bytes, the parsed record (``None``: unparseable) and its age."""

    raw: bytes
    record: dict[str, Any] | None
    age_s: float

    def holder(self) -> str:
        """``host H, pid P, since T (purpose)`` for messages."""
        if self.record is None:
            return f"an unreadable record ({len(self.raw)} bytes, {self.age_s:.0f} s old)"
        r = self.record
        return (f"host {r.get('host', '?')}, pid {r.get('pid', '?')}, since {r.get('created', '?')}, "
                f"renewed {max(0.0, time.time() - float(r.get('renewed_at', 0) or 0)):.0f} s ago")


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("token"), str) \
            or not isinstance(record.get("renewed_at"), (int, float)):
        return None
    return record


class Lock:
    """An exclusive lock at ``url`` (see the module docstring). Use as a context manager or acquire/release.

    ``purpose`` names the work in messages ("retrain", "promotion of lbam", "shard job"). ``stale_after_s``: a
    record not renewed for that long belongs to a dead holder; ``heartbeat_s`` (default a fifth of it) is how
    often a live holder renews. ``clock`` is for tests of the record's times only (file ages use the real clock).
    """

    def __init__(self, url: str, purpose: str, *, stale_after_s: float = 600.0, heartbeat_s: float | None = None,
                 storage_options: StorageOptionsLike = None, clock: Callable[[], float] = time.time) -> None:
        if stale_after_s <= 0:
            raise ValueError("lock stale_after_s must be > 0")
        self.url = str(url)
        self.purpose = purpose
        self.stale_after_s = float(stale_after_s)
        self.heartbeat_s = float(heartbeat_s) if heartbeat_s else self.stale_after_s / 5
        if self.heartbeat_s >= self.stale_after_s:
            raise ValueError(f"lock heartbeat_s ({self.heartbeat_s:g}) must be below stale_after_s ({self.stale_after_s:g})")
        self._fs, self._path = url_to_fs(self.url, storage_options)
        self._local = not is_remote(self.url)
        self._clock = clock
        self.token = uuid.uuid4().hex
        self.created_at: float | None = None
        self.held = False
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._io = threading.Lock()  # the heartbeat and release never write at once

    # ------------------------------------------------------------------------------------------------
    # reading and writing the record

    def _record(self) -> bytes:
        now = self._clock()
        if self.created_at is None:
            self.created_at = now
        return json.dumps({
            "token": self.token, "purpose": self.purpose, "host": socket.gethostname(), "pid": os.getpid(),
            "created_at": self.created_at, "renewed_at": now, "stale_after_s": self.stale_after_s,
            "created": datetime.fromtimestamp(self.created_at, timezone.utc).isoformat(timespec="seconds"),
        }).encode()

    def read(self) -> LockState | None:
        """What is at the lock's name now, ``None`` when there is no lock. Raises :class:`LockError` when it
        cannot be read (permissions, storage errors)."""
        try:
            if self._local:
                with open(self._path, "rb") as handle:
                    raw = handle.read(MAX_RECORD_BYTES + 1)
                    mtime = os.fstat(handle.fileno()).st_mtime
            else:
                self._fs.invalidate_cache(self._path)
                with self._fs.open(self._path, "rb") as handle:
                    raw = handle.read(MAX_RECORD_BYTES + 1)
                mtime = self._remote_mtime()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise LockError(f"cannot read the {self.purpose} lock {self.url}: {one_line(exc, typed=True)}") from None
        record = _parse(raw) if len(raw) <= MAX_RECORD_BYTES else None
        return LockState(raw, record, max(0.0, time.time() - mtime))

    def _remote_mtime(self) -> float:
        try:
            modified = self._fs.modified(self._path)
        except (FileNotFoundError, NotImplementedError, OSError):
            return time.time()
        return modified.timestamp() if modified.tzinfo else modified.replace(tzinfo=timezone.utc).timestamp()

    def _create(self) -> bool:
        """Create the lock with its record in one atomic step; ``False`` when a lock exists."""
        data = self._record()
        if not self._local:
            try:
                with self._fs.open(self._path, "xb") as handle:
                    handle.write(data)
            except FileExistsError:
                return False
            return True
        folder = os.path.dirname(self._path) or "."
        os.makedirs(folder, exist_ok=True)
        temporary = f"{self._path}.{self.token}.tmp"
        _write_synced(temporary, data)
        try:
            os.link(temporary, self._path)
        except FileExistsError:
            return False
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
        fsync_folder(folder)
        return True

    def _rewrite(self) -> None:
        """Put a renewed record in place (the holder only)."""
        data = self._record()
        if not self._local:
            self._fs.pipe_file(self._path, data)
            return
        temporary = f"{self._path}.{self.token}.tmp"
        _write_synced(temporary, data)
        os.replace(temporary, self._path)
        fsync_folder(os.path.dirname(self._path) or ".")

    def _remove_if(self, expected: bytes) -> bool:
        """Remove the lock only if it still holds ``expected``; ``True`` when it was removed by this call."""
        if not self._local:
            current = self.read()
            if current is None or current.raw != expected:
                return False
            with contextlib.suppress(FileNotFoundError):
                self._fs.rm(self._path)
            return True
        graveyard = f"{self._path}{BROKEN_MARKER}{uuid.uuid4().hex[:12]}"
        try:
            os.rename(self._path, graveyard)
        except FileNotFoundError:
            return False  # somebody else removed it first
        try:
            with open(graveyard, "rb") as handle:
                taken = handle.read(MAX_RECORD_BYTES + 1)
            if taken != expected:
                # A new holder's lock, created after we judged the old one: give it back.
                try:
                    os.link(graveyard, self._path)
                except FileExistsError:
                    log.error("%s lock %s: a newer lock was moved aside while breaking a stale one and a third "
                              "process took the name; the newer holder will find its lock lost", self.purpose, self.url)
                return False
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(graveyard)
            fsync_folder(os.path.dirname(self._path) or ".")

    # ------------------------------------------------------------------------------------------------
    # judging

    def stale_reason(self, state: LockState) -> str | None:
        """Why ``state`` belongs to a dead holder, or ``None`` when its holder may be alive."""
        record = state.record
        if record is None:
            if state.age_s > self.stale_after_s:
                return f"its record is unreadable ({len(state.raw)} bytes) and the file is {state.age_s:.0f} s old"
            return None
        idle = self._clock() - float(record["renewed_at"])
        if idle > self.stale_after_s:
            return f"not renewed for {idle:.0f} s (stale_after_s={self.stale_after_s:g})"
        if record.get("host") == socket.gethostname() and isinstance(record.get("pid"), int) \
                and record["pid"] != os.getpid() and not pid_alive(record["pid"]):
            return f"its process {record['pid']} on this host is gone"
        return None

    # ------------------------------------------------------------------------------------------------
    # the holder's side

    def acquire(self, wait_s: float = 0.0, poll_s: float = 1.0) -> "Lock":
        """Take the lock, start renewing it and return ``self``; raises :class:`LockBusy` (a live holder still has
        it after ``wait_s`` seconds of polling every ``poll_s``) or :class:`LockError`."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return self._acquire_once()
            except LockBusy as busy:
                if time.monotonic() >= deadline:
                    raise
                log.info("%s; waiting up to %.0f s more", busy, deadline - time.monotonic())
                time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())) * random.uniform(0.5, 1.0))

    def _acquire_once(self) -> "Lock":
        for _ in range(4):
            try:
                created = self._create()
            except OSError as exc:
                raise LockError(f"cannot create the {self.purpose} lock {self.url}: {one_line(exc, typed=True)}") from None
            if created:
                state = self.read()
                if state is None or state.record is None or state.record.get("token") != self.token:
                    # Lost at once: a breaker moved ours aside, or a store ignored If-None-Match.
                    continue
                self.held, self.lost = True, None
                self._start_heartbeat()
                log.info("took the %s lock %s", self.purpose, self.url)
                return self
            state = self.read()
            if state is None:
                continue  # released between our create and our look
            reason = self.stale_reason(state)
            if reason is None:
                if state.record is None:
                    raise LockError(
                        f"the {self.purpose} lock {self.url} is unreadable ({len(state.raw)} bytes, {state.age_s:.0f} s "
                        f"old); it is broken once older than {self.stale_after_s:g} s, or delete it by hand if no "
                        f"{self.purpose} runs")
                raise LockBusy(f"another {self.purpose} holds {self.url} ({state.holder()})")
            log.warning("breaking the stale %s lock %s (%s): %s", self.purpose, self.url, reason,
                        state.raw[:300].decode(errors="replace"))
            try:
                self._remove_if(state.raw)
            except OSError as exc:
                raise LockError(f"cannot break the stale {self.purpose} lock {self.url}: {one_line(exc, typed=True)}; "
                                "delete it by hand") from None
        raise LockBusy(f"could not take the {self.purpose} lock {self.url}: other jobs kept taking it")

    def check(self) -> None:
        """Raise :class:`LockLost` when this holder no longer holds the lock (call before publishing anything)."""
        if not self.held:
            raise LockLost(f"the {self.purpose} lock {self.url} is not held")
        if self.lost is None:
            state = self.read()
            if state is None or state.record is None or state.record.get("token") != self.token:
                self.lost = "its record was replaced or removed"
        if self.lost is not None:
            raise LockLost(f"lost the {self.purpose} lock {self.url} ({self.lost}); stopped before publishing")

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"lock-heartbeat {self.url}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        last_ok = time.monotonic()
        while not self._stop.wait(self.heartbeat_s):
            with self._io:
                if self._stop.is_set():
                    return
                try:
                    state = self.read()
                    if state is None or state.record is None or state.record.get("token") != self.token:
                        self.lost = "another job took it over (its record is no longer ours)"
                        log.error("the %s lock %s was taken over: %s", self.purpose, self.url, self.lost)
                        return
                    self._rewrite()
                    last_ok = time.monotonic()
                except (OSError, LockError) as exc:
                    log.warning("renewing the %s lock %s failed: %s", self.purpose, self.url, one_line(exc))
                    if time.monotonic() - last_ok > self.stale_after_s:
                        self.lost = f"not renewed for {self.stale_after_s:g} s ({one_line(exc)})"
                        return

    def release(self) -> None:
        """Stop renewing and remove the lock if it is still ours (a holder that lost it never deletes the new one)."""
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        with self._io:
            self.held = False
            try:
                state = self.read()
                if state is not None and state.record is not None and state.record.get("token") == self.token:
                    self._remove_if(state.raw)
                else:
                    log.warning("the %s lock %s is no longer ours; leaving it", self.purpose, self.url)
            except (OSError, LockError) as exc:
                log.warning("releasing the %s lock %s failed (%s); it goes stale in %g s", self.purpose, self.url,
                            one_line(exc), self.stale_after_s)

    def __enter__(self) -> "Lock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _write_synced(path: str, data: bytes) -> None:
    """Write ``data`` to a new local file and ``fsync`` it."""
    fd = os.open(path, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def lock_url(folder: str, name: str) -> str:
    """``<folder>/.<name>.lock`` (URL join without touching storage)."""
    head, sep, path = folder.rstrip("/").partition("://")
    if sep:
        return f"{head}://{posixpath.join(path, f'.{name}.lock')}"
    return os.path.join(folder, f".{name}.lock")

