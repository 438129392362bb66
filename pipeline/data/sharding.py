"""The shard job: source images -> WebDataset tar shards with precomputed masks, plus their manifest.

Shape of a run (:func:`run_shard_job`):

1. list the source (sorted, unique keys), keep only new items for an incremental version, apply ``limit``;
2. plan shards deterministically: the i-th block of ``samples_per_shard`` items becomes ``shard-%06d.tar``
   (a file list's missing images counted first: too many fail the job here);
3. run ONE Ray task per shard (:func:`write_shard`), at most ``max_in_flight`` at a time. A task first checks
   whether its shard is already published and verifies (the ``.tar.json`` sidecar records the plan's
   fingerprint, size and sha256); if so it returns the recorded result, otherwise it writes the shard to a
   temporary name, publishes it atomically and then publishes the sidecar;
4. check the share of rejected inputs, regroup short shards into full ones (see below);
5. write the key list (watermark) and ``manifest.json`` atomically.

Everything a shard holds is a function of the config and the source bytes: tar headers carry fixed times
and owners, member order is fixed, masks come from ``(seed, key)``. So a re-run after a crash skips the
finished shards, rewrites the others identically, and ends with byte-identical shards and manifest
(creation time aside).

Each sample is ``KEY.jpg`` (RGB JPEG), ``KEY.mask.png`` (8-bit gray, 255 = hole, image-sized) and ``KEY.json``
(source path, label, size, hole ratio, mask generator + parameters + seed). Bad inputs are listed in the
manifest with a reason and skipped. Shards still hold ``samples_per_shard`` samples each (the last excepted):
the samples of shards left short by rejections are regrouped, by copying their members (no second decode),
into full shards numbered after the planned ones (:func:`fill_plans`), a function of the written shards alone,
so determinism and resume hold; the short shards are deleted once the manifest is published. A job in which
every input, or more than ``max_rejected_fraction`` of them, is rejected fails with one line counting the
reasons (for a file list whose images are missing: the ``--root`` that finds them) and publishes no manifest;
missing files of a file list are caught from its listing, before any task runs.

Eval sets (``eval.enabled``) come from a validation split: images are centre-cropped to ``store_size``
squared, and each item gets a target hole-ratio bucket (round-robin over the buckets still short); its mask
is redrawn with derived seeds until it lands in that bucket. Buckets left short by rejected images are
topped up by further rounds over the next items, so every bucket ends with exactly ``per_bucket`` samples
when the source allows it. An eval set is identified by its manifest hash.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Annotated, Any, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.raycluster import ensure_ray
from pipeline.buckets import HOLE_RATIO_BUCKETS, bucket_name
from pipeline.config import Config
from pipeline.paths import LocalPath, OutputPathStr, resolve_config_paths
from pipeline.fsutil import (
    StorageOptions,
    atomic_write,
    join_url,
    open_url,
    parent_url,
    protocol_of,
    publish_bytes,
    read_bytes,
    sha256_of_url,
    size_of_url,
    url_to_fs,
)
from pipeline.data.imageops import DEFAULT_MAX_PIXELS, BadImageError, encode_mask_png, prepare_image
from pipeline.data.manifest import (
    HoleRatioHistogram,
    Manifest,
    ParentRef,
    RejectedInput,
    ShardEntry,
    SourceDescription,
    Watermark,
    canonical_json,
    combine_histograms,
    load_manifest,
    manifest_hash,
    manifest_url_for,
    read_keys,
    write_keys,
    write_manifest,
)
from pipeline.data.masks import MaskSpec, describe, hole_ratio, make_mask
from pipeline.data.sources import SourceItem, SourceReader, SourceSpec, list_source, new_items, suggest_root

__all__ = [
    "EvalSettings",
    "ShardJobConfig",
    "ShardJobResult",
    "ShardPlan",
    "ShardResult",
    "derive_mask_seed",
    "plan_shards",
    "run_shard_job",
    "shard_name",
    "write_shard",
]

log = logging.getLogger("holefill.sharding")

# Bump when the bytes a shard task writes for the same inputs change (it invalidates old sidecars).
# 2: JPEGs decoded at the DCT scale that covers the target (no second resize); masks PNG rows unfiltered.
SHARD_FORMAT = 2
# Tar header fields are fixed so that equal inputs give byte-identical shards on every run and host.
_TAR_MTIME = 0
_TAR_MODE = 0o644


class EvalSettings(Config):
    """Pinned evaluation set: ``per_bucket`` samples in each hole-ratio bucket."""

    enabled: bool = False
    per_bucket: int = Field(default=100, ge=1)
    buckets: tuple[tuple[float, float], ...] = HOLE_RATIO_BUCKETS
    max_attempts: int = Field(default=500, ge=1, description="mask draws per item before it is given up")

    @field_validator("buckets")
    @classmethod
    def _valid_buckets(cls, buckets: tuple[tuple[float, float], ...]) -> tuple[tuple[float, float], ...]:
        if not buckets:
            raise ValueError("at least one bucket is needed")
        for lo, hi in buckets:
            if not 0.0 <= lo < hi <= 1.0:
                raise ValueError(f"bucket ({lo}, {hi}] must satisfy 0 <= lo < hi <= 1")
        return buckets


class ShardJobConfig(Config):
    """Everything the shard job needs; validated before any Ray resource is requested."""

    source: SourceSpec
    out: OutputPathStr = Field(min_length=1, description="dataset folder (local path or URL) for shards and manifest")
    dataset_version: str = Field(default="1", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    samples_per_shard: int = Field(default=1000, ge=1)
    masks: MaskSpec = Field(default_factory=MaskSpec)
    seed: int = Field(default=0, ge=0)
    store_size: int = Field(default=256, ge=32, le=8192)
    center_crop: bool = False
    jpeg_quality: int = Field(default=95, ge=1, le=100)
    jpeg_subsampling: Literal["4:4:4", "4:2:2", "4:2:0"] = "4:4:4"
    max_pixels: int = Field(default=DEFAULT_MAX_PIXELS, ge=1, description="decompression-bomb guard")
    eval: EvalSettings = Field(default_factory=EvalSettings)
    limit: int | None = Field(default=None, ge=1, description="use only the first N items (sorted by key)")
    parent: Annotated[str | None, LocalPath()] = Field(default=None, description="manifest of the version this one extends")
    incremental_by: Literal["keys", "mtime"] = "keys"
    storage_options: StorageOptions = Field(default_factory=StorageOptions)
    num_cpus: float = Field(default=1.0, gt=0, description="CPUs reserved per shard task")
    max_in_flight: int = Field(default=0, ge=0, description="shard tasks queued at once; 0 = 2 x cluster CPUs")
    max_rejected_fraction: float = Field(
        default=0.5, ge=0.0, le=1.0,
        description="fail, publishing no manifest, when more than this share of the inputs is rejected",
    )
    verify: Literal["sha256", "size"] = Field(
        default="sha256", description="how a re-run checks an existing shard before skipping it"
    )

    @model_validator(mode="before")
    @classmethod
    def _eval_sets_are_cropped(cls, data: Any) -> Any:
        # Eval images are centre-cropped squares; make that the default in eval mode, and refuse an
        # explicit contradiction instead of silently writing a different set.
        if isinstance(data, dict):
            evaluation = data.get("eval")
            if isinstance(evaluation, dict):
                enabled = evaluation.get("enabled", False)
            else:
                enabled = getattr(evaluation, "enabled", False)
            if enabled:
                if data.get("center_crop") is False:
                    raise ValueError("eval sets are centre-cropped: center_crop cannot be false with eval.enabled")
                data = {**data, "center_crop": True}
        return data

    @model_validator(mode="after")
    def _eval_has_no_parent(self) -> "ShardJobConfig":
        if self.eval.enabled and self.parent is not None:
            raise ValueError("eval sets are pinned: parent (incremental versions) applies to training sets only")
        return self

    def recorded(self) -> dict[str, Any]:
        """The config as stored in the manifest: no secrets, no output location (a copy keeps its hash), no
        execution-only settings (the same data sharded on another cluster has the same hash)."""
        return self.model_dump(mode="json", exclude={"out", "storage_options", "num_cpus", "max_in_flight", "verify",
                                                     "max_rejected_fraction"})


def shard_name(index: int) -> str:
    """File name of shard ``index``: ``shard-000042.tar``."""
    return f"shard-{index:06d}.tar"


def derive_mask_seed(seed: int, attempt: int) -> int:
    """Seed of the ``attempt``-th mask draw of an eval item (attempt 0 is ``seed`` itself)."""
    if attempt == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}:{attempt}".encode(), digest_size=8, person=b"holefill.retry").digest()
    return int.from_bytes(digest, "little") >> 1  # non-negative 63-bit


@dataclass(frozen=True)
class ShardPlan:
    """One shard's inputs, in write order; ``targets`` holds each item's bucket for eval sets."""

    index: int
    items: tuple[SourceItem, ...]
    targets: tuple[str, ...] | None = None

    @property
    def name(self) -> str:
        return shard_name(self.index)


class ShardResult(BaseModel):
    """What a shard task reports, and what its ``.tar.json`` sidecar records (timings excepted)."""

    model_config = ConfigDict(extra="forbid")

    index: int
    name: str
    fingerprint: str
    planned: int
    samples: int
    bytes: int
    sha256: str
    keys: list[str]
    rejected: list[RejectedInput]
    histogram: HoleRatioHistogram
    bucket_counts: dict[str, int] = {}
    reused: bool = False
    timings: dict[str, float] = {}

    def sidecar(self) -> bytes:
        return (canonical_json(self.model_dump(mode="json", exclude={"reused", "timings"})) + "\n").encode()


def _task_settings(config: ShardJobConfig) -> dict[str, Any]:
    """The config fields that determine a shard's bytes (source identity lives in the item list)."""
    return {
        "format": SHARD_FORMAT,
        "masks": describe(config.masks),
        "seed": config.seed,
        "store_size": config.store_size,
        "center_crop": config.center_crop,
        "jpeg_quality": config.jpeg_quality,
        "jpeg_subsampling": config.jpeg_subsampling,
        "max_pixels": config.max_pixels,
        "eval": config.eval.model_dump(mode="json") if config.eval.enabled else None,
    }


