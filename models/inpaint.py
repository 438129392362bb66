"""Inpainting with a generator at any image size: fit to the architecture's size rule, composite the result.

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

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.registry import get_architecture
from models.validation import check_mask

__all__ = ["Fit", "composite", "inpaint_tensor"]

Fit = Literal["pad", "crop"]


def composite(pred: torch.Tensor, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Generator prediction inside the hole, the input outside: ``pred * mask + image * (1 - mask)``."""
    return pred * mask + image * (1 - mask)


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
    multiple = get_architecture(arch).size_multiple
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
