"""Incremental retraining: new images -> new data version -> fine-tune the champion -> gate -> maybe promote.

One run of :func:`run_retraining`, safe from cron or a KubeRay RayCronJob:

1. takes the **retrain lock** on the data root (atomic exclusive create; a second, overlapping run sees the
   lock and exits cleanly saying who holds it; a lock older than ``lock.stale_after_s``, or left by a dead
   process on this host, is broken with a warning);
2. finds the latest data version (``<data_root>/LATEST.json``, else ``base_manifest``) and the source items
   its watermark has not ingested; with fewer than ``min_new_items`` it stops right there ("nothing new");
3. validates the training config of the run (once: the YAML, its overrides and what retraining sets, as
   objects), then shards only the new items into ``<data_root>/v<N>/`` as a child manifest listing old + new
   shards (the shard job is resumable, so a crashed run re-uses what it wrote);
4. fine-tunes from the current ``champion`` (read from the registry now, so a hand-moved alias is honoured)
   on the new version, registers the result (alias ``challenger``), evaluates it against the champion on the
   pinned eval set and moves ``champion`` only if the gate passes;
5. publishes ``LATEST.json`` last: a run that fails before the end leaves the previous version current,
   so the next run retries the same new items.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Annotated, Any, Callable, Literal, Mapping

from pydantic import Field, ValidationError, create_model

from pipeline.config import Config, ConfigError, derive, first_error
from pipeline.data.manifest import load_manifest, manifest_url_for
from pipeline.data.shardjob.run import ShardJobConfig, run_shard_job
from pipeline.data.sources import SourceSettings, list_source, new_items
from pipeline.evaluation.evaluate import EvaluationSettings
from pipeline.fsutil import StorageSettings, is_remote, join_url, publish_bytes, url_to_fs
from pipeline.lifecycle.evaluations import RegistryEvaluator
from pipeline.lifecycle.packaging import load_generator
from pipeline.lifecycle.promotion import CHALLENGER, GateSettings, current_champion, promote
from pipeline.lifecycle.training import train_and_register
from pipeline.paths import LocalPath, OutputPathStr, PathStr
from pipeline.tracking import check_tracking_server, resolve_tracking_uri
from pipeline.train.config import TrainJobConfig, load_train_config

__all__ = ["LockHeld", "RetrainJobConfig", "RetrainLock", "RetrainOutcome", "run_retraining"]

log = logging.getLogger(__name__)

LATEST_NAME = "LATEST.json"
LOCK_NAME = ".retrain.lock"


class LockSettings(Config):
    """The retrain lock: a lock older than ``stale_after_s`` belongs to a run that died without cleaning up."""

    stale_after_s: float = Field(default=6 * 3600, gt=0)


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


class LockHeld(RuntimeError):
    """Another retrain run holds the lock; the message says who and since when."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RetrainLock:
    """An exclusive lock file on the data root (local path or fsspec URL).

    Acquisition is one atomic exclusive create: ``O_CREAT | O_EXCL`` locally, fsspec's ``"xb"`` mode
    elsewhere (S3 conditional put where the filesystem supports it). The file records holder, host, pid
    and time. A held lock is broken only when it is stale: older than ``stale_after_s``, or written on this
    host by a process that no longer exists. Release removes the file only if it is still ours.
    """

    def __init__(self, data_root: str, stale_after_s: float, storage_options: Any = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.url = join_url(data_root, LOCK_NAME)
        self.stale_after_s = stale_after_s
        self._fs, self._path = url_to_fs(self.url, storage_options)
        self._local = not is_remote(self.url)
        self._clock = clock
        self.token = uuid.uuid4().hex
        self.held = False

    def _record(self) -> bytes:
        return json.dumps({"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                           "created_at": self._clock(),
                           "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}).encode()

    def _create(self) -> bool:
        data = self._record()
        if self._local:
            os.makedirs(os.path.dirname(self._path) or ".", exist_ok=True)
            try:
                fd = os.open(self._path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            return True
        try:
            with self._fs.open(self._path, "xb") as handle:
                handle.write(data)
            return True
        except FileExistsError:
            return False

    def holder(self) -> dict[str, Any] | None:
        """The current lock record, ``None`` when unlocked (``{}`` when unreadable, e.g. being written)."""
        try:
            with self._fs.open(self._path, "rb") as handle:
                return json.loads(handle.read() or b"{}")
        except FileNotFoundError:
            return None
        except (ValueError, OSError):
            return {}

    def _stale_reason(self, record: Mapping[str, Any]) -> str | None:
        created = record.get("created_at")
        if isinstance(created, (int, float)) and self._clock() - created > self.stale_after_s:
            return f"older than {self.stale_after_s:.0f} s"
        if record.get("host") == socket.gethostname() and isinstance(record.get("pid"), int) \
                and not _pid_alive(record["pid"]):
            return f"its process {record['pid']} on this host is gone"
        return None

    def acquire(self) -> None:
        """Take the lock or raise :class:`LockHeld` naming the holder."""
        for _ in range(2):
            if self._create():
                self.held = True
                return
            record = self.holder()
            if record is None:
                continue  # released between our attempt and our look: try once more
            reason = self._stale_reason(record)
            if reason is None:
                raise LockHeld(
                    f"another retrain run holds {self.url} (host {record.get('host', '?')}, pid {record.get('pid', '?')}, "
                    f"since {record.get('created', '?')})")
            log.warning("breaking stale retrain lock %s (%s): %s", self.url, reason, record)
            try:
                self._fs.rm(self._path)
            except FileNotFoundError:
                pass
        raise LockHeld(f"could not take {self.url}: another run took it while a stale lock was being broken")

    def release(self) -> None:
        """Remove the lock if it is still ours (a run that lost it to staleness must not delete the new one)."""
        if not self.held:
            return
        record = self.holder()
        if record and record.get("token") == self.token:
            self._fs.rm(self._path)
        else:
            log.warning("retrain lock %s is no longer ours (%s); leaving it", self.url, record)
        self.held = False

    def __enter__(self) -> "RetrainLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


# ----------------------------------------------------------------------------------------------------
# Data versions


def read_latest(data_root: str, storage_options: Any = None) -> dict[str, Any] | None:
    """``{"version": N, "manifest": url}`` of the latest published data version, or ``None``."""
    fs, path = url_to_fs(join_url(data_root, LATEST_NAME), storage_options)
    try:
        with fs.open(path, "rb") as handle:
            return json.loads(handle.read())
    except FileNotFoundError:
        return None


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
    """Write the champion generator's fp32 state dict (``weights_only``-loadable) to ``url`` for the workers."""
    import io

    import torch

    generator, _ = load_generator(f"models:/{name}/{version}", tracking_uri)
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in generator.state_dict().items()}, buffer)
    publish_bytes(url, buffer.getvalue(), storage_options)
    return url


# ----------------------------------------------------------------------------------------------------
# The run


def run_retraining(config: RetrainJobConfig, env: Mapping[str, str] | None = None,
                   train_fn: Callable[[TrainJobConfig], Any] | None = None) -> RetrainOutcome:
    """One retrain run (see the module docstring). ``train_fn`` defaults to ``train_and_register``."""
    # lazy: importing MLflow takes seconds, paid only by the callers that talk to a tracking server
    from mlflow import MlflowClient

    tracking_uri = resolve_tracking_uri(config.tracking_uri, env if env is not None else os.environ)
    check_tracking_server(tracking_uri)
    lock = RetrainLock(config.data_root, config.lock.stale_after_s, config.storage_options)
    try:
        lock.acquire()
    except LockHeld as exc:
        return RetrainOutcome("locked", str(exc))
    try:
        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        return _retrain_locked(config, tracking_uri, client, train_fn)
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


def _retrain_locked(config: RetrainJobConfig, tracking_uri: str, client, train_fn) -> RetrainOutcome:
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
    # Train on what the shard job published: a folder already holding another version gets a version folder of
    # its own beside it, so the planned URL is only a placeholder for validating the config up front.
    train_config = derive(train_config, {"data": {"train_manifest": sharded.manifest_url}})
    champion = _champion(client, config.registered_model)  # read now: a hand-moved alias is honoured
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
    version = str(result.model_version)
    client.set_registered_model_alias(config.registered_model, CHALLENGER, version)
    client.set_model_version_tag(config.registered_model, version, "holefill.retrain.dataset_version", str(number))
    client.set_model_version_tag(config.registered_model, version, "holefill.retrain.fine_tuned_from",
                                 f"version {champion}" if champion else "none (trained from scratch)")

    outcome = promote(client, config.registered_model, version, evaluator, config.gate, eval_set=evaluator.manifest_hash)
    publish_latest(config.data_root, number, sharded.manifest_url, config.storage_options)
    message = (f"retrained on data version {number} (+{len(fresh)} images): {config.registered_model} version "
               f"{version} {outcome.action}")
    log.info(message)
    return RetrainOutcome("retrained", message, len(fresh), sharded.manifest_url, f"{number}", version, outcome)


def _champion(client, name: str) -> str | None:
    return current_champion(client, name)