def plan_fingerprint(plan: ShardPlan, config: ShardJobConfig) -> str:
    """sha256 identifying what shard ``plan`` must contain: settings plus each item's identity."""
    items = [[i.key, i.path, i.label, i.size, i.mtime, i.offset] for i in plan.items]
    payload = {"settings": _task_settings(config), "items": items, "targets": plan.targets, "name": plan.name}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


def plan_shards(
    items: Sequence[SourceItem], samples_per_shard: int, *, first_index: int = 0,
    targets: Sequence[str] | None = None,
) -> list[ShardPlan]:
    """Cut sorted ``items`` into consecutive blocks of ``samples_per_shard`` (the last may be shorter)."""
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if targets is not None and len(targets) != len(items):
        raise ValueError("targets must have one bucket per item")
    plans = []
    for number, start in enumerate(range(0, len(items), samples_per_shard)):
        stop = start + samples_per_shard
        plans.append(
            ShardPlan(
                index=first_index + number,
                items=tuple(items[start:stop]),
                targets=tuple(targets[start:stop]) if targets is not None else None,
            )
        )
    return plans


# ---------------------------------------------------------------------------------------------- shard task


class _HashingWriter:
    """Write-through file wrapper that hashes and counts the bytes (no second read of the shard)."""

    def __init__(self, handle: IO[bytes]):
        self._handle = handle
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        self._handle.write(data)
        return len(data)

    def flush(self) -> None:
        self._handle.flush()


