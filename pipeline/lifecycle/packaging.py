"""Model packaging: a holefill generator as a self-contained MLflow model: log, register, load.

:func:`log_and_register_generator` logs a generator as an MLflow **model from code**: the model's code is
:mod:`pipeline.lifecycle.pyfunc_model` (copied into the model), the ``models/`` package is bundled beside it
(``code_paths``), the weights are an fp32 ``weights_only`` state dict and the requirements are torch, numpy,
pillow and mlflow, so ``mlflow models serve`` / ``build-docker`` run it anywhere, without holefill and
without unpickling anything. Its inputs are encoded image + mask bytes (what an HTTP client sends).

:func:`load_generator` rebuilds the generator in a holefill process from the model's two artifacts (state
dict + JSON spec) without executing the model's code; it reads versions registered before this format
(a cloudpickled ``python_model.pkl`` with the same two artifacts) the same way, so they keep loading and
their pickle is never opened. Serving such an old version outside holefill needs it re-registered:
:func:`reregister_version`. (MLflow 3's default ``mlflow.pytorch`` format is torch.export, which cannot
trace RN's and LBAM's data-dependent code.)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping

import numpy as np
import torch
import torch.nn as nn
import yaml
from pydantic import Field

import models
from models.codec import DEFAULT_MAX_PIXELS, encode_png
from models.inpaint import CropStrategy
from models.registry import architectures, get_architecture
from pipeline.config import Config
from pipeline.errors import one_line
from pipeline.tracking import mlflow_client, redact, tag_dict

__all__ = ["HiresSettings", "LoadedModel", "ServingDefaults", "architecture_of", "build_generator", "load_generator",
           "load_model", "log_and_register_generator", "model_format", "reregister_version"]

# The model's code file is executed by MLflow, never imported here (it calls mlflow.models.set_model on import);
# these names are the contract with it (tests/test_serving_packaging.py checks they agree).
PYFUNC_MODEL_FILE = Path(__file__).with_name("pyfunc_model.py")
GENERATOR_WEIGHTS = "generator_weights"  # artifact key: state dict file (torch.save, weights_only)
GENERATOR_SPEC = "generator_spec"  # artifact key: JSON with the architecture name and builder kwargs
MODEL_FORMAT = "holefill-generator/2"  # a model from code
LEGACY_FORMAT = "holefill-generator/1"  # a cloudpickled wrapper (registered before models from code)
_MODELS_PACKAGE = Path(models.__file__).resolve().parent  # bundled as the model's code


class HiresSettings(Config):
    """How large images are inpainted (see :class:`models.inpaint.CropStrategy`).

    ``strategy: crop`` inpaints a window (hole bounding box + ``margin``) around each hole of images whose
    longer side exceeds ``trigger``, downscaling windows whose longer side exceeds ``limit``; ``whole`` sends
    the whole image through the generator (memory grows with the photo).
    """

    strategy: Literal["crop", "whole"] = "crop"
    margin: int = Field(default=128, ge=0)
    trigger: int = Field(default=1024, ge=1)
    limit: int = Field(default=512, ge=1)

    def crop_strategy(self) -> CropStrategy | None:
        """The :class:`models.inpaint.CropStrategy`, or ``None`` for ``strategy: whole``."""
        return self.strategy_for(self.strategy)

    def strategy_for(self, name: str | None) -> CropStrategy | None:
        """The windows for a request asking for ``name`` (``crop`` / ``whole``; ``None``: this default), or ``None``
        when the whole image goes through. A request's own choice wins over the default, either way."""
        name = name or self.strategy
        if name not in ("crop", "whole"):
            raise ValueError(f"strategy must be crop or whole, got {name!r}")
        return CropStrategy(margin=self.margin, trigger=self.trigger, limit=self.limit) if name == "crop" else None


class ServingDefaults(Config):
    """What a registered model does with HTTP requests (stored as the model's ``model_config``)."""

    max_pixels: int = Field(default=DEFAULT_MAX_PIXELS, ge=1)
    hires: HiresSettings = HiresSettings()

    def model_config_dict(self) -> dict[str, Any]:
        """The flat dict :mod:`pipeline.lifecycle.pyfunc_model` reads from ``context.model_config``."""
        return {"max_pixels": self.max_pixels, "strategy": self.hires.strategy, "margin": self.hires.margin,
                "trigger": self.hires.trigger, "limit": self.hires.limit}

    @classmethod
    def from_model_config(cls, config: Mapping[str, Any] | None) -> "ServingDefaults":
        """The inverse of :meth:`model_config_dict` (a version without a ``model_config``: the defaults)."""
        config = dict(config or {})
        hires = {k: config[k] for k in ("strategy", "margin", "trigger", "limit") if k in config}
        return cls(**({"max_pixels": int(config["max_pixels"])} if "max_pixels" in config else {}),
                   hires=HiresSettings(**hires))


