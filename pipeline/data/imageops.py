"""Image operations of the shard job: validate, decode cheaply, orient, convert, resize, crop, encode.

``prepare_image`` turns the bytes of one source file into the RGB JPEG a shard stores. It is the hot
loop of sharding, so it avoids work wherever it can:

* the header is checked (size, format, decompression bombs) before any pixel is decoded;
* JPEGs are decoded with ``draft()`` at the smallest libjpeg scale (1/2, 1/4, 1/8) that still covers
  the target size, which is far cheaper than a full decode followed by a resize;
* the EXIF rotation is applied after the resize, on the small image;
* an RGB JPEG that already has the target size and needs no rotation keeps its original bytes
  (after a full decode that proves it is not truncated), so no generation loss is added.

Encoding choice: JPEG quality 95 with **4:4:4** chroma (no subsampling). Inpainting losses and metrics
look at sharp colour edges around holes; 4:2:0 halves chroma resolution and blurs exactly those, for
about 20-30 % more bytes at 256 px. Both are configurable.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from models.codec import ALLOWED_FORMATS
from pipeline.errors import one_line

__all__ = [
    "ALLOWED_FORMATS",
    "BadImageError",
    "PreparedImage",
    "decode_mask_png",
    "encode_jpeg",
    "encode_mask_png",
    "jpeg_draft_scale",
    "prepare_image",
    "to_rgb",
]

# ALLOWED_FORMATS (PNG, JPEG, WebP) is holefill's one allow-list of formats it decodes from outside, shared with
# serving (models/codec.py, which models/ code can import). Anything else (EPS, which runs Ghostscript; TIFF, BMP,
# GIF, PSD, ICO, ...) is rejected at identification time, keeping Pillow's other parsers off untrusted input.

# Pillow's own default limit (about 1 GB of RGB for 24-bit images).
DEFAULT_MAX_PIXELS = 89_478_485

# EXIF orientation tag value -> the transpose that makes the image upright.
_EXIF_ORIENTATION_TAG = 0x0112
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class BadImageError(ValueError):
    """An input that cannot become a training image; ``reason`` is a short, stable label for manifests."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


@dataclass(frozen=True)
class PreparedImage:
    """The stored form of one image: RGB JPEG bytes and what was done to get them."""

    jpeg: bytes
    width: int
    height: int
    reencoded: bool
    source_format: str
    source_size: tuple[int, int]


def _orientation(im: Image.Image) -> int:
    """EXIF orientation (1 = upright) read from the header; unreadable EXIF counts as upright."""
    try:
        value = im.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001 - broken EXIF must not reject an otherwise good image
        return 1
    return value if value in _ORIENTATION_TRANSPOSE else 1


def _scaled_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """Size with the shorter side equal to ``short_side`` and the aspect ratio kept (rounded)."""
    if width <= height:
        return short_side, max(1, round(height * short_side / width))
    return max(1, round(width * short_side / height)), short_side