_TAR_NAME_FIELD = 100
_TAR_MAX_PLAIN_SIZE = 8**11  # the 12-byte octal size field; larger sizes need tarfile's base-256 form


class _TarAppender:
    """Appends regular files to a binary stream as a GNU tar: byte for byte what ``tarfile`` writes.

    ``tarfile``'s stream mode copies every member through a growing ``bytes`` buffer and builds each
    header field by field, which costs more than hashing and writing the data; here a header is a copy
    of one template header with the name, size and checksum patched in, and the data is written as is.
    Names longer than the 100-byte header field go through ``tarfile`` itself (a GNU long-name member).
    """

    def __init__(self, sink: IO[bytes] | _HashingWriter) -> None:
        self._sink = sink
        self._offset = 0
        self._template = self._tarfile_header("", 0)

    @staticmethod
    def _tarfile_header(name: str, size: int) -> bytes:
        info = tarfile.TarInfo(name)
        info.size = size
        info.mtime = _TAR_MTIME
        info.mode = _TAR_MODE
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")

    def _header(self, name: str, size: int) -> bytes:
        encoded = name.encode("utf-8", "surrogateescape")
        if len(encoded) > _TAR_NAME_FIELD or size >= _TAR_MAX_PLAIN_SIZE:
            return self._tarfile_header(name, size)
        header = bytearray(self._template)
        header[: len(encoded)] = encoded
        header[124:136] = b"%011o\0" % size
        header[148:156] = b"        "  # the checksum is summed with its own field as spaces
        header[148:155] = b"%06o\0" % sum(header)
        return bytes(header)

    def add(self, name: str, data: bytes) -> None:
        """Append one regular file ``name`` holding ``data``."""
        header = self._header(name, len(data))
        padding = -len(data) % tarfile.BLOCKSIZE
        self._sink.write(header)
        self._sink.write(data)
        if padding:
            self._sink.write(tarfile.NUL * padding)
        self._offset += len(header) + len(data) + padding

    def close(self) -> None:
        """End the archive as ``tarfile`` does: two zero blocks, then zeros up to a full record."""
        end = 2 * tarfile.BLOCKSIZE
        end += -(self._offset + end) % tarfile.RECORDSIZE
        self._sink.write(tarfile.NUL * end)
        self._offset += end


