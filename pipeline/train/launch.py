"""The driver side of a training job: checks, MLflow run, Ray TorchTrainer, model registration.

:func:`run_training` is everything ``jobs/train_{rn,lbam}.py`` does after parsing its config:

1. check that MLflow and the manifests are reachable, *before* any Ray worker starts (the config itself was
   validated where it was made: a ``TrainJobConfig`` holds every rule, and ``load_train_config`` or the job CLI
   made its local paths absolute);
2. start (or, for a re-submitted ``run.name``, resume) the MLflow run and log the redacted params;
3. run a ``TorchTrainer`` (one worker per GPU, or CPU workers with gloo) whose ``RunConfig(name,
   storage_path)`` makes Ray resume from the latest checkpoint after a worker failure
   (``FailureConfig(max_failures)``) or a re-submission;
4. read the generator record of the final checkpoint (``models.record.GeneratorRecord``: arch, keywords, fp32
   weights, provenance) and hand it to ``register`` (the lifecycle
   stage's :func:`pipeline.lifecycle.training.train_and_register` passes one that registers it in MLflow,
   tagged with the data manifest's hash and version, the git commit and the holefill version).
"""

from __future__ import annotations

import logging
import subprocess
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Sequence

from pipeline.config import flatten
from pipeline.data.tario import TarFormatError
from pipeline.errors import chain, one_line
from pipeline.data.manifest import load_manifest, manifest_hash, manifest_url_for, require_samples
from pipeline.fsutil import StorageSettings, is_remote, join_url, url_to_fs
from pipeline.raycluster import ensure_ray
from pipeline.tracking import ManifestInput, RunTracker, check_tracking_server, redact, resolve_tracking_uri
from models.record import GeneratorRecord
from pipeline.train.checkpoint import load_generator_record, read_state
from pipeline.train.config import ScalingSettings, TrainJobConfig
from pipeline.train.loop import StepCallback, WorkerPayload, initial_generator, train_worker
from pipeline.train.safe_checkpoint import CheckpointRefused, checkpoint_refusal

__all__ = ["Registrar", "TrainingResult", "run_info_tags", "run_training", "storage_filesystem", "worker_runtime_env"]

log = logging.getLogger("holefill.train")


@dataclass(frozen=True)
class TrainingResult:
    """What a finished training run produced."""

    final_step: int
    checkpoint_path: str
    metrics: dict[str, Any] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    registered_model: str | None = None
    model_version: str | None = None


# register(config, tracking_uri, run_id, the final generator record, tags) -> registered version
Registrar = Callable[[TrainJobConfig, str, str, GeneratorRecord, dict], str]


def storage_filesystem(storage_path: str, options: StorageSettings) -> tuple[Any, str]:
    """``(pyarrow filesystem or None, path for Ray)`` for a checkpoint location.

    Local paths go to Ray as they are. Object storage goes through fsspec (s3fs) wrapped for pyarrow, so the
    endpoint and credentials of ``run.storage_options`` apply (an S3-compatible server, a test server on
    loopback) without exporting them as environment variables, and the path loses its scheme, as Ray expects
    when it is handed a filesystem.
    """
    if not is_remote(storage_path):
        local = storage_path[len("file://"):] if storage_path.startswith("file://") else storage_path
        return None, str(Path(local).expanduser().resolve())
    import pyarrow.fs  # lazy: only a remote storage path needs it

    fs, path = url_to_fs(storage_path, options)
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)), path


def worker_runtime_env(scaling: ScalingSettings) -> dict[str, Any]:
    """The Ray runtime env of the training worker actors: ``scaling.worker_env`` plus, on CPU, one malloc arena.

    Ray Train runs the training function in a thread of the worker actor, and glibc gives non-main threads
    their own mmap'd arenas of at most 64 MiB: large activations are then mapped and page-faulted afresh on
    every step. Measured on a 2-core VM, RN at 256², batch 4: 1.9 M minor faults per step against 1.0 M on the
    main thread; the same plain step inside a Ray Train worker took 2.44 s per image by default and 2.10 s with
    ``MALLOC_ARENA_MAX=1``, against 2.15 s on a main thread (``bench/train_overhead.py`` prints both). GPU
    workers keep activations in CUDA memory and are left alone. The job's own runtime env is merged in by Ray.
    """
    env = dict(scaling.worker_env)
    if not scaling.use_gpu:
        env.setdefault("MALLOC_ARENA_MAX", "1")
    return {"env_vars": env}


def _git_commit() -> str:
    """The commit of the code being run, or ``unknown`` (e.g. a Ray job's uploaded working dir has no .git)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent, check=True
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _holefill_version() -> str:
    try:
        return metadata.version("holefill")
    except metadata.PackageNotFoundError:
        return "unknown"


def run_info_tags(config: TrainJobConfig) -> dict[str, str]:
    """Where a run's code came from: git commit, holefill version, run name."""
    return {"holefill.git_commit": _git_commit(), "holefill.version": _holefill_version(),
            "holefill.run_name": config.run.name}


def _data_tags(config: TrainJobConfig) -> dict[str, str]:
    """Tags identifying the training and eval data; loading the manifests also proves they are reachable."""
    train = require_samples(load_manifest(config.data.train_manifest, config.data.storage_options), "data.train_manifest")
    evaluation = require_samples(load_manifest(config.data.eval_manifest, config.data.storage_options), "data.eval_manifest")
    return {
        "holefill.data.train_manifest_hash": manifest_hash(train),
        "holefill.data.dataset_version": train.dataset_version,
        "holefill.data.eval_manifest_hash": manifest_hash(evaluation),
        "holefill.data.eval_dataset_version": evaluation.dataset_version,
    }


