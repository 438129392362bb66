"""The tar format of holefill shards, both ways: a byte-exact writer and a lean streaming reader.

Writing (:class:`TarAppender` over a :class:`HashingWriter`): GNU tar, byte for byte what ``tarfile`` writes
for the same members with fixed times and owners, so equal inputs give byte-identical shards everywhere and
the sha256 is taken while writing (no second read). ``tarfile``'s stream mode copies each member through a
growing buffer and builds every header field by field, which costs more than hashing and writing the data;
here a header is a copy of one template with the name, size and checksum patched in.

Reading (:func:`tar_members`): ``(name, bytes)`` of the regular members a ``select`` predicate accepts, from any
stream (ustar, GNU long names, pax). Members not selected are skipped without being read into memory (a seek
where the stream can). Used by the loaders (several times cheaper than ``tarfile``'s reader per member, which
matters at three members a sample) and by the shard job when it regroups short shards.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from typing import IO, Any, Callable, Iterator

__all__ = ["HashingWriter", "TarAppender", "all_members", "tar_members"]

# Tar header fields are fixed so that equal inputs give byte-identical shards on every run and host.
TAR_MTIME = 0
TAR_MODE = 0o644
_BLOCK = tarfile.BLOCKSIZE  # 512
_NAME_FIELD = 100
_MAX_PLAIN_SIZE = 8**11  # the 12-byte octal size field; larger sizes need tarfile's base-256 form
_REGULAR_TYPES = frozenset((b"0", b"\0", b"7"))  # regular file, pre-POSIX regular file, contiguous file
_TYPES_WITHOUT_DATA = frozenset((b"1", b"2", b"3", b"4", b"5", b"6"))  # links, devices, directories, FIFOs
_SKIP_CHUNK = 1 << 20


# ------------------------------------------------------------------------------------------------ writing


class HashingWriter:
    """Write-through file wrapper that hashes and counts the bytes (no second read of the shard)."""

    def __init__(self, handle: IO[bytes]):
        self._handle = handle
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        self._handle.write(data)
        return len(data)

    def flush(self) -> None:
        self._handle.flush()


class TarAppender:
    """Appends regular files to a binary stream as a GNU tar: byte for byte what ``tarfile`` writes.

    Names longer than the 100-byte header field (and sizes past the octal field) go through ``tarfile``
    itself (a GNU long-name member / base-256 size).
    """

    def __init__(self, sink: IO[bytes] | HashingWriter) -> None:
        self._sink = sink
        self._offset = 0
        self._template = self._tarfile_header("", 0)

    @staticmethod
    def _tarfile_header(name: str, size: int) -> bytes:
        info = tarfile.TarInfo(name)
        info.size = size
        info.mtime = TAR_MTIME
        info.mode = TAR_MODE
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")

    def _header(self, name: str, size: int) -> bytes:
        encoded = name.encode("utf-8", "surrogateescape")
        if len(encoded) > _NAME_FIELD or size >= _MAX_PLAIN_SIZE:
            return self._tarfile_header(name, size)
        header = bytearray(self._template)
        header[: len(encoded)] = encoded
        header[124:136] = b"%011o\0" % size
        header[148:156] = b"        "  # the checksum is summed with its own field as spaces
        header[148:155] = b"%06o\0" % sum(header)
        return bytes(header)

    def add(self, name: str, data: bytes) -> None:
        """Append one regular file ``name`` holding ``data``."""
        header = self._header(name, len(data))
        padding = -len(data) % _BLOCK
        self._sink.write(header)
        self._sink.write(data)
        if padding:
            self._sink.write(tarfile.NUL * padding)
        self._offset += len(header) + len(data) + padding

    def close(self) -> None:
        """End the archive as ``tarfile`` does: two zero blocks, then zeros up to a full record."""
        end = 2 * _BLOCK
        end += -(self._offset + end) % tarfile.RECORDSIZE
        self._sink.write(tarfile.NUL * end)
        self._offset += end


# ------------------------------------------------------------------------------------------------ reading


def _number(field: bytes) -> int:
    """A numeric header field: NUL/space-terminated octal, or GNU base-256 when the top bit is set."""
    if field[:1] in (b"\x80", b"\xff"):
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * (len(field) - 1))) if field[:1] == b"\xff" else value
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise ValueError(f"tar header has a non-octal number field {field!r}") from None


def _pax_records(data: bytes) -> dict[str, str]:
    """The ``key=value`` records of a pax extended header (``"%d %s=%s\\n"`` each)."""
    records, pos = {}, 0
    while pos < len(data) and data[pos] != 0:
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        records[key.decode("utf-8")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def _read_exactly(stream: Any, size: int) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise ValueError(f"tar stream ends inside a member ({len(data)} of {size} bytes)")
    return data


def _skip(stream: Any, size: int) -> None:
    """Move past ``size`` bytes: a seek where the stream can, reads (discarded) where it cannot."""
    if size <= 0:
        return
    try:
        seekable = stream.seekable()
    except (AttributeError, OSError):
        seekable = False
    if seekable:
        stream.seek(size, io.SEEK_CUR)
        return
    while size > 0:
        size -= len(_read_exactly(stream, min(size, _SKIP_CHUNK)))


def all_members(name: str) -> bool:
    """A ``select`` for :func:`tar_members` that keeps every regular file."""
    return True


def tar_members(stream: Any, select: Callable[[str], bool] = all_members) -> Iterator[tuple[str, bytes]]:
    """``(name, data)`` of every regular file in a tar stream whose name passes ``select``, in order.

    Reads ustar, GNU (long names) and pax (long or non-ASCII names, large sizes) archives, e.g. those of
    ``tarfile``, GNU tar and ``webdataset.TarWriter``. Directories, links, devices and members that
    ``select`` rejects are skipped without being read into memory. A header with a bad checksum or a
    stream that ends inside a member raises ``ValueError``; an empty stream holds no members.
    """
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        header = stream.read(_BLOCK)
        if not header or header.count(0) == _BLOCK:
            return  # end of archive (a zero block) or a stream with no end blocks at all
        if len(header) != _BLOCK:
            raise ValueError(f"tar stream ends inside a header ({len(header)} bytes)")
        stored = _number(header[148:156])
        # The checksum treats its own field as spaces; some old writers summed the bytes as signed.
        unsigned = sum(header) - sum(header[148:156]) + 8 * ord(" ")
        if stored != unsigned and stored != unsigned - 256 * sum(1 for b in header if b > 127):
            raise ValueError("tar header checksum mismatch: not a tar archive, or a corrupt one")
        kind = header[156:157]
        size = _number(header[124:136])
        if kind == b"x" or kind == b"g":
            records = _pax_records(_read_exactly(stream, size))
            _skip(stream, -size % _BLOCK)
            if kind == b"x":
                pax = records
            continue
        if kind == b"L":
            long_name = _read_exactly(stream, size).split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            _skip(stream, -size % _BLOCK)
            continue
        if "size" in pax:
            size = int(pax["size"])
        name = pax.get("path") or long_name
        if name is None:
            name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            prefix = header[345:500].split(b"\0", 1)[0] if header[257:263] == b"ustar\0" else b""
            if prefix:
                name = prefix.decode("utf-8", "surrogateescape") + "/" + name
        long_name, pax = None, {}
        if kind == b"\0" and name.endswith("/"):
            continue  # a pre-POSIX directory entry: no data blocks
        if kind in _REGULAR_TYPES and select(name):
            data = _read_exactly(stream, size)
            _skip(stream, -size % _BLOCK)
            yield name, data
        elif kind not in _TYPES_WITHOUT_DATA:
            _skip(stream, size + (-size % _BLOCK))  # unselected files, and unknown kinds as tarfile does