def _mask_for(item_key: str, target: str | None, config: ShardJobConfig, height: int, width: int):
    """``(mask, seed used, attempt)``; for an eval target, the first derived-seed draw in that bucket."""
    if target is None:
        return make_mask(config.masks, config.seed, item_key, height, width), config.seed, 0
    buckets = {bucket_name(b): b for b in config.eval.buckets}
    lo, hi = buckets[target]
    for attempt in range(config.eval.max_attempts):
        seed = derive_mask_seed(config.seed, attempt)
        mask = make_mask(config.masks, seed, item_key, height, width)
        if lo < hole_ratio(mask) <= hi:
            return mask, seed, attempt
    return None, None, config.eval.max_attempts


def _existing_result(name: str, fingerprint: str, config: ShardJobConfig) -> ShardResult | None:
    """The recorded result of published shard ``name`` that still verifies, else ``None`` (rewrite it)."""
    url = join_url(config.out, name)
    try:
        recorded = ShardResult.model_validate_json(read_bytes(url + ".json", config.storage_options))
        if recorded.fingerprint != fingerprint or size_of_url(url, config.storage_options) != recorded.bytes:
            return None
        if config.verify == "sha256" and sha256_of_url(url, config.storage_options) != recorded.sha256:
            return None
    except (FileNotFoundError, ValueError):
        return None
    return recorded.model_copy(update={"reused": True})


def write_shard(plan: ShardPlan, config: ShardJobConfig) -> ShardResult:
    """Write (or reuse, when it exists and verifies) one shard; returns its stats. Runs as a Ray task.

    Memory stays flat in the shard size: samples are read, encoded and streamed into the tar one at a time.
    """
    fingerprint = plan_fingerprint(plan, config)
    existing = _existing_result(plan.name, fingerprint, config)
    if existing is not None:
        return existing

    url = join_url(config.out, plan.name)
    # CPU seconds per stage (process time, not wall clock: a busy host must not skew the split).
    timings = {"read": 0.0, "prepare": 0.0, "mask": 0.0, "mask_png": 0.0, "write": 0.0}
    mask_desc = describe(config.masks)
    rejected: list[RejectedInput] = []
    keys: list[str] = []
    ratios: list[float] = []
    bucket_counts: dict[str, int] = {}
    targets = plan.targets or (None,) * len(plan.items)

    with SourceReader(config.storage_options) as reader, atomic_write(url, config.storage_options) as handle:
        sink = _HashingWriter(handle)
        archive = _TarAppender(sink)
        for item, target in zip(plan.items, targets):
            clock = time.process_time()
            try:
                data = reader.read(item)
            except FileNotFoundError:
                rejected.append(RejectedInput(key=item.key, source=item.path, reason="missing"))
                continue
            except (OSError, EOFError) as exc:
                rejected.append(RejectedInput(key=item.key, source=item.path, reason="unreadable", detail=str(exc)))
                continue
            timings["read"] += (now := time.process_time()) - clock
            try:
                image = prepare_image(
                    data,
                    store_size=config.store_size,
                    center_crop=config.center_crop,
                    max_pixels=config.max_pixels,
                    quality=config.jpeg_quality,
                    subsampling=config.jpeg_subsampling,
                )
            except BadImageError as exc:
                rejected.append(
                    RejectedInput(key=item.key, source=item.path, reason=exc.reason, detail=exc.detail)
                )
                continue
            finally:
                timings["prepare"] += (clock := time.process_time()) - now
            mask, mask_seed, attempt = _mask_for(item.key, target, config, image.height, image.width)
            timings["mask"] += (now := time.process_time()) - clock
            if mask is None:
                rejected.append(
                    RejectedInput(
                        key=item.key, source=item.path, reason="no mask in bucket",
                        detail=f"{target} after {attempt} draws",
                    )
                )
                continue
            ratio = hole_ratio(mask)
            png = encode_mask_png(mask)
            timings["mask_png"] += (clock := time.process_time()) - now
            meta: dict[str, Any] = {
                "key": item.key,
                "source": item.path,
                "label": item.label,
                "width": image.width,
                "height": image.height,
                "hole_ratio": ratio,
                "mask": {**mask_desc, "seed": mask_seed},
                "source_format": image.source_format,
                "source_size": list(image.source_size),
            }
            if target is not None:
                meta["bucket"] = target
                meta["mask"]["attempt"] = attempt
                bucket_counts[target] = bucket_counts.get(target, 0) + 1
            archive.add(f"{item.key}.jpg", image.jpeg)
            archive.add(f"{item.key}.mask.png", png)
            archive.add(f"{item.key}.json", (canonical_json(meta) + "\n").encode())
            timings["write"] += time.process_time() - clock
            keys.append(item.key)
            ratios.append(ratio)
        archive.close()

    result = ShardResult(
        index=plan.index,
        name=plan.name,
        fingerprint=fingerprint,
        planned=len(plan.items),
        samples=len(keys),
        bytes=sink.size,
        sha256=sink.digest.hexdigest(),
        keys=keys,
        rejected=rejected,
        histogram=HoleRatioHistogram.of(ratios),
        bucket_counts=bucket_counts,
        timings=timings,
    )
    # The sidecar goes last: a shard without a matching sidecar is simply rewritten by the next run.
    publish_bytes(url + ".json", result.sidecar(), config.storage_options)
    return result


