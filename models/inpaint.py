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

Large photos take the high-resolution path when a :class:`CropStrategy` is given (IOPaint's "crop" HD
strategy): the generators were trained at 256², so a 12-megapixel photo with a small hole is not pushed
through the network whole (memory grows with the pixel count, and the fill would be made far outside the
trained scale). Instead each hole region gets a window of its bounding box plus ``margin`` pixels of
context; a window whose longer side exceeds ``limit`` is downscaled to it for the network and the
prediction upscaled back; only the hole's pixels are pasted into the full-resolution result. The work is
bounded whatever the mask: at most ``max_windows`` windows (scattered holes are merged into fewer, larger
windows, each still at most ``limit`` pixels a side for the network), and an optional ``deadline``
(:func:`time.monotonic` seconds) is checked before every window (:class:`DeadlineExceeded`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.registry import get_architecture
from models.input_checks import check_mask

__all__ = ["DEFAULT_MAX_WHOLE_PIXELS", "DEFAULT_REQUEST_TIMEOUT_S", "CropStrategy", "DeadlineExceeded", "Fit", "check_deadline", "composite", "hole_windows", "inpaint_tensor"]

Fit = Literal["pad", "crop"]


# What a served request may cost by default (the serving defaults' and the pyfunc model's): whole images above
# 1024 x 1024 go through windows (RN's whole pass on a CPU needs ~1.6 KB a pixel: 1024^2 is +1.75 GB), and a
# request's inference stops at its deadline (checked between generator calls).
DEFAULT_MAX_WHOLE_PIXELS = 1024 * 1024
DEFAULT_REQUEST_TIMEOUT_S = 60.0


class DeadlineExceeded(TimeoutError):
    """The request's inference deadline passed before its work was done (checked between generator calls)."""


def check_deadline(deadline: float | None, what: str = "inpainting") -> None:
    """Raise :class:`DeadlineExceeded` when ``deadline`` (:func:`time.monotonic` seconds) has passed."""
    if deadline is not None and time.monotonic() > deadline:
        raise DeadlineExceeded(f"{what} did not finish within the request's deadline")


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


@dataclass(frozen=True)
class CropStrategy:
    """The high-resolution path: inpaint a window around each hole instead of the whole image.

    ``trigger``: images whose longer side is at most this go through whole (the window would be most of the
    image anyway). ``margin``: context pixels kept on every side of a hole's bounding box. ``limit``: a window
    whose longer side exceeds this is downscaled to it for the network (keep it near the trained scale).
    ``max_windows``: at most this many windows (generator calls) per image; holes scattered wider are merged
    into fewer, larger windows.
    """

    margin: int = 128
    trigger: int = 1024
    limit: int = 512
    max_windows: int = 16

    def __post_init__(self) -> None:
        for name in ("margin", "trigger", "limit", "max_windows"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "margin" else 1):
                raise ValueError(f"CropStrategy.{name} must be a {'non-negative' if name == 'margin' else 'positive'} "
                                 f"integer, got {value!r}")


def _components(grid: list[list[bool]]) -> list[tuple[int, int, int, int]]:
    """Bounding boxes ``(top, left, bottom, right)`` (exclusive ends) of the 8-connected True regions of ``grid``."""
    rows, cols = len(grid), len(grid[0]) if grid else 0
    seen = [[False] * cols for _ in range(rows)]
    boxes = []
    for r0 in range(rows):
        for c0 in range(cols):
            if not grid[r0][c0] or seen[r0][c0]:
                continue
            seen[r0][c0] = True
            stack, box = [(r0, c0)], [r0, c0, r0 + 1, c0 + 1]
            while stack:
                r, c = stack.pop()
                box = [min(box[0], r), min(box[1], c), max(box[2], r + 1), max(box[3], c + 1)]
                for nr in range(max(r - 1, 0), min(r + 2, rows)):
                    for nc in range(max(c - 1, 0), min(c + 2, cols)):
                        if grid[nr][nc] and not seen[nr][nc]:
                            seen[nr][nc] = True
                            stack.append((nr, nc))
            boxes.append(tuple(box))
    return boxes


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _merge_overlapping(boxes: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int, int]]:
    """Union overlapping boxes until none overlap, so every hole pixel lies in exactly one window."""
    boxes = list(boxes)
    merged = True
    while merged:
        merged = False
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                if _overlap(boxes[i], boxes[j]):
                    a, b = boxes[i], boxes.pop(j)
                    boxes[i] = (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))
                    merged = True
                    break
            if merged:
                break
    return sorted(boxes)


