"""Export a generator with torch.export (an ExportedProgram) or to ONNX, check it against eager, record it on the version.

The exported graph is :class:`CompositedGenerator`: ``(image (B,3,H,W) in [0,1], mask (B,1,H,W), 1 = hole)
-> composited (B,3,H,W)``, with batch, height and width dynamic (H and W multiples of the architecture's
``size_multiple``: RN 4, LBAM 128). Both formats start from one ``torch.export.export`` of the module: the
``exported_program`` format saves it (``torch.export.save``, a ``.pt2`` file that ``torch.export.load`` reads
back), the ``onnx`` format hands it to torch's ``torch.export``-based ONNX exporter (``dynamo=True``, opset 18;
needs the ``onnx`` and ``onnxscript`` packages, and ``onnxruntime`` to verify). Neither TorchScript nor the
TorchScript-based ONNX exporter is used (both deprecated; PyTorch turns them into errors).

What the generators do to be exportable: the mask *value* check (a host read of the mask's min and max) is left
out of the graph (:func:`models.input_checks.mask_values_trusted`, as the former trace did: callers of an exported
file check their masks); RN's per-sample statistics take their vectorised form while exporting (the eager loop over
the batch would fix the batch size); LBAM's Gaussian activations clamp their parameters out of place (an in-place
write to ``.data`` cannot be traced). RN's masked sums and divisions are tensor arithmetic, not control flow, and
export as they are. The example input is twice the smallest accepted size, so that no dimension the graph derives
from H or W (LBAM's bottleneck is H/128) is 1 there: a dimension of 1 would be specialised (0/1 specialisation).
The programs take the sizes the eager generators take: RN's from 12 on (its reflection padding needs a
quarter-scale map of more than 2 pixels; the program refuses smaller inputs as eager does), LBAM's every multiple
of 128. RN and LBAM have no FFT blocks, so both export; LaMa's would not.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field
from torch.export import Dim, ExportedProgram
from torch.fx.experimental import _config as fx_config  # private: used by _size_oblivious alone

from models.inpaint import composite
from models.input_checks import mask_values_trusted
from models.registry import get_architecture
from pipeline.config import Config
from pipeline.tracking import mlflow_client

__all__ = ["CompositedGenerator", "ExportJobConfig", "ExportResult", "export_generator", "export_program",
           "verify_export", "verification_sizes", "log_export", "write_export"]

log = logging.getLogger("holefill.export")

Format = Literal["exported_program", "onnx"]
SUFFIX = {"exported_program": ".pt2", "onnx": ".onnx"}
ONNX_OPSET = 18  # the torch.export-based exporter's own opset (torch.onnx's TORCHLIB_OPSET); it converts from there
MAX_BATCH = 1024  # the dynamic dimensions' upper bounds, far above any single request
MAX_SIDE = 8192


class ExportJobConfig(Config):
    """``jobs/export.py``: which model, which format, where to write, how closely it must match."""

    model: str = "models:/lbam@champion"
    arch: str | None = None  # for a plain weights file
    format: Format = "exported_program"
    out: str | None = None  # default: <name>-v<version>.<pt2|onnx> (or <arch>.<pt2|onnx>) in the working directory
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
    """Three (H, W) sizes the architecture accepts: a square, a 1:2 and a 3:1 rectangle, at least 64 pixels a side.

    The smallest square is the smallest size LBAM accepts (its bottleneck is 1x1 there); none is the export's
    example size (twice the square), so the dynamic dimensions are checked away from where they were traced.
    """
    side = max(64, get_architecture(arch).size_multiple)
    return [(side, side), (side, 2 * side), (3 * side, side)]


def _random_inputs(size: tuple[int, int], batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(batch, 3, *size, generator=generator)
    mask = (torch.rand(batch, 1, *size, generator=generator) > 0.7).float()
    return image, mask


def _dynamic_shapes(arch: str) -> dict[str, dict[int, object]]:
    """Batch, height and width dynamic; H and W as multiples of the architecture's ``size_multiple``."""
    multiple = get_architecture(arch).size_multiple
    batch = Dim("batch", min=1, max=MAX_BATCH)
    height = multiple * Dim("height_blocks", min=1, max=MAX_SIDE // multiple)
    width = multiple * Dim("width_blocks", min=1, max=MAX_SIDE // multiple)
    spatial = {0: batch, 2: height, 3: width}
    return {"image": spatial, "mask": dict(spatial)}


def export_program(generator: nn.Module, arch: str, seed: int = 0) -> ExportedProgram:
    """``torch.export.export`` of :class:`CompositedGenerator` (fp32, CPU) with dynamic batch, height and width.

    The example is a batch of 2 at twice the smallest accepted size (no derived dimension of size 0 or 1, which
    torch.export would specialise); the mask value check stays out of the graph (see the module docstring).
    """
    module = CompositedGenerator(generator.float().cpu().eval()).requires_grad_(False)
    side = verification_sizes(arch)[0][0]
    example = _random_inputs((2 * side, 2 * side), 2, seed)
    with torch.no_grad(), mask_values_trusted(), _size_oblivious():
        return torch.export.export(module, example, dynamic_shapes=_dynamic_shapes(arch), strict=False)


def _size_oblivious():
    """Trace without guarding on "is this size 1" (the one private torch setting export uses; named here alone).

    Conv2d's shape function picks the output's memory format by asking whether a dimension is 1
    (``torch._prims_common.check_contiguous_sizes_strides``): traced at 256x256, LBAM's 1/128-scale bottleneck conv
    adds the guard ``H // 128 != 1``, and the program would refuse LBAM's smallest input (128). PyTorch's export
    documentation names ``backed_size_oblivious`` for this; if a torch release moves it, this fails loudly
    (AttributeError) instead of exporting a program that silently refuses the smallest size.
    """
    if not hasattr(fx_config, "backed_size_oblivious"):
        raise RuntimeError(f"torch {torch.__version__} has no torch.fx.experimental._config.backed_size_oblivious: "
                           "pipeline/lifecycle/exporting.py must find its replacement")
    return fx_config.patch(backed_size_oblivious=True)


def export_generator(generator: nn.Module, arch: str, fmt: Format, path: str | os.PathLike, seed: int = 0) -> Path:
    """Write ``generator`` (wrapped by :class:`CompositedGenerator`, fp32, CPU) to ``path`` as ``fmt``."""
    if fmt not in SUFFIX:
        raise ValueError(f"format must be one of {', '.join(SUFFIX)}, got {fmt!r}")
    if fmt == "onnx":
        for package in ("onnx", "onnxscript"):  # torch's exporter needs both to build and write the model
            try:
                __import__(package)
            except ImportError:
                raise ValueError(f"ONNX export needs the {package} package: pip install 'holefill[export]'") from None
    return write_export(export_program(generator, arch, seed), fmt, path)


def write_export(program: ExportedProgram, fmt: Format, path: str | os.PathLike) -> Path:
    """Save ``program`` (from :func:`export_program`) as ``fmt``; one program serves both formats."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "exported_program":
        torch.export.save(program, str(path))
    else:
        onnx_program = torch.onnx.export(program, dynamo=True, opset_version=ONNX_OPSET, verbose=False,
                                         output_names=["inpainted"])
        if onnx_program is None:
            raise ValueError("torch.onnx.export returned no ONNX program")
        onnx_program.save(str(path), external_data=False)  # one file: the generators are far below ONNX's 2 GB
    if not path.is_file() or not path.stat().st_size:
        raise ValueError(f"the {fmt} export wrote nothing to {path}")
    return path


def _runner(path: Path, fmt: Format):
    if fmt == "exported_program":
        loaded = torch.export.load(str(path)).module()
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
