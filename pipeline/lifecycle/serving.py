"""Ray Serve application serving ``models:/<name>@<alias>`` (the champion) and following the alias.

One deployment, :class:`InpaintingDeployment`, answers over HTTP:

* ``POST <route>`` with JSON ``{"image": base64 PNG/JPEG, "mask": base64 gray PNG (255 = hole),
  "strategy": "crop" | "whole" (optional)}`` → ``{"image": base64 PNG, "model": name, "model_version": "7",
  "width": W, "height": H, "batch_size": requests batched with it}``; a bad request gets HTTP 400
  ``{"error": one line}``;
* ``GET <route>/-/version`` → the version this replica serves (``replica`` names it) and, in ``replicas``, the
  version of every live replica;
* ``POST <route>/-/refresh`` → re-resolve the alias now on every replica (the admin call; :class:`RefreshBroadcast`
  carries it to the replicas the proxy did not pick) and answer once all serve the version it names (503 naming
  the replicas that do not).

A request's failure is its own: a bad input gets HTTP 400 and an internal error HTTP 500, each with a one-line
``error``; the requests batched with it get their images. ``strategy`` in a request wins over the served version's
default; the pixel limit and the window sizes are the version's own serving defaults (those the pyfunc model
applies), unless the serve config overrides them.

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
import os
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Literal

import torch
import torch.nn as nn
from pydantic import Field
import ray
from ray import serve
from starlette.responses import Response

from models.codec import decode_request, encode_png
from models.inpaint import CropStrategy, inpaint_tensor
from pipeline.config import Config, load_config
from pipeline.errors import one_line
from pipeline.lifecycle.packaging import HiresSettings, LoadedModel, ServingDefaults, load_model
from pipeline.tracking import mlflow_client, redact, resolve_tracking_uri

__all__ = ["AliasFollowingInpainter", "Answer", "InpaintRequest", "InpaintingDeployment", "RefreshBroadcast",
           "ServeJobConfig", "ServedModel", "build_app", "use_gpu"]

log = logging.getLogger("holefill.serve")


# /-/version and /-/refresh take request slots too: keep two free beside a running and a filling batch.
ADMIN_SLOTS = 2


class ServeJobConfig(Config):
    """``jobs/serve.py``: which model to follow, how to batch, where to run.

    What a request may be (``max_pixels``) and how large photos are inpainted (``hires``) are the served
    version's own serving defaults, set when it was registered (the same ones the pyfunc model applies); set
    them here only to override every version's.
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
    hires: HiresSettings | None = None  # None: the served version's own
    app_name: str = "holefill"
    route_prefix: str = "/inpaint"
    host: str = "127.0.0.1"  # HTTP proxy address (0.0.0.0 to serve other hosts)
    port: int = Field(default=8000, ge=0, le=65535)

    def ongoing_requests(self) -> int:
        """Requests a replica takes at once: a batch being inpainted, the next one filling, and the admin calls
        (Ray Serve's default of 5 would cap every batch at 5, whatever ``max_batch_size`` says)."""
        return self.max_ongoing_requests or 2 * self.max_batch_size + ADMIN_SLOTS

    def serving_for(self, own: ServingDefaults) -> ServingDefaults:
        """A version's own serving defaults with this config's overrides applied."""
        update: dict[str, Any] = {}
        if self.max_pixels is not None:
            update["max_pixels"] = self.max_pixels
        if self.hires is not None:
            update["hires"] = self.hires
        return own.model_copy(update=update)


@dataclass(frozen=True)
class ServedModel:
    """One loaded model version: what a batch runs on, what its answers name, and how it treats requests."""

    version: str
    generator: nn.Module
    arch: str
    serving: ServingDefaults = field(default_factory=ServingDefaults)


@dataclass(frozen=True)
class InpaintRequest:
    """A decoded request: (1,3,H,W) image, (1,1,H,W) mask, and the strategy asked for (``None``: the model's)."""

    image: torch.Tensor
    mask: torch.Tensor
    strategy: str | None = None


@dataclass(frozen=True)
class Answer:
    """What one request gets: the PNG and the version that made it, or an HTTP status with a one-line reason;
    ``batch_size``: how many requests were batched with it (itself included)."""

    version: str
    png: bytes | None = None
    status: int = 200
    error: str | None = None
    batch_size: int = 1


def _failure(version: str, exc: BaseException) -> Answer:
    """Bad input is the client's (400); anything else is ours (500), logged with its traceback."""
    if isinstance(exc, ValueError):
        return Answer(version, status=400, error=one_line(exc))
    log.error("inpainting failed with version %s", version, exc_info=exc)
    return Answer(version, status=500, error=f"internal error: {one_line(exc)}")


