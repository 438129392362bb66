"""A training run that ends in the registry: :func:`pipeline.train.launch.run_training` plus registration.

This is what ``jobs/train_{rn,lbam}.py`` and retraining run: the train stage hands over the final generator as a
:class:`~models.record.GeneratorRecord` (arch, keywords, fp32 weights, provenance); this stage logs it as it is
(no module rebuilt) as an MLflow model of the run and registers it under ``config.registered_model`` with the run's
data and code tags. A ``model.init_weights`` naming a registered version (``models:/name/N``, ``models:/name@alias``)
is read here, before the run, and written as a record file under the run's storage for the workers.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Sequence

import torch

from models.record import GeneratorRecord
from pipeline.config import ConfigError, derive
from pipeline.errors import one_line
from pipeline.fsutil import join_url
from pipeline.generators import write_generator
from pipeline.jobcli import run_job
from pipeline.lifecycle.packaging import is_mlflow_ref, load_generator_record, log_and_register_generator
from pipeline.tracking import resolve_tracking_uri
from pipeline.train.config import TrainJobConfig
from pipeline.train.launch import TrainingResult, run_training
from pipeline.train.loop import StepCallback

__all__ = ["register_generator", "resolve_init_weights", "train_and_register", "training_job", "training_main"]

INIT_GENERATOR_FILE = "init_generator.pt"

log = logging.getLogger("holefill.train")


def _example_inputs(config: TrainJobConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """A small (image, mask) pair for the registered model's signature: a centred square hole."""
    size = config.data.crop_size
    image = torch.full((1, 3, size, size), 0.5)
    mask = torch.zeros(1, 1, size, size)
    mask[..., size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1.0
    return image, mask


def register_generator(config: TrainJobConfig, tracking_uri: str, run_id: str, record: GeneratorRecord,
                       tags: dict[str, str]) -> str:
    """Log the trained generator record to run ``run_id`` and register it; returns the new version number."""
    image, mask = _example_inputs(config)
    version = log_and_register_generator(tracking_uri, run_id, record, image, mask, config.registered_model, tags,
                                         arch=config.model.arch, generator_kwargs=config.generator_kwargs)
    log.info("registered %s version %s", config.registered_model, version.version)
    return str(version.version)


def resolve_init_weights(config: TrainJobConfig) -> TrainJobConfig:
    """``config`` with a registered ``model.init_weights`` (``models:/…``, ``runs:/…``) replaced by a record file
    under the run's storage (``<storage_path>/<run name>/init_generator.pt``) that the workers read; other forms
    are left to the train stage. The version must be the network this run trains (arch and generator options)."""
    ref = config.model.init_weights
    if not ref or not is_mlflow_ref(ref):
        return config
    tracking_uri = resolve_tracking_uri(config.mlflow.tracking_uri)
    try:
        record = load_generator_record(ref, tracking_uri, arch=config.model.arch, kwargs=config.generator_kwargs)
    except ValueError as exc:
        raise ValueError(f"model.init_weights: {one_line(exc)}") from None
    url = join_url(config.run.storage_path, config.run.name, INIT_GENERATOR_FILE)
    write_generator(record.with_provenance(init_from=ref), url, config.run.storage_options)
    log.info("model.init_weights %s exported to %s", ref, url)
    return derive(config, {"model": {"init_weights": url}})


def train_and_register(config: TrainJobConfig, step_callbacks: Sequence[StepCallback] = ()) -> TrainingResult:
    """Train on Ray Train + DeepSpeed and register the final generator in MLflow (when MLflow is on);
    ``step_callbacks``: see :func:`~pipeline.train.launch.run_training`. A registered ``model.init_weights`` is
    resolved first (:func:`resolve_init_weights`)."""
    return run_training(resolve_init_weights(config), register=register_generator, step_callbacks=step_callbacks)


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