def jpeg_draft_scale(source_size: tuple[int, int], target_size: tuple[int, int]) -> int:
    """The largest libjpeg DCT scale-down (1, 2, 4 or 8) whose output still covers ``target_size``.

    Decoding at 1/s costs the entropy decode plus a smaller inverse DCT and far less colour conversion
    and memory traffic; the result is then at least the target on both sides, so the resize that
    follows only ever shrinks (or is skipped when the sizes already match).
    """
    src_w, src_h = source_size
    target_w, target_h = target_size
    for scale in (8, 4, 2):
        # libjpeg's scaled output is ceil(side / scale): 683 px at 1/2 gives 342.
        if -(-src_w // scale) >= target_w and -(-src_h // scale) >= target_h:
            return scale
    return 1


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is composited on white.

    16- and 32-bit integer images are scaled into 0..255 rather than clipped (Pillow's own
    ``convert`` clips ``I;16`` at 255, which turns most 16-bit photos white).
    """
    mode = im.mode
    if mode == "RGB":
        return im
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
        if mode == "RGB":
            return im
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode in ("L", "RGB") and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        array = np.asarray(im).astype(np.float64)
        top = float(array.max()) if array.size else 0.0
        # I;16 is 16-bit by definition; an "I" image is scaled by its real range (8 or 16 bit, or more).
        scale = 65535.0 if mode.startswith("I;16") or top > 255 else 255.0
        if top > 65535:
            scale = top
        gray = np.clip(np.rint(array * (255.0 / scale)), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if mode == "F":
        array = np.asarray(im, dtype=np.float64)
        top = float(np.nanmax(array)) if array.size else 0.0
        scale = 255.0 if top <= 1.0 else 1.0  # float images in [0, 1] or already in 0..255
        gray = np.clip(np.nan_to_num(np.rint(array * scale)), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    try:
        return im.convert("RGB")  # L, 1, CMYK, YCbCr, ...
    except ValueError as exc:
        raise BadImageError("unsupported mode", mode) from exc


def encode_jpeg(im: Image.Image, *, quality: int = 95, subsampling: str = "4:4:4") -> bytes:
    """Encode an RGB image as baseline JPEG (no ``optimize``: it doubles encode time for ~3 % bytes)."""
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality, subsampling=subsampling)
    return buf.getvalue()


def prepare_image(
    data: bytes,
    *,
    store_size: int | None = 256,
    center_crop: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_short_side: int = 32,
    quality: int = 95,
    subsampling: str = "4:4:4",
) -> PreparedImage:
    """Turn the bytes of one image file into the RGB JPEG a shard stores.

    The shorter side is resized to ``store_size`` (``None`` keeps the size), then with ``center_crop``
    the centre ``store_size`` square is cut. Raises :class:`BadImageError` (a ``ValueError``) for
    empty input, non-images, formats outside :data:`ALLOWED_FORMATS`, images over ``max_pixels``
    (checked from the header before decoding), images with a side of 0 or a short side below
    ``min_short_side``, and truncated or corrupt files.
    """
    if store_size is not None and store_size <= 0:
        raise ValueError(f"store_size must be a positive int or None, got {store_size}")
    if center_crop and store_size is None:
        raise ValueError("center_crop needs a store_size")
    if not data:
        raise BadImageError("empty file")

    try:
        im = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise BadImageError("decompression bomb", str(exc).split(".")[0]) from None
    except UnidentifiedImageError:
        raise BadImageError("not an image", f"not {', '.join(ALLOWED_FORMATS)}") from None
    except (OSError, SyntaxError, ValueError, struct.error, EOFError) as exc:
        raise BadImageError("corrupt header", str(exc)) from None

    source_format = im.format or "unknown"
    src_w, src_h = im.size
    if src_w <= 0 or src_h <= 0:
        raise BadImageError("zero size", f"{src_w}x{src_h}")
    if src_w * src_h > max_pixels:
        raise BadImageError("decompression bomb", f"{src_w}x{src_h} > {max_pixels} pixels")
    if min(src_w, src_h) < min_short_side:
        raise BadImageError("too small", f"{src_w}x{src_h}, short side < {min_short_side}")

    orientation = _orientation(im)
    target = None if store_size is None else _scaled_size(src_w, src_h, store_size)
    keep_bytes = (
        source_format == "JPEG"
        and im.mode == "RGB"
        and orientation == 1
        and (target is None or target == (src_w, src_h))
        and (not center_crop or src_w == src_h)
    )

    if keep_bytes:
        # Decode at 1/8 scale: the whole entropy-coded stream is still read, so truncation is still
        # detected, at a fraction of the cost of a full-size decode.
        im.draft(None, (max(1, src_w // 8), max(1, src_h // 8)))
        _load(im)
        return PreparedImage(data, src_w, src_h, False, source_format, (src_w, src_h))

    if source_format == "JPEG" and target is not None:
        scale = jpeg_draft_scale((src_w, src_h), target)
        if scale > 1:
            # Pillow derives its scale as ``min(src // requested)`` per side, so asking for the target
            # itself (e.g. 342x256 from 683x512, where 683 // 342 == 1) would decode at full size.
            # Requesting ``src // scale`` makes it pick exactly ``scale``.
            im.draft(None, (src_w // scale, src_h // scale))
    _load(im)
    im = to_rgb(im)
    if target is not None and im.size != target:
        # reducing_gap: a cheap box reduction first, then bicubic over the last >= 3x; indistinguishable
        # from a plain bicubic at this gap and several times faster on big non-JPEG inputs.
        im = im.resize(target, Image.Resampling.BICUBIC, reducing_gap=3.0)
    if center_crop and store_size is not None:
        w, h = im.size
        left, top = (w - store_size) // 2, (h - store_size) // 2
        im = im.crop((left, top, left + store_size, top + store_size))
    if orientation != 1:
        im = im.transpose(_ORIENTATION_TRANSPOSE[orientation])
    jpeg = encode_jpeg(im, quality=quality, subsampling=subsampling)
    return PreparedImage(jpeg, im.width, im.height, True, source_format, (src_w, src_h))


def _load(im: Image.Image) -> None:
    """Decode every pixel; any truncation or corruption becomes a :class:`BadImageError`.

    Pillow's ``LOAD_TRUNCATED_IMAGES`` is never set: a truncated JPEG must be rejected, not padded grey.
    """
    try:
        im.load()
    except Image.DecompressionBombError as exc:
        raise BadImageError("decompression bomb", str(exc).split(".")[0]) from None
    except (OSError, SyntaxError, ValueError, struct.error, EOFError, zlib.error) as exc:
        reason = "truncated" if "truncated" in str(exc).lower() else "corrupt"
        raise BadImageError(reason, str(exc)) from None


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# IHDR fields after width and height: 8-bit depth, grayscale, deflate, adaptive filtering, no interlace.
_GRAY8_IHDR_TAIL = bytes((8, 0, 0, 0, 0))
_PNG_FILTER_NONE, _PNG_FILTER_UP = 0, 2


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(body, zlib.crc32(kind)))


def encode_mask_png(mask: np.ndarray) -> bytes:
    """Encode a (H, W) uint8 mask (255 = hole) as an 8-bit grayscale PNG that any PNG reader opens.

    Written directly rather than through Pillow, about 5x cheaper: Pillow tries every row filter per
    row (adaptive filtering), which buys nothing on a two-valued image. Every row here uses filter
    "None"; deflate at level 1 already finds the long runs and the repeats of the row above, so the
    file is within ~10 % of Pillow's level-1 output (~2 KB at 256x342), and :func:`decode_mask_png`
    reads it back with a plain inflate, no per-row un-filtering.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.dtype != np.uint8:
        raise ValueError(f"mask must be a 2-D uint8 array, got shape {mask.shape} dtype {mask.dtype}")
    height, width = mask.shape
    if height == 0 or width == 0:
        raise ValueError(f"mask must have at least one pixel, got shape {mask.shape}")
    rows = np.empty((height, width + 1), dtype=np.uint8)
    rows[:, 0] = _PNG_FILTER_NONE
    rows[:, 1:] = mask
    header = struct.pack(">II", width, height) + _GRAY8_IHDR_TAIL
    return b"".join(
        (
            _PNG_SIGNATURE,
            _png_chunk(b"IHDR", header),
            _png_chunk(b"IDAT", zlib.compress(rows.data, 1)),
            _png_chunk(b"IEND", b""),
        )
    )


def _inflate_exactly(compressed: bytes, expected: int) -> bytes:
    """Inflate ``compressed`` into exactly ``expected`` bytes, never producing more than ``expected + 1``: a zlib
    bomb (a few KB inflating to GBs) stops at its declared size instead of allocating what it claims."""
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(compressed, expected + 1)
    except zlib.error as exc:
        raise ValueError(f"mask is not a readable PNG: {exc}") from None
    if len(raw) != expected or inflater.unconsumed_tail:
        got = f"more than {expected}" if len(raw) > expected or inflater.unconsumed_tail else str(len(raw))
        raise ValueError(f"mask is not a readable PNG: {got} bytes of pixel data, its header declares {expected}")
    return raw


def _decode_gray8_png(data: bytes, max_pixels: int) -> np.ndarray | None:
    """Fast path for the PNGs :func:`encode_mask_png` writes (8-bit gray, rows filtered None or Up).

    Returns ``None`` for any other valid layout (palette, 1-bit, other filters, ...), which the caller
    hands to Pillow; raises ``ValueError`` for a PNG that is corrupt or declares more than ``max_pixels``.
    """
    if not data.startswith(_PNG_SIGNATURE):
        return None
    view = memoryview(data)
    pos, size, idat = len(_PNG_SIGNATURE), len(data), []
    width = height = 0
    while pos + 12 <= size:
        (length,) = struct.unpack_from(">I", data, pos)
        kind = bytes(view[pos + 4 : pos + 8])
        body = view[pos + 8 : pos + 8 + length]
        if len(body) != length or pos + 12 + length > size:
            raise ValueError(f"mask is not a readable PNG: chunk {kind!r} is truncated")
        (crc,) = struct.unpack_from(">I", data, pos + 8 + length)
        if zlib.crc32(body, zlib.crc32(kind)) != crc:
            raise ValueError(f"mask is not a readable PNG: chunk {kind!r} fails its CRC")
        pos += 12 + length
        if kind == b"IHDR":
            if length != 13 or bytes(body[8:]) != _GRAY8_IHDR_TAIL:
                return None
            width, height = struct.unpack_from(">II", body)
            if width * height > max_pixels:
                raise ValueError(f"mask is not a readable PNG: {width}x{height} is over {max_pixels} pixels")
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        elif kind == b"PLTE" or kind == b"tRNS":
            return None  # changes how gray values map; let Pillow apply it
    if width == 0 or height == 0 or not idat:
        raise ValueError("mask is not a readable PNG: no IHDR or no image data")
    raw = _inflate_exactly(b"".join(idat), height * (width + 1))
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(height, width + 1)
    filters = rows[:, 0]
    if not filters.any():
        return rows[:, 1:]
    # "Up" on every row (row 0's "above" is zeros): pixel rows are the running sum mod 256 of the stored rows.
    if (filters == _PNG_FILTER_UP).all() or (filters[0] == _PNG_FILTER_NONE and (filters[1:] == _PNG_FILTER_UP).all()):
        return np.cumsum(rows[:, 1:], axis=0, dtype=np.uint8)
    return None


def decode_mask_png(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode a mask PNG into a (H, W) uint8 array with values {0, 255} (255 = hole).

    Gray values are binarised at 128 so a mask resized or re-saved by another tool still reads right.
    The masks holefill writes take a direct inflate path, bounded by the size their header declares; any other
    PNG is decoded by Pillow after the same pixel check. Every bad input, bombs included, is one ``ValueError``.
    """
    array = _decode_gray8_png(data, max_pixels)
    if array is None:
        try:
            im = Image.open(io.BytesIO(data), formats=("PNG",))
            if im.width * im.height > max_pixels:
                raise ValueError(f"{im.width}x{im.height} is over {max_pixels} pixels")
            im.load()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, zlib.error, struct.error, EOFError,
                Image.DecompressionBombError) as exc:
            raise ValueError(f"mask is not a readable PNG: {one_line(exc)}") from None
        if im.mode not in ("L", "1"):
            im = im.convert("L")
        array = np.asarray(im)
        if array.dtype == bool:
            return array.astype(np.uint8) * 255
    # The top bit decides (>= 128 is a hole); a shift and a multiply beat np.where by ~10x.
    binary = np.right_shift(array, 7)
    binary *= 255
    return binary
