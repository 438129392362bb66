"""Incremental retraining: new images -> new data version -> fine-tune the champion -> gate -> maybe promote.

One run of :func:`run_retraining`, safe from cron or a KubeRay RayCronJob:

1. takes the **retrain lock** on the data root (:class:`pipeline.locks.Lock`: created atomically with its record,
   renewed every ``lock.heartbeat_s`` while the run lives; a second, overlapping run sees it and exits 0 saying who
   holds it; a lock not renewed for ``lock.stale_after_s``, unreadable and that old, or left by a dead process on
   this host, is broken with a warning; an unreadable young one is a one-line error);
2. finds the latest data version (``<data_root>/LATEST.json``, else ``base_manifest``) and the source items
   its watermark has not ingested; with fewer than ``min_new_items`` it stops right there ("nothing new");
3. validates the training config of the run (once: the YAML, its overrides and what retraining sets, as
   objects), then shards only the new items into ``<data_root>/v<N>/`` as a child manifest listing old + new
   shards (the shard job is resumable, so a crashed run re-uses what it wrote);
4. fine-tunes from the current ``champion`` (read from the registry now, so a hand-moved alias is honoured)
   on the new version, registers the result (alias ``challenger``), evaluates it against the champion on the
   pinned eval set and moves ``champion`` only if the gate passes;
5. publishes ``LATEST.json`` last, after the challenger trained on these images is registered and gated: a run
   that fails before the end leaves the previous version current, so the next run retries the same new items.

**Idempotent.** The training run's name carries the fingerprint of the data version's shard plan
(:func:`run_name`), and the registered challenger the tag ``holefill.retrain.data_plan``: a retry on the same
data resumes that run (or, already registered, gates that version without training again); a retry after more
images arrived builds another plan, so it trains a new run from the champion's weights, never resuming (and
registering) weights that did not see its data.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Annotated, Any, Callable, Literal, Mapping

from pydantic import Field, ValidationError, create_model

from pipeline.config import Config, ConfigError, derive, first_error
from pipeline.data.manifest import load_manifest, manifest_url_for
from pipeline.data.shardjob.run import ShardJobConfig, run_shard_job
from pipeline.data.sources import SourceSettings, list_source, new_items
from pipeline.evaluation.evaluate import EvaluationSettings
from pipeline.fsutil import StorageSettings, join_url, publish_bytes, url_to_fs
from pipeline.generators import write_generator
from pipeline.lifecycle.evaluations import RegistryEvaluator
from pipeline.lifecycle.packaging import load_generator_record
from pipeline.lifecycle.promotion import (
    CHALLENGER,
    DEFAULT_LOCK_ROOT,
    GateSettings,
    current_champion,
    promote,
    promotion_lock,
)
from pipeline.lifecycle.training import train_and_register
from pipeline.locks import Lock, LockBusy, LockSettings
from pipeline.paths import LocalPath, OutputPathStr, PathStr
from pipeline.tracking import check_tracking_server, resolve_tracking_uri
from pipeline.train.config import TrainJobConfig, load_train_config

__all__ = ["LockSettings", "RetrainJobConfig", "RetrainOutcome", "retrain_lock", "run_retraining"]

log = logging.getLogger(__name__)

LATEST_NAME = "LATEST.json"
LOCK_NAME = ".retrain.lock"
PLAN_TAG = "holefill.retrain.data_plan"
FROM_TAG = "holefill.retrain.fine_tuned_from"


# What retraining sets itself for each data version; every other shard-job setting is the ``shard`` section.
_SET_PER_VERSION = ("source", "out", "dataset_version", "parent", "storage_options")
ShardSettings = create_model(
    "ShardSettings",
    __base__=Config,
    __doc__="The shard job's settings for each new data version: ShardJobConfig's, less what retraining sets.",
    **{name: (info.annotation, info) for name, info in ShardJobConfig.model_fields.items()
       if name not in _SET_PER_VERSION},
)


class RetrainJobConfig(Config):
    """``jobs/retrain.py`` (see ``jobs/configs/retrain.yaml``)."""

    source: SourceSettings
    data_root: OutputPathStr = Field(min_length=1, description="folder of the data versions v0001, v0002, ... and LATEST.json")
    base_manifest: Annotated[str | None, LocalPath()] = Field(None, description="version to extend when data_root has no LATEST.json yet")
    shard: ShardSettings = Field(default_factory=ShardSettings, description="shard job settings (samples_per_shard, masks, seed, ...)")
    storage_options: StorageSettings = Field(default_factory=StorageSettings)
    min_new_items: int = Field(default=1, ge=1)
    train_config: PathStr = Field(min_length=1, description="training YAML (jobs/configs/train_*.yaml)")
    train_overrides: list[str] = Field(default_factory=list)
    eval_manifest: PathStr = Field(min_length=1)
    registered_model: str = Field(min_length=1)
    tracking_uri: str | None = None
    gate: GateSettings = Field(default_factory=GateSettings)
    evaluation: EvaluationSettings = Field(default_factory=EvaluationSettings)
    lock: LockSettings = Field(default_factory=LockSettings)
    promotion_lock_root: str = Field(DEFAULT_LOCK_ROOT, min_length=1,
                                     description="lock_root of jobs/promote.py: promotions of the model are serialised")
    promotion_lock_wait_s: float = Field(default=1800.0, ge=0)


@dataclass
class RetrainOutcome:
    """What a retrain run did; ``action`` is ``nothing_new``, ``locked`` or ``retrained``."""

    action: Literal["nothing_new", "locked", "retrained"]
    message: str
    new_items: int = 0
    manifest_url: str | None = None
    dataset_version: str | None = None
    model_version: str | None = None
    promotion: Any = None
    details: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------
# The lock


def retrain_lock(config: RetrainJobConfig) -> Lock:
    """The retrain lock on ``data_root`` (:class:`pipeline.locks.Lock`: atomic, renewed, broken when stale)."""
    return Lock(join_url(config.data_root, LOCK_NAME), "retrain job", stale_after_s=config.lock.stale_after_s,
                heartbeat_s=config.lock.heartbeat_s, storage_options=config.storage_options)


# ----------------------------------------------------------------------------------------------------
# Data versions


def read_latest(data_root: str, storage_options: Any = None) -> dict[str, Any] | None:
    """``{"version": N, "manifest": url}`` of the latest published data version, or ``None``.

    An unreadable ``LATEST.json`` (empty, truncated, not this shape) is a one-line ``ValueError`` naming it: the
    data version it pointed at is the newest ``v<N>/manifest.json``; rewrite or delete it by hand."""
    url = join_url(data_root, LATEST_NAME)
    fs, path = url_to_fs(url, storage_options)
    try:
        with fs.open(path, "rb") as handle:
            raw = handle.read(1 << 20)
    except FileNotFoundError:
        return None
    try:
        record = json.loads(raw)
        int(record["version"]), str(record["manifest"])
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"{url} is unreadable ({len(raw)} bytes: {type(exc).__name__}); point it at the newest "
                         f"published v<N>/manifest.json by hand or delete it to start from base_manifest") from None
    return record


def publish_latest(data_root: str, version: int, manifest_url: str, storage_options: Any = None) -> None:
    """Atomically point ``LATEST.json`` at ``manifest_url`` (data version ``version``)."""
    record = {"version": version, "manifest": manifest_url,
              "published": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    publish_bytes(join_url(data_root, LATEST_NAME), json.dumps(record, indent=2).encode(), storage_options)


def version_folder(data_root: str, version: int) -> str:
    """``<data_root>/v0003`` style folder of a data version."""
    return join_url(data_root, f"v{version:04d}")


# ----------------------------------------------------------------------------------------------------
# Fine-tuning from the champion


def export_champion_weights(tracking_uri: str, name: str, version: str, url: str, storage_options: Any = None) -> str:
    """Write the champion's generator record (``weights_only``-loadable, what ``model.init_weights`` reads) to ``url``
    for the workers."""
    ref = f"models:/{name}/{version}"
    return write_generator(load_generator_record(ref, tracking_uri).with_provenance(init_from=ref), url, storage_options)


# ----------------------------------------------------------------------------------------------------
# The run


def run_retraining(config: RetrainJobConfig, env: Mapping[str, str] | None = None,
                   train_fn: Callable[[TrainJobConfig], Any] | None = None) -> RetrainOutcome:
    """One retrain run (see the module docstring). ``train_fn`` defaults to ``train_and_register``.

    Another run holding the lock is the outcome ``locked`` (exit 0); a lock that cannot be read or broken, or one
    lost during the run, is a one-line :class:`pipeline.locks.LockError` (a ``ValueError``: exit 2)."""
    # lazy: importing MLflow takes seconds, paid only by the callers that talk to a tracking server
    from mlflow import MlflowClient

    tracking_uri = resolve_tracking_uri(config.tracking_uri, env if env is not None else os.environ)
    check_tracking_server(tracking_uri)
    lock = retrain_lock(config)
    try:
        lock.acquire()
    except LockBusy as exc:
        log.info("%s", exc)
        return RetrainOutcome("locked", str(exc))
    try:
        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        return _retrain_locked(config, tracking_uri, client, train_fn, lock)
    except LockBusy as exc:  # the promotion lock, after waiting: the challenger waits for the next run's gate
        message = f"{exc}: LATEST.json not moved, the next run carries on from here"
        log.warning(message)
        return RetrainOutcome("locked", message)
    finally:
        lock.release()


def _previous_version(config: RetrainJobConfig) -> tuple[int, str | None]:
    latest = read_latest(config.data_root, config.storage_options)
    if latest is not None:
        return int(latest["version"]), str(latest["manifest"])
    return 0, config.base_manifest


def _shard_config(config: RetrainJobConfig, out: str, number: int, previous: Any) -> ShardJobConfig:
    """The shard job of data version ``number``: the ``shard`` settings plus what retraining sets."""
    try:
        return ShardJobConfig.model_validate({
            **config.shard.model_dump(exclude_unset=True), "source": config.source, "out": out,
            "dataset_version": f"{number}", "parent": previous.location if previous is not None else None,
            "storage_options": config.storage_options,
        })
    except ValidationError as exc:  # only rules across settings remain: each one was checked on its own
        key, message = first_error(exc, ShardJobConfig)
        raise ConfigError.at("shard" if key == "<root>" else f"shard.{key}", message) from None


def _train_config(config: RetrainJobConfig, tracking_uri: str, manifest_url: str, number: int) -> TrainJobConfig:
    """The training config of the run on data version ``number``: the YAML and its overrides, then what retraining
    sets, validated once (before any sharding)."""
    train = load_train_config(config.train_config, config.train_overrides, updates={
        "data": {"train_manifest": manifest_url, "eval_manifest": config.eval_manifest},
        "mlflow": {"registered_model": config.registered_model, "tracking_uri": tracking_uri},
        "run": {"name": f"retrain-{config.registered_model}-data-v{number}"},
    })
    if not train.mlflow.enabled:
        raise ConfigError.at("train_overrides", "retraining registers a challenger, so mlflow.enabled must be true")
    return train


def run_name(registered_model: str, number: int, plan_sha256: str) -> str:
    """The training run of data version ``number`` built by plan ``plan_sha256``: a retry on the same data resumes
    it; a retry after new images arrived (another plan) is another run, started from ``init_weights``."""
    return f"retrain-{registered_model}-data-v{number}-{plan_sha256[:12]}"


def _trained_version(client, name: str, plan: str) -> str | None:
    """The version a previous attempt already trained and registered on the data of ``plan``, if any."""
    versions = client.search_model_versions(f"name='{name}'")
    found = [v for v in versions if (v.tags or {}).get(PLAN_TAG) == plan]
    return str(max(int(v.version) for v in found)) if found else None


def _retrain_locked(config: RetrainJobConfig, tracking_uri: str, client, train_fn, lock: Lock) -> RetrainOutcome:
    previous_number, previous_url = _previous_version(config)
    previous = load_manifest(previous_url, config.storage_options) if previous_url else None
    listing = list_source(config.source, config.storage_options)
    fresh = new_items(listing.items, previous, config.storage_options, by=config.shard.incremental_by)
    if len(fresh) < config.min_new_items:
        message = (f"nothing new: {len(fresh)} new of {len(listing.items)} source items since "
                   f"{previous_url or 'the start'} (min_new_items={config.min_new_items})")
        log.info(message)
        return RetrainOutcome("nothing_new", message, new_items=len(fresh), manifest_url=previous_url)

    number = previous_number + 1
    out = version_folder(config.data_root, number)
    shard_config = _shard_config(config, out, number, previous)
    train_config = _train_config(config, tracking_uri, manifest_url_for(out), number)

    # The eval set and the metric weights are read now: a missing weights file stops the run before sharding.
    evaluator = RegistryEvaluator(tracking_uri, config.eval_manifest, config.evaluation)
    log.info("retrain: %d new items -> data version %d at %s", len(fresh), number, out)
    sharded = run_shard_job(shard_config)
    lock.check()
    # Train on what the shard job published: a folder already holding another version (an earlier attempt that saw
    # other images) gets a version folder of its own beside it. The run name carries the plan's fingerprint, so an
    # attempt on other data never resumes (and re-registers) a run trained on the old data.
    plan = sharded.manifest.plan_sha256
    train_config = derive(train_config, {"data": {"train_manifest": sharded.manifest_url},
                                         "run": {"name": run_name(config.registered_model, number, plan)}})
    champion = _champion(client, config.registered_model)  # read now: a hand-moved alias is honoured
    version = _trained_version(client, config.registered_model, plan)
    if version is not None:
        log.info("version %s of %s was already trained on this data (plan %s) by an earlier attempt: gating it",
                 version, config.registered_model, plan[:12])
        fine_tuned_from = client.get_model_version(config.registered_model, version).tags.get(FROM_TAG, "")
    else:
        if champion is not None:
            init_url = export_champion_weights(tracking_uri, config.registered_model, champion,
                                               join_url(out, "init", f"champion-v{champion}.pt"), config.storage_options)
            train_config = derive(train_config, {"model": {"init_weights": init_url}})
            log.info("fine-tuning from champion version %s", champion)
        else:
            log.info("no champion yet: training from scratch")
        if train_fn is None:
            train_fn = train_and_register
        result = train_fn(train_config)
        if result.model_version is None:
            raise RuntimeError(f"training run {train_config.run.name} registered no model version")
        version = str(result.model_version)
        fine_tuned_from = f"version {champion}" if champion else "none (trained from scratch)"
        lock.check()
        client.set_model_version_tag(config.registered_model, version, "holefill.retrain.dataset_version", str(number))
        client.set_model_version_tag(config.registered_model, version, FROM_TAG, fine_tuned_from)
        client.set_model_version_tag(config.registered_model, version, "holefill.retrain.manifest",
                                     sharded.manifest_url)
        client.set_model_version_tag(config.registered_model, version, PLAN_TAG, plan)  # last: "registered"
    lock.check()
    client.set_registered_model_alias(config.registered_model, CHALLENGER, version)

    gate_lock = promotion_lock(config.promotion_lock_root, config.registered_model, config.lock, config.storage_options)
    gate_lock.acquire(wait_s=config.promotion_lock_wait_s)  # still busy after the wait: LockBusy, LATEST unmoved
    try:
        outcome = promote(client, config.registered_model, version, evaluator, config.gate,
                          eval_set=evaluator.manifest_hash, lock=gate_lock)
    finally:
        gate_lock.release()
    # The watermark moves last: only once the challenger trained on these images is registered and gated.
    lock.check()
    publish_latest(config.data_root, number, sharded.manifest_url, config.storage_options)
    message = (f"retrained on data version {number} (+{len(fresh)} images): {config.registered_model} version "
               f"{version} {outcome.action}")
    log.info(message)
    return RetrainOutcome("retrained", message, len(fresh), sharded.manifest_url, f"{number}", version, outcome,
                          {"fine_tuned_from": fine_tuned_from, "run_name": train_config.run.name})


def _champion(client, name: str) -> str | None:
    return current_champion(client, name)

