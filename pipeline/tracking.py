"""MLflow run tracking for holefill: runs, params, metrics, images, secret redaction.

Shared by every stage that records something (training, evaluation, promotion); model packaging
(logging, registering and loading generators as MLflow models) is :mod:`pipeline.lifecycle.packaging`.

What this module promises the training loop (rank 0 owns the run):

* :func:`resolve_tracking_uri` picks the store (config > ``MLFLOW_TRACKING_URI`` > a local SQLite file, for jobs
  that write and never inside a Ray job's temporary working dir) and
  :func:`check_tracking_server` fails fast, with one line naming the URI, before any Ray worker starts.
* :class:`RunTracker` writes to one run. Writes never raise into training and never block it on the
  network: they are queued and sent by one background thread. **Failure policy** (exactly):

  - metrics are buffered in memory and sent in batches of at most 1000; a batch that fails stays at the
    head of the buffer and is retried on the next flush (every ``flush_interval_s``). While the buffer
    holds more than ``max_buffered_metrics`` points the oldest are dropped, with one warning per episode;
  - params, tags and images are sent in the order they were logged; each is tried up to ``max_attempts``
    times (one try per flush), then dropped with a warning naming it;
  - every failure is logged as a warning (rate-limited to one per ``warn_every_s``) with the redacted
    error; :meth:`RunTracker.finish` flushes for at most ``finish_timeout_s`` seconds, then reports how
    much was lost and marks the run terminated.

  MLflow's own HTTP client retries each request a few times underneath; these retries happen on the
  background thread, so a slow or absent server only delays tracking, never a training step.

  Why not MLflow's own ``log_metrics(..., synchronous=False)``: measured side by side (``bench/tracking.py``, 300
  steps x 8 metrics, local server, contended 2-core CPU) it costs the training thread 1245 us per step against
  32 here (39x), takes 6.4x longer to deliver (one request per call instead of batches of 1000), and it drops
  whatever fails: with the server down for the first 30 of 75 steps it lost those 30, this sender none.
* :func:`redact` masks credentials in anything that is about to be logged.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from pipeline.errors import one_line
from pipeline.paths import ray_working_dir_copy
from pipeline.pictures import captioned_row, sample_grid, to_hwc_uint8  # noqa: F401  (re-exported: older import path)
from pipeline.redaction import REDACTED, is_secret_name, redact  # noqa: F401  (re-exported: older import path)

__all__ = [
    "ManifestInput",
    "RunTracker",
    "check_tracking_server",
    "log_manifest_inputs",
    "redact",
    "resolve_tracking_uri",
    "version_model_id",
    "captioned_row",
    "sample_grid",
    "to_hwc_uint8",
]

log = logging.getLogger(__name__)

# Limits of the MLflow REST API (mlflow.utils.validation); values past them are refused by the server.
MAX_PARAM_VALUE_CHARS = 6000
MAX_TAG_VALUE_CHARS = 8000
MAX_KEY_CHARS = 250
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
TRUNCATION_MARK = "...[truncated]"
MAX_DATASET_DIGEST_CHARS = 36  # MLflow's limit on a dataset digest (mlflow.utils.validation)
DATASET_CONTEXT_TAG = "mlflow.data.context"  # the input tag MLflow's UI shows as a dataset's context

# ----------------------------------------------------------------------------------------------------
# Tracking URI


def resolve_tracking_uri(configured: str | None, env: Mapping[str, str] | None = None,
                         default_dir: str | os.PathLike | None = None, *, local_store: bool = True) -> str:
    """The tracking URI to use: ``configured`` if set, else ``env["MLFLOW_TRACKING_URI"]``, else a local store.

    The local store is ``sqlite:///<abs default_dir or cwd>/mlflow.db`` (the "embedded" mode of the design: no
    server needed), for jobs that write (training, the embedded demo): ``local_store=True``. A job that only
    reads (loading ``models:/…``) passes ``local_store=False``: it uses that file when it exists and otherwise
    raises a one-line ``ValueError`` saying that no tracking server is configured and how to point at one,
    instead of creating an empty store and then reporting that the model does not exist.

    A job running in Ray's temporary copy of its working dir (``ray job submit --working-dir``) with nothing
    configured raises too: a SQLite file there vanishes with the Ray session, and the user's server would
    show neither the run nor the model. ``env`` defaults to ``os.environ``.
    """
    if env is None:
        env = os.environ
    for candidate in (configured, env.get("MLFLOW_TRACKING_URI")):
        if candidate is not None and str(candidate).strip():
            return str(candidate).strip()
    store = (Path(default_dir) if default_dir is not None else Path.cwd()).resolve() / "mlflow.db"
    ray_copy = ray_working_dir_copy(store)
    if ray_copy is not None:
        raise ValueError(
            f"MLFLOW_TRACKING_URI is not set in this Ray job, and a local MLflow store would be lost with Ray's "
            f"temporary copy of the working dir ({ray_copy}): submit with --runtime-env-json "
            f"'{{\"env_vars\": {{\"MLFLOW_TRACKING_URI\": \"http://127.0.0.1:5000\"}}}}' (your server), set the "
            f"config's tracking_uri, or start the Ray head with MLFLOW_TRACKING_URI set (infra/local/stack.py does)"
        )
    if not local_store and not store.is_file():
        raise ValueError(
            f"no MLflow tracking server configured (and no local store {store}): export "
            f"MLFLOW_TRACKING_URI=http://127.0.0.1:5000 (the local stack's server; yours otherwise) or "
            f"--set tracking_uri=URI"
        )
    return f"sqlite:///{store}"


def check_tracking_server(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast when the tracking store cannot be used: one-line ``ValueError`` naming the (redacted) URI.

    HTTP(S) URIs get one request to the server's ``/health`` endpoint; ``sqlite:`` URIs need their folder to
    exist. Other schemes (``databricks``, ``file``) are left to MLflow.
    """
    shown = redact(uri)
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 - http(s) only
                status = response.status
        except urllib.error.HTTPError as exc:
            hint = " (MLflow >= 3.5 refuses unknown Host names: start it with --allowed-hosts)" if exc.code == 403 else ""
            raise ValueError(f"MLflow tracking server {shown} answered HTTP {exc.code} to /health{hint}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ValueError(f"MLflow tracking server {shown} is unreachable: {reason}") from None
        if status != 200:
            raise ValueError(f"MLflow tracking server {shown} answered HTTP {status} to /health")
    elif uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        if not folder.is_dir():
            raise ValueError(f"MLflow tracking store {shown}: folder {folder} does not exist")


def mlflow_client(uri: str | None):
    """An ``MlflowClient`` whose tracking and registry are both ``uri`` (MLflow's configured ones when ``None``)."""
    # lazy: importing MLflow takes seconds, paid only by the callers that talk to a tracking server
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - len(TRUNCATION_MARK)] + TRUNCATION_MARK


