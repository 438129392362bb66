"""Connecting to Ray: the cluster a job was submitted to, else a private Ray head this process starts and stops.

Why not a plain ``ray.init()`` for the local case: on a busy machine (two other jobs loading 2 cores) its node
died before the job began, ``The current node timed out during startup``. What times out, read in Ray 2.60
(``ray/_private/node.py``, ``ray/_private/services.py``, the raylet's ``NodeManager::WaitForDashboardAgentPorts``):

* The raylet, started with ``--metrics-agent-port=0`` and ``--runtime-env-agent-port=0`` (``ray.init`` gives
  no way to set them) and never told the dashboard agent's HTTP port, blocks until the dashboard agent and the
  runtime-env agent, two Python processes still importing Ray, write their ``metrics_agent_port_<node>``,
  ``dashboard_agent_listen_port_<node>``, ... files. Each wait is ``WaitForPersistedPort``'s fixed 15 s
  (measured here: about 17 s whatever ``RAY_agent_register_timeout_ms`` says: in this Ray that setting does not
  reach these waits, so there is no setting to lengthen them), then a failed check aborts the raylet:
  ``Timed out waiting for file .../metrics_agent_port_...``. On this 2-core VM at a load of 10-16 the agent
  took 34 s to write its HTTP port.
* The driver waits a fixed 30 s (``raylet_start_wait_time_s`` in ``node.py``, not configurable from Python;
  ``RAY_raylet_start_wait_time_s`` is the GCS's side only) for the raylet to register, and raises the timeout.
* Before all this a head ``ray.init()`` starts the dashboard with its ten module processes and waits up to
  ``RAY_DASHBOARD_STARTUP_TIMEOUT_S`` (60 s) for it: more load, and the jobs do not use the dashboard.

So the local case starts its head with ``ray start --head --block`` (Ray's own CLI), which accepts the agents'
ports: given free ports, the raylet skips three waits, and the fourth port file (the agent's HTTP port, which
``ray start`` does not hand to the raylet) is written for it (:func:`announce_agent_listen_port`): the raylet
registers at once, whatever the agents' import time; ``--include-dashboard=false`` and ``--no-monitor`` leave
out processes the job does not use. The head gets a private
``--temp-dir`` and free ports (two jobs side by side never share or collide), dies with this process (``atexit``,
and the kernel's parent-death signal if the process is killed) and stops exactly what it started. A start that
still fails is retried once after a random pause; then :class:`RayStartError` names the cause and the setting,
and a job exits with :data:`RAY_START_EXIT_STATUS` (not 2: nothing was wrong with the job's input).
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import one_line

__all__ = ["RAY_START_EXIT_STATUS", "RayStartError", "announce_agent_listen_port", "ensure_ray", "stop_private_head"]

log = logging.getLogger("holefill.ray")

RAY_START_EXIT_STATUS = 3
"""A job's exit status when its Ray did not start (a busy or broken machine, not bad input: that is 2)."""

_READY_LINE = "Ray runtime started."  # what ``ray start`` prints once its node registered (ray/scripts/scripts.py)
# Lines of ``ray start``'s log that say why a start failed, most telling first.
_CAUSE_MARKERS = ("timed out during startup", "Timed out waiting for file", "Exception", "Error")
_PR_SET_PDEATHSIG = 1


class RayStartError(RuntimeError):
    """Ray did not start twice in a row (one line: the cause and what to set). Not a ``ValueError``: a job
    reports it with exit status :data:`RAY_START_EXIT_STATUS`, not 2 (bad input)."""


@dataclass
class _PrivateHead:
    """A ``ray start --head --block`` process of this process: its GCS address, temp dir and log."""

    address: str
    process: subprocess.Popen
    temp_dir: Path
    log_path: Path

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM to the leader (``ray start --block`` then stops what it started), SIGKILL to its session
        after ``grace_s``; removes the temp dir. Idempotent."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        try:  # stragglers of the leader's session (it is the session leader: pgid == its pid)
            os.killpg(self.process.pid, signal.SIGKILL)
        except OSError:
            pass
        self.process.wait()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


_head: _PrivateHead | None = None


def _free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports free right now (bound together, then released)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _die_with_parent() -> None:  # runs in the child between fork and exec
    os.setsid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: atexit still stops the head
        pass


def _head_argv(temp_dir: Path, ports: list[int]) -> list[str]:
    gcs, node_manager, object_manager, agent_grpc, agent_http, metrics, runtime_env, dashboard, client = ports
    return [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--disable-usage-stats",
        f"--temp-dir={temp_dir}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        # Python processes a job does not use, left out so that the agents' imports get the CPU: the dashboard's
        # modules and the autoscaler's monitor (one node, nothing to scale); the Ray client server cannot be
        # left out of a head (ray start), it gets a free port
        "--include-dashboard=false", "--no-monitor", f"--ray-client-server-port={client}",
        f"--port={gcs}", f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
        # agent ports given: the raylet skips three of its 15 s waits for the agents to report theirs
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--dashboard-agent-listen-port={agent_http}",
        f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
    ]


def _failure_cause(log_path: Path) -> str:
    try:
        lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    for marker in _CAUSE_MARKERS:
        for line in reversed(lines):
            if marker in line:
                return line[:200]
    return lines[-1][:200] if lines else "no output"


