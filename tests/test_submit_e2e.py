"""The README's newcomer path, end to end: `infra/local/stack.py start`, the exports it prints, then exactly the
README's `ray job submit --working-dir . -- python jobs/train_lbam.py ...` line. The run, the registered version
and the checkpoints must be where the user looks: on the stack's MLflow server and under `~/ray_results`, not
in Ray's temporary copy of the working directory."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

import local_stack  # noqa: F401  (puts infra/ on sys.path)
from infra.local.ray_node import find_free_port_block, venv_bin
from infra.local.stack import LocalStack

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[1]
mlflow = pytest.importorskip("mlflow")


def _readme_submit_line() -> str:
    """The `ray job submit ... train_lbam.py` command of the README's "Submitting jobs" section, one line."""
    lines = iter((REPO / "README.md").read_text().splitlines())
    for line in lines:
        if line.startswith("ray job submit --working-dir . -- python jobs/train_lbam.py"):
            words = [line]
            while words[-1].endswith("\\"):
                words[-1] = words[-1][:-1]
                words.append(next(lines))
            return " ".join(words)
    raise AssertionError("README.md lost its train_lbam submit line")


def _exports(report: str) -> dict[str, str]:
    return dict(re.findall(r"^export (\w+)=(\S+)", report, re.MULTILINE))


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """The local stack on free ports, its own state dir, and a private HOME (where `~/ray_results` lands)."""
    home = tmp_path_factory.mktemp("home")
    saved_home = os.environ.get("HOME")
    os.environ["HOME"] = str(home)  # the Ray head (and so every job it runs) inherits it
    gcs, dashboard, mlflow_port = find_free_port_block(3)
    stack = LocalStack(Path("/tmp") / f"hf-st-{os.getpid()}", ray_port=gcs, ray_dashboard_port=dashboard,
                       mlflow_port=mlflow_port, num_cpus=3)
    try:
        yield stack, stack.start().report(), home
    finally:
        stack.stop()
        if saved_home is None:
            os.environ.pop("HOME", None)
        else:
            os.environ["HOME"] = saved_home
        import shutil

        shutil.rmtree(stack.state_dir, ignore_errors=True)


def _shards(stack: LocalStack, root: Path) -> dict[str, str]:
    import ray

    from pipeline.data.sample_data import generate_sample_dataset
    from pipeline.data.sharding import ShardJobConfig, run_shard_job

    sample = generate_sample_dataset(str(root / "sample"), n_train=4, n_val=12, size=(288, 256),
                                     include_package_photos=False)
    ray.init(address=stack.ray_address, log_to_driver=False)
    try:
        made = {}
        for name, listing, images, extra in (("train", sample.train_list, sample.train_root, {}),
                                             ("eval", sample.val_list, sample.val_root, {"eval": {"enabled": True, "per_bucket": 1}})):
            config = ShardJobConfig.model_validate({"source": {"url": listing, "root": images},
                                                    "out": str(root / f"{name}-v1"), "samples_per_shard": 8, **extra})
            made[name] = run_shard_job(config).manifest_url
        return made
    finally:
        ray.shutdown()


def test_readme_submit_line_logs_to_the_stack_server_and_checkpoints_under_home(stack, tmp_path):
    stack, report, home = stack
    shards = _shards(stack, tmp_path)
    line = _readme_submit_line().replace("$PWD/.holefill-local/demo/shards", str(tmp_path))  # where the shards are
    env = {**os.environ, **_exports(report)}  # the shell after pasting the exports: MLFLOW_TRACKING_URI included
    env["PATH"] = f"{venv_bin()}{os.pathsep}{env['PATH']}"
    assert "MLFLOW_TRACKING_URI" in env and "--runtime-env-json" not in line
    words = shlex.split(line)
    # `ray job submit` does not hand the shell's environment to the job: only the Ray head's own reaches it.
    done = subprocess.run(words, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    story = "\n".join(line for line in output.splitlines() if "holefill" in line or "Error" in line)[-6000:]
    assert done.returncode == 0, f"{story}\n...\n{output[-2000:]}"
    assert "registered lbam version" in output

    client = mlflow.MlflowClient(stack.mlflow_uri)
    experiment = client.get_experiment_by_name("holefill-smoke")
    (run,) = client.search_runs([experiment.experiment_id], filter_string="attributes.run_name = 'lbam-cpu-tiny'")
    assert run.info.status == "FINISHED"
    assert any(v.run_id == run.info.run_id for v in client.search_model_versions("name = 'lbam'"))
    checkpoints = sorted((home / "ray_results" / "lbam-cpu-tiny").glob("checkpoint_*"))
    assert checkpoints, f"no checkpoints under {home / 'ray_results'}"
    assert str(home / "ray_results" / "lbam-cpu-tiny") in output  # the job log says where
    assert shards["train"].startswith(str(tmp_path))
