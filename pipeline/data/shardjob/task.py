"""One shard task: read a plan's inputs, encode each into a sample, stream them into a tar, publish it.

A task first checks whether its shard is already written and verifies against its ``.tar.json`` sidecar (plan
fingerprint, size, sha256); if so it returns the recorded result. Otherwise it writes the shard to a temporary
name, publishes it atomically, then publishes the sidecar (a shard without a matching sidecar is rewritten by
the next run). Memory stays flat in the shard size: samples are read, encoded and streamed one at a time.

Reads are retried (:func:`pipeline.fsutil.with_retries`) while they fail transiently; only inputs that are bad
in themselves (missing, over ``max_input_bytes`` (checked before reading, and the read bounded), resolving outside
the source root, empty, not an image, truncated image data, decompression bombs, no mask in the eval
bucket) become rejections. A read that kept failing raises :class:`pipeline.fsutil.TransientReadError`: the
task fails without publishing its shard or sidecar, so nothing of the failure is recorded anywhere.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from pipeline.buckets import bucket_of
from pipeline.redaction import redact
from pipeline.fsutil import (
    atomic_write,
    join_url,
    open_url,
    publish_bytes,
    read_bytes,
    sha256_of_url,
    size_of_url,
    with_retries,
)
from pipeline.data.imageops import BadImageError, encode_mask_png, prepare_image
from pipeline.data.manifest import HoleRatioHistogram, RejectedInput, canonical_json
from pipeline.data.masks.generators import describe, hole_ratio, make_mask
from pipeline.data.shardjob.config import ShardJobConfig
from pipeline.data.shardjob.plan import (
    FillPlan,
    ShardPlan,
    ShardResult,
    derive_mask_seed,
    fill_fingerprint,
    plan_fingerprint,
)
from pipeline.data.sources import InputTooLargeError, OutsideRootError, SourceItem, SourceReader
from pipeline.data.tario import HashingWriter, TarAppender, tar_members

__all__ = ["EncodedSample", "encode_sample", "write_fill_shard", "write_shard"]

_STAGES = ("read", "prepare", "mask", "mask_png", "write")


@dataclass(frozen=True)
class EncodedSample:
    """One sample ready for the tar: its members in write order, its hole ratio and eval bucket."""

    members: tuple[tuple[str, bytes], ...]
    hole_ratio: float
    bucket: str | None


def _mask_for(item_key: str, target: str | None, config: ShardJobConfig, height: int, width: int):
    """``(mask, seed used, attempt)``; for an eval target, the first derived-seed draw in that bucket."""
    if target is None:
        return make_mask(config.masks, config.seed, item_key, height, width), config.seed, 0
    for attempt in range(config.eval.max_attempts):
        seed = derive_mask_seed(config.seed, attempt)
        mask = make_mask(config.masks, seed, item_key, height, width)
        if bucket_of(hole_ratio(mask), config.eval.buckets) == target:  # the one rule evaluation applies too
            return mask, seed, attempt
    return None, None, config.eval.max_attempts


def encode_sample(item: SourceItem, data: bytes, target: str | None, config: ShardJobConfig,
                  timings: dict[str, float] | None = None) -> EncodedSample | RejectedInput:
    """The sample of one input's bytes (``KEY.jpg``, ``KEY.mask.png``, ``KEY.json``), or why it is rejected.

    ``target`` is the eval bucket the mask must land in (``None`` for training sets). ``timings`` collects CPU
    seconds per stage (process time: a busy host must not skew the split).
    """
    timings = timings if timings is not None else dict.fromkeys(_STAGES, 0.0)
    clock = time.process_time()
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
        return RejectedInput(key=item.key, source=item.path, reason=exc.reason, detail=exc.detail)
    finally:
        timings["prepare"] += (now := time.process_time()) - clock
    mask, mask_seed, attempt = _mask_for(item.key, target, config, image.height, image.width)
    timings["mask"] += (clock := time.process_time()) - now
    if mask is None:
        return RejectedInput(key=item.key, source=item.path, reason="no mask in bucket",
                             detail=f"{target} after {attempt} draws")
    ratio = hole_ratio(mask)
    png = encode_mask_png(mask)
    timings["mask_png"] += time.process_time() - clock
    meta: dict[str, Any] = {
        "key": item.key,
        "source": item.path,
        "label": item.label,
        "width": image.width,
        "height": image.height,
        "hole_ratio": ratio,
        "mask": {**describe(config.masks), "seed": mask_seed},
        "source_format": image.source_format,
        "source_size": list(image.source_size),
    }
    if target is not None:
        meta["bucket"] = target
        meta["mask"]["attempt"] = attempt
    members = ((f"{item.key}.jpg", image.jpeg), (f"{item.key}.mask.png", png),
               (f"{item.key}.json", (canonical_json(meta) + "\n").encode()))
    return EncodedSample(members, ratio, target)


def _existing_result(name: str, fingerprint: str, config: ShardJobConfig) -> ShardResult | None:
    """The recorded result of written shard ``name`` that still verifies, else ``None`` (rewrite it)."""
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


def _member_url(item: SourceItem) -> str:
    """How a read is named in retry warnings and failures (credentials redacted)."""
    return redact(item.url if item.offset is None else f"{item.url}[{item.path}]")


def write_shard(plan: ShardPlan, config: ShardJobConfig) -> ShardResult:
    """Write (or reuse, when it exists and verifies) one shard; returns its stats. Runs as a Ray task."""
    fingerprint = plan_fingerprint(plan, config)
    existing = _existing_result(plan.name, fingerprint, config)
    if existing is not None:
        return existing

    url = join_url(config.out, plan.name)
    timings = dict.fromkeys(_STAGES, 0.0)
    rejected: list[RejectedInput] = []
    keys: list[str] = []
    ratios: list[float] = []
    bucket_counts: dict[str, int] = {}
    targets = plan.targets or (None,) * len(plan.items)

    with SourceReader(config.storage_options, config.max_input_bytes) as reader, \
            atomic_write(url, config.storage_options) as handle:
        sink = HashingWriter(handle)
        archive = TarAppender(sink)
        for item, target in zip(plan.items, targets):
            clock = time.process_time()
            try:
                # Transient failures are retried here; when they persist this raises and the shard is not published.
                data = with_retries(lambda item=item: reader.read(item), _member_url(item), config.read_retry)
            except FileNotFoundError:
                rejected.append(RejectedInput(key=item.key, source=item.path, reason="missing"))
                continue
            except InputTooLargeError as exc:  # known from the listing (nothing read) or the bounded read
                rejected.append(RejectedInput(key=item.key, source=item.path, reason="too large", detail=str(exc)))
                continue
            except OutsideRootError as exc:  # a symlink planted after the listing
                rejected.append(RejectedInput(key=item.key, source=item.path, reason="outside root", detail=str(exc)))
                continue
            finally:
                timings["read"] += time.process_time() - clock
            sample = encode_sample(item, data, target, config, timings)
            if isinstance(sample, RejectedInput):
                rejected.append(sample)
                continue
            clock = time.process_time()
            for name, member in sample.members:
                archive.add(name, member)
            timings["write"] += time.process_time() - clock
            keys.append(item.key)
            ratios.append(sample.hole_ratio)
            if sample.bucket is not None:
                bucket_counts[sample.bucket] = bucket_counts.get(sample.bucket, 0) + 1
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


def _members_of(url: str, keys: set[str], config: ShardJobConfig) -> list[tuple[str, bytes]]:
    """The members of shard ``url`` whose key is in ``keys``, all of them or an error (retried as one read)."""

    def read() -> list[tuple[str, bytes]]:
        with open_url(url, "rb", config.storage_options) as stream:
            found = [(name, data) for name, data in tar_members(stream) if name.split(".", 1)[0] in keys]
        missing = keys - {name.split(".", 1)[0] for name, _ in found}
        if missing:  # a short read looks like a short archive: it is the storage's fault, not the data's
            raise EOFError(f"{url} holds {len(keys) - len(missing)} of the {len(keys)} samples its sidecar lists")
        return found

    return with_retries(read, url, config.read_retry)


def write_fill_shard(plan: FillPlan, sources: dict[str, ShardResult], config: ShardJobConfig) -> ShardResult:
    """Write (or reuse) shard ``plan`` by copying its samples' members out of the short shards. A Ray task.

    Samples are copied as written (no second decode or mask draw), so the result is byte-stable and cheap.
    """
    fingerprint = fill_fingerprint(plan, sources)
    existing = _existing_result(plan.name, fingerprint, config)
    if existing is not None:
        return existing
    url = join_url(config.out, plan.name)
    ratios: list[float] = []
    bucket_counts: dict[str, int] = {}
    with atomic_write(url, config.storage_options) as handle:
        sink = HashingWriter(handle)
        archive = TarAppender(sink)
        for name, keys in plan.sources:
            for member, data in _members_of(join_url(config.out, name), set(keys), config):
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