def announce_agent_listen_port(temp_dir: Path, port: int) -> bool:
    """Write the dashboard agent's HTTP port file for the raylet of the head started with ``--temp-dir=temp_dir``
    and ``--dashboard-agent-listen-port=port``, as the agent will once it is up (call it while the head starts).

    The one agent wait ``ray start`` cannot skip: Ray's Python passes the raylet no
    ``--dashboard_agent_listen_port`` (ray/_private/services.py ``start_raylet``), so the raylet waits its fixed
    15 s for the agent to write ``dashboard_agent_listen_port_<node id>`` after loading all its modules. The agent
    was told ``--dashboard-agent-listen-port``, so the port is known: written here with Ray's own
    ``persist_port`` as soon as the session names the node (its ``gcs_server_port_<node id>`` file). Returns
    whether it is written (or the agent already wrote it).
    """
    from ray._raylet import DASHBOARD_AGENT_LISTEN_PORT_NAME, GCS_SERVER_PORT_NAME, persist_port  # lazy: Ray

    for gcs_file in temp_dir.glob(f"session_*/{GCS_SERVER_PORT_NAME}_*"):
        node_id = gcs_file.name[len(GCS_SERVER_PORT_NAME) + 1:]
        if not (gcs_file.parent / f"{DASHBOARD_AGENT_LISTEN_PORT_NAME}_{node_id}").exists():
            persist_port(str(gcs_file.parent), node_id, DASHBOARD_AGENT_LISTEN_PORT_NAME, port)
        return True
    return False


def _start_head(timeout_s: float) -> _PrivateHead:
    """One try at a private head; raises :class:`RayStartError` (one line) when it does not come up."""
    # Under /tmp itself: Ray's socket paths under the temp dir must fit in 107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="hf-ray-", dir="/tmp"))
    log_path = temp_dir / "ray-start.log"
    ports = _free_ports(9)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    with open(log_path, "wb") as out:
        process = subprocess.Popen(_head_argv(temp_dir, ports), stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent)
    head = _PrivateHead(address=f"127.0.0.1:{ports[0]}", process=process, temp_dir=temp_dir, log_path=log_path)
    deadline = time.monotonic() + timeout_s
    announced = False
    while time.monotonic() < deadline:
        announced = announced or announce_agent_listen_port(temp_dir, ports[4])
        if _READY_LINE in log_path.read_text(errors="replace"):
            return head
        if process.poll() is not None:
            cause = _failure_cause(log_path)
            head.stop()
            raise RayStartError(f"ray start exited with status {process.returncode}: {cause}")
        time.sleep(0.2)
    cause = _failure_cause(log_path)
    head.stop()
    raise RayStartError(f"no Ray node within {timeout_s:.0f} s (last line: {cause})")


def stop_private_head() -> None:
    """Disconnect and stop the private head of this process, if it has one (at exit; tests)."""
    global _head
    head, _head = _head, None
    if head is None:
        return
    import ray  # lazy, as in ensure_ray: only a process that started a head gets here, and Ray is loaded

    ray.shutdown()
    head.stop()


def _private_head(attempts: int, start_timeout_s: float, pause_s: float) -> _PrivateHead:
    global _head
    if _head is not None and _head.process.poll() is None:
        return _head
    # What ray.init() does for a new local cluster, before the head starts so that it inherits it: token
    # authentication (RAY_AUTH_MODE=token unless set) with a token in ~/.ray, made if missing.
    from ray._private.authentication.authentication_token_setup import (  # lazy: Ray
        enable_token_auth_by_default, ensure_token_if_auth_enabled)

    enable_token_auth_by_default()
    ensure_token_if_auth_enabled(None, create_token_if_missing=True)
    for attempt in range(1, attempts + 1):
        try:
            _head = _start_head(start_timeout_s)
            atexit.register(stop_private_head)
            return _head
        except RayStartError as exc:
            if attempt == attempts:
                raise RayStartError(
                    f"the job's local Ray did not start {attempts} times in a row ({one_line(exc, 240)}): Ray waits a "
                    "fixed 30 s for its node to register (raylet_start_wait_time_s in ray/_private/node.py, not a "
                    "setting); start a Ray head yourself (ray start --head) and set RAY_ADDRESS to it, or run the "
                    "job when the machine is less loaded") from None
            delay = random.uniform(pause_s / 2, pause_s)
            log.warning("local Ray did not start (%s); trying again in %.0f s", one_line(exc, 200), delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def ensure_ray(address: str | None = None, attempts: int = 2, start_timeout_s: float = 300.0,
               pause_s: float = 10.0) -> Any:
    """Initialise Ray once per process and return the ``ray`` module.

    ``address`` or ``RAY_ADDRESS`` (set by ``ray job submit``) given: join that cluster. Neither: start a private
    head (module docstring: why not a plain ``ray.init()``) and join it; a start that does not come up within
    ``start_timeout_s`` or fails is retried after a random pause of up to ``pause_s`` seconds, ``attempts`` tries
    in all, then :class:`RayStartError`. Workers' logs reach the driver's log.
    """
    # lazy: importing Ray takes seconds, paid only by the callers that start or join a cluster
    import ray

    if ray.is_initialized():
        return ray
    if address is None and not os.environ.get("RAY_ADDRESS"):
        address = _private_head(attempts, start_timeout_s, pause_s).address
    ray.init(address=address, log_to_driver=True)
    return ray
