"""The per-worker training loop that Ray Train runs on every rank.

:func:`train_worker` is two parts, like a plain training script (and torchtitan's ``Trainer.__init__`` /
``Trainer.train``): :func:`set_up_worker` builds the recipe, models and DeepSpeed engines and resumes from the
latest checkpoint Ray hands back; :func:`train_loop` runs the optimiser steps, each made of
``gradient_accumulation_steps`` GAN steps, and on their cadences logs (rank 0), validates (all ranks, every
eval sample once), logs sample grids (rank 0) and checkpoints (all ranks, through ``ray.train.report``).
"""

from __future__ import annotations

import logging
import random
import secrets
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch

from models.input_checks import mask_values_trusted
from models.record import GeneratorRecord
from pipeline.data.loaders import make_train_loader, to_float
from pipeline.evaluation.evaluate import EvaluationSettings, evaluate_slice
from pipeline.evaluation.metrics import BucketedMetrics
from pipeline.evaluation.perceptual import MetricWeights
from pipeline.errors import one_line
from pipeline.fsutil import is_remote, join_url
from pipeline.generators import read_generator
from pipeline.joblog import LOG_FORMAT
from pipeline.tracking import RunTracker, sample_grid
from pipeline.train.checkpoint import CheckpointState, make_durable, restore_checkpoint, save_checkpoint
from pipeline.train.config import PerformanceSettings, TrainJobConfig
from pipeline.train.engines import DiscriminatorCaller, GanEngines, build_engines, init_distributed, precision_context, step_updater
from pipeline.train.recipes import GanRecipe, Updater, gan_step, logs_to_floats
from pipeline.train.spec import get_spec

__all__ = [
    "StepCallback", "ThroughputWindow", "Worker", "WorkerPayload", "apply_speed_switches", "device_batch",
    "optimiser_step", "rank_seed", "set_up_worker", "train_loop", "train_worker",
]

log = logging.getLogger("holefill.train")

# Seeds of different ranks must differ (each rank sees different crops and masks) yet be reproducible.
_RANK_SEED_STRIDE = 1000


def rank_seed(seed: int, rank: int) -> int:
    """The seed of one rank, derived from the run seed (``seed + 1000 * rank``)."""
    return seed + _RANK_SEED_STRIDE * rank


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


# Called on every worker as ``callback(rank, step)`` after each optimiser step, before that step's logging,
# validation and checkpoint: a hook for what a caller needs to observe or provoke there (a test kills a worker).
StepCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class WorkerPayload:
    """What the driver sends every worker (pickled as a whole, so secret values survive the trip while
    never appearing in any rendered config): the job config, the MLflow run to log to and any step callbacks."""

    config: TrainJobConfig
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    step_callbacks: tuple[StepCallback, ...] = ()


def _cadence(every: int, step: int, last: int) -> bool:
    """True on multiples of ``every`` (0 = never) and always on the final step."""
    return step == last or (every > 0 and step % every == 0)


