"""WebDataset loaders for holefill shards: an endless, resampled training stream and an exact eval pass.

Each loader is a list of webdataset stages: shards (which, in what order) -> raw samples
(:mod:`pipeline.data.shard_stream`: fsspec reads, whitelisted members, retries, manifest checks) -> decoded and
cropped samples (:mod:`pipeline.data.train_geometry`) -> uint8 batches. Both yield float batches: ``image``
(B, 3, S, S) in [0, 1] and ``mask`` (B, 1, S, S) with 1 = hole.

Training (:func:`make_train_loader`) samples shards *with replacement* per rank and worker (webdataset's
``ResampledShards``, then its ``shuffle`` buffer: hand-written ones measured no faster that matters) and stops the
epoch after ``batches_per_epoch`` batches through ``WebLoader.with_epoch`` - on the loader, not the
dataset, where it would be multiplied by the worker count - so every rank yields exactly the same number
of batches and no DDP collective waits on a rank that ran dry. Workers send uint8 batches; the
conversion to float happens in the consuming process (4x less inter-process traffic).

Evaluation (:func:`make_eval_loader`) slices the shard list by rank, then by loader worker, and reads it
once in a stable order: every eval sample is seen exactly once across all ranks and workers. Ranks may
get different batch counts; evaluation has no per-batch collective, metrics are all-reduced once.
"""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
import webdataset as wds

from pipeline.data.masks.pool import MaskPool
from pipeline.data.shard_stream import ShardSamples, Verify, decode_sample, resolve_shards
from pipeline.data.tario import TarFormatError
from pipeline.data.train_geometry import GEOMETRIES, Geometry, center_crop, train_sample
from pipeline.fsutil import ReadRetry, StorageOptionsLike

