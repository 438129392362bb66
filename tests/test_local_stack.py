"""The local stack and the end-to-end fixtures: real Ray head, real MLflow server, real `ray job submit`.

The first part specifies the rules of the building blocks (fast, no services); the ``e2e`` part
starts the real services.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import psutil
import pytest

from support.local_stack import RayHead, add_worker_node

from infra.local.mlflow_server import MlflowServerSettings, mlflow_server_argv
from infra.local.processes import ProcessHandle, ServiceStartError, launch_detached, stop_session, wait_for
from infra.local.ray_node import RayNodeSettings, RayPorts, alive_node_count, find_free_port_block, ray_start_argv
from infra.local.ray_node import auth_headers, ray_node_env, venv_bin
from infra.local.stack import LocalStack

REPO_ROOT = Path(__file__).resolve().parents[1]
STACK_SCRIPT = REPO_ROOT / "infra" / "local" / "stack.py"


# -- building blocks ---------------------------------------------------------------------------------


def test_ray_ports_must_be_distinct_and_unprivileged():
    with pytest.raises(ValueError, match="every named Ray port must be different"):
        RayPorts(gcs=24000, dashboard=24000)
    with pytest.raises(ValueError, match="1024..65535"):
        RayPorts(gcs=80)
    with pytest.raises(ValueError, match="given together"):
        RayPorts(min_worker=25000)
    with pytest.raises(ValueError, match="must not contain a named Ray port"):
        RayPorts(gcs=25005, min_worker=25000, max_worker=25010)


def test_free_head_ports_pin_every_port_ray_opens():
    ports = RayPorts.free(head=True, worker_ports=8)
    argv = ray_start_argv(RayNodeSettings(role="head", temp_dir=Path("/tmp/hf-ray-x"), num_cpus=2, ports=ports))
    for flag in ("--port=", "--dashboard-port=", "--ray-client-server-port=", "--node-manager-port=",
                 "--object-manager-port=", "--dashboard-agent-listen-port=", "--dashboard-agent-grpc-port=",
                 "--runtime-env-agent-port=", "--metrics-export-port=", "--min-worker-port=", "--max-worker-port="):
        assert sum(arg.startswith(flag) for arg in argv) == 1, flag
    assert ports.max_worker - ports.min_worker + 1 == 8
    assert "--block" in argv and "--head" in argv and "--dashboard-host=127.0.0.1" in argv
    assert "--temp-dir=/tmp/hf-ray-x" in argv and "--num-cpus=2" in argv


def test_free_port_block_is_contiguous_and_bindable():
    block = find_free_port_block(5)
    assert block == list(range(block[0], block[0] + 5))
    with pytest.raises(ValueError, match=">= 1"):
        find_free_port_block(0)


def test_worker_node_spec_rules():
    argv = ray_start_argv(RayNodeSettings(role="worker", head_address="127.0.0.1:24000", temp_dir=Path("/tmp/hf-ray-x"),
                                      resources={"node_b": 1}))
    assert "--address=127.0.0.1:24000" in argv and "--head" not in argv
    assert '--resources={"node_b": 1.0}' in argv
    with pytest.raises(ValueError, match="head_address is required"):
        RayNodeSettings(role="worker", temp_dir=Path("/tmp/hf-ray-x"))
    with pytest.raises(ValueError, match="head-only"):
        RayNodeSettings(role="worker", head_address="127.0.0.1:1", temp_dir=Path("/tmp/x"), ports=RayPorts(dashboard=24001))
    with pytest.raises(ValueError, match="107-byte"):
        RayNodeSettings(role="head", temp_dir=Path("/tmp") / ("d" * 60))


def test_mlflow_server_is_loopback_only_and_proxies_artifacts(tmp_path):
    with pytest.raises(ValueError, match="loopback"):
        MlflowServerSettings(data_dir=tmp_path, host="0.0.0.0")
    argv = mlflow_server_argv(MlflowServerSettings(data_dir=tmp_path, port=24555))
    assert argv[argv.index("--artifacts-destination") + 1] == str(tmp_path.resolve() / "artifacts")
    assert argv[argv.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    with pytest.raises(ValueError, match="loopback"):
        LocalStack(tmp_path, host="192.168.1.10")


def test_the_stack_makes_a_private_token_and_its_head_and_jobs_use_it(tmp_path):
    stack = LocalStack(tmp_path / "stack", mlflow_port=5123)
    stack._ensure_token()
    token = stack.auth_token_path.read_text()
    assert len(token) == 64 and stat.S_IMODE(stack.auth_token_path.stat().st_mode) == 0o600
    stack._ensure_token()  # a second start keeps the token the running head has
    assert stack.auth_token_path.read_text() == token
    env = stack.head_env()
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN_PATH"] == str(stack.auth_token_path)
    assert auth_headers(env) == {"Authorization": f"Bearer {token}"}
    assert auth_headers({"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN_PATH": "/nowhere"}) == {}
    # without a token file the environment keeps the mode it had (the suite's own Ray: disabled)
    assert ray_node_env({"RAY_AUTH_MODE": "disabled"})["RAY_AUTH_MODE"] == "disabled"

    stack.auth_token_path.chmod(0o644)
    with pytest.raises(ValueError, match="readable by others"):
        stack._ensure_token()
    stack.auth_token_path.chmod(0o600)
    stack.auth_token_path.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        stack._ensure_token()
    with pytest.raises(ValueError, match=r"^RAY_AUTH_TOKEN_PATH .*: the Ray token file is empty$"):
        auth_headers(env)


def test_process_handle_does_not_follow_a_reused_pid():
    me = ProcessHandle.of(os.getpid())
    assert me.is_alive()
    assert not ProcessHandle(pid=os.getpid(), create_time=me.create_time - 3600).is_alive()


def test_stop_session_stops_the_whole_tree_and_nothing_else(tmp_path):
    bystander = subprocess.Popen(["sleep", "60"])
    # A service whose child moves to its own process group (as Ray's workers do) but stays in the session.
    service = launch_detached(
        [sys.executable, "-c", textwrap.dedent("""
            import os, subprocess, time
            subprocess.Popen(["sleep", "60"], preexec_fn=os.setpgrp)
            time.sleep(60)
        """)],
        tmp_path / "service.log",
    )
    wait_for(lambda: len(psutil.Process(service.pid).children()) == 1, "child started", 30)
    (grandchild,) = psutil.Process(service.pid).children()
    try:
        stop_session(service, grace_s=5)
        assert not service.is_alive()
        assert not grandchild.is_running() or grandchild.status() == psutil.STATUS_ZOMBIE
        assert bystander.poll() is None
        stop_session(service, grace_s=1)  # already stopped: nothing to do, no error
    finally:
        bystander.kill()
        bystander.wait()


def test_wait_for_reports_an_early_exit_with_the_log_tail(tmp_path):
    log = tmp_path / "crash.log"
    leader = launch_detached([sys.executable, "-c", "print('port 1234 already in use'); raise SystemExit(1)"], log)
    with pytest.raises(ServiceStartError, match="exited before it was ready") as failure:
        wait_for(lambda: False, "demo service", timeout_s=60, leader=leader, log_path=log)
    assert "port 1234 already in use" in str(failure.value)


# -- end to end ----------------------------------------------------------------------------------------

JOB_SCRIPT = """
import os
import mlflow
import ray

