"""A tiny ``jobs/train_*`` run on the GPU through Ray Train, resumed once (``make gpu-check``).

Needs CUDA and Ray; where Ray is not installed (the air-gapped wheelhouse has no Ray) it is skipped with
that reason. Reuses the shard fixtures of ``test_train_local``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
pytest.importorskip("ray", reason="Ray is not installed: the Ray Train end-to-end GPU run is skipped")
pytest.importorskip("mlflow", reason="MLflow is not installed: the Ray Train end-to-end GPU run is skipped")

from test_train_local import embedded_ray, job_config, shards  # noqa: E402,F401  (fixtures)

from pipeline.lifecycle.training import train_and_register as run_training  # noqa: E402


@pytest.mark.parametrize("arch", ["rn", "lbam"])
def test_train_job_runs_on_the_gpu_in_bf16_and_resumes(shards, tmp_path, arch):
    config = job_config(
        arch, shards, tmp_path,
        train={"max_steps": 2, "ckpt_every": 2, "val_every": 2},
        deepspeed={"precision": "bf16"},
        scaling={"num_workers": 1, "use_gpu": True},
        mlflow={"tracking_uri": "", "enabled": False},
    )
    first = run_training(config)
    assert first.final_step == 2
    config.train.max_steps = 3  # same run name and storage: resumes from the step-2 checkpoint
    second = run_training(config)
    assert second.final_step == 3
    assert Path(second.checkpoint_path).parent == Path(first.checkpoint_path).parent
