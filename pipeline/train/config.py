"""The training job's typed configuration, validated before any Ray resource is requested.

A :class:`TrainJobConfig` is built from YAML plus ``--set`` overrides by :func:`load_train_config` (or by
the job CLI); validating it also runs :func:`check_train_config`: the cross-section rules (GPU-only
precisions, LBAM's fixed 256² discriminator input, ZeRO stages DeepSpeed can run here) that no single field
can check on its own. ``model`` is a union discriminated on ``arch``: each registered architecture spec brings
its own typed settings (``options``, ``generator_options``, ``discriminator_options``; each architecture's module
of :mod:`pipeline.train.architectures`). Every problem is a
:class:`~pipeline.config.ConfigError` whose one-line message names the key.
"""

from __future__ import annotations

import functools
import os
from typing import Annotated, Any, Iterable, Literal, Mapping, Union

import torch
from pydantic import Field, create_model, field_validator, model_validator

import pipeline.train.architectures  # noqa: F401  (registers the specs the ``model`` union is built from)
from pipeline.errors import one_line
from pipeline.config import Config, ConfigError, load_config
from pipeline.fsutil import StorageSettings
from pipeline.paths import LocalPath, OutputPathStr, PathStr, resolve_config_paths
from pipeline.train import cpu_precision
from pipeline.train.spec import ArchitectureSpec, get_spec, specs

__all__ = [
    "DataSettings",
    "DeepSpeedSettings",
    "MlflowSettings",
    "ModelSettings",
    "ModelSettingsBase",
    "PerformanceSettings",
    "RunSettings",
    "ScalingSettings",
    "TrainJobConfig",
    "TrainSettings",
    "check_train_config",
    "load_train_config",
    "model_settings",
    "model_settings_union",
]

Precision = Literal["fp32", "bf16", "fp16"]
# Persistent and absolute once expanded (pipeline.paths): never a folder that goes away with a Ray session.
DEFAULT_STORAGE_PATH = "~/ray_results"


class ModelSettingsBase(Config):
    """Which architecture to train (``arch``) and how: each trainable architecture's spec
    (:mod:`pipeline.train.spec`) gets its own subclass, and ``model`` is the union of them, discriminated on ``arch``.

    ``options`` are the recipe's typed settings (RN: ``l1_weight``, ``gan_weight``; LBAM: its loss weights,
    ``adversarial``, ``vgg_weights`` / ``allow_random_vgg`` for the VGG16 of its perceptual loss): the validated
    object is handed to the recipe as is. ``generator_options`` are the generator constructor's keywords
    (RN: ``residual_blocks``, ``threshold``, ``per_sample_stats``; LBAM: ``width``), checked against its signature;
    ``discriminator_options`` likewise for the discriminator (LBAM: ``input_size``, ``width``; what the recipe fixes,
    such as RN's ``use_sigmoid``, is not settable). The defaults are the official networks.
    """

    arch: str
    init_weights: Annotated[str | None, LocalPath()] = Field(
        None,
        description="generator state dict (path or fsspec URL, weights_only) to start from, e.g. the champion when "
        "fine-tuning; ignored when the run resumes from its own checkpoint",
    )


@functools.cache
def model_settings(spec: ArchitectureSpec) -> type[ModelSettingsBase]:
    """The ``model`` section of ``spec``'s architecture: ``arch`` fixed to its name, its typed settings."""
    section = create_model(
        f"{spec.name.upper()}ModelSettings",
        __base__=ModelSettingsBase,
        arch=(Literal[spec.name], ...),
        options=(spec.options, Field(default_factory=spec.options)),
        generator_options=(spec.generator_options, Field(default_factory=spec.generator_options)),
        discriminator_options=(spec.discriminator_config, Field(default_factory=spec.discriminator_config)),
    )
    section.__doc__ = f"``model`` of a {spec.name} training config (see :class:`ModelSettingsBase`)."
    globals()[section.__name__] = section  # importable by name: a config pickles by reference (Ray workers)
    return section