@dataclass(frozen=True)
class FillPlan:
    """A shard made of samples already written to short shards: ``sources`` is ``(shard name, keys)`` in order."""

    index: int
    sources: tuple[tuple[str, tuple[str, ...]], ...]

    @property
    def name(self) -> str:
        return shard_name(self.index)

    @property
    def keys(self) -> list[str]:
        return [key for _, keys in self.sources for key in keys]


def fill_plans(results: Sequence[ShardResult], samples_per_shard: int, first_index: int) -> list[FillPlan]:
    """Plans that regroup the samples of short shards into full ones (the last may stay short).

    Nothing to do (an empty list) when at most the final shard is short. Otherwise every short shard's samples,
    in shard and key order, are cut into blocks of ``samples_per_shard``: a function of the written shards
    only, so a re-run plans the same shards.
    """
    short = [result for result in results if result.samples < samples_per_shard]
    if not short or (len(short) == 1 and short[0] is results[-1]):
        return []
    pool = [(result.name, key) for result in short for key in result.keys]
    plans = []
    for number, start in enumerate(range(0, len(pool), samples_per_shard)):
        sources: list[tuple[str, list[str]]] = []
        for name, key in pool[start : start + samples_per_shard]:
            if not sources or sources[-1][0] != name:
                sources.append((name, []))
            sources[-1][1].append(key)
        plans.append(FillPlan(first_index + number, tuple((name, tuple(keys)) for name, keys in sources)))
    return plans


def _fill_fingerprint(plan: FillPlan, sources: dict[str, ShardResult]) -> str:
    payload = {"format": SHARD_FORMAT, "name": plan.name,
               "sources": [[name, sources[name].sha256, list(keys)] for name, keys in plan.sources]}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


def write_fill_shard(plan: FillPlan, sources: dict[str, ShardResult], config: ShardJobConfig) -> ShardResult:
    """Write (or reuse) shard ``plan`` by copying its samples' members out of the short shards. A Ray task.

    Samples are copied as written (no second decode or mask draw), so the result is byte-stable and cheap.
    """
    fingerprint = _fill_fingerprint(plan, sources)
    existing = _existing_result(plan.name, fingerprint, config)
    if existing is not None:
        return existing
    url = join_url(config.out, plan.name)
    ratios: list[float] = []
    bucket_counts: dict[str, int] = {}
    with atomic_write(url, config.storage_options) as handle:
        sink = _HashingWriter(handle)
        archive = _TarAppender(sink)
        for name, keys in plan.sources:
            wanted = set(keys)
            with open_url(join_url(config.out, name), "rb", config.storage_options) as source:
                for member, data in _tar_members(source):
                    if member.split(".", 1)[0] not in wanted:
                        continue
                    archive.add(member, data)
                    if member.endswith(".json"):
                        meta = json.loads(data)
                        ratios.append(float(meta["hole_ratio"]))
                        if "bucket" in meta:
                            bucket_counts[meta["bucket"]] = bucket_counts.get(meta["bucket"], 0) + 1
        archive.close()
    result = ShardResult(
        index=plan.index, name=plan.name, fingerprint=fingerprint, planned=len(plan.keys), samples=len(plan.keys),
        bytes=sink.size, sha256=sink.digest.hexdigest(), keys=plan.keys, rejected=[],
        histogram=HoleRatioHistogram.of(ratios), bucket_counts=bucket_counts,
    )
    publish_bytes(url + ".json", result.sidecar(), config.storage_options)
    return result


