"""A local MLflow tracking server: SQLite backend store, proxied local artifact store, loopback only.

``--artifacts-destination`` (not ``--default-artifact-root``) makes the server proxy artifact
uploads and downloads, so clients (Ray workers, jobs) need no access to the artifact directory and
log through ``http://`` exactly as they will against the production server.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from pydantic import Field, field_validator

from infra.local.processes import ProcessHandle, http_answers, launch_detached, stop_session, wait_for
from infra.local.ray_node import venv_bin
from pipeline.config import Config

__all__ = ["LOCAL_WEBHOOK_TARGETS", "MlflowServerSettings", "mlflow_server_argv", "start_mlflow_server",
           "stop_mlflow_server"]

# Registry webhooks (serving's alias push, pipeline/lifecycle/alias_webhook.py) may call http:// addresses on this
# machine. MLflow refuses both by default (https only, public addresses only: its guard against a webhook made to
# reach internal services). The local server listens on loopback only, so whoever can create a webhook here is
# already on this machine and reaches those addresses anyway.
LOCAL_WEBHOOK_TARGETS = {"MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "https,http", "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true"}


def require_loopback(host: str) -> str:
    """Return ``host`` if it is a loopback IP address, else raise ``ValueError``."""
    try:
        is_loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        is_loopback = False
    if not is_loopback:
        raise ValueError(f"host must be a loopback IP address (the local stack never listens outside it), got {host!r}")
    return host


class MlflowServerSettings(Config):
    """Where the local MLflow server keeps its data and where it listens."""

    data_dir: Path = Field(description="holds mlflow.db and artifacts/")
    host: str = "127.0.0.1"
    port: int = Field(default=5000, ge=1024, le=65535)
    # One worker: the local server serves a handful of clients, and each uvicorn worker costs ~150 MB.
    workers: int = Field(default=1, ge=1)

    @field_validator("host")
    @classmethod
    def _loopback_only(cls, host: str) -> str:
        return require_loopback(host)

    @property
    def tracking_uri(self) -> str:
        """The URI clients pass to ``mlflow.set_tracking_uri`` / ``MLFLOW_TRACKING_URI``."""
        return f"http://{self.host}:{self.port}"

    @property
    def backend_store_uri(self) -> str:
        """SQLite database of experiments, runs and the model registry."""
        return f"sqlite:///{self.data_dir.resolve() / 'mlflow.db'}"

    @property
    def artifacts_dir(self) -> Path:
        """Directory behind the server's artifact proxy."""
        return self.data_dir.resolve() / "artifacts"


def mlflow_server_argv(settings: MlflowServerSettings) -> list[str]:
    """The ``mlflow server`` command line for ``settings``."""
    mlflow = venv_bin() / "mlflow"
    if not mlflow.exists():
        raise FileNotFoundError(f"mlflow not found at {mlflow}; install holefill into this environment")
    return [
        str(mlflow), "server",
        "--backend-store-uri", settings.backend_store_uri,
        "--artifacts-destination", str(settings.artifacts_dir),
        "--host", settings.host,
        "--port", str(settings.port),
        "--workers", str(settings.workers),
    ]


def start_mlflow_server(settings: MlflowServerSettings, log_path: Path, timeout_s: float = 120.0) -> ProcessHandle:
    """Start the server and return once ``/health`` answers; stop it again and raise if it does not."""
    settings.artifacts_dir.mkdir(parents=True, exist_ok=True)
    # MLflow 3 servers also start a job runner with a dozen huey consumer processes (~2 GB) for its GenAI
    # jobs; holefill runs none of them, and a test session or laptop running a few servers runs out of memory.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **LOCAL_WEBHOOK_TARGETS}
    leader = launch_detached(mlflow_server_argv(settings), log_path, env=env)
    try:
        wait_for(lambda: http_answers(f"{settings.tracking_uri}/health"), "MLflow server", timeout_s,
                 leader=leader, log_path=log_path)
    except BaseException:
        stop_mlflow_server(leader)
        raise
    return leader


def stop_mlflow_server(leader: ProcessHandle, grace_s: float = 15.0) -> None:
    """Stop the server and its uvicorn workers."""
    # `mlflow server` runs the web server as a child process: signal the whole session at once
    # rather than rely on the CLI forwarding SIGTERM.
    stop_session(leader, grace_s=grace_s, terminate_all_first=True)
