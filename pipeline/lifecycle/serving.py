"""Ray Serve application serving ``models:/<name>@<alias>`` (the champion) and following the alias.

One deployment, :class:`InpaintingDeployment`, answers over HTTP:

* ``POST <route>`` with JSON ``{"image": base64 PNG/JPEG/WebP, "mask": base64 gray PNG (255 = hole),
  "strategy": "crop" | "whole" (optional)}`` → ``{"image": base64 PNG, "model": name, "model_version": "7",
  "width": W, "height": H, "batch_size": requests batched with it}``; a refused request gets HTTP
  400/413/503/504 ``{"error": one line}`` (503 with ``Retry-After``), a failure inside inference 500;
* ``GET <route>/-/version`` → the version this replica serves (``replica`` names it) and, in ``replicas``, the
  version of every live replica;
* ``POST <route>/-/refresh`` → re-resolve the alias now on every replica (the admin call; :class:`RefreshBroadcast`
  carries it to the replicas the proxy did not pick) and answer once all serve the version it names (503 naming
  the replicas that do not).

A request's failure is its own: a bad input gets HTTP 400 and an internal error HTTP 500, each with a one-line
``error``; the requests batched with it get their images. ``strategy`` in a request wins over the served version's
default; the limits and the window sizes are the version's own serving defaults (those the pyfunc model
applies), unless the serve config overrides them.

No request can hurt the replica; each bound is checked before the bytes, memory or work it bounds are spent:

* **bytes**: a body over ``max_body_bytes`` (default from the pixel limit, :func:`default_body_bytes`) gets 413,
  from its ``Content-Length`` before it is read, or while it streams when it has none;
* **formats and pixels**: the image and mask are PNG, JPEG or WebP (:data:`models.codec.ALLOWED_FORMATS`) and at
  most ``max_pixels``, read from their headers before they are decoded (400);
* **memory**: the bodies and decoded requests a replica holds are counted (:class:`InflightBytes`); past
  ``max_inflight_bytes`` a request gets 503 with ``Retry-After`` instead of being read or decoded. Queued requests
  are uint8 (4 bytes a pixel) and become float per batch, on the device; the deployment declares its memory to Ray
  from these limits (:meth:`ServeJobConfig.replica_memory`);
* **work**: ``strategy: whole`` above ``max_whole_pixels`` gets 400 naming the key; whole generator calls hold at
  most ``max_whole_pixels`` in all; the crop strategy makes at most ``hires.max_windows`` windows per image;
  a request past ``request_timeout_s`` gets 504 (checked before each generator call), and the replica serves on;
* **errors**: malformed or deeply nested JSON is 400; nothing a client sends gets anything but a JSON answer.

A replica keeps a local copy of the version it serves (``cache_dir``, :class:`LocalCopies`) and starts from it
when the registry is down (it says so in the log), then follows the alias again once the registry answers.

Requests that arrive together are batched (``@serve.batch``, same-size images in one generator call); every
answer names the model version that produced it. A background thread re-resolves the alias every
``refresh_interval_s``, so moving ``champion`` in the MLflow UI reaches serving without a redeploy: the new
version is loaded beside the old one and swapped in between batches. Replicas take a GPU when the cluster has
one (``use_gpu: auto``).

The model logic is :class:`AliasFollowingInpainter` (plain Python, testable without Ray); the deployment only
adds HTTP and batching. Run it with ``python jobs/serve.py`` or ``serve run pipeline.lifecycle.serving:app_builder
config=jobs/configs/serve.yaml``; ``serve deploy`` takes the same import path and args in its config file.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import torch.nn as nn
from pydantic import Field, field_validator
import ray
from ray import serve
from starlette.responses import Response

from models.codec import decode_opened, encode_png, read_headers, to_float
from models.inpaint import CropStrategy, DeadlineExceeded, check_deadline, inpaint_tensor
from pipeline.config import Config, load_config
from pipeline.errors import one_line
from pipeline.lifecycle.alias_webhook import check_refresh_url
from pipeline.lifecycle.packaging import HiresSettings, LoadedModel, ServingDefaults, download_model, load_model
from pipeline.tracking import mlflow_client, redact, resolve_tracking_uri

__all__ = ["AliasFollowingInpainter", "Answer", "InflightBytes", "InpaintRequest", "InpaintingDeployment", "LocalCopies",
           "Overloaded", "RefreshBroadcast", "ServeJobConfig", "ServedModel", "build_app", "default_body_bytes",
           "use_gpu"]

log = logging.getLogger("holefill.serve")


# /-/version and /-/refresh take request slots too: keep two free beside a running and a filling batch.
ADMIN_SLOTS = 2

# What a request costs a replica in memory, per byte of body and per pixel, used to account for it before it is
# spent: the body, its parsed JSON string and the base64-decoded fields (~3x the body); while decoding, Pillow's RGB
# image, its array and the tensor (~10 bytes a pixel); while queued, the uint8 image + mask (4 bytes a pixel).
BODY_COPIES = 3
DECODE_BYTES_PER_PIXEL = 10
HELD_BYTES_PER_PIXEL = 4
# A replica's memory beyond its requests: Python, torch, Ray's worker and the generator's weights.
BASE_MEMORY_BYTES = 1536 << 20
# RN's whole pass on a CPU needs ~1.6 KB a pixel (measured: 1024^2 +1,755 MB); the crop strategy's full-size float
# copies (image, result, mask) ~32 bytes a pixel of the photo.
WHOLE_BYTES_PER_PIXEL = 2048
CROP_BYTES_PER_PIXEL = 32
DEFAULT_INFLIGHT_BYTES = 1 << 30
# A deadline's answer waits for the batch that holds the request at most this much longer (its work is checked
# against the deadline between generator calls, so it stops within one call).
DEADLINE_GRACE_S = 5.0


def default_body_bytes(max_pixels: int) -> int:
    """The request-body limit a pixel limit needs: base64 of an image stored raw (8-bit RGBA) and a gray mask, + 4 MiB."""
    return math.ceil(4 / 3 * 5 * max_pixels) + (4 << 20)


class ServeJobConfig(Config):
    """``jobs/serve.py``: which model to follow, how to batch, where to run, and what one request may cost.

    What a request may be (``max_pixels``, ``max_whole_pixels``, ``request_timeout_s``) and how large photos are
    inpainted (``hires``, ``hires.max_windows``) are the served version's own serving defaults, set when it was
    registered (the same ones the pyfunc model applies); set them here to override every version's. The replica's
    own bounds: ``max_body_bytes`` (413 past it; default from the pixel limit), ``max_inflight_bytes`` (bodies
    and decoded images a replica holds at once; 503 with ``Retry-After`` past it), ``memory_bytes`` (what a
    replica declares to Ray; default from these limits), ``cache_dir`` (the local copy a replica starts from when
    the registry is down; ``null``: none).
    """

    model: str = "lbam"  # registered model name
    alias: str = "champion"
    tracking_uri: str | None = None  # default: MLFLOW_TRACKING_URI, then the local store
    refresh_interval_s: float = Field(default=30.0, gt=0)
    max_batch_size: int = Field(default=8, ge=1)
    batch_wait_timeout_s: float = Field(default=0.01, ge=0)
    max_ongoing_requests: int | None = Field(default=None, ge=1)  # per replica; default 2 x batch + 2 admin calls
    num_replicas: int = Field(default=1, ge=1)
    use_gpu: Literal["auto"] | bool = "auto"
    num_cpus: float = Field(default=1.0, ge=0)
    max_pixels: int | None = Field(default=None, ge=1)  # None: the served version's own
    max_whole_pixels: int | None = Field(default=None, ge=1)  # None: the served version's own
    request_timeout_s: float | None = Field(default=None, gt=0)  # None: the served version's own
    hires: HiresSettings | None = None  # None: the served version's own
    max_body_bytes: int | None = Field(default=None, ge=1)  # None: default_body_bytes(max_pixels)
    max_inflight_bytes: int | None = Field(default=None, ge=1)  # None: 1 GiB, or two largest requests if more
    retry_after_s: int = Field(default=1, ge=0)
    memory_bytes: int | None = Field(default=None, ge=0)  # declared to Ray per replica; None: from the limits
    cache_dir: str | None = "~/.cache/holefill/serving"
    app_name: str = "holefill"
    route_prefix: str = "/inpaint"
    host: str = "127.0.0.1"  # HTTP proxy address (0.0.0.0 to serve other hosts)
    port: int = Field(default=8000, ge=0, le=65535)
    # The refresh endpoint as the MLflow server reaches it (http://<host>:<port><route_prefix>/-/refresh): set,
    # jobs/serve.py registers a registry webhook that calls it when an alias moves (pipeline/lifecycle/alias_webhook.py)
    alias_webhook_url: str | None = None

    @field_validator("alias_webhook_url")
    @classmethod
    def _refresh_endpoint(cls, url: str | None) -> str | None:
        if url is not None:
            check_refresh_url(url)
        return url

    def ongoing_requests(self) -> int:
        """Requests a replica takes at once: a batch being inpainted, the next one filling, and the admin calls
        (Ray Serve's default of 5 would cap every batch at 5, whatever ``max_batch_size`` says)."""
        return self.max_ongoing_requests or 2 * self.max_batch_size + ADMIN_SLOTS

    def serving_for(self, own: ServingDefaults) -> ServingDefaults:
        """A version's own serving defaults with this config's overrides applied."""
        update: dict[str, Any] = {}
        for key in ("max_pixels", "max_whole_pixels", "request_timeout_s", "hires"):
            if getattr(self, key) is not None:
                update[key] = getattr(self, key)
        return own.model_copy(update=update)

    def body_limit(self, serving: ServingDefaults) -> int:
        """The largest request body (bytes) a replica reads under ``serving``."""
        return self.max_body_bytes or default_body_bytes(serving.max_pixels)

    def inflight_limit(self, serving: ServingDefaults) -> int:
        """Bytes of bodies and decoded requests a replica holds at once (past it: 503 with Retry-After)."""
        if self.max_inflight_bytes is not None:
            return self.max_inflight_bytes
        largest = BODY_COPIES * self.body_limit(serving) + DECODE_BYTES_PER_PIXEL * serving.max_pixels
        return max(DEFAULT_INFLIGHT_BYTES, 2 * largest)

    def replica_memory(self) -> int:
        """Bytes a replica declares to Ray: its base, the requests in flight, and the peak of one inference, from
        this config's limits (the serving defaults' where it sets none)."""
        if self.memory_bytes is not None:
            return self.memory_bytes
        serving = self.serving_for(ServingDefaults())
        limit = serving.hires.limit
        inference = max(serving.max_whole_pixels * WHOLE_BYTES_PER_PIXEL,
                        limit * limit * WHOLE_BYTES_PER_PIXEL + serving.max_pixels * CROP_BYTES_PER_PIXEL)
        return BASE_MEMORY_BYTES + self.inflight_limit(serving) + inference


@dataclass(frozen=True)
class ServedModel:
    """One loaded model version: what a batch runs on, what its answers name, and how it treats requests."""

    version: str
    generator: nn.Module
    arch: str
    serving: ServingDefaults = field(default_factory=ServingDefaults)


@dataclass(frozen=True)
class InpaintRequest:
    """A decoded request, held as uint8 until its batch runs: (1,3,H,W) image, (1,1,H,W) mask (1 = hole), the
    strategy asked for (``None``: the model's) and its deadline (:func:`time.monotonic` seconds; ``None``: none)."""

    image: torch.Tensor
    mask: torch.Tensor
    strategy: str | None = None
    deadline: float | None = None

    @property
    def pixels(self) -> int:
        return int(self.image.shape[-2]) * int(self.image.shape[-1])


@dataclass(frozen=True)
class Answer:
    """What one request gets: the PNG and the version that made it, or an HTTP status with a one-line reason;
    ``batch_size``: how many requests were batched with it (itself included)."""

    version: str
    png: bytes | None = None
    status: int = 200
    error: str | None = None
    batch_size: int = 1


class Overloaded(Exception):
    """The replica holds as many request bytes as it may: answered 503 with ``Retry-After``."""


def _failure(version: str, exc: BaseException) -> Answer:
    """Bad input is the client's (400), a deadline 504, a full replica 503; anything else is ours (500), logged."""
    if isinstance(exc, ValueError):
        return Answer(version, status=400, error=one_line(exc))
    if isinstance(exc, DeadlineExceeded):
        return Answer(version, status=504, error=one_line(exc))
    if isinstance(exc, Overloaded):
        return Answer(version, status=503, error=one_line(exc))
    log.error("inpainting failed with version %s", version, exc_info=exc)
    return Answer(version, status=500, error=f"internal error: {one_line(exc)}")


class LocalCopies:
    """A replica's local copy of the versions it serves, to start from while the registry is down.

    ``<cache_dir>/<model>/<version>/`` is the version's MLflow model folder (downloaded once, published by a
    rename so a crash leaves no half copy) and ``<cache_dir>/<model>/@<alias>`` names the version last served for
    the alias. The served version and the one before it are kept; older copies are removed.
    """

    KEEP = 2

    def __init__(self, cache_dir: str, model: str, alias: str, tracking_uri: str | None) -> None:
        self.root = Path(cache_dir).expanduser() / model
        self.alias, self.model, self.tracking_uri = alias, model, tracking_uri

    def folder(self, version: str) -> Path:
        return self.root / str(version)

    def fetch(self, version: str) -> Path:
        """The local copy of ``version``, downloaded from the registry when there is none yet."""
        target = self.folder(version)
        if (target / "MLmodel").is_file():
            return target
        self.root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{version}-", dir=self.root) as tmp:
            local = download_model(f"models:/{self.model}/{version}", self.tracking_uri, tmp)
            try:
                os.replace(local, target)
            except OSError:  # another replica on this node published it first
                if not (target / "MLmodel").is_file():
                    raise
        return target

    def remember(self, version: str) -> None:
        """Record ``version`` as the alias's last served one (atomically) and drop copies older than the last two."""
        pointer = self.root / f"@{self.alias}"
        previous = self.last()
        tmp = pointer.with_name(f".{pointer.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"version": str(version), "at": time.time()}))
        os.replace(tmp, pointer)
        keep = {str(version), *([previous] if previous else [])}
        for child in self.root.iterdir():
            if child.is_dir() and not child.name.startswith(".") and child.name not in keep:
                shutil.rmtree(child, ignore_errors=True)

    def last(self) -> str | None:
        """The version last served for the alias, if its copy is here."""
        try:
            version = str(json.loads((self.root / f"@{self.alias}").read_text())["version"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        # a registry version is a number: anything else in the pointer (a planted "../…") names no copy of ours
        return version if version.isdigit() and (self.folder(version) / "MLmodel").is_file() else None


class AliasFollowingInpainter:
    """The generator behind ``models:/<model>@<alias>``, re-resolved on demand and swapped atomically.

    ``loader(uri, tracking_uri) -> LoadedModel`` (generator, arch and the version's serving defaults) and
    ``resolver() -> version`` default to the MLflow registry. A batch takes :attr:`current` once, so every
    image of a batch (and its answer) uses one version. With ``copies`` (:class:`LocalCopies`) every version is
    loaded from its local copy, and a replica that cannot reach the registry starts from the last one it served
    (and says so in the log), then follows the alias again once the registry answers.
    """

    def __init__(self, config: ServeJobConfig, device: str | torch.device = "cpu",
                 loader: Callable[[str, str | None], LoadedModel] = load_model,
                 resolver: Callable[[], str] | None = None, copies: LocalCopies | None = None) -> None:
        self.config, self.device, self._loader = config, torch.device(device), loader
        self._resolver = resolver or self._registry_version
        self._swap = threading.Lock()
        self.copies = copies
        self.from_local_copy = False
        self.current: ServedModel = self._start()

    def _start(self) -> ServedModel:
        try:
            return self._load(self.resolve())
        except Exception as exc:
            version = self.copies.last() if self.copies is not None else None
            if version is None:
                raise
            log.warning("registry unreachable (%s): starting %s from the local copy of version %s in %s; following "
                        "%s@%s again once the registry answers", redact(one_line(exc)), self.config.model, version,
                        self.copies.folder(version), self.config.model, self.config.alias)
            self.from_local_copy = True
            return self._served(version, self._loader(str(self.copies.folder(version)), self.config.tracking_uri))

    def _registry_version(self) -> str:
        client = mlflow_client(self.config.tracking_uri)
        return str(client.get_model_version_by_alias(self.config.model, self.config.alias).version)

    def resolve(self) -> str:
        """The version the alias points at now."""
        return str(self._resolver())

    def _served(self, version: str, loaded: LoadedModel) -> ServedModel:
        log.info("serving %s version %s (%s) on %s", self.config.model, version, loaded.arch, self.device)
        return ServedModel(version, loaded.generator.to(self.device).eval(), loaded.arch,
                           self.config.serving_for(loaded.serving))

    def _load(self, version: str) -> ServedModel:
        if self.copies is None:
            return self._served(version, self._loader(f"models:/{self.config.model}/{version}",
                                                      self.config.tracking_uri))
        served = self._served(version, self._loader(str(self.copies.fetch(version)), self.config.tracking_uri))
        self.copies.remember(version)
        return served

    def refresh(self) -> str:
        """Re-resolve the alias; load and swap in the version it names if that changed. Returns the served version."""
        with self._swap:  # the timer and the admin call never load the same version twice
            version = self.resolve()
            if self.from_local_copy:
                log.info("registry reachable again: %s@%s is version %s", self.config.model, self.config.alias,
                         version)
                self.from_local_copy = False
            if version != self.current.version:
                self.current = self._load(version)
            return self.current.version

    def follow(self, stop: threading.Event) -> None:
        """Refresh every ``refresh_interval_s`` until ``stop`` is set; a failed refresh keeps the current model."""
        while not stop.wait(self.config.refresh_interval_s):
            try:
                self.refresh()
            except Exception as exc:  # the registry may be down for a while: keep serving, say why
                log.warning("alias refresh of %s@%s failed, still serving version %s: %s", self.config.model,
                            self.config.alias, self.current.version, redact(one_line(exc)))

    def fields(self, payload: Any) -> tuple[bytes, bytes, str | None]:
        """A parsed JSON body -> ``(image bytes, mask bytes, strategy)``; ``ValueError`` with a one-line reason."""
        if not isinstance(payload, dict):
            raise ValueError("request body must be a JSON object with base64 fields image and mask")
        strategy = payload.get("strategy")
        if strategy is not None and strategy not in ("crop", "whole"):
            raise ValueError(f"strategy must be crop or whole, got {str(strategy)[:40]!r}")
        found = []
        for name in ("image", "mask"):
            value = payload.get(name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"request field {name} is missing: send it as base64 encoded PNG, JPEG or WebP bytes")
            try:
                found.append(base64.b64decode(value, validate=False))
            except (binascii.Error, ValueError):
                raise ValueError(f"request field {name} is not base64") from None
        return found[0], found[1], strategy

    def check_work(self, serving: ServingDefaults, strategy: str | None, width: int, height: int) -> None:
        """Refuse a request whose work is over the limits before it is decoded (``strategy: whole`` over the cap)."""
        name = strategy or serving.hires.strategy
        if strategy == "whole" and width * height > serving.max_whole_pixels:
            raise ValueError(f"strategy whole is limited to {serving.max_whole_pixels} pixels, the image is {width}x"
                             f"{height} = {width * height}: send strategy crop, or raise max_whole_pixels in the "
                             "serving config")
        if name not in ("crop", "whole"):
            raise ValueError(f"strategy must be crop or whole, got {name!r}")

    def decode(self, payload: Any, admit: Callable[[int], None] | None = None,
               deadline: float | None = None) -> InpaintRequest:
        """A JSON request body (parsed) -> :class:`InpaintRequest` (uint8); ``ValueError`` with a one-line reason.

        Formats, bytes, pixels, sizes and the work asked for are checked from the headers first; ``admit(pixels)``
        (the replica's memory account; raises :class:`Overloaded`) is called before anything is decoded. The
        limits are the served version's (:attr:`ServedModel.serving`)."""
        serving = self.current.serving
        image, mask, strategy = self.fields(payload)
        opened_image, opened_mask, width, height = read_headers(image, mask, serving.max_pixels)
        self.check_work(serving, strategy, width, height)
        if admit is not None:
            admit(width * height)
        image_u8, mask_u8 = decode_opened(opened_image, opened_mask, width, height)
        return InpaintRequest(image_u8, mask_u8, strategy, deadline)

    def parse(self, body: bytes, admit: Callable[[int], None] | None = None,
              deadline: float | None = None) -> InpaintRequest:
        """Raw HTTP body bytes -> :class:`InpaintRequest` (JSON, base64 and image decoding; run it off the event loop)."""
        try:
            payload = json.loads(body)
        except RecursionError:
            raise ValueError("request body is not JSON this server reads: nested too deeply") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"request body is not JSON: {one_line(exc)}") from None
        return self.decode(payload, admit, deadline)

    def _plan(self, served: ServedModel, item: InpaintRequest) -> CropStrategy | None:
        """The windows for one request (``None``: through whole), within the version's limits."""
        serving = served.serving
        windows = serving.hires.strategy_for(item.strategy)
        height, width = item.image.shape[-2:]
        if windows is None and item.pixels > serving.max_whole_pixels:
            if item.strategy == "whole":
                self.check_work(serving, "whole", int(width), int(height))
            windows = serving.hires.strategy_for("crop")  # the version's default is whole, the image too large
        if windows is not None and max(height, width) <= windows.trigger and item.pixels > serving.max_whole_pixels:
            windows = replace(windows, trigger=1)  # under the trigger, but too large to go through whole
        return windows

    def run_batch(self, items: list[InpaintRequest]) -> list[Answer]:
        """Inpaint decoded requests with one model version: one :class:`Answer` per request, in order.

        Requests of the same size that go through whole share generator calls of at most ``max_whole_pixels`` in
        all; windowed ones (``crop``, the request's choice or else the version's default, on photos over the
        trigger) run per image, at most ``hires.max_windows`` windows each. A request past its deadline gets 504
        (checked before each generator call). A failing call is retried request by request, so a request's
        failure stays its own: a bad input answers 400 and an internal error 500, each with a one-line reason; the
        others get their images.
        """
        served = self.current
        answers: list[Answer | None] = [None] * len(items)
        groups: dict[tuple, tuple[CropStrategy | None, list[int]]] = {}
        for index, item in enumerate(items):
            try:
                windows = self._plan(served, item)
            except ValueError as exc:
                answers[index] = _failure(served.version, exc)
                continue
            if windows is not None and max(item.image.shape[-2:]) > windows.trigger:
                groups[("window", index)] = (windows, [index])
            else:
                groups.setdefault(("whole", tuple(item.image.shape[-2:])), (None, []))[1].append(index)
        calls: list[tuple[CropStrategy | None, list[int]]] = []
        for windows, indices in groups.values():
            chunk: list[int] = []
            for i in indices:  # whole calls of at most max_whole_pixels (one request at least)
                if chunk and (len(chunk) + 1) * items[i].pixels > served.serving.max_whole_pixels:
                    calls.append((windows, chunk))
                    chunk = []
                chunk.append(i)
            calls.append((windows, chunk))
        for windows, indices in calls:
            live = []
            for i in indices:
                try:
                    check_deadline(items[i].deadline, "the request waited for inference")
                    live.append(i)
                except DeadlineExceeded as exc:
                    answers[i] = _failure(served.version, exc)
            if not live:
                continue
            try:
                pngs = self._inpaint(served, [items[i] for i in live], windows)
            except Exception as exc:
                if len(live) == 1:
                    answers[live[0]] = _failure(served.version, exc)
                    continue
                pngs = [None] * len(live)
                for row, i in enumerate(live):  # one request's failure stays its own
                    try:
                        pngs[row] = self._inpaint(served, [items[i]], windows)[0]
                    except Exception as single:
                        answers[i] = _failure(served.version, single)
            for i, png in zip(live, pngs):
                if png is not None:
                    answers[i] = Answer(served.version, png)
        return [replace(a, batch_size=len(items)) for a in answers]  # type: ignore[arg-type]

    def _inpaint(self, served: ServedModel, items: list[InpaintRequest], windows: CropStrategy | None) -> list[bytes]:
        deadlines = [item.deadline for item in items if item.deadline is not None]
        # uint8 to the device, float there, for this call only (what waits in the queue stays uint8).
        image, mask = to_float(torch.cat([item.image for item in items]).to(self.device),
                               torch.cat([item.mask for item in items]).to(self.device))
        with torch.no_grad():
            out = inpaint_tensor(served.generator, served.arch, image, mask, strategy=windows,
                                 deadline=min(deadlines) if deadlines else None)
        del image, mask
        return [encode_png(out[row:row + 1]) for row in range(len(items))]


def use_gpu(setting: Literal["auto"] | bool) -> bool:
    """Whether replicas ask for a GPU: ``auto`` = the connected Ray cluster has one (else this machine does)."""
    if setting != "auto":
        return bool(setting)
    if ray.is_initialized():
        return ray.cluster_resources().get("GPU", 0) >= 1
    return torch.cuda.is_available()


def _json(body: dict, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body), status_code=status, media_type="application/json", headers=headers)


class InflightBytes:
    """The bytes of request bodies and decoded requests a replica holds: taken before they are spent, given back
    when the answer is sent. Past ``limit``, :meth:`take` raises :class:`Overloaded` (the request gets 503)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used, self.peak = int(limit), 0, 0
        self._lock = threading.Lock()

    def take(self, count: int) -> int:
        with self._lock:
            if self.used + count > self.limit:
                raise Overloaded(f"replica busy: {self.used + count} bytes of requests in flight would exceed "
                                 f"max_inflight_bytes {self.limit}; retry later")
            self.used += count
            self.peak = max(self.peak, self.used)
        return count

    def give(self, count: int) -> None:
        with self._lock:
            self.used = max(0, self.used - count)


class BodyTooLarge(Exception):
    """A request body over ``max_body_bytes`` (413)."""


def _replica() -> str:
    """This replica's id (what an admin answer speaks for), or ``local`` outside Ray Serve."""
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # not inside a replica (tests call the class directly)
        return "local"


def _response(answer: Answer, item: InpaintRequest, model: str) -> Response:
    if answer.status != 200:
        return _json({"error": answer.error, "model": model, "model_version": answer.version,
                      "batch_size": answer.batch_size}, answer.status)
    return _json({"image": base64.b64encode(answer.png).decode("ascii"), "model": model,
                  "model_version": answer.version, "width": int(item.image.shape[-1]),
                  "height": int(item.image.shape[-2]), "batch_size": answer.batch_size})


# Replicas report to the broadcast this often; one silent for LIVE_S is taken as gone.
REPORT_INTERVAL_S = 0.5
LIVE_S = 10.0
REFRESH_WAIT_S = 120.0  # how long an admin refresh waits for every replica to have loaded the new version


@serve.deployment(name="refresh-broadcast", num_replicas=1, ray_actor_options={"num_cpus": 0})
class RefreshBroadcast:
    """How an admin refresh reaches every replica (the proxy hands it to one of them).

    A refresh bumps :attr:`generation`; every inpainter replica reports ``(generation seen, version served)``
    every :data:`REPORT_INTERVAL_S` and refreshes when it is behind, so the replica that took the admin call
    can wait until all have, and answer for all of them.
    """

    def __init__(self) -> None:
        self.generation = 0
        self._reports: dict[str, tuple[int, str, float]] = {}

    def bump(self) -> int:
        """Ask every replica to refresh; returns the generation they must reach."""
        self.generation += 1
        return self.generation

    def report(self, replica: str, generation: int, version: str) -> int:
        """A replica's state; returns the generation it should be at."""
        self._reports[replica] = (generation, version, time.monotonic())
        return self.generation

    def replicas(self) -> dict[str, tuple[int, str]]:
        """``{replica: (generation, version)}`` of the replicas heard from in the last :data:`LIVE_S` seconds."""
        now = time.monotonic()
        return {r: (g, v) for r, (g, v, seen) in self._reports.items() if now - seen <= LIVE_S}


@serve.deployment(name="inpainter")
class InpaintingDeployment:
    """HTTP front of :class:`AliasFollowingInpainter` with dynamic batching (see the module docstring).

    The event loop only moves bytes: JSON, base64 and image decoding, PNG encoding and the response body are
    made in worker threads, so a large payload never stalls the batching task.
    """

    def __init__(self, config: dict, broadcast: Any = None) -> None:
        self.config = ServeJobConfig.model_validate(config)
        copies = None
        if self.config.cache_dir:
            copies = LocalCopies(self.config.cache_dir, self.config.model, self.config.alias, self.config.tracking_uri)
        self.model = AliasFollowingInpainter(self.config, "cuda" if torch.cuda.is_available() else "cpu",
                                             copies=copies)
        self.inflight = InflightBytes(self.config.inflight_limit(self.model.current.serving))
        self.replica = _replica()
        self._infer.set_max_batch_size(self.config.max_batch_size)
        self._infer.set_batch_wait_timeout_s(self.config.batch_wait_timeout_s)
        self._stop = threading.Event()
        self._broadcast, self._generation = broadcast, None
        threading.Thread(target=self.model.follow, args=(self._stop,), name="alias-follower", daemon=True).start()
        if broadcast is not None:
            threading.Thread(target=self._listen, name="refresh-listener", daemon=True).start()

    def _listen(self) -> None:
        """Report to the broadcast and refresh when another replica took an admin refresh (see RefreshBroadcast)."""
        while not self._stop.wait(REPORT_INTERVAL_S):
            try:
                wanted = self._broadcast.report.remote(self.replica, self._generation or 0,
                                                       self.model.current.version).result(timeout_s=30)
                if self._generation is not None and wanted != self._generation:
                    try:
                        self.model.refresh()
                    except Exception as exc:  # the admin call names this replica's version; keep serving
                        log.warning("refresh of %s@%s failed on replica %s: %s", self.config.model, self.config.alias,
                                    self.replica, redact(one_line(exc)))
                self._generation = wanted  # a new replica starts fresh: nothing to catch up on
            except Exception as exc:
                log.warning("refresh broadcast unreachable from replica %s: %s", self.replica, one_line(exc))

    def __del__(self) -> None:  # Ray Serve calls it when the replica shuts down
        self._stop.set()

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)  # the configured values are set per replica
    async def _infer(self, items: list[InpaintRequest]) -> list[Answer]:
        # The generator runs in a worker thread so the replica keeps accepting (and decoding) requests meanwhile.
        return await asyncio.to_thread(self.model.run_batch, items)

    async def _replicas(self) -> dict[str, tuple[int, str]]:
        if self._broadcast is None:
            return {self.replica: (0, self.model.current.version)}
        return await self._broadcast.replicas.remote()

    async def _version(self) -> dict:
        """This replica's version and, by replica id, every live replica's."""
        replicas = await self._replicas()
        return {"model": self.config.model, "model_version": self.model.current.version, "replica": self.replica,
                "replicas": {r: v for r, (_, v) in sorted(replicas.items())}}

    async def _refresh(self) -> Response:
        """Re-resolve the alias on every replica; answer once all have the version (503 naming those that have not)."""
        generation = await self._broadcast.bump.remote() if self._broadcast is not None else None
        try:
            version = await asyncio.to_thread(self.model.refresh)
        except Exception as exc:
            return _json({"error": f"refresh failed: {one_line(exc)}", **await self._version()}, 503)
        deadline = time.monotonic() + REFRESH_WAIT_S
        while generation is not None:
            behind = sorted(r for r, (g, _) in (await self._replicas()).items() if g < generation and r != self.replica)
            if not behind:
                break
            if time.monotonic() > deadline:
                return _json({"error": f"replicas {', '.join(behind)} did not refresh within {REFRESH_WAIT_S:.0f} s",
                              **await self._version()}, 503)
            await asyncio.sleep(REPORT_INTERVAL_S / 2)
        body = await self._version()
        body["replicas"][self.replica] = version
        stale = sorted(r for r, v in body["replicas"].items() if v != version)
        if stale:
            return _json({"error": f"replicas {', '.join(stale)} still serve another version", **body}, 503)
        return _json(body)

    async def __call__(self, request):
        try:
            path = request.url.path.rstrip("/")
            if path.endswith("/-/version"):
                return _json(await self._version())
            if path.endswith("/-/refresh"):
                if request.method != "POST":
                    return _json({"error": "POST to refresh"}, 405)
                return await self._refresh()
            if request.method != "POST":
                return _json({"error": "POST a JSON object {image, mask} (base64 PNG, JPEG or WebP)"}, 405)
            return await self._inpaint(request)
        except Exception as exc:  # nothing a client sends gets anything but JSON
            log.error("request failed on replica %s", self.replica, exc_info=exc)
            return _json({"error": f"internal error: {one_line(exc)}", "model": self.config.model}, 500)

    async def _read_body(self, request, limit: int, account: list[int]) -> bytes:
        """The body, read only up to ``limit`` bytes (:class:`BodyTooLarge` past it), its bytes taken from the
        replica's account as they arrive (when the client sent no Content-Length), and its parsing copies once read."""
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(f"request body is over the limit of {limit} bytes (max_body_bytes)")
            if account[0] < size:
                account[0] += self.inflight.take(size - account[0])
            chunks.append(chunk)
        if account[0] < BODY_COPIES * size:
            account[0] += self.inflight.take(BODY_COPIES * size - account[0])
        return b"".join(chunks)

    async def _inpaint(self, request) -> Response:
        """One inpainting request: bytes, memory and work bounded before they are spent (see the module docstring)."""
        serving = self.model.current.serving
        limit = self.config.body_limit(serving)
        length = request.headers.get("content-length")
        if length is not None:
            if not length.strip().isdigit():
                return _json({"error": f"Content-Length {length[:40]!r} is not a byte count"}, 400)
            if int(length) > limit:
                return _json({"error": f"request body of {int(length)} bytes is over the limit of {limit} bytes "
                                       "(max_body_bytes)"}, 413)
        account = [0]  # bytes this request holds of the replica's account, given back once it is answered
        busy = {"Retry-After": str(self.config.retry_after_s)}
        deadline = time.monotonic() + serving.request_timeout_s
        task = None
        try:
            try:
                if length is not None:
                    account[0] += self.inflight.take(BODY_COPIES * int(length))
                body = await self._read_body(request, limit, account)
            except BodyTooLarge as exc:
                return _json({"error": one_line(exc)}, 413)
            except Overloaded as exc:
                return _json({"error": one_line(exc)}, 503, busy)

            def admit(pixels: int) -> None:  # in the decoding thread, before the image is decoded
                account[0] += self.inflight.take(DECODE_BYTES_PER_PIXEL * pixels)

            try:
                item = await asyncio.to_thread(self.model.parse, body, admit, deadline)
            except ValueError as exc:
                return _json({"error": one_line(exc)}, 400)
            except Overloaded as exc:
                return _json({"error": one_line(exc)}, 503, busy)
            del body
            held = HELD_BYTES_PER_PIXEL * item.pixels  # the body and the decoding copies are gone: keep the uint8
            self.inflight.give(account[0] - held)
            account[0] = held
            task = asyncio.ensure_future(self._infer(item))
            task.add_done_callback(lambda _: self.inflight.give(held))
            try:
                answer = await asyncio.wait_for(asyncio.shield(task),
                                                max(0.0, deadline - time.monotonic()) + DEADLINE_GRACE_S)
            except asyncio.TimeoutError:
                return _json({"error": f"no answer within request_timeout_s ({serving.request_timeout_s:g} s)",
                              "model": self.config.model}, 504)
            return await asyncio.to_thread(_response, answer, item, self.config.model)
        finally:
            if task is None:
                self.inflight.give(account[0])


def build_app(config: ServeJobConfig):
    """The Ray Serve application for ``config`` (``serve.run(build_app(config))``); GPUs per :func:`use_gpu`."""
    gpu = use_gpu(config.use_gpu)
    # The memory a replica may use, from the limits (ServeJobConfig.replica_memory), so Ray places it honestly.
    options = {"num_cpus": config.num_cpus, "num_gpus": 1 if gpu else 0, "memory": config.replica_memory()}
    return InpaintingDeployment.options(num_replicas=config.num_replicas, ray_actor_options=options,
                                        max_ongoing_requests=config.ongoing_requests()).bind(
        config.model_dump(mode="json"), RefreshBroadcast.bind())


def app_builder(args: dict[str, str]):
    """``serve run pipeline.lifecycle.serving:app_builder config=jobs/configs/serve.yaml [set=key=value,…]``.

    Ray Serve's application-builder hook (also the ``import_path`` of a ``serve deploy`` config file, with the
    same ``args``). The tracking URI falls back to ``MLFLOW_TRACKING_URI`` as in every holefill job.
    """
    unknown = set(args) - {"config", "set"}
    if unknown:
        raise ValueError(f"unknown serve argument(s) {', '.join(sorted(unknown))}: use config=FILE and set=k=v,k=v")
    overrides = [item for item in str(args.get("set") or "").split(",") if item]
    config = load_config(ServeJobConfig, args.get("config"), overrides)
    config.tracking_uri = resolve_tracking_uri(config.tracking_uri, os.environ)
    return build_app(config)