def _tar_members(handle: IO[bytes]):
    """``(name, bytes)`` of each regular member of a tar stream, in order."""
    with tarfile.open(fileobj=handle, mode="r|") as archive:
        for member in archive:
            if member.isfile():
                yield member.name, archive.extractfile(member).read()


# ---------------------------------------------------------------------------------------------- driver


@dataclass
class ShardJobResult:
    """Outcome of :func:`run_shard_job`."""

    manifest_url: str
    manifest: Manifest
    manifest_hash: str
    shards_written: int
    shards_reused: int
    results: list[ShardResult] = field(default_factory=list)


class _Progress:
    """Samples done, samples/s and ETA in the job log, updated as shard tasks complete."""

    def __init__(self, total_items: int, emit: Callable[[str], None]):
        self.total = total_items
        self.done = 0
        self.fresh = 0
        self.started = time.monotonic()
        self.emit = emit

    def update(self, result: ShardResult, shards_done: int, shards_total: int) -> None:
        self.done += result.planned
        if not result.reused:
            self.fresh += result.planned
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.fresh / elapsed
        remaining = self.total - self.done
        eta = f"{remaining / rate:.0f}s" if rate > 0 else "?"
        state = "reused" if result.reused else f"{result.samples} samples, {len(result.rejected)} rejected"
        self.emit(
            f"shard {result.name} {state} | shards {shards_done}/{shards_total} | "
            f"items {self.done}/{self.total} | {rate:.1f} samples/s | ETA {eta}"
        )


def _run_plans(
    plans: Sequence[ShardPlan | FillPlan], config: ShardJobConfig, emit: Callable[[str], None], progress: _Progress,
    shards_total: int, shards_done_before: int, writer: Callable[..., ShardResult] = write_shard,
    *extra_args: Any,
) -> list[ShardResult]:
    """Run one Ray task ``writer(plan, *extra_args, config)`` per plan, bounded concurrency; results in plan order."""
    if not plans:
        return []
    ray = ensure_ray()
    task = ray.remote(writer).options(num_cpus=config.num_cpus, max_retries=2)
    extra_refs = [ray.put(arg) for arg in extra_args]
    config_ref = ray.put(config)
    limit = config.max_in_flight or max(2, 2 * int(ray.cluster_resources().get("CPU", 1) / config.num_cpus))
    pending: dict[Any, ShardPlan] = {}
    results: dict[int, ShardResult] = {}
    queue = list(plans)
    done = shards_done_before
    while queue or pending:
        while queue and len(pending) < limit:
            plan = queue.pop(0)
            pending[task.remote(plan, *extra_refs, config_ref)] = plan
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            pending.pop(ref)
            result = ray.get(ref)
            results[result.index] = result
            done += 1
            progress.update(result, done, shards_total)
    return [results[plan.index] for plan in plans]


def _round_robin_targets(needs: dict[str, int]) -> list[str]:
    """Bucket names interleaved, each repeated as often as it still needs samples."""
    remaining = dict(needs)
    order: list[str] = []
    while any(remaining.values()):
        for name in list(remaining):
            if remaining[name] > 0:
                order.append(name)
                remaining[name] -= 1
    return order


def _relative_url(folder: str, target: str) -> str:
    """``target`` relative to ``folder`` when both are on one filesystem (and S3 bucket), else absolute."""
    if protocol_of(folder) != protocol_of(target):
        return target
    strip = lambda url: url.partition("://")[2] if "://" in url else url  # noqa: E731
    a, b = strip(folder).rstrip("/"), strip(target)
    if protocol_of(folder) != "file" and a.split("/", 1)[0] != b.split("/", 1)[0]:
        return target
    return posixpath.relpath(b, a)