def model_settings_union() -> Any:
    """The type of ``model``: the union of every registered spec's section, discriminated on ``arch``."""
    sections = tuple(model_settings(spec) for spec in specs())
    return Annotated[Union[sections], Field(discriminator="arch")] if len(sections) > 1 else sections[0]


ModelSettings = model_settings_union()


class DataSettings(Config):
    """Where the shards are: manifests written by the shard job (local path, ``file://`` or ``s3://``)."""

    train_manifest: PathStr
    eval_manifest: PathStr
    crop_size: int = Field(256, gt=0)
    loader_workers: int = Field(2, ge=0)
    eval_batch_size: int = Field(4, gt=0)
    storage_options: StorageSettings = Field(default_factory=StorageSettings)
    train_geometry: Literal["crop", "rn", "lbam"] = Field(
        "crop",
        description="stored image -> training crop: crop (random crop + flip), rn (centre square -> bilinear resize "
        "+ flip, official RN) or lbam (350x350 bicubic, random crop + flip, official LBAM); pipeline.data.train_geometry",
    )
    mask_pool: Annotated[str | None, LocalPath()] = Field(
        None,
        description="a mask pool's index.json (pipeline.data.masks.pool): each image gets a mask drawn anew from the "
        "pool at every load, as the official loaders did, instead of the mask its shard stores",
    )


class TrainSettings(Config):
    """Step budget and cadences, all counted in optimiser steps (one step = ``gradient_accumulation_steps``
    micro-batches of ``batch_size`` images on every worker). A cadence of 0 turns that activity off except at
    the final step, which always validates, logs and checkpoints."""

    max_steps: int = Field(gt=0)
    batch_size: int = Field(gt=0, description="images per worker per micro-batch")
    val_every: int = Field(0, ge=0)
    ckpt_every: int = Field(0, ge=0)
    log_every: int = Field(10, ge=0)
    image_every: int = Field(0, ge=0)
    steps_per_epoch: int = Field(
        10_000, gt=0, description="optimiser steps per epoch for epoch-based LR schedules (RN: 0.8 per epoch)"
    )
    seed: int = 67454
    lr_scale: float = Field(
        1.0, gt=0, description="multiplies the recipe's base learning rates of G and D, e.g. 0.1 when fine-tuning"
    )


class DeepSpeedSettings(Config):
    """DeepSpeed engine settings shared by the generator and discriminator engines."""

    zero_stage: int = 0
    precision: Precision = "fp32"
    gradient_accumulation_steps: int = Field(1, gt=0)
    gradient_clipping: float = Field(
        0.0, ge=0.0, description="max global grad norm; 0 = off (on, ZeRO 1/2 read the norm back every step: one sync)"
    )
    overlap_comm: bool = Field(
        False, description="ZeRO 1/2: overlap the gradient reduce-scatter with backward (multi-GPU; measure first)"
    )
    allow_slow_cpu_bf16: bool = Field(
        False, description="run bf16 on CPU workers even where the CPU has no native bf16 (~100-240x slower than fp32)"
    )

    @field_validator("zero_stage")
    @classmethod
    def _supported_stage(cls, stage: int) -> int:
        if stage == 3:
            # ZeRO-3 partitions parameters, so every forward gathers them; the GAN step calls each model several
            # times per step (D on real, fake, GP interpolates) and needs the full generator for registration.
            raise ValueError("ZeRO stage 3 is not supported for GAN training; use 0, 1 or 2")
        if stage not in (0, 1, 2):
            raise ValueError(f"must be 0, 1 or 2, got {stage}")
        return stage


class PerformanceSettings(Config):
    """GPU speed switches. Each stays off until a measurement on the target GPU shows it pays
    (``make gpu-check`` prints the table); none changes the maths beyond float rounding."""

    cudnn_benchmark: bool = Field(
        False, description="let cuDNN time its convolution algorithms once per input shape (fixed crops: one search)"
    )
    channels_last: bool = Field(False, description="NHWC weights and activations (tensor-core friendly on Ampere+)")
    compile_generator: bool = Field(
        False, description="torch.compile the generator's forward (never D: the gradient penalty double-backwards it)"
    )