def _batches(
    config: TrainJobConfig, rank: int, world_size: int, start_step: int, pin_memory: bool = False
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless uint8 training batches for this rank (pinned when ``pin_memory``).

    The loader samples shards with replacement (equal batch counts on every rank, so no collective ever
    waits on a rank that ran dry). After a resume the seed also depends on the step, so the restarted run
    draws fresh crops rather than replaying the ones it trained on before the failure. One loader pass
    spans the whole run, so its worker processes start once per run (``persistent_workers`` would only keep
    them across passes, which must restart anyway to take the next pass's seed).
    """
    data, train = config.data, config.train
    micro_batches_left = (train.max_steps - start_step) * config.deepspeed.gradient_accumulation_steps
    seed = rank_seed(train.seed, rank) + 7919 * start_step
    while True:
        loader = make_train_loader(
            data.train_manifest,
            batch_size=train.batch_size,
            crop_size=data.crop_size,
            batches_per_epoch=max(micro_batches_left, 1),
            num_workers=data.loader_workers,
            seed=seed,
            rank=rank,
            world_size=world_size,
            storage_options=data.storage_options,
            uint8=True,  # converted on the device by device_batch: 4x fewer bytes cross PCIe
            pin_memory=pin_memory,
            geometry=data.train_geometry,
            mask_pool=[data.mask_pool] if data.mask_pool else [],
        )
        yield from loader
        seed += 1  # only reached if the loader's epoch ended early: start a new pass with a new seed


def device_batch(batch: dict[str, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A loader's uint8 batch -> float ``(image, mask)`` on ``device``, converted there (see ``to_float``)."""
    moved = to_float({key: batch[key].to(device, non_blocking=True) for key in ("image", "mask")})
    return moved["image"], moved["mask"]


def optimiser_step(
    recipe: GanRecipe,
    G: torch.nn.Module,
    D: torch.nn.Module,
    update_d: Updater,
    update_g: Updater,
    batches: Iterator[dict[str, torch.Tensor]],
    device: torch.device,
    precision: str,
    accumulation: int,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """One optimiser step: ``accumulation`` GAN steps (DeepSpeed applies the update on the last).

    Reads nothing back from the device: the returned ``train/*`` loss means are detached device tensors
    (read them with ``recipes.logs_to_floats`` on logging steps only), and the masks' [0,1] range is trusted
    (the loader builds them as 0|1). Also returns the last micro-batch's image and mask (sample grids).
    """
    sums: dict[str, torch.Tensor] = {}
    for _ in range(accumulation):
        image, mask = device_batch(next(batches), device)
        with precision_context(precision, device), mask_values_trusted():
            logs = gan_step(recipe, G, D, image, mask, update_d, update_g)
        for name, value in logs.items():
            sums[name] = sums[name] + value if name in sums else value
    return {f"train/{name}": value / accumulation for name, value in sums.items()}, image, mask


class ThroughputWindow:
    """Images/s over training steps only: validation, sample grids and checkpoints are paused out.

    On a GPU the host runs ahead of the device, so :meth:`pause` first waits for the queued training work
    (a sync, allowed on those steps); otherwise the next activity would be charged for it.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = 0.0
        self.steps = 0
        self._start: float | None = time.perf_counter()

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def pause(self) -> None:
        """Stop the clock (after the device caught up)."""
        if self._start is not None:
            self._synchronize()
            self.seconds += time.perf_counter() - self._start
            self._start = None

    def resume(self) -> None:
        """Restart the clock."""
        if self._start is None:
            self._start = time.perf_counter()

    def read(self) -> tuple[float, int]:
        """``(training seconds, steps)`` since the last read, then start a new window."""
        self.pause()
        seconds, steps = self.seconds, self.steps
        self.seconds, self.steps = 0.0, 0
        self.resume()
        return seconds, steps


def apply_speed_switches(performance: PerformanceSettings, generator: torch.nn.Module, discriminator: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Apply ``performance.*`` (each off by default until measured; see the config section); returns G.

    ``compile_generator`` returns a compiled wrapper of G for the forward passes. D is never compiled: the
    gradient penalty differentiates through it twice (double backward), which ``torch.compile`` does not
    support.
    """
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = performance.cudnn_benchmark
    if performance.channels_last:
        generator.to(memory_format=torch.channels_last)
        discriminator.to(memory_format=torch.channels_last)
    if performance.compile_generator:
        generator.compile()
    return generator


def validate(generator: torch.nn.Module, arch: str, config: TrainJobConfig, rank: int, world_size: int,
             device: torch.device) -> dict[str, float]:
    """Validation is evaluation on this rank's slice of the pinned eval set (collective: every rank calls it).

    The loop is the evaluation stage's (``pipeline.evaluation.evaluate.evaluate_slice``): the generator in eval mode
    through ``models.inpaint.inpaint_tensor`` (each image's output what it gets alone), composited outputs, the
    eval set's own buckets, PSNR / SSIM / L1; under the training precision. Each rank reads its own slice; the
    all-reduce sums the ranks' partial sums, so every eval sample counts exactly once whatever the number of ranks.
    """
    settings = EvaluationSettings(batch_size=config.data.eval_batch_size, crop_size=config.data.crop_size,
                                  device=str(device), samples_per_bucket=0)
    part = evaluate_slice(generator, arch, config.data.eval_manifest, settings, MetricWeights(()), rank, world_size,
                          loader_workers=min(config.data.loader_workers, 1),
                          forward_context=lambda: precision_context(config.deepspeed.precision, device),
                          storage_options=config.data.storage_options)
    metrics = BucketedMetrics.from_sums([part.table], part.buckets).all_reduce()
    return {f"val/{name}": float(value) for name, value in metrics.summary().items()}


def _sample_grid(recipe: GanRecipe, generator: torch.nn.Module, image: torch.Tensor, mask: torch.Tensor, precision: str) -> Any:
    count = min(4, image.shape[0])
    image, mask = image[:count], mask[:count]
    with torch.no_grad(), precision_context(precision, image.device):
        pred = recipe.generate(generator, image, mask)
    output = recipe.composite(pred.float(), image, mask)
    return sample_grid(image.cpu(), mask.cpu(), output.cpu(), image.cpu())


def _attempt_id() -> str:
    """A name every rank of this worker group shares (rank 0's, broadcast) and a restarted group does not."""
    token = [secrets.token_hex(4)]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(token, src=0)
    return token[0]


def checkpoint_dir_name(step: int, attempt: str) -> str:
    """``checkpoint_<step>-<attempt>``: Ray Train copies a reported checkpoint INTO ``<storage>/<run>/<name>``,
    so a name reused by a restarted attempt (same step) would merge the files a killed attempt left there into
    the new checkpoint; with the attempt in the name a failed attempt's folder is never reused."""
    return f"checkpoint_{step:08d}-{attempt}" if attempt else f"checkpoint_{step:08d}"


def _report(metrics: dict[str, float], engines: GanEngines, state: CheckpointState, rank: int,
            provenance: dict[str, str], attempt: str = "", run_folder: str | None = None) -> None:
    import ray.train  # lazy: importing Ray costs seconds, and only a Ray Train worker reaches this

    name = checkpoint_dir_name(state.step, attempt)
    with tempfile.TemporaryDirectory(prefix="holefill-ckpt-") as directory:
        save_checkpoint(directory, engines, state, rank, provenance)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                         checkpoint_dir_name=name)
    if run_folder is not None and not is_remote(run_folder):
        make_durable(join_url(run_folder, name), rank)  # Ray's copy is not fsync'd; object stores need none


def initial_generator(config: TrainJobConfig) -> GeneratorRecord:
    """The generator ``model.init_weights`` names (a checkpoint folder, a weights file of any form, an official
    release: :func:`pipeline.generators.read_generator`), checked to be the network this run trains (arch and
    ``model.generator_options``); one-line ``ValueError`` otherwise. The driver checks it before any worker starts."""
    url = config.model.init_weights
    try:
        return read_generator(url, arch=config.model.arch, kwargs=config.generator_kwargs,
                              storage_options=config.data.storage_options, option="--set model.generator_options.<name>=<value>")
    except ValueError as exc:
        raise ValueError(f"model.init_weights: {one_line(exc)}") from None


def _load_initial_generator(generator: torch.nn.Module, config: TrainJobConfig) -> None:
    """Start from given generator weights (fine-tuning); every rank loads the same file, so ranks agree."""
    generator.load_state_dict(initial_generator(config).state_dict, strict=True)
    log.info("generator initialised from %s", config.model.init_weights)


@dataclass
class Worker:
    """One rank, set up to train (:func:`set_up_worker`): the networks in their engines, the recipe, where it resumes."""

    config: TrainJobConfig
    rank: int
    world_size: int
    device: torch.device
    recipe: GanRecipe
    engines: GanEngines
    G: Any  # the generator's DeepSpeed engine (engines.generator): G(image, mask) is the forward, G.module the network
    D: DiscriminatorCaller
    update_g: Updater
    update_d: Updater
    step: int  # optimiser steps already done (0, or the step of the checkpoint resumed from)
    tracker: RunTracker | None  # rank 0 of a tracked run only
    step_callbacks: tuple[StepCallback, ...] = ()
    attempt: str = ""  # this worker group's start (:func:`_attempt_id`): part of its checkpoints' folder names


def set_up_worker(payload: WorkerPayload) -> Worker:
    """Everything before the first step: seeds, process group, networks (the same initial weights on every rank),
    recipe, DeepSpeed engines, the checkpoint Ray hands back (resume) and, on rank 0, the MLflow run."""
    # lazy: importing Ray costs seconds, and this module is imported by the driver and tests that never train
    import ray.train
    import ray.train.torch

    config, train, ds = payload.config, payload.config.train, payload.config.deepspeed
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    _seed_everything(rank_seed(train.seed, rank))
    init_distributed(config.scaling.use_gpu)
    attempt = _attempt_id()

    spec = get_spec(config.model.arch)
    torch.manual_seed(train.seed)  # the run seed, not the rank's: identical initial weights on every rank
    generator = spec.build_generator(config.model.generator_options)
    discriminator = spec.build_discriminator(config.model.discriminator_options)
    checkpoint = ray.train.get_checkpoint()
    if config.model.init_weights and checkpoint is None:
        _load_initial_generator(generator, config)
    _seed_everything(rank_seed(train.seed, rank))
    recipe = spec.build_recipe(config.model.options).to(device)
    engines = build_engines(
        recipe, generator, discriminator, ds,
        micro_batch_size=train.batch_size, world_size=world_size,
        steps_per_epoch=train.steps_per_epoch, device=device, lr_scale=train.lr_scale,
    )
    apply_speed_switches(config.performance, engines.generator.module, engines.discriminator.module, device)

    step = 0
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            step = restore_checkpoint(
                directory, engines, rank=rank, world_size=world_size, zero_stage=ds.zero_stage, arch=config.model.arch
            ).step
        log.info("rank %d resumed from %s at step %d", rank, checkpoint.path, step)

    tracker = None
    if rank == 0 and payload.mlflow_run_id:
        tracker = RunTracker.attach(payload.tracking_uri, payload.mlflow_run_id)
        tracker.start_system_metrics()
    return Worker(
        config=config, rank=rank, world_size=world_size, device=device, recipe=recipe, engines=engines,
        G=engines.generator, D=DiscriminatorCaller(engines.discriminator),
        update_g=step_updater(engines.generator), update_d=step_updater(engines.discriminator),
        step=step, tracker=tracker, step_callbacks=payload.step_callbacks, attempt=attempt,
    )


def train_loop(worker: Worker) -> None:
    """Optimiser steps until ``train.max_steps``; on their cadences log (rank 0), validate (all ranks), log sample
    grids (rank 0) and checkpoint (all ranks). A step reads nothing back from the device unless a cadence fires."""
    config, rank, device = worker.config, worker.rank, worker.device
    train_settings, ds = config.train, config.deepspeed
    batches = _batches(config, rank, worker.world_size, worker.step, pin_memory=device.type == "cuda")
    window = ThroughputWindow(device)
    while worker.step < train_settings.max_steps:
        losses, image, mask = optimiser_step(
            worker.recipe, worker.G, worker.D, worker.update_d, worker.update_g, batches, device, ds.precision,
            ds.gradient_accumulation_steps,
        )
        worker.step += 1
        window.steps += 1
        for callback in worker.step_callbacks:
            callback(rank, worker.step)
        if _cadence(train_settings.log_every, worker.step, train_settings.max_steps):
            _log_progress(worker, losses, window)
        _validate_and_checkpoint(worker, losses, image, mask, window)


def _log_progress(worker: Worker, losses: dict[str, torch.Tensor], window: ThroughputWindow) -> None:
    """Throughput and losses into the job log and, when tracked, MLflow; only rank 0 reads the device."""
    train_settings, ds = worker.config.train, worker.config.deepspeed
    seconds, steps = window.read()
    rate = steps * train_settings.batch_size * ds.gradient_accumulation_steps * worker.world_size / max(seconds, 1e-9)
    if worker.rank != 0:
        return
    values = logs_to_floats(losses)
    eta = (train_settings.max_steps - worker.step) * seconds / max(steps, 1)
    log.info(
        "step %d/%d  %.2f img/s  eta %.0fs  %s", worker.step, train_settings.max_steps, rate, eta,
        "  ".join(f"{k.split('/', 1)[1]}={v:.4f}" for k, v in sorted(values.items())),
    )
    if worker.tracker is not None:
        metrics = {**values, **worker.engines.learning_rates(), "perf/images_per_s": rate}
        worker.tracker.log_metrics(metrics, step=worker.step)


def _validate_and_checkpoint(worker: Worker, losses: dict[str, torch.Tensor], image: torch.Tensor, mask: torch.Tensor,
                             window: ThroughputWindow) -> None:
    """Validation (all ranks), a sample grid (rank 0, no collective) and a checkpoint (all ranks), each on its
    cadence; their time is kept out of the training throughput."""
    config, step, tracker = worker.config, worker.step, worker.tracker
    train_settings, ds, last = config.train, config.deepspeed, config.train.max_steps
    validate_now = _cadence(train_settings.val_every, step, last)
    grid = tracker is not None and train_settings.image_every and _cadence(train_settings.image_every, step, last)
    checkpoint_now = _cadence(train_settings.ckpt_every, step, last)
    if not (validate_now or grid or checkpoint_now):
        return
    window.pause()
    metrics: dict[str, float] = {"step": step}
    if validate_now:
        val = validate(worker.G.module, config.model.arch, config, worker.rank, worker.world_size, worker.device)
        metrics.update(val)
        if tracker is not None:
            tracker.log_metrics(val, step=step)
    if grid:
        picture = _sample_grid(worker.recipe, worker.G.module, image, mask, ds.precision)
        tracker.log_image(picture, f"samples/step_{step:08d}.png", step)
    if checkpoint_now:
        metrics.update(logs_to_floats(losses))
        state = CheckpointState(step=step, world_size=worker.world_size, zero_stage=ds.zero_stage,
                                precision=ds.precision, arch=config.model.arch, generator_kwargs=config.generator_kwargs)
        provenance = {"run_name": config.run.name}
        if tracker is not None:
            provenance["mlflow_run_id"] = tracker.run_id
        _report(metrics, worker.engines, state, worker.rank, provenance, worker.attempt,
                join_url(config.run.storage_path, config.run.name))
    window.resume()


def train_worker(payload: WorkerPayload) -> None:
    """Ray Train's ``train_loop_per_worker``: set this rank up, then train until ``train.max_steps`` optimiser steps
    are done."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    worker = set_up_worker(payload)
    train_loop(worker)
    if worker.tracker is not None:
        # The tracker sends from a background thread; the worker process may end as soon as we return. Wait out a
        # tracking outage (the driver needs the server to register the model anyway); what is still unsent after
        # that is counted in a warning.
        worker.tracker.flush(timeout_s=300)
