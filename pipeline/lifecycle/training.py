"""A training run that ends in the registry: :func:`pipeline.train.launch.run_training` plus registration.

This is what ``jobs/train_{rn,lbam}.py`` and retraining run: the train stage produces the final fp32
generator; this stage logs it as an MLflow model of the run and registers it under
``config.registered_model`` with the run's data and code tags.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Sequence

import torch

from pipeline.config import ConfigError
from pipeline.jobcli import run_job
from pipeline.lifecycle.packaging import log_and_register_generator
from pipeline.train.config import TrainJobConfig
from pipeline.train.launch import TrainingResult, run_training
from pipeline.train.loop import StepCallback
from pipeline.train.spec import get_spec

__all__ = ["register_generator", "train_and_register", "training_job", "training_main"]

log = logging.getLogger("holefill.train")


def _example_inputs(config: TrainJobConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """A small (image, mask) pair for the registered model's signature: a centred square hole."""
    size = config.data.crop_size
    image = torch.full((1, 3, size, size), 0.5)
    mask = torch.zeros(1, 1, size, size)
    mask[..., size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1.0
    return image, mask


def register_generator(config: TrainJobConfig, tracking_uri: str, run_id: str, generator_state: dict,
                       tags: dict[str, str]) -> str:
    """Log the trained generator to run ``run_id`` and register it; returns the new version number."""
    generator = get_spec(config.model.arch).build_generator(config.model.generator_options)
    generator.load_state_dict(generator_state)
    image, mask = _example_inputs(config)
    version = log_and_register_generator(
        tracking_uri, run_id, generator.eval(), image, mask, config.registered_model, tags, arch=config.model.arch,
        generator_kwargs=config.model.generator_options.model_dump(mode="json", exclude_defaults=True),
    )
    log.info("registered %s version %s", config.registered_model, version.version)
    return str(version.version)


def train_and_register(config: TrainJobConfig, step_callbacks: Sequence[StepCallback] = ()) -> TrainingResult:
    """Train on Ray Train + DeepSpeed and register the final generator in MLflow (when MLflow is on);
    ``step_callbacks``: see :func:`~pipeline.train.launch.run_training`."""
    return run_training(config, register=register_generator, step_callbacks=step_callbacks)


def training_job(arch: str) -> Callable[[TrainJobConfig], int]:
    """The work of ``jobs/train_<arch>.py`` for :func:`pipeline.jobcli.run_job`: check the arch, train, report."""

    def train(config: TrainJobConfig) -> int:
        if config.model.arch != arch:
            raise ConfigError(f"config key model.arch: this job trains {arch}, the config says {config.model.arch}")
        result = train_and_register(config)
        log.info("done: step %d, checkpoint %s, model %s version %s",
                 result.final_step, result.checkpoint_path, result.registered_model, result.model_version)
        return 0

    return train


def training_main(arch: str, doc: str | None, argv: Sequence[str] | None, default_config: str | os.PathLike) -> int:
    """All of ``jobs/train_<arch>.py``: parse ``--config``/``--set``, train ``arch``, register; the exit status."""
    return run_job(f"train_{arch}", doc, TrainJobConfig, training_job(arch), argv, default_config=str(default_config))
