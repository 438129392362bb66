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

from pipeline.paths import ray_working_dir_copy

__all__ = [
    "RunTracker",
    "check_tracking_server",
    "redact",
    "resolve_tracking_uri",
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
REDACTED = "***"

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


def mlflow_client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


# ----------------------------------------------------------------------------------------------------
# Redaction

# scheme://user:password@host -> scheme://user:***@host
_URL_USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^/@\s:]*):(?P<secret>[^/@\s]+)@")
# name=value pairs in query strings / command lines whose name looks secret
_SECRET_ASSIGNMENT = re.compile(
    r"(?P<name>[A-Za-z0-9_\-.]*(?:secret|password|passwd|pwd|token|key|signature|credential)[A-Za-z0-9_\-]*)"
    r"(?P<sep>=|:\s*)(?P<value>[^&\s,;'\"]+)",
    re.IGNORECASE,
)
# Word parts of a key name that make its value secret ("aws_access_key_id" -> aws/access/key/id).
_SECRET_WORDS = frozenset({
    "secret", "secrets", "password", "passwd", "pwd", "token", "tokens", "key", "apikey", "credential",
    "credentials", "auth", "authorization", "signature", "passphrase", "privatekey", "accesskey", "secretkey",
})


def is_secret_name(name: str) -> bool:
    """True when a key (``aws_access_key_id``, ``storage_options.secret``, ``MLFLOW_TRACKING_TOKEN``) names a secret.

    Matching is on word parts (split at ``_ - . /`` and camelCase), so ``sort_keys`` or ``monkey`` are not secret.
    """
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", str(name))
    words = {w for w in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if w}
    return bool(words & _SECRET_WORDS)


def redact(obj: Any) -> Any:
    """Return ``obj`` with credentials masked as ``***``; containers are copied, never modified in place.

    Strings: the password part of ``scheme://user:password@host`` and values of ``name=value`` pairs whose
    name looks secret. Mappings: every value under a secret-looking key (see :func:`is_secret_name`).
    Lists, tuples and sets are walked; other objects are returned unchanged.
    """
    if isinstance(obj, str):
        text = _URL_USERINFO.sub(lambda m: f"{m.group('head')}:{REDACTED}@", obj)
        return _SECRET_ASSIGNMENT.sub(lambda m: f"{m.group('name')}{m.group('sep')}{REDACTED}", text)
    if isinstance(obj, Mapping):
        return {
            key: (REDACTED if is_secret_name(str(key)) and value not in (None, "") else redact(value))
            for key, value in obj.items()
        }
    if isinstance(obj, (list, tuple, set, frozenset)):
        return type(obj)(redact(v) for v in obj)
    return obj


def truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - len(TRUNCATION_MARK)] + TRUNCATION_MARK


def _param_value(value: Any) -> str:
    """MLflow param text of a config value: JSON for containers (stable, readable), str otherwise."""
    if isinstance(value, (list, tuple, dict)):
        value = json.dumps(value, sort_keys=True, default=str)
    return truncate(str(redact(value) if isinstance(value, str) else value), MAX_PARAM_VALUE_CHARS)


# ----------------------------------------------------------------------------------------------------
# Images


def to_hwc_uint8(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """Convert an image to an (H,W,3) ``uint8`` array.

    Accepts numpy HWC/HW ``uint8`` (as is) or float in [0,1], and torch CHW/HW (or B=1 BCHW) float in [0,1]
    or ``uint8``. Gray images become 3-channel.
    """
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.dim() == 4 and t.shape[0] == 1:
            t = t[0]
        if t.dim() == 3:
            t = t.permute(1, 2, 0)
        elif t.dim() != 2:
            raise ValueError(f"image tensor must be CHW or HW, got shape {tuple(image.shape)}")
        array = t.float().numpy() if t.is_floating_point() else t.numpy()
    else:
        array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3):
        raise ValueError(f"image must be HWC with 1 or 3 channels, got shape {array.shape}")
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"image must be uint8 or float in [0,1], got dtype {array.dtype}")
    return np.ascontiguousarray((np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))


