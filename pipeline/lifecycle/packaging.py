"""Model packaging: a holefill generator as a self-contained MLflow model: log, register, load.

:func:`log_and_register_generator` logs a generator as an MLflow **model from code**: the model's code is
:mod:`pipeline.lifecycle.pyfunc_model` (copied into the model), the ``models/`` package is bundled beside it
(``code_paths``), the weights are an fp32 ``weights_only`` state dict and the requirements are torch, numpy,
pillow and mlflow, so ``mlflow models serve`` / ``build-docker`` run it anywhere, without holefill and
without unpickling anything. Its inputs are encoded image + mask bytes (what an HTTP client sends).

:func:`log_and_register_generator` packages a :class:`~models.record.GeneratorRecord` as it is (no module is built:
its weights become the ``generator_weights`` artifact, its arch, keywords and provenance the ``generator_spec`` one,
its provenance also the version's ``holefill.provenance.*`` tags). :func:`load_generator_record` reads any
reference back as a record: MLflow references from the model's two artifacts (state dict + JSON spec) without
executing the model's code, every other form through :func:`pipeline.generators.read_generator`; it reads versions registered before this format
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
from models.convert import extract_state_dict, load_weights_bytes
from models.inpaint import DEFAULT_MAX_WHOLE_PIXELS, DEFAULT_REQUEST_TIMEOUT_S, CropStrategy
from models.record import GeneratorRecord, weights_problem
from models.registry import get_architecture
from pipeline.config import Config
from pipeline.errors import one_line
from pipeline.fsutil import StorageOptionsLike
from pipeline.generators import read_generator
from pipeline.tracking import mlflow_client, redact, tag_dict

__all__ = ["HiresSettings", "LoadedModel", "ServingDefaults", "download_model", "is_mlflow_ref", "load_generator", "load_generator_record",
           "load_model", "log_and_register_generator", "model_format", "provenance_tags", "reregister_version"]

# The model's code file is executed by MLflow, never imported here (it calls mlflow.models.set_model on import);
# these names are the contract with it (tests/test_serving_packaging.py checks they agree).
PYFUNC_MODEL_FILE = Path(__file__).with_name("pyfunc_model.py")
GENERATOR_WEIGHTS = "generator_weights"  # artifact key: state dict file (torch.save, weights_only)
GENERATOR_SPEC = "generator_spec"  # artifact key: JSON with the architecture name, builder kwargs and provenance
PROVENANCE_TAG = "holefill.provenance."  # version tags: where the weights came from (kind, source, sha256, ...)
MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")
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
    max_windows: int = Field(default=16, ge=1)  # generator calls per image at most: scattered holes are merged

    def crop_strategy(self) -> CropStrategy | None:
        """The :class:`models.inpaint.CropStrategy`, or ``None`` for ``strategy: whole``."""
        return self.strategy_for(self.strategy)

    def strategy_for(self, name: str | None) -> CropStrategy | None:
        """The windows for a request asking for ``name`` (``crop`` / ``whole``; ``None``: this default), or ``None``
        when the whole image goes through. A request's own choice wins over the default, either way."""
        name = name or self.strategy
        if name not in ("crop", "whole"):
            raise ValueError(f"strategy must be crop or whole, got {name!r}")
        if name == "whole":
            return None
        return CropStrategy(margin=self.margin, trigger=self.trigger, limit=self.limit, max_windows=self.max_windows)


