"""Encoded images in, encoded images out: what an HTTP client sends a generator and gets back.

A request carries an image (PNG, JPEG, WebP, … as bytes) and a mask (an 8-bit gray image of the same size,
255 = hole; binarised at 128). :func:`decode_request` checks everything a client can get wrong, each with a
one-line ``ValueError`` (not an image, mask size ≠ image size, empty mask, too many pixels) and returns
tensors in the project's conventions; :func:`encode_png` turns a result back into PNG bytes.

This file travels with the registered MLflow model (``models/`` is its bundled code), so it needs nothing but
numpy, Pillow and torch. (``pipeline.data.imageops`` does the same decoding for the shard job with more
options; the model cannot import it.)
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, ImageOps

__all__ = ["DEFAULT_MAX_PIXELS", "decode_image", "decode_mask", "decode_request", "encode_png"]

# 36 megapixels (6000 x 6000): every phone and most DSLR photos, and a decoded float copy under half a GB.
DEFAULT_MAX_PIXELS = 36_000_000


def _open(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """Open encoded bytes lazily and check the pixel count from the header, before anything is decoded."""
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise ValueError(f"{name} must be non-empty encoded image bytes (PNG or JPEG), got {type(data).__name__}")
    try:
        image = Image.open(io.BytesIO(bytes(data)))
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"{name} is not a readable image: {str(exc).splitlines()[0] if str(exc) else exc}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ValueError(f"{name} is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}")
    if width == 0 or height == 0:
        raise ValueError(f"{name} has zero size")
    return image


def _load(image: Image.Image, name: str, mode: str) -> np.ndarray:
    try:
        return np.asarray(ImageOps.exif_transpose(image).convert(mode), dtype=np.uint8)
    except (OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"{name} could not be decoded: {str(exc).splitlines()[0] if str(exc) else exc}") from None


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "image") -> torch.Tensor:
    """Encoded bytes -> (1,3,H,W) float tensor in [0,1]; EXIF orientation applied, any mode converted to RGB."""
    array = _load(_open(data, name, max_pixels), name, "RGB")
    return torch.from_numpy(array.copy()).permute(2, 0, 1).unsqueeze(0).float().div_(255.0)


def decode_mask(data: bytes, height: int, width: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                name: str = "mask") -> torch.Tensor:
    """Encoded gray mask (255 = hole) -> (1,1,H,W) float, 1 = hole; it must be ``height`` x ``width`` with a hole."""
    array = _load(_open(data, name, max_pixels), name, "L")
    if array.shape != (height, width):
        raise ValueError(f"{name} is {array.shape[1]}x{array.shape[0]}, image is {width}x{height}: sizes must match")
    hole = array > 127
    if not hole.any():
        raise ValueError(f"{name} has no hole (no pixel >= 128): nothing to inpaint")
    return torch.from_numpy(hole).float()[None, None]


def decode_request(image: bytes, mask: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode and check one (image, mask) request: ``((1,3,H,W) image, (1,1,H,W) mask)``."""
    decoded = decode_image(image, max_pixels)
    return decoded, decode_mask(mask, decoded.shape[-2], decoded.shape[-1], max_pixels)


def encode_png(image: torch.Tensor) -> bytes:
    """A (1,3,H,W) or (3,H,W) float tensor in [0,1] -> PNG bytes (rounded to 8 bits, so unchanged pixels stay equal)."""
    chw = image[0] if image.dim() == 4 else image
    array = (chw.detach().float().cpu().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