def _param_value(value: Any) -> str:
    """MLflow param text of a config value: JSON for containers (stable, readable), str otherwise."""
    if isinstance(value, (list, tuple, dict)):
        value = json.dumps(value, sort_keys=True, default=str)
    return truncate(str(redact(value) if isinstance(value, str) else value), MAX_PARAM_VALUE_CHARS)


# ----------------------------------------------------------------------------------------------------
# Run tracking


@dataclass
class _Operation:
    """One queued write other than metrics (params, tags, an image)."""

    describe: str
    send: Callable[[], None]
    attempts: int = 0


@dataclass
class _Losses:
    metrics_dropped: int = 0
    operations_dropped: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ManifestInput:
    """A published dataset version a run read, as MLflow shows it among the run's dataset inputs.

    ``url``: the manifest file's URL (the dataset's source); ``sha256``: its content hash
    (:func:`pipeline.data.manifest.manifest_hash`); ``context``: what the run used it for (``training``,
    ``validation``, ``evaluation``); ``version``: its dataset version, where known.
    """

    url: str
    sha256: str
    context: str
    version: str | None = None

    def dataset_input(self):
        """The ``mlflow.entities.DatasetInput``: named after the dataset's folder, digest = the manifest hash cut to
        MLflow's 36-character digest limit (144 bits), the full hash and the version in its profile, the source
        the redacted manifest URL (type ``s3``, ``local``, ... from its scheme)."""
        # lazy: importing MLflow takes seconds, paid only by the callers that talk to a tracking server
        from mlflow.entities import Dataset, DatasetInput, InputTag

        url = redact(self.url)
        scheme = url.split("://", 1)[0] if "://" in url else "local"
        folder = url.rstrip("/").rsplit("/", 2)
        name = folder[-2] if len(folder) >= 2 and folder[-1].endswith(".json") else folder[-1]
        profile = {"manifest_sha256": self.sha256, **({"dataset_version": self.version} if self.version else {})}
        dataset = Dataset(name=name or "manifest", digest=self.sha256[:MAX_DATASET_DIGEST_CHARS],
                          source_type="local" if scheme == "file" else scheme, source=json.dumps({"uri": url}),
                          profile=json.dumps(profile))
        return DatasetInput(dataset, tags=[InputTag(DATASET_CONTEXT_TAG, self.context)])


