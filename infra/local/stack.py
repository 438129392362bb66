"""The local stack: a Ray head (dashboard on 127.0.0.1) and an MLflow server (SQLite + local artifacts).

    python infra/local/stack.py start  [--state-dir .holefill-local] [--num-cpus N] [ports...]
    python infra/local/stack.py status [--state-dir .holefill-local]
    python infra/local/stack.py stop   [--state-dir .holefill-local]

Everything the stack owns lives under the state directory: ``stack.json`` (what runs, with pids and
ports), ``auth_token`` (the Ray head's token, mode 0600, made by the first ``start``), ``logs/``,
``mlflow/`` (``mlflow.db`` and ``artifacts/``) and, when the path is short enough for Ray's sockets,
``ray/`` (Ray's temp dir). The Ray head runs with token authentication: its GCS, raylet and dashboard
agent listen on the machine's address (Ray's choice), and without a token nobody who reaches them can
submit a job. Clients use it through the exports ``start`` prints (``RAY_AUTH_MODE=token``,
``RAY_AUTH_TOKEN_PATH``). ``start`` is idempotent: services already running
from this state directory are reused. ``stop`` stops exactly the processes this stack started;
other Ray clusters on the machine are never touched (no ``ray stop``).

Importable as :class:`LocalStack` for scripts and tests.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import secrets
import stat
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from pydantic import Field, ValidationError

from infra.local.mlflow_server import (
    MlflowServerSettings,
    require_loopback,
    start_mlflow_server,
    stop_mlflow_server,
)
from infra.local.processes import ProcessHandle, http_answers, wait_for
from infra.local.ray_node import (
    MAX_TEMP_DIR_CHARS,
    RayNodeSettings,
    RayPorts,
    alive_node_count,
    auth_headers,
    find_free_port_block,
    ray_node_env,
    start_ray_node,
    stop_ray_node,
)
from pipeline.config import Config, first_error

__all__ = ["LocalStack", "ServiceStatus", "StackStatus", "main"]

DEFAULT_STATE_DIR = Path(".holefill-local")
STATE_FILE = "stack.json"
TOKEN_FILE = "auth_token"
TOKEN_BYTES = 32  # 256 bits, as `ray get-auth-token --generate` makes


class ServiceRecord(Config):
    """A running service as recorded in ``stack.json``."""

    pid: int
    create_time: float
    port: int
    log: Path

    def handle(self) -> ProcessHandle:
        return ProcessHandle(pid=self.pid, create_time=self.create_time)


class StackState(Config):
    """Contents of ``stack.json``: which services of this state directory run, and how to reach them."""

    host: str
    ray_temp_dir: Path
    ray_dashboard_port: int | None = None
    ray_agent_port: int | None = None  # the head's dashboard agent (job agent), on the machine's address
    ray: ServiceRecord | None = None
    mlflow: ServiceRecord | None = None


@dataclass(frozen=True)
class ServiceStatus:
    """One service's state as seen now."""

    name: str
    running: bool
    answering: bool
    url: str
    pid: int | None
    log: Path | None

    def line(self) -> str:
        state = "running" if self.running and self.answering else "starting" if self.running else "stopped"
        pid = f"pid {self.pid}" if self.running and self.pid else ""
        log = f"log {self.log}" if self.log else ""
        return f"{self.name:<7}{state:<9}{self.url:<26}{pid:<11}{log}".rstrip()


@dataclass(frozen=True)
class StackStatus:
    """The stack's services and the environment a user exports to use them."""

    ray: ServiceStatus
    mlflow: ServiceStatus
    ray_address: str
    dashboard_url: str
    mlflow_uri: str
    auth_token_path: Path

    @property
    def all_up(self) -> bool:
        return all(s.running and s.answering for s in (self.ray, self.mlflow))

    def client_env(self) -> dict[str, str]:
        """What a client of the stack exports (the ``export`` lines of :meth:`report`, as a mapping)."""
        return {"RAY_ADDRESS": self.ray_address, "RAY_API_SERVER_ADDRESS": self.dashboard_url,
                "MLFLOW_TRACKING_URI": self.mlflow_uri, "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN_PATH": str(self.auth_token_path)}

    def report(self) -> str:
        """Human-readable status, ending with the exports that point jobs and clients at the stack."""
        why = {"RAY_ADDRESS": "ray.init()", "RAY_API_SERVER_ADDRESS": "ray job submit",
               "RAY_AUTH_MODE": "the head refuses clients without its token"}
        exports = [f"export {key}={value}" + (f"  # {why[key]}" if key in why else "")
                   for key, value in self.client_env().items()]
        return "\n".join([self.ray.line(), self.mlflow.line(), "", *exports])