__all__ = [
    "EvalLoader",
    "TrainLoader",
    "make_eval_loader",
    "make_train_loader",
    "to_float",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Seeding
# --------------------------------------------------------------------------------------------------


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


@dataclass
class _StreamSeed:
    """Seeds of one rank's stream. ``epoch`` is bumped by the loader in the main process before each
    pass; workers receive a copy at the start of the pass, so every (rank, worker, epoch) differs."""

    seed: int
    rank: int
    epoch: int = 0

    def shard_seed(self) -> int:
        """Seed of the shard draws of this (rank, worker, epoch): ``ResampledShards``' ``worker_seed``."""
        return self.derive("shards")

    def derive(self, purpose: str) -> int:
        worker, _ = _worker()
        text = repr((self.seed, self.rank, worker, self.epoch, purpose)).encode()
        return int.from_bytes(hashlib.blake2b(text, digest_size=8, person=b"holefill.load").digest(), "little")


# --------------------------------------------------------------------------------------------------
# Pipeline stages (picklable: they travel to DataLoader workers)
# --------------------------------------------------------------------------------------------------


def _warn_and_continue(exn: Exception) -> bool:
    """Training's shard handler: a shard that stays unreadable or does not match its manifest is skipped (a
    multi-day run goes on); a shard whose tar structure is damaged ends the run with its one-line error naming
    the shard and offset (a published shard that does not parse will not parse on any later draw either)."""
    if isinstance(exn, TarFormatError):
        raise exn
    log.warning("skipping bad shard data: %s", exn)
    return True


def _reraise(exn: Exception) -> bool:
    raise exn


def _shuffled(src: Iterator[dict], bufsize: int, seeds: _StreamSeed) -> Iterator[dict]:
    """webdataset's shuffle buffer over raw (still encoded, hence small) samples, seeded per pass and worker.

    A hand-written reservoir buffer costs 0.7 us less per sample (bench/loader.py: 0.72 vs 1.44 us/item), under
    0.1 % of the milliseconds a sample's decode and crop take: the library's is used.
    A buffer of one sample or none is no shuffle: the stream passes unchanged.
    """
    if bufsize <= 1:
        return src
    return wds.shuffle(bufsize, bufsize, rng=random.Random(seeds.derive("shuffle")))(src)


def _train_crops(
    src: Iterator[dict], crop_size: int, seeds: _StreamSeed, geometry: Geometry, pool: MaskPool | None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.Generator(np.random.PCG64(seeds.derive("crop")))
    for raw in src:
        try:
            sample = decode_sample(raw)
        except (ValueError, OSError) as exc:  # a corrupt sample must not stop a multi-day run
            _warn_and_continue(exc)
            continue
        if pool is None:
            yield train_sample(sample.image, sample.mask, crop_size, rng, geometry)
        else:  # a mask drawn anew from the pool at every load of an image, as the official loaders do
            yield train_sample(sample.image, pool.draw(rng), crop_size, rng, geometry, pooled=True)


def _load_pool(urls: Sequence[str], storage_options: StorageOptionsLike) -> MaskPool | None:
    """The training mask pool (read once, in the main process; workers share it), or None without one."""
    return MaskPool.load(list(urls), storage_options) if urls else None


def _collate_uint8(samples: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack (H,W,3) images as (B,3,H,W) uint8 and (H,W) masks as (B,H,W) uint8.

    Each image is written once, channel-first, straight into the batch array (no per-sample contiguous
    copy, no second copy to stack). Reordering here, on uint8 in the loader worker, leaves the consumer
    one uint8 -> float pass (4x less memory traffic than permuting floats).
    """
    height, width = samples[0][1].shape
    images = np.empty((len(samples), 3, height, width), dtype=np.uint8)
    masks = np.empty((len(samples), height, width), dtype=np.uint8)
    for index, (image, mask) in enumerate(samples):
        if mask.shape != (height, width):
            raise ValueError(f"samples of one batch differ in size: {mask.shape} vs {(height, width)}")
        images[index] = image.transpose(2, 0, 1)
        masks[index] = mask
    return {"image": torch.from_numpy(images), "mask": torch.from_numpy(masks)}


def to_float(batch: Mapping[str, Any]) -> dict[str, Any]:
    """uint8 (B,3,H,W) / (B,H,W) 0|255 -> float image (B,3,H,W) in [0,1], mask (B,1,H,W) 1 = hole.

    Runs wherever the tensors are: a GPU trainer moves the uint8 batch first (4x fewer bytes over PCIe).
    """
    out = dict(batch)
    # Convert, then scale in place: measured faster than the single mixed-dtype ``torch.div(uint8, 255.0)``.
    out["image"] = batch["image"].float().div_(255.0)
    out["mask"] = (batch["mask"] > 127).unsqueeze(1).float()
    return out


# --------------------------------------------------------------------------------------------------
# Train loader
# --------------------------------------------------------------------------------------------------


class TrainLoader:
    """Iterable of exactly ``batches_per_epoch`` float batches per pass; each pass draws fresh samples.

    Wraps a ``webdataset.WebLoader`` whose length is fixed with ``with_epoch``; every ``iter`` after the first
    moves the shard, shuffle and crop seeds to a new pass.
    """

    def __init__(self, loader: wds.WebLoader, seeds: _StreamSeed, batches_per_epoch: int, uint8: bool = False) -> None:
        self._loader = loader
        self._uint8 = uint8
        self._seeds = seeds
        self.batches_per_epoch = batches_per_epoch
        self._started = False

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self._started:
            self._seeds.epoch += 1
        self._started = True
        for batch in self._loader:
            yield batch if self._uint8 else to_float(batch)


def make_train_loader(
    shards: str | Sequence[str],
    *,
    batch_size: int,
    crop_size: int = 256,
    batches_per_epoch: int,
    num_workers: int = 2,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    storage_options: StorageOptionsLike = None,
    shuffle_buffer: int = 500,
    uint8: bool = False,
    pin_memory: bool = False,
    read_retry: ReadRetry | None = None,
    verify: Verify = "size",
    geometry: Geometry = "crop",
    mask_pool: Sequence[str] = (),
) -> TrainLoader:
    """Endless-source training loader giving exactly ``batches_per_epoch`` batches on every rank.

    Batches are ``{"image": (B,3,S,S) float [0,1], "mask": (B,1,S,S) float 1 = hole}`` with
    ``S = crop_size``; image and mask share one random crop and one horizontal flip. Shards are drawn
    with replacement, seeded by ``(seed, rank, loader worker, epoch)``; ``world_size`` is only checked
    (ranks differ through ``rank``, not by splitting the shard list). ``uint8=True`` yields the batches
    before :func:`to_float` (uint8 image (B,3,S,S), mask (B,S,S) 0|255), for conversion on the GPU;
    ``pin_memory`` pins them in page-locked memory so a ``non_blocking`` copy is truly asynchronous.

    Shard reads that fail transiently are retried (``read_retry``, logged); a shard that stays unreadable, or does
    not match its manifest (``verify``: ``size``, ``sha256`` or ``none``) is skipped with a warning naming it, and
    another is drawn: a multi-day run is not killed by one unreachable object. A shard whose tar structure is
    damaged (truncated, a bad header, a pax record that does not parse) ends the loader at once with one
    :class:`pipeline.data.tario.TarFormatError` naming the shard and the offset: it would fail on every draw.

    ``geometry`` (``crop``, ``rn``, ``lbam``: :mod:`pipeline.data.train_geometry`) turns a stored image into a
    crop as holefill or as each paper's loader did. ``mask_pool`` (pool index URLs, :mod:`pipeline.data.masks.pool`)
    replaces each sample's shard mask by one drawn from the pools at every load, seeded like the crops.
    """
    if geometry not in GEOMETRIES:
        raise ValueError(f"geometry must be one of {', '.join(GEOMETRIES)}, got {geometry!r}")
    for name, value in (("batch_size", batch_size), ("crop_size", crop_size), ("batches_per_epoch", batches_per_epoch)):
        if value <= 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    if num_workers < 0 or shuffle_buffer < 0:
        raise ValueError("num_workers and shuffle_buffer must be >= 0")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank} world_size={world_size}")
    seeds = _StreamSeed(seed=seed, rank=rank)
    shards_by_url = {ref.url: ref for ref in resolve_shards(shards, storage_options)}
    pipeline = wds.DataPipeline(
        # Drawn with replacement, seeded per (seed, rank, worker, epoch): a hand-written random.choice loop is
        # 0.6 us cheaper per shard drawn (bench/loader.py), i.e. nothing.
        wds.ResampledShards(list(shards_by_url), worker_seed=seeds.shard_seed, deterministic=True),
        ShardSamples(shards_by_url, storage_options, read_retry or ReadRetry(), verify, _warn_and_continue),
        wds.pipelinefilter(_shuffled)(shuffle_buffer, seeds),
        wds.pipelinefilter(_train_crops)(crop_size, seeds, geometry, _load_pool(mask_pool, storage_options)),
        wds.batched(batch_size, collation_fn=_collate_uint8, partial=False),
    )
    loader = wds.WebLoader(
        pipeline,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=False,  # workers must be re-created each pass to pick up the new epoch seed
        prefetch_factor=2 if num_workers > 0 else None,
        pin_memory=pin_memory,
    ).with_epoch(batches_per_epoch)
    return TrainLoader(loader, seeds, batches_per_epoch, uint8=uint8)


# --------------------------------------------------------------------------------------------------
# Eval loader
# --------------------------------------------------------------------------------------------------


@dataclass
class _ExactShards:
    """Source stage: this rank's and this loader worker's slice of the shard list, once, in order."""

    urls: list[str]
    rank: int
    world_size: int

    def __call__(self) -> Iterator[dict[str, str]]:
        worker, num_workers = _worker()
        for url in self.urls[self.rank :: self.world_size][worker::num_workers]:
            yield {"url": url}


def _eval_crops(src: Iterator[dict], crop_size: int | None) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    for raw in src:
        sample = decode_sample(raw)
        image, mask = sample.image, sample.mask
        if crop_size is not None:
            image, mask = center_crop(image, mask, crop_size)
        yield sample.key, image, mask


def _collate_eval(samples: list[tuple[str, np.ndarray, np.ndarray]]) -> dict[str, Any]:
    keys = [s[0] for s in samples]
    shapes = {s[2].shape for s in samples}
    if len(shapes) > 1:
        raise ValueError(f"eval images differ in size {sorted(shapes)}: set crop_size to batch them")
    batch = _collate_uint8([(s[1], s[2]) for s in samples])
    batch["key"] = keys
    return batch


class EvalLoader:
    """One exact pass over this rank's eval slice: float image/mask, ``key`` list, ``hole_ratio`` (B,)."""

    def __init__(self, loader: wds.WebLoader) -> None:
        self._loader = loader

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self._loader:
            out = to_float(batch)
            out["hole_ratio"] = out["mask"].mean(dim=(1, 2, 3))
            yield out


def make_eval_loader(
    shards: str | Sequence[str],
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    crop_size: int | None = 256,
    storage_options: StorageOptionsLike = None,
    read_retry: ReadRetry | None = None,
    verify: Verify = "size",
) -> EvalLoader:
    """Loader that reads each eval sample exactly once across ``world_size`` ranks and their workers.

    Shards are split ``urls[rank::world_size]``, then ``[worker::num_workers]`` inside each rank; with
    fewer shards than ``world_size * num_workers`` some readers get none (still exact). ``crop_size``
    centre-crops image and mask (``None`` keeps the stored size, which must then be uniform).
    ``hole_ratio`` is measured on the mask as yielded, so buckets match what the metrics see.

    Shard reads that fail transiently are retried (``read_retry``, logged, resuming after the samples already
    read); a shard that stays unreadable, is corrupt, or does not match its manifest (``verify``) stops the
    pass with an error naming it: an evaluation never silently misses samples.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if crop_size is not None and crop_size <= 0:
        raise ValueError(f"crop_size must be > 0 or None, got {crop_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank} world_size={world_size}")
    refs = resolve_shards(shards, storage_options)
    pipeline = wds.DataPipeline(
        _ExactShards([ref.url for ref in refs], rank, world_size),
        ShardSamples({ref.url: ref for ref in refs}, storage_options, read_retry or ReadRetry(), verify, _reraise),
        wds.pipelinefilter(_eval_crops)(crop_size),
        wds.batched(batch_size, collation_fn=_collate_eval, partial=True),
    )
    loader = wds.WebLoader(pipeline, batch_size=None, num_workers=num_workers)
    return EvalLoader(loader)
