"""The parsers that read hostile bytes on every training step cannot hang, balloon, or raise anything but their one
documented error: the tar reader (:class:`pipeline.data.tario.TarFormatError`) and the mask PNG decoder
(``ValueError``). Each fuzz test mutates valid inputs at random for a bounded number of cases (seconds), each case
under a time bound (SIGALRM) and a memory bound (tracemalloc's peak).
"""

from __future__ import annotations

import io
import random
import signal
import struct
import tarfile
import time
import tracemalloc
import zlib
from contextlib import contextmanager

import numpy as np
import pytest
from PIL import Image

from pipeline.data.imageops import decode_mask_png, encode_mask_png
from pipeline.data.masks.importer import import_mask
from pipeline.data.tario import TarFormatError, tar_entries, tar_members

CASE_SECONDS = 2.0  # one parse of a few KB takes microseconds; a case past this is a hang
PEAK_BYTES = 16 << 20  # inputs are a few KB and the bounds below 1 MiB: nothing may allocate more than this
FUZZ_BUDGET_S = 4.0  # wall time of each fuzz loop (a 2-core CI box); the case count is capped as well
MAX_CASES = 3000


class _Hang(Exception):
    pass


@contextmanager
def _bounded():
    """Run a case under a wall-clock alarm and measure its peak allocation."""

    def alarm(signum, frame):
        raise _Hang(f"a case ran past {CASE_SECONDS} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    before, _ = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        _, peak = tracemalloc.get_traced_memory()
        if started:
            tracemalloc.stop()
        assert peak - before < PEAK_BYTES, f"a case allocated {peak - before} bytes"


@pytest.fixture
def traced():
    """tracemalloc on for a whole fuzz loop (starting it per case costs more than the case)."""
    Image.init()  # Pillow imports its plugins on the first unidentified image: a one-off cost, not a case's
    tracemalloc.start()
    yield
    tracemalloc.stop()


def _valid_tars() -> list[bytes]:
    tars = []
    for tar_format in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tar_format) as archive:
            names = ["k1.jpg", "k1.mask.png", "d/" + "n" * 90 + "/" + "m" * 40 + ".json"]
            if tar_format == tarfile.PAX_FORMAT:
                names.append("ünï/é.json")
            for index, name in enumerate(names):
                data = bytes([index + 1]) * (300 * index + 7)
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
        tars.append(buffer.getvalue())
    return tars


def _pax_header(records: bytes) -> bytes:
    info = tarfile.TarInfo("././@PaxHeader")
    info.type, info.size = tarfile.XHDTYPE, len(records)
    return info.tobuf(tarfile.USTAR_FORMAT) + records + b"\0" * (-len(records) % 512)


