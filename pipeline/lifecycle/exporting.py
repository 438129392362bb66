"""Export a generator to TorchScript or ONNX, check it against the eager module, record it on the model version.

The exported graph is :class:`CompositedGenerator`: ``(image (B,3,H,W) in [0,1], mask (B,1,H,W), 1 = hole)
-> composited (B,3,H,W)``, with batch, height and width dynamic (H and W multiples of the architecture's
``size_multiple``: RN 4, LBAM 128). TorchScript is a trace (``torch.jit.trace``; the generators' Python
branches depend on shapes only, so the trace holds at every size, which :func:`verify_export` checks); ONNX
uses the TorchScript-based exporter (``dynamo=False``; torch 2.13's default torch.export-based exporter needs
``onnxscript`` and cannot trace RN's data-dependent statistics) at opset 17 and needs the ``onnx`` package,
and ``onnxruntime`` to verify. RN and LBAM have no FFT blocks, so both export; LaMa's would not.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field

from models.inpaint import composite
from models.registry import get_architecture
from pipeline.config import Config
from pipeline.tracking import mlflow_client

__all__ = ["CompositedGenerator", "ExportJobConfig", "ExportResult", "export_generator", "verify_export",
           "verification_sizes", "log_export"]

log = logging.getLogger("holefill.export")

Format = Literal["torchscript", "onnx"]
SUFFIX = {"torchscript": ".pt", "onnx": ".onnx"}
ONNX_OPSET = 17


class ExportJobConfig(Config):
    """``jobs/export.py``: which model, which format, where to write, how closely it must match."""

    model: str = "models:/lbam@champion"
    arch: str | None = None  # for a plain weights file
    format: Format = "torchscript"
    out: str | None = None  # default: <name>-v<version>.<pt|onnx> (or <arch>.<pt|onnx>) in the working directory
    tolerance: float = Field(default=1e-4, gt=0)
    seed: int = 0
    log_to_mlflow: bool = True  # log the file as an artifact of the model version's run and tag the version
    tracking_uri: str | None = None


class CompositedGenerator(nn.Module):
    """What is exported: the generator's prediction inside the hole, the input outside (clamped to [0,1])."""

    def __init__(self, generator: nn.Module) -> None:
        super().__init__()
        self.generator = generator

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return composite(self.generator(image, mask).clamp(0, 1), image, mask)


@dataclass(frozen=True)
class ExportResult:
    """The written file, its format, and the largest |exported - eager| seen at each verification size."""

    path: Path
    format: str
    max_abs_diff: dict[tuple[int, int], float]


def verification_sizes(arch: str) -> list[tuple[int, int]]:
    """Two (H, W) sizes the architecture accepts: a square and a 1:2 rectangle, at least 64 pixels a side."""
    side = max(64, get_architecture(arch).size_multiple)
    return [(side, side), (side, 2 * side)]


def _random_inputs(size: tuple[int, int], batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(batch, 3, *size, generator=generator)
    mask = (torch.rand(batch, 1, *size, generator=generator) > 0.7).float()
    return image, mask


def export_generator(generator: nn.Module, arch: str, fmt: Format, path: str | os.PathLike, seed: int = 0) -> Path:
    """Write ``generator`` (wrapped by :class:`CompositedGenerator`, fp32, CPU) to ``path`` as ``fmt``."""
    if fmt not in SUFFIX:
        raise ValueError(f"format must be torchscript or onnx, got {fmt!r}")
    module = CompositedGenerator(generator.float().cpu().eval()).requires_grad_(False)
    example = _random_inputs(verification_sizes(arch)[0], 1, seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The exporters warn about Python branches on shapes (input checks); verify_export checks other sizes.
    if fmt == "onnx":
        try:
            import onnx  # noqa: F401  (torch's exporter needs it to write the model)
        except ImportError:
            raise ValueError("ONNX export needs the onnx package: pip install 'holefill[export]'") from None
    # The exporters warn about Python branches on shapes (input checks); verify_export checks other sizes.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if fmt == "torchscript":
            torch.jit.save(torch.jit.trace(module, example, check_trace=False), str(path))
        else:
            dynamic = {0: "batch", 2: "height", 3: "width"}
            torch.onnx.export(module, example, str(path), dynamo=False, opset_version=ONNX_OPSET,
                              input_names=["image", "mask"], output_names=["inpainted"],
                              dynamic_axes={"image": dynamic, "mask": dynamic, "inpainted": dynamic})
    return path


def _runner(path: Path, fmt: Format):
    if fmt == "torchscript":
        loaded = torch.jit.load(str(path), map_location="cpu")
        return lambda image, mask: loaded(image, mask)
    try:
        import onnxruntime
    except ImportError:
        raise ValueError("verifying an ONNX export needs onnxruntime: pip install 'holefill[export]'") from None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda image, mask: torch.from_numpy(session.run(None, {"image": image.numpy(), "mask": mask.numpy()})[0])


def verify_export(path: str | os.PathLike, fmt: Format, generator: nn.Module, arch: str, tolerance: float = 1e-4,
                  seed: int = 0) -> dict[tuple[int, int], float]:
    """Run the exported file and the eager module on random inputs at :func:`verification_sizes` (batch 2).

    Returns the largest absolute difference per size; raises ``ValueError`` naming the size if one exceeds
    ``tolerance``.
    """
    run = _runner(Path(path), fmt)
    eager = CompositedGenerator(generator.float().cpu().eval())
    diffs = {}
    for offset, size in enumerate(verification_sizes(arch)):
        image, mask = _random_inputs(size, 2, seed + 1 + offset)
        with torch.no_grad():
            diff = float((run(image, mask) - eager(image, mask)).abs().max())
        diffs[size] = diff
        if not diff <= tolerance:
            raise ValueError(f"{fmt} export differs from the eager generator by {diff:.3g} > {tolerance:g} "
                             f"at {size[0]}x{size[1]}")
    return diffs


def log_export(tracking_uri: str, name: str, version: str, result: ExportResult) -> str:
    """Log the exported file under ``exports/`` of the version's run and tag the version; returns its URI."""
    client = mlflow_client(tracking_uri)
    run_id = client.get_model_version(name, version).run_id
    if not run_id:
        raise ValueError(f"model {name} version {version} has no run to log the export to")
    client.log_artifact(run_id, str(result.path), artifact_path=f"exports/v{version}")
    uri = f"runs:/{run_id}/exports/v{version}/{result.path.name}"
    client.set_model_version_tag(name, version, f"holefill.export.{result.format}", uri)
    worst = max(result.max_abs_diff.values())
    client.set_model_version_tag(name, version, f"holefill.export.{result.format}.max_abs_diff", f"{worst:.3g}")
    return uri
