"""Training-sample geometry: how a stored image (and its mask) becomes a square training crop.

Three options (``data.train_geometry``), each applied by :func:`train_sample` in the loader workers, and the eval
loader's :func:`center_crop`:

``crop`` (holefill's default)
    a random ``size`` square of the stored image (short side ``store_size``), the same crop and horizontal flip
    (p = 0.5) on the mask.
``rn`` (official RN, ``dataset.py``)
    the centre square of the image, resized to ``size`` with bilinear interpolation without antialiasing (as
    ``cv2.resize``'s default INTER_LINEAR), then a flip (p = 0.5) of image and mask together. A mask from the
    image's shard gets the same centre square with nearest resizing; a pool mask (drawn per load, as the official
    loader draws a random mask file) its own centre square, bilinear resize and ``> 0``: RN's own threshold after
    interpolation, which dilates the holes by up to one pixel.
``lbam`` (official LBAM, ``data/basicFunction.py``)
    the whole image resized to ``load_size``² (350, **bicubic**, aspect ratio not kept), a random ``size`` crop and a
    flip (p = 0.5). A shard mask follows with nearest resizing and the same crop and flip; a pool mask is resized to
    ``size``² with nearest and neither cropped nor flipped, as the official mask transform does.

With ``crop`` a pool mask is centre-squared and resized to ``size`` (nearest); the image is cropped and flipped.
Inputs and outputs are uint8 arrays: image (H, W, 3), mask (H, W) with 255 = hole.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = [
    "GEOMETRIES",
    "Geometry",
    "LBAM_LOAD_SIZE",
    "center_crop",
    "lbam_geometry",
    "random_crop_flip",
    "rn_geometry",
    "train_sample",
]

Geometry = Literal["crop", "rn", "lbam"]
GEOMETRIES: tuple[str, ...] = ("crop", "rn", "lbam")
LBAM_LOAD_SIZE = 350  # official --loadSize


def _centre_square(array: np.ndarray) -> np.ndarray:
    h, w = array.shape[:2]
    side = min(h, w)
    y0, x0 = (h - side) // 2, (w - side) // 2
    return array[y0 : y0 + side, x0 : x0 + side]


def _bilinear(array: np.ndarray, size: int) -> np.ndarray:
    """Resize to ``size``² with half-pixel-centred bilinear interpolation and no antialiasing (cv2 INTER_LINEAR)."""
    if array.shape[0] == size and array.shape[1] == size:
        return array
    planar = torch.from_numpy(np.ascontiguousarray(array)).float()
    planar = planar.unsqueeze(-1) if planar.dim() == 2 else planar
    resized = F.interpolate(planar.permute(2, 0, 1)[None], size=(size, size), mode="bilinear", align_corners=False)
    out = resized[0].permute(1, 2, 0).round_().clamp_(0, 255).to(torch.uint8).numpy()
    return out[..., 0] if array.ndim == 2 else out


def _pil_resize(array: np.ndarray, size: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    """PIL resize to (width, height) ``size``: PIL's bicubic is the one torchvision's ``Resize`` used on PIL images."""
    if array.shape[1] == size[0] and array.shape[0] == size[1]:
        return array
    return np.asarray(Image.fromarray(array).resize(size, resample))


def _cover(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Up-scale image (bicubic) and mask (nearest) together so the short side is at least ``size``."""
    h, w = mask.shape
    if min(h, w) >= size:
        return image, mask
    scale = size / min(h, w)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    image = np.asarray(Image.fromarray(image).resize(new, Image.Resampling.BICUBIC))
    mask = np.asarray(Image.fromarray(mask).resize(new, Image.Resampling.NEAREST))
    return image, mask


def random_crop_flip(
    image: np.ndarray, mask: np.ndarray, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """The ``crop`` geometry: the same random ``size`` square crop and the same horizontal flip (p = 0.5) on image
    and mask (both up-scaled first when the short side is below ``size``)."""
    image, mask = _cover(image, mask, size)
    h, w = mask.shape
    y0 = int(rng.integers(0, h - size + 1))
    x0 = int(rng.integers(0, w - size + 1))
    image = image[y0 : y0 + size, x0 : x0 + size]
    mask = mask[y0 : y0 + size, x0 : x0 + size]
    if rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    return image, mask


def center_crop(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The centre ``size`` square of image and mask (up-scaled first when smaller): the eval loader's geometry."""
    image, mask = _cover(image, mask, size)
    h, w = mask.shape
    y0, x0 = (h - size) // 2, (w - size) // 2
    return image[y0 : y0 + size, x0 : x0 + size], mask[y0 : y0 + size, x0 : x0 + size]


def _flip(rng: np.random.Generator, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    if rng.random() < 0.5:
        return tuple(a[:, ::-1] for a in arrays)
    return arrays


def rn_geometry(
    image: np.ndarray, mask: np.ndarray, size: int, rng: np.random.Generator, pooled: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Official RN: centre square -> bilinear ``size``² -> joint flip (see the module docstring)."""
    image = _bilinear(_centre_square(image), size)
    if pooled:
        mask = np.where(_bilinear(_centre_square(mask), size) > 0, 255, 0).astype(np.uint8)
    else:
        mask = _pil_resize(_centre_square(mask), (size, size), Image.Resampling.NEAREST)
    return _flip(rng, image, mask)  # type: ignore[return-value]


def lbam_geometry(
    image: np.ndarray, mask: np.ndarray, size: int, rng: np.random.Generator, pooled: bool = False,
    load_size: int = LBAM_LOAD_SIZE,
) -> tuple[np.ndarray, np.ndarray]:
    """Official LBAM: bicubic ``load_size``² (aspect ratio not kept) -> random ``size`` crop -> flip."""
    if load_size < size:
        raise ValueError(f"lbam load_size {load_size} must be >= the crop size {size}")
    image = _pil_resize(image, (load_size, load_size), Image.Resampling.BICUBIC)
    y0, x0 = int(rng.integers(0, load_size - size + 1)), int(rng.integers(0, load_size - size + 1))
    image = image[y0 : y0 + size, x0 : x0 + size]
    if pooled:
        # The official mask transform: Resize(256, NEAREST) of the whole mask file, no crop, no flip.
        mask = _pil_resize(mask, (size, size), Image.Resampling.NEAREST)
        (image,) = _flip(rng, image)
        return image, mask
    mask = _pil_resize(mask, (load_size, load_size), Image.Resampling.NEAREST)[y0 : y0 + size, x0 : x0 + size]
    return _flip(rng, image, mask)  # type: ignore[return-value]


def train_sample(
    image: np.ndarray, mask: np.ndarray, size: int, rng: np.random.Generator, geometry: Geometry = "crop",
    pooled: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """One training crop (image, mask) of ``size``² by ``geometry``; ``pooled``: ``mask`` is a pool mask drawn for
    this load (any size), not the image's own shard mask."""
    if geometry == "rn":
        return rn_geometry(image, mask, size, rng, pooled)
    if geometry == "lbam":
        return lbam_geometry(image, mask, size, rng, pooled)
    if geometry != "crop":
        raise ValueError(f"train geometry must be one of {', '.join(GEOMETRIES)}, got {geometry!r}")
    if pooled:
        mask = _pil_resize(_centre_square(mask), (size, size), Image.Resampling.NEAREST)
        placeholder = np.zeros(image.shape[:2], dtype=np.uint8)
        image, _ = random_crop_flip(image, placeholder, size, rng)
        return image, mask
    return random_crop_flip(image, mask, size, rng)
