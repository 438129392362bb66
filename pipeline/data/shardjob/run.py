"""The shard job: source images -> WebDataset tar shards with precomputed masks, plus their manifest.

Shape of a run (:func:`run_shard_job`):

1. list the source (sorted, unique keys), keep only new items for an incremental version, apply ``limit``;
2. choose where this version goes (:func:`destination`): ``out`` itself, unless ``out`` already holds a
   published version of another plan; then a folder of its own beside it, ``out/version-<fingerprint>``;
3. plan shards deterministically (:mod:`pipeline.data.shardjob.plan`): the i-th block of ``samples_per_shard`` items
   becomes ``shard-%06d.tar`` (a file list's missing images counted first: too many fail the job here);
4. run ONE Ray task per shard (:mod:`pipeline.data.shardjob.driver`, :func:`pipeline.data.shardjob.task.write_shard`),
   at most ``max_in_flight`` at a time. A task first checks whether its shard is already written and verifies
   (the ``.tar.json`` sidecar records the plan's fingerprint, size and sha256); if so it returns the recorded
   result, otherwise it writes the shard to a temporary name, publishes it atomically, then its sidecar;
5. check the share of rejected inputs, regroup short shards into full ones (see below);
6. write the key list (watermark) and ``manifest.json`` atomically (and durably: ``fsync`` of file and folder).

**One job per ``out`` at a time.** The whole job holds the lock ``out/.shardjob.lock`` (:mod:`pipeline.locks`); a job
started while another one lives raises :class:`pipeline.locks.LockBusy` naming it (``jobs/shard_places2.py``
prints it and exits 0). Just before publishing the job checks again that the lock is its own and that ``out``
holds no other plan's manifest; if either fails it publishes nothing (one line).

**A published version is immutable.** A run never writes a file that a published manifest lists with other
bytes: a re-run into a folder whose manifest has the same plan fingerprint (:func:`~pipeline.data.shardjob.plan.
run_fingerprint`: config, inputs and parent) resumes or repairs exactly that version; any other run writes
beside it. So a failed, interrupted or different run leaves every published version verifiable, and each
version's ``keys.txt.gz`` belongs to it (readers check it against the manifest's ``keys_sha256``).

**A failed read is not a bad input.** Reads are retried (S3 client, s3fs, then with backoff and jitter per read,
then the Ray task as a whole); when they keep failing the job stops with :class:`ShardJobError`, one line naming
the object and the error, having published nothing, recorded no rejection and moved no watermark; a re-run
resumes from the shards already written.

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

import contextlib
import logging
import posixpath
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Sequence

from pipeline.buckets import bucket_name
from pipeline.errors import one_line
from pipeline.redaction import redact
from pipeline.fsutil import (
    TransientReadError,
    exists,
    join_url,
    parent_url,
    protocol_of,
    url_to_fs,
    with_retries,
)
from pipeline.locks import Lock, LockSettings, lock_url
from pipeline.paths import resolve_config_paths
from pipeline.data.manifest import (
    HoleRatioHistogram,
    Manifest,
    ManifestError,
    ParentRef,
    RejectedInput,
    ShardEntry,
    SourceDescription,
    Watermark,
    combine_histograms,
    load_manifest,
    manifest_hash,
    manifest_keys,
    manifest_url_for,
    write_keys,
    write_manifest,
)
from pipeline.data.shardjob.config import EvalSetSettings, ShardJobConfig
from pipeline.data.shardjob.driver import Progress, ShardJobError, failure_line, run_tasks
from pipeline.data.shardjob.plan import (
    SHARD_FORMAT,
    FillPlan,
    ShardPlan,
    ShardResult,
    derive_mask_seed,
    fill_plans,
    plan_fingerprint,
    plan_shards,
    round_robin_targets,
    run_fingerprint,
    shard_name,
)
from pipeline.data.shardjob.task import encode_sample, write_fill_shard, write_shard
from pipeline.data.sources import SourceItem, list_source, new_items, suggest_root

__all__ = [
    "SHARD_FORMAT",
    "EvalSetSettings",
    "FillPlan",
    "ShardJobConfig",
    "ShardJobError",
    "ShardJobResult",
    "ShardPlan",
    "ShardResult",
    "check_rejections",
    "derive_mask_seed",
    "destination",
    "encode_sample",
    "fill_plans",
    "plan_fingerprint",
    "plan_shards",
    "run_shard_job",
    "shard_name",
    "write_fill_shard",
    "write_shard",
]

log = logging.getLogger("holefill.sharding")
VERSION_FOLDER_PREFIX = "version-"


@dataclass
class ShardJobResult:
    """Outcome of :func:`run_shard_job`."""

    manifest_url: str
    manifest: Manifest
    manifest_hash: str
    shards_written: int
    shards_reused: int
    results: list[ShardResult] = field(default_factory=list)

def _relative_url(folder: str, target: str) -> str:
    """``target`` relative to ``folder`` when both are on one filesystem (and S3 bucket), else absolute."""
    if protocol_of(folder) != protocol_of(target):
        return target
    strip = lambda url: url.partition("://")[2] if "://" in url else url  # noqa: E731
    a, b = strip(folder).rstrip("/"), strip(target)
    if protocol_of(folder) != "file" and a.split("/", 1)[0] != b.split("/", 1)[0]:
        return target
    return posixpath.relpath(b, a)



def destination(config: ShardJobConfig, fingerprint: str, emit: Callable[[str], None] = log.info) -> str:
    """The folder this run writes: ``config.out`` when it holds no published version or this very one (same
    ``plan_sha256``: resume or repair it), else ``config.out/version-<fingerprint>`` beside it (same rule)."""
    candidates = [config.out, join_url(config.out, VERSION_FOLDER_PREFIX + fingerprint[:16])]
    for candidate in candidates:
        location = manifest_url_for(candidate)
        if not exists(location, config.storage_options):
            return candidate
        try:
            published = load_manifest(location, config.storage_options)
        except ManifestError:
            continue  # unreadable: still somebody's version, never written over
        if published.plan_sha256 == fingerprint:
            return candidate
        if candidate == config.out:
            emit(f"{location} is a published version of another plan (manifest sha256 {manifest_hash(published)}); "
                 f"it stays as it is: this version goes beside it, into {candidates[1]}")
    raise ShardJobError(f"{candidates[-1]} holds a published version of another plan: choose another out")


def run_shard_job(config: ShardJobConfig, emit: Callable[[str], None] | None = None) -> ShardJobResult:
    """Shard ``config.source`` into ``config.out`` and publish the manifest; safe to re-run after a crash.

    Raises :class:`ShardJobError` (one line, nothing published) when storage reads keep failing, and a one-line
    ``ValueError`` when too many inputs are bad (:func:`check_rejections`).
    """
    emit = emit or log.info
    config = config.model_copy(deep=True)
    for change in resolve_config_paths(config):  # the shard tasks run in other directories than this driver
        emit(f"path {change.key}: {redact(change.given)} -> {redact(change.resolved)}")
    # One job at a time per `out` (pipeline.locks): another live job there is LockBusy (the job says so, exit 0).
    lock = Lock(lock_url(config.out, "shardjob"), "shard job", stale_after_s=LockSettings().stale_after_s,
                heartbeat_s=LockSettings().heartbeat_s, storage_options=config.storage_options)
    with lock:
        try:
            return _run(config, emit, lock)
        except TransientReadError as exc:  # a read of the driver's own (listing, manifests, key lists)
            raise ShardJobError(failure_line(exc, "the job's plan")) from None


def _check_still_ours(config: ShardJobConfig, fingerprint: str, lock: Lock) -> None:
    """Just before publishing: the lock is still ours and ``config.out`` holds no other plan's manifest."""
    lock.check()
    location = manifest_url_for(config.out)
    if exists(location, config.storage_options):
        try:
            published = load_manifest(location, config.storage_options)
        except ManifestError:
            published = None
        if published is None or published.plan_sha256 != fingerprint:
            raise ShardJobError(f"{location} was published by another job while this one ran; it stays as it is "
                                "and nothing of this run was published: re-run to write beside it")


