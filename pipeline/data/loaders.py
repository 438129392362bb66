"""WebDataset loaders for holefill shards: an endless, resampled training stream and an exact eval pass.

A shard sample is three tar members sharing a key: ``KEY.jpg`` (RGB JPEG), ``KEY.mask.png`` (8-bit
gray, 255 = hole, image-sized) and ``KEY.json`` (metadata). Both loaders

* read shards through fsspec (local paths, ``file://``, ``s3://``, ...; webdataset has no S3 of its own),
* pull only whitelisted members out of the tar stream (:data:`MEMBER_WHITELIST`) with holefill's lean
  header parser (:func:`pipeline.data.tario.tar_members`: 80 vs 472 us per sample for webdataset's
  ``tarfile``-based ``tar_file_iterator``, 5.9x, bench/loader.py); anything else, a ``.pyd`` or ``.pth`` in
  particular, is skipped without being read into memory, so nothing in a shard is ever unpickled,
* retry a shard read that fails transiently (throttling, 5xx, resets), resuming after the samples already read,
  and check each shard against the size (and, on request, sha256) its manifest lists,
* decode with explicit handlers (PIL for the JPEG, :func:`pipeline.data.imageops.decode_mask_png` for the
  mask, a plain inflate for the masks holefill writes; ``json.loads``), never webdataset's default decoders,
* yield float batches: ``image`` (B, 3, S, S) in [0, 1] and ``mask`` (B, 1, S, S) with 1 = hole.

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
import io
import json
import logging
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from webdataset.tariterators import base_plus_ext, group_by_keys

from pipeline.fsutil import ReadRetry, StorageOptionsLike, TransientReadError, is_transient, open_url
from pipeline.data.imageops import decode_mask_png
from pipeline.data.tario import tar_members

__all__ = [
    "MEMBER_WHITELIST",
    "EvalLoader",
    "TrainLoader",
    "center_crop",
    "decode_sample",
    "make_eval_loader",
    "make_train_loader",
    "random_crop_flip",
    "ShardRef",
    "resolve_shard_urls",
    "resolve_shards",
    "tar_members",
    "to_float",
]

log = logging.getLogger(__name__)

# The only tar members a loader reads. Extensions are everything after the key's first dot, lowercased.
MEMBER_WHITELIST: frozenset[str] = frozenset({"jpg", "mask.png", "json"})

Verify = Literal["none", "size", "sha256"]
_DRAIN_CHUNK = 1 << 20

# A resampled stream that keeps drawing shards with no usable sample would spin forever; give up after
# this many shards in a row (times the number of distinct shards) produced nothing.
_EMPTY_SHARD_PATIENCE = 3


# --------------------------------------------------------------------------------------------------
# Shard lists
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardRef:
    """A shard to read: its URL and, when it comes from a manifest, the size and sha256 it must have."""

    url: str
    bytes: int | None = None
    sha256: str | None = None


def resolve_shards(shards: str | Sequence[str], storage_options: StorageOptionsLike = None) -> list[ShardRef]:
    """The shards to read: a list as given, a brace pattern / single ``.tar``, or a manifest URL.

    A string ending in ``.tar`` (optionally with ``{000..009}`` braces) names shards directly; any
    other string is a manifest file or dataset folder read with ``pipeline.data.manifest.load_manifest``,
    and its shards carry the size and sha256 the manifest records, which the loaders verify as they read.
    """
    if isinstance(shards, str):
        if shards.endswith(".tar"):
            refs = [ShardRef(url) for url in wds.shardlists.expand_urls(shards)]
        else:
            from pipeline.data.manifest import load_manifest  # deferred: manifests pull in pydantic schemas

            manifest = load_manifest(shards, storage_options)
            refs = [ShardRef(url, entry.bytes, entry.sha256)
                    for entry, url in zip(manifest.shards, manifest.shard_urls())]
    else:
        refs = [ref if isinstance(ref, ShardRef) else ShardRef(str(ref)) for ref in shards]
    if not refs:
        raise ValueError("shard list is empty: a loader needs at least one shard")
    return refs


def resolve_shard_urls(shards: str | Sequence[str], storage_options: StorageOptionsLike = None) -> list[str]:
    """The URLs of :func:`resolve_shards`."""
    return [ref.url for ref in resolve_shards(shards, storage_options)]


# --------------------------------------------------------------------------------------------------
# Reading and decoding
# --------------------------------------------------------------------------------------------------


def _is_whitelisted(fname: str) -> bool:
    _, suffix = base_plus_ext(fname)
    return suffix is not None and suffix.lower() in MEMBER_WHITELIST


class _CountingStream:
    """Read-through wrapper counting (and optionally hashing) the bytes of a shard as the loader reads them.

    Hashing needs every byte, so a hashing stream does not seek: members the loader skips are read and dropped.
    """

    def __init__(self, stream: Any, hashing: bool) -> None:
        self._stream = stream
        self._digest = hashlib.sha256() if hashing else None
        self._counted = 0

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self._counted += len(data)
        if self._digest is not None:
            self._digest.update(data)
        return data

    def seekable(self) -> bool:
        return self._digest is None and self._stream.seekable()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._counted = self._stream.seek(offset, whence)
        return self._counted

    def check(self, ref: ShardRef) -> None:
        """Read to the end; ``ValueError`` naming the shard when its size or sha256 is not the manifest's."""
        while self.read(_DRAIN_CHUNK):
            pass
        size = self._counted
        if ref.bytes is not None and size != ref.bytes:
            raise ValueError(f"shard {ref.url} is {size} bytes, its manifest says {ref.bytes}: not the published shard")
        if self._digest is not None and ref.sha256 is not None and self._digest.hexdigest() != ref.sha256:
            raise ValueError(f"shard {ref.url}: sha256 differs from its manifest: not the published shard")


