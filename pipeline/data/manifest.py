"""The shard manifest: the one file readers trust to know what a dataset version holds.

``manifest.json`` sits beside the shards. It records the format id and schema version, the dataset version,
when it was written, where the images came from (and the hash of the file list), the full job config (storage
secrets and the output location excluded, so a copied dataset keeps its identity), every shard (URL relative
to the manifest, sample count, bytes, sha256), totals, rejected inputs with reasons, the hole-ratio histogram
and a watermark of what was ingested, for incremental runs. Readers use :meth:`Manifest.shard_urls`, never
a directory listing, so stray temporaries or half-written shards can never leak into training.

:func:`manifest_hash` identifies a dataset by content: sha256 of the canonical JSON without the creation time.
A pinned evaluation set is named by this hash.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
from datetime import datetime, timezone
from typing import Any, Iterable, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from pipeline.buckets import BUCKET_NAMES, HOLE_RATIO_BUCKETS, bucket_of
from pipeline.config import first_error
from pipeline.fsutil import (
    StorageOptionsLike,
    join_url,
    parent_url,
    publish_bytes,
    read_bytes,
    sha256_of_url,
    size_of_url,
)

__all__ = [
    "FORMAT_ID",
    "MANIFEST_NAME",
    "SCHEMA_VERSION",
    "WIDS_INDEX_NAME",
    "HoleRatioHistogram",
    "Manifest",
    "ManifestError",
    "ParentRef",
    "RejectedInput",
    "ShardEntry",
    "SourceDescription",
    "Watermark",
    "canonical_json",
    "keys_digest",
    "load_manifest",
    "manifest_hash",
    "manifest_keys",
    "manifest_url_for",
    "read_keys",
    "require_samples",
    "verify_shards",
    "wids_index",
    "write_keys",
    "write_manifest",
]

FORMAT_ID = "holefill.shards"
SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
KEYS_NAME = "keys.txt.gz"
# webdataset's wids shard index (what its ``widsindex create`` writes, under the name it defaults to), beside the
# manifest: random-access readers (``wids.ShardListDataset("…/shardindex.json")``) open the shards without a pass of
# their own. Shard URLs are the manifest's: relative to the index's folder, which is how wids resolves them.
WIDS_INDEX_NAME = "shardindex.json"
WIDS_INDEX_KIND = "wids-shard-index-v1"
FINE_BIN_WIDTH = 0.05
FINE_BINS = 20  # FINE_BINS * FINE_BIN_WIDTH == 1.0
BELOW = "below"  # hole ratio <= the first bucket's lower edge
ABOVE = "above"  # hole ratio > the last bucket's upper edge


class ManifestError(ValueError):
    """A manifest that cannot be read or does not follow the schema."""


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ShardEntry(_Record):
    """One published shard. ``url`` is relative to the manifest's folder unless it is absolute."""

    url: str
    samples: int = Field(ge=0)
    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class RejectedInput(_Record):
    """An input the job skipped, and why (``missing``, ``empty``, ``not_an_image``, ``truncated`` …)."""

    key: str
    source: str
    reason: str
    detail: str = ""


class SourceDescription(_Record):
    """Where the images came from."""

    kind: Literal["file_list", "directory", "tar"]
    url: str
    root: str | None = None
    items: int = Field(ge=0)
    list_sha256: str = Field(description="sha256 of the file list, or of the sorted item listing")


class Watermark(_Record):
    """What has been ingested up to this version (cumulative over parents), for incremental runs.

    ``keys_file`` (relative to the manifest) lists every ingested key, rejected ones included so that a bad
    file is not retried by every later run; ``keys_sha256`` is the hash of that list (see :func:`keys_digest`).
    """

    keys_count: int = Field(ge=0)
    max_mtime: float | None = None
    keys_sha256: str
    keys_file: str | None = KEYS_NAME


