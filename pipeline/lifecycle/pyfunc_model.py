"""The code of a registered holefill model: MLflow runs this file, holefill never imports it.

A registered generator is an MLflow *model from code*: :func:`pipeline.lifecycle.packaging.log_and_register_generator`
copies this file into the model, bundles the ``models/`` package beside it (``code_paths``) and stores the
weights as a ``weights_only`` state dict; ``mlflow.pyfunc.load_model`` / ``mlflow models serve`` execute this
file, which builds the generator through :mod:`models.registry`. Nothing is unpickled.

Why this file is separate from both neighbours:

* it is the MLflow adapter, and ``models/`` knows nothing of MLflow (it must travel to any serving host and
  be exported, imported by training, etc. without it);
* in a serving process the only holefill code is the bundled ``models/`` package, so this file imports
  ``models.*``, mlflow, numpy, pandas, Pillow and torch, and nothing from ``pipeline`` (which is not there).

Inputs (declared in the model's signature): a table with columns ``image`` and ``mask``, each encoded image
bytes (base64 in JSON, as MLflow's ``dataframe_split``/``dataframe_records``/``inputs`` formats carry binary
columns); any size; output: a table with one column ``image`` of PNG bytes, the composited result. Optional
param ``strategy``: ``crop`` (windows around the holes for large photos, the default) or ``whole``. Calling
the unwrapped model in-process also accepts ``{"image": (B,3,H,W) float array, "mask": (B,1,H,W)}`` and
returns the float array. Bad requests raise ``MlflowException`` with ``INVALID_PARAMETER_VALUE`` (HTTP 400
from MLflow's scoring server) whose ``reason`` field is one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from models.codec import DEFAULT_MAX_PIXELS, decode_request, encode_png
from models.inpaint import CropStrategy, inpaint_tensor
from models.registry import get_architecture

# Artifact keys and model-config keys; pipeline.lifecycle.packaging writes what this file reads.
GENERATOR_WEIGHTS = "generator_weights"
GENERATOR_SPEC = "generator_spec"
STRATEGIES = ("crop", "whole")


def _bad_request(message: str) -> MlflowException:
    # ``reason`` becomes a field of the JSON error body: the one line a client needs, beside MLflow's own message.
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE, reason=message)


class HolefillInpainter(mlflow.pyfunc.PythonModel):
    """A holefill generator as an MLflow ``pyfunc``: encoded image + mask in, composited PNG out."""

    # The signature is declared explicitly (binary columns); skip MLflow's type-hint driven conversion.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        spec = json.loads(Path(context.artifacts[GENERATOR_SPEC]).read_text())
        self.arch = str(spec["arch"])
        generator = get_architecture(self.arch).generator(**dict(spec.get("generator_kwargs") or {}))
        generator.load_state_dict(torch.load(context.artifacts[GENERATOR_WEIGHTS], map_location="cpu",
                                             weights_only=True), strict=True)
        self.generator = generator.float().eval()
        config = dict(context.model_config or {})
        self.max_pixels = int(config.get("max_pixels", DEFAULT_MAX_PIXELS))
        self.default_strategy = str(config.get("strategy", "crop"))
        self.crop = CropStrategy(**{k: int(config[k]) for k in ("margin", "trigger", "limit") if k in config})

    def _strategy(self, params: dict[str, Any] | None) -> CropStrategy | None:
        name = str((params or {}).get("strategy") or self.default_strategy)
        if name not in STRATEGIES:
            raise _bad_request(f"param strategy must be one of {', '.join(STRATEGIES)}, got {name!r}")
        return self.crop if name == "crop" else None

    def predict(self, context, model_input, params=None):  # noqa: D401 - MLflow's signature
        strategy = self._strategy(params)
        if isinstance(model_input, dict) and not isinstance(model_input.get("image"), (bytes, str, list)):
            return self._predict_tensors(model_input, strategy)
        if isinstance(model_input, dict) and isinstance(model_input.get("image"), (bytes, str)):
            model_input = [model_input]  # one request given as a dict of two encoded images
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        missing = [c for c in ("image", "mask") if c not in frame.columns]
        if missing:
            raise _bad_request(f"request is missing column(s) {', '.join(missing)}; send image and mask as "
                               "base64 encoded PNG/JPEG bytes")
        results = []
        for row, (image_bytes, mask_bytes) in enumerate(zip(frame["image"], frame["mask"])):
            try:
                image, mask = decode_request(image_bytes, mask_bytes, self.max_pixels)
            except ValueError as exc:
                prefix = f"row {row}: " if len(frame) > 1 else ""
                raise _bad_request(prefix + str(exc)) from None
            with torch.no_grad():
                results.append(encode_png(inpaint_tensor(self.generator, self.arch, image, mask, strategy=strategy)))
        return pd.DataFrame({"image": results})

    def _predict_tensors(self, model_input: dict, strategy: CropStrategy | None) -> np.ndarray:
        try:
            image = torch.as_tensor(np.asarray(model_input["image"], dtype=np.float32))
            mask = torch.as_tensor(np.asarray(model_input["mask"], dtype=np.float32))
            with torch.no_grad():
                return inpaint_tensor(self.generator, self.arch, image, mask, strategy=strategy).numpy()
        except (KeyError, ValueError, TypeError) as exc:
            raise _bad_request(f"tensor input: {exc}") from None


mlflow.models.set_model(HolefillInpainter())
