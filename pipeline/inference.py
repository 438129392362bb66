"""Inpainting with a trained generator: any image size, composited output, model references, files.

Generators need H and W to be multiples of their architecture's ``size_multiple`` (LBAM: 128, RN: 4).
:func:`inpaint_tensor` fits any size to that rule and back:

* ``fit="pad"`` (default) reflect-pads the bottom/right edges up to the next multiple; the padding is
  known (non-hole) context and is cropped off afterwards.
* ``fit="crop"`` runs the generator on up to four windows of the largest fitting size anchored at the
  image corners (together they cover every pixel) and averages predictions where windows overlap; for
  images at least one multiple in each direction, when padding would add too much invented context.

Either way the result is composited (``pred * mask + image * (1 - mask)``), so every pixel outside the
hole is exactly the input pixel.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageOps

from models.validation import check_mask
from pipeline.config import Config

__all__ = [
    "IMAGE_SUFFIXES",
    "InpaintJobConfig",
    "composite",
    "inpaint_file",
    "inpaint_paths",
    "inpaint_tensor",
    "load_image",
    "load_mask",
    "load_model_ref",
    "save_image",
]

log = logging.getLogger(__name__)

Fit = Literal["pad", "crop"]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
DEFAULT_MODEL = "models:/lbam@champion"


def composite(pred: torch.Tensor, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Generator prediction inside the hole, the input outside: ``pred * mask + image * (1 - mask)``."""
    return pred * mask + image * (1 - mask)


def _size_multiple(arch: str) -> int:
    from models.registry import get_architecture

    return get_architecture(arch).size_multiple


def _check_any_size_inputs(image: torch.Tensor, mask: torch.Tensor) -> None:
    if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[1] != 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"image must be a (B,3,H,W) tensor, got shape {shape}")
    if not image.is_floating_point():
        raise ValueError(f"image must be a float tensor in [0,1], got dtype {image.dtype}")
    check_mask(mask, image)


def _pad_amount(size: int, multiple: int) -> int:
    return (-size) % multiple


def _pad(x: torch.Tensor, pad_h: int, pad_w: int) -> torch.Tensor:
    """Reflect-pad bottom/right; reflection needs pad < size, so very small inputs fall back to replicate."""
    if pad_h == 0 and pad_w == 0:
        return x
    h, w = x.shape[-2:]
    mode = "reflect" if pad_h < h and pad_w < w else "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)


def _predict_padded(generator: nn.Module, image: torch.Tensor, mask: torch.Tensor, multiple: int) -> torch.Tensor:
    h, w = image.shape[-2:]
    pad_h, pad_w = _pad_amount(h, multiple), _pad_amount(w, multiple)
    padded_image = _pad(image, pad_h, pad_w)
    # The padding mirrors known pixels: it is context, not hole.
    padded_mask = F.pad(mask, (0, pad_w, 0, pad_h), value=0.0)
    pred = generator(padded_image, padded_mask)
    return pred[..., :h, :w]


def _window_starts(size: int, window: int) -> list[int]:
    return sorted({0, size - window})


