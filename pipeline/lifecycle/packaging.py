"""Model packaging: a holefill generator as an MLflow model: log, register, load.

:func:`log_and_register_generator` logs an fp32 generator as an MLflow ``pyfunc`` model whose only
artifact is a ``weights_only`` state dict plus the architecture name, and registers it;
:func:`load_generator` rebuilds it through :mod:`models.registry` in any process. (MLflow 3's default
``mlflow.pytorch`` format is torch.export, which cannot trace RN's and LBAM's data-dependent code;
pickled modules would tie the artifact to class layouts and need pickle to load.)
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
import torch.nn as nn

from models.inpaint import inpaint_tensor
from models.registry import architectures, get_architecture
from pipeline.tracking import mlflow_client, tag_dict, redact

__all__ = ["HolefillGenerator", "architecture_of", "build_generator", "load_generator", "log_and_register_generator"]

GENERATOR_WEIGHTS = "generator_weights"  # artifact key: state dict file (torch.save, weights_only-loadable)
GENERATOR_SPEC = "generator_spec"  # artifact key: JSON with the architecture name and builder kwargs


def _mlflow_pyfunc_base():
    import mlflow.pyfunc

    return mlflow.pyfunc.PythonModel


class HolefillGenerator(_mlflow_pyfunc_base()):
    """MLflow ``pyfunc`` wrapper of a holefill generator.

    Artifacts: an fp32 state dict (loaded with ``weights_only=True``) and a JSON spec (architecture name,
    builder kwargs); the module is rebuilt through :func:`models.registry.get_architecture`, so loading needs
    the holefill package importable. ``predict`` takes ``{"image": (B,3,H,W) float32 in [0,1],
    "mask": (B,1,H,W) float32, 1 = hole}`` of any size and returns the composited inpainting.
    """

    generator: nn.Module | None = None
    arch: str | None = None
    # Skip MLflow's type-hint-driven input conversion (and its warning that ``predict`` has no hints): this
    # model declares an explicit tensor signature instead. ChatModel uses the same switch.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        spec = json.loads(Path(context.artifacts[GENERATOR_SPEC]).read_text())
        self.generator, self.arch = build_generator(spec, context.artifacts[GENERATOR_WEIGHTS])

    def predict(self, context, model_input, params=None):  # noqa: D401 - MLflow's signature
        image = torch.as_tensor(np.asarray(model_input["image"], dtype=np.float32))
        mask = torch.as_tensor(np.asarray(model_input["mask"], dtype=np.float32))
        with torch.no_grad():
            return inpaint_tensor(self.generator, self.arch, image, mask).numpy()


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
    import mlflow

    from importlib import metadata

    reqs = [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}", f"mlflow=={mlflow.__version__}"]
    with contextlib.suppress(metadata.PackageNotFoundError):
        reqs.append(f"holefill=={metadata.version('holefill')}")
    return reqs


def log_and_register_generator(tracking_uri: str, run_id: str, model: nn.Module, example_image: torch.Tensor,
                               example_mask: torch.Tensor, registered_model: str,
                               tags: Mapping[str, Any] | None = None, *, arch: str | None = None,
                               generator_kwargs: Mapping[str, Any] | None = None, name: str = "generator"):
    """Log ``model`` (as fp32) to run ``run_id`` as a pyfunc model and register it under ``registered_model``.

    The model carries a tensor signature and ``(example_image, example_mask)`` as input example (keep it
    small: MLflow runs ``predict`` on it to validate serving). ``tags`` (redacted) go on the new model version,
    together with ``holefill.arch``. Returns the ``ModelVersion``.
    """
    import mlflow
    from mlflow.models import Model, ModelSignature
    from mlflow.types import Schema, TensorSpec

    arch = arch or architecture_of(model)
    client = mlflow_client(tracking_uri)
    run = client.get_run(run_id)
    image = example_image.detach().float().cpu()
    mask = example_mask.detach().float().cpu()
    with torch.no_grad():
        state = {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().contiguous()
                 for k, v in model.state_dict().items()}
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, -1, -1), "image"),
                       TensorSpec(np.dtype(np.float32), (-1, 1, -1, -1), "mask")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, -1, -1))]),
    )
    version_tags = tag_dict({**dict(tags or {}), "holefill.arch": arch})
    with tempfile.TemporaryDirectory(prefix="holefill-model-") as tmp:
        weights = Path(tmp) / "generator.pt"
        spec = Path(tmp) / "generator.json"
        torch.save(state, weights)
        spec.write_text(json.dumps({"arch": arch, "generator_kwargs": dict(generator_kwargs or {}),
                                    "format": "holefill-generator/1"}))
        with _fluent_target(tracking_uri, run.info.experiment_id):
            info = Model.log(
                None, name=name, flavor=mlflow.pyfunc, run_id=run_id, python_model=HolefillGenerator(),
                artifacts={GENERATOR_WEIGHTS: str(weights), GENERATOR_SPEC: str(spec)},
                signature=signature, input_example={"image": image.numpy(), "mask": mask.numpy()},
                pip_requirements=_pip_requirements(), metadata={"holefill_arch": arch},
                registered_model_name=registered_model, tags={"holefill.arch": arch},
            )
    version = str(info.registered_model_version)
    for key, value in version_tags.items():
        client.set_model_version_tag(registered_model, version, key, value)
    return client.get_model_version(registered_model, version)


def load_generator(model_uri: str, tracking_uri: str | None = None) -> tuple[nn.Module, str]:
    """Load a generator logged by :func:`log_and_register_generator`: ``(module in eval mode, arch name)``.

    ``model_uri`` is anything MLflow resolves (``models:/lbam@champion``, ``models:/lbam/3``, ``runs:/…``,
    ``models:/m-…``, a local model folder). ``tracking_uri`` defaults to MLflow's configured one.
    """
    import mlflow.pyfunc

    _alias_legacy_wrapper()
    # MLflow downloads a remote model into a fresh temporary folder that it never removes (45 MB for RN, 267 MB for
    # LBAM, on every load: promotion, evaluation, inference); the weights are read into memory by load_context, so
    # the download can go as soon as the model is built.
    with _fluent_target(tracking_uri, None), tempfile.TemporaryDirectory(prefix="holefill-load-") as download:
        try:
            wrapper = mlflow.pyfunc.load_model(model_uri, dst_path=download).unwrap_python_model()
        except Exception as exc:
            raise ValueError(f"cannot load model {redact(model_uri)}: {str(exc).splitlines()[0] if str(exc) else exc}") from None
    if not isinstance(wrapper, HolefillGenerator) or wrapper.generator is None:
        raise ValueError(f"model {redact(model_uri)} is not a holefill generator (logged by log_and_register_generator)")
    return wrapper.generator, str(wrapper.arch)


def _alias_legacy_wrapper() -> None:
    """Versions registered before packaging left run tracking pickled their wrapper as
    ``pipeline.tracking.HolefillGenerator``; point that name at this class so they keep loading."""
    import pipeline.tracking as legacy_home

    if not hasattr(legacy_home, "HolefillGenerator"):
        legacy_home.HolefillGenerator = HolefillGenerator
