"""The suite's own budget: a test that hangs where Python cannot interrupt it still fails, in time, saying where.

The hang that matters is a Ray wait: ``ray.get`` blocks the main thread in Ray's C++ core, where the
signal-based timeout never runs. ``make test`` runs the suite in pytest-xdist workers, where a watchdog thread
(``tests/support/suite_log.py``, faulthandler's) writes every thread's stack to a file beside the suite log and ends the
worker; xdist reports the test as crashed and goes on. (Run without xdist, pytest-timeout's thread method does the
same on the terminal and ends the session.) ``test_hanging_example`` is that hang, skipped unless
``HOLEFILL_SHOW_HANG=1``; the test below runs it in a child pytest as ``make test`` runs tests and checks it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

HANG_BUDGET_S = 8  # room to join the session's Ray head (~2 s on a busy 2-core machine), then the wait that never ends


@pytest.mark.skipif(os.environ.get("HOLEFILL_SHOW_HANG") != "1",
                    reason="example of a hang in ray.get; HOLEFILL_SHOW_HANG=1 runs it (its timeout ends the session)")
@pytest.mark.timeout(HANG_BUDGET_S)
def test_hanging_example():
    # Joins the cluster at RAY_ADDRESS when set (the suite passes its own head: no Ray start-up to wait for).
    ray.init(**({} if os.environ.get("RAY_ADDRESS") else {"num_cpus": 1, "include_dashboard": False}),
             log_to_driver=False)

    @ray.remote
    def never_finishes():
        time.sleep(3600)

    ray.get(never_finishes.remote())  # blocks in Ray's C++ wait


def test_a_test_hanging_in_ray_get_fails_within_its_budget_with_a_traceback(tmp_path, ray_head):
    log = tmp_path / "suite.tsv"
    env = {**os.environ, "HOLEFILL_SHOW_HANG": "1", "HOLEFILL_SUITE_LOG": str(log), "RAY_ADDRESS": ray_head.address}
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "1",
         f"{__file__}::test_hanging_example"],
        cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=240,
    )
    elapsed = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-2000:]
    assert "crashed while running" in output and "test_hanging_example" in output, output[-3000:]
    # Every thread's stack, the test's own line among them (normally the ray.get; ray.init on a machine too busy).
    stacks = (tmp_path / "suite.tsv.gw0.stacks").read_text()
    assert "test_hanging_example: past its budget of 8 s" in stacks and "in test_hanging_example" in stacks, stacks
    print(f"\n[hang] child pytest ended after {elapsed:.0f} s; {stacks.count('Thread 0x')} threads dumped:\n"
          + stacks[:1500])
    # Ray's start-up is inside the budget; the child ends soon after the budget, not an hour later.
    assert elapsed < HANG_BUDGET_S + 60, elapsed
    assert "start\t" in log.read_text()
