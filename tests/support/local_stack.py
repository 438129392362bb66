"""Real services for end-to-end tests: a Ray head, extra Ray worker nodes, an MLflow server, Ray jobs.

Tests import what they need::

    from support.local_stack import mlflow_server, ray_head, add_worker_node, submit_job

Every cluster gets explicit free ports for every port Ray opens and its own short temp dir, so
parallel test sessions (and a developer's own ``infra/local/stack.py`` stack) never collide, and
teardown stops exactly the processes the fixture started (never ``ray stop``, which would stop every
Ray cluster on the machine). The fixtures are session-scoped: one Ray head and one MLflow server
serve the whole test run, because each costs 10-60 s of start-up on a small CI machine.

The process handling is the local stack's own (``infra/local``); nothing here re-implements it.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import tempfile
import time
import urllib.request
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import pytest

from infra.local.mlflow_server import MlflowServerSettings, start_mlflow_server, stop_mlflow_server
from infra.local.processes import ProcessHandle
from infra.local.ray_node import (
    LOOPBACK,
    RayNodeSettings,
    RayPorts,
    alive_node_count,
    find_free_port_block,
    ray_node_env,
    start_ray_node,
    stop_ray_node,
    venv_bin,
)

__all__ = [
    "RayHead",
    "RayWorkerNode",
    "add_worker_node",
    "mlflow_server",
    "ray_driver",
    "ray_head",
    "running_mlflow_server",
    "running_ray_head",
    "submit_job",
]

# Start-up on a 2-core CI machine shared with other test processes can take a minute.
STARTUP_TIMEOUT_S = 300.0
# Small object store: test data is tiny, and /dev/shm is shared with everything else on the machine.
OBJECT_STORE_BYTES = 300 * 1024 * 1024
TERMINAL_JOB_STATES = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})


@dataclass
class RayWorkerNode:
    """A worker node started by :func:`add_worker_node`; ``stop()`` removes it from the cluster."""

    leader: ProcessHandle
    num_cpus: int
    resources: dict[str, float]

    def stop(self) -> None:
        """Stop this node's processes (idempotent)."""
        stop_ray_node(self.leader)


@dataclass
class RayHead:
    """A running Ray head: ``address`` for ``ray.init``, ``dashboard_url`` for ``ray job submit``."""

    address: str
    dashboard_url: str
    temp_dir: Path
    leader: ProcessHandle
    log_path: Path
    workers: list[RayWorkerNode] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # set in the head's environment, so every job inherits it

    def stop(self) -> None:
        """Stop the worker nodes added to this head, then the head; remove its temp dir."""
        for worker in self.workers:
            worker.stop()
        stop_ray_node(self.leader, cluster_temp_dir=self.temp_dir)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _short_temp_dir() -> Path:
    # Under /tmp directly, whatever TMPDIR says: Ray's socket paths must fit in 107 bytes.
    return Path(tempfile.mkdtemp(prefix="hf-ray-", dir="/tmp"))


@contextmanager
def running_ray_head(num_cpus: int = 4, resources: Mapping[str, float] | None = None,
                     env: Mapping[str, str] | None = None) -> Iterator[RayHead]:
    """A private Ray head on free loopback ports for the duration of the ``with`` block.

    ``env`` is added to the head's environment: jobs submitted to it inherit it (as on a configured cluster).
    """
    temp_dir = _short_temp_dir()
    ports = RayPorts.free(head=True)
    dashboard_url = f"http://{LOOPBACK}:{ports.dashboard}"
    settings = RayNodeSettings(role="head", temp_dir=temp_dir, num_cpus=num_cpus, resources=dict(resources or {}),
                       object_store_memory_bytes=OBJECT_STORE_BYTES, ports=ports)
    log_path = temp_dir / "ray-start-head.log"
    leader = start_ray_node(settings, log_path, dashboard_url, expected_alive_nodes=1, timeout_s=STARTUP_TIMEOUT_S,
                            env={**ray_node_env(), **dict(env or {})})
    head = RayHead(address=f"{LOOPBACK}:{ports.gcs}", dashboard_url=dashboard_url, temp_dir=temp_dir,
                   leader=leader, log_path=log_path, env=dict(env or {}))
    try:
        yield head
    finally:
        head.stop()


def add_worker_node(head: RayHead, num_cpus: int, resources: Mapping[str, float] | None = None) -> RayWorkerNode:
    """Join a second Ray node on this machine to ``head`` (simulated multi-node); returns once it is ALIVE.

    ``resources`` (e.g. ``{"node_b": 1}``) lets a test pin work to this node. The node is stopped
    with the head at teardown, or earlier by ``node.stop()``.
    """
    expected = alive_node_count(head.dashboard_url) + 1
    ports = RayPorts.free(head=False)
    # Its own temp dir, as a real second machine has: two nodes sharing one would share the runtime-env
    # cache, and the worker node's agent would delete a job's working_dir package from under the driver
    # on the head when its own last user exits. Being inside the head's temp dir, the head's teardown
    # sweep still catches anything the node leaves behind.
    settings = RayNodeSettings(role="worker", head_address=head.address, temp_dir=head.temp_dir / f"n{len(head.workers)}",
                       num_cpus=num_cpus,
                       resources=dict(resources or {}), object_store_memory_bytes=OBJECT_STORE_BYTES, ports=ports)
    log_path = head.temp_dir / f"ray-start-worker-{len(head.workers)}.log"
    leader = start_ray_node(settings, log_path, head.dashboard_url, expected_alive_nodes=expected,
                            timeout_s=STARTUP_TIMEOUT_S)
    node = RayWorkerNode(leader=leader, num_cpus=num_cpus, resources=dict(resources or {}))
    head.workers.append(node)
    return node