def version_model_id(version) -> str | None:
    """The logged model (``m-…``) a registered ``ModelVersion`` holds: MLflow's REST answers leave
    ``ModelVersion.model_id`` empty, so it is read from the version's source ``models:/<model id>`` then."""
    if getattr(version, "model_id", None):
        return version.model_id
    source = str(getattr(version, "source", "") or "")
    found = re.fullmatch(r"models:/(m-[0-9a-f]+)/?", source)
    return found.group(1) if found else None


def log_manifest_inputs(client, run_id: str, manifests: list[ManifestInput]) -> None:
    """Log ``manifests`` as the dataset inputs of run ``run_id`` (raises what MLflow raises)."""
    client.log_inputs(run_id, datasets=[m.dataset_input() for m in manifests])


class RunTracker:
    """Writes one MLflow run from one process (rank 0) without ever failing or stalling training.

    Build it with :meth:`start_or_resume` (the driver) or :meth:`attach` (a worker given the run id). Writes
    are queued and sent by a background thread; see the module docstring for the failure policy.
    """

    def __init__(self, client, run_id: str, *, flush_interval_s: float = 2.0, max_attempts: int = 3,
                 max_buffered_metrics: int = 200_000, warn_every_s: float = 60.0,
                 finish_timeout_s: float = 60.0) -> None:
        self._client = client
        self.run_id = run_id
        self.flush_interval_s = float(flush_interval_s)
        self.max_attempts = int(max_attempts)
        self.max_buffered_metrics = int(max_buffered_metrics)
        self.warn_every_s = float(warn_every_s)
        self.finish_timeout_s = float(finish_timeout_s)
        self._metrics: deque = deque()
        self._operations: deque[_Operation] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._stop = False
        self._last_warning = -math.inf
        self._overflowing = False
        self.losses = _Losses()
        self._logged_params: dict[str, str] | None = None
        self._system_monitor = None
        self._thread = threading.Thread(target=self._run, name=f"mlflow-tracker-{run_id[:8]}", daemon=True)
        self._thread.start()

    # -- construction ---------------------------------------------------------------------------------

    @classmethod
    def start_or_resume(cls, uri: str, experiment: str, run_name: str,
                        tags: Mapping[str, Any] | None = None, **options: Any) -> "RunTracker":
        """Continue the latest run called ``run_name`` in ``experiment`` or start one (creating the experiment).

        This is what makes a restarted Ray job (same ``run.name``) keep logging into the same MLflow run.
        A resumed run is set back to ``RUNNING``. Errors here are raised (nothing has started yet).
        """
        if not run_name or "'" in run_name:
            raise ValueError(f"run name must be non-empty and contain no single quote, got {run_name!r}")
        client = mlflow_client(uri)
        experiment_id = get_or_create_experiment(client, experiment)
        found = client.search_runs(
            [experiment_id], filter_string=f"attributes.run_name = '{run_name}'",
            order_by=["attributes.start_time DESC"], max_results=1,
        )
        clean_tags = tag_dict(tags or {})
        if found:
            run_id = found[0].info.run_id
            client.update_run(run_id, status="RUNNING")
            log.info("resuming MLflow run %s (%s) in experiment %r", run_id, run_name, experiment)
            if clean_tags:
                client.log_batch(run_id, tags=_tag_entities(clean_tags))
        else:
            run = client.create_run(experiment_id, run_name=run_name, tags=clean_tags)
            run_id = run.info.run_id
            log.info("started MLflow run %s (%s) in experiment %r", run_id, run_name, experiment)
        return cls(client, run_id, **options)

    @classmethod
    def attach(cls, uri: str, run_id: str, **options: Any) -> "RunTracker":
        """Write to an existing run (a Ray worker given the run id by the driver)."""
        return cls(mlflow_client(uri), run_id, **options)

    # -- writes ---------------------------------------------------------------------------------------

    def log_params(self, flat: Mapping[str, Any]) -> None:
        """Log flat params (``{"train.lr": 1e-4}``), redacted and truncated to MLflow's limits.

        Idempotent on resume: params already on the run with the same value are skipped; a param whose value
        changed since (MLflow params are immutable) keeps its first value and is reported in a warning.
        """
        wanted: dict[str, str] = {}
        for key, value in redact(dict(flat)).items():
            wanted[truncate(str(key), MAX_KEY_CHARS)] = _param_value(value)
        existing = self._existing_params()
        changed = {k: (existing[k], v) for k, v in wanted.items() if k in existing and existing[k] != v}
        for key, (old, new) in sorted(changed.items()):
            log.warning("param %s changed on resume (%r -> %r); MLflow keeps the first value", key, old, new)
        fresh = {k: v for k, v in wanted.items() if k not in existing}
        existing.update(fresh)
        items = sorted(fresh.items())
        for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
            chunk = dict(items[start: start + MAX_PARAMS_PER_BATCH])
            self._enqueue(f"{len(chunk)} params", lambda chunk=chunk: self._send_params(chunk))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Queue metric values for ``step`` (never blocks on the network)."""
        # lazy: importing MLflow takes seconds, paid only by the callers that talk to a tracking server
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        points = [Metric(truncate(str(k), MAX_KEY_CHARS), float(v), stamp, int(step)) for k, v in metrics.items()]
        with self._lock:
            self._metrics.extend(points)
            overflow = len(self._metrics) - self.max_buffered_metrics
            if overflow > 0:
                for _ in range(overflow):
                    self._metrics.popleft()
                self.losses.metrics_dropped += overflow
                if not self._overflowing:
                    log.warning("MLflow unreachable for a while: metric buffer full (%d points); dropping the oldest",
                                self.max_buffered_metrics)
                self._overflowing = True

    def log_manifests(self, manifests: list[ManifestInput]) -> None:
        """Queue the run's dataset inputs: the manifests it reads (see :class:`ManifestInput`)."""
        manifests = list(manifests)
        self._enqueue(f"{len(manifests)} dataset inputs",
                      lambda: log_manifest_inputs(self._client, self.run_id, manifests))

    def log_image(self, image: np.ndarray | torch.Tensor, name: str, step: int) -> None:
        """Queue an image (HWC ``uint8`` array or CHW float tensor in [0,1]) under ``name`` at ``step``."""
        picture = to_hwc_uint8(image)
        if not name.lower().endswith((".png", ".jpg", ".jpeg")):
            name = f"{name}.png"
        # Logged as a plain PNG artifact: MLflow's key/step image mode also writes WebP thumbnails, which
        # pillow-simd builds (no libwebp) cannot encode, and the step is already part of ``name``.
        self._enqueue(f"image {name}@{step}",
                      lambda: self._client.log_image(self.run_id, picture, artifact_file=name))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Queue run tags (redacted, truncated)."""
        clean = tag_dict(tags)
        if clean:
            self._enqueue(f"{len(clean)} tags", lambda: self._client.log_batch(self.run_id, tags=_tag_entities(clean)))

    def start_system_metrics(self, sampling_interval_s: float = 10.0) -> None:
        """Log CPU/memory/GPU utilisation of this node to the run every ``sampling_interval_s`` seconds."""
        if self._system_monitor is not None:
            return
        try:
            # lazy: importing MLflow takes seconds, paid only by the callers that talk to a tracking server
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(self.run_id, sampling_interval=sampling_interval_s, resume_logging=True,
                                           tracking_uri=self._client.tracking_uri)
            monitor.start()
            self._system_monitor = monitor
        except Exception as exc:  # monitoring is optional: never fail training for it
            log.warning("system metrics not logged: %s", redact(str(exc)))

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until everything queued so far has been sent (or dropped); True when the queue is empty.

        When the time runs out first (the server is still unreachable), one warning counts what is still queued:
        a process that ends now (a training worker) loses exactly that much, and says so.
        """
        timeout_s = self.finish_timeout_s if timeout_s is None else timeout_s
        if self._flush(timeout_s):
            return True
        with self._lock:
            metrics, others = len(self._metrics), len(self._operations)
        log.warning("MLflow run %s: %d metric points and %d other writes still unsent after %.0f s (tracking server "
                    "unreachable); they are lost if this process ends now", self.run_id, metrics, others, timeout_s)
        return False

    def _flush(self, timeout_s: float | None = None) -> bool:
        deadline = time.monotonic() + (self.finish_timeout_s if timeout_s is None else timeout_s)
        while time.monotonic() < deadline:
            with self._lock:
                empty = not self._metrics and not self._operations
            if empty and self._idle.is_set():
                return True
            self._idle.clear()
            self._wake.set()
            self._idle.wait(timeout=max(0.0, min(0.5, deadline - time.monotonic())))
        with self._lock:
            return not self._metrics and not self._operations

    def finish(self, status: str = "FINISHED") -> None:
        """Flush, stop the sender and mark the run ``status``, all within about ``finish_timeout_s`` seconds.

        ``status`` is one of ``FINISHED``, ``FAILED``, ``KILLED``. Never raises for tracking failures; what
        could not be sent is counted in one warning.
        """
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"run status must be FINISHED, FAILED or KILLED, got {status!r}")
        if self._system_monitor is not None:
            with contextlib.suppress(Exception):
                self._system_monitor.finish()
            self._system_monitor = None
        started = time.monotonic()
        complete = self._flush()
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=1.0)
        with self._lock:
            unsent_metrics, unsent_ops = len(self._metrics), [op.describe for op in self._operations]
        if not complete or self.losses.metrics_dropped or self.losses.operations_dropped:
            log.warning(
                "MLflow run %s: %d metric points and %d other writes were not recorded (%s)", self.run_id,
                self.losses.metrics_dropped + unsent_metrics, len(self.losses.operations_dropped) + len(unsent_ops),
                ", ".join([*self.losses.operations_dropped, *unsent_ops][:5]) or "metrics only",
            )

        def terminate() -> None:
            try:
                self._client.set_terminated(self.run_id, status=status)
            except Exception as exc:
                log.warning("could not mark MLflow run %s %s: %s", self.run_id, status, redact(str(exc)[:300]))

        # MLflow's HTTP retries can take minutes against a dead server: bound the wait, like the flush.
        closer = threading.Thread(target=terminate, name="mlflow-tracker-finish", daemon=True)
        closer.start()
        closer.join(timeout=max(1.0, self.finish_timeout_s - (time.monotonic() - started)))

    # -- internals ------------------------------------------------------------------------------------

    def _existing_params(self) -> dict[str, str]:
        if self._logged_params is None:
            try:
                self._logged_params = dict(self._client.get_run(self.run_id).data.params)
            except Exception as exc:
                self._warn(f"could not read the run's params ({redact(str(exc))}); logging all")
                return {}
        return self._logged_params

    def _send_params(self, chunk: Mapping[str, str]) -> None:
        # lazy: importing MLflow takes seconds, paid only by the callers that talk to a tracking server
        from mlflow.entities import Param

        self._client.log_batch(self.run_id, params=[Param(k, v) for k, v in chunk.items()])

    def _enqueue(self, describe: str, send: Callable[[], None]) -> None:
        with self._lock:
            self._operations.append(_Operation(describe, send))
        self._wake.set()

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_warning >= self.warn_every_s:
            self._last_warning = now
            log.warning("MLflow tracking (run %s): %s", self.run_id, message)

    def _run(self) -> None:
        while True:
            self._wake.wait(timeout=self.flush_interval_s)
            self._wake.clear()
            self._idle.clear()
            try:
                self._send_pending()
            finally:
                self._idle.set()
            if self._stop:
                return

    def _send_pending(self) -> None:
        """One flush: queued operations in order, then metric batches; stop at the first failure."""
        while True:
            with self._lock:
                operation = self._operations[0] if self._operations else None
            if operation is None:
                break
            try:
                operation.send()
            except Exception as exc:
                operation.attempts += 1
                if operation.attempts >= self.max_attempts:
                    with self._lock:
                        self._operations.popleft()
                    self.losses.operations_dropped.append(operation.describe)
                    log.warning("MLflow tracking: dropped %s after %d failed attempts: %s",
                                operation.describe, operation.attempts, redact(one_line(exc)))
                else:
                    self._warn(f"sending {operation.describe} failed, will retry: {redact(str(exc)[:300])}")
                return
            with self._lock:
                self._operations.popleft()
        while True:
            with self._lock:
                batch = [self._metrics[i] for i in range(min(MAX_METRICS_PER_BATCH, len(self._metrics)))]
            if not batch:
                return
            try:
                self._client.log_batch(self.run_id, metrics=batch)
            except Exception as exc:
                self._warn(f"sending {len(batch)} metric points failed, keeping them buffered: {redact(str(exc)[:300])}")
                return
            with self._lock:
                # Drop only what was sent: overflow may have trimmed some of it from the head meanwhile.
                sent = {id(point) for point in batch}
                while self._metrics and id(self._metrics[0]) in sent:
                    self._metrics.popleft()
                self._overflowing = False