def _predict_cropped(generator: nn.Module, image: torch.Tensor, mask: torch.Tensor, multiple: int) -> torch.Tensor:
    h, w = image.shape[-2:]
    win_h, win_w = (h // multiple) * multiple, (w // multiple) * multiple
    if win_h == 0 or win_w == 0:
        raise ValueError(f"fit='crop' needs an image of at least {multiple}x{multiple}, got {h}x{w}; use fit='pad'")
    total = torch.zeros_like(image)
    count = torch.zeros_like(image[:, :1])
    for top in _window_starts(h, win_h):
        for left in _window_starts(w, win_w):
            sl = (..., slice(top, top + win_h), slice(left, left + win_w))
            window_mask = mask[sl]
            total[sl] += generator(image[sl], window_mask)
            count[sl] += 1
    return total / count


@torch.no_grad()
def inpaint_tensor(generator: nn.Module, arch: str, image: torch.Tensor, mask: torch.Tensor,
                   fit: Fit = "pad") -> torch.Tensor:
    """Inpaint a batch of any size: (B,3,H,W) image in [0,1], (B,1,H,W) mask (1 = hole) -> composited (B,3,H,W).

    The generator fills the hole its own way (as in training) and runs in the dtype and on the device of its
    parameters; the result comes back as float32 on the image's device.
    """
    _check_any_size_inputs(image, mask)
    multiple = _size_multiple(arch)
    param = next(generator.parameters(), None)
    device = param.device if param is not None else image.device
    dtype = param.dtype if param is not None else torch.float32
    x, m = image.to(device=device, dtype=dtype), mask.to(device=device, dtype=dtype)
    if fit == "pad":
        pred = _predict_padded(generator, x, m, multiple)
    elif fit == "crop":
        pred = _predict_cropped(generator, x, m, multiple)
    else:
        raise ValueError(f"fit must be 'pad' or 'crop', got {fit!r}")
    pred = pred.to(device=image.device, dtype=torch.float32).clamp(0, 1)
    return composite(pred, image.float(), mask.float())


# ----------------------------------------------------------------------------------------------------
# Model references


def load_model_ref(ref: str, tracking_uri: str | None = None, arch: str | None = None) -> tuple[nn.Module, str]:
    """Load a generator from an MLflow URI or a local checkpoint: ``(module in eval mode, arch)``.

    * ``models:/name@alias``, ``models:/name/version``, ``runs:/…``, or a local MLflow model folder
      (one holding ``MLmodel``): through :func:`pipeline.tracking.load_generator`;
    * a training checkpoint folder (``state.json`` + ``generator.pt``): arch from ``state.json``;
    * a weights file (``.pt``/``.pth``, any fsspec URL): loaded ``weights_only``; ``arch`` is required
      unless the file wraps the state dict as ``{"arch": ..., "state_dict": ...}``.
    """
    from pipeline.tracking import load_generator

    if ref.startswith(("models:/", "runs:/", "mlflow-artifacts:/")):
        return load_generator(ref, tracking_uri)
    path = Path(ref)
    if path.is_dir() and (path / "MLmodel").is_file():
        return load_generator(str(path), tracking_uri)
    if path.is_dir() and (path / "state.json").is_file():
        state = json.loads((path / "state.json").read_text())
        return _build(state.get("arch") if arch is None else arch, str(path / "generator.pt"), ref)
    if path.is_dir():
        raise ValueError(f"model folder {ref} holds neither an MLflow model (MLmodel) nor a checkpoint (state.json)")
    return _build(arch, ref, ref)


def _build(arch: str | None, weights_url: str, ref: str) -> tuple[nn.Module, str]:
    from models.convert import extract_state_dict, load_weights_file
    from models.registry import get_architecture

    payload = load_weights_file(weights_url)
    if arch is None and isinstance(payload, dict) and isinstance(payload.get("arch"), str):
        arch = payload["arch"]
    if arch is None:
        raise ValueError(f"cannot tell the architecture of {ref}: pass --arch (one of rn, lbam)")
    generator = get_architecture(arch).generator()
    try:
        generator.load_state_dict(extract_state_dict(payload), strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{ref} does not hold {arch} generator weights: {str(exc).splitlines()[0]}") from None
    return generator.float().eval(), arch


# ----------------------------------------------------------------------------------------------------
# Files


def load_image(path: str | Path) -> torch.Tensor:
    """Read an image file (EXIF orientation applied, any mode -> RGB) as a (1,3,H,W) float tensor in [0,1]."""
    from pipeline.imageops import to_rgb

    try:
        with Image.open(path) as im:
            im = to_rgb(ImageOps.exif_transpose(im))
            array = np.asarray(im, dtype=np.uint8).copy()
    except (OSError, SyntaxError) as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from None
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).float().div_(255.0)


def load_mask(path: str | Path, height: int, width: int) -> torch.Tensor:
    """Read a mask PNG (255 = hole, binarised at 128) as (1,1,H,W) float; it must match the image size."""
    from pipeline.imageops import decode_mask_png

    array = decode_mask_png(Path(path).read_bytes())
    if array.shape != (height, width):
        raise ValueError(f"mask {path} is {array.shape[1]}x{array.shape[0]}, image is {width}x{height}: sizes must match")
    return torch.from_numpy(array > 127).float()[None, None]


def generated_mask(height: int, width: int, key: str, spec: str = "lama_medium_256", seed: int = 0) -> torch.Tensor:
    """A deterministic mask for ``key`` from a registered generator, as (1,1,H,W) float (1 = hole)."""
    from pipeline.masks import make_mask

    return torch.from_numpy(make_mask(spec, seed, key, height, width) > 127).float()[None, None]


def save_image(image: torch.Tensor, path: str | Path) -> None:
    """Write a (1,3,H,W) or (3,H,W) float tensor in [0,1] as an image file (format from the suffix)."""
    from pipeline.tracking import to_hwc_uint8

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_hwc_uint8(image)).save(path)