def _run(config: ShardJobConfig, emit: Callable[[str], None], lock: Lock) -> ShardJobResult:
    listing = with_retries(lambda: list_source(config.source, config.storage_options), redact(config.source.url),
                           config.read_retry)
    items = listing.items
    refused = list(listing.rejected)  # refused while listing (outside the root, hostile names, collisions): never read
    parent: Manifest | None = None
    if config.parent is not None:
        parent = with_retries(lambda: load_manifest(config.parent, config.storage_options), redact(config.parent),
                              config.read_retry)
        if manifest_url_for(config.out) == parent.location:
            raise ValueError("an incremental version must be written to a new folder, not over its parent")
        items = new_items(items, parent, config.storage_options, by=config.incremental_by)
        known = {(entry.source, entry.reason) for entry in parent.rejected}
        refused = [entry for entry in refused if (entry.source, entry.reason) not in known]  # listed once
    if config.limit is not None:
        items = items[: config.limit]
    first_index = len(parent.shards) if parent is not None else 0
    fingerprint = run_fingerprint(config, items, manifest_hash(parent) if parent is not None else None)
    config = config.model_copy(update={"out": destination(config, fingerprint, emit)})
    emit(f"source {listing.description.kind} {redact(config.source.url)}: {listing.description.items} items, "
         f"{len(items)} to shard into {redact(config.out)}")
    if refused:
        emit(f"{len(refused)} source entries refused while listing ({_reason_counts(refused)}); listed in the manifest")
    # A file list's root is listed up front: images it lacks fail the job before any task runs.
    if config.source.resolved_kind == "file_list" and config.source.stat:
        missing = [RejectedInput(key=i.key, source=i.path, reason="missing") for i in items if i.size is None]
        check_rejections(refused + missing, len(items) + len(refused), config)

    short: list[ShardResult] = []
    if config.eval.enabled:
        results, attempted = _run_eval_rounds(items, config, emit)
        check_rejections(refused + [r for result in results for r in result.rejected], len(attempted) + len(refused),
                         config)
    else:
        plans = plan_shards(items, config.samples_per_shard, first_index=first_index)
        progress = Progress(len(items), emit)
        results = run_tasks(plans, config, progress, len(plans), 0, write_shard)
        attempted = items
        check_rejections(refused + [r for result in results for r in result.rejected], len(attempted) + len(refused),
                         config)
        results, short = _fill_short_shards(results, config, emit, first_index + len(plans))

    was_published = exists(manifest_url_for(config.out), config.storage_options)
    try:
        _check_still_ours(config, fingerprint, lock)
        manifest = _build_manifest(config, listing.description, attempted, results, parent, fingerprint,
                                   superseded=short, refused=refused)
        _check_still_ours(config, fingerprint, lock)
        manifest_url = write_manifest(manifest, config.out, config.storage_options)
    except OSError as exc:  # a full disk, a quota, a read-only bucket: one line, nothing published
        _unpublish_keys(config, was_published)
        raise ShardJobError(f"publishing the manifest of {redact(config.out)} failed "
                            f"({one_line(exc, 200, typed=True)}); nothing published: free the space (or fix the "
                            "storage) and re-run, which reuses the finished shards") from None
    _remove_shards([result.name for result in short], config)  # superseded by the fill shards
    digest = manifest_hash(manifest)
    reused = sum(r.reused for r in results)
    emit(f"manifest {redact(manifest_url)} sha256 {digest} ({manifest.total_samples} samples in "
         f"{len(manifest.shards)} shards, {len(manifest.rejected)} rejected; {reused} shards reused)")
    return ShardJobResult(manifest_url, manifest, digest, len(results) - reused, reused, results)