def _mutate_tar(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    choice = rng.randrange(6)
    if choice == 0:  # flip bytes anywhere
        for _ in range(rng.randint(1, 8)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
    elif choice == 1:  # cut it short
        buf = buf[: rng.randrange(len(buf))]
    elif choice == 2:  # a size field of any value, checksum fixed so the header is believed
        block = 512 * rng.randrange(len(buf) // 512)
        field = rng.choice([b"%011o\0" % rng.randrange(8**11), b"\xff" + rng.randbytes(11), b"\x80" + rng.randbytes(11),
                            b"-0000000001\0", b"77777777777\0"])
        buf[block + 124 : block + 136] = field
        buf[block + 148 : block + 156] = b"        "
        buf[block + 148 : block + 155] = b"%06o\0" % sum(buf[block : block + 512])
    elif choice == 3:  # a pax header with a hostile record in front
        record = rng.choice([b"0 ", b"-5 path=x\n", b"1 ", b"9999999 path=x\n", b"12 path=x", b"5 =\n",
                             b"abc path=x\n", b"13 size=-100\n", b"13 size=9e99\n", b"19 mtime=notatime\n",
                             rng.randbytes(rng.randint(1, 40))])
        buf = bytearray(_pax_header(record)) + buf
    elif choice == 4:  # a type flag of any value
        block = 512 * rng.randrange(len(buf) // 512)
        buf[block + 156] = rng.randrange(256)
        buf[block + 148 : block + 156] = b"        "
        buf[block + 148 : block + 155] = b"%06o\0" % sum(buf[block : block + 512])
    else:  # a block repeated or dropped
        block = 512 * rng.randrange(max(1, len(buf) // 512))
        buf = buf[:block] + buf[block : block + 512] * rng.randint(0, 3) + buf[block + 512 :]
    return bytes(buf)


def _fuzz(seed: int, seeds: list[bytes], mutate, parsers, error: type[Exception]) -> None:
    """Parse random mutations of ``seeds`` with each of ``parsers(data)`` for a bounded number of cases, each one
    bounded in time and memory; only ``error`` may come out, and the mutations must reach it often."""
    rng = random.Random(seed)
    started, cases, refused = time.monotonic(), 0, 0
    while cases < MAX_CASES and time.monotonic() - started < FUZZ_BUDGET_S:
        data = mutate(rng.choice(seeds), rng)
        for parse in parsers:
            try:
                with _bounded():
                    parse(data)
            except error:
                refused += 1
        cases += 1
    assert cases >= 200 and refused > cases // 4  # the mutations do reach the checks


def test_the_tar_reader_under_random_mutations_never_hangs_balloons_or_raises_another_error(traced):
    _fuzz(2718, _valid_tars(), _mutate_tar,
          (lambda data: list(tar_members(io.BytesIO(data), max_member_bytes=1 << 20, max_meta_bytes=1 << 16)),
           lambda data: list(tar_entries(io.BytesIO(data), max_meta_bytes=1 << 16))), TarFormatError)


@pytest.mark.parametrize("record", [b"0 ", b"00 path=x\n", b"-1 path=x\n", b"2 ", b"999 path=x\n"],
                         ids=["zero", "zeros", "negative", "shorter-than-itself", "past-the-end"])
def test_a_pax_record_whose_length_does_not_fit_is_one_error_naming_the_offset(record):
    data = _pax_header(record) + _valid_tars()[0]
    with _bounded(), pytest.raises(TarFormatError, match=r"damaged tar at offset 512: pax record"):
        list(tar_members(io.BytesIO(data)))


def test_a_member_over_the_bound_is_refused_before_it_is_read():
    info = tarfile.TarInfo("k.jpg")
    info.size = 8**11 - 1  # 8 GiB claimed by a 1 KB stream
    data = info.tobuf(tarfile.GNU_FORMAT) + b"x" * 512
    with _bounded(), pytest.raises(TarFormatError, match=r"offset 0: member 'k.jpg' is 8589934591 bytes, over"):
        list(tar_members(io.BytesIO(data), max_member_bytes=1 << 20))


# ------------------------------------------------------------------------------------------------ mask PNGs


def _chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    pos, chunks = 8, []
    while pos + 12 <= len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        chunks.append((data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return chunks


def _png(chunks: list[tuple[bytes, bytes]]) -> bytes:
    out = [b"\x89PNG\r\n\x1a\n"]
    for kind, body in chunks:
        out.append(struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(body, zlib.crc32(kind))))
    return b"".join(out)


def _valid_masks() -> list[bytes]:
    rng = np.random.default_rng(5)
    mask = np.where(rng.random((24, 31)) > 0.6, 255, 0).astype(np.uint8)
    pillow = io.BytesIO()
    Image.fromarray(mask).convert("1").save(pillow, format="PNG")
    return [encode_mask_png(mask), pillow.getvalue()]


def _zeros_deflated(size: int) -> bytes:
    """A zlib stream of ``size`` zero bytes (a bomb: about 1/1000 of its inflated size), built in 1 MiB steps."""
    deflate, chunk = zlib.compressobj(1), bytes(1 << 20)
    return b"".join(deflate.compress(chunk) for _ in range(size >> 20)) + deflate.flush()


_BOMB = _zeros_deflated(4 << 20)


def _mutate_png(data: bytes, rng: random.Random) -> bytes:
    chunks = _chunks(data)
    choice = rng.randrange(5)
    index = rng.randrange(len(chunks))
    kind, body = chunks[index]
    if choice == 0:  # flip bytes, CRC left wrong
        buf = bytearray(data)
        for _ in range(rng.randint(1, 6)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        return bytes(buf)
    if choice == 1:  # flip bytes inside a chunk, CRC made right: the parser has to cope with the content
        body = bytearray(body)
        for _ in range(rng.randint(1, 4)):
            if body:
                body[rng.randrange(len(body))] = rng.randrange(256)
        chunks[index] = (kind, bytes(body))
    elif choice == 2:  # a header declaring any size
        width, height = rng.choice([0, 1, 7, 4096, 2**31 - 1, 2**32 - 1]), rng.choice([0, 1, 3, 65535, 2**31 - 1])
        chunks[0] = (b"IHDR", struct.pack(">II", width, height) + chunks[0][1][8:])
    elif choice == 3:  # the pixel data replaced by a zlib bomb, or by junk
        bomb = rng.choice([_BOMB, rng.randbytes(rng.randint(0, 64)), b""])
        chunks = [(k, bomb if k == b"IDAT" else b) for k, b in chunks]
    else:  # chunks cut, repeated or dropped
        chunks = chunks[: rng.randrange(len(chunks) + 1)] + chunks[index:] * rng.randint(0, 2)
    return _png(chunks)


def test_the_mask_png_decoder_under_random_mutations_never_hangs_balloons_or_raises_another_error(traced):
    _fuzz(314, _valid_masks(), _mutate_png,
          (lambda data: decode_mask_png(data, max_pixels=1 << 16),
           lambda data: import_mask(data, size=16, max_pixels=1 << 16)), ValueError)


def test_a_mask_png_declaring_one_pixel_with_64_mib_of_pixel_data_is_refused_within_its_declared_size():
    bomb = _zeros_deflated(64 << 20)  # ~64 KB inflating to 64 MiB (4x the bound on a case's allocations)
    data = _png([(b"IHDR", struct.pack(">II", 1, 1) + bytes((8, 0, 0, 0, 0))), (b"IDAT", bomb), (b"IEND", b"")])
    with _bounded(), pytest.raises(ValueError, match="more than 2 bytes of pixel data, its header declares 2"):
        decode_mask_png(data)


@pytest.mark.parametrize("fmt", ["BMP", "TIFF", "GIF", "PPM"])
def test_mask_import_takes_only_the_allow_listed_formats(fmt):
    buffer = io.BytesIO()
    Image.new("L", (8, 8), 255).save(buffer, format=fmt)
    with pytest.raises(ValueError, match="not a PNG, JPEG, WEBP image"):
        import_mask(buffer.getvalue(), size=8)


def test_mask_import_refuses_a_decompression_bomb_in_one_line():
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    data = _png([(b"IHDR", header), (b"IDAT", zlib.compress(b"\0" * 1024)), (b"IEND", b"")])
    with _bounded(), pytest.raises(ValueError, match=r"^mask file is not a readable image: [^\n]*pixels"):
        import_mask(data, size=8, max_pixels=1 << 20)