class ServingDefaults(Config):
    """What a registered model does with HTTP requests (stored as the model's ``model_config``).

    ``max_pixels``: the largest image (and mask) a request may carry. ``max_whole_pixels``: the largest image that
    goes through the generator whole (a request asking ``strategy: whole`` above it gets 400; the crop strategy
    uses windows above it). ``request_timeout_s``: a request's inference deadline (checked between generator calls).
    ``hires``: the windows of the crop strategy (``hires.max_windows`` bounds them per image).
    """

    max_pixels: int = Field(default=DEFAULT_MAX_PIXELS, ge=1)
    max_whole_pixels: int = Field(default=DEFAULT_MAX_WHOLE_PIXELS, ge=1)
    request_timeout_s: float = Field(default=DEFAULT_REQUEST_TIMEOUT_S, gt=0)
    hires: HiresSettings = HiresSettings()

    def model_config_dict(self) -> dict[str, Any]:
        """The flat dict :mod:`pipeline.lifecycle.pyfunc_model` reads from ``context.model_config``."""
        return {"max_pixels": self.max_pixels, "max_whole_pixels": self.max_whole_pixels,
                "request_timeout_s": self.request_timeout_s, "strategy": self.hires.strategy,
                "margin": self.hires.margin, "trigger": self.hires.trigger, "limit": self.hires.limit,
                "max_windows": self.hires.max_windows}

    @classmethod
    def from_model_config(cls, config: Mapping[str, Any] | None) -> "ServingDefaults":
        """The inverse of :meth:`model_config_dict` (a version without a ``model_config``, or registered before a
        key existed: the defaults for what it lacks)."""
        config = dict(config or {})
        hires = {k: config[k] for k in ("strategy", "margin", "trigger", "limit", "max_windows") if k in config}
        top = {k: config[k] for k in ("max_pixels", "max_whole_pixels", "request_timeout_s") if k in config}
        return cls(**top, hires=HiresSettings(**hires))


def is_mlflow_ref(ref: str) -> bool:
    """Whether ``ref`` is read through MLflow: ``models:/``, ``runs:/``, ``mlflow-artifacts:/`` or a local model folder
    (one holding ``MLmodel``)."""
    return ref.startswith(MLFLOW_SCHEMES) or (Path(ref).is_dir() and (Path(ref) / "MLmodel").is_file())


def provenance_tags(record: GeneratorRecord) -> dict[str, str]:
    """A record's provenance as version tags (``holefill.provenance.<key>``)."""
    return {f"{PROVENANCE_TAG}{key}": value for key, value in record.provenance.items()}


@contextlib.contextmanager
def _tracking_uri_for(tracking_uri: str) -> Iterator[None]:
    """Point MLflow's process-wide tracking URI at ``tracking_uri`` for a block, then put back exactly what
    ``mlflow.get_tracking_uri()`` answered and what ``MLFLOW_TRACKING_URI`` held (public API only).

    ``Model.log`` talks to the store of the process-wide URI (its logged model, artifacts and metric links); the
    logged model is created and the version registered here with an explicit client, so nothing else of MLflow's
    fluent state (registry URI, active experiment) is read or changed. ``set_tracking_uri`` also exports
    ``MLFLOW_TRACKING_URI`` for subprocesses, so the environment is restored too: this library never leaks global
    configuration into its caller (tests/test_tracking.py pins it).
    """
    # lazy: importing MLflow takes seconds, paid only by the callers that talk to a tracking server
    import mlflow

    saved_uri, saved_env = mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI")

    def put_back_environment() -> None:
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env

    mlflow.set_tracking_uri(tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)  # unset: MLflow falls back to the environment, then its default
        put_back_environment()
        if mlflow.get_tracking_uri() != saved_uri:  # it had been set in-process (not only in the environment)
            mlflow.set_tracking_uri(saved_uri)
            put_back_environment()


def _model_step(record: GeneratorRecord, step: int | None) -> int:
    """The training step a logged model is attached to: ``step``, else the record's own (training records carry
    ``provenance["step"]``), else 0."""
    if step is not None:
        return int(step)
    recorded = str(record.provenance.get("step", ""))
    return int(recorded) if recorded.isdigit() else 0


def _link_final_metrics(client, run_id: str, model_id: str, step: int) -> None:
    """Link each of the run's metrics (system metrics aside) to the logged model at its last logged value.

    ``Model.log`` links the values logged at exactly the model's step; a metric last logged earlier (validation
    every N steps, a loss logged every K) is linked here at its last step, so the model's page shows every final
    number of the run that produced it."""
    # lazy: importing MLflow takes seconds, paid only by the callers that talk to a tracking server
    from mlflow.entities import Metric

    links = []
    for key in client.get_run(run_id).data.metrics:
        if key.startswith("system/"):
            continue
        history = [m for m in client.get_metric_history(run_id, key) if m.model_id is None]
        if not history:
            continue
        last = max(history, key=lambda m: (m.step, m.timestamp))
        if last.step != step:  # at the model's step Model.log has linked it already
            links.append(Metric(key, last.value, last.timestamp, last.step, model_id=model_id, run_id=run_id))
    for start in range(0, len(links), 1000):
        client.log_batch(run_id, metrics=links[start: start + 1000])


