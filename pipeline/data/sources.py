"""Image sources: Places365 file lists, directory trees and tar archives on any fsspec URL.

A source is described by a :class:`SourceSettings` and enumerated by :func:`list_source` into sorted
:class:`SourceItem` records. Every item has a *key*: its relative path without the extension, with every
character outside ``[A-Za-z0-9_-]`` turned into ``_`` (WebDataset splits a member name at its first dot, so
keys must carry none). ``a/abbey/00000000.jpg`` becomes ``a_abbey_00000000``. Two paths mapping to one key
are rejected after the first in sorted path order (kept), each with its reason, so keys are unique, and they depend
only on the path, so they are stable.

Every byte of a source is hostile until checked (the listing refuses, with a reason in :attr:`SourceListing.rejected`,
which the manifest lists; a refused entry is never read):

* a file-list entry must name a file under its root: no URL (``://``), no ``..`` that leaves the root after
  normalisation (Places lists' leading ``/`` means the root), no control characters, one of ``extensions``;
* a directory source (and a file list's root) follows a symlink only when it resolves inside the root; every local
  read checks that again (:class:`SourceReader`), so a link planted after the listing is refused as well;
* a tar archive is listed by :func:`pipeline.data.tario.tar_entries` (checked headers, bounded memory); members whose
  names hold control characters, sparse members and members the archive is too short for are refused; the cached
  index stores names as JSON lines (no name can forge a record) and one that does not parse is a cache miss;
* reads are bounded: :class:`SourceReader` never reads more than its ``max_bytes`` (an item over it is
  :class:`InputTooLargeError`, a bad input), whatever the listing said.

The original Places archives hold 1.8 M files; they are read as a stream, never extracted. Listing reads the
archive once, sequentially, in large blocks (a handful of requests per archive on S3, bounded by its size over
the block, not by its member count), records each member's data offset and size, and caches that index beside
the archive keyed by its size and ETag/mtime, so later runs (retraining too) skip the pass. A shard task then
reads its members by byte range (:class:`SourceReader`).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import posixpath
import re
import time
from dataclasses import dataclass, field
import zlib
from datetime import datetime
from typing import IO, Annotated, Any, Iterable, Literal, Sequence

from pydantic import Field

from pipeline.config import Config
from pipeline.paths import LocalPath, PathStr
from pipeline.fsutil import StorageOptionsLike, is_remote, join_url, protocol_of, publish_bytes, read_bytes, url_to_fs
from pipeline.data.manifest import Manifest, RejectedInput, SourceDescription, manifest_keys
from pipeline.data.tario import TarFormatError, tar_entries
from pipeline.redaction import redact

__all__ = [
    "DEFAULT_MAX_INPUT_BYTES",
    "IMAGE_EXTENSIONS",
    "InputTooLargeError",
    "OutsideRootError",
    "SourceItem",
    "SourceListing",
    "SourceReader",
    "SourceSettings",
    "TarMember",
    "confined_path",
    "index_url_for",
    "key_for_path",
    "list_source",
    "new_items",
    "parse_file_list",
    "scan_tar",
    "suggest_root",
    "tar_members",
]

log = logging.getLogger("holefill.sources")

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
SourceKind = Literal["file_list", "directory", "tar"]
# Bounds on the two texts the job reads whole: Places365's largest list (train_challenge, ~8 M lines) is ~250 MB.
MAX_FILE_LIST_BYTES = 1 << 30
MAX_INDEX_BYTES = 1 << 30
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
# C0 and C1 control characters and DEL: no file name needs them, and a newline or tab forges records and log lines.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Photos are a few MB; Places2's largest is ~40 MB. Larger inputs are refused before any byte is read.
DEFAULT_MAX_INPUT_BYTES = 64 * 1024 * 1024
# Listing reads the archive in one sequential pass of requests this large: Places2's 105 GB train archive
# is ~1,600 requests (its 1.8 M headers read one range request each were ~900,000; bench/tar_listing.py).
TAR_LIST_BLOCK = 64 * 1024 * 1024
TAR_INDEX_SUFFIX = ".index.tsv.gz"
# v2: one JSON array per member (v1's tab-separated names could be forged by a name holding a newline).
TAR_INDEX_FORMAT = "holefill.tar-index.v2"
# Member reads during sharding: consecutive members are adjacent, so read ahead generously.
_TAR_READ_BLOCK = 8 * 1024 * 1024


class SourceSettings(Config):
    """Where the images are. ``kind: auto`` decides from the URL: ``*.txt`` file list, ``*.tar`` archive,
    anything else a directory tree.

    ``root`` is the image folder of a file list (default: the list's folder) or, for a tar archive, the
    folder inside the archive to take images from, which is stripped from keys (e.g. ``data_large``).
    """

    url: PathStr = Field(min_length=1)
    root: str | None = None
    kind: Literal["auto", "file_list", "directory", "tar"] = "auto"
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS
    index_url: Annotated[str | None, LocalPath()] = Field(
        default=None, description="tar archives: where the member index is cached (default: beside the archive)",
    )
    stat: bool = Field(
        default=True,
        description="file lists: list the image root once to record size and mtime (watermarks); "
        "turn off for a huge remote root when only key-based incremental runs are needed",
    )

    def local_path_fields(self) -> tuple[str, ...]:
        """``root`` is a local folder for file lists, but a folder inside the archive for tar sources."""
        return ("root",) if self.resolved_kind == "file_list" else ()

    @property
    def resolved_kind(self) -> SourceKind:
        """The source kind, ``auto`` resolved from the URL's suffix (no I/O)."""
        if self.kind != "auto":
            return self.kind
        path = self.url.split("?", 1)[0].split("#", 1)[0] if "://" in self.url else self.url  # a presigned URL's query
        path = path.rstrip("/").lower()
        if path.endswith(".txt"):
            return "file_list"
        if path.endswith(".tar"):
            return "tar"
        return "directory"


@dataclass(frozen=True, slots=True)
class SourceItem:
    """One input image. ``url`` is the image file, or the archive for tar members (read at ``offset``)."""

    key: str
    path: str
    url: str
    label: int | None = None
    mtime: float | None = None
    size: int | None = None
    offset: int | None = None
    root: str | None = None  # a local file must resolve inside this folder when read (symlinks included)


class InputTooLargeError(ValueError):
    """An input over the read bound (``max_input_bytes``): a bad input, rejected "too large", never retried."""


class OutsideRootError(ValueError):
    """A local input that resolves outside its source's root (a symlink): a bad input, never read."""


@dataclass(frozen=True)
class SourceListing:
    """The sorted items of a source, the description recorded in the manifest, and the entries refused while
    listing (outside the root, hostile names, sparse or short tar members, key collisions), each with its reason."""

    items: list[SourceItem]
    description: SourceDescription
    rejected: list[RejectedInput] = field(default_factory=list)


def key_for_path(path: str) -> str:
    """Sample key of a relative path: extension dropped, ``/``, dots and other unsafe characters -> ``_``."""
    relative = path.strip().lstrip("/")
    stem, _ = posixpath.splitext(relative)
    if not stem or stem.endswith("/"):
        raise ValueError(f"cannot derive a sample key from path {path!r}: no file name")
    return _KEY_UNSAFE.sub("_", stem)


def _rejection(path: str, reason: str, detail: str = "") -> RejectedInput:
    """A refused listing entry; its key where one can be derived, its path redacted (it may be a credential URL)."""
    try:
        key = key_for_path(path)
    except ValueError:
        key = ""
    return RejectedInput(key=key, source=redact(path), reason=reason, detail=detail)


def _check_unique(items: Iterable[SourceItem], rejected: list[RejectedInput]) -> list[SourceItem]:
    """Items sorted by key, one per key: of items whose keys collide, the first in path order is kept and each
    later one is rejected naming it (one odd upload never fails a listing, nightly retraining included)."""
    by_key: dict[str, SourceItem] = {}
    for item in sorted(items, key=lambda item: item.path):
        other = by_key.get(item.key)
        if other is not None:
            rejected.append(RejectedInput(key=item.key, source=item.path, reason="key collision",
                                          detail=f"{other.path} has key {item.key} (kept: first in path order)"))
            continue
        by_key[item.key] = item
    return sorted(by_key.values(), key=lambda item: item.key)


def confined_path(path: str) -> str:
    """The root-relative form of a file-list entry, or ``ValueError`` saying why it names no file under its root.

    A leading ``/`` means the root (Places lists); an entry may not be a URL, hold control characters, or leave
    the root through ``..`` after normalisation. The entry is kept as written (keys stay as they always were).
    """
    if _CONTROL.search(path):
        raise ValueError("control characters in the path")
    if "://" in path or "::" in path:
        raise ValueError("a URL, not a path under the root")
    relative = path.lstrip("/")
    normal = posixpath.normpath(relative) if relative else ""
    if normal in ("", "."):
        raise ValueError("no file name")
    if normal == ".." or normal.startswith("../"):
        raise ValueError("outside the root")
    return relative


def _local_real(url: str) -> str:
    """The resolved local path of ``url`` (symlinks followed)."""
    return os.path.realpath(url_to_fs(url)[1])


def _inside(real: str, real_root: str) -> bool:
    return real == real_root or real.startswith(real_root.rstrip("/") + "/")


def parse_file_list(text: str) -> list[tuple[str, int | None]]:
    """``(path, label)`` pairs of a Places365 file list (``/a/abbey/00000000.jpg 0`` or ``name.jpg 165``)."""
    entries: list[tuple[str, int | None]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) > 2:
            raise ValueError(f"file list line {number}: expected 'path [label]', got {line.strip()!r}")
        label: int | None = None
        if len(fields) == 2:
            try:
                label = int(fields[1])
            except ValueError:
                raise ValueError(f"file list line {number}: label {fields[1]!r} is not an integer") from None
        entries.append((fields[0], label))
    return entries


def _mtime_of(info: dict[str, Any]) -> float | None:
    for name in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(name)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return None


def _listing(url: str, storage_options: StorageOptionsLike) -> dict[str, dict[str, Any]]:
    """``relative path -> info`` of every file under ``url`` (one recursive listing).

    Local symlinks come back as they are (``islink``; fsspec neither follows them nor descends into linked
    folders): :func:`_follow_link` decides on each.
    """
    fs, root = url_to_fs(url, storage_options)
    root = root.rstrip("/")
    found = fs.find(root, detail=True)
    return {posixpath.relpath(path, root): info for path, info in found.items() if info.get("type") != "directory"}


def _unlinked(root: str, relative: str, info: dict[str, Any], rejected: list[RejectedInput]) -> dict[str, Any] | None:
    """``info`` itself, or its symlink target's when that is a file inside ``root``; ``None`` (refusal recorded)
    for a link that leaves the root, dangles or names no file."""
    if not info.get("islink"):
        return info
    followed = _follow_link(root, relative, info)
    if isinstance(followed, str):
        rejected.append(_rejection(relative, "outside root", followed))
        return None
    return followed


def _follow_link(root: str, relative: str, info: dict[str, Any]) -> dict[str, Any] | str:
    """The info of a local symlink's target when it is a file inside ``root``, else the reason it is refused."""
    real, real_root = _local_real(join_url(root, relative)), _local_real(root)
    if not _inside(real, real_root):
        return "symlink outside the root"
    try:
        stat = os.stat(real)
    except OSError:
        return "broken symlink"
    if not os.path.isfile(real):
        return "symlink to a non-file"
    return {**info, "size": stat.st_size, "mtime": stat.st_mtime, "type": "file"}


def _listing_digest(items: Sequence[SourceItem]) -> str:
    digest = hashlib.sha256()
    for item in items:
        digest.update(f"{item.path}\t{item.size if item.size is not None else ''}\n".encode())
    return digest.hexdigest()


def _has_extension(path: str, extensions: Sequence[str]) -> bool:
    return path.lower().endswith(tuple(ext.lower() for ext in extensions))


def _list_file_list(source: SourceSettings, storage_options: StorageOptionsLike) -> SourceListing:
    raw = read_bytes(source.url, storage_options, max_bytes=MAX_FILE_LIST_BYTES)
    root = source.root or posixpath.dirname(source.url.rstrip("/")) or "."
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"file list {redact(source.url)} is not UTF-8 text (byte {exc.start})") from None
    entries = parse_file_list(text)
    infos = _listing(root, storage_options) if source.stat else {}
    local = not is_remote(root)
    items: list[SourceItem] = []
    rejected: list[RejectedInput] = []
    for path, label in entries:
        try:
            relative = confined_path(path)
        except ValueError as exc:
            rejected.append(_rejection(path, "outside root", str(exc)))
            continue
        if not _has_extension(relative, source.extensions):
            rejected.append(_rejection(relative, "not an image file",
                                       f"extension not one of {', '.join(source.extensions)}"))
            continue
        info = infos.get(relative, {})
        info = _unlinked(root, relative, info, rejected)
        if info is None:
            continue
        items.append(
            SourceItem(
                key=key_for_path(relative),
                path=relative,
                url=join_url(root, relative),
                label=label,
                mtime=_mtime_of(info) if info else None,
                size=int(info["size"]) if "size" in info else None,
                root=root if local else None,
            )
        )
    items = _check_unique(items, rejected)
    description = SourceDescription(
        kind="file_list", url=redact(source.url), root=redact(root), items=len(items),
        list_sha256=hashlib.sha256(raw).hexdigest(),
    )
    return SourceListing(items, description, rejected)