def _read_shard(ref: ShardRef, storage_options: StorageOptionsLike, handler: Callable[[Exception], bool],
                retry: ReadRetry, verify: Verify) -> Iterator[dict]:
    """Raw samples of one shard (whitelisted members only, as bytes), grouped by key.

    A read that fails transiently (:func:`pipeline.fsutil.is_transient`: throttling, 5xx, resets, timeouts) is
    retried with backoff and jitter, each retry logged as a warning, and resumes after the members already
    yielded (no sample twice). A shard that is corrupt part way, or does not match its manifest (``verify``), or
    whose retries ran out, yields its samples up to there, then ``handler`` decides: ``True`` skips the rest of
    the shard, ``False`` (or raising) stops the loader. Errors name the shard.
    """

    def members() -> Iterator[dict]:
        yielded, attempt = 0, 1
        while True:
            try:
                with open_url(ref.url, "rb", storage_options) as raw:
                    stream = _CountingStream(raw, hashing=verify == "sha256")
                    seen = 0
                    for name, data in tar_members(stream, _is_whitelisted):
                        seen += 1
                        if seen <= yielded:
                            continue  # read again after a retry: already yielded
                        yielded += 1
                        yield {"fname": name, "data": data, "__url__": ref.url}
                    if verify != "none":
                        stream.check(ref)
                return
            except Exception as exc:
                if is_transient(exc) and attempt < retry.attempts:
                    delay = retry.delay(attempt)
                    log.warning("shard %s: read failed (%s: %s); retry %d/%d in %.1f s, resuming after %d members",
                                ref.url, type(exc).__name__, (str(exc).splitlines() or [""])[0][:200], attempt,
                                retry.attempts - 1, delay, yielded)
                    attempt += 1
                    time.sleep(delay)
                    continue
                if is_transient(exc):
                    exc = TransientReadError(ref.url, exc, attempt)
                elif ref.url not in str(exc):
                    exc.args = (f"{ref.url}: {exc}",)
                if not handler(exc):
                    raise exc
                return

    # Grouping per shard: a key can never merge with a same-named key of the next shard.
    yield from group_by_keys(members(), handler=handler)


def _decode_rgb(data: bytes) -> np.ndarray:
    im = Image.open(io.BytesIO(data), formats=("JPEG",))
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im)


@dataclass(frozen=True)
class DecodedSample:
    """One shard sample in memory: uint8 RGB ``image`` (H, W, 3), uint8 ``mask`` (H, W) 255 = hole."""

    key: str
    image: np.ndarray
    mask: np.ndarray
    meta: dict