def _registered_version(client, registered_model: str, model_id: str, run_id: str, tags: Mapping[str, str]):
    """A new version of ``registered_model`` (created if missing) holding logged model ``model_id``."""
    # lazy: importing MLflow takes seconds, paid only by the callers that talk to a tracking server
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(registered_model)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    return client.create_model_version(registered_model, f"models:/{model_id}", run_id=run_id, tags=dict(tags),
                                       model_id=model_id, await_creation_for=300)


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


def log_and_register_generator(tracking_uri: str, run_id: str, generator: GeneratorRecord | nn.Module,
                               example_image: torch.Tensor, example_mask: torch.Tensor, registered_model: str,
                               tags: Mapping[str, Any] | None = None, *, arch: str | None = None,
                               generator_kwargs: Mapping[str, Any] | None = None, name: str = "generator",
                               serving: ServingDefaults | None = None, step: int | None = None):
    """Log ``generator`` to run ``run_id`` as a model from code and register it under ``registered_model``.

    ``generator`` is a :class:`~models.record.GeneratorRecord` (what training and ``jobs/register_official.py``
    hand over: packaged as it is, no module built), or a built module with its ``arch`` (and ``generator_kwargs``,
    by default the ones it declares: ``constructor_kwargs``) for callers holding one. ``(example_image,
    example_mask)`` ((1,3,H,W) in [0,1], (1,1,H,W) with a hole; keep them small: MLflow runs the model on them to
    validate serving) become the PNG input example. ``serving`` sets the pixel limit and the high-resolution
    strategy of the served model. ``tags`` (redacted) go on the new model version, with ``holefill.arch`` and the
    record's provenance (``holefill.provenance.*``). The logged model (MLflow 3's model page) carries the run's
    params, its ``step`` (default: the record's ``provenance["step"]``, what training records carry; else 0) and
    the run's metrics, each at its last logged value. Returns the ``ModelVersion``.
    """
    # lazy: importing MLflow takes seconds, paid only by the callers that talk to a tracking server
    import mlflow
    from mlflow.models import Model

    if isinstance(generator, GeneratorRecord):
        problem = generator.matches(arch or generator.arch,
                                    generator.kwargs if generator_kwargs is None else generator_kwargs)
        if problem is not None:
            raise ValueError(f"cannot register this generator record: {problem}")
        record = generator
    else:
        if arch is None:
            raise ValueError(f"registering a {type(generator).__name__} module needs its architecture: pass arch=")
        record = GeneratorRecord.from_module(generator, arch, generator_kwargs)
    arch = record.arch
    if not bool((example_mask > 0.5).any()):
        raise ValueError("example_mask has no hole: the input example must be a request the model accepts")
    client = mlflow_client(tracking_uri)
    run = client.get_run(run_id)
    version_tags = tag_dict({**dict(tags or {}), **provenance_tags(record), "holefill.arch": arch})
    step = _model_step(record, step)
    example = _input_example(example_image.detach().float().cpu(), example_mask.detach().float().cpu())
    # The logged model carries the run's params (the training config) and its final step; created here, with an
    # explicit client, in the run's own experiment (whatever experiment the caller's process has active).
    model = client.create_logged_model(run.info.experiment_id, name=name, source_run_id=run_id,
                                       params={k: str(v) for k, v in run.data.params.items()},
                                       tags={"holefill.arch": arch})
    with tempfile.TemporaryDirectory(prefix="holefill-model-") as tmp:
        weights = Path(tmp) / "generator.pt"
        spec = Path(tmp) / "generator.json"
        torch.save(record.state_dict, weights)
        spec.write_text(json.dumps({"arch": arch, "generator_kwargs": record.kwargs, "format": MODEL_FORMAT,
                                    "provenance": redact(record.provenance)}))
        code = _bundle_models_package(Path(tmp))
        # Model.log writes to the process-wide tracking store, and a local (SQLite or file) registry looks the
        # logged model up there when the version is created: both run with the caller's store in place.
        with _tracking_uri_for(tracking_uri):
            # MLflow validates the input example by loading the saved model, which prepends its code folder (in
            # this temporary directory) to sys.path for good; put sys.path back so registrations leave no trace.
            with _restored_sys_path():
                Model.log(
                    None, name=name, flavor=mlflow.pyfunc, run_id=run_id, model_id=model.model_id, step=step,
                    python_model=str(PYFUNC_MODEL_FILE), code_paths=[str(code)],
                    artifacts={GENERATOR_WEIGHTS: str(weights), GENERATOR_SPEC: str(spec)},
                    model_config=(serving or ServingDefaults()).model_config_dict(),
                    signature=_signature(), input_example=example, pip_requirements=_pip_requirements(),
                    metadata={"holefill_arch": arch, "holefill_format": MODEL_FORMAT},
                )
            _link_final_metrics(client, run_id, model.model_id, step)
            version = _registered_version(client, registered_model, model.model_id, run_id, version_tags)
    return client.get_model_version(registered_model, str(version.version))


