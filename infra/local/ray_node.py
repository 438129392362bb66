"""One Ray node on this machine (head or worker), started with ``ray start --block`` and stopped alone.

``ray start`` without ``--block`` daemonises and leaves ``ray stop`` as the only way out, and
``ray stop`` kills every Ray process on the machine, other users' clusters included. With
``--block`` the ``ray start`` process stays as the session leader of the node: SIGTERM makes it
shut down exactly the processes it started, so a node is stopped by stopping its leader
(:func:`infra.local.processes.stop_session`).

Every port Ray would otherwise pick (or default to 6379/8265/10001/...) can be given explicitly, so
several clusters (parallel test sessions, a developer's stack) never collide. Each cluster also
gets its own ``--temp-dir``: sockets, logs and the ``ray_current_cluster`` file stay apart, and a
plain ``ray.init()`` elsewhere on the machine never attaches to it by accident.

Ray replaces a loopback ``--node-ip-address`` by the machine's reachable address by design (and
refuses worker nodes when told not to), so only the HTTP endpoints, the dashboard and the Ray
client server, are bound to loopback here. Ray's GCS, raylet and dashboard agent still listen on the
machine's address; what guards them is Ray's token authentication (``RAY_AUTH_MODE=token``), which
:func:`ray_node_env` turns on when given a token file. The clients here (:func:`alive_node_count`,
the readiness checks) send that token as Ray's own clients do (:func:`auth_headers`).
"""

from __future__ import annotations

import json
import os
import random
import socket
import sys
import urllib.request
from pathlib import Path
from typing import Literal, Mapping

import psutil
from pydantic import Field, model_validator

from infra.local.processes import ProcessHandle, http_answers, launch_detached, stop_session, wait_for
from pipeline.config import Config
from pipeline.raycluster import announce_agent_listen_port

__all__ = [
    "RayNodeSettings",
    "RayPorts",
    "alive_node_count",
    "auth_headers",
    "find_free_port_block",
    "ray_node_env",
    "ray_start_argv",
    "start_ray_node",
    "stop_ray_node",
    "venv_bin",
]

LOOPBACK = "127.0.0.1"
# Below Linux's ephemeral range (32768-60999), so an outgoing connection made between our probe
# and Ray's bind cannot take a port we handed out.
_PORT_SEARCH_RANGE = (20000, 32000)
# Unix socket paths are limited to 107 bytes; Ray puts sockets at
# <temp-dir>/session_<date>_<time>_<usec>_<pid>/sockets/<name>.<n>, about 70 bytes after the temp dir.
MAX_TEMP_DIR_CHARS = 36

Port = int


def _check_port(value: int | None, name: str) -> None:
    if value is not None and not 1024 <= value <= 65535:
        raise ValueError(f"ports.{name} must be in 1024..65535, got {value}")


class RayPorts(Config):
    """Ports of one Ray node; ``None`` leaves the choice to Ray (its defaults or a random port).

    ``gcs``, ``dashboard`` and ``client_server`` exist on the head only.
    """

    gcs: Port | None = None
    dashboard: Port | None = None
    client_server: Port | None = None
    node_manager: Port | None = None
    object_manager: Port | None = None
    dashboard_agent_listen: Port | None = None
    dashboard_agent_grpc: Port | None = None
    runtime_env_agent: Port | None = None
    metrics_export: Port | None = None
    min_worker: Port | None = None
    max_worker: Port | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "RayPorts":
        for name, value in self.model_dump().items():
            _check_port(value, name)
        if (self.min_worker is None) != (self.max_worker is None):
            raise ValueError("ports.min_worker and ports.max_worker must be given together")
        if self.min_worker is not None and self.min_worker > self.max_worker:
            raise ValueError("ports.min_worker must not exceed ports.max_worker")
        named = [v for k, v in self.model_dump().items() if v is not None and k not in ("min_worker", "max_worker")]
        if len(named) != len(set(named)):
            raise ValueError("ports: every named Ray port must be different")
        if self.min_worker is not None and any(self.min_worker <= p <= self.max_worker for p in named):
            raise ValueError("ports: the worker port range must not contain a named Ray port")
        return self

    @classmethod
    def free(cls, head: bool, worker_ports: int = 32) -> "RayPorts":
        """Explicit, currently free loopback ports for every port a node opens.

        ``worker_ports`` bounds how many worker processes (tasks/actors alive at once) the node can
        run; each needs its own port.
        """
        names = ["node_manager", "object_manager", "dashboard_agent_listen", "dashboard_agent_grpc",
                 "runtime_env_agent", "metrics_export"]
        if head:
            names = ["gcs", "dashboard", "client_server", *names]
        block = find_free_port_block(len(names) + worker_ports)
        named = dict(zip(names, block))
        return cls(**named, min_worker=block[len(names)], max_worker=block[-1])


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def find_free_port_block(count: int, attempts: int = 200) -> list[int]:
    """``count`` consecutive ports that are free on loopback right now, at a random place.

    A random start makes two test sessions that probe at the same moment unlikely to pick the same
    block; a contiguous block gives Ray's worker port range in one piece.
    """
    if count < 1:
        raise ValueError(f"port block size must be >= 1, got {count}")
    low, high = _PORT_SEARCH_RANGE
    rng = random.SystemRandom()
    for _ in range(attempts):
        start = rng.randrange(low, high - count)
        if all(_port_is_free(p) for p in range(start, start + count)):
            return list(range(start, start + count))
    raise RuntimeError(f"no block of {count} free ports found in {low}..{high}")


