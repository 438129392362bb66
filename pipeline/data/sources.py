"""Image sources: Places365 file lists, directory trees and tar archives on any fsspec URL.

A source is described by a :class:`SourceSettings` and enumerated by :func:`list_source` into sorted
:class:`SourceItem` records. Every item has a *key*: its relative path without the extension, with every
character outside ``[A-Za-z0-9_-]`` turned into ``_`` (WebDataset splits a member name at its first dot, so
keys must carry none). ``a/abbey/00000000.jpg`` becomes ``a_abbey_00000000``. Two paths mapping to one key
are a ``ValueError`` naming both, so keys are unique, and they depend only on the path, so they are stable.

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
import posixpath
import re
import tarfile
import time
from dataclasses import dataclass
from datetime import datetime
from typing import IO, Annotated, Any, Iterable, Literal, Sequence

from pydantic import Field

from pipeline.config import Config
from pipeline.paths import LocalPath, PathStr
from pipeline.fsutil import StorageOptionsLike, join_url, publish_bytes, read_bytes, url_to_fs
from pipeline.data.manifest import Manifest, SourceDescription, manifest_keys

__all__ = [
    "IMAGE_EXTENSIONS",
    "SourceItem",
    "SourceListing",
    "SourceReader",
    "SourceSettings",
    "TarMember",
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
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
# Listing reads the archive in one sequential pass of requests this large: Places2's 105 GB train archive
# is ~1,600 requests (its 1.8 M headers read one range request each were ~900,000; bench/tar_listing.py).
TAR_LIST_BLOCK = 64 * 1024 * 1024
TAR_INDEX_SUFFIX = ".index.tsv.gz"
TAR_INDEX_FORMAT = "holefill.tar-index.v1"
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
        path = self.url.rstrip("/").lower()
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


@dataclass(frozen=True)
class SourceListing:
    """The sorted items of a source and the description recorded in the manifest."""

    items: list[SourceItem]
    description: SourceDescription


def key_for_path(path: str) -> str:
    """Sample key of a relative path: extension dropped, ``/``, dots and other unsafe characters -> ``_``."""
    relative = path.strip().lstrip("/")
    stem, _ = posixpath.splitext(relative)
    if not stem or stem.endswith("/"):
        raise ValueError(f"cannot derive a sample key from path {path!r}: no file name")
    return _KEY_UNSAFE.sub("_", stem)


def _check_unique(items: Iterable[SourceItem]) -> list[SourceItem]:
    by_key: dict[str, SourceItem] = {}
    for item in items:
        other = by_key.get(item.key)
        if other is not None:
            raise ValueError(f"key collision: {other.path!r} and {item.path!r} both map to key {item.key!r}")
        by_key[item.key] = item
    return sorted(by_key.values(), key=lambda item: item.key)


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
    """``relative path -> info`` of every file under ``url`` (one recursive listing)."""
    fs, root = url_to_fs(url, storage_options)
    root = root.rstrip("/")
    found = fs.find(root, detail=True)
    return {posixpath.relpath(path, root): info for path, info in found.items() if info.get("type") != "directory"}


def _listing_digest(items: Sequence[SourceItem]) -> str:
    digest = hashlib.sha256()
    for item in items:
        digest.update(f"{item.path}\t{item.size if item.size is not None else ''}\n".encode())
    return digest.hexdigest()


def _has_extension(path: str, extensions: Sequence[str]) -> bool:
    return path.lower().endswith(tuple(ext.lower() for ext in extensions))


def _list_file_list(source: SourceSettings, storage_options: StorageOptionsLike) -> SourceListing:
    raw = read_bytes(source.url, storage_options)
    root = source.root or posixpath.dirname(source.url.rstrip("/")) or "."
    entries = parse_file_list(raw.decode("utf-8"))
    infos = _listing(root, storage_options) if source.stat else {}
    items = []
    for path, label in entries:
        relative = path.lstrip("/")
        info = infos.get(relative, {})
        items.append(
            SourceItem(
                key=key_for_path(relative),
                path=relative,
                url=join_url(root, relative),
                label=label,
                mtime=_mtime_of(info) if info else None,
                size=int(info["size"]) if "size" in info else None,
            )
        )
    items = _check_unique(items)
    description = SourceDescription(
        kind="file_list", url=source.url, root=root, items=len(items), list_sha256=hashlib.sha256(raw).hexdigest()
    )
    return SourceListing(items, description)


def _list_directory(source: SourceSettings, storage_options: StorageOptionsLike) -> SourceListing:
    root = source.url.rstrip("/")
    items = []
    for relative, info in _listing(root, storage_options).items():
        name = posixpath.basename(relative)
        # Hidden files include holefill's own ".name.tmp-*" temporaries: never inputs.
        if name.startswith(".") or not _has_extension(relative, source.extensions):
            continue
        items.append(
            SourceItem(
                key=key_for_path(relative),
                path=relative,
                url=join_url(root, relative),
                mtime=_mtime_of(info),
                size=int(info["size"]) if "size" in info else None,
            )
        )
    items = _check_unique(items)
    description = SourceDescription(
        kind="directory", url=source.url, root=None, items=len(items), list_sha256=_listing_digest(items)
    )
    return SourceListing(items, description)


@dataclass(frozen=True, slots=True)
class TarMember:
    """A regular file inside a tar archive: where its data starts, how long it is, its time and name."""

    offset: int
    size: int
    mtime: float
    name: str


def _iter_tar_members(handle: IO[bytes]) -> Iterable[tarfile.TarInfo]:
    # Stream mode ("r|"): headers are found by reading forward, never by seeking, so the file object sees one
    # sequential pass and fetches it in read blocks. A 1 MiB buffer keeps Python's per-read cost small.
    archive = tarfile.open(fileobj=handle, mode="r|", bufsize=1 << 20)
    while True:
        member = archive.next()
        if member is None:
            return
        # TarFile keeps every header it has read; for 1.8 M members that is gigabytes. Drop them.
        archive.members = []
        yield member


def _archive_identity(info: dict[str, Any]) -> dict[str, Any]:
    """What identifies one state of an archive: its size and its ETag (object stores) or mtime (files)."""
    etag = info.get("ETag") or info.get("etag")
    return {"size": int(info["size"]), "etag": str(etag).strip('"') if etag else None,
            "mtime": None if etag else _mtime_of(info)}


def index_url_for(source: SourceSettings) -> str:
    """Where the member index of a tar source is cached: ``index_url``, else beside the archive."""
    return source.index_url or source.url + TAR_INDEX_SUFFIX


def scan_tar(url: str, storage_options: StorageOptionsLike = None, block_size: int = TAR_LIST_BLOCK) -> list[TarMember]:
    """Every regular member of the archive at ``url``, in one sequential pass read in ``block_size`` requests."""
    fs, path = url_to_fs(url, storage_options)
    members: list[TarMember] = []
    with fs.open(path, "rb", block_size=block_size, cache_type="readahead") as handle:
        for member in _iter_tar_members(handle):
            if member.isfile():
                members.append(TarMember(int(member.offset_data), int(member.size), float(member.mtime), member.name))
    return members


def _read_index(url: str, identity: dict[str, Any], storage_options: StorageOptionsLike) -> list[TarMember] | None:
    try:
        lines = gzip.decompress(read_bytes(url, storage_options)).decode("utf-8").split("\n")
        header = json.loads(lines[0])
    except (FileNotFoundError, OSError, EOFError, ValueError):
        return None
    if header.get("format") != TAR_INDEX_FORMAT or header.get("archive") != identity:
        return None
    members = []
    for line in lines[1:]:
        if line:
            offset, size, mtime, name = line.split("\t", 3)
            members.append(TarMember(int(offset), int(size), float(mtime), name))
    return members


def _write_index(url: str, identity: dict[str, Any], members: Sequence[TarMember],
                 storage_options: StorageOptionsLike) -> None:
    header = json.dumps({"format": TAR_INDEX_FORMAT, "archive": identity}, sort_keys=True)
    body = "".join(f"{m.offset}\t{m.size}\t{m.mtime!r}\t{m.name}\n" for m in members)
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
        log.info("tar index of %s read from %s (%d members)", source.url, cache, len(members))
        return members
    started = time.monotonic()
    members = scan_tar(source.url, storage_options)
    log.info("listed %d members of %s in %.1f s; index cached at %s", len(members), source.url,
             time.monotonic() - started, cache)
    _write_index(cache, identity, members, storage_options)
    return members


def _list_tar(source: SourceSettings, storage_options: StorageOptionsLike) -> SourceListing:
    prefix = (source.root or "").strip("/")
    items = []
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
        items.append(
            SourceItem(key=key_for_path(name), path=member.name, url=source.url, mtime=member.mtime,
                       size=member.size, offset=member.offset)
        )
    items = _check_unique(items)
    description = SourceDescription(
        kind="tar", url=source.url, root=prefix or None, items=len(items), list_sha256=_listing_digest(items)
    )
    return SourceListing(items, description)


def list_source(source: SourceSettings, storage_options: StorageOptionsLike = None) -> SourceListing:
    """Enumerate ``source`` into items sorted by key (unique keys; ``ValueError`` on a collision)."""
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
    relative = missing_path.lstrip("/")
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

    Use as a context manager inside one task. Raises ``FileNotFoundError`` for a missing file and whatever the
    storage raised for a failed read (the caller decides what is transient: :func:`pipeline.fsutil.is_transient`).
    """

    def __init__(self, storage_options: StorageOptionsLike = None):
        self._storage_options = storage_options
        self._archives: dict[str, IO[bytes]] = {}

    def read(self, item: SourceItem) -> bytes:
        """The encoded image bytes of ``item``."""
        fs, path = url_to_fs(item.url, self._storage_options)
        if item.offset is None:
            return fs.cat_file(path)
        handle = self._archives.get(item.url)
        if handle is None:
            handle = self._archives[item.url] = fs.open(path, "rb", block_size=_TAR_READ_BLOCK)
        try:
            handle.seek(item.offset)
            data = handle.read(item.size or 0)
            if len(data) != (item.size or 0):
                raise EOFError(f"{item.url}: member {item.path} ends early ({len(data)} of {item.size} bytes)")
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