def build_generator(spec: Mapping[str, Any], weights_path: str | os.PathLike) -> tuple[nn.Module, str]:
    """Rebuild a generator from its spec (``{"arch", "generator_kwargs"}``) and a weights_only state dict file."""
    arch = str(spec["arch"])
    generator = get_architecture(arch).generator(**dict(spec.get("generator_kwargs") or {}))
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    generator.load_state_dict(state, strict=True)
    return generator.float().eval(), arch


def architecture_of(model: nn.Module) -> str:
    """The registered architecture name whose generator builds modules of ``model``'s class."""
    declared = getattr(model, "arch_name", None)
    if isinstance(declared, str):
        return declared
    for name in architectures():
        builder = get_architecture(name).generator
        if isinstance(builder, type) and isinstance(model, builder):
            return name
    for name in architectures():
        if type(get_architecture(name).generator()) is type(model):
            return name
    raise ValueError(f"{type(model).__name__} is not the generator of any registered architecture; pass arch=")


@contextlib.contextmanager
def _fluent_target(tracking_uri: str | None, experiment_id: str | None) -> Iterator[None]:
    """Point MLflow's fluent API at ``tracking_uri``/``experiment_id`` for a block, then restore exactly.

    ``Model.log`` and ``pyfunc.load_model`` resolve the store (and the logged model's experiment) from
    process-wide fluent state. MLflow's setters also export ``MLFLOW_TRACKING_URI``/``MLFLOW_REGISTRY_URI``
    for subprocesses, so the previous module state *and* environment are put back afterwards: this library
    never leaks global configuration into its caller. (Uses MLflow internals; pinned by the tests.)
    """
    # lazy: importing MLflow takes seconds, paid only by the callers that talk to a tracking server
    import mlflow.tracking._model_registry.utils as registry_state
    import mlflow.tracking.fluent as fluent
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    saved_registry = (registry_state._registry_uri, os.environ.get("MLFLOW_REGISTRY_URI"))
    saved_experiment = fluent._active_experiment_id
    with _use_tracking_uri(tracking_uri) if tracking_uri else contextlib.nullcontext():
        try:
            if tracking_uri:
                registry_state._registry_uri = tracking_uri
            if experiment_id is not None:
                fluent._active_experiment_id = experiment_id
            yield
        finally:
            registry_state._registry_uri = saved_registry[0]
            if saved_registry[1] is None:
                os.environ.pop("MLFLOW_REGISTRY_URI", None)
            else:
                os.environ["MLFLOW_REGISTRY_URI"] = saved_registry[1]
            fluent._active_experiment_id = saved_experiment


def _pip_requirements() -> list[str]:
    """What a fresh environment installs to run the model: the libraries its code imports, at these versions.

    Pillow is asked for by major version only: the training host may run pillow-simd (same ``PIL`` package,
    versions Pillow never published), and the model uses nothing newer than Pillow's basic codecs.
    """
    # lazy: importing MLflow takes seconds, paid only by the callers that talk to a tracking server
    import mlflow
    import PIL

    return [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}",
            f"pillow>={PIL.__version__.split('.')[0]}.0", f"mlflow=={mlflow.__version__}"]


def _bundle_models_package(into: Path) -> Path:
    """A clean copy of ``models/`` (no caches) to bundle as the model's code."""
    target = into / "models"
    shutil.copytree(_MODELS_PACKAGE, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target


@contextlib.contextmanager
def _restored_sys_path() -> Iterator[None]:
    saved = list(sys.path)
    try:
        yield
    finally:
        sys.path[:] = saved


def _signature():
    # lazy: importing MLflow takes seconds, paid only by the callers that talk to a tracking server
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("binary", "image"), ColSpec("binary", "mask")]),
        outputs=Schema([ColSpec("binary", "image")]),
        params=ParamSchema([ParamSpec("strategy", "string", "crop")]),
    )