@contextmanager
def running_mlflow_server(data_dir: Path) -> Iterator[str]:
    """An MLflow server (SQLite + proxied local artifacts in ``data_dir``) on a free loopback port."""
    (port,) = find_free_port_block(1)
    settings = MlflowServerSettings(data_dir=data_dir, port=port)
    leader = start_mlflow_server(settings, data_dir / "mlflow-server.log", timeout_s=STARTUP_TIMEOUT_S)
    try:
        yield settings.tracking_uri
    finally:
        stop_mlflow_server(leader)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Tracking URI of a real MLflow server on 127.0.0.1 shared by the test session."""
    with running_mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as tracking_uri:
        yield tracking_uri


@pytest.fixture(scope="session")
def ray_head(mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayHead]:
    """A real Ray head (4 logical CPUs, dashboard on 127.0.0.1) shared by the test session.

    Configured as ``infra/local/stack.py`` configures its head: ``MLFLOW_TRACKING_URI`` names the session's
    MLflow server, so submitted jobs log there. Its ``HOME`` is a private folder (``head.env["HOME"]``): jobs'
    default ``~/ray_results`` lands there, never in the developer's home.

    Tests that add worker nodes should stop them when done (``node.stop()``) so later tests see
    one node; the head stops any that are left at the end of the session.
    """
    home = tmp_path_factory.mktemp("ray-head-home")
    # Caches stay where they are: a fresh ~/.cache would rebuild DeepSpeed's C++ ops in every session.
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    env = {"MLFLOW_TRACKING_URI": mlflow_server, "HOME": str(home), "XDG_CACHE_HOME": cache}
    with running_ray_head(num_cpus=4, env=env) as head:
        yield head


@pytest.fixture(scope="module")
def ray_driver(ray_head: RayHead):
    """This module's Ray driver, connected to the session's Ray head; yields the ``ray`` module.

    One cluster serves the whole suite: an embedded ``ray.init()`` per module cost 10-20 s of start-up each on a
    2-core machine. The driver passes its ``sys.path`` to the workers, so they import the repository and
    ``tests/`` as the test process does.
    """
    import ray

    ray.init(address=ray_head.address, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def submit_job(
    dashboard_url: str,
    entrypoint: str | Sequence[str],
    working_dir: str | Path,
    env: Mapping[str, str] | None = None,
    timeout: float = 300.0,
) -> tuple[str, str]:
    """Submit ``entrypoint`` with ``ray job submit`` (the CLI users run) and wait for it to finish.

    ``entrypoint`` is a shell command line or an argv list; ``env`` becomes the job's
    ``runtime_env.env_vars``. Returns the final status (``SUCCEEDED``, ``FAILED`` or ``STOPPED``)
    and the job's logs. Raises ``TimeoutError`` (after stopping the job) when it runs past
    ``timeout`` seconds, and ``RuntimeError`` when the submission itself is refused.
    """
    # The CLI shell-quotes each word after `--` (shlex.join): hand it words, not one command string.
    words = shlex.split(entrypoint) if isinstance(entrypoint, str) else list(entrypoint)
    submission_id = f"holefill-test-{uuid.uuid4().hex[:12]}"
    cli_env = ray_node_env()
    submit = [
        str(venv_bin() / "ray"), "job", "submit",
        "--address", dashboard_url,
        "--submission-id", submission_id,
        "--working-dir", str(working_dir),
        "--runtime-env-json", json.dumps({"env_vars": dict(env or {})}),
        "--no-wait",
        "--", *words,
    ]
    submitted = subprocess.run(submit, env=cli_env, capture_output=True, text=True, timeout=120)
    if submitted.returncode != 0:
        raise RuntimeError(f"ray job submit failed ({submitted.returncode}): {submitted.stderr.strip()[-2000:]}")

    # The Jobs REST API behind the CLI gives the state without parsing CLI output.
    job_url = f"{dashboard_url}/api/jobs/{submission_id}"
    deadline = time.monotonic() + timeout
    status = "PENDING"
    while time.monotonic() < deadline:
        status = _get_json(job_url)["status"]
        if status in TERMINAL_JOB_STATES:
            break
        time.sleep(0.5)
    logs = _get_json(f"{job_url}/logs").get("logs", "")
    if status not in TERMINAL_JOB_STATES:
        subprocess.run([str(venv_bin() / "ray"), "job", "stop", "--address", dashboard_url, submission_id],
                       env=cli_env, capture_output=True, timeout=60)
        raise TimeoutError(f"job {submission_id} still {status} after {timeout:.0f} s; logs:\n{logs[-3000:]}")
    return status, logs