def run_shard_job(config: ShardJobConfig, emit: Callable[[str], None] | None = None) -> ShardJobResult:
    """Shard ``config.source`` into ``config.out`` and publish the manifest; safe to re-run after a crash."""
    emit = emit or log.info
    config = config.model_copy(deep=True)
    for change in resolve_config_paths(config):  # the shard tasks run in other directories than this driver
        emit(f"path {change.key}: {change.given} -> {change.resolved}")
    listing = list_source(config.source, config.storage_options)
    items = listing.items
    parent: Manifest | None = None
    if config.parent is not None:
        parent = load_manifest(config.parent, config.storage_options)
        if manifest_url_for(config.out) == parent.location:
            raise ValueError("an incremental version must be written to a new folder, not over its parent")
        items = new_items(items, parent, config.storage_options, by=config.incremental_by)
    if config.limit is not None:
        items = items[: config.limit]
    first_index = len(parent.shards) if parent is not None else 0
    emit(f"source {listing.description.kind} {config.source.url}: {listing.description.items} items, "
         f"{len(items)} to shard into {config.out}")
    # A file list's root is listed up front: images it lacks fail the job before any task runs.
    if config.source.resolved_kind == "file_list" and config.source.stat:
        missing = [RejectedInput(key=i.key, source=i.path, reason="missing") for i in items if i.size is None]
        check_rejections(missing, len(items), config)

    short: list[ShardResult] = []
    if config.eval.enabled:
        results, attempted = _run_eval_rounds(items, config, emit)
        check_rejections([r for result in results for r in result.rejected], len(attempted), config)
    else:
        plans = plan_shards(items, config.samples_per_shard, first_index=first_index)
        progress = _Progress(len(items), emit)
        results = _run_plans(plans, config, emit, progress, len(plans), 0)
        attempted = items
        check_rejections([r for result in results for r in result.rejected], len(attempted), config)
        results, short = _fill_short_shards(results, config, emit, first_index + len(plans))

    manifest = _build_manifest(config, listing.description, attempted, results, parent, superseded=short)
    manifest_url = write_manifest(manifest, config.out, config.storage_options)
    _remove_shards([result.name for result in short], config)  # superseded by the fill shards
    digest = manifest_hash(manifest)
    reused = sum(r.reused for r in results)
    emit(f"manifest {manifest_url} sha256 {digest} ({manifest.total_samples} samples in "
         f"{len(manifest.shards)} shards, {len(manifest.rejected)} rejected; {reused} shards reused)")
    return ShardJobResult(manifest_url, manifest, digest, len(results) - reused, reused, results)


def check_rejections(rejected: Sequence[RejectedInput], attempted: int, config: ShardJobConfig) -> None:
    """Raise a one-line ``ValueError`` when every input, or more than ``max_rejected_fraction``, was rejected.

    The message counts the reasons and, when images of a file list are missing, names the ``--root`` that
    would find them. Called before the manifest is written, so a failed job publishes none.
    """
    if not rejected or (len(rejected) < attempted and len(rejected) <= config.max_rejected_fraction * attempted):
        return
    counts: dict[str, int] = {}
    for entry in rejected:
        counts[entry.reason] = counts.get(entry.reason, 0) + 1
    reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(counts.items(), key=lambda kv: -kv[1]))
    message = (f"{len(rejected)} of {attempted} inputs rejected ({reasons}), more than "
               f"max_rejected_fraction={config.max_rejected_fraction:g}; no manifest published")
    if counts.get("missing") and config.source.resolved_kind == "file_list":
        first = next(entry for entry in rejected if entry.reason == "missing")
        root = config.source.root or parent_url(config.source.url)
        found = suggest_root(config.source, first.source, config.storage_options)
        hint = f"--root {found} finds them" if found else "point --root at the folder that holds them"
        message += f": the listed images are not under {root} (e.g. {first.source}); {hint}"
    raise ValueError(message)


def _fill_short_shards(
    results: list[ShardResult], config: ShardJobConfig, emit: Callable[[str], None], first_index: int
) -> tuple[list[ShardResult], list[ShardResult]]:
    """``(the shards to publish, the short shards they replace)``: equal counts despite rejected inputs."""
    plans = fill_plans(results, config.samples_per_shard, first_index)
    if not plans:
        return results, []
    short = [result for result in results if result.samples < config.samples_per_shard]
    emit(f"regrouping the {sum(r.samples for r in short)} samples of {len(short)} short shards into {len(plans)} "
         f"shards of {config.samples_per_shard}")
    sources = {result.name: result for result in short}
    progress = _Progress(sum(len(plan.keys) for plan in plans), emit)
    filled = _run_plans(plans, config, emit, progress, len(plans), 0, write_fill_shard, sources)
    full = [result for result in results if result.samples >= config.samples_per_shard]
    return full + filled, short


