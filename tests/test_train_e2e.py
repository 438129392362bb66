"""End to end on real services: `ray job submit` to a local Ray head with a real MLflow server, and a simulated
two-node cluster (head + second node, one training worker on each) with shards and checkpoints on a real S3
endpoint (moto server on loopback). Secrets must never reach MLflow or the job log."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from support.local_stack import add_worker_node, submit_job
from support.s3_server import s3_endpoint  # noqa: F401  (fixture)

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[1]
mlflow = pytest.importorskip("mlflow")


def _shard(source_list: str, root: str, out: str, storage_options: dict, **extra) -> str:
    from pipeline.data.shardjob.run import ShardJobConfig, run_shard_job

    config = ShardJobConfig.model_validate({
        "source": {"url": source_list, "root": root}, "out": out, "samples_per_shard": 4, "store_size": 256,
        "storage_options": storage_options, **extra,
    })
    return run_shard_job(config).manifest_url


@pytest.fixture(scope="module")
def s3_shards(ray_head, s3_endpoint, tmp_path_factory):  # noqa: F811
    import ray

    from pipeline.data.sample_data import generate_sample_dataset

    sample = generate_sample_dataset(
        str(tmp_path_factory.mktemp("places")), n_train=8, n_val=24, size=(288, 256), include_package_photos=False
    )
    ray.init(address=ray_head.address, log_to_driver=False)
    try:
        options = s3_endpoint.storage_options
        return {
            "train": _shard(sample.train_list, sample.train_root, s3_endpoint.url("shards", "train"), options),
            "eval": _shard(sample.val_list, sample.val_root, s3_endpoint.url("shards", "eval"), options,
                           eval={"enabled": True, "per_bucket": 1}),
        }
    finally:
        ray.shutdown()


def _overrides(s3, shards, run_name, tracking_uri) -> list[str]:
    options = s3.storage_options
    words = [
        f"data.train_manifest={shards['train']}", f"data.eval_manifest={shards['eval']}",
        f"run.name={run_name}", f"run.storage_path={s3.url('checkpoints')}", f"mlflow.tracking_uri={tracking_uri}",
        "train.max_steps=2", "train.ckpt_every=1", "train.val_every=2",
    ]
    for section in ("data", "run"):
        words += [f"{section}.storage_options.{k}={v}" for k, v in options.items()]
    return words


def test_ray_job_submit_trains_rn_across_two_nodes_on_s3_and_keeps_secrets_out(ray_head, mlflow_server, s3_endpoint, s3_shards):  # noqa: F811
    node = add_worker_node(ray_head, num_cpus=2)
    try:
        # STRICT_SPREAD: one training worker on the head, one on the second node.
        words = [sys.executable, "jobs/train_rn.py", "--config", "jobs/configs/train_rn_cpu_tiny.yaml",
                 *[w for o in _overrides(s3_endpoint, s3_shards, "rn-e2e", mlflow_server) for w in ("--set", o)],
                 "--set", "scaling.placement_strategy=STRICT_SPREAD"]
        status, logs = submit_job(ray_head.dashboard_url, words, REPO, timeout=600)
    finally:
        node.stop()
    assert status == "SUCCEEDED", logs[-4000:]
    assert "step 2/2" in logs  # rank 0's progress lines reach the job log

    client = mlflow.MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("holefill-smoke")
    (run,) = client.search_runs([experiment.experiment_id], filter_string="attributes.run_name = 'rn-e2e'")
    assert run.info.status == "FINISHED"
    assert run.data.params["data.storage_options.secret"] != s3_endpoint.secret
    assert all(s3_endpoint.secret != value for value in run.data.params.values())
    versions = client.search_model_versions("name = 'rn'")
    assert any(v.run_id == run.info.run_id for v in versions)