@dataclass(frozen=True)
class LoadedModel:
    """A registered generator rebuilt in a holefill process: the module (eval mode), its architecture, its spec
    and format, the serving defaults it was registered with (what the pyfunc model applies to requests) and its
    record (``None`` only where a caller assembled one from a module)."""

    generator: nn.Module
    arch: str
    spec: dict[str, Any]
    format: str
    serving: ServingDefaults
    record: GeneratorRecord | None = None


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


def _read_record(model_uri: str, tracking_uri: str | None) -> tuple[GeneratorRecord, dict[str, Any], str, ServingDefaults]:
    """The record, spec, format and serving defaults of a model URI or folder (weights and spec artifacts only)."""
    # lazy: importing MLflow takes seconds, paid only by the callers that talk to a tracking server
    import mlflow.artifacts

    if Path(model_uri).is_dir():
        return _from_folder(Path(model_uri), model_uri)
    # The download goes as soon as the record is read (45 MB for RN, 267 MB for LBAM, on every load).
    with tempfile.TemporaryDirectory(prefix="holefill-load-") as download:
        return _from_folder(download_model(model_uri, tracking_uri, download), model_uri)


def download_model(model_uri: str, tracking_uri: str | None, dst_path: str | os.PathLike[str]) -> Path:
    """Download the MLflow model folder ``model_uri`` names into ``dst_path``; returns the folder.

    Every lookup goes to ``tracking_uri`` (MLflow's configured one when ``None``): MLflow's own resolution of
    ``models:/…`` reads the process-wide registry URI whatever its caller passed, so a replica pointed at another
    server (or at a proxy in front of it) would look the version up in the wrong registry. ``ValueError`` with a
    one-line reason when the model cannot be found or read.
    """
    # lazy: importing MLflow takes seconds, paid only by the callers that talk to a tracking server
    import mlflow.artifacts
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    try:
        source = model_uri
        if model_uri.startswith("models:/"):
            client = mlflow_client(tracking_uri)
            found = get_model_name_and_version(client, model_uri)
            source = (client.get_logged_model(found[0]).artifact_location if len(found) == 1
                      else client.get_model_version_download_uri(*found))
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst_path),
                                                        tracking_uri=tracking_uri, registry_uri=tracking_uri))
    except Exception as exc:
        raise ValueError(f"cannot load model {redact(model_uri)}: {one_line(exc)}") from None


