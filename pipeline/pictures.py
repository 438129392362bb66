"""Pictures for people: images as uint8, the hole drawn on an input, captioned rows and sample grids.

Every picture holefill shows (training sample grids, evaluation and promotion evidence, the demo) draws the
hole the same way, with :func:`show_hole`: filled with :data:`HOLE_FILL` (white), as the RN and LBAM papers
show their inputs.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["HOLE_FILL", "captioned_row", "sample_grid", "show_hole", "to_hwc_uint8"]

HOLE_FILL = 1.0  # white, on images in [0, 1]


def show_hole(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``image`` (…,3,H,W) in [0,1] with the hole of ``mask`` (…,1,H,W, 1 = hole) filled with :data:`HOLE_FILL`."""
    return image * (1 - mask) + HOLE_FILL * mask




def to_hwc_uint8(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """Convert an image to an (H,W,3) ``uint8`` array.

    Accepts numpy HWC/HW ``uint8`` (as is) or float in [0,1], and torch CHW/HW (or B=1 BCHW) float in [0,1]
    or ``uint8``. Gray images become 3-channel.
    """
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.dim() == 4 and t.shape[0] == 1:
            t = t[0]
        if t.dim() == 3:
            t = t.permute(1, 2, 0)
        elif t.dim() != 2:
            raise ValueError(f"image tensor must be CHW or HW, got shape {tuple(image.shape)}")
        array = t.float().numpy() if t.is_floating_point() else t.numpy()
    else:
        array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3):
        raise ValueError(f"image must be HWC with 1 or 3 channels, got shape {array.shape}")
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"image must be uint8 or float in [0,1], got dtype {array.dtype}")
    return np.ascontiguousarray((np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))


def captioned_row(tiles: list[tuple[str, np.ndarray | torch.Tensor]], gap: int = 4, band: int = 22) -> np.ndarray:
    """Pictures side by side, each under its caption: an HWC ``uint8`` array on a white background.

    ``tiles`` are ``(caption, image)`` pairs of one size (anything :func:`to_hwc_uint8` takes). Captions are drawn
    in black in a ``band``-pixel strip above each picture with PIL's built-in font (nothing is downloaded).
    """
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=band - 6)  # scalable where PIL has FreeType
    except (TypeError, ValueError, OSError, ImportError):
        font = ImageFont.load_default()

    if not tiles:
        raise ValueError("captioned_row needs at least one picture")
    pictures = [to_hwc_uint8(image) for _, image in tiles]
    h, w = pictures[0].shape[:2]
    if any(p.shape[:2] != (h, w) for p in pictures):
        raise ValueError(f"captioned_row pictures must share one size, got {[p.shape[:2] for p in pictures]}")
    canvas = np.full((band + h, len(pictures) * w + (len(pictures) - 1) * gap, 3), 255, dtype=np.uint8)
    for index, picture in enumerate(pictures):
        left = index * (w + gap)
        canvas[band:, left: left + w] = picture
    drawn = Image.fromarray(canvas)
    pen = ImageDraw.Draw(drawn)
    for index, (caption, _) in enumerate(tiles):
        pen.text((index * (w + gap) + 3, 2), caption, fill=(0, 0, 0), font=font)
    return np.asarray(drawn)


def sample_grid(image: torch.Tensor, mask: torch.Tensor, output: torch.Tensor, truth: torch.Tensor,
                max_rows: int = 4, gap: int = 2) -> np.ndarray:
    """A picture of a batch: one row per sample, columns ``input | masked | output | truth``.

    ``image`` is what the generator was given, ``masked`` shows it with the hole drawn by :func:`show_hole`,
    ``output`` is the generator's (composited) result and ``truth`` the target. Tensors are (B,C,H,W) in
    [0,1], mask (B,1,H,W) with 1 = hole. Returns an HWC ``uint8`` array with ``gap``-pixel white lines.
    """
    if image.dim() != 4 or output.shape != image.shape or truth.shape != image.shape:
        raise ValueError(
            f"sample_grid needs image, output and truth of one (B,3,H,W) shape, got "
            f"{tuple(image.shape)}, {tuple(output.shape)}, {tuple(truth.shape)}"
        )
    if mask.dim() != 4 or mask.shape[0] != image.shape[0] or mask.shape[-2:] != image.shape[-2:]:
        raise ValueError(f"sample_grid mask must be (B,1,H,W) matching the image, got {tuple(mask.shape)}")
    rows = min(int(max_rows), image.shape[0])
    if rows < 1:
        raise ValueError("sample_grid needs at least one sample")
    with torch.no_grad():
        img = image[:rows].detach().float().cpu()
        masked = show_hole(img, mask[:rows, :1].detach().float().cpu())
        columns = [img, masked, output[:rows].detach().float().cpu(), truth[:rows].detach().float().cpu()]
    h, w = image.shape[-2:]
    canvas = np.full((rows * h + (rows - 1) * gap, 4 * w + 3 * gap, 3), 255, dtype=np.uint8)
    for r in range(rows):
        for c, column in enumerate(columns):
            top, left = r * (h + gap), c * (w + gap)
            canvas[top: top + h, left: left + w] = to_hwc_uint8(column[r])
    return canvas