class RayNodeSettings(Config):
    """How to start one Ray node: head (with dashboard) or a worker joining ``head_address``."""

    role: Literal["head", "worker"]
    head_address: str | None = Field(default=None, description="GCS address host:port; workers only")
    temp_dir: Path
    num_cpus: int | None = Field(default=None, ge=0)
    num_gpus: int | None = Field(default=None, ge=0)
    resources: dict[str, float] = Field(default_factory=dict)
    object_store_memory_bytes: int | None = Field(default=None, ge=78_643_200)  # Ray's minimum, 75 MiB
    ports: RayPorts = Field(default_factory=RayPorts)

    @model_validator(mode="after")
    def _role_rules(self) -> "RayNodeSettings":
        if self.role == "worker" and not self.head_address:
            raise ValueError("head_address is required for a worker node")
        if self.role == "head" and self.head_address:
            raise ValueError("head_address is only for worker nodes")
        if self.role == "worker" and any(
            v is not None for v in (self.ports.gcs, self.ports.dashboard, self.ports.client_server)
        ):
            raise ValueError("ports.gcs, ports.dashboard and ports.client_server are head-only")
        if len(str(self.temp_dir)) > MAX_TEMP_DIR_CHARS:
            raise ValueError(
                f"temp_dir {self.temp_dir} is longer than {MAX_TEMP_DIR_CHARS} characters "
                "(Ray's socket paths under it would exceed the 107-byte Unix limit)"
            )
        if not self.temp_dir.is_absolute():
            raise ValueError(f"temp_dir must be absolute, got {self.temp_dir}")
        return self


def venv_bin() -> Path:
    """The bin directory of the running interpreter's environment (works without activating it)."""
    # Not resolved: a venv's python is a symlink to the base interpreter, whose bin has no ray/mlflow.
    return Path(sys.executable).parent


def _tool(name: str) -> str:
    path = venv_bin() / name
    if not path.exists():
        raise FileNotFoundError(f"{name} not found next to {sys.executable}; install holefill into this environment")
    return str(path)


_PORT_FLAGS = {
    "gcs": "--port",
    "dashboard": "--dashboard-port",
    "client_server": "--ray-client-server-port",
    "node_manager": "--node-manager-port",
    "object_manager": "--object-manager-port",
    "dashboard_agent_listen": "--dashboard-agent-listen-port",
    "dashboard_agent_grpc": "--dashboard-agent-grpc-port",
    "runtime_env_agent": "--runtime-env-agent-port",
    "metrics_export": "--metrics-export-port",
    "min_worker": "--min-worker-port",
    "max_worker": "--max-worker-port",
}


def ray_start_argv(settings: RayNodeSettings) -> list[str]:
    """The ``ray start --block`` command line for ``settings``."""
    argv = [_tool("ray"), "start", "--block", "--disable-usage-stats", f"--temp-dir={settings.temp_dir}"]
    if settings.role == "head":
        argv += ["--head", "--include-dashboard=true", f"--dashboard-host={LOOPBACK}"]
    else:
        argv += [f"--address={settings.head_address}"]
    for field, flag in _PORT_FLAGS.items():
        value = getattr(settings.ports, field)
        if value is not None:
            argv.append(f"{flag}={value}")
    if settings.num_cpus is not None:
        argv.append(f"--num-cpus={settings.num_cpus}")
    if settings.num_gpus is not None:
        argv.append(f"--num-gpus={settings.num_gpus}")
    if settings.resources:
        argv.append(f"--resources={json.dumps(settings.resources, sort_keys=True)}")
    if settings.object_store_memory_bytes is not None:
        argv.append(f"--object-store-memory={settings.object_store_memory_bytes}")
    return argv


def ray_node_env(base: dict[str, str] | None = None, auth_token_path: Path | None = None) -> dict[str, str]:
    """Environment for a local Ray node: no usage stats, the venv on PATH, and Ray's token auth.

    With ``auth_token_path`` the node runs with token authentication (``RAY_AUTH_MODE=token``) and reads its
    token from that file (``RAY_AUTH_TOKEN_PATH``, which Ray reads like ``~/.ray/auth_token``); every job it runs
    inherits both, so the job's own ``ray.init()`` authenticates too. Without it, ``RAY_AUTH_MODE`` is whatever
    ``base`` says (unset: Ray's default for a new cluster).
    """
    env = dict(os.environ if base is None else base)
    if auth_token_path is not None:
        env["RAY_AUTH_MODE"] = "token"
        env["RAY_AUTH_TOKEN_PATH"] = str(auth_token_path)
        env.pop("RAY_AUTH_TOKEN", None)  # Ray prefers it to the file: a stray one would split the cluster's token
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # Draining on SIGTERM lets Serve replicas migrate off a node; a local node has nowhere to
    # migrate to, and the default 30 s wait would only slow every stop down.
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    # Job entrypoints run `python ...` through the raylet's PATH: it must be this environment's python.
    env["PATH"] = f"{venv_bin()}{os.pathsep}{env.get('PATH', '')}"
    return env