class AliasFollowingInpainter:
    """The generator behind ``models:/<model>@<alias>``, re-resolved on demand and swapped atomically.

    ``loader(uri, tracking_uri) -> LoadedModel`` (generator, arch and the version's serving defaults) and
    ``resolver() -> version`` default to the MLflow registry. A batch takes :attr:`current` once, so every
    image of a batch (and its answer) uses one version.
    """

    def __init__(self, config: ServeJobConfig, device: str | torch.device = "cpu",
                 loader: Callable[[str, str | None], LoadedModel] = load_model,
                 resolver: Callable[[], str] | None = None) -> None:
        self.config, self.device, self._loader = config, torch.device(device), loader
        self._resolver = resolver or self._registry_version
        self._swap = threading.Lock()
        self.current: ServedModel = self._load(self.resolve())

    def _registry_version(self) -> str:
        client = mlflow_client(self.config.tracking_uri)
        return str(client.get_model_version_by_alias(self.config.model, self.config.alias).version)

    def resolve(self) -> str:
        """The version the alias points at now."""
        return str(self._resolver())

    def _load(self, version: str) -> ServedModel:
        loaded = self._loader(f"models:/{self.config.model}/{version}", self.config.tracking_uri)
        log.info("serving %s version %s (%s) on %s", self.config.model, version, loaded.arch, self.device)
        return ServedModel(version, loaded.generator.to(self.device).eval(), loaded.arch,
                           self.config.serving_for(loaded.serving))

    def refresh(self) -> str:
        """Re-resolve the alias; load and swap in the version it names if that changed. Returns the served version."""
        with self._swap:  # the timer and the admin call never load the same version twice
            version = self.resolve()
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

    def decode(self, payload: Any) -> InpaintRequest:
        """A JSON request body (parsed) -> :class:`InpaintRequest`; ``ValueError`` with a one-line reason when bad.

        The pixel limit is the served version's (:attr:`ServedModel.serving`)."""
        if not isinstance(payload, dict):
            raise ValueError("request body must be a JSON object with base64 fields image and mask")
        strategy = payload.get("strategy")
        if strategy is not None and strategy not in ("crop", "whole"):
            raise ValueError(f"strategy must be crop or whole, got {strategy!r}")
        fields = {}
        for name in ("image", "mask"):
            value = payload.get(name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"request field {name} is missing: send it as base64 encoded PNG/JPEG bytes")
            try:
                fields[name] = base64.b64decode(value, validate=False)
            except (binascii.Error, ValueError):
                raise ValueError(f"request field {name} is not base64") from None
        image, mask = decode_request(fields["image"], fields["mask"], self.current.serving.max_pixels)
        return InpaintRequest(image, mask, strategy)

    def parse(self, body: bytes) -> InpaintRequest:
        """Raw HTTP body bytes -> :class:`InpaintRequest` (JSON, base64 and image decoding; run it off the event loop)."""
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"request body is not JSON: {one_line(exc)}") from None
        return self.decode(payload)

    def run_batch(self, items: list[InpaintRequest]) -> list[Answer]:
        """Inpaint decoded requests with one model version: one :class:`Answer` per request, in order.

        Requests of the same size that go through whole share one generator call (a batch on the device);
        windowed ones (``crop``, the request's choice or else the version's default, on photos over the trigger)
        run per image. A failing call is retried request by request, so a request's failure stays its own: a
        bad input answers 400 and an internal error 500, each with a one-line reason; the others get their images.
        """
        served = self.current
        answers: list[Answer | None] = [None] * len(items)
        groups: dict[tuple, tuple[CropStrategy | None, list[int]]] = {}
        for index, item in enumerate(items):
            try:
                windows = served.serving.hires.strategy_for(item.strategy)
            except ValueError as exc:
                answers[index] = _failure(served.version, exc)
                continue
            if windows is not None and max(item.image.shape[-2:]) > windows.trigger:
                groups[("window", index)] = (windows, [index])
            else:
                groups.setdefault(("whole", tuple(item.image.shape[-2:])), (None, []))[1].append(index)
        for windows, indices in groups.values():
            try:
                pngs = self._inpaint(served, [items[i] for i in indices], windows)
            except Exception as exc:
                if len(indices) == 1:
                    answers[indices[0]] = _failure(served.version, exc)
                    continue
                pngs = [None] * len(indices)
                for row, i in enumerate(indices):  # one request's failure stays its own
                    try:
                        pngs[row] = self._inpaint(served, [items[i]], windows)[0]
                    except Exception as single:
                        answers[i] = _failure(served.version, single)
            for i, png in zip(indices, pngs):
                if png is not None:
                    answers[i] = Answer(served.version, png)
        return [replace(a, batch_size=len(items)) for a in answers]  # type: ignore[arg-type]

    @staticmethod
    def _inpaint(served: ServedModel, items: list[InpaintRequest], windows: CropStrategy | None) -> list[bytes]:
        with torch.no_grad():
            out = inpaint_tensor(served.generator, served.arch, torch.cat([item.image for item in items]),
                                 torch.cat([item.mask for item in items]), strategy=windows)
        return [encode_png(out[row:row + 1]) for row in range(len(items))]


def use_gpu(setting: Literal["auto"] | bool) -> bool:
    """Whether replicas ask for a GPU: ``auto`` = the connected Ray cluster has one (else this machine does)."""
    if setting != "auto":
        return bool(setting)
    if ray.is_initialized():
        return ray.cluster_resources().get("GPU", 0) >= 1
    return torch.cuda.is_available()


def _json(body: dict, status: int = 200) -> Response:
    return Response(json.dumps(body), status_code=status, media_type="application/json")


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
        self.model = AliasFollowingInpainter(self.config, "cuda" if torch.cuda.is_available() else "cpu")
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
        path = request.url.path.rstrip("/")
        if path.endswith("/-/version"):
            return _json(await self._version())
        if path.endswith("/-/refresh"):
            if request.method != "POST":
                return _json({"error": "POST to refresh"}, 405)
            return await self._refresh()
        if request.method != "POST":
            return _json({"error": "POST a JSON object {image, mask} (base64 PNG/JPEG)"}, 405)
        body = await request.body()
        try:
            item = await asyncio.to_thread(self.model.parse, body)
        except ValueError as exc:
            return _json({"error": one_line(exc)}, 400)
        answer = await self._infer(item)
        return await asyncio.to_thread(_response, answer, item, self.config.model)


def build_app(config: ServeJobConfig):
    """The Ray Serve application for ``config`` (``serve.run(build_app(config))``); GPUs per :func:`use_gpu`."""
    gpu = use_gpu(config.use_gpu)
    options = {"num_cpus": config.num_cpus, "num_gpus": 1 if gpu else 0}
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