class HoleRatioHistogram(_Record):
    """Counts of samples per hole-ratio bucket (``pipeline.buckets`` plus below/above) and per fine bin."""

    buckets: dict[str, int]
    fine_bin_width: float = FINE_BIN_WIDTH
    fine_counts: list[int]

    @classmethod
    def empty(cls) -> "HoleRatioHistogram":
        return cls(buckets={name: 0 for name in (BELOW, *BUCKET_NAMES, ABOVE)}, fine_counts=[0] * FINE_BINS)

    @classmethod
    def of(cls, ratios: Iterable[float]) -> "HoleRatioHistogram":
        """Histogram of a sequence of hole ratios in [0, 1]."""
        buckets = {name: 0 for name in (BELOW, *BUCKET_NAMES, ABOVE)}
        fine = [0] * FINE_BINS
        for ratio in ratios:
            if math.isnan(ratio) or not 0.0 <= ratio <= 1.0:
                raise ValueError(f"hole ratio must lie in [0, 1], got {ratio}")
            name = bucket_of(ratio)
            if name is None:
                name = BELOW if ratio <= HOLE_RATIO_BUCKETS[0][0] else ABOVE
            buckets[name] += 1
            fine[min(int(ratio / FINE_BIN_WIDTH), FINE_BINS - 1)] += 1
        return cls(buckets=buckets, fine_counts=fine)

    def __add__(self, other: "HoleRatioHistogram") -> "HoleRatioHistogram":
        if self.fine_bin_width != other.fine_bin_width or len(self.fine_counts) != len(other.fine_counts):
            raise ValueError("histograms with different fine bins cannot be added")
        names = dict.fromkeys([*self.buckets, *other.buckets])
        return HoleRatioHistogram(
            buckets={n: self.buckets.get(n, 0) + other.buckets.get(n, 0) for n in names},
            fine_bin_width=self.fine_bin_width,
            fine_counts=[a + b for a, b in zip(self.fine_counts, other.fine_counts)],
        )

    @property
    def total(self) -> int:
        return sum(self.fine_counts)


class ParentRef(_Record):
    """The version an incremental manifest extends (its shards are listed again in the child)."""

    url: str
    dataset_version: str
    manifest_hash: str


class Manifest(_Record):
    """Schema version 1 of ``manifest.json``. Build with keyword arguments; read with :func:`load_manifest`."""

    format: Literal["holefill.shards"] = FORMAT_ID
    schema_version: Literal[1] = SCHEMA_VERSION
    kind: Literal["train", "eval"]
    dataset_version: str = Field(min_length=1)
    created_at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    source: SourceDescription
    config: dict[str, Any]
    shards: list[ShardEntry]
    total_samples: int = Field(ge=0)
    total_bytes: int = Field(ge=0)
    rejected: list[RejectedInput] = []
    hole_ratio_histogram: HoleRatioHistogram
    eval_buckets: dict[str, int] | None = Field(
        default=None, description="eval sets: samples per hole-ratio bucket (the balance achieved)"
    )
    watermark: Watermark
    parent: ParentRef | None = None
    plan_sha256: str | None = Field(
        default=None, pattern=r"^[0-9a-f]{64}$",
        description="what the run that wrote this version was asked to do (config, inputs, parent): a re-run with "
        "the same fingerprint resumes this version in place, any other run writes beside it",
    )

    # Where the manifest was read from / written to; shard URLs resolve against its folder. Not serialised.
    _location: str | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _totals_agree(self) -> "Manifest":
        samples = sum(s.samples for s in self.shards)
        if samples != self.total_samples:
            raise ValueError(f"total_samples {self.total_samples} != sum of shard samples {samples}")
        size = sum(s.bytes for s in self.shards)
        if size != self.total_bytes:
            raise ValueError(f"total_bytes {self.total_bytes} != sum of shard bytes {size}")
        urls = [s.url for s in self.shards]
        if len(set(urls)) != len(urls):
            raise ValueError("a shard URL is listed twice")
        return self

    @property
    def location(self) -> str | None:
        """URL of this manifest file, when it was loaded or written (``None`` for an unsaved one)."""
        return self._location

    def with_location(self, url: str) -> "Manifest":
        """This manifest bound to ``url`` (a manifest file URL), so relative shard URLs can be resolved."""
        self._location = str(url)
        return self

    def _folder(self) -> str:
        if self._location is None:
            raise ManifestError("manifest has no location: load it with load_manifest or write it first")
        return parent_url(self._location)

    def shard_urls(self) -> list[str]:
        """Absolute URL of every shard, in manifest order (relative names resolved against its folder)."""
        folder = self._folder()
        return [join_url(folder, shard.url) for shard in self.shards]

    def keys_url(self) -> str | None:
        """Absolute URL of the ingested-keys list of the watermark, if the manifest has one."""
        if self.watermark.keys_file is None:
            return None
        return join_url(self._folder(), self.watermark.keys_file)

    @property
    def hash(self) -> str:
        return manifest_hash(self)


