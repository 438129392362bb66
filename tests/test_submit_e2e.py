"""The README's newcomer path, end to end: the exports the local stack prints, then exactly the README's
`ray job submit --working-dir . -- python jobs/train_lbam.py ...` line, against a Ray head configured as
`infra/local/stack.py` configures its own (MLFLOW_TRACKING_URI in the head's environment). The run, the
registered version and the checkpoints must be where the user looks: on the MLflow server and under
`~/ray_results`, not in Ray's temporary copy of the working directory."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from infra.local.ray_node import venv_bin

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


def _shards(address: str, root: Path) -> dict[str, str]:
    import ray

    from pipeline.data.sample_data import generate_sample_dataset
    from pipeline.data.shardjob.run import ShardJobConfig, run_shard_job

    sample = generate_sample_dataset(str(root / "sample"), n_train=4, n_val=12, size=(288, 256),
                                     include_package_photos=False)
    ray.init(address=address, log_to_driver=False)
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


def test_readme_submit_line_logs_to_the_clusters_server_and_checkpoints_under_home(ray_head, mlflow_server, tmp_path):  # noqa: F811
    shards = _shards(ray_head.address, tmp_path)
    line = _readme_submit_line().replace("$PWD/.holefill-local/demo/shards", str(tmp_path))  # where the shards are
    # The shell after pasting the exports `infra/local/stack.py start` prints: MLFLOW_TRACKING_URI included.
    exports = {"RAY_ADDRESS": ray_head.address, "RAY_API_SERVER_ADDRESS": ray_head.dashboard_url,
               "MLFLOW_TRACKING_URI": mlflow_server, "RAY_AUTH_MODE": "disabled"}
    env = {**os.environ, **exports, "PATH": f"{venv_bin()}{os.pathsep}{os.environ['PATH']}"}
    assert "--runtime-env-json" not in line  # `ray job submit` hands the job the head's environment, not the shell's
    done = subprocess.run(shlex.split(line), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    story = "\n".join(line for line in output.splitlines() if "holefill" in line or "Error" in line)[-6000:]
    assert done.returncode == 0, f"{story}\n...\n{output[-2000:]}"
    assert "registered lbam version" in output

    client = mlflow.MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("holefill-smoke")
    (run,) = client.search_runs([experiment.experiment_id], filter_string="attributes.run_name = 'lbam-cpu-tiny'")
    assert run.info.status == "FINISHED"
    assert any(v.run_id == run.info.run_id for v in client.search_model_versions("name = 'lbam'"))
    folder = Path(ray_head.env["HOME"]) / "ray_results" / "lbam-cpu-tiny"
    assert sorted(folder.glob("checkpoint_*")), f"no checkpoints in {folder}"
    assert f"checkpoints of run lbam-cpu-tiny: {folder}" in output  # the job log says where
    assert shards["train"].startswith(str(tmp_path))
