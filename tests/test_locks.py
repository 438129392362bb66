"""The one lock (pipeline/locks.py), with real processes: exclusive creation, heartbeats, stale and unreadable locks,
race-free breaking, a holder killed mid-heartbeat, and the same lock on a real S3 endpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline.locks import Lock, LockBusy, LockError, LockLost
from support.s3_server import s3_endpoint  # noqa: F401  (pytest fixture)

REPO = Path(__file__).resolve().parents[1]


def _python(code: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs)


def test_a_second_holder_is_told_who_holds_it_and_release_frees_it(tmp_path):
    url = str(tmp_path / ".job.lock")
    with Lock(url, "test job") as first:
        record = json.loads(Path(url).read_bytes())
        assert record["token"] == first.token and record["pid"] == os.getpid()
        with pytest.raises(LockBusy, match=rf"another test job holds .*\.job\.lock \(host .*, pid {os.getpid()}"):
            Lock(url, "test job").acquire()
    assert not Path(url).exists()
    assert not [p for p in tmp_path.iterdir()]  # no temporary or broken-lock files left


def test_an_empty_day_old_lock_is_broken_and_a_young_one_is_an_error_not_a_silent_skip(tmp_path):
    url = tmp_path / ".job.lock"
    url.write_bytes(b"")  # what a disk-full or a kill between create and write used to leave
    with pytest.raises(LockError, match=r"is unreadable \(0 bytes, \d+ s old\).*delete it by hand"):
        Lock(str(url), "job", stale_after_s=3600).acquire()
    day_ago = time.time() - 86400
    os.utime(url, (day_ago, day_ago))
    with Lock(str(url), "job", stale_after_s=3600) as lock:
        assert json.loads(url.read_bytes())["token"] == lock.token


def test_a_live_holder_keeps_its_lock_past_stale_after_by_renewing_it(tmp_path):
    url = str(tmp_path / ".job.lock")
    holder = _python(f"""
        import time
        from pipeline.locks import Lock
        lock = Lock({url!r}, "job", stale_after_s=1.0, heartbeat_s=0.2).acquire()
        print("locked", flush=True)
        time.sleep(60)
    """)
    try:
        assert holder.stdout.readline().strip() == "locked"
        time.sleep(2.5)  # well past stale_after_s: only the heartbeat keeps it
        with pytest.raises(LockBusy, match=rf"pid {holder.pid}"):
            Lock(url, "job", stale_after_s=1.0).acquire()
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)


def test_a_holder_killed_mid_heartbeat_is_broken_by_age_even_from_another_host(tmp_path):
    url = tmp_path / ".job.lock"
    holder = _python(f"""
        import time
        from pipeline.locks import Lock
        lock = Lock({str(url)!r}, "job", stale_after_s=1.5, heartbeat_s=0.1).acquire()
        print("locked", flush=True)
        time.sleep(60)
    """)
    assert holder.stdout.readline().strip() == "locked"
    time.sleep(0.35)  # a few heartbeats
    os.killpg(holder.pid, signal.SIGKILL)
    holder.wait(timeout=30)
    # Pretend it ran elsewhere: its pid can't be checked, only its record's age can.
    record = json.loads(url.read_bytes())
    record["host"] = "another-host"
    url.write_text(json.dumps(record))
    with pytest.raises(LockBusy):
        Lock(str(url), "job", stale_after_s=1.5).acquire()  # renewed moments ago
    time.sleep(1.6)
    with Lock(str(url), "job", stale_after_s=1.5) as lock:
        assert json.loads(url.read_bytes())["token"] == lock.token


def test_processes_racing_for_a_stale_lock_end_with_exactly_one_holder(tmp_path):
    url = tmp_path / ".job.lock"
    ready = tmp_path / "go"
    for round_ in range(3):
        url.write_text(json.dumps({"token": "dead", "host": "elsewhere", "pid": 1, "renewed_at": time.time() - 999}))
        racers = [_python(f"""
            import os, sys, time
            from pathlib import Path
            from pipeline.locks import Lock, LockBusy
            while not Path({str(ready)!r}).exists():
                time.sleep(0.001)
            try:
                lock = Lock({str(url)!r}, "job", stale_after_s=60).acquire()
            except LockBusy:
                print("busy", flush=True)
                sys.exit(0)
            start = time.time()
            time.sleep(1.0)
            lock.check()  # still ours after everybody else is done
            end = time.time()
            print("held", start, end, flush=True)
            lock.release()
        """) for _ in range(4)]
        time.sleep(1.5)  # every racer has imported and is polling
        ready.touch()
        outputs = [racer.communicate(timeout=60) for racer in racers]
        ready.unlink()
        results = [out.split() for out, _ in outputs]
        held = sorted((float(r[1]), float(r[2])) for r in results if r[0] == "held")
        assert held and all(r == ["busy"] for r in results if r[0] != "held"), (round_, outputs)
        # Never two holders at once (on a busy machine a racer that came late may hold it after the first let go).
        assert all(earlier[1] <= later[0] for earlier, later in zip(held, held[1:])), (round_, outputs)
        assert not url.exists()


def test_a_holder_whose_lock_was_taken_over_finds_out_before_publishing(tmp_path):
    url = tmp_path / ".job.lock"
    lock = Lock(str(url), "job", stale_after_s=2.0, heartbeat_s=0.2).acquire()
    try:
        url.write_text(json.dumps({"token": "someone-else", "renewed_at": time.time()}))
        time.sleep(0.5)
        with pytest.raises(LockLost, match="lost the job lock .*stopped before publishing"):
            lock.check()
    finally:
        lock.release()
    assert json.loads(url.read_bytes())["token"] == "someone-else"  # never deletes the new holder's lock


def test_the_lock_on_s3_is_one_conditional_put(s3_endpoint):
    url = s3_endpoint.url("locks", ".job.lock")
    with Lock(url, "job", storage_options=s3_endpoint.storage_options, heartbeat_s=0.2, stale_after_s=5) as first:
        with pytest.raises(LockBusy, match="another job holds s3://"):
            Lock(url, "job", storage_options=s3_endpoint.storage_options).acquire()
        time.sleep(0.5)
        first.check()
    with Lock(url, "job", storage_options=s3_endpoint.storage_options) as again:
        assert again.read().record["token"] == again.token
