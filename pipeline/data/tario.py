"""The tar format of holefill shards, both ways: a byte-exact writer and a lean streaming reader.

Writing (:class:`TarAppender` over a :class:`HashingWriter`): GNU tar, byte for byte what ``tarfile`` writes
for the same members with fixed times and owners, so equal inputs give byte-identical shards everywhere and
the sha256 is taken while writing (no second read). ``tarfile``'s stream mode copies each member through a
growing buffer and builds every header field by field, which costs more than hashing and writing the data;
here a header is a copy of one template with the name, size and checksum patched in.

Reading (:func:`tar_members`): ``(name, bytes)`` of the regular members a ``select`` predicate accepts, from any
stream (ustar, GNU long names, pax). Members not selected are skipped without being read into memory (a seek
where the stream can). Used by the loaders (several times cheaper than ``tarfile``'s reader per member, which
matters at three members a sample), by the shard job when it regroups short shards, and (:func:`tar_entries`,
headers only) to list source archives. Every byte of a tar is hostile until checked: each header field is
checked (checksum, octal fields, sizes, pax record syntax and lengths), memory is bounded (a member read into
memory: :data:`MAX_MEMBER_BYTES`; an extended header: :data:`MAX_META_BYTES`) whatever the headers claim, every
loop advances, and damage raises one :class:`TarFormatError` naming the offset (``tests/test_parsers_fuzz.py``).
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from dataclasses import dataclass
from typing import IO, Any, Callable, Iterator

__all__ = ["MAX_MEMBER_BYTES", "MAX_META_BYTES", "HashingWriter", "TarAppender", "TarEntry", "TarFormatError",
           "all_members", "tar_entries", "tar_members"]

# Tar header fields are fixed so that equal inputs give byte-identical shards on every run and host.
TAR_MTIME = 0
TAR_MODE = 0o644
_BLOCK = tarfile.BLOCKSIZE  # 512
_NAME_FIELD = 100
_MAX_PLAIN_SIZE = 8**11  # the 12-byte octal size field; larger sizes need tarfile's base-256 form
_REGULAR_TYPES = frozenset((b"0", b"\0", b"7"))  # regular file, pre-POSIX regular file, contiguous file
_TYPES_WITHOUT_DATA = frozenset((b"1", b"2", b"3", b"4", b"5", b"6"))  # links, devices, directories, FIFOs
_SKIP_CHUNK = 1 << 20
_PAX_LENGTH_DIGITS = 12  # a pax record length with more digits than this is not a length anyone writes
_MAX_SIZE = 1 << 62  # a size past this is no file (and past what a seek takes)
# Bounds of the reader: a member it reads into memory, and a pax / GNU long-name header. Shard members are a few
# hundred KB; a header claiming more is damage or hostility, never data to allocate for.
MAX_MEMBER_BYTES = 256 * 1024 * 1024
MAX_META_BYTES = 1024 * 1024


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


class TarFormatError(ValueError):
    """A tar stream whose structure is damaged or hostile: a header field out of range, a bad checksum, a pax
    record that does not parse, a member over the size bound, a stream that ends inside a header or a member.

    The one error the reader raises for bad bytes; ``offset`` is where in the stream the bad structure starts.
    Not a storage fault: reading the same bytes again gives the same error, so it is never retried.
    """

    def __init__(self, message: str, offset: int) -> None:
        self.offset = offset
        super().__init__(f"damaged tar at offset {offset}: {message}")


@dataclass(frozen=True, slots=True)
class TarEntry:
    """One member header as the reader saw it: name, where its data starts, its size, time and type flag.

    ``sparse`` marks GNU sparse members (old GNU type ``S`` or pax ``GNU.sparse.*``): their stored bytes are not
    their content, so holefill never takes them as inputs.
    """

    name: str
    offset: int
    size: int
    mtime: float
    kind: bytes
    sparse: bool = False

    @property
    def regular(self) -> bool:
        return self.kind in _REGULAR_TYPES and not self.sparse


def _number(field: bytes, offset: int, what: str) -> int:
    """A numeric header field: NUL/space-terminated octal, or GNU base-256 when the top bit is set."""
    if field[:1] in (b"\x80", b"\xff"):
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * (len(field) - 1))) if field[:1] == b"\xff" else value
    text = field.split(b"\0", 1)[0].strip()
    if text and not all(48 <= byte <= 55 for byte in text):  # int() would also take "+", "_" and spaces inside
        raise TarFormatError(f"header field {what} is not an octal number ({bytes(field)!r})", offset)
    return int(text, 8) if text else 0


def _pax_records(data: bytes, offset: int) -> dict[str, str]:
    """The ``key=value`` records of a pax extended header (``"%d %s=%s\\n"`` each), every one checked: a decimal
    length that covers at least its own digits, a space, ``k=`` and the newline, stays inside the header and ends
    in ``\\n``. Anything else is a :class:`TarFormatError` (a length of 0 or less never reaches here as a loop)."""
    records: dict[str, str] = {}
    pos, size = 0, len(data)
    while pos < size and data[pos] != 0:
        space = data.find(b" ", pos, pos + _PAX_LENGTH_DIGITS + 1)
        digits = data[pos:space] if space > pos else b""
        if not digits or not digits.isdigit():
            raise TarFormatError(f"pax record {data[pos:pos + 24]!r} does not start with a decimal length",
                                 offset + pos)
        length = int(digits)
        end = pos + length
        if length < len(digits) + 4 or end > size or data[end - 1] != 0x0A:
            raise TarFormatError(f"pax record length {length} does not fit its record", offset + pos)
        key, equals, value = data[space + 1 : end - 1].partition(b"=")
        if not equals or not key:
            raise TarFormatError("pax record has no key=value", offset + pos)
        try:
            records[key.decode("utf-8")] = value.decode("utf-8", "surrogateescape")
        except UnicodeDecodeError:
            raise TarFormatError("pax record key is not UTF-8", offset + pos) from None
        pos = end
    return records


def _read_exactly(stream: Any, size: int, offset: int, what: str) -> bytes:
    """``size`` bytes, read in bounded chunks (a lying size never allocates more than the stream holds)."""
    if size <= _SKIP_CHUNK:
        data = stream.read(size)
    else:
        parts, left = [], size
        while left > 0:
            part = stream.read(min(left, _SKIP_CHUNK))
            if not part:
                break
            parts.append(part)
            left -= len(part)
        data = b"".join(parts)
    if len(data) != size:
        raise TarFormatError(f"stream ends inside {what} ({len(data)} of {size} bytes)", offset)
    return data


def _skip(stream: Any, size: int, offset: int) -> None:
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
        step = min(size, _SKIP_CHUNK)
        _read_exactly(stream, step, offset, "a member")
        size -= step
        offset += step


def all_members(name: str) -> bool:
    """A ``select`` for :func:`tar_members` that keeps every regular file."""
    return True


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _walk(stream: Any, want: Callable[[TarEntry], bool], max_member_bytes: int,
          max_meta_bytes: int) -> Iterator[tuple[TarEntry, bytes | None]]:
    """Every member header of a tar stream with its data when ``want(entry)`` (else skipped unread), checked.

    Positions are counted here (the stream may not tell them), so every error names its offset.
    """
    pos = 0
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        header = stream.read(_BLOCK)
        if not header or header.count(0) == _BLOCK:
            return  # end of archive (a zero block) or a stream with no end blocks at all
        if len(header) != _BLOCK:
            raise TarFormatError(f"stream ends inside a header ({len(header)} of {_BLOCK} bytes)", pos)
        stored = _number(header[148:156], pos, "chksum")
        # The checksum treats its own field as spaces; some old writers summed the bytes as signed.
        unsigned = sum(header) - sum(header[148:156]) + 8 * ord(" ")
        if stored != unsigned and stored != unsigned - 256 * sum(1 for b in header if b > 127):
            raise TarFormatError("header checksum mismatch: not a tar archive, or a corrupt one", pos)
        kind = header[156:157]
        size = _number(header[124:136], pos, "size")
        data_at = pos + _BLOCK
        if not 0 <= size <= _MAX_SIZE:
            raise TarFormatError(f"header declares a size out of range ({size})", pos)
        if kind in (b"x", b"g", b"L", b"K"):
            if size > max_meta_bytes:
                raise TarFormatError(f"extended header of {size} bytes, over the bound of {max_meta_bytes}", pos)
            meta = _read_exactly(stream, size, data_at, "an extended header")
            _skip(stream, -size % _BLOCK, data_at + size)
            pos = data_at + size + (-size % _BLOCK)
            if kind == b"x":
                pax = _pax_records(meta, data_at)
            elif kind == b"g":
                _pax_records(meta, data_at)  # checked, but holefill needs nothing global
            elif kind == b"L":
                long_name = _text(meta)
            continue
        sparse = kind == b"S" or any(key.startswith("GNU.sparse.") for key in pax)
        if "size" in pax:
            if not (pax["size"].isdigit() and pax["size"].isascii() and len(pax["size"]) <= 18):
                raise TarFormatError(f"pax size {pax['size'][:24]!r} is not a size", pos)
            size = int(pax["size"])
        name = pax.get("path") or long_name
        if name is None:
            name = _text(header[:100])
            prefix = header[345:500].split(b"\0", 1)[0] if header[257:263] == b"ustar\0" else b""
            if prefix:
                name = prefix.decode("utf-8", "surrogateescape") + "/" + name
        mtime: float
        try:
            mtime = float(pax["mtime"][:64]) if "mtime" in pax else float(_number(header[136:148], pos, "mtime"))
        except (ValueError, OverflowError):
            raise TarFormatError(f"pax mtime {pax['mtime'][:24]!r} is not a number", pos) from None
        long_name, pax = None, {}
        if kind == b"\0" and name.endswith("/"):
            kind = b"5"  # a pre-POSIX directory entry: no data blocks
        # Old GNU sparse headers store fewer bytes than their size says; the header's own size field is the stored
        # length only for them. Every other type without data has none, whatever its size field says.
        stored_size = 0 if kind in _TYPES_WITHOUT_DATA else size
        entry = TarEntry(name, data_at, size, mtime, kind, sparse)
        end = data_at + stored_size + (-stored_size % _BLOCK)
        if want(entry):
            if size > max_member_bytes:
                raise TarFormatError(f"member {name!r} is {size} bytes, over the bound of {max_member_bytes}", pos)
            data = _read_exactly(stream, size, data_at, f"a member ({name!r})")
            _skip(stream, -size % _BLOCK, data_at + size)
            pos = end
            yield entry, data
        else:
            _skip(stream, stored_size + (-stored_size % _BLOCK), data_at)
            pos = end
            yield entry, None


def tar_entries(stream: Any, *, max_meta_bytes: int = MAX_META_BYTES) -> Iterator[TarEntry]:
    """Every member header of a tar stream, in order, no data read (a seek past it where the stream can).

    The same checked parser as :func:`tar_members`; used to list source archives (offsets for ranged reads).
    Raises :class:`TarFormatError` for damaged structure.
    """
    for entry, _ in _walk(stream, lambda entry: False, 0, max_meta_bytes):
        yield entry


def tar_members(stream: Any, select: Callable[[str], bool] = all_members, *,
                max_member_bytes: int = MAX_MEMBER_BYTES,
                max_meta_bytes: int = MAX_META_BYTES) -> Iterator[tuple[str, bytes]]:
    """``(name, data)`` of every regular file in a tar stream whose name passes ``select``, in order.

    Reads ustar, GNU (long names) and pax (long or non-ASCII names, large sizes) archives, e.g. those of
    ``tarfile``, GNU tar and ``webdataset.TarWriter``. Directories, links, devices, sparse members and members
    that ``select`` rejects are skipped without being read into memory. Every header field is checked: a bad
    checksum, a number field that is not a number, a negative size, a pax record whose length does not fit it,
    an extended header over ``max_meta_bytes``, a selected member over ``max_member_bytes`` or a stream that ends
    inside a header or a member raise :class:`TarFormatError` (a ``ValueError``) naming the offset; memory stays
    within those bounds whatever the headers claim. An empty stream holds no members.
    """
    for entry, data in _walk(stream, lambda entry: entry.regular and select(entry.name), max_member_bytes,
                             max_meta_bytes):
        if data is not None:
            yield entry.name, data