class LocalStack:
    """A Ray head and an MLflow server on loopback, owned by one state directory."""

    def __init__(
        self,
        state_dir: str | Path = DEFAULT_STATE_DIR,
        ray_dashboard_port: int = 8265,
        mlflow_port: int = 5000,
        host: str = "127.0.0.1",
        ray_port: int = 6379,
        num_cpus: int | None = None,
        num_gpus: int | None = None,
        ray_ports: RayPorts | None = None,
        startup_timeout_s: float = 180.0,
    ) -> None:
        """``ray_ports`` pins every Ray port (tests); otherwise GCS and dashboard use the ports given
        and Ray picks the rest. ``num_cpus``/``num_gpus`` default to what Ray detects."""
        self.state_dir = Path(state_dir).resolve()
        self.host = require_loopback(host)
        pinned = (ray_ports or RayPorts()).model_dump()
        pinned["gcs"] = pinned["gcs"] or ray_port
        pinned["dashboard"] = pinned["dashboard"] or ray_dashboard_port
        self.ray_ports = RayPorts(**pinned)  # validated again: the merged ports must still be distinct
        self.mlflow_settings = MlflowServerSettings(data_dir=self.state_dir / "mlflow", host=self.host, port=mlflow_port)
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.startup_timeout_s = startup_timeout_s
        self._state_write_lock = threading.Lock()

    # -- addresses -------------------------------------------------------------------------------

    @property
    def ray_address(self) -> str:
        """GCS address for ``ray.init(address=...)`` and ``ray start --address``."""
        return f"{self.host}:{self.ray_ports.gcs}"

    @property
    def dashboard_url(self) -> str:
        """Dashboard / Jobs API URL for ``ray job submit --address``."""
        return f"http://{self.host}:{self.ray_ports.dashboard}"

    @property
    def mlflow_uri(self) -> str:
        """Tracking URI of the MLflow server."""
        return self.mlflow_settings.tracking_uri

    @property
    def ray_temp_dir(self) -> Path:
        """Ray's temp dir for this stack: inside the state dir when short enough for Unix sockets."""
        inside = self.state_dir / "ray"
        if len(str(inside)) <= MAX_TEMP_DIR_CHARS:
            return inside
        # Stable per state dir, so a restart finds the same place.
        digest = hashlib.sha1(str(self.state_dir).encode()).hexdigest()[:10]
        return Path("/tmp") / f"hf-ray-{digest}"

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def auth_token_path(self) -> Path:
        """The Ray head's authentication token (``RAY_AUTH_TOKEN_PATH`` for every client of this stack)."""
        return self.state_dir / TOKEN_FILE

    def head_env(self) -> dict[str, str]:
        """Environment of the Ray head: token authentication with this stack's token, and its MLflow server.

        Jobs submitted with ``ray job submit`` inherit the head's environment, not the submitting shell's: with
        ``MLFLOW_TRACKING_URI`` here they log to this stack's server without a ``--runtime-env-json``, and with
        ``RAY_AUTH_MODE``/``RAY_AUTH_TOKEN_PATH`` their own ``ray.init()`` authenticates to the head.
        """
        env = ray_node_env(auth_token_path=self.auth_token_path)
        env["MLFLOW_TRACKING_URI"] = self.mlflow_uri
        return env

    def _auth_headers(self) -> dict[str, str]:
        """What this stack's own HTTP checks send; none while there is no token yet (nothing can answer then)."""
        if not self.auth_token_path.exists():
            return {}
        return auth_headers(self.head_env())

    def _ensure_token(self) -> None:
        """Make the head's token (0600, created exclusively) unless there is one; refuse one others can read."""
        path = self.auth_token_path
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            mode = stat.S_IMODE(path.stat().st_mode)
            if mode & 0o077:
                raise ValueError(f"{path}: the Ray token is readable by others (mode {mode:o}): chmod 600 it") from None
            if not path.read_text().strip():
                raise ValueError(f"{path}: the Ray token file is empty: delete it and start again") from None
            return
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(TOKEN_BYTES))

    # -- state file --------------------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        # Two `start`s at once (two terminals, parallel test workers) must not both launch servers.
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / "stack.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read_state(self) -> StackState:
        path = self.state_dir / STATE_FILE
        if path.exists():
            return StackState.model_validate_json(path.read_text())
        return StackState(host=self.host, ray_temp_dir=self.ray_temp_dir)

    def _write_state(self, state: StackState) -> None:
        path = self.state_dir / STATE_FILE
        with self._state_write_lock:  # the two start threads record their service one after the other
            tmp = path.with_suffix(".tmp")
            tmp.write_text(state.model_dump_json(indent=2) + "\n")
            tmp.replace(path)

    @staticmethod
    def _alive(record: ServiceRecord | None) -> bool:
        return record is not None and record.handle().is_alive()

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> StackStatus:
        """Start whatever is not running yet, wait until both services answer, return the status.

        Raises ``ValueError`` when services of this state dir already run on other ports, and
        :class:`~infra.local.processes.ServiceStartError` (with the log tail) when one fails to start.
        """
        with self._locked():
            self._ensure_token()  # before the head starts: it reads the token at start-up
            state = self._read_state()
            # Both services spend their start-up (10-60 s each on a busy machine) importing and
            # initialising, independently of each other: bring them up side by side.
            with ThreadPoolExecutor(max_workers=2, thread_name_prefix="stack-start") as pool:
                starts = [pool.submit(self._start_ray, state), pool.submit(self._start_mlflow, state)]
            for started in starts:
                started.result()  # re-raises the first failure; the other service keeps running
        return self.status()

    def _refuse_port_change(self, name: str, running_port: int, wanted_port: int) -> None:
        if running_port != wanted_port:
            raise ValueError(
                f"{name} of {self.state_dir} already runs on port {running_port}, not {wanted_port}: stop the stack first"
            )

    def _start_ray(self, state: StackState) -> None:
        if self._alive(state.ray):
            self._refuse_port_change("Ray head", state.ray.port, self.ray_ports.gcs)
            self._refuse_port_change("Ray dashboard", state.ray_dashboard_port, self.ray_ports.dashboard)
            # Possibly still coming up from a concurrent start: wait for it rather than start a second head.
            headers = self._auth_headers()
            wait_for(lambda: alive_node_count(self.dashboard_url, headers) >= 1, "Ray head", self.startup_timeout_s,
                     leader=state.ray.handle(), log_path=state.ray.log)
            return
        ports = self.ray_ports
        if ports.dashboard_agent_listen is None:  # pinned, so that start can wait for the job agent below
            ports = ports.model_copy(update={"dashboard_agent_listen": find_free_port_block(1)[0]})
        settings = RayNodeSettings(role="head", temp_dir=self.ray_temp_dir, num_cpus=self.num_cpus,
                           num_gpus=self.num_gpus, ports=ports)
        log = self.logs_dir / "ray-head.log"
        leader = start_ray_node(settings, log, self.dashboard_url, expected_alive_nodes=1,
                                timeout_s=self.startup_timeout_s, env=self.head_env())
        # The node is ALIVE before its dashboard agent, and `ray job submit` right after `start` was refused
        # with "No available agent to submit job" on a busy machine: return once the agent answers.
        agent = f"http://{self.host}:{ports.dashboard_agent_listen}/api/healthz"
        wait_for(lambda: http_answers(agent), "Ray job agent", self.startup_timeout_s, leader=leader, log_path=log)
        state.ray = ServiceRecord(pid=leader.pid, create_time=leader.create_time, port=self.ray_ports.gcs, log=log)
        state.ray_dashboard_port = self.ray_ports.dashboard
        state.ray_agent_port = ports.dashboard_agent_listen
        state.ray_temp_dir = self.ray_temp_dir
        self._write_state(state)

    def _start_mlflow(self, state: StackState) -> None:
        if self._alive(state.mlflow):
            self._refuse_port_change("MLflow server", state.mlflow.port, self.mlflow_settings.port)
            wait_for(lambda: http_answers(f"{self.mlflow_uri}/health"), "MLflow server", self.startup_timeout_s,
                     leader=state.mlflow.handle(), log_path=state.mlflow.log)
            return
        log = self.logs_dir / "mlflow-server.log"
        leader = start_mlflow_server(self.mlflow_settings, log, timeout_s=self.startup_timeout_s)
        state.mlflow = ServiceRecord(pid=leader.pid, create_time=leader.create_time, port=self.mlflow_settings.port, log=log)
        self._write_state(state)

    def stop(self) -> None:
        """Stop both services (each only if it is still the process this stack started). Idempotent."""
        with self._locked():
            state = self._read_state()
            if state.mlflow is not None:
                stop_mlflow_server(state.mlflow.handle())
                state.mlflow = None
                self._write_state(state)
            if state.ray is not None:
                stop_ray_node(state.ray.handle(), cluster_temp_dir=state.ray_temp_dir)
                state.ray = None
                self._write_state(state)

    def status(self) -> StackStatus:
        """What runs now, whether it answers, and where (ports as recorded by the ``start`` that ran)."""
        state = self._read_state()
        ray_running = self._alive(state.ray)
        mlflow_running = self._alive(state.mlflow)
        ray_address = f"{self.host}:{state.ray.port}" if ray_running else self.ray_address
        dashboard_url = f"http://{self.host}:{state.ray_dashboard_port}" if ray_running else self.dashboard_url
        mlflow_uri = f"http://{self.host}:{state.mlflow.port}" if mlflow_running else self.mlflow_uri
        ray = ServiceStatus(
            name="ray",
            running=ray_running,
            answering=ray_running and http_answers(f"{dashboard_url}/api/version", headers=self._auth_headers()),
            url=dashboard_url,
            pid=state.ray.pid if state.ray else None,
            log=state.ray.log if state.ray else None,
        )
        mlflow = ServiceStatus(
            name="mlflow",
            running=mlflow_running,
            answering=mlflow_running and http_answers(f"{mlflow_uri}/health"),
            url=mlflow_uri,
            pid=state.mlflow.pid if state.mlflow else None,
            log=state.mlflow.log if state.mlflow else None,
        )
        return StackStatus(ray=ray, mlflow=mlflow, ray_address=ray_address,
                           dashboard_url=dashboard_url, mlflow_uri=mlflow_uri, auth_token_path=self.auth_token_path)