def _data_inputs(config: TrainJobConfig, data_tags: dict[str, str]) -> list[ManifestInput]:
    """The run's dataset inputs: the train manifest (``training``) and the eval manifest (``validation``)."""
    return [ManifestInput(manifest_url_for(config.data.train_manifest), data_tags["holefill.data.train_manifest_hash"],
                          "training", data_tags["holefill.data.dataset_version"]),
            ManifestInput(manifest_url_for(config.data.eval_manifest), data_tags["holefill.data.eval_manifest_hash"],
                          "validation", data_tags["holefill.data.eval_dataset_version"])]


def _trainer(config: TrainJobConfig, payload: WorkerPayload) -> Any:
    # lazy: importing Ray costs seconds, and the config and checkpoint helpers here are used without it
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    filesystem, storage_path = storage_filesystem(config.run.storage_path, config.run.storage_options)
    scaling = config.scaling
    return TorchTrainer(
        train_worker,
        train_loop_config=payload,
        scaling_config=ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            placement_strategy=scaling.placement_strategy,
            resources_per_worker={
                "CPU": scaling.cpus_per_worker, **({"GPU": 1} if scaling.use_gpu else {}), **scaling.extra_resources
            },
        ),
        run_config=RunConfig(
            name=config.run.name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=config.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.run.checkpoints_to_keep),
            worker_runtime_env=worker_runtime_env(scaling),
        ),
    )


def damaged_shard_line(exc: BaseException) -> str | None:
    """The one line of a :class:`~pipeline.data.tario.TarFormatError` (a damaged shard, named with its offset) inside a
    failed run's error: Ray hands the worker's exception back as such, as its cause, or as traceback text."""
    marker = f"{TarFormatError.__name__}: "
    for error in chain(exc):
        if isinstance(error, TarFormatError):
            return one_line(error)
        text = str(error)
        if marker in text:
            return text[text.index(marker) + len(marker):].splitlines()[0]
    return None


def run_training(config: TrainJobConfig, register: Registrar | None = None,
                 step_callbacks: Sequence[StepCallback] = ()) -> TrainingResult:
    """Train ``config.model.arch`` on Ray Train + DeepSpeed; ``register`` the final generator when MLflow is on.

    ``config`` is trusted as validated, with absolute local paths (:func:`~pipeline.train.config.load_train_config`,
    the job CLI). ``step_callbacks`` run on every worker after each optimiser step (see
    :data:`~pipeline.train.loop.StepCallback`); they travel pickled, so they must be importable there. The MLflow
    run stays open while ``register`` runs and is marked failed when it raises.
    """
    # lazy (importing Ray costs seconds); imported here to fail early when ray[train] is missing
    from ray.train import Checkpoint  # noqa: F401

    data_tags = _data_tags(config)
    info_tags = run_info_tags(config)
    if config.model.init_weights:
        initial_generator(config)  # readable, and the network this run trains: checked before any worker starts

    tracker = tracking_uri = None
    if config.mlflow.enabled:
        tracking_uri = resolve_tracking_uri(config.mlflow.tracking_uri)
        check_tracking_server(tracking_uri)
        run_tags = {
            **data_tags,
            "holefill.arch": config.model.arch,
            **info_tags,
        }
        tracker = RunTracker.start_or_resume(tracking_uri, config.mlflow.experiment, config.run.name, run_tags)
        tracker.log_params(redact(flatten(config)))
        tracker.log_manifests(_data_inputs(config, data_tags))
        log.info("MLflow run %s at %s", tracker.run_id, redact(tracking_uri))

    ensure_ray(config.run.ray_address)
    log.info("checkpoints of run %s: %s", config.run.name, join_url(config.run.storage_path, config.run.name))
    payload = WorkerPayload(config=config, tracking_uri=tracking_uri, mlflow_run_id=tracker.run_id if tracker else None,
                            step_callbacks=tuple(step_callbacks))
    try:
        try:
            result = _trainer(config, payload).fit()
        except Exception as exc:  # Ray wraps the workers' errors; bad bytes (a planted checkpoint file, a damaged
            refusal = checkpoint_refusal(exc)  # shard) end the job in their own one line, not Ray's traceback
            if refusal is not None:
                raise CheckpointRefused(refusal) from None
            damaged = damaged_shard_line(exc)
            if damaged is not None:
                raise ValueError(damaged) from None
            raise
        if result.checkpoint is None:
            raise RuntimeError(f"training run {config.run.name} finished without a checkpoint")
        with result.checkpoint.as_directory() as directory:
            final_step = read_state(directory).step
            record = load_generator_record(directory).with_provenance(source=result.checkpoint.path)
        version = None
        if tracker is not None and register is not None:
            version = register(config, tracking_uri, tracker.run_id, record, {**data_tags, **info_tags})
    except BaseException:
        if tracker is not None:
            tracker.finish("FAILED")
        raise
    if tracker is not None:
        tracker.finish("FINISHED")
    return TrainingResult(
        final_step=final_step,
        checkpoint_path=result.checkpoint.path,
        metrics=dict(result.metrics or {}),
        mlflow_run_id=tracker.run_id if tracker else None,
        registered_model=config.registered_model if version else None,
        model_version=version,
    )
