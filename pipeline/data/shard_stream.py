"""The shard stream: which shards to read, and their samples read safely, checked and resumed after a failed read.

A shard sample is three tar members sharing a key: ``KEY.jpg`` (RGB JPEG), ``KEY.mask.png`` (8-bit gray, 255 = hole,
image-sized) and ``KEY.json`` (metadata). Reading a shard (:func:`read_shard`, the first stage of both loaders in
:mod:`pipeline.data.loaders`)

* goes through fsspec (local paths, ``file://``, ``s3://``, ...; webdataset has no S3 of its own),
* pulls only whitelisted members out of the tar stream (:data:`MEMBER_WHITELIST`) with holefill's lean header
  parser (:func:`pipeline.data.tario.tar_members`: 80 vs 472 us per sample for webdataset's ``tarfile``-based
  ``tar_file_iterator``, 5.9x, bench/loader.py); anything else, a ``.pyd`` or ``.pth`` in particular, is skipped
  without being read into memory, so nothing in a shard is ever unpickled,
* retries a read that fails transiently (throttling, 5xx, resets) with :func:`pipeline.fsutil.retry_stream`,
  resuming after the members already read, and checks each shard against the size (and, on request, sha256)
  its manifest lists.

:func:`decode_sample` decodes a sample with explicit handlers (PIL for the JPEG,
:func:`pipeline.data.imageops.decode_mask_png` for the mask; ``json.loads``), never webdataset's default decoders.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

import numpy as np
import webdataset as wds
from PIL import Image
from webdataset.tariterators import base_plus_ext, group_by_keys

from pipeline.data.imageops import decode_mask_png
from pipeline.data.manifest import load_manifest
from pipeline.data.tario import tar_members
from pipeline.errors import one_line
from pipeline.fsutil import ReadRetry, StorageOptionsLike, open_url, retry_stream
from pipeline.redaction import redact

__all__ = [
    "MEMBER_WHITELIST",
    "DecodedSample",
    "ShardRef",
    "ShardSamples",
    "Verify",
    "decode_sample",
    "read_shard",
    "resolve_shard_urls",
    "resolve_shards",
]

log = logging.getLogger(__name__)

# The only tar members a loader reads. Extensions are everything after the key's first dot, lowercased.
MEMBER_WHITELIST: frozenset[str] = frozenset({"jpg", "mask.png", "json"})

Verify = Literal["none", "size", "sha256"]
_DRAIN_CHUNK = 1 << 20

# A resampled stream that keeps drawing shards with no usable sample would spin forever; give up after
# this many shards in a row (times the number of distinct shards) produced nothing.
_EMPTY_SHARD_PATIENCE = 3


# --------------------------------------------------------------------------------------------------
# Shard lists
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardRef:
    """A shard to read: its URL and, when it comes from a manifest, the size and sha256 it must have."""

    url: str
    bytes: int | None = None
    sha256: str | None = None


def resolve_shards(shards: str | Sequence[str], storage_options: StorageOptionsLike = None) -> list[ShardRef]:
    """The shards to read: a list as given, a brace pattern / single ``.tar``, or a manifest URL.

    A string ending in ``.tar`` (optionally with ``{000..009}`` braces) names shards directly; any
    other string is a manifest file or dataset folder read with ``pipeline.data.manifest.load_manifest``,
    and its shards carry the size and sha256 the manifest records, which the loaders verify as they read.
    """
    if isinstance(shards, str):
        if shards.endswith(".tar"):
            refs = [ShardRef(url) for url in wds.shardlists.expand_urls(shards)]
        else:
            manifest = load_manifest(shards, storage_options)
            refs = [ShardRef(url, entry.bytes, entry.sha256)
                    for entry, url in zip(manifest.shards, manifest.shard_urls())]
    else:
        refs = [ref if isinstance(ref, ShardRef) else ShardRef(str(ref)) for ref in shards]
    if not refs:
        raise ValueError("shard list is empty: a loader needs at least one shard")
    return refs


def resolve_shard_urls(shards: str | Sequence[str], storage_options: StorageOptionsLike = None) -> list[str]:
    """The URLs of :func:`resolve_shards`."""
    return [ref.url for ref in resolve_shards(shards, storage_options)]


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def _is_whitelisted(fname: str) -> bool:
    _, suffix = base_plus_ext(fname)
    return suffix is not None and suffix.lower() in MEMBER_WHITELIST


class _CountingStream:
    """Read-through wrapper counting (and optionally hashing) the bytes of a shard as the loader reads them.

    Hashing needs every byte, so a hashing stream does not seek: members the loader skips are read and dropped.
    """

    def __init__(self, stream: Any, hashing: bool) -> None:
        self._stream = stream
        self._digest = hashlib.sha256() if hashing else None
        self._counted = 0

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self._counted += len(data)
        if self._digest is not None:
            self._digest.update(data)
        return data

    def seekable(self) -> bool:
        return self._digest is None and self._stream.seekable()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._counted = self._stream.seek(offset, whence)
        return self._counted

    def check(self, ref: ShardRef) -> None:
        """Read to the end; ``ValueError`` naming the shard when its size or sha256 is not the manifest's."""
        while self.read(_DRAIN_CHUNK):
            pass
        size = self._counted
        if ref.bytes is not None and size != ref.bytes:
            raise ValueError(f"shard {ref.url} is {size} bytes, its manifest says {ref.bytes}: not the published shard")
        if self._digest is not None and ref.sha256 is not None and self._digest.hexdigest() != ref.sha256:
            raise ValueError(f"shard {ref.url}: sha256 differs from its manifest: not the published shard")