def _list_directory(source: SourceSettings, storage_options: StorageOptionsLike) -> SourceListing:
    root = source.url.rstrip("/")
    local = not is_remote(root)
    items: list[SourceItem] = []
    rejected: list[RejectedInput] = []
    for relative, info in _listing(root, storage_options).items():
        name = posixpath.basename(relative)
        # Hidden files include holefill's own ".name.tmp-*" temporaries: never inputs.
        if name.startswith(".") or not _has_extension(relative, source.extensions):
            continue
        if _CONTROL.search(relative):
            rejected.append(_rejection(relative, "bad name", "control characters in the path"))
            continue
        info = _unlinked(root, relative, info, rejected)
        if info is None:
            continue
        items.append(
            SourceItem(
                key=key_for_path(relative),
                path=relative,
                url=join_url(root, relative),
                mtime=_mtime_of(info),
                size=int(info["size"]) if "size" in info else None,
                root=root if local else None,
            )
        )
    items = _check_unique(items, rejected)
    description = SourceDescription(
        kind="directory", url=redact(source.url), root=None, items=len(items), list_sha256=_listing_digest(items)
    )
    return SourceListing(items, description, rejected)


@dataclass(frozen=True, slots=True)
class TarMember:
    """A regular file inside a tar archive: where its data starts, how long it is, its time and name.

    ``sparse`` members (GNU sparse: stored bytes are not the content) are listed so that they can be refused.
    """

    offset: int
    size: int
    mtime: float
    name: str
    sparse: bool = False