def inpaint_file(generator: nn.Module, arch: str, image_path: str | Path, out_path: str | Path,
                 mask_path: str | Path | None = None, fit: Fit = "pad", mask_spec: str = "lama_medium_256",
                 seed: int = 0) -> Path:
    """Inpaint one image file; without ``mask_path`` a mask is generated from (``mask_spec``, ``seed``, file stem)."""
    image = load_image(image_path)
    h, w = image.shape[-2:]
    if mask_path is not None:
        mask = load_mask(mask_path, h, w)
    else:
        mask = generated_mask(h, w, Path(image_path).stem, mask_spec, seed)
    save_image(inpaint_tensor(generator, arch, image, mask, fit=fit), out_path)
    if mask_path is None:
        Image.fromarray((mask[0, 0].numpy() * 255).astype(np.uint8), mode="L").save(
            Path(out_path).with_name(Path(out_path).stem + ".mask.png"))
    return Path(out_path)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.name.endswith(".mask.png"))


def inpaint_paths(generator: nn.Module, arch: str, image: str | Path, out: str | Path,
                  mask: str | Path | None = None, fit: Fit = "pad", mask_spec: str = "lama_medium_256",
                  seed: int = 0) -> list[Path]:
    """Inpaint a file or every image of a folder; returns the written paths.

    Folder mode: ``out`` is a folder; masks come from the ``mask`` folder by file stem (``<stem>.png`` or
    ``<stem>.mask.png``), else are generated. File mode: ``out`` is a file, or a folder to write into.
    """
    image, out = Path(image), Path(out)
    if image.is_dir():
        sources = _images_in(image)
        if not sources:
            raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {image}")
        if mask is not None and not Path(mask).is_dir():
            raise ValueError(f"--image is a folder, so --mask must be a folder too, got {mask}")
        written = []
        for source in sources:
            mask_file = _mask_for(Path(mask), source.stem) if mask is not None else None
            written.append(inpaint_file(generator, arch, source, out / f"{source.stem}.png", mask_file, fit,
                                        mask_spec, seed))
            log.info("inpainted %s -> %s", source, written[-1])
        return written
    if not image.is_file():
        raise ValueError(f"image {image} does not exist")
    target = out / f"{image.stem}.png" if out.is_dir() or not out.suffix else out
    return [inpaint_file(generator, arch, image, target, mask, fit, mask_spec, seed)]


def _mask_for(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}.mask.png", f"{stem}.png"):
        if (folder / name).is_file():
            return folder / name
    log.warning("no mask for %s in %s: generating one", stem, folder)
    return None


class InpaintJobConfig(Config):
    """``jobs/inpaint.py``: the model, the inputs and how to fit sizes."""

    model: str = DEFAULT_MODEL
    arch: str | None = None
    image: str
    mask: str | None = None
    out: str
    fit: Literal["pad", "crop"] = "pad"
    mask_generator: str = "lama_medium_256"
    seed: int = 0
    device: str = "cpu"
    tracking_uri: str | None = None