def _members_once(ref: ShardRef, storage_options: StorageOptionsLike, verify: Verify) -> Iterator[dict]:
    """One read of the shard: its whitelisted members, then the check against its manifest (``verify``)."""
    with open_url(ref.url, "rb", storage_options) as raw:
        stream = _CountingStream(raw, hashing=verify == "sha256")
        for name, data in tar_members(stream, _is_whitelisted):
            yield {"fname": name, "data": data, "__url__": ref.url}
        if verify != "none":
            stream.check(ref)


def read_shard(ref: ShardRef, storage_options: StorageOptionsLike, handler: Callable[[Exception], bool],
               retry: ReadRetry, verify: Verify) -> Iterator[dict]:
    """Raw samples of one shard (whitelisted members only, as bytes), grouped by key.

    A read that fails transiently (:func:`pipeline.fsutil.is_transient`: throttling, 5xx, resets, timeouts) is
    retried with backoff and jitter (:func:`pipeline.fsutil.retry_stream`), each retry logged as a warning, and
    resumes after the members already yielded (no sample twice). A shard that is corrupt part way, or does not
    match its manifest (``verify``), or whose retries ran out, yields its samples up to there, then ``handler``
    decides: ``True`` skips the rest of the shard, ``False`` (or raising) stops the loader. Errors name the shard;
    a damaged tar structure is one :class:`pipeline.data.tario.TarFormatError` naming the shard and the offset,
    raised as soon as the parser meets it (never retried: the same bytes fail the same way).
    """

    def members() -> Iterator[dict]:
        yielded = 0

        def log_retry(attempt: int, exc: BaseException, delay: float) -> None:
            log.warning("shard %s: read failed (%s); retry %d/%d in %.1f s, resuming after %d members",
                        ref.url, one_line(exc, 200, typed=True), attempt, retry.attempts - 1, delay, yielded)

        try:
            for member in retry_stream(lambda: _members_once(ref, storage_options, verify), ref.url, retry,
                                       on_retry=log_retry):
                yielded += 1
                yield member
        except Exception as exc:
            if redact(ref.url) not in str(exc):  # a TransientReadError names it already
                exc.args = (f"shard {redact(ref.url)}: {exc}",)  # a TarFormatError keeps its type and offset
            if not handler(exc):
                raise exc

    # Grouping per shard: a key can never merge with a same-named key of the next shard.
    yield from group_by_keys(members(), handler=handler)


@dataclass
class ShardSamples:
    """Loader stage: raw samples of each shard named by the stream of ``{"url": ...}`` (webdataset's
    ``ResampledShards``), an unreadable or bad shard skipped by ``handler`` (picklable: it travels to workers).

    A resampled stream that keeps drawing shards with no usable sample would spin forever: it stops after
    :data:`_EMPTY_SHARD_PATIENCE` times the shard count in a row produced nothing.
    """

    shards: dict[str, ShardRef]
    storage_options: StorageOptionsLike
    retry: ReadRetry
    verify: Verify
    handler: Callable[[Exception], bool]

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        empty_streak = 0
        for drawn in src:
            ref = self.shards[drawn["url"]]
            produced = 0
            for sample in read_shard(ref, self.storage_options, self.handler, self.retry, self.verify):
                produced += 1
                yield sample
            empty_streak = 0 if produced else empty_streak + 1
            if empty_streak > _EMPTY_SHARD_PATIENCE * len(self.shards):
                raise RuntimeError(f"{empty_streak} shards in a row held no samples (last: {ref.url})")


# --------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------


def _decode_rgb(data: bytes) -> np.ndarray:
    im = Image.open(io.BytesIO(data), formats=("JPEG",))
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im)


@dataclass(frozen=True)
class DecodedSample:
    """One shard sample in memory: uint8 RGB ``image`` (H, W, 3), uint8 ``mask`` (H, W) 255 = hole."""

    key: str
    image: np.ndarray
    mask: np.ndarray
    meta: dict


def decode_sample(sample: Mapping[str, Any]) -> DecodedSample:
    """Decode a raw shard sample (``jpg``, ``mask.png``, optional ``json``) with explicit handlers."""
    key = str(sample.get("__key__", "?"))
    missing = [name for name in ("jpg", "mask.png") if name not in sample]
    if missing:
        raise ValueError(f"sample {key}: missing member(s) {', '.join(missing)}")
    image = _decode_rgb(sample["jpg"])
    mask = decode_mask_png(sample["mask.png"])
    if mask.shape != image.shape[:2]:
        raise ValueError(f"sample {key}: mask {mask.shape} does not match image {image.shape[:2]}")
    meta = json.loads(sample["json"]) if "json" in sample else {}
    return DecodedSample(key, image, mask, meta)