class _CliArgs(Config):
    """Validated command-line options."""

    command: str
    state_dir: Path
    ray_port: int = Field(ge=1024, le=65535)
    dashboard_port: int = Field(ge=1024, le=65535)
    mlflow_port: int = Field(ge=1024, le=65535)
    num_cpus: int | None = Field(default=None, ge=0)
    num_gpus: int | None = Field(default=None, ge=0)


def _parse_args(argv: Sequence[str] | None) -> _CliArgs:
    parser = argparse.ArgumentParser(prog="stack.py", description="Local Ray head + MLflow server on 127.0.0.1.")
    parser.add_argument("command", choices=["start", "stop", "status"])
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                        help="where pids, logs, the MLflow database and artifacts live (default %(default)s)")
    parser.add_argument("--ray-port", type=int, default=6379, help="Ray GCS port (default %(default)s)")
    parser.add_argument("--dashboard-port", type=int, default=8265, help="Ray dashboard port (default %(default)s)")
    parser.add_argument("--mlflow-port", type=int, default=5000, help="MLflow server port (default %(default)s)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs the Ray head offers (default: detected)")
    parser.add_argument("--num-gpus", type=int, default=None, help="GPUs the Ray head offers (default: detected)")
    try:
        return _CliArgs.model_validate(vars(parser.parse_args(argv)))
    except ValidationError as exc:
        key, msg = first_error(exc, _CliArgs)
        parser.error(f"--{key.replace('.', '-').replace('_', '-')}: {msg}")


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; exit status 0 when the stack is in the requested state, 3 when status finds it down."""
    args = _parse_args(argv)
    stack = LocalStack(args.state_dir, ray_dashboard_port=args.dashboard_port, mlflow_port=args.mlflow_port,
                       ray_port=args.ray_port, num_cpus=args.num_cpus, num_gpus=args.num_gpus)
    try:
        if args.command == "start":
            print(stack.start().report())
            return 0
        if args.command == "stop":
            stack.stop()
            print(f"stopped the local stack of {stack.state_dir}")
            return 0
        status = stack.status()
    except ValueError as exc:  # a port clash or a bad token file: one line, no traceback
        print(f"stack.py {args.command}: {exc}", file=sys.stderr)
        return 2
    print(status.report())
    return 0 if status.all_up else 3  # 3 = "not running", as in LSB init scripts


if __name__ == "__main__":
    sys.exit(main())
