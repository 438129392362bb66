"""Encoded images in, encoded images out: what an HTTP client sends a generator and gets back.

A request carries an image and a mask (an 8-bit gray image of the same size, 255 = hole; binarised at 128),
each PNG, JPEG or WebP (:data:`ALLOWED_FORMATS`, the one allow-list of every place in holefill that decodes a
user's image or mask: serving, the pyfunc model, ``jobs/inpaint.py``, the shard job, mask import). Every read is
bounded before it starts: the encoded bytes (:func:`max_encoded_bytes`), the pixel count read from the header
(:func:`open_checked`), and only then the decode. Everything a client can get wrong is a one-line
``ValueError`` (not an allowed image, too many bytes or pixels, mask size ≠ image size, empty mask, a
corrupt stream): no decoder error escapes as anything else.

Decoded requests are uint8 (:func:`decode_request_uint8`: 4 bytes a pixel for image + mask, what a server holds
while a request waits) and become float only for the generator (:func:`to_float`); :func:`decode_request`
does both at once. :func:`encode_png` turns a result back into PNG bytes.

This file travels with the registered MLflow model (``models/`` is its bundled code), so it needs nothing but
numpy, Pillow and torch.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, ImageOps

__all__ = ["ALLOWED_FORMATS", "DEFAULT_MAX_PIXELS", "check_encoded_size", "decode_image", "decode_image_uint8",
           "decode_mask", "decode_mask_uint8", "decode_opened", "decode_request", "decode_request_uint8", "encode_png",
           "max_encoded_bytes", "open_checked", "oriented_size", "read_headers", "to_float"]

# The formats a user's image or mask may be in: the common photo and mask formats, whose decoders are the
# hardened, fuzzed ones. Everything else Pillow knows (EPS runs Ghostscript, DDS, SGI, TGA, ICNS, JPEG 2000, ...)
# is refused before any of its code runs.
ALLOWED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP")
FORMAT_NAMES = "PNG, JPEG or WebP"

# 24 megapixels (6000 x 4000, a 24-MP camera; phones save 12 MP): held as uint8 while it waits that is 96 MB
# (image + mask); the crop strategy's full-size float copies ~0.7 GB. 36 MP (the earlier default) cost 1.5x that.
DEFAULT_MAX_PIXELS = 24_000_000

# An encoded field never needs more than 8-bit RGBA stored raw (4 bytes a pixel) plus its container's overhead.
_ENCODED_BYTES_PER_PIXEL = 4
_ENCODED_OVERHEAD = 1 << 20


def max_encoded_bytes(max_pixels: int) -> int:
    """The largest encoded image or mask (bytes) a request under ``max_pixels`` needs: 8-bit RGBA stored raw + 1 MiB."""
    return _ENCODED_BYTES_PER_PIXEL * int(max_pixels) + _ENCODED_OVERHEAD


def check_encoded_size(data: object, name: str, max_pixels: int) -> None:
    """Refuse a field over :func:`max_encoded_bytes` (or not bytes at all) before anything reads it."""
    if not isinstance(data, (bytes, bytearray, memoryview)) or not len(data):
        raise ValueError(f"{name} must be non-empty encoded image bytes ({FORMAT_NAMES}), got {type(data).__name__}")
    limit = max_encoded_bytes(max_pixels)
    if len(data) > limit:
        raise ValueError(f"{name} is {len(data)} bytes, over the limit of {limit} for {max_pixels} pixels")


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def open_checked(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """Open encoded bytes lazily (header only) as one of :data:`ALLOWED_FORMATS` and check the pixel count.

    Nothing is decoded yet; ``ValueError`` (one line) for a field too large, a format outside the allow-list, an
    unreadable header, zero size or more than ``max_pixels`` pixels.
    """
    check_encoded_size(data, name, max_pixels)
    try:
        image = Image.open(io.BytesIO(bytes(data)), formats=ALLOWED_FORMATS)
        width, height = image.size
    except Exception as exc:  # any decoder failure on client bytes is the client's: one line, never a 500
        reason = "no such header" if isinstance(exc, Image.UnidentifiedImageError) else _reason(exc)
        raise ValueError(f"{name} is not a readable image ({FORMAT_NAMES} only): {reason}") from None
    if width * height > max_pixels:
        raise ValueError(f"{name} is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}")
    if width <= 0 or height <= 0:
        raise ValueError(f"{name} has zero size")
    return image


def oriented_size(image: Image.Image) -> tuple[int, int]:
    """``(width, height)`` after the EXIF orientation :func:`decode_image` applies, read from the header only."""
    width, height = image.size
    try:
        orientation = image.getexif().get(0x0112)
    except Exception:  # an unreadable EXIF block: decoding ignores it too (exif_transpose fails below otherwise)
        orientation = None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _load(image: Image.Image, name: str, mode: str) -> np.ndarray:
    try:
        return np.asarray(ImageOps.exif_transpose(image).convert(mode), dtype=np.uint8)
    except MemoryError:
        raise
    except Exception as exc:  # truncated, corrupt, unsupported sub-format: the client's, in one line
        raise ValueError(f"{name} could not be decoded: {_reason(exc)}") from None


def decode_image_uint8(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "image") -> torch.Tensor:
    """Encoded bytes -> (1,3,H,W) uint8 tensor; EXIF orientation applied, any mode converted to RGB."""
    array = _load(open_checked(data, name, max_pixels), name, "RGB")
    return torch.from_numpy(array.copy()).permute(2, 0, 1).unsqueeze(0)


def decode_mask_uint8(data: bytes, height: int, width: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                      name: str = "mask", opened: Image.Image | None = None) -> torch.Tensor:
    """Encoded gray mask (255 = hole) -> (1,1,H,W) uint8, 1 = hole; it must be ``height`` x ``width`` with a hole.

    The size is checked from the header, before the mask is decoded."""
    opened = opened if opened is not None else open_checked(data, name, max_pixels)
    mask_w, mask_h = oriented_size(opened)
    if (mask_h, mask_w) != (height, width):
        raise ValueError(f"{name} is {mask_w}x{mask_h}, image is {width}x{height}: sizes must match")
    array = _load(opened, name, "L")
    if array.shape != (height, width):
        raise ValueError(f"{name} is {array.shape[1]}x{array.shape[0]}, image is {width}x{height}: sizes must match")
    hole = array > 127
    if not hole.any():
        raise ValueError(f"{name} has no hole (no pixel >= 128): nothing to inpaint")
    return torch.from_numpy(hole.view(np.uint8).copy())[None, None]


def read_headers(image: bytes, mask: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image.Image, Image.Image, int, int]:
    """Check one (image, mask) request from the headers alone: ``(opened image, opened mask, width, height)``.

    Formats, bytes, pixels and that the sizes match are checked before either is decoded (what a server needs to
    know to account for a request's memory before it spends it)."""
    opened_image = open_checked(image, "image", max_pixels)
    opened_mask = open_checked(mask, "mask", max_pixels)
    width, height = oriented_size(opened_image)
    mask_w, mask_h = oriented_size(opened_mask)
    if (mask_w, mask_h) != (width, height):
        raise ValueError(f"mask is {mask_w}x{mask_h}, image is {width}x{height}: sizes must match")
    return opened_image, opened_mask, width, height


def decode_opened(opened_image: Image.Image, opened_mask: Image.Image, width: int,
                  height: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode what :func:`read_headers` opened: ``((1,3,H,W) uint8 image, (1,1,H,W) uint8 mask, 1 = hole)``."""
    array = _load(opened_image, "image", "RGB")
    if array.shape[:2] != (height, width):
        raise ValueError(f"image decoded to {array.shape[1]}x{array.shape[0]}, its header says {width}x{height}")
    decoded = torch.from_numpy(array.copy()).permute(2, 0, 1).unsqueeze(0)
    return decoded, decode_mask_uint8(b"", height, width, opened=opened_mask)


def decode_request_uint8(image: bytes, mask: bytes,
                         max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[torch.Tensor, torch.Tensor]:
    """Check and decode one (image, mask) request: ``((1,3,H,W) uint8 image, (1,1,H,W) uint8 mask, 1 = hole)``.

    Both headers are read (format, bytes, pixels, sizes) before either is decoded."""
    return decode_opened(*read_headers(image, mask, max_pixels))


def to_float(image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 image and 0|1 mask -> float image in [0,1] and float mask (1 = hole), on their device (the one way)."""
    return image.float().div_(255.0), mask.float()


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "image") -> torch.Tensor:
    """Encoded bytes -> (1,3,H,W) float tensor in [0,1]; EXIF orientation applied, any mode converted to RGB."""
    return decode_image_uint8(data, max_pixels, name).float().div_(255.0)


def decode_mask(data: bytes, height: int, width: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                name: str = "mask") -> torch.Tensor:
    """Encoded gray mask (255 = hole) -> (1,1,H,W) float, 1 = hole; it must be ``height`` x ``width`` with a hole."""
    return decode_mask_uint8(data, height, width, max_pixels, name).float()


def decode_request(image: bytes, mask: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode and check one (image, mask) request: ``((1,3,H,W) float image, (1,1,H,W) float mask)``."""
    return to_float(*decode_request_uint8(image, mask, max_pixels))


def encode_png(image: torch.Tensor) -> bytes:
    """A (1,3,H,W) or (3,H,W) float tensor in [0,1] -> PNG bytes (rounded to 8 bits, so unchanged pixels stay equal)."""
    chw = image[0] if image.dim() == 4 else image
    array = (chw.detach().float().cpu().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