def _from_folder(model_dir: Path, model_uri: str) -> tuple[GeneratorRecord, dict[str, Any], str, ServingDefaults]:
    weights, spec_file, fmt, serving = _artifact_files(model_dir, model_uri)
    try:
        spec = json.loads(spec_file.read_text())
        if not isinstance(spec, dict) or not isinstance(spec.get("arch"), str):
            raise ValueError("its generator_spec names no architecture")
        provenance = spec.get("provenance") or {"kind": "registered model"}
        state = extract_state_dict(load_weights_bytes(weights.read_bytes(), GENERATOR_WEIGHTS))
        record = GeneratorRecord(spec["arch"], spec.get("generator_kwargs") or {}, state, provenance)
        problem = weights_problem(record.arch, record.kwargs, record.state_dict)
        if problem is not None:
            raise ValueError(problem)
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        raise ValueError(f"model {redact(model_uri)} holds unreadable generator weights: {one_line(exc)}") from None
    return record, spec, fmt, serving


def _read_model(model_uri: str, tracking_uri: str | None) -> LoadedModel:
    record, spec, fmt, serving = _read_record(model_uri, tracking_uri)
    return LoadedModel(record.build(), record.arch, spec, fmt, serving, record)


def load_generator_record(ref: str, tracking_uri: str | None = None, *, arch: str | None = None,
                          kwargs: Mapping[str, Any] | None = None,
                          storage_options: StorageOptionsLike = None) -> GeneratorRecord:
    """The :class:`~models.record.GeneratorRecord` of any model reference.

    * ``models:/name@alias``, ``models:/name/N``, ``runs:/…``, ``mlflow-artifacts:/…`` or a local MLflow model
      folder (one holding ``MLmodel``): the version's ``generator_weights`` and ``generator_spec`` artifacts,
      never its code or pickle (``tracking_uri``: MLflow's configured one by default);
    * anything else (a checkpoint folder, a weights file of any form, an official release; local or fsspec URL):
      :func:`pipeline.generators.read_generator`.

    ``arch`` / ``kwargs``: what the caller knows of the network (they must agree with a reference that says).
    One-line ``ValueError`` on failure.
    """
    if not is_mlflow_ref(ref):
        return read_generator(ref, arch=arch, kwargs=kwargs, storage_options=storage_options)
    record = _read_record(ref, tracking_uri)[0]
    problem = record.matches(arch or record.arch, record.kwargs if kwargs is None else kwargs)
    if problem is not None:
        raise ValueError(f"model {redact(ref)}: {problem}")
    return record


def load_generator(model_uri: str, tracking_uri: str | None = None) -> tuple[nn.Module, str]:
    """Load a generator logged by :func:`log_and_register_generator`: ``(module in eval mode, arch name)``.

    ``model_uri`` is anything MLflow resolves (``models:/lbam@champion``, ``models:/lbam/3``, ``runs:/…``,
    ``models:/m-…``, a local model folder). ``tracking_uri`` defaults to MLflow's configured one. Reads the
    weights and spec artifacts only: neither the model's code nor (for versions registered before models from
    code) its pickle is executed, so both formats load.
    """
    record = _read_record(model_uri, tracking_uri)[0]
    return record.build(), record.arch


def load_model(model_uri: str, tracking_uri: str | None = None) -> LoadedModel:
    """Like :func:`load_generator`, with the model's spec, format and serving defaults (what serving applies)."""
    return _read_model(model_uri, tracking_uri)


def model_format(model_uri: str, tracking_uri: str | None = None) -> str:
    """:data:`MODEL_FORMAT` (model from code) or :data:`LEGACY_FORMAT` (pickled wrapper) of a holefill model."""
    return _read_record(model_uri, tracking_uri)[2]


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
    record, _, _, old_serving = _read_record(f"models:/{registered_model}/{old.version}", tracking_uri)
    size = get_architecture(record.arch).train_size or 64
    image = torch.full((1, 3, size, size), 0.5)
    mask = torch.zeros(1, 1, size, size)
    mask[..., size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1.0
    tags = {**{k: v for k, v in old.tags.items() if k != "holefill.arch" and not k.startswith(PROVENANCE_TAG)},
            "holefill.reregistered_from": str(old.version)}
    return log_and_register_generator(tracking_uri, old.run_id, record, image, mask, registered_model, tags,
                                      serving=serving or old_serving)
