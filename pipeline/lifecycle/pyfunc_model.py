"""The code of a registered holefill model: MLflow runs this file, holefill never imports it.

A registered generator is an MLflow *model from code*: :func:`pipeline.lifecycle.packaging.log_and_register_generator`
copies this file into the model, bundles the ``models/`` package beside it (``code_paths``) and stores the
weights as a ``weights_only`` state dict; ``mlflow.pyfunc.load_model`` / ``mlflow models serve`` execute this
file, which builds the generator from its :class:`models.record.GeneratorRecord`. Nothing is unpickled.

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

Limits (the ``model_config`` keys of ``ServingDefaults``; the same the Ray Serve app applies): images and masks
are PNG, JPEG or WebP (:data:`models.codec.ALLOWED_FORMATS`), each field at most
:func:`models.codec.max_encoded_bytes` and ``max_pixels`` (checked before decoding, every row's headers before
any row is decoded, the tensor input too); ``whole`` above ``max_whole_pixels`` is refused (400 naming the key);
the crop strategy makes at most ``max_windows`` windows an image; ``request_timeout_s`` is the inference deadline
(504, checked before every generator call). Inside ``mlflow models serve`` the scoring server's answers to
malformed or too deeply nested JSON become 400 JSON with one line, and a body over the byte limit 413
(:func:`_harden_scoring_server`); a failure inside inference is a 500 with one line.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import DEADLINE_EXCEEDED, INTERNAL_ERROR, INVALID_PARAMETER_VALUE

from models.codec import DEFAULT_MAX_PIXELS, FORMAT_NAMES, decode_opened, encode_png, read_headers, to_float
from models.inpaint import (
    DEFAULT_MAX_WHOLE_PIXELS,
    DEFAULT_REQUEST_TIMEOUT_S,
    CropStrategy,
    DeadlineExceeded,
    check_deadline,
    inpaint_tensor,
)
from models.record import GeneratorRecord

# Artifact keys and model-config keys; pipeline.lifecycle.packaging writes what this file reads.
GENERATOR_WEIGHTS = "generator_weights"
GENERATOR_SPEC = "generator_spec"
STRATEGIES = ("crop", "whole")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:500] if text else type(exc).__name__


def _bad_request(message: str, error_code: int = INVALID_PARAMETER_VALUE) -> MlflowException:
    # ``reason`` becomes a field of the JSON error body: the one line a client needs, beside MLflow's own message.
    return MlflowException(message, error_code=error_code, reason=message)


def _harden_scoring_server() -> bool:
    """Inside ``mlflow models serve``: make every answer to what a client sends JSON with a one-line reason.

    MLflow's scoring server answers a body nested too deeply for its JSON parser (``RecursionError``) with a
    plain-text 500, and echoes the whole body back in its message for malformed JSON. Its ``invocations`` (looked
    up per request) is wrapped so those become HTTP 400 JSON with one line, a body over the byte limit
    (``max_body_bytes``, read before parsing) 413, and anything else unexpected 500 JSON with one line.
    Outside the scoring server (``MLFLOW_...SERVER_MODEL_PATH`` unset) nothing is changed. Returns whether it
    runs inside the scoring server.
    """
    # lazy: MLflow's scoring server module, only where it serves this model
    from mlflow.pyfunc import scoring_server

    if os.environ.get(getattr(scoring_server, "_SERVER_MODEL_PATH", "")) is None:
        return False
    original = scoring_server.invocations
    if getattr(original, "_holefill", False):
        return True

    def answer(status: int, message: str, code: str) -> "scoring_server.InvocationsResponse":
        body = json.dumps({"error_code": code, "message": message, "reason": message})
        return scoring_server.InvocationsResponse(response=body, status=status, mimetype="application/json")

    def invocations(data, content_type, model, input_schema):
        limit = _SERVER_LIMITS.get("max_body_bytes")
        if limit and isinstance(data, (bytes, bytearray, str)) and len(data) > limit:
            return answer(413, f"request body of {len(data)} bytes is over the limit of {limit} bytes "
                               "(model_config max_body_bytes)", "REQUEST_LIMIT_EXCEEDED")
        try:
            return original(data, content_type, model, input_schema)
        except RecursionError:
            return answer(400, "request body is not JSON this server reads: nested too deeply",
                          "INVALID_PARAMETER_VALUE")
        except MlflowException as exc:
            reason = getattr(exc, "json_kwargs", {}).get("reason") if hasattr(exc, "json_kwargs") else None
            message = reason or _one_line(exc)
            if "Input: " in exc.message or "Ensure that input is a valid JSON" in exc.message:
                message = "request body is not valid JSON: " + _one_line(exc).split("Error: ")[-1][:200]
            return answer(exc.get_http_status_code(), message, str(exc.error_code))
        except Exception as exc:  # a parser failure on client bytes: one line, never a traceback
            return answer(400, f"request could not be read: {_one_line(exc)}", "INVALID_PARAMETER_VALUE")

    invocations._holefill = True  # type: ignore[attr-defined]
    scoring_server.invocations = invocations
    return True


# The serving limits the scoring-server wrapper reads (set by the model's load_context; one model per server).
_SERVER_LIMITS: dict[str, int] = {}


class HolefillInpainter(mlflow.pyfunc.PythonModel):
    """A holefill generator as an MLflow ``pyfunc``: encoded image + mask in, composited PNG out."""

    # The signature is declared explicitly (binary columns); skip MLflow's type-hint driven conversion.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        spec = json.loads(Path(context.artifacts[GENERATOR_SPEC]).read_text())
        state = torch.load(context.artifacts[GENERATOR_WEIGHTS], map_location="cpu", weights_only=True)
        record = GeneratorRecord(str(spec["arch"]), dict(spec.get("generator_kwargs") or {}), state,
                                 dict(spec.get("provenance") or {}))
        self.arch = record.arch
        self.generator = record.build()
        self._configure(context.model_config)
        if _harden_scoring_server():  # stop before MLflow's own timeout answers a plain 504 in our place
            # lazy: MLflow's scoring server settings, only where it serves this model
            from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT

            server_timeout = float(MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get() or 0)
            if server_timeout > 0:
                self.request_timeout_s = min(self.request_timeout_s, 0.8 * server_timeout)

    def _configure(self, model_config) -> None:
        """The serving limits from the model's ``model_config`` (keys of ``ServingDefaults.model_config_dict``)."""
        config = dict(model_config or {})
        self.max_pixels = int(config.get("max_pixels", DEFAULT_MAX_PIXELS))
        self.max_whole_pixels = int(config.get("max_whole_pixels", DEFAULT_MAX_WHOLE_PIXELS))
        self.request_timeout_s = float(config.get("request_timeout_s", DEFAULT_REQUEST_TIMEOUT_S))
        self.default_strategy = str(config.get("strategy", "crop"))
        self.crop = CropStrategy(**{k: int(config[k]) for k in ("margin", "trigger", "limit", "max_windows")
                                    if k in config})
        body = config.get("max_body_bytes")
        _SERVER_LIMITS["max_body_bytes"] = int(body) if body else math.ceil(4 / 3 * 5 * self.max_pixels) + (4 << 20)

    def _strategy_name(self, params: dict[str, Any] | None) -> str:
        name = str((params or {}).get("strategy") or self.default_strategy)
        if name not in STRATEGIES:
            raise _bad_request(f"param strategy must be one of {', '.join(STRATEGIES)}, got {name[:40]!r}")
        return name

    def _plan(self, name: str, asked: bool, height: int, width: int) -> CropStrategy | None:
        """The windows for one image (``None``: whole), within the limits: ``whole`` asked for above
        ``max_whole_pixels`` is refused; the default whole, or a crop image under the trigger, above it gets windows."""
        pixels = height * width
        if name == "whole" and pixels > self.max_whole_pixels:
            if asked:
                raise _bad_request(f"strategy whole is limited to {self.max_whole_pixels} pixels, the image is "
                                   f"{width}x{height} = {pixels}: send strategy crop, or raise max_whole_pixels in "
                                   "the model_config")
            name = "crop"
        if name == "whole":
            return None
        if max(height, width) <= self.crop.trigger and pixels > self.max_whole_pixels:
            return CropStrategy(self.crop.margin, 1, self.crop.limit, self.crop.max_windows)
        return self.crop

    def _run(self, image: torch.Tensor, mask: torch.Tensor, windows: CropStrategy | None, deadline: float,
             prefix: str) -> torch.Tensor:
        try:
            with torch.no_grad():
                return inpaint_tensor(self.generator, self.arch, image, mask, strategy=windows, deadline=deadline)
        except DeadlineExceeded as exc:
            raise _bad_request(f"{prefix}{_one_line(exc)} ({self.request_timeout_s:g} s, model_config "
                               "request_timeout_s)", DEADLINE_EXCEEDED) from None
        except ValueError as exc:
            raise _bad_request(prefix + _one_line(exc)) from None
        except Exception as exc:  # ours, not the client's: that request's 500 with one line
            raise _bad_request(f"{prefix}internal error: {_one_line(exc)}", INTERNAL_ERROR) from None

    def predict(self, context, model_input, params=None):  # noqa: D401 - MLflow's signature
        name = self._strategy_name(params)
        asked = bool((params or {}).get("strategy"))
        deadline = time.monotonic() + self.request_timeout_s
        if isinstance(model_input, dict) and not isinstance(model_input.get("image"), (bytes, str, list)):
            return self._predict_tensors(model_input, name, asked, deadline)
        if isinstance(model_input, dict) and isinstance(model_input.get("image"), (bytes, str)):
            model_input = [model_input]  # one request given as a dict of two encoded images
        try:
            frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        except Exception as exc:
            raise _bad_request(f"request is not a table of image and mask: {_one_line(exc)}") from None
        missing = [c for c in ("image", "mask") if c not in frame.columns]
        if missing:
            raise _bad_request(f"request is missing column(s) {', '.join(missing)}; send image and mask as "
                               f"base64 encoded {FORMAT_NAMES} bytes")
        if len(frame) == 0:
            raise _bad_request("request holds no rows: send one image and mask per row")
        # Every row's headers first (bytes, format, pixels, sizes, work): a bad row costs no decoding of the others.
        checked = []
        for row, (image_bytes, mask_bytes) in enumerate(zip(frame["image"], frame["mask"])):
            prefix = f"row {row}: " if len(frame) > 1 else ""
            try:
                opened = read_headers(_as_bytes(image_bytes), _as_bytes(mask_bytes), self.max_pixels)
            except ValueError as exc:
                raise _bad_request(prefix + _one_line(exc)) from None
            checked.append((prefix, opened, self._plan(name, asked, opened[3], opened[2])))
        results = []
        for prefix, opened, windows in checked:
            try:
                check_deadline(deadline, "the request")
                image, mask = to_float(*decode_opened(*opened))
            except DeadlineExceeded as exc:
                raise _bad_request(f"{prefix}{_one_line(exc)}", DEADLINE_EXCEEDED) from None
            except ValueError as exc:
                raise _bad_request(prefix + _one_line(exc)) from None
            results.append(encode_png(self._run(image, mask, windows, deadline, prefix)))
        return pd.DataFrame({"image": results})

    def _predict_tensors(self, model_input: dict, name: str, asked: bool, deadline: float) -> np.ndarray:
        """In-process float input: ``{"image": (B,3,H,W), "mask": (B,1,H,W)}``, under the same limits."""
        try:
            image = np.asarray(model_input["image"], dtype=np.float32)
            mask = np.asarray(model_input["mask"], dtype=np.float32)
        except (KeyError, ValueError, TypeError) as exc:
            raise _bad_request(f"tensor input: {_one_line(exc)}") from None
        if image.ndim != 4 or mask.ndim != 4:
            raise _bad_request(f"tensor input: image must be (B,3,H,W) and mask (B,1,H,W), got shapes "
                               f"{image.shape} and {mask.shape}")
        height, width = int(image.shape[-2]), int(image.shape[-1])
        if height * width > self.max_pixels:
            raise _bad_request(f"tensor input: image is {width}x{height} = {height * width} pixels, over the limit "
                               f"of {self.max_pixels}")
        if not (np.isfinite(image).all() and np.isfinite(mask).all()):
            raise _bad_request("tensor input: image and mask must be finite")
        windows = self._plan(name, asked, height, width)
        out = [self._run(torch.from_numpy(image[b:b + 1]), torch.from_numpy(mask[b:b + 1]), windows, deadline,
                         f"tensor input {b}: " if image.shape[0] > 1 else "tensor input: ")
               for b in range(image.shape[0])]
        if not out:
            raise _bad_request("tensor input: the batch is empty")
        return torch.cat(out).numpy()


def _as_bytes(value: Any) -> Any:
    """A binary cell as bytes (MLflow decodes base64 for binary columns; a str is taken as base64 here too)."""
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=False)
        except (binascii.Error, ValueError):
            raise _bad_request("a field is neither bytes nor base64") from None
    return value


mlflow.models.set_model(HolefillInpainter())
