"""Training RN and LBAM in-process on the session's Ray head with 2 CPU workers, DeepSpeed engines and MLflow (SQLite).

One RN run (module-scoped, shared by the assertions) does everything a real run does on tiny shards written by
the real shard job: resume after a killed worker (killed by a step callback this test injects), validate,
checkpoint, register; then RN with ZeRO 2 in bf16 trains and a resubmission resumes from its last checkpoint.
LBAM trains end to end with ZeRO 2 in ``tests/test_lifecycle_e2e.py`` and with ZeRO 0 in ``tests/test_submit_e2e.py``;
every (model, ZeRO stage, precision) step on DeepSpeed engines is in ``tests/test_train_step_gpu_ready.py`` (one
rank, seconds each: a Ray Train run costs ~30 s of process start-up on 2 cores, whatever it trains).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from pipeline.data.sample_data import generate_sample_dataset
from pipeline.data.sharding import ShardJobConfig, run_shard_job
from pipeline.train.checkpoint import load_generator_state, read_state
from pipeline.train.config import TrainJobConfig
from pipeline.lifecycle.training import train_and_register as run_training

ray = pytest.importorskip("ray")
mlflow = pytest.importorskip("mlflow")


@dataclass(frozen=True)
class KillWorkerOnce:
    """Step callback: worker ``rank`` exits abruptly (``os._exit``) when it reaches ``at_step``, once per run.

    "Once" is the ``marker`` file, written before the exit. It cannot be "only when not resumed": a worker may
    die before the controller has collected the checkpoint it reported just before, and the retried attempt
    then starts afresh and would hit the fault again.
    """

    rank: int
    at_step: int
    marker: str

    def __call__(self, rank: int, step: int) -> None:
        if (rank, step) != (self.rank, self.at_step) or os.path.exists(self.marker):
            return
        with open(self.marker, "w") as handle:
            handle.write("fired\n")
        os._exit(17)


@pytest.fixture(scope="module")
def embedded_ray(ray_driver):
    # The session's Ray head (4 logical CPUs: 2 training workers plus the shard tasks). The workers cannot import
    # this test module: the step callback travels by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def shards(embedded_ray, tmp_path_factory) -> dict[str, str]:
    """Train and eval manifests of a tiny Places-like set: 8 train images, one eval image per hole bucket."""
    root = tmp_path_factory.mktemp("data")
    sample = generate_sample_dataset(str(root / "places"), n_train=8, n_val=24, size=(288, 256), include_package_photos=False)
    train = run_shard_job(ShardJobConfig.model_validate({
        "source": {"url": sample.train_list, "root": sample.train_root},
        "out": str(root / "train"), "samples_per_shard": 4, "store_size": 256,
    }))
    evaluation = run_shard_job(ShardJobConfig.model_validate({
        "source": {"url": sample.val_list, "root": sample.val_root},
        "out": str(root / "eval"), "samples_per_shard": 3, "store_size": 256, "eval": {"enabled": True, "per_bucket": 1},
    }))
    return {"train": train.manifest_url, "eval": evaluation.manifest_url}


def job_config(arch: str, shards: dict[str, str], tmp: Path, **sections) -> TrainJobConfig:
    """A tiny 2-worker CPU config; ``sections`` override whole keys, e.g. ``train={...}``."""
    # LBAM at 1/16 width on 128 px crops (its discriminator built for them): the official layers and step at a
    # CPU cost of seconds; the official 256 px networks train in tests/gpu.
    tiny = {
        "rn": {"crop_size": 64, "batch_size": 2, "model": {"options": {}}},
        "lbam": {"crop_size": 128, "batch_size": 1, "model": {
            "options": {"allow_random_vgg": True}, "generator_options": {"width": 1 / 16},
            "discriminator_options": {"input_size": 128, "width": 1 / 16}}},
    }[arch]
    settings = {
        "model": {"arch": arch, **tiny["model"]},
        "data": {"train_manifest": shards["train"], "eval_manifest": shards["eval"], "crop_size": tiny["crop_size"],
                 "loader_workers": 0, "eval_batch_size": 2},
        "train": {"max_steps": 2, "batch_size": tiny["batch_size"], "log_every": 1, "ckpt_every": 0, "steps_per_epoch": 2},
        "scaling": {"num_workers": 2, "use_gpu": False},
        "run": {"name": f"{arch}-{tmp.name}", "storage_path": str(tmp / "ray_results")},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "holefill-tests"},
    }
    for section, values in sections.items():
        settings[section] = {**settings.get(section, {}), **values} if isinstance(values, dict) else values
    return TrainJobConfig.model_validate(settings)


@pytest.fixture(scope="module")
def rn_run(shards, tmp_path_factory):
    """RN, 4 steps, checkpoints every 2; rank 1 dies at step 3 of the first attempt."""
    tmp = tmp_path_factory.mktemp("rn")
    config = job_config(
        "rn", shards, tmp,
        train={"max_steps": 4, "ckpt_every": 2, "val_every": 4, "image_every": 4},
        run={"max_failures": 1},
    )
    return config, run_training(config, step_callbacks=[KillWorkerOnce(rank=1, at_step=3, marker=str(tmp / "killed"))])


def test_rn_run_reaches_max_steps_after_a_worker_was_killed(rn_run):
    config, result = rn_run
    assert result.final_step == config.train.max_steps == 4
    assert result.metrics["step"] == 4
    assert read_state(Path(result.checkpoint_path)).step == 4


def test_rn_run_validates_per_bucket_and_logs_to_exactly_one_mlflow_run(rn_run):
    config, result = rn_run
    client = mlflow.MlflowClient(config.mlflow.tracking_uri)
    experiment = client.get_experiment_by_name(config.mlflow.experiment)
    runs = client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{config.run.name}'")
    assert [r.info.run_id for r in runs] == [result.mlflow_run_id]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["train.max_steps"] == "4"
    metrics = run.data.metrics
    expected = {"train/g_loss", "train/d_loss", "lr/generator", "perf/images_per_s", "val/psnr", "val/ssim", "val/l1"}
    assert expected <= set(metrics), sorted(expected - set(metrics))
    # every eval sample counted once across the two ranks: one per bucket
    assert metrics["val/count"] == 6
    assert any(key.startswith("val/psnr/0.") for key in metrics)
    history = client.get_metric_history(result.mlflow_run_id, "train/g_loss")
    assert sorted({m.step for m in history}) == [1, 2, 3, 4]
    grids = [a.path for a in client.list_artifacts(result.mlflow_run_id, "samples")]
    assert grids and all(path.startswith("samples/step_") and path.endswith(".png") for path in grids)


def test_rn_generator_is_registered_with_data_tags(rn_run, shards):
    config, result = rn_run
    client = mlflow.MlflowClient(config.mlflow.tracking_uri)
    version = client.get_model_version("rn", result.model_version)
    assert version.run_id == result.mlflow_run_id
    assert version.tags["holefill.data.dataset_version"] == "1"
    assert len(version.tags["holefill.data.train_manifest_hash"]) >= 16
    assert "holefill.git_commit" in version.tags and "holefill.version" in version.tags
    from pipeline.lifecycle.packaging import load_generator

    model, arch = load_generator(f"models:/rn/{result.model_version}", config.mlflow.tracking_uri)
    saved = load_generator_state(Path(result.checkpoint_path))
    assert arch == "rn"
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name


def test_checkpoint_holds_every_ranks_files_merged_into_one_directory(rn_run):
    _, result = rn_run
    root = Path(result.checkpoint_path)
    assert sorted(p.name for p in (root / "rng").iterdir()) == ["rank_0.pt", "rank_1.pt"]
    assert (root / "generator" / "state" / "mp_rank_00_model_states.pt").exists()
    assert json.loads((root / "state.json").read_text())["world_size"] == 2


def test_rn_zero2_bf16_trains_and_resubmission_resumes_from_the_last_checkpoint(shards, tmp_path):
    # ZeRO-2 bf16 end to end on a CPU that may lack native bf16 (~240x slower than fp32): one residual block on
    # 32 px crops keeps each bf16 step to seconds; the override key is the one a user on such a CPU would set.
    config = job_config("rn", shards, tmp_path, train={"max_steps": 1}, data={"crop_size": 32},
                        model={"arch": "rn", "generator_options": {"residual_blocks": 1}},
                        deepspeed={"zero_stage": 2, "precision": "bf16", "allow_slow_cpu_bf16": True},
                        mlflow={"tracking_uri": "", "enabled": False})
    first = run_training(config)
    assert first.final_step == 1
    # Same run name + storage path: Ray hands the workers the step-1 checkpoint; only step 2 runs.
    config.train.max_steps = 2
    second = run_training(config)
    assert second.final_step == 2
    assert Path(second.checkpoint_path).parent == Path(first.checkpoint_path).parent
