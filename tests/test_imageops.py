"""prepare_image on every input kind the shard job meets, mask PNG round trip, Pillow flavour."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline.joblog import pillow_flavour
from pipeline.data.imageops import (
    BadImageError,
    PreparedImage,
    decode_mask_png,
    encode_mask_png,
    jpeg_draft_scale,
    prepare_image,
)


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _scene(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth content (gradients + a few blocks): resizing it is well defined, unlike white noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([x / width * 255, y / height * 255, (x + y) / (width + height) * 255], axis=-1)
    for _ in range(5):
        x0, y0 = int(rng.integers(width - width // 4)), int(rng.integers(height - height // 4))
        img[y0 : y0 + height // 4, x0 : x0 + width // 4] = rng.integers(0, 255, 3)
    return Image.fromarray(img.astype(np.uint8))


def _decoded(prepared: PreparedImage) -> Image.Image:
    im = Image.open(io.BytesIO(prepared.jpeg))
    assert im.format == "JPEG" and im.mode == "RGB"
    assert im.size == (prepared.width, prepared.height)
    return im


def test_large_jpeg_is_drafted_and_resized_to_the_short_side_faithfully():
    source = _scene(2000, 1500)
    prepared = prepare_image(_encode(source, "JPEG", quality=95), store_size=256)
    assert (prepared.width, prepared.height) == (341, 256)
    assert prepared.reencoded and prepared.source_format == "JPEG" and prepared.source_size == (2000, 1500)
    reference = np.asarray(source.resize((341, 256), Image.Resampling.LANCZOS), dtype=np.float32)
    assert np.abs(np.asarray(_decoded(prepared), dtype=np.float32) - reference).mean() < 3.0


def test_rgb_jpeg_already_at_target_size_keeps_its_original_bytes():
    data = _encode(_scene(341, 256), "JPEG", quality=80)
    prepared = prepare_image(data, store_size=256)
    assert prepared.jpeg is data and not prepared.reencoded
    assert (prepared.width, prepared.height) == (341, 256)
    as_is = prepare_image(data, store_size=None)
    assert as_is.jpeg is data


def test_center_crop_gives_a_square_from_the_middle():
    source = _scene(600, 300)
    prepared = prepare_image(_encode(source, "PNG"), store_size=128, center_crop=True)
    assert (prepared.width, prepared.height) == (128, 128)
    expected = source.resize((256, 128), Image.Resampling.BICUBIC).crop((64, 0, 192, 128))
    assert np.abs(np.asarray(_decoded(prepared), np.float32) - np.asarray(expected, np.float32)).mean() < 3.0


def test_small_images_are_upscaled_and_tiny_ones_rejected():
    prepared = prepare_image(_encode(_scene(100, 80), "PNG"), store_size=256)
    assert (prepared.width, prepared.height) == (320, 256)
    with pytest.raises(BadImageError, match="too small") as info:
        prepare_image(_encode(_scene(20, 20), "PNG"), store_size=256)
    assert info.value.reason == "too small"


def test_png_with_alpha_is_composited_on_white():
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., 0] = 255  # red ...
    rgba[:, :32, 3] = 255  # ... opaque on the left, fully transparent on the right
    prepared = prepare_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG"), store_size=64)
    pixels = np.asarray(_decoded(prepared), np.int16)
    assert np.abs(pixels[:, 4:28] - [255, 0, 0]).max() < 12
    assert np.abs(pixels[:, 36:60] - [255, 255, 255]).max() < 12


def test_palette_with_transparency_is_composited_on_white():
    im = Image.new("P", (64, 64), 0)
    im.putpalette([0, 0, 255] + [0, 255, 0] * 255)
    im.paste(1, (32, 0, 64, 64))
    data = _encode(im, "PNG", transparency=0)
    pixels = np.asarray(_decoded(prepare_image(data, store_size=64)), np.int16)
    assert np.abs(pixels[:, 4:28] - [255, 255, 255]).max() < 12  # index 0 is transparent
    assert np.abs(pixels[:, 36:60] - [0, 255, 0]).max() < 12


def test_grayscale_jpeg_becomes_three_equal_channels():
    gray = Image.fromarray(np.tile(np.arange(0, 256, 2, dtype=np.uint8), (64, 1)), "L")
    prepared = prepare_image(_encode(gray, "JPEG", quality=95), store_size=64)
    pixels = np.asarray(_decoded(prepared), np.int16)
    assert pixels.shape == (64, 128, 3)
    assert np.abs(pixels[..., 0] - pixels[..., 1]).max() <= 3 and np.abs(pixels[..., 1] - pixels[..., 2]).max() <= 3


def test_cmyk_jpeg_is_converted_to_rgb_colours():
    cmyk = Image.new("CMYK", (64, 64), (0, 255, 255, 0))  # pure red in CMYK
    prepared = prepare_image(_encode(cmyk, "JPEG", quality=95), store_size=64)
    mean = np.asarray(_decoded(prepared), np.float32).mean(axis=(0, 1))
    assert mean[0] > 200 and mean[1] < 40 and mean[2] < 40


def test_16_bit_png_is_scaled_not_clipped_to_white():
    ramp = np.tile(np.linspace(0, 65535, 128).astype(np.uint16), (64, 1))
    im = Image.fromarray(ramp)  # a 16-bit grey image (mode I;16)
    assert im.mode == "I;16"
    prepared = prepare_image(_encode(im, "PNG"), store_size=64)
    pixels = np.asarray(_decoded(prepared), np.float32)[..., 0]
    assert pixels[:, :8].mean() < 20 and pixels[:, -8:].mean() > 235
    assert 100 < pixels.mean() < 155  # a clipped conversion would be almost all 255


def test_exif_orientation_is_applied():
    im = Image.new("RGB", (60, 40), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 30, 40))  # stored: red left half, blue right half
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    prepared = prepare_image(_encode(im, "JPEG", quality=95, exif=exif.tobytes()), store_size=40)
    assert prepared.reencoded and (prepared.width, prepared.height) == (40, 60)
    pixels = np.asarray(_decoded(prepared), np.int16)
    assert np.abs(pixels[5:25].mean(axis=(0, 1)) - [255, 0, 0]).max() < 20  # red is on top now
    assert np.abs(pixels[35:55].mean(axis=(0, 1)) - [0, 0, 255]).max() < 20


@pytest.mark.parametrize("size", [(683, 512), (341, 256)], ids=["needs-resize", "kept-bytes-path"])
def test_truncated_jpeg_is_rejected_not_padded(size):
    data = _encode(_scene(*size), "JPEG", quality=90)
    with pytest.raises(BadImageError) as info:
        prepare_image(data[: len(data) * 2 // 3], store_size=256)
    assert info.value.reason == "truncated"


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file"),
        (b"this is a text file, not a picture\n" * 10, "not an image"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "not an image"),  # EPS would run Ghostscript
    ],
    ids=["zero-bytes", "text", "eps"],
)
def test_non_images_are_rejected_with_a_reason(data, reason):
    with pytest.raises(BadImageError) as info:
        prepare_image(data)
    assert info.value.reason == reason
    assert isinstance(info.value, ValueError)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` but which carries no pixel data at all."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("side", [12_000, 40_000], ids=["over-our-limit", "over-pillows-hard-limit"])
def test_decompression_bombs_are_rejected_from_the_header(side):
    # No pixel data exists: had the image been decoded first, the error would be about truncation.
    with pytest.raises(BadImageError) as info:
        prepare_image(_png_header_only(side, side))
    assert info.value.reason == "decompression bomb"


def test_max_pixels_is_configurable():
    data = _encode(_scene(300, 300), "PNG")
    with pytest.raises(BadImageError, match="decompression bomb"):
        prepare_image(data, max_pixels=300 * 300 - 1)
    assert prepare_image(data, max_pixels=300 * 300).width == 256


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match="store_size"):
        prepare_image(b"x", store_size=0)
    with pytest.raises(ValueError, match="center_crop needs a store_size"):
        prepare_image(b"x", store_size=None, center_crop=True)


@pytest.mark.parametrize(
    ("source", "target", "scale"),
    [
        ((683, 512), (342, 256), 2),  # Places "large": libjpeg's 1/2 output is ceil(683 / 2) = 342 wide
        ((512, 683), (256, 342), 2),
        ((2048, 1536), (342, 256), 4),  # 1/8 would give 256x192, short of 256
        ((4000, 3000), (341, 256), 8),
        ((300, 200), (384, 256), 1),  # up-scaling: never drafted
        ((511, 511), (256, 256), 2),
        ((510, 510), (256, 256), 1),
    ],
)
def test_draft_scale_is_the_largest_power_of_two_whose_output_still_covers_the_target(source, target, scale):
    assert jpeg_draft_scale(source, target) == scale


def test_places_sized_jpeg_is_decoded_at_half_scale_and_not_resized_again():
    data = _encode(_scene(683, 512), "JPEG", quality=90)
    prepared = prepare_image(data, store_size=256)
    assert (prepared.width, prepared.height) == (342, 256)
    # What a 1/2-scale DCT decode gives, encoded as prepare_image encodes: byte for byte the same.
    half = Image.open(io.BytesIO(data))
    half.draft("RGB", (341, 256))
    assert half.size == (342, 256)
    expected = io.BytesIO()
    half.save(expected, format="JPEG", quality=95, subsampling="4:4:4")
    assert prepared.jpeg == expected.getvalue()


def _random_masks(shape: tuple[int, int]) -> list[np.ndarray]:
    rng = np.random.default_rng(sum(shape))
    return [np.zeros(shape, np.uint8), np.full(shape, 255, np.uint8), (rng.random(shape) < 0.3).astype(np.uint8) * 255]


def test_mask_png_round_trips_as_8_bit_gray():
    mask = np.zeros((48, 80), np.uint8)
    mask[10:30, 5:60] = 255
    data = encode_mask_png(mask)
    im = Image.open(io.BytesIO(data))
    assert im.format == "PNG" and im.mode == "L" and im.size == (80, 48)
    assert np.array_equal(decode_mask_png(data), mask)


@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (64, 96), (256, 342)])
def test_mask_png_is_read_identically_by_pillow_and_by_decode_mask_png(shape):
    for mask in _random_masks(shape):
        data = encode_mask_png(mask)
        image = Image.open(io.BytesIO(data))
        assert image.format == "PNG" and image.mode == "L" and image.size == shape[::-1]
        assert np.array_equal(np.asarray(image), mask)
        assert np.array_equal(decode_mask_png(data), mask)


def _up_filtered_png(mask: np.ndarray) -> bytes:
    """A PNG whose rows all use the "Up" filter: how shards written before the filter-None encoder store masks."""
    rows = np.empty((mask.shape[0], mask.shape[1] + 1), np.uint8)
    rows[:, 0] = 2
    rows[0, 1:] = mask[0]
    np.subtract(mask[1:], mask[:-1], out=rows[1:, 1:])

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", mask.shape[1], mask.shape[0], 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes())) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "encode",
    [
        pytest.param(_up_filtered_png, id="up-filtered"),
        pytest.param(lambda m: _encode(Image.fromarray(m), "PNG"), id="pillow-adaptive-filters"),
        pytest.param(lambda m: _encode(Image.fromarray(m), "PNG", optimize=True), id="pillow-optimized"),
        pytest.param(lambda m: _encode(Image.fromarray(m).convert("1"), "PNG"), id="1-bit"),
        pytest.param(lambda m: _encode(Image.fromarray(m).convert("P"), "PNG"), id="palette"),
        pytest.param(lambda m: _encode(Image.fromarray(m).convert("RGB"), "PNG"), id="rgb"),
    ],
)
def test_masks_written_by_other_encoders_decode_to_the_same_array(encode):
    for mask in _random_masks((33, 47)):
        assert np.array_equal(decode_mask_png(encode(mask)), mask)


def test_gray_masks_are_binarised_at_128():
    gray = np.array([[0, 1, 127, 128, 200, 255]], np.uint8)
    expected = np.array([[0, 0, 0, 255, 255, 255]], np.uint8)
    assert np.array_equal(decode_mask_png(encode_mask_png(gray)), expected)
    assert np.array_equal(decode_mask_png(_encode(Image.fromarray(gray), "PNG")), expected)


def test_mask_png_rejects_bad_arrays_and_bytes():
    with pytest.raises(ValueError, match="2-D uint8"):
        encode_mask_png(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="2-D uint8"):
        encode_mask_png(np.zeros((2, 2, 1), np.uint8))
    with pytest.raises(ValueError, match="at least one pixel"):
        encode_mask_png(np.zeros((0, 4), np.uint8))
    with pytest.raises(ValueError, match="not a readable PNG"):
        decode_mask_png(b"garbage")
    data = bytearray(encode_mask_png(np.full((16, 16), 255, np.uint8)))
    with pytest.raises(ValueError, match="not a readable PNG"):
        decode_mask_png(bytes(data[:40]))  # cut inside IDAT
    data[45] ^= 0xFF  # a byte of compressed pixel data: the chunk CRC catches it
    with pytest.raises(ValueError, match="CRC"):
        decode_mask_png(bytes(data))


def test_pillow_flavour_names_the_active_build():
    text = pillow_flavour()
    assert text.split()[0] in {"Pillow", "pillow-simd"}
    assert "jpeg" in text