def auth_headers(env: Mapping[str, str]) -> dict[str, str]:
    """The HTTP header that authenticates to a Ray cluster, from an environment as Ray's clients read it.

    ``RAY_AUTH_MODE=token`` with ``RAY_AUTH_TOKEN`` or else the file ``RAY_AUTH_TOKEN_PATH``; empty when the
    environment does not use token authentication. A token file that cannot be read is a one-line error.
    """
    if env.get("RAY_AUTH_MODE", "").lower() != "token":
        return {}
    token = env.get("RAY_AUTH_TOKEN", "").strip()
    if not token and env.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(env["RAY_AUTH_TOKEN_PATH"])
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise ValueError(f"RAY_AUTH_TOKEN_PATH {path}: cannot read the Ray token ({exc.strerror})") from None
        if not token:
            raise ValueError(f"RAY_AUTH_TOKEN_PATH {path}: the Ray token file is empty")
    return {"Authorization": f"Bearer {token}"} if token else {}


def alive_node_count(dashboard_url: str, headers: Mapping[str, str] | None = None) -> int:
    """Number of ALIVE nodes the cluster behind ``dashboard_url`` reports (0 if it does not answer).

    ``headers`` authenticate to a cluster with token authentication (:func:`auth_headers`).
    """
    request = urllib.request.Request(f"{dashboard_url}/api/v0/nodes?detail=1&limit=1000", headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            payload = json.load(response)
    except (OSError, ValueError):
        return 0
    nodes = payload.get("data", {}).get("result", {}).get("result", [])
    return sum(1 for node in nodes if node.get("state") == "ALIVE")


def start_ray_node(
    settings: RayNodeSettings,
    log_path: Path,
    dashboard_url: str,
    expected_alive_nodes: int,
    timeout_s: float = 120.0,
    env: dict[str, str] | None = None,
) -> ProcessHandle:
    """Start the node and return once the cluster reports ``expected_alive_nodes`` alive nodes.

    For a head, ``dashboard_url`` is its own dashboard and ``expected_alive_nodes`` is 1; for a
    worker, the head's dashboard and the count including the new node. On failure the node is
    stopped again and :class:`~infra.local.processes.ServiceStartError` carries its log tail.
    """
    settings.temp_dir.mkdir(parents=True, exist_ok=True)
    env = env or ray_node_env()
    headers = auth_headers(env)  # the node's own token: the readiness checks below go through Ray's auth
    leader = launch_detached(ray_start_argv(settings), log_path, env=env)
    what = f"Ray {settings.role} node"

    def ready() -> bool:
        if settings.role == "head" and settings.ports.dashboard_agent_listen is not None:
            # the raylet's fixed 15 s wait for the dashboard agent fails on a busy machine (pipeline/raycluster.py)
            announce_agent_listen_port(settings.temp_dir, settings.ports.dashboard_agent_listen)
        if settings.role == "head" and not http_answers(f"{dashboard_url}/api/version", headers=headers):
            return False
        return alive_node_count(dashboard_url, headers) >= expected_alive_nodes

    try:
        wait_for(ready, what, timeout_s, leader=leader, log_path=log_path)
    except BaseException:
        stop_ray_node(leader, settings.temp_dir if settings.role == "head" else None)
        raise
    return leader


def _processes_under(temp_dir: Path) -> list[psutil.Process]:
    """Processes whose command line mentions ``temp_dir`` (every Ray process of that cluster does)."""
    marker = str(temp_dir)

    def names_it(arg: str) -> bool:
        # Whole path components only: /tmp/hf-ray-ab must not match /tmp/hf-ray-abc.
        return arg == marker or arg.endswith(f"={marker}") or f"{marker}{os.sep}" in arg

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(names_it(arg) for arg in proc.info["cmdline"] or ()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def stop_ray_node(leader: ProcessHandle, cluster_temp_dir: Path | None = None, grace_s: float = 30.0) -> None:
    """Stop one node (its ``ray start --block`` leader and all it spawned); leaves other clusters alone.

    With ``cluster_temp_dir`` (when stopping a head), stragglers that left the node's session but
    belong to this cluster's temp dir are killed too.
    """
    extra = (lambda: _processes_under(cluster_temp_dir)) if cluster_temp_dir is not None else None
    stop_session(leader, grace_s=grace_s, extra=extra)
