"""The per-worker training loop that Ray Train runs on every rank.

Read it top to bottom like a plain training script: build the recipe, models and DeepSpeed engines; resume
from the latest checkpoint Ray hands back; then loop over optimiser steps, each made of
``gradient_accumulation_steps`` GAN steps, and on their cadences log (rank 0), validate (all ranks, every
eval sample once), log sample grids (rank 0) and checkpoint (all ranks, through ``ray.train.report``).
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from pipeline.train.checkpoint import CheckpointState, restore_checkpoint, save_checkpoint
from pipeline.train.config import TrainJobConfig
from pipeline.train.engines import DiscriminatorCaller, GanEngines, build_engines, init_distributed, precision_context, step_updater

__all__ = ["WorkerPayload", "rank_seed", "train_worker"]

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


@dataclass(frozen=True)
class WorkerPayload:
    """What the driver sends every worker (pickled as a whole, so secret values survive the trip while
    never appearing in any rendered config): the job config and the MLflow run to log to."""

    config: TrainJobConfig
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None


def _cadence(every: int, step: int, last: int) -> bool:
    """True on multiples of ``every`` (0 = never) and always on the final step."""
    return step == last or (every > 0 and step % every == 0)


def _batches(config: TrainJobConfig, rank: int, world_size: int, start_step: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless training batches for this rank.

    The loader samples shards with replacement (equal batch counts on every rank, so no collective ever
    waits on a rank that ran dry). After a resume the seed also depends on the step, so the restarted run
    draws fresh crops rather than replaying the ones it trained on before the failure.
    """
    from pipeline.data.loaders import make_train_loader

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
        )
        yield from loader
        seed += 1  # only reached if the loader's epoch ended early: start a new pass with a new seed


@torch.no_grad()
def evaluate(recipe: Any, generator: torch.nn.Module, config: TrainJobConfig, rank: int, world_size: int, device: torch.device) -> dict[str, float]:
    """PSNR / SSIM / L1 per hole bucket and overall on the pinned eval set (collective: every rank calls it).

    Each rank reads its own slice of the eval shards; the accumulator's all-reduce sums the ranks' partial
    sums, so every eval sample counts exactly once whatever the number of ranks.
    """
    from pipeline.data.loaders import make_eval_loader
    from pipeline.metrics import BucketedMetrics

    loader = make_eval_loader(
        config.data.eval_manifest,
        batch_size=config.data.eval_batch_size,
        rank=rank,
        world_size=world_size,
        num_workers=min(config.data.loader_workers, 1),
        crop_size=config.data.crop_size,
        storage_options=config.data.storage_options,
    )
    metrics = BucketedMetrics()
    was_training = generator.training
    generator.eval()
    try:
        for batch in loader:
            image, mask = batch["image"].to(device), batch["mask"].to(device)
            with precision_context(config.deepspeed.precision, device):
                pred = recipe.generate(generator, image, mask)
            output = recipe.composite(pred.float(), image, mask)
            metrics.update(output, image, batch["hole_ratio"])
    finally:
        generator.train(was_training)
    metrics.all_reduce()
    return {f"val/{name}": float(value) for name, value in metrics.summary().items()}


def _sample_grid(recipe: Any, generator: torch.nn.Module, image: torch.Tensor, mask: torch.Tensor, precision: str) -> Any:
    from pipeline.tracking import sample_grid

    count = min(4, image.shape[0])
    image, mask = image[:count], mask[:count]
    with torch.no_grad(), precision_context(precision, image.device):
        pred = recipe.generate(generator, image, mask)
    output = recipe.composite(pred.float(), image, mask)
    return sample_grid(image.cpu(), mask.cpu(), output.cpu(), image.cpu())


def _report(metrics: dict[str, float], engines: GanEngines, state: CheckpointState, rank: int) -> None:
    import ray.train

    with tempfile.TemporaryDirectory(prefix="holefill-ckpt-") as directory:
        save_checkpoint(directory, engines, state, rank)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(directory),
            checkpoint_dir_name=f"checkpoint_{state.step:08d}",
        )


def _claim_fault(config: TrainJobConfig) -> bool:
    """True the first time the injected fault is reached in this run (see :class:`FaultInjection`)."""
    from pipeline.fsutil import exists, join_url, publish_bytes

    fault = config.fault_injection
    marker = join_url(config.run.storage_path, config.run.name, f"fault_injected_rank{fault.rank}_step{fault.at_step}")
    if exists(marker, config.run.storage_options):
        return False
    publish_bytes(marker, b"fired\n", config.run.storage_options)
    return True


def _load_initial_generator(generator: torch.nn.Module, config: TrainJobConfig) -> None:
    """Start from given generator weights (fine-tuning); every rank loads the same file, so ranks agree."""
    from models.convert import extract_state_dict, load_weights_bytes
    from pipeline.fsutil import read_bytes

    url = config.model.init_weights
    state = extract_state_dict(load_weights_bytes(read_bytes(url, config.data.storage_options), url))
    generator.load_state_dict(state, strict=True)
    log.info("generator initialised from %s", url)