def local_artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Artifact folder of a new experiment in a SQLite store: ``<store folder>/mlartifacts/<experiment>``.

    MLflow's own default for a database store is ``./mlruns`` of whatever directory the process runs in, which
    scatters artifacts (models included) away from their store. ``None`` for servers: they decide.
    """
    if not tracking_uri.startswith("sqlite:///"):
        return None
    folder = Path(tracking_uri[len("sqlite:///"):]).resolve().parent
    return (folder / "mlartifacts" / re.sub(r"[^A-Za-z0-9._-]", "_", experiment)).as_uri()


def get_or_create_experiment(client, name: str) -> str:
    """The id of experiment ``name``, created (artifacts beside a SQLite store) when missing."""
    # lazy: importing MLflow takes seconds, paid only by the callers that talk to a tracking server
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            raise ValueError(f"MLflow experiment {name!r} is deleted; restore it or choose another name")
        return experiment.experiment_id
    try:
        return client.create_experiment(
            name, artifact_location=local_artifact_location(str(getattr(client, "tracking_uri", "")), name))
    except MlflowException:
        # Another process created it between our lookup and create.
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def tag_dict(tags: Mapping[str, Any]) -> dict[str, str]:
    return {
        truncate(str(k), MAX_KEY_CHARS): truncate(str(v), MAX_TAG_VALUE_CHARS)
        for k, v in redact(dict(tags)).items()
        if v is not None
    }


def _tag_entities(tags: Mapping[str, str]):
    # lazy: importing MLflow takes seconds, paid only by the callers that talk to a tracking server
    from mlflow.entities import RunTag

    return [RunTag(k, v) for k, v in tags.items()]