def captioned_row(tiles: list[tuple[str, np.ndarray | torch.Tensor]], gap: int = 4, band: int = 22) -> np.ndarray:
    """Pictures side by side, each under its caption: an HWC ``uint8`` array on a white background.

    ``tiles`` are ``(caption, image)`` pairs of one size (anything :func:`to_hwc_uint8` takes). Captions are drawn
    in black in a ``band``-pixel strip above each picture with PIL's built-in font (nothing is downloaded).
    """
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=band - 6)  # scalable where PIL has FreeType
    except (TypeError, ValueError, OSError, ImportError):
        font = ImageFont.load_default()

    if not tiles:
        raise ValueError("captioned_row needs at least one picture")
    pictures = [to_hwc_uint8(image) for _, image in tiles]
    h, w = pictures[0].shape[:2]
    if any(p.shape[:2] != (h, w) for p in pictures):
        raise ValueError(f"captioned_row pictures must share one size, got {[p.shape[:2] for p in pictures]}")
    canvas = np.full((band + h, len(pictures) * w + (len(pictures) - 1) * gap, 3), 255, dtype=np.uint8)
    for index, picture in enumerate(pictures):
        left = index * (w + gap)
        canvas[band:, left: left + w] = picture
    drawn = Image.fromarray(canvas)
    pen = ImageDraw.Draw(drawn)
    for index, (caption, _) in enumerate(tiles):
        pen.text((index * (w + gap) + 3, 2), caption, fill=(0, 0, 0), font=font)
    return np.asarray(drawn)


def sample_grid(image: torch.Tensor, mask: torch.Tensor, output: torch.Tensor, truth: torch.Tensor,
                max_rows: int = 4, gap: int = 2) -> np.ndarray:
    """A picture of a batch: one row per sample, columns ``input | masked | output | truth``.

    ``image`` is what the generator was given, ``masked`` shows it with the hole painted white,
    ``output`` is the generator's (composited) result and ``truth`` the target. Tensors are (B,C,H,W) in
    [0,1], mask (B,1,H,W) with 1 = hole. Returns an HWC ``uint8`` array with ``gap``-pixel white lines.
    """
    if image.dim() != 4 or output.shape != image.shape or truth.shape != image.shape:
        raise ValueError(
            f"sample_grid needs image, output and truth of one (B,3,H,W) shape, got "
            f"{tuple(image.shape)}, {tuple(output.shape)}, {tuple(truth.shape)}"
        )
    if mask.dim() != 4 or mask.shape[0] != image.shape[0] or mask.shape[-2:] != image.shape[-2:]:
        raise ValueError(f"sample_grid mask must be (B,1,H,W) matching the image, got {tuple(mask.shape)}")
    rows = min(int(max_rows), image.shape[0])
    if rows < 1:
        raise ValueError("sample_grid needs at least one sample")
    with torch.no_grad():
        hole = mask[:rows, :1].detach().float().cpu()
        img = image[:rows].detach().float().cpu()
        masked = img * (1 - hole) + hole  # white where the hole is
        columns = [img, masked, output[:rows].detach().float().cpu(), truth[:rows].detach().float().cpu()]
    h, w = image.shape[-2:]
    canvas = np.full((rows * h + (rows - 1) * gap, 4 * w + 3 * gap, 3), 255, dtype=np.uint8)
    for r in range(rows):
        for c, column in enumerate(columns):
            top, left = r * (h + gap), c * (w + gap)
            canvas[top: top + h, left: left + w] = to_hwc_uint8(column[r])
    return canvas


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
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(self.run_id, sampling_interval=sampling_interval_s, resume_logging=True,
                                           tracking_uri=self._client.tracking_uri)
            monitor.start()
            self._system_monitor = monitor
        except Exception as exc:  # monitoring is optional: never fail training for it
            log.warning("system metrics not logged: %s", redact(str(exc)))

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until everything queued so far has been sent (or dropped); True when the queue is empty."""
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
        complete = self.flush()
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
                                operation.describe, operation.attempts, redact(str(exc).splitlines()[0] if str(exc) else exc))
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
    from mlflow.entities import RunTag

    return [RunTag(k, v) for k, v in tags.items()]