def train_worker(payload: WorkerPayload) -> None:
    """Ray Train's ``train_loop_per_worker``: train until ``train.max_steps`` optimiser steps are done."""
    import ray.train
    import ray.train.torch

    from pipeline.train.recipes import build_recipe, gan_step
    from models.registry import get_architecture

    if not logging.getLogger().handlers:
        from pipeline.joblog import LOG_FORMAT

        logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    config = payload.config
    train, ds = config.train, config.deepspeed
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    _seed_everything(rank_seed(train.seed, rank))
    init_distributed(config.scaling.use_gpu)

    # -- models, recipe, engines (identical initial weights on every rank: same seed for model init) --
    arch = get_architecture(config.model.arch)
    torch.manual_seed(train.seed)
    generator, discriminator = arch.generator(**config.model.generator_options), arch.discriminator()
    checkpoint = ray.train.get_checkpoint()
    if config.model.init_weights and checkpoint is None:
        _load_initial_generator(generator, config)
    _seed_everything(rank_seed(train.seed, rank))
    recipe = build_recipe(config.model.arch, **config.model.options).to(device)
    engines = build_engines(
        recipe, generator, discriminator, ds,
        micro_batch_size=train.batch_size, world_size=world_size,
        steps_per_epoch=train.steps_per_epoch, device=device, lr_scale=train.lr_scale,
    )
    G, D = engines.generator, DiscriminatorCaller(engines.discriminator)
    update_g, update_d = step_updater(G), step_updater(engines.discriminator)

    # -- resume --
    step = 0
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            step = restore_checkpoint(
                directory, engines, rank=rank, world_size=world_size, zero_stage=ds.zero_stage, arch=config.model.arch
            ).step
        log.info("rank %d resumed from %s at step %d", rank, checkpoint.path, step)

    tracker = None
    if rank == 0 and payload.mlflow_run_id:
        from pipeline.tracking import RunTracker

        tracker = RunTracker.attach(payload.tracking_uri, payload.mlflow_run_id)
        tracker.start_system_metrics()

    batches = _batches(config, rank, world_size, step)
    images_per_step = train.batch_size * ds.gradient_accumulation_steps * world_size
    window_start, window_steps = time.perf_counter(), 0
    losses: dict[str, float] = {}
    while step < train.max_steps:
        # -- one optimiser step: gradient_accumulation_steps GAN steps; DeepSpeed applies the update on the last --
        sums: dict[str, float] = {}
        for _ in range(ds.gradient_accumulation_steps):
            batch = next(batches)
            image = batch["image"].to(device, non_blocking=True)
            mask = batch["mask"].to(device, non_blocking=True)
            with precision_context(ds.precision, device):
                logs = gan_step(recipe, G, D, image, mask, update_d, update_g)
            for name, value in logs.items():
                sums[name] = sums.get(name, 0.0) + value
        losses = {f"train/{name}": value / ds.gradient_accumulation_steps for name, value in sums.items()}
        step += 1
        window_steps += 1

        fault = config.fault_injection
        if fault is not None and rank == fault.rank and step == fault.at_step and _claim_fault(config):
            log.warning("fault injection: rank %d exits abruptly at step %d", rank, step)
            os._exit(17)

        # -- logging (rank 0) --
        if _cadence(train.log_every, step, train.max_steps):
            elapsed = time.perf_counter() - window_start
            rate = window_steps * images_per_step / max(elapsed, 1e-9)
            if rank == 0:
                eta = (train.max_steps - step) * elapsed / max(window_steps, 1)
                log.info(
                    "step %d/%d  %.2f img/s  eta %.0fs  %s", step, train.max_steps, rate, eta,
                    "  ".join(f"{k.split('/', 1)[1]}={v:.4f}" for k, v in sorted(losses.items())),
                )
                if tracker is not None:
                    tracker.log_metrics({**losses, **engines.learning_rates(), "perf/images_per_s": rate}, step=step)
            window_start, window_steps = time.perf_counter(), 0

        # -- validation (all ranks) --
        metrics: dict[str, float] = {"step": step, **losses}
        if _cadence(train.val_every, step, train.max_steps):
            val = evaluate(recipe, G.module, config, rank, world_size, device)
            metrics.update(val)
            if tracker is not None:
                tracker.log_metrics(val, step=step)

        # -- sample grids (rank 0; no collective involved) --
        if tracker is not None and train.image_every and _cadence(train.image_every, step, train.max_steps):
            tracker.log_image(_sample_grid(recipe, G.module, image, mask, ds.precision), f"samples/step_{step:08d}.png", step)

        # -- checkpoint (all ranks) --
        if _cadence(train.ckpt_every, step, train.max_steps):
            state = CheckpointState(step=step, world_size=world_size, zero_stage=ds.zero_stage, precision=ds.precision, arch=config.model.arch)
            _report(metrics, engines, state, rank)

    if tracker is not None:
        # The tracker sends from a background thread; the worker process may end as soon as we return.
        tracker.flush(timeout_s=60)