def _input_example(image: torch.Tensor, mask: torch.Tensor):
    """One encoded request (PNG image, PNG mask): MLflow stores it and replays it through its serving path."""
    import pandas as pd
    from PIL import Image
    import io

    hole = (mask[0, 0] > 0.5).numpy().astype(np.uint8) * 255
    buffer = io.BytesIO()
    Image.fromarray(hole).save(buffer, format="PNG")
    return pd.DataFrame({"image": [encode_png(image[:1])], "mask": [buffer.getvalue()]})


def log_and_register_generator(tracking_uri: str, run_id: str, model: nn.Module, example_image: torch.Tensor,
                               example_mask: torch.Tensor, registered_model: str,
                               tags: Mapping[str, Any] | None = None, *, arch: str | None = None,
                               generator_kwargs: Mapping[str, Any] | None = None, name: str = "generator",
                               serving: ServingDefaults | None = None):
    """Log ``model`` (as fp32) to run ``run_id`` as a model from code and register it under ``registered_model``.

    ``(example_image, example_mask)`` ((1,3,H,W) in [0,1], (1,1,H,W) with a hole; keep them small: MLflow runs
    the model on them to validate serving) become the PNG input example. ``serving`` sets the pixel limit and
    the high-resolution strategy of the served model. ``tags`` (redacted) go on the new model version, with
    ``holefill.arch``. ``generator_kwargs`` rebuild the network at load time; by default the ones ``model`` was
    built with (its ``constructor_kwargs``). Returns the ``ModelVersion``.
    """
    # lazy: importing MLflow takes seconds, paid only by the callers that talk to a tracking server
    import mlflow
    from mlflow.models import Model

    arch = arch or architecture_of(model)
    if not bool((example_mask > 0.5).any()):
        raise ValueError("example_mask has no hole: the input example must be a request the model accepts")
    client = mlflow_client(tracking_uri)
    run = client.get_run(run_id)
    with torch.no_grad():
        state = {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().contiguous()
                 for k, v in model.state_dict().items()}
    version_tags = tag_dict({**dict(tags or {}), "holefill.arch": arch})
    example = _input_example(example_image.detach().float().cpu(), example_mask.detach().float().cpu())
    with tempfile.TemporaryDirectory(prefix="holefill-model-") as tmp:
        weights = Path(tmp) / "generator.pt"
        spec = Path(tmp) / "generator.json"
        torch.save(state, weights)
        if generator_kwargs is None:
            generator_kwargs = getattr(model, "constructor_kwargs", {})
        spec.write_text(json.dumps({"arch": arch, "generator_kwargs": dict(generator_kwargs),
                                    "format": MODEL_FORMAT}))
        code = _bundle_models_package(Path(tmp))
        # MLflow validates the input example by loading the saved model, which prepends its code folder (in
        # this temporary directory) to sys.path for good; put sys.path back so registrations leave no trace.
        with _fluent_target(tracking_uri, run.info.experiment_id), _restored_sys_path():
            info = Model.log(
                None, name=name, flavor=mlflow.pyfunc, run_id=run_id, python_model=str(PYFUNC_MODEL_FILE),
                code_paths=[str(code)], artifacts={GENERATOR_WEIGHTS: str(weights), GENERATOR_SPEC: str(spec)},
                model_config=(serving or ServingDefaults()).model_config_dict(),
                signature=_signature(), input_example=example, pip_requirements=_pip_requirements(),
                metadata={"holefill_arch": arch, "holefill_format": MODEL_FORMAT},
                registered_model_name=registered_model, tags={"holefill.arch": arch},
            )
    version = str(info.registered_model_version)
    for key, value in version_tags.items():
        client.set_model_version_tag(registered_model, version, key, value)
    return client.get_model_version(registered_model, version)


@dataclass(frozen=True)
class LoadedModel:
    """A registered generator rebuilt in a holefill process: the module (eval mode), its architecture, its spec
    and format, and the serving defaults it was registered with (what the pyfunc model applies to requests)."""

    generator: nn.Module
    arch: str
    spec: dict[str, Any]
    format: str
    serving: ServingDefaults