ray.init()  # the head's cluster, authenticated with the token the job inherits from the head
print("holefill job says hello from", len(ray.nodes()), "node", flush=True)
mlflow.set_experiment("local-stack-smoke")
with mlflow.start_run(run_name=os.environ["HOLEFILL_RUN_NAME"]):
    mlflow.log_metric("answer", 42.0)
"""


def _session_processes(pid: int) -> list[psutil.Process]:
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == pid:
                members.append(proc)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return members


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _ray_job_submit(env: dict[str, str], address: str, job_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    """`ray job submit` as the README writes it, run from the job's folder."""
    argv = [str(venv_bin() / "ray"), "job", "submit", "--address", address, "--working-dir", ".", *extra,
            "--", "python", "smoke.py"]
    return subprocess.run(argv, env=env, cwd=job_dir, capture_output=True, text=True, timeout=300)


def _post_status(url: str) -> int:
    request = urllib.request.Request(url, data=b'{"entrypoint": "touch /tmp/pwned"}', method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as refused:
        return refused.code


def _stack_cli(command: str, state_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(STACK_SCRIPT), command, "--state-dir", str(state_dir)],
                          capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)


@pytest.mark.e2e
def test_local_stack_runs_a_job_that_logs_to_mlflow_and_stops_cleanly(tmp_path):
    from mlflow.tracking import MlflowClient

    gcs, dashboard, mlflow_port = find_free_port_block(3)
    stack = LocalStack(tmp_path / "stack", ray_port=gcs, ray_dashboard_port=dashboard, mlflow_port=mlflow_port,
                       num_cpus=2, startup_timeout_s=300)
    try:
        assert stack.start().all_up
        first = json.loads((stack.state_dir / "stack.json").read_text())
        stack.start()  # already running: reused, not started twice
        again = json.loads((stack.state_dir / "stack.json").read_text())
        assert (again["ray"]["pid"], again["mlflow"]["pid"]) == (first["ray"]["pid"], first["mlflow"]["pid"])

        shown = _stack_cli("status", stack.state_dir)
        assert shown.returncode == 0, shown.stderr  # the stack's own checks authenticate with its token
        assert stack.dashboard_url in shown.stdout and stack.mlflow_uri in shown.stdout
        exports = dict(re.findall(r"^export (\w+)=(\S+)", shown.stdout, flags=re.MULTILINE))
        assert exports["RAY_AUTH_MODE"] == "token" and exports["RAY_AUTH_TOKEN_PATH"] == str(stack.auth_token_path)
        assert stat.S_IMODE(stack.auth_token_path.stat().st_mode) == 0o600

        job_dir = tmp_path / "job"
        job_dir.mkdir()
        (job_dir / "smoke.py").write_text(JOB_SCRIPT)
        run_name = f"smoke-{uuid.uuid4().hex[:8]}"
        home = tmp_path / "home"  # no ~/.ray/auth_token: a token can only come from what the stack printed
        home.mkdir()
        shell = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        shell.update(HOME=str(home), PATH=f"{venv_bin()}{os.pathsep}{os.environ['PATH']}")
        address = exports["RAY_API_SERVER_ADDRESS"]

        # Refused: no token, a wrong token, and the job agent's own endpoint on the node's address.
        anonymous = _ray_job_submit({**shell, "RAY_AUTH_MODE": "disabled"}, address, job_dir)
        assert anonymous.returncode != 0 and "Authentication required" in anonymous.stdout + anonymous.stderr
        wrong = _ray_job_submit({**shell, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}, address, job_dir)
        assert wrong.returncode != 0 and "Authentication failed" in wrong.stdout + wrong.stderr
        headers = auth_headers({**shell, **exports})
        with urllib.request.urlopen(urllib.request.Request(f"{address}/api/v0/nodes?detail=1", headers=headers),
                                    timeout=10) as answer:
            (node,) = json.load(answer)["data"]["result"]["result"]
        agent = f"http://{node['node_ip']}:{first['ray_agent_port']}/api/job_agent/jobs/"
        assert _post_status(agent) == 401
        assert _post_status(f"{address}/api/jobs/") == 401

        # Accepted: the README's command after the printed exports. No MLFLOW_TRACKING_URI handed to the job:
        # it inherits the head's, which the stack set to its server.
        submitted = _ray_job_submit({**shell, **exports}, address, job_dir,
                                    "--runtime-env-json", json.dumps({"env_vars": {"HOLEFILL_RUN_NAME": run_name}}))
        assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
        assert "holefill job says hello from 1 node" in submitted.stdout
        with urllib.request.urlopen(urllib.request.Request(f"{address}/api/jobs/", headers=headers),
                                    timeout=10) as answer:
            assert len(json.load(answer)) == 1, "a refused submission left a job behind"

        client = MlflowClient(stack.mlflow_uri)
        experiment = client.get_experiment_by_name("local-stack-smoke")
        runs = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{run_name}'")
        assert len(runs) == 1 and runs[0].data.metrics["answer"] == 42.0

        services = _session_processes(first["ray"]["pid"]) + _session_processes(first["mlflow"]["pid"])
        assert len(services) >= 4  # ray start, gcs, raylet, dashboard, ... and the MLflow server
    finally:
        stopped = _stack_cli("stop", stack.state_dir)
    assert stopped.returncode == 0, stopped.stderr
    # The leaders are children of this process: looking at them through their handles reaps them.
    assert not any(ProcessHandle(pid=first[s]["pid"], create_time=first[s]["create_time"]).is_alive()
                   for s in ("ray", "mlflow"))
    assert not [p for p in services if _running(p)]
    assert _stack_cli("status", stack.state_dir).returncode == 3
    stack.stop()  # idempotent


@pytest.mark.e2e
def test_worker_node_joins_the_head_and_runs_tasks_pinned_to_it(ray_head: RayHead, monkeypatch):  # noqa: F811
    import ray

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    node = add_worker_node(ray_head, num_cpus=1, resources={"node_b": 1})
    try:
        ray.init(address=ray_head.address, logging_level="ERROR")
        try:
            alive = [n for n in ray.nodes() if n["Alive"]]
            assert len(alive) == 2
            assert sum(n["Resources"].get("node_b", 0) for n in alive) == 1

            @ray.remote(num_cpus=0, resources={"node_b": 0.1})
            def where() -> str:
                return ray.get_runtime_context().get_node_id()

            worker_node_id = ray.get(where.remote(), timeout=120)
            head_node_id = next(n["NodeID"] for n in alive if "node_b" not in n["Resources"])
            assert worker_node_id != head_node_id
        finally:
            ray.shutdown()
    finally:
        node.stop()
    deadline = time.monotonic() + 60
    while alive_node_count(ray_head.dashboard_url) != 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert alive_node_count(ray_head.dashboard_url) == 1