def canonical_json(data: Any) -> str:
    """JSON with sorted keys and no insignificant whitespace: equal data gives equal text."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def manifest_hash(manifest: Manifest) -> str:
    """sha256 of the canonical JSON of ``manifest`` without its creation time (content identity)."""
    data = manifest.model_dump(mode="json", exclude={"created_at"})
    return hashlib.sha256(canonical_json(data).encode()).hexdigest()


def manifest_url_for(url: str) -> str:
    """``url`` itself when it names a ``.json`` file, else ``url/manifest.json`` (a dataset folder)."""
    url = str(url)
    return url if url.endswith(".json") else join_url(url.rstrip("/"), MANIFEST_NAME)


def load_manifest(url: str, storage_options: StorageOptionsLike = None) -> Manifest:
    """Read and validate a manifest from a manifest file URL or a dataset folder URL."""
    location = manifest_url_for(url)
    try:
        raw = read_bytes(location, storage_options)
    except FileNotFoundError:
        raise ManifestError(f"no manifest at {location}") from None
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"manifest {location} is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_ID:
        raise ManifestError(f"manifest {location}: format must be {FORMAT_ID!r}")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise ManifestError(
            f"manifest {location}: schema_version {data.get('schema_version')!r} is not supported "
            f"(this holefill reads {SCHEMA_VERSION})"
        )
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        where, msg = first_error(exc, Manifest)
        raise ManifestError(f"manifest {location}: {where}: {msg}") from None
    return manifest.with_location(location)


def require_samples(manifest: Manifest, key: str) -> Manifest:
    """``manifest`` itself when it holds samples; else a one-line ``ManifestError`` naming config ``key``.

    Training on an empty dataset would start every worker only to wait forever for a first batch.
    """
    if manifest.total_samples == 0:
        rejected = f", {len(manifest.rejected)} inputs rejected" if manifest.rejected else ""
        raise ManifestError(
            f"config key {key}: manifest {manifest.location} holds no samples ({len(manifest.shards)} shards"
            f"{rejected}); shard a dataset with images first"
        )
    return manifest


def manifest_bytes(manifest: Manifest) -> bytes:
    """The on-disk form: indented, key-sorted JSON (stable across runs, readable in a review)."""
    data = manifest.model_dump(mode="json")
    return (json.dumps(data, sort_keys=True, indent=1, ensure_ascii=False, allow_nan=False) + "\n").encode()


def wids_index(manifest: Manifest) -> bytes:
    """The wids shard index of ``manifest``'s shards (``url``, ``nsamples``, ``filesize`` each, in manifest order),
    named after its dataset version; key-sorted JSON, so the same manifest gives the same bytes."""
    shards = [{"url": shard.url, "nsamples": shard.samples, "filesize": shard.bytes} for shard in manifest.shards]
    index = {"__kind__": WIDS_INDEX_KIND, "wids_version": 1, "name": manifest.dataset_version, "shardlist": shards}
    return (json.dumps(index, sort_keys=True, indent=1, ensure_ascii=False) + "\n").encode()


def write_manifest(manifest: Manifest, url: str, storage_options: StorageOptionsLike = None) -> str:
    """Publish ``manifest`` atomically at ``url`` (file or folder URL); returns the manifest file URL.

    Its wids index (:data:`WIDS_INDEX_NAME`, :func:`wids_index`) is published first, beside it and as durably: a
    manifest is never visible without its index."""
    location = manifest_url_for(url)
    publish_bytes(join_url(parent_url(location), WIDS_INDEX_NAME), wids_index(manifest), storage_options)
    publish_bytes(location, manifest_bytes(manifest), storage_options)
    manifest.with_location(location)
    return location


def keys_digest(keys: Iterable[str]) -> str:
    """sha256 over sorted, newline-terminated keys (order-independent identity of a key set)."""
    digest = hashlib.sha256()
    for key in sorted(keys):
        digest.update(key.encode())
        digest.update(b"\n")
    return digest.hexdigest()


def write_keys(keys: Iterable[str], url: str, storage_options: StorageOptionsLike = None) -> str:
    """Publish the sorted key list (gzip, fixed header time so reruns are byte-identical); returns its digest."""
    ordered = sorted(set(keys))
    text = "".join(f"{key}\n" for key in ordered).encode()
    publish_bytes(url, gzip.compress(text, compresslevel=6, mtime=0), storage_options)
    return keys_digest(ordered)


def read_keys(url: str, storage_options: StorageOptionsLike = None, *, expected_sha256: str | None = None) -> set[str]:
    """The key set written by :func:`write_keys`; with ``expected_sha256``, checked against that digest.

    A list whose digest differs (rewritten by another run, damaged, cut short) raises a one-line
    :class:`ManifestError` naming the file: an incremental run must never trust a key list its manifest does not.
    """
    try:
        keys = set(gzip.decompress(read_bytes(url, storage_options)).decode().split())
    except (EOFError, gzip.BadGzipFile, UnicodeDecodeError) as exc:
        raise ManifestError(f"key list {url} is unreadable ({exc})") from None
    if expected_sha256 is not None and keys_digest(keys) != expected_sha256:
        raise ManifestError(f"key list {url} does not match its manifest's keys_sha256 ({len(keys)} keys, "
                            f"sha256 {keys_digest(keys)[:12]}… != {expected_sha256[:12]}…)")
    return keys


def manifest_keys(manifest: Manifest, storage_options: StorageOptionsLike = None) -> set[str]:
    """Every key the watermark of ``manifest`` lists, read from its key file and verified against it."""
    url = manifest.keys_url()
    if url is None:
        raise ManifestError(f"manifest {manifest.location} has no key list (watermark.keys_file)")
    return read_keys(url, storage_options, expected_sha256=manifest.watermark.keys_sha256)


def verify_shards(
    manifest: Manifest, storage_options: StorageOptionsLike = None, *, check_sha256: bool = True
) -> list[str]:
    """Problems found comparing the manifest with the shards it lists (empty list: all shards verify)."""
    problems: list[str] = []
    for entry, url in zip(manifest.shards, manifest.shard_urls()):
        try:
            size = size_of_url(url, storage_options)
        except FileNotFoundError:
            problems.append(f"{url}: missing")
            continue
        if size != entry.bytes:
            problems.append(f"{url}: {size} bytes, manifest says {entry.bytes}")
        elif check_sha256 and sha256_of_url(url, storage_options) != entry.sha256:
            problems.append(f"{url}: sha256 differs from the manifest")
    return problems


def combine_histograms(histograms: Sequence[HoleRatioHistogram]) -> HoleRatioHistogram:
    """Sum of several histograms (an empty sequence gives the empty histogram)."""
    total = HoleRatioHistogram.empty()
    for histogram in histograms:
        total = total + histogram
    return total

