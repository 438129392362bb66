"""Inpainting files and model references with a trained generator.

:func:`load_model_ref` turns any model reference (an MLflow URI, a training checkpoint, a weights file, an official
release) into a generator, through its :class:`~models.record.GeneratorRecord`;
:func:`inpaint_paths` inpaints image files (any size, through :func:`models.inpaint.inpaint_tensor`) with
masks from files or generated ones, and writes the composited results. Large photos go through windows
around their holes (``hires``, see :class:`pipeline.lifecycle.packaging.HiresSettings`) unless told otherwise.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any, Mapping


import numpy as np
import torch
import torch.nn as nn

from PIL import Image, ImageOps

from models.codec import open_checked
from models.inpaint import CropStrategy, Fit, inpaint_tensor
from pipeline.config import Config
from pipeline.data.imageops import DEFAULT_MAX_PIXELS, decode_mask_png, to_rgb
from pipeline.data.masks.generators import make_mask
from pipeline.errors import one_line
from pipeline.lifecycle.packaging import HiresSettings, load_generator_record
from pipeline.paths import LocalPath, OutputPathStr, PathStr
from pipeline.tracking import to_hwc_uint8

__all__ = [
    "IMAGE_SUFFIXES",
    "InpaintJobConfig",
    "inpaint_file",
    "inpaint_paths",
    "load_image",
    "load_mask",
    "load_model_ref",
    "save_image",
]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")  # models.codec.ALLOWED_FORMATS
DEFAULT_MODEL = "models:/lbam@champion"


# ----------------------------------------------------------------------------------------------------
# Model references


def load_model_ref(ref: str, tracking_uri: str | None = None, arch: str | None = None,
                   kwargs: Mapping[str, Any] | None = None) -> tuple[nn.Module, str]:
    """The generator of any model reference: ``(module in eval mode, arch)``.

    The reference is read as a :class:`~models.record.GeneratorRecord` by
    :func:`pipeline.lifecycle.packaging.load_generator_record` (a registered version or MLflow model folder, a
    training checkpoint folder of any network, a weights file of any form, an official release) and built by
    :meth:`~models.record.GeneratorRecord.build`. ``arch`` / ``kwargs`` name the network of a plain weights file
    (a non-default one's keywords are read off its shapes where they can be).
    """
    record = load_generator_record(ref, tracking_uri, arch=arch, kwargs=kwargs)
    return record.build(), record.arch


# ----------------------------------------------------------------------------------------------------
# Files


def _read_checked(path: str | Path, name: str) -> Image.Image:
    """A user's file opened through the serving codec's checks: PNG, JPEG or WebP only, pixels bounded, header only."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {name}: {one_line(exc)}") from None
    return open_checked(data, name, DEFAULT_MAX_PIXELS)


def load_image(path: str | Path) -> torch.Tensor:
    """Read an image file (PNG, JPEG or WebP; EXIF orientation applied, any mode -> RGB) as a (1,3,H,W) float
    tensor in [0,1]."""
    im = _read_checked(path, f"image {path}")
    try:
        array = np.asarray(to_rgb(ImageOps.exif_transpose(im)), dtype=np.uint8).copy()
    except Exception as exc:  # a corrupt stream is the input's fault: one line
        raise ValueError(f"cannot read image {path}: {one_line(exc)}") from None
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).float().div_(255.0)


def load_mask(path: str | Path, height: int, width: int) -> torch.Tensor:
    """Read a mask PNG (255 = hole, binarised at 128) as (1,1,H,W) float; it must match the image size."""
    _read_checked(path, f"mask {path}")
    array = decode_mask_png(Path(path).read_bytes())
    if array.shape != (height, width):
        raise ValueError(f"mask {path} is {array.shape[1]}x{array.shape[0]}, image is {width}x{height}: sizes must match")
    return torch.from_numpy(array > 127).float()[None, None]


def generated_mask(height: int, width: int, key: str, spec: str = "lama_medium_256", seed: int = 0) -> torch.Tensor:
    """A deterministic mask for ``key`` from a registered generator, as (1,1,H,W) float (1 = hole)."""
    return torch.from_numpy(make_mask(spec, seed, key, height, width) > 127).float()[None, None]


def save_image(image: torch.Tensor, path: str | Path) -> None:
    """Write a (1,3,H,W) or (3,H,W) float tensor in [0,1] as an image file (format from the suffix)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_hwc_uint8(image)).save(path)


def inpaint_file(generator: nn.Module, arch: str, image_path: str | Path, out_path: str | Path,
                 mask_path: str | Path | None = None, fit: Fit = "pad", mask_spec: str = "lama_medium_256",
                 seed: int = 0, strategy: CropStrategy | None = None) -> Path:
    """Inpaint one image file; without ``mask_path`` a mask is generated from (``mask_spec``, ``seed``, file stem).

    ``strategy`` (a :class:`models.inpaint.CropStrategy`) inpaints large images window by window around the holes.
    """
    image = load_image(image_path)
    h, w = image.shape[-2:]
    if mask_path is not None:
        mask = load_mask(mask_path, h, w)
    else:
        mask = generated_mask(h, w, Path(image_path).stem, mask_spec, seed)
    save_image(inpaint_tensor(generator, arch, image, mask, fit=fit, strategy=strategy), out_path)
    if mask_path is None:
        Image.fromarray((mask[0, 0].numpy() * 255).astype(np.uint8), mode="L").save(
            Path(out_path).with_name(Path(out_path).stem + ".mask.png"))
    return Path(out_path)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.name.endswith(".mask.png"))


def inpaint_paths(generator: nn.Module, arch: str, image: str | Path, out: str | Path,
                  mask: str | Path | None = None, fit: Fit = "pad", mask_spec: str = "lama_medium_256",
                  seed: int = 0, strategy: CropStrategy | None = None) -> list[Path]:
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
                                        mask_spec, seed, strategy))
            log.info("inpainted %s -> %s", source, written[-1])
        return written
    if not image.is_file():
        raise ValueError(f"image {image} does not exist")
    target = out / f"{image.stem}.png" if out.is_dir() or not out.suffix else out
    return [inpaint_file(generator, arch, image, target, mask, fit, mask_spec, seed, strategy)]


def _mask_for(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}.mask.png", f"{stem}.png"):
        if (folder / name).is_file():
            return folder / name
    log.warning("no mask for %s in %s: generating one", stem, folder)
    return None


class InpaintJobConfig(Config):
    """``jobs/inpaint.py``: the model, the inputs and how to fit sizes."""

    model: PathStr = DEFAULT_MODEL
    arch: str | None = None  # a plain weights file's architecture
    generator_kwargs: dict[str, Any] | None = None  # a plain weights file's generator keywords (when its shapes don't say)
    image: PathStr
    mask: Annotated[str | None, LocalPath()] = None
    out: OutputPathStr
    fit: Fit = "pad"
    hires: HiresSettings = HiresSettings()  # large photos: windows around the holes (strategy: crop) or whole
    mask_generator: str = "lama_medium_256"
    seed: int = 0
    device: str = "cpu"
    tracking_uri: str | None = None