def decode_sample(sample: Mapping[str, Any]) -> DecodedSample:
    """Decode a raw shard sample (``jpg``, ``mask.png``, optional ``json``) with explicit handlers."""
    key = str(sample.get("__key__", "?"))
    missing = [name for name in ("jpg", "mask.png") if name not in sample]
    if missing:
        raise ValueError(f"sample {key}: missing member(s) {', '.join(missing)}")
    image = _decode_rgb(sample["jpg"])
    mask = decode_mask_png(sample["mask.png"])
    if mask.shape != image.shape[:2]:
        raise ValueError(f"sample {key}: mask {mask.shape} does not match image {image.shape[:2]}")
    meta = json.loads(sample["json"]) if "json" in sample else {}
    return DecodedSample(key, image, mask, meta)


# --------------------------------------------------------------------------------------------------
# Joint geometry
# --------------------------------------------------------------------------------------------------


def _cover(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Up-scale image (bicubic) and mask (nearest) together so the short side is at least ``size``."""
    h, w = mask.shape
    if min(h, w) >= size:
        return image, mask
    scale = size / min(h, w)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    image = np.asarray(Image.fromarray(image).resize(new, Image.Resampling.BICUBIC))
    mask = np.asarray(Image.fromarray(mask).resize(new, Image.Resampling.NEAREST))
    return image, mask


def random_crop_flip(
    image: np.ndarray, mask: np.ndarray, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """The same random ``size`` square crop and the same horizontal flip (p = 0.5) on image and mask."""
    image, mask = _cover(image, mask, size)
    h, w = mask.shape
    y0 = int(rng.integers(0, h - size + 1))
    x0 = int(rng.integers(0, w - size + 1))
    image = image[y0 : y0 + size, x0 : x0 + size]
    mask = mask[y0 : y0 + size, x0 : x0 + size]
    if rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    return image, mask


def center_crop(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The centre ``size`` square of image and mask (up-scaled first when smaller)."""
    image, mask = _cover(image, mask, size)
    h, w = mask.shape
    y0, x0 = (h - size) // 2, (w - size) // 2
    return image[y0 : y0 + size, x0 : x0 + size], mask[y0 : y0 + size, x0 : x0 + size]


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
    log.warning("skipping bad shard data: %s", exn)
    return True


def _reraise(exn: Exception) -> bool:
    raise exn


@dataclass
class _ShardSamples:
    """Raw samples of each shard named by the stream of ``{"url": ...}`` (webdataset's ``ResampledShards``).

    A resampled stream that keeps drawing shards with no usable sample would spin forever: it stops after
    :data:`_EMPTY_SHARD_PATIENCE` times the shard count in a row produced nothing.
    """

    shards: dict[str, ShardRef]
    storage_options: StorageOptionsLike
    retry: ReadRetry
    verify: Verify

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        empty_streak = 0
        for drawn in src:
            ref = self.shards[drawn["url"]]
            produced = 0
            for sample in _read_shard(ref, self.storage_options, _warn_and_continue, self.retry, self.verify):
                produced += 1
                yield sample
            empty_streak = 0 if produced else empty_streak + 1
            if empty_streak > _EMPTY_SHARD_PATIENCE * len(self.shards):
                raise RuntimeError(f"{empty_streak} shards in a row held no samples (last: {ref.url})")


def _shuffled(src: Iterator[dict], bufsize: int, seeds: _StreamSeed) -> Iterator[dict]:
    """webdataset's shuffle buffer over raw (still encoded, hence small) samples, seeded per pass and worker.

    A hand-written reservoir buffer costs 0.7 us less per sample (bench/loader.py: 0.72 vs 1.44 us/item), under
    0.1 % of the milliseconds a sample's decode and crop take: the library's is used.
    """
    return wds.shuffle(bufsize, bufsize, rng=random.Random(seeds.derive("shuffle")))(src)


def _train_crops(
    src: Iterator[dict], crop_size: int, seeds: _StreamSeed, geometry: str = "crop", pool: Any = None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    from pipeline.data.train_geometry import train_sample  # deferred: import on first use only

    rng = np.random.Generator(np.random.PCG64(seeds.derive("crop")))
    for raw in src:
        try:
            sample = decode_sample(raw)
        except (ValueError, OSError) as exc:  # a corrupt sample must not stop a multi-day run
            _warn_and_continue(exc)
            continue
        if pool is None:
            yield train_sample(sample.image, sample.mask, crop_size, rng, geometry, random_crop_flip=random_crop_flip)
        else:  # a mask drawn anew from the pool at every load of an image, as the official loaders do
            yield train_sample(
                sample.image, pool.draw(rng), crop_size, rng, geometry, pooled=True, random_crop_flip=random_crop_flip
            )


def _load_pool(urls: Sequence[str], storage_options: StorageOptionsLike) -> Any:
    """The training mask pool (read once, in the main process; workers share it), or None without one."""
    if not urls:
        return None
    from pipeline.data.masks.pool import MaskPool

    return MaskPool.load(list(urls), storage_options)


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
    geometry: str = "crop",
    mask_pool: Sequence[str] = (),
) -> TrainLoader:
    """Endless-source training loader giving exactly ``batches_per_epoch`` batches on every rank.

    Batches are ``{"image": (B,3,S,S) float [0,1], "mask": (B,1,S,S) float 1 = hole}`` with
    ``S = crop_size``; image and mask share one random crop and one horizontal flip. Shards are drawn
    with replacement, seeded by ``(seed, rank, loader worker, epoch)``; ``world_size`` is only checked
    (ranks differ through ``rank``, not by splitting the shard list). ``uint8=True`` yields the batches
    before :func:`to_float` (uint8 image (B,3,S,S), mask (B,S,S) 0|255), for conversion on the GPU;
    ``pin_memory`` pins them in page-locked memory so a ``non_blocking`` copy is truly asynchronous.

    Shard reads that fail transiently are retried (``read_retry``, logged); a shard that stays unreadable, is
    corrupt, or does not match its manifest (``verify``: ``size``, ``sha256`` or ``none``) is skipped with a
    warning naming it, and another is drawn: a multi-day run is not killed by one bad object.

    ``geometry`` (``crop``, ``rn``, ``lbam``: :mod:`pipeline.data.train_geometry`) turns a stored image into a
    crop as holefill or as each paper's loader did. ``mask_pool`` (pool index URLs, :mod:`pipeline.data.masks.pool`)
    replaces each sample's shard mask by one drawn from the pools at every load, seeded like the crops.
    """
    from pipeline.data.train_geometry import GEOMETRIES

    if geometry not in GEOMETRIES:
        raise ValueError(f"geometry must be one of {', '.join(GEOMETRIES)}, got {geometry!r}")
    for name, value in (("batch_size", batch_size), ("crop_size", crop_size), ("batches_per_epoch", batches_per_epoch)):
        if value <= 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    if num_workers < 0 or shuffle_buffer < 0:
        raise ValueError("num_workers and shuffle_buffer must be >= 0")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank} world_size={world_size}")
    refs = resolve_shards(shards, storage_options)
    seeds = _StreamSeed(seed=seed, rank=rank)
    # Shards drawn with replacement by webdataset's ResampledShards, seeded per (seed, rank, worker, epoch): a
    # hand-written random.choice loop is 0.6 us cheaper per shard drawn (bench/loader.py), i.e. nothing.
    by_url = {ref.url: ref for ref in refs}
    stages: list[Any] = [
        wds.ResampledShards(list(by_url), worker_seed=seeds.shard_seed, deterministic=True),
        _ShardSamples(by_url, storage_options, read_retry or ReadRetry(), verify),
    ]
    if shuffle_buffer > 1:
        stages.append(wds.pipelinefilter(_shuffled)(shuffle_buffer, seeds))
    stages += [
        wds.pipelinefilter(_train_crops)(crop_size, seeds, geometry, _load_pool(mask_pool, storage_options)),
        wds.batched(batch_size, collation_fn=_collate_uint8, partial=False),
    ]
    pipeline = wds.DataPipeline(*stages)
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
class _ExactSamples:
    """Every sample of this rank's and worker's slice of the shard list, once, in shard order."""

    shards: list[ShardRef]
    rank: int
    world_size: int
    crop_size: int | None
    storage_options: StorageOptionsLike
    retry: ReadRetry
    verify: Verify

    def __call__(self) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        worker, num_workers = _worker()
        for ref in self.shards[self.rank :: self.world_size][worker::num_workers]:
            for raw in _read_shard(ref, self.storage_options, _reraise, self.retry, self.verify):
                sample = decode_sample(raw)
                image, mask = sample.image, sample.mask
                if self.crop_size is not None:
                    image, mask = center_crop(image, mask, self.crop_size)
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
        _ExactSamples(refs, rank, world_size, crop_size, storage_options, read_retry or ReadRetry(), verify),
        wds.batched(batch_size, collation_fn=_collate_eval, partial=True),
    )
    loader = wds.WebLoader(pipeline, batch_size=None, num_workers=num_workers)
    return EvalLoader(loader)