def _reason_counts(rejected: Sequence[RejectedInput]) -> str:
    """``"3 missing, 1 too large"``: how many of each reason, most frequent first."""
    counts: dict[str, int] = {}
    for entry in rejected:
        counts[entry.reason] = counts.get(entry.reason, 0) + 1
    return ", ".join(f"{count} {reason}" for reason, count in sorted(counts.items(), key=lambda kv: -kv[1]))


def _unpublish_keys(config: ShardJobConfig, was_published: bool) -> None:
    """Remove a key list written for a manifest that never appeared (a published version's own list stays)."""
    if was_published or exists(manifest_url_for(config.out), config.storage_options):
        return
    with contextlib.suppress(OSError):
        fs, path = url_to_fs(join_url(config.out, "keys.txt.gz"), config.storage_options)
        if fs.exists(path):
            fs.rm(path)


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
    reasons = _reason_counts(rejected)
    message = (f"{len(rejected)} of {attempted} inputs rejected ({reasons}), more than "
               f"max_rejected_fraction={config.max_rejected_fraction:g}; no manifest published")
    if counts.get("missing") and config.source.resolved_kind == "file_list":
        first = next(entry for entry in rejected if entry.reason == "missing")
        root = config.source.root or parent_url(config.source.url)
        found = suggest_root(config.source, first.source, config.storage_options)
        hint = f"--root {found} finds them" if found else "point --root at the folder that holds them"
        message += f": the listed images are not under {redact(root)} (e.g. {first.source}); {redact(hint)}"
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
    progress = Progress(sum(len(plan.keys) for plan in plans), emit)
    filled = run_tasks(plans, config, progress, len(plans), 0, write_fill_shard, sources)
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
    progress = Progress(planned_total, emit)
    results: list[ShardResult] = []
    cursor, next_index = 0, 0
    while any(needs.values()) and cursor < len(items):
        targets = round_robin_targets(needs)[: len(items) - cursor]
        chunk = items[cursor : cursor + len(targets)]
        cursor += len(chunk)
        plans = plan_shards(chunk, config.samples_per_shard, first_index=next_index, targets=targets)
        next_index += len(plans)
        if results:
            progress.total += len(chunk)
            emit(f"eval top-up round: {len(chunk)} more items for {sum(needs.values())} missing samples")
        round_results = run_tasks(plans, config, progress, next_index, len(results), write_shard)
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
    plan_sha256: str,
    superseded: Sequence[ShardResult] = (),
    refused: Sequence[RejectedInput] = (),
) -> Manifest:
    """The manifest of ``results``; ``superseded`` short shards (regrouped into others) add only their rejects;
    ``refused`` are the source entries refused while listing (never read)."""
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
            keys |= manifest_keys(parent, config.storage_options)
        if parent.watermark.max_mtime is not None:
            mtimes.append(parent.watermark.max_mtime)
        parent_ref = ParentRef(
            url=_relative_url(folder, parent.location or ""),
            dataset_version=parent.dataset_version,
            manifest_hash=manifest_hash(parent),
        )
    rejected += refused
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
        plan_sha256=plan_sha256,
    )