def _artifact_files(model_dir: Path, model_uri: str) -> tuple[Path, Path, str, ServingDefaults]:
    """The state dict, the spec, the format and the serving defaults of a downloaded holefill model folder."""
    mlmodel = model_dir / "MLmodel"
    if not mlmodel.is_file():
        raise ValueError(f"model {redact(model_uri)} has no MLmodel file")
    pyfunc = (yaml.safe_load(mlmodel.read_text()).get("flavors") or {}).get("python_function") or {}
    artifacts = pyfunc.get("artifacts") or {}
    try:
        weights = model_dir / artifacts[GENERATOR_WEIGHTS]["path"]
        spec = model_dir / artifacts[GENERATOR_SPEC]["path"]
    except (KeyError, TypeError):
        raise ValueError(f"model {redact(model_uri)} is not a holefill generator "
                         "(logged by log_and_register_generator)") from None
    legacy = "python_model" in pyfunc and "model_code_path" not in pyfunc
    try:
        serving = ServingDefaults.from_model_config(pyfunc.get("config"))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"model {redact(model_uri)} has unreadable serving defaults: {one_line(exc)}") from None
    return weights, spec, LEGACY_FORMAT if legacy else MODEL_FORMAT, serving


def _read_model(model_uri: str, tracking_uri: str | None) -> LoadedModel:
    """The generator, spec, format and serving defaults of a model URI or folder (weights and spec artifacts only)."""
    # lazy: importing MLflow takes seconds, paid only by the callers that talk to a tracking server
    import mlflow.artifacts

    if Path(model_uri).is_dir():
        return _from_folder(Path(model_uri), model_uri)
    # The download goes as soon as the module is built (45 MB for RN, 267 MB for LBAM, on every load).
    with _fluent_target(tracking_uri, None), tempfile.TemporaryDirectory(prefix="holefill-load-") as download:
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=download)
        except Exception as exc:
            raise ValueError(f"cannot load model {redact(model_uri)}: {one_line(exc)}") from None
        return _from_folder(Path(local), model_uri)


def _from_folder(model_dir: Path, model_uri: str) -> LoadedModel:
    weights, spec_file, fmt, serving = _artifact_files(model_dir, model_uri)
    try:
        spec = json.loads(spec_file.read_text())
        generator, arch = build_generator(spec, weights)
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        raise ValueError(f"model {redact(model_uri)} holds unreadable generator weights: {one_line(exc)}") from None
    return LoadedModel(generator, arch, spec, fmt, serving)


def load_generator(model_uri: str, tracking_uri: str | None = None) -> tuple[nn.Module, str]:
    """Load a generator logged by :func:`log_and_register_generator`: ``(module in eval mode, arch name)``.

    ``model_uri`` is anything MLflow resolves (``models:/lbam@champion``, ``models:/lbam/3``, ``runs:/…``,
    ``models:/m-…``, a local model folder). ``tracking_uri`` defaults to MLflow's configured one. Reads the
    weights and spec artifacts only: neither the model's code nor (for versions registered before models from
    code) its pickle is executed, so both formats load.
    """
    loaded = _read_model(model_uri, tracking_uri)
    return loaded.generator, loaded.arch


def load_model(model_uri: str, tracking_uri: str | None = None) -> LoadedModel:
    """Like :func:`load_generator`, with the model's spec, format and serving defaults (what serving applies)."""
    return _read_model(model_uri, tracking_uri)


def model_format(model_uri: str, tracking_uri: str | None = None) -> str:
    """:data:`MODEL_FORMAT` (model from code) or :data:`LEGACY_FORMAT` (pickled wrapper) of a holefill model."""
    return _read_model(model_uri, tracking_uri).format


def reregister_version(tracking_uri: str, registered_model: str, version: str | int,
                       serving: ServingDefaults | None = None):
    """Register a new version of ``registered_model`` holding version ``version``'s weights as a model from code.

    For versions registered before models from code (a pickled wrapper that loads only where holefill is
    installed): the new version serves anywhere. It is logged to the old version's run with the old version's
    tags plus ``holefill.reregistered_from``; aliases are not moved. ``serving`` defaults to the old version's own
    serving defaults. Returns the new ``ModelVersion``.
    """
    client = mlflow_client(tracking_uri)
    old = client.get_model_version(registered_model, str(version))
    loaded = _read_model(f"models:/{registered_model}/{old.version}", tracking_uri)
    generator, arch, spec = loaded.generator, loaded.arch, loaded.spec
    size = get_architecture(arch).train_size or 64
    image = torch.full((1, 3, size, size), 0.5)
    mask = torch.zeros(1, 1, size, size)
    mask[..., size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1.0
    tags = {**{k: v for k, v in old.tags.items() if k != "holefill.arch"}, "holefill.reregistered_from": str(old.version)}
    return log_and_register_generator(tracking_uri, old.run_id, generator, image, mask, registered_model, tags,
                                      arch=arch, generator_kwargs=spec.get("generator_kwargs") or {},
                                      serving=serving or loaded.serving)
