"""Ray Serve application serving ``models:/<name>@<alias>`` (the champion) and following the alias.

One deployment, :class:`InpaintingDeployment`, answers over HTTP:

* ``POST <route>`` with JSON ``{"image": base64 PNG/JPEG, "mask": base64 gray PNG (255 = hole),
  "strategy": "crop" | "whole" (optional)}`` → ``{"image": base64 PNG, "model": name, "model_version": "7",
  "width": W, "height": H}``; a bad request gets HTTP 400 ``{"error": one line}``;
* ``GET <route>/-/version`` → the model version being served;
* ``POST <route>/-/refresh`` → re-resolve the alias now (the admin call) and answer the version now served.

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
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
import torch.nn as nn
from pydantic import Field
from ray import serve
from starlette.responses import Response

from models.codec import DEFAULT_MAX_PIXELS, decode_request, encode_png
from models.inpaint import inpaint_tensor
from pipeline.config import Config
from pipeline.lifecycle.packaging import HiresConfig, load_generator
from pipeline.tracking import mlflow_client, redact

__all__ = ["AliasFollowingInpainter", "InpaintingDeployment", "ServeConfig", "ServedModel", "build_app", "use_gpu"]

log = logging.getLogger("holefill.serve")


class ServeConfig(Config):
    """``jobs/serve.py``: which model to follow, how to batch, where to run, what to accept."""

    model: str = "lbam"  # registered model name
    alias: str = "champion"
    tracking_uri: str | None = None  # default: MLFLOW_TRACKING_URI, then the local store
    refresh_interval_s: float = Field(default=30.0, gt=0)
    max_batch_size: int = Field(default=8, ge=1)
    batch_wait_timeout_s: float = Field(default=0.01, ge=0)
    num_replicas: int = Field(default=1, ge=1)
    use_gpu: Literal["auto"] | bool = "auto"
    num_cpus: float = Field(default=1.0, ge=0)
    max_pixels: int = Field(default=DEFAULT_MAX_PIXELS, ge=1)
    hires: HiresConfig = HiresConfig()
    app_name: str = "holefill"
    route_prefix: str = "/inpaint"
    host: str = "127.0.0.1"  # HTTP proxy address (0.0.0.0 to serve other hosts)
    port: int = Field(default=8000, ge=0, le=65535)


@dataclass(frozen=True)
class ServedModel:
    """One loaded model version: what a batch runs on, and what its answers name."""

    version: str
    generator: nn.Module
    arch: str


class AliasFollowingInpainter:
    """The generator behind ``models:/<model>@<alias>``, re-resolved on demand and swapped atomically.

    ``loader(uri, tracking_uri) -> (generator, arch)`` and ``resolver() -> version`` default to the MLflow
    registry. A batch takes :attr:`current` once, so every image of a batch (and its answer) uses one version.
    """

    def __init__(self, config: ServeConfig, device: str | torch.device = "cpu",
                 loader: Callable[[str, str | None], tuple[nn.Module, str]] = load_generator,
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
        generator, arch = self._loader(f"models:/{self.config.model}/{version}", self.config.tracking_uri)
        log.info("serving %s version %s (%s) on %s", self.config.model, version, arch, self.device)
        return ServedModel(version, generator.to(self.device).eval(), arch)

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
                            self.config.alias, self.current.version, redact(_one_line(exc)))

    def decode(self, payload: Any) -> tuple[torch.Tensor, torch.Tensor, str]:
        """A JSON request body -> ``(image, mask, strategy)``; ``ValueError`` with a one-line reason when it is bad."""
        if not isinstance(payload, dict):
            raise ValueError("request body must be a JSON object with base64 fields image and mask")
        strategy = payload.get("strategy") or self.config.hires.strategy
        if strategy not in ("crop", "whole"):
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
        image, mask = decode_request(fields["image"], fields["mask"], self.config.max_pixels)
        return image, mask, strategy

    def run_batch(self, items: list[tuple[torch.Tensor, torch.Tensor, str]]) -> list[tuple[bytes, str]]:
        """Inpaint decoded requests with one model version: ``[(PNG bytes, version)]`` in order.

        Requests of the same size and strategy that go through whole share one generator call (a batch on the
        device); windowed ones run per image (their windows differ).
        """
        served = self.current
        crop = self.config.hires.crop_strategy()
        results: list[bytes | None] = [None] * len(items)
        groups: dict[tuple, list[int]] = {}
        for index, (image, _, strategy) in enumerate(items):
            windowed = strategy == "crop" and crop is not None and max(image.shape[-2:]) > crop.trigger
            key = ("window", index) if windowed else ("whole", tuple(image.shape[-2:]))
            groups.setdefault(key, []).append(index)
        with torch.no_grad():
            for (kind, _), indices in groups.items():
                image = torch.cat([items[i][0] for i in indices])
                mask = torch.cat([items[i][1] for i in indices])
                out = inpaint_tensor(served.generator, served.arch, image, mask,
                                     strategy=crop if kind == "window" else None)
                for row, i in enumerate(indices):
                    results[i] = encode_png(out[row:row + 1])
        return [(png, served.version) for png in results]


def use_gpu(setting: Literal["auto"] | bool) -> bool:
    """Whether replicas ask for a GPU: ``auto`` = the connected Ray cluster has one (else this machine does)."""
    if setting != "auto":
        return bool(setting)
    import ray

    if ray.is_initialized():
        return ray.cluster_resources().get("GPU", 0) >= 1
    return torch.cuda.is_available()


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


def _json(body: dict, status: int = 200) -> Response:
    return Response(json.dumps(body), status_code=status, media_type="application/json")


@serve.deployment(name="inpainter")
class InpaintingDeployment:
    """HTTP front of :class:`AliasFollowingInpainter` with dynamic batching (see the module docstring)."""

    def __init__(self, config: dict) -> None:
        self.config = ServeConfig.model_validate(config)
        self.model = AliasFollowingInpainter(self.config, "cuda" if torch.cuda.is_available() else "cpu")
        self._infer.set_max_batch_size(self.config.max_batch_size)
        self._infer.set_batch_wait_timeout_s(self.config.batch_wait_timeout_s)
        self._stop = threading.Event()
        threading.Thread(target=self.model.follow, args=(self._stop,), name="alias-follower", daemon=True).start()

    def __del__(self) -> None:  # Ray Serve calls it when the replica shuts down
        self._stop.set()

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)  # the configured values are set per replica
    async def _infer(self, items: list[tuple[torch.Tensor, torch.Tensor, str]]) -> list[tuple[bytes, str]]:
        # The generator runs in a worker thread so the replica keeps accepting (and decoding) requests meanwhile.
        return await asyncio.to_thread(self.model.run_batch, items)

    async def __call__(self, request):
        path = request.url.path.rstrip("/")
        if path.endswith("/-/version"):
            return _json({"model": self.config.model, "model_version": self.model.current.version})
        if path.endswith("/-/refresh"):
            try:
                version = await asyncio.to_thread(self.model.refresh)
            except Exception as exc:
                return _json({"error": f"refresh failed: {_one_line(exc)}", "model_version": self.model.current.version},
                             503)
            return _json({"model": self.config.model, "model_version": version})
        if request.method != "POST":
            return _json({"error": "POST a JSON object {image, mask} (base64 PNG/JPEG)"}, 405)
        try:
            payload = json.loads(await request.body())
            image, mask, strategy = await asyncio.to_thread(self.model.decode, payload)
        except (ValueError, UnicodeDecodeError) as exc:  # json.JSONDecodeError is a ValueError
            return _json({"error": _one_line(exc)}, 400)
        png, version = await self._infer((image, mask, strategy))
        return _json({"image": base64.b64encode(png).decode("ascii"), "model": self.config.model,
                      "model_version": version, "width": int(image.shape[-1]), "height": int(image.shape[-2])})


def build_app(config: ServeConfig):
    """The Ray Serve application for ``config`` (``serve.run(build_app(config))``); GPUs per :func:`use_gpu`."""
    gpu = use_gpu(config.use_gpu)
    options = {"num_cpus": config.num_cpus, "num_gpus": 1 if gpu else 0}
    return InpaintingDeployment.options(num_replicas=config.num_replicas, ray_actor_options=options).bind(
        config.model_dump(mode="json"))


def app_builder(args: dict[str, str]):
    """``serve run pipeline.lifecycle.serving:app_builder config=jobs/configs/serve.yaml [set=key=value,…]``.

    Ray Serve's application-builder hook (also the ``import_path`` of a ``serve deploy`` config file, with the
    same ``args``). The tracking URI falls back to ``MLFLOW_TRACKING_URI`` as in every holefill job.
    """
    from pipeline.config import load_config
    from pipeline.tracking import resolve_tracking_uri

    unknown = set(args) - {"config", "set"}
    if unknown:
        raise ValueError(f"unknown serve argument(s) {', '.join(sorted(unknown))}: use config=FILE and set=k=v,k=v")
    overrides = [item for item in str(args.get("set") or "").split(",") if item]
    config = load_config(ServeConfig, args.get("config"), overrides)
    config.tracking_uri = resolve_tracking_uri(config.tracking_uri, os.environ)
    return build_app(config)