def _archive_identity(info: dict[str, Any]) -> dict[str, Any]:
    """What identifies one state of an archive: its size and its ETag (object stores) or mtime (files)."""
    etag = info.get("ETag") or info.get("etag")
    return {"size": int(info["size"]), "etag": str(etag).strip('"') if etag else None,
            "mtime": None if etag else _mtime_of(info)}


def index_url_for(source: SourceSettings) -> str:
    """Where the member index of a tar source is cached: ``index_url``, else beside the archive."""
    return source.index_url or source.url + TAR_INDEX_SUFFIX


def scan_tar(url: str, storage_options: StorageOptionsLike = None, block_size: int = TAR_LIST_BLOCK) -> list[TarMember]:
    """Every regular (or sparse) member of the archive at ``url``, in one sequential pass read in ``block_size``
    requests, by holefill's checked tar parser (:func:`pipeline.data.tario.tar_entries`): bounded memory whatever
    the headers claim. Damage part way ends the listing there (the members before it stay usable), with a warning.
    """
    fs, path = url_to_fs(url, storage_options)
    members: list[TarMember] = []
    with fs.open(path, "rb", block_size=block_size, cache_type="readahead") as handle:
        try:
            for entry in tar_entries(handle):
                if entry.regular or entry.sparse:
                    members.append(TarMember(entry.offset, entry.size, entry.mtime, entry.name, entry.sparse))
        except TarFormatError as exc:
            if not members:
                raise ValueError(f"{redact(url)} is not a readable tar archive ({exc})") from None
            log.warning("%s: %s; listed the %d members before it", redact(url), exc, len(members))
    return members