def hole_windows(mask: torch.Tensor, margin: int, max_windows: int = 16) -> list[tuple[int, int, int, int]]:
    """Disjoint windows ``(top, left, bottom, right)`` covering every hole of a (H,W) mask with ``margin`` context.

    Holes are found on a coarse grid (cells of at least 8 pixels, at most ~256 cells per side) so that finding
    them costs about the same on a 12-megapixel photo as on a thumbnail; a window is a region's cell-aligned bounding
    box grown by ``margin`` and clipped to the image, and overlapping windows are merged. When the holes make more
    than ``max_windows`` regions the grid is coarsened (cells doubled) until they make at most that many, so
    neither the windows nor the merging of them grows with how the mask scatters its holes.
    """
    h, w = mask.shape[-2:]
    if max_windows < 1:
        raise ValueError(f"max_windows must be a positive integer, got {max_windows!r}")
    hole = (mask.reshape(1, 1, h, w) > 0).float()
    cell = max(8, math.ceil(max(h, w) / 256))
    while True:
        occupied = F.max_pool2d(hole, cell, stride=cell, ceil_mode=True)[0, 0] > 0
        regions = _components(occupied.cpu().tolist())
        if len(regions) <= max_windows or cell >= max(h, w):
            break
        cell *= 2
    boxes = []
    for top, left, bottom, right in regions:
        boxes.append((max(top * cell - margin, 0), max(left * cell - margin, 0),
                      min(bottom * cell + margin, h), min(right * cell + margin, w)))
    return _merge_overlapping(boxes)


def _inpaint_window(generator: nn.Module, arch: str, image: torch.Tensor, mask: torch.Tensor,
                    fit: Fit, limit: int) -> torch.Tensor:
    """Inpaint one (1,3,h,w) window, downscaled so its longer side is at most ``limit``; composited at full size."""
    h, w = image.shape[-2:]
    scale = min(1.0, limit / max(h, w))
    if scale == 1.0:
        return _inpaint_whole(generator, arch, image, mask, fit)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    small_image = F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=True)
    # A small pixel touching any hole pixel is hole: the network must not see hole colours as context.
    small_mask = (F.interpolate(mask, size=size, mode="area") > 0).float()
    pred = _inpaint_whole(generator, arch, small_image, small_mask, fit)
    pred = F.interpolate(pred, size=(h, w), mode="bilinear", align_corners=False).clamp(0, 1)
    return composite(pred, image, mask)


def _inpaint_cropped_windows(generator: nn.Module, arch: str, image: torch.Tensor, mask: torch.Tensor,
                             strategy: CropStrategy, deadline: float | None = None) -> torch.Tensor:
    # Windows are small and of any size: padding to the size multiple is the fit that always applies.
    out = image.float().clone()
    for b in range(image.shape[0]):
        for top, left, bottom, right in hole_windows(mask[b, 0], strategy.margin, strategy.max_windows):
            check_deadline(deadline)
            window = (slice(b, b + 1), slice(None), slice(top, bottom), slice(left, right))
            out[window] = _inpaint_window(generator, arch, image[window].float(), mask[window].float(), "pad",
                                          strategy.limit)
    return out


def _inpaint_whole(generator: nn.Module, arch: str, image: torch.Tensor, mask: torch.Tensor, fit: Fit) -> torch.Tensor:
    multiple = get_architecture(arch).size_multiple
    param = next(generator.parameters(), None)
    device = param.device if param is not None else image.device
    dtype = param.dtype if param is not None else torch.float32
    # One memory layout whatever the caller's (a decoded photo is channels-last, a batch built by torch.cat is
    # not): kernels differ between layouts, so a request's bytes would depend on how it reached the generator.
    x = image.to(device=device, dtype=dtype).contiguous()
    m = mask.to(device=device, dtype=dtype).contiguous()
    if fit == "pad":
        pred = _predict_padded(generator, x, m, multiple)
    elif fit == "crop":
        pred = _predict_cropped(generator, x, m, multiple)
    else:
        raise ValueError(f"fit must be 'pad' or 'crop', got {fit!r}")
    pred = pred.to(device=image.device, dtype=torch.float32).clamp(0, 1)
    return composite(pred, image.float(), mask.float())


@torch.no_grad()
def inpaint_tensor(generator: nn.Module, arch: str, image: torch.Tensor, mask: torch.Tensor,
                   fit: Fit = "pad", strategy: CropStrategy | None = None,
                   deadline: float | None = None) -> torch.Tensor:
    """Inpaint a batch of any size: (B,3,H,W) image in [0,1], (B,1,H,W) mask (1 = hole) -> composited (B,3,H,W).

    The generator fills the hole its own way (as in training) and runs in the dtype and on the device of its
    parameters; the result comes back as float32 on the image's device. With ``strategy`` (a
    :class:`CropStrategy`) images larger than its ``trigger`` are inpainted window by window around the holes
    (``fit`` then applies to smaller images only; windows are padded); without it the whole image goes through.
    ``deadline`` (:func:`time.monotonic` seconds) is checked before each generator call: past it,
    :class:`DeadlineExceeded`.
    """
    _check_any_size_inputs(image, mask)
    if fit not in ("pad", "crop"):
        raise ValueError(f"fit must be 'pad' or 'crop', got {fit!r}")
    if strategy is not None and max(image.shape[-2:]) > strategy.trigger:
        return _inpaint_cropped_windows(generator, arch, image, mask, strategy, deadline)
    check_deadline(deadline)
    return _inpaint_whole(generator, arch, image, mask, fit)