class ScalingSettings(Config):
    """Ray Train workers: one per GPU when ``use_gpu``; gloo on CPU, NCCL on GPU."""

    num_workers: int = Field(gt=0)
    use_gpu: bool
    cpus_per_worker: float = Field(1.0, gt=0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    extra_resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources per worker, e.g. to pin one worker per node"
    )
    worker_env: dict[str, str] = Field(
        default_factory=dict, description="environment variables of the training worker processes"
    )

    @field_validator("worker_env", mode="before")
    @classmethod
    def _env_values_as_text(cls, env: Any) -> Any:
        # `--set scaling.worker_env.OMP_NUM_THREADS=4` arrives as a YAML integer; the environment holds text.
        if isinstance(env, dict):
            return {key: str(value).lower() if isinstance(value, bool) else str(value) for key, value in env.items()}
        return env


class RunSettings(Config):
    """Run identity and checkpoint storage. Re-submitting with the same ``name`` and ``storage_path`` resumes.

    ``storage_path`` defaults to ``~/ray_results`` (Ray's own default), a location that outlives the Ray session
    and the job's working directory, so a re-submission finds the checkpoints; checkpoints of a run go to
    ``<storage_path>/<name>``. A relative path is made absolute against the submitting shell's directory.
    """

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    storage_path: OutputPathStr = Field(DEFAULT_STORAGE_PATH, min_length=1)
    storage_options: StorageSettings = Field(default_factory=StorageSettings)
    max_failures: int = Field(0, ge=-1, description="worker-group restarts after a failure; -1 = unlimited")
    checkpoints_to_keep: int = Field(2, gt=0)
    ray_address: str | None = Field(None, description="Ray cluster to join; None: RAY_ADDRESS or embedded local Ray")


class MlflowSettings(Config):
    """MLflow tracking: the driver creates (or resumes) the run; rank 0 logs to it; the driver registers the model."""

    tracking_uri: str
    experiment: str = "holefill"
    registered_model: str | None = Field(None, description="defaults to the architecture name (lbam / rn)")
    enabled: bool = True


class TrainJobConfig(Config):
    """Everything ``jobs/train_{rn,lbam}.py`` needs; see ``jobs/configs/train_*.yaml``.

    Validating one runs every rule, the cross-section ones of :func:`check_train_config` included, so a
    ``TrainJobConfig`` that exists is one that training can trust.
    """

    model: ModelSettings
    data: DataSettings
    train: TrainSettings
    deepspeed: DeepSpeedSettings = Field(default_factory=DeepSpeedSettings)
    performance: PerformanceSettings = Field(default_factory=PerformanceSettings)
    scaling: ScalingSettings
    run: RunSettings
    mlflow: MlflowSettings

    @model_validator(mode="after")
    def _cross_section_rules(self) -> "TrainJobConfig":
        check_train_config(self)
        if self.mlflow.registered_model is None:
            # The one place mlflow.registered_model is defaulted: a validated config always names its model.
            self.mlflow.registered_model = self.model.arch
        return self

    @property
    def registered_model(self) -> str:
        """Name the final generator is registered under in the MLflow model registry (``mlflow.registered_model``,
        the architecture's name unless set)."""
        return self.mlflow.registered_model

    @property
    def generator_kwargs(self) -> dict:
        """The generator constructor's keywords this run trains with that differ from the defaults (what its
        checkpoints and its registered version record beside ``arch``)."""
        return self.model.generator_options.model_dump(mode="json", exclude_defaults=True)


_fail = ConfigError.at


