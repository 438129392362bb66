"""A training run that ends in the registry: :func:`pipeline.train.launch.run_training` plus registration.

This is what ``jobs/train_{rn,lbam}.py`` and retraining run: the train stage produces the final fp32
generator; this stage logs it as an MLflow model of the run and registers it under
``config.registered_model`` with the run's data and code tags.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from models.registry import get_architecture
from pipeline.config import ConfigError
from pipeline.lifecycle.packaging import log_and_register_generator
from pipeline.train.config import TrainJobConfig
from pipeline.train.launch import TrainingResult, run_training

__all__ = ["register_generator", "train_and_register", "training_job"]

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
    generator = get_architecture(config.model.arch).generator(**config.model.generator_options)
    generator.load_state_dict(generator_state)
    image, mask = _example_inputs(config)
    version = log_and_register_generator(
        tracking_uri, run_id, generator.eval(), image, mask, config.registered_model, tags, arch=config.model.arch,
        generator_kwargs=config.model.generator_options,
    )
    log.info("registered %s version %s", config.registered_model, version.version)
    return str(version.version)


def train_and_register(config: TrainJobConfig) -> TrainingResult:
    """Train on Ray Train + DeepSpeed and register the final generator in MLflow (when MLflow is on)."""
    return run_training(config, register=register_generator)


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