def _bounded_gunzip(data: bytes) -> bytes:
    """gunzip that stops at :data:`MAX_INDEX_BYTES` of output (a cache anyone can write must not inflate without end)."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    out = inflater.decompress(data, MAX_INDEX_BYTES + 1)
    if len(out) > MAX_INDEX_BYTES or inflater.unconsumed_tail:
        raise ValueError(f"tar index inflates past {MAX_INDEX_BYTES} bytes")
    return out


def _read_index(url: str, identity: dict[str, Any], storage_options: StorageOptionsLike) -> list[TarMember] | None:
    """The cached members, or ``None`` (a cache miss) for a missing, stale or damaged cache: anything that does not
    parse as this format, record by record, is never trusted."""
    try:
        lines = _bounded_gunzip(read_bytes(url, storage_options, max_bytes=MAX_INDEX_BYTES)).decode("utf-8").split("\n")
        header = json.loads(lines[0])
        if not isinstance(header, dict) or header.get("format") != TAR_INDEX_FORMAT:
            return None
        if header.get("archive") != identity:
            return None
        members = []
        for line in lines[1:]:
            if line:
                offset, size, mtime, name, sparse = json.loads(line)
                if not (isinstance(offset, int) and isinstance(size, int) and offset >= 0 and size >= 0
                        and isinstance(mtime, (int, float)) and isinstance(name, str) and isinstance(sparse, bool)):
                    return None
                members.append(TarMember(offset, size, float(mtime), name, sparse))
    except (FileNotFoundError, OSError, EOFError, ValueError, TypeError, zlib.error):
        return None
    return members


def _write_index(url: str, identity: dict[str, Any], members: Sequence[TarMember],
                 storage_options: StorageOptionsLike) -> None:
    header = json.dumps({"format": TAR_INDEX_FORMAT, "archive": identity}, sort_keys=True)
    # One JSON array per member: a name holding a newline, a tab or a quote stays inside its own string.
    body = "".join(json.dumps([m.offset, m.size, m.mtime, m.name, m.sparse]) + "\n" for m in members)
    try:
        publish_bytes(url, gzip.compress(f"{header}\n{body}".encode("utf-8"), compresslevel=6, mtime=0),
                      storage_options)
    except (OSError, PermissionError) as exc:  # a read-only source bucket: list again next time
        log.warning("could not cache the tar index at %s: %s", url, exc)


def tar_members(source: SourceSettings, storage_options: StorageOptionsLike = None) -> list[TarMember]:
    """The members of a tar source: from the cached index when it matches the archive, else one scan (cached).

    The cache is keyed by the archive's size and ETag (or mtime): a replaced archive is listed again.
    """
    fs, path = url_to_fs(source.url, storage_options)
    identity = _archive_identity(fs.info(path))
    cache = index_url_for(source)
    members = _read_index(cache, identity, storage_options)
    if members is not None:
        log.info("tar index of %s read from %s (%d members)", redact(source.url), redact(cache), len(members))
        return members
    started = time.monotonic()
    members = scan_tar(source.url, storage_options)
    log.info("listed %d members of %s in %.1f s; index cached at %s", len(members), redact(source.url),
             time.monotonic() - started, redact(cache))
    _write_index(cache, identity, members, storage_options)
    return members


def _list_tar(source: SourceSettings, storage_options: StorageOptionsLike) -> SourceListing:
    prefix = (source.root or "").strip("/")
    fs, path = url_to_fs(source.url, storage_options)
    archive_size = int(fs.info(path)["size"])
    items: list[SourceItem] = []
    rejected: list[RejectedInput] = []
    for member in tar_members(source, storage_options):
        if not _has_extension(member.name, source.extensions):
            continue
        name = member.name[2:] if member.name.startswith("./") else member.name
        if prefix:
            if not name.startswith(prefix + "/"):
                continue
            name = name[len(prefix) + 1 :]
        if posixpath.basename(name).startswith("."):
            continue
        # Refused here, never read: a read of them would fail the same way on every attempt of every run.
        if _CONTROL.search(member.name):
            rejected.append(_rejection(name, "bad name", "control characters in the member name"))
            continue
        if member.sparse:
            rejected.append(_rejection(name, "sparse member",
                                       f"GNU sparse, {member.size} bytes: stored bytes are not its content"))
            continue
        if member.offset + member.size > archive_size:
            rejected.append(_rejection(name, "truncated", f"header says {member.size} bytes, the archive holds "
                                                           f"{max(0, archive_size - member.offset)}"))
            continue
        items.append(
            SourceItem(key=key_for_path(name), path=member.name, url=source.url, mtime=member.mtime,
                       size=member.size, offset=member.offset)
        )
    items = _check_unique(items, rejected)
    description = SourceDescription(
        kind="tar", url=redact(source.url), root=prefix or None, items=len(items), list_sha256=_listing_digest(items)
    )
    return SourceListing(items, description, rejected)


def list_source(source: SourceSettings, storage_options: StorageOptionsLike = None) -> SourceListing:
    """Enumerate ``source`` into items sorted by key (unique keys) and the entries refused, each with its reason."""
    kind = source.resolved_kind
    if kind == "file_list":
        return _list_file_list(source, storage_options)
    if kind == "tar":
        return _list_tar(source, storage_options)
    return _list_directory(source, storage_options)


def suggest_root(source: SourceSettings, missing_path: str, storage_options: StorageOptionsLike = None,
                 max_candidates: int = 64) -> str | None:
    """For a file list whose images are missing: a folder under which ``missing_path`` exists, else ``None``.

    Looks in the folders beside the list and in the configured root (the Places365 layout keeps
    ``places365_train_standard.txt`` beside ``data_large/``), at most ``max_candidates`` existence checks.
    """
    if source.resolved_kind != "file_list":
        return None
    try:
        relative = confined_path(missing_path)
    except ValueError:
        return None
    starts = [posixpath.dirname(source.url.rstrip("/")) or "."]
    if source.root:
        starts.append(source.root.rstrip("/"))
    candidates: list[str] = []
    for start in dict.fromkeys(starts):
        fs, folder = url_to_fs(start, storage_options)
        try:
            entries = fs.ls(folder, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            continue
        candidates += [join_url(start, posixpath.basename(e["name"].rstrip("/")))
                       for e in entries if e.get("type") == "directory"]
    for candidate in candidates[:max_candidates]:
        if candidate.rstrip("/") == (source.root or "").rstrip("/"):
            continue
        fs, path = url_to_fs(join_url(candidate, relative), storage_options)
        if fs.exists(path):
            return candidate
    return None


class SourceReader:
    """Reads the bytes of items; keeps tar archives open so a shard's members stream in one pass.

    Use as a context manager inside one task. Raises ``FileNotFoundError`` for a missing file, the bad-input errors
    :class:`InputTooLargeError` (over ``max_bytes``, known from the listing before any byte is read, or found by a
    read that stops one byte past the bound when the listing lied) and :class:`OutsideRootError` (a local file that
    resolves outside its item's root), and whatever the storage raised for a failed read (the caller decides what
    is transient: :func:`pipeline.fsutil.is_transient`).
    """

    def __init__(self, storage_options: StorageOptionsLike = None, max_bytes: int = DEFAULT_MAX_INPUT_BYTES):
        self._storage_options = storage_options
        self._max_bytes = max_bytes
        self._archives: dict[str, IO[bytes]] = {}
        self._real_roots: dict[str, str] = {}

    def _too_large(self, size: int, known: str) -> InputTooLargeError:
        return InputTooLargeError(f"{known} {size} bytes, over max_input_bytes={self._max_bytes}")

    def _read_file(self, item: SourceItem) -> bytes:
        fs, path = url_to_fs(item.url, self._storage_options)
        if item.root is not None:  # local: follow links only inside the root, then read what was checked
            real_root = self._real_roots.get(item.root)
            if real_root is None:
                real_root = self._real_roots[item.root] = _local_real(item.root)
            path = os.path.realpath(path)
            if not _inside(path, real_root):
                raise OutsideRootError("resolves outside the source root (a symlink)")
        if not is_remote(item.url):
            with open(path, "rb") as local:  # sized first: no read buffer of max_bytes for a small photo
                data = local.read(min(os.fstat(local.fileno()).st_size, self._max_bytes) + 1)
            if len(data) > self._max_bytes:
                raise self._too_large(len(data), "at least")
            return data
        kwargs: dict[str, Any] = {}
        if item.size is not None and protocol_of(item.url) in ("s3", "s3a"):
            kwargs["size"] = item.size  # no HEAD per object: a lying listing only shortens the read
        with fs.open(path, "rb", **kwargs) as handle:
            data = handle.read(self._max_bytes + 1)
        if len(data) > self._max_bytes:
            raise self._too_large(len(data), "at least")
        return data

    def read(self, item: SourceItem) -> bytes:
        """The encoded image bytes of ``item``, at most ``max_bytes`` of them."""
        if item.size is not None and item.size > self._max_bytes:
            raise self._too_large(item.size, "listed at")
        if item.offset is None:
            return self._read_file(item)
        fs, path = url_to_fs(item.url, self._storage_options)
        handle = self._archives.get(item.url)
        if handle is None:
            handle = self._archives[item.url] = fs.open(path, "rb", block_size=_TAR_READ_BLOCK)
        try:
            handle.seek(item.offset)
            data = handle.read(item.size or 0)
            if len(data) != (item.size or 0):
                raise EOFError(f"{redact(item.url)}: member {item.path} ends early ({len(data)} of {item.size} bytes)")
        except BaseException:
            # A failed read may leave the handle's buffer in any state: the next read (a retry) opens afresh.
            self._archives.pop(item.url, None)
            handle.close()
            raise
        return data

    def close(self) -> None:
        for handle in self._archives.values():
            handle.close()
        self._archives.clear()

    def __enter__(self) -> "SourceReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def new_items(
    items: Sequence[SourceItem],
    previous: Manifest | None,
    storage_options: StorageOptionsLike = None,
    *,
    by: Literal["keys", "mtime"] = "keys",
) -> list[SourceItem]:
    """Items not yet ingested by ``previous`` (and its ancestors: watermarks are cumulative).

    ``by="keys"`` (default) keeps items whose key the previous watermark's key list does not hold: exact,
    and it never re-ingests a key (which would duplicate a sample across versions). ``by="mtime"`` keeps items
    modified after the watermark's max mtime: cheap, for sources whose files never change once written.
    """
    if previous is None:
        return list(items)
    if by == "keys":
        if previous.keys_url() is None:
            raise ValueError("previous manifest has no key list; use by='mtime'")
        seen = manifest_keys(previous, storage_options)
        return [item for item in items if item.key not in seen]
    if by == "mtime":
        watermark = previous.watermark.max_mtime
        if watermark is None:
            raise ValueError("previous manifest has no mtime watermark; use by='keys'")
        undated = [item.path for item in items if item.mtime is None]
        if undated:
            raise ValueError(f"by='mtime' needs item mtimes; {undated[0]!r} has none (stat the source)")
        return [item for item in items if item.mtime is not None and item.mtime > watermark]
    raise ValueError(f"by must be 'keys' or 'mtime', got {by!r}")