def check_train_config(config: TrainJobConfig) -> None:
    """Cross-section rules; raise :class:`ConfigError` naming the key of the first rule broken.

    Part of validating a :class:`TrainJobConfig`; call it again only after changing a config in place.
    """
    ds, scaling, data, train = config.deepspeed, config.scaling, config.data, config.train
    if ds.precision == "fp16":
        # fp16 needs loss scaling: DeepSpeed scales only at ZeRO 0, its overflow check reads the GPU back every
        # step, and LBAM's gradient penalty differentiates unscaled fp16 critic scores. bf16 has fp32's range,
        # no scaler, and the same tensor-core speed on A100/H100/H200.
        raise _fail("deepspeed.precision", "fp16 is not supported (needs loss scaling, unsafe for the gradient penalty); use bf16")
    _check_cpu_bf16(ds, scaling)

    arch = get_spec(config.model.arch).architecture
    # A discriminator built for one input size (LBAM: 256 unless model.discriminator_options.input_size says
    # otherwise) fixes the crop.
    train_size = getattr(config.model.discriminator_options, "input_size", arch.train_size)
    if train_size is not None and data.crop_size != train_size:
        raise _fail(
            "data.crop_size",
            f"{config.model.arch} trains on {train_size}x{train_size} crops only "
            f"(its discriminator's input size, model.discriminator_options.input_size), got {data.crop_size}",
        )
    if data.crop_size % arch.size_multiple:
        raise _fail("data.crop_size", f"must be a multiple of {arch.size_multiple} for {config.model.arch}, got {data.crop_size}")

    if train.ckpt_every and train.ckpt_every > train.max_steps:
        raise _fail("train.ckpt_every", f"{train.ckpt_every} exceeds train.max_steps={train.max_steps}; no checkpoint would be written before the end")
    if getattr(config.model.options, "official", False) and ds.gradient_accumulation_steps != 1:
        # The official steps have no accumulation, and RN's carried D gradient would be scaled by it.
        raise _fail("deepspeed.gradient_accumulation_steps", "must be 1 with model.options.official (the official step has no accumulation)")
    _check_network_options(config.model)


def _check_cpu_bf16(ds: DeepSpeedSettings, scaling: ScalingSettings) -> None:
    """bf16 on CPU workers whose CPU lacks native bf16 would run ~240x slower than fp32: refuse before any
    manifest is read or Ray resource requested. The driver's CPU stands for its CPU workers (one machine, or a
    homogeneous CPU cluster); GPU workers compute bf16 on the GPU and are never refused."""
    if ds.precision != "bf16" or scaling.use_gpu or ds.allow_slow_cpu_bf16:
        return
    cpu = cpu_precision.cpu_bf16_support()  # through the module: tests stand in another CPU there
    if not cpu.native:
        raise _fail(
            "deepspeed.precision",
            f"bf16 on this CPU (capability {cpu.capability}, no AVX512_BF16/AMX) runs convolutions {cpu_precision.SLOWDOWN_ORDER} "
            "slower than fp32; set deepspeed.precision=fp32 (or deepspeed.allow_slow_cpu_bf16=true to run it anyway)",
        )


def _check_network_options(model: ModelSettingsBase) -> None:
    """Build both networks on the meta device: a value a constructor refuses fails here, naming the key (names
    and types of ``model.generator_options`` / ``discriminator_options`` are already checked against the
    constructors' signatures)."""
    spec = get_spec(model.arch)
    for key, build in (("model.generator_options", lambda: spec.build_generator(model.generator_options)),
                       ("model.discriminator_options", lambda: spec.build_discriminator(model.discriminator_options))):
        try:
            with torch.device("meta"):
                build()
        except (TypeError, ValueError) as exc:
            raise _fail(key, one_line(exc)) from None


def load_train_config(
    path: str | os.PathLike | None, overrides: Iterable[str] = (), updates: Mapping[str, Any] | None = None
) -> TrainJobConfig:
    """Load and validate a training config from YAML plus ``key.path=value`` overrides, then ``updates`` (nested
    values a program sets, see :func:`pipeline.config.load_config`): the boundary after which it is trusted.

    Relative local paths are made absolute against the current directory (:mod:`pipeline.paths`).
    """
    config = load_config(TrainJobConfig, path, overrides, updates=updates)
    resolve_config_paths(config)
    return config