def _remove_shards(names: Sequence[str], config: ShardJobConfig) -> None:
    """Delete shards (and sidecars) that no manifest lists; a later re-run would write them again identically."""
    if not names:
        return
    fs, _ = url_to_fs(config.out, config.storage_options)
    for name in names:
        for url in (join_url(config.out, name), join_url(config.out, name) + ".json"):
            path = url_to_fs(url, config.storage_options)[1]
            if fs.exists(path):
                fs.rm(path)


def _run_eval_rounds(
    items: Sequence[SourceItem], config: ShardJobConfig, emit: Callable[[str], None]
) -> tuple[list[ShardResult], list[SourceItem]]:
    """Fill every bucket with ``per_bucket`` samples, topping up shortfalls from the next items."""
    needs = {bucket_name(b): config.eval.per_bucket for b in config.eval.buckets}
    planned_total = sum(needs.values())
    progress = _Progress(planned_total, emit)
    results: list[ShardResult] = []
    cursor, next_index = 0, 0
    while any(needs.values()) and cursor < len(items):
        targets = _round_robin_targets(needs)[: len(items) - cursor]
        chunk = items[cursor : cursor + len(targets)]
        cursor += len(chunk)
        plans = plan_shards(chunk, config.samples_per_shard, first_index=next_index, targets=targets)
        next_index += len(plans)
        if results:
            progress.total += len(chunk)
            emit(f"eval top-up round: {len(chunk)} more items for {sum(needs.values())} missing samples")
        round_results = _run_plans(plans, config, emit, progress, next_index, len(results))
        results.extend(round_results)
        for result in round_results:
            for name, count in result.bucket_counts.items():
                needs[name] -= count
    short = {name: need for name, need in needs.items() if need > 0}
    if short:
        emit(f"WARNING: eval set is unbalanced, source ran out of usable items; missing per bucket: {short}")
    return results, list(items[:cursor])


def _build_manifest(
    config: ShardJobConfig,
    source: SourceDescription,
    attempted: Sequence[SourceItem],
    results: Sequence[ShardResult],
    parent: Manifest | None,
    superseded: Sequence[ShardResult] = (),
) -> Manifest:
    """The manifest of ``results``; ``superseded`` short shards (regrouped into others) add only their rejects."""
    shards: list[ShardEntry] = []
    rejected: list[RejectedInput] = []
    histograms: list[HoleRatioHistogram] = []
    keys: set[str] = {item.key for item in attempted}
    mtimes = [item.mtime for item in attempted if item.mtime is not None]
    parent_ref = None
    if parent is not None:
        folder = parent_url(manifest_url_for(config.out))
        shards += [
            entry.model_copy(update={"url": _relative_url(folder, url)})
            for entry, url in zip(parent.shards, parent.shard_urls())
        ]
        rejected += parent.rejected
        histograms.append(parent.hole_ratio_histogram)
        if parent.keys_url() is not None:
            keys |= read_keys(parent.keys_url(), config.storage_options)
        if parent.watermark.max_mtime is not None:
            mtimes.append(parent.watermark.max_mtime)
        parent_ref = ParentRef(
            url=_relative_url(folder, parent.location or ""),
            dataset_version=parent.dataset_version,
            manifest_hash=manifest_hash(parent),
        )
    for result in superseded:
        rejected += result.rejected
    for result in results:
        # A shard whose every input was rejected is still published, but it is not worth listing.
        if result.samples:
            shards.append(ShardEntry(url=result.name, samples=result.samples, bytes=result.bytes, sha256=result.sha256))
        rejected += result.rejected
        histograms.append(result.histogram)
    keys_sha = write_keys(keys, join_url(config.out, "keys.txt.gz"), config.storage_options)
    eval_buckets = None
    if config.eval.enabled:
        eval_buckets = {bucket_name(b): 0 for b in config.eval.buckets}
        for result in results:
            for name, count in result.bucket_counts.items():
                eval_buckets[name] += count
    return Manifest(
        kind="eval" if config.eval.enabled else "train",
        dataset_version=config.dataset_version,
        source=source,
        config=config.recorded(),
        shards=shards,
        total_samples=sum(s.samples for s in shards),
        total_bytes=sum(s.bytes for s in shards),
        rejected=rejected,
        hole_ratio_histogram=combine_histograms(histograms),
        eval_buckets=eval_buckets,
        watermark=Watermark(keys_count=len(keys), max_mtime=max(mtimes) if mtimes else None, keys_sha256=keys_sha),
        parent=parent_ref,
    )
