"""fsspec helpers shared by the data pipeline: open URLs, join them, publish files atomically, hash them.

Every function takes a URL (a local path, ``file://…`` or ``s3://…``) plus optional storage options. Storage
options are only handed to the filesystem they belong to: a local path never receives S3 credentials, so one
options object can travel with a job whose source is local and whose destination is on S3.

Atomic publication (:func:`atomic_write`) writes to a temporary name *in the destination folder* and then
moves it into place. What "atomic" means differs per backend:

* local / ``file://``: the temporary is ``fsync``'d, the move is ``os.replace`` on the same filesystem and the
  folder is ``fsync``'d after it, so readers see either no file or the complete file, never a prefix, and after
  a power loss the name holds the whole file (never 0 bytes). A crash leaves at most a ``.tmp-*`` file behind.
* S3: an object only becomes visible when its upload completes (single PUT or completed multipart upload),
  so a reader never sees a partial object. The move is a server-side copy followed by a delete of the
  temporary key; a crash between the two leaves a stray ``.tmp-*`` object and the complete final object.
  Readers of holefill data follow the manifest, never listings, so stray temporaries are harmless.

Reads that fail for a passing reason (throttling, 5xx, timeouts, connection resets, truncated bodies) are
not the data's fault. They are retried in three layers: botocore's own retries of each S3 request
(``StorageSettings.retry_mode``, ``adaptive`` by default: exponential backoff with jitter plus client-side
rate limiting after throttling), s3fs's retries of throttling and payload errors around them, and
:func:`with_retries` around a whole read, or :func:`retry_stream` around a streamed one, resuming where it broke
(exponential backoff with full jitter, :class:`ReadRetry`; one loop serves both). When
those run out, :class:`TransientReadError` names the object and the error: the caller fails, it never
mistakes the object for a bad input. :func:`is_transient` is the one rule for which errors are passing ones.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import logging
import os
import posixpath
import random
import time
import uuid
from typing import IO, Any, Callable, Iterable, Iterator, Literal, Mapping, TypeVar

import fsspec
from fsspec.core import url_to_fs as _fsspec_url_to_fs
from pydantic import Field, SecretStr

from pipeline.config import Config
from pipeline.errors import one_line
from pipeline.redaction import redact

__all__ = [
    "ReadRetry",
    "StorageSettings",
    "TransientReadError",
    "atomic_write",
    "exists",
    "fsync_file",
    "fsync_folder",
    "is_remote",
    "join_url",
    "open_url",
    "parent_url",
    "protocol_of",
    "publish_bytes",
    "read_bytes",
    "retry_stream",
    "sha256_of_url",
    "size_of_url",
    "url_to_fs",
    "with_retries",
    "is_transient",
]

log = logging.getLogger("holefill.storage")
T = TypeVar("T")

TEMP_MARKER = ".tmp-"
_LOCAL_PROTOCOLS = frozenset({"file", "local"})
_CHUNK = 1 << 20


class StorageSettings(Config):
    """Credentials and endpoint for object storage (S3 or an S3-compatible server).

    The secret is a :class:`pydantic.SecretStr`, so printing or logging a config never shows it.
    """

    endpoint_url: str | None = None
    key: str | None = None
    secret: SecretStr | None = None
    region: str | None = None
    anon: bool = False
    retry_mode: Literal["adaptive", "standard", "legacy"] = Field(
        default="adaptive", description="botocore retry mode of every S3 request (adaptive: backoff + rate limiting)"
    )
    max_attempts: int = Field(default=8, ge=1, le=50, description="botocore attempts per S3 request")

    def for_s3fs(self) -> dict[str, Any]:
        """Keyword arguments for ``s3fs.S3FileSystem`` (the only place the secret is revealed)."""
        options: dict[str, Any] = {}
        if self.anon:
            options["anon"] = True
        if self.key is not None:
            options["key"] = self.key
        if self.secret is not None:
            options["secret"] = self.secret.get_secret_value()
        client_kwargs: dict[str, Any] = {}
        if self.endpoint_url:
            client_kwargs["endpoint_url"] = self.endpoint_url
        if self.region:
            client_kwargs["region_name"] = self.region
        if client_kwargs:
            options["client_kwargs"] = client_kwargs
        options["config_kwargs"] = {"retries": {"mode": self.retry_mode, "max_attempts": self.max_attempts}}
        return options


class ReadRetry(Config):
    """Retries of a whole read that failed for a passing reason, after the storage client's own retries.

    Attempt ``n`` (1-based) that fails waits a uniformly random time in ``[0, min(max_backoff_s, backoff_s *
    2**(n-1))]`` ("full jitter": many readers hitting one throttled bucket spread out instead of retrying in step).
    """

    attempts: int = Field(default=5, ge=1, le=100, description="tries of one read before the job fails")
    backoff_s: float = Field(default=1.0, ge=0.0, description="first backoff ceiling in seconds (doubles per try)")
    max_backoff_s: float = Field(default=30.0, ge=0.0, description="largest backoff ceiling in seconds")

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt ``attempt`` (1-based)."""
        ceiling = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
        return (rng or random).uniform(0.0, ceiling)


class TransientReadError(OSError):
    """A read that kept failing for a passing reason (throttling, 5xx, reset, timeout) after every retry.

    Not a bad input: a job that meets it publishes nothing and a re-run resumes. ``str()`` is one line, with the
    URL's credentials redacted (it reaches job logs and manifests' failure lines).
    """

    def __init__(self, url: str, cause: BaseException, attempts: int) -> None:
        self.url, self.cause, self.attempts = redact(url), redact(one_line(cause, 300, typed=True)), attempts
        super().__init__(f"reading {self.url} failed {attempts} times ({self.cause})")

    def __reduce__(self):  # crosses process boundaries (Ray tasks) intact
        return (_rebuild_transient, (self.url, self.cause, self.attempts))


def _rebuild_transient(url: str, cause: str, attempts: int) -> "TransientReadError":
    error = TransientReadError.__new__(TransientReadError)
    error.url, error.cause, error.attempts = url, cause, attempts
    OSError.__init__(error, f"reading {url} failed {attempts} times ({cause})")
    return error


# errno values of OSErrors that say something about the object, not about the connection to it.
_PERMANENT_ERRNOS = frozenset({errno.ENOENT, errno.EISDIR, errno.ENOTDIR, errno.EACCES, errno.EPERM, errno.EINVAL,
                               errno.ENAMETOOLONG})


def is_transient(exc: BaseException) -> bool:
    """True when ``exc`` from a read is a passing failure worth retrying, not a fact about the object.

    Passing: timeouts, connection errors and resets, 5xx/throttling answers (s3fs raises them as ``OSError``
    with ``EBUSY``/``EREMOTEIO``), truncated bodies (``EOFError``, aiohttp payload errors, botocore streaming
    errors). Permanent: a missing object, a directory, access denied, invalid arguments, and everything that is
    not an I/O error (a decode failure is the data's fault). ``TransientReadError`` itself is not retried again.
    """
    if isinstance(exc, (TransientReadError, io.UnsupportedOperation)):  # the latter: a programming error
        return False
    if isinstance(exc, (TimeoutError, ConnectionError, EOFError)):
        return True
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
        return False
    if isinstance(exc, OSError):
        return exc.errno not in _PERMANENT_ERRNOS
    module = type(exc).__module__.split(".", 1)[0]
    if module == "aiohttp":  # ClientPayloadError, ServerDisconnectedError, ClientConnectionError ...
        return True
    if module == "botocore":
        name = type(exc).__name__
        return name in {"ResponseStreamingError", "IncompleteReadError", "ReadTimeoutError", "ConnectTimeoutError",
                        "EndpointConnectionError", "ConnectionClosedError", "HTTPClientError"}
    return False


def retry_stream(items: Callable[[], Iterable[T]], url: str, policy: ReadRetry | None = None, *,
                 sleep: Callable[[float], None] = time.sleep,
                 on_retry: Callable[[int, BaseException, float], None] | None = None) -> Iterator[T]:
    """The items of ``items()``, which reads ``url``; a read that fails transiently (:func:`is_transient`) part way
    is started again with backoff and jitter and resumes after the items already yielded (none twice).

    The one retry loop of holefill's reads (:func:`with_retries` is its one-item case). Permanent errors propagate
    unchanged at once; when ``policy.attempts`` tries all failed transiently, raises :class:`TransientReadError`
    naming ``url``. Each retry is logged as a warning, or passed to ``on_retry(attempt, error, delay)``.
    """
    policy = policy or ReadRetry()
    yielded = 0
    for attempt in range(1, policy.attempts + 1):
        stream: Iterable[T] = ()
        try:
            stream = items()
            for index, item in enumerate(stream):
                if index >= yielded:  # items before were yielded by an earlier attempt
                    yielded += 1
                    yield item
            return
        except Exception as exc:
            if not is_transient(exc):
                raise
            if attempt == policy.attempts:
                raise TransientReadError(url, exc, attempt) from exc
            delay = policy.delay(attempt)
            if on_retry is not None:
                on_retry(attempt, exc, delay)
            else:
                log.warning("reading %s failed (%s); retry %d/%d in %.1f s", redact(url),
                            redact(one_line(exc, 200, typed=True)), attempt, policy.attempts - 1, delay)
            sleep(delay)
        finally:
            close = getattr(stream, "close", None)
            if close is not None:  # a generator: release what it opened now, not when it is collected
                close()
    raise AssertionError("unreachable")


def with_retries(read: Callable[[], T], url: str, policy: ReadRetry | None = None, *,
                 sleep: Callable[[float], None] = time.sleep,
                 on_retry: Callable[[int, BaseException, float], None] | None = None) -> T:
    """``read()``, retried with backoff and jitter while it fails transiently (:func:`retry_stream` of one item).

    Permanent errors propagate unchanged at once. When ``policy.attempts`` tries all failed transiently, raises
    :class:`TransientReadError` naming ``url``. Each retry is logged as a warning (or passed to ``on_retry``).
    """
    (value,) = retry_stream(lambda: (read(),), url, policy, sleep=sleep, on_retry=on_retry)
    return value


StorageOptionsLike = StorageSettings | Mapping[str, Any] | None


def protocol_of(url: str) -> str:
    """The URL's protocol (``"file"`` for plain paths)."""
    head, sep, _ = str(url).partition("://")
    return head.lower() if sep else "file"


def is_remote(url: str) -> bool:
    """True when ``url`` is not on the local filesystem."""
    return protocol_of(url) not in _LOCAL_PROTOCOLS


def _options_for(url: str, storage_options: StorageOptionsLike) -> dict[str, Any]:
    # Local paths never get credentials: LocalFileSystem would silently accept and ignore them at best.
    if storage_options is None or not is_remote(url):
        return {}
    if not isinstance(storage_options, StorageSettings) and set(storage_options) <= set(StorageSettings.model_fields):
        storage_options = StorageSettings.model_validate(dict(storage_options))  # holefill's keys, retries included
    if isinstance(storage_options, StorageSettings):
        return storage_options.for_s3fs() if protocol_of(url) in {"s3", "s3a"} else {}
    return dict(storage_options)  # raw filesystem keyword arguments


def url_to_fs(url: str, storage_options: StorageOptionsLike = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Filesystem and in-filesystem path for ``url``, configured with the options that apply to it."""
    return _fsspec_url_to_fs(str(url), **_options_for(str(url), storage_options))


def _fresh(url: str, storage_options: StorageOptionsLike) -> tuple[fsspec.AbstractFileSystem, str]:
    """Filesystem and path with any cached listing of ``path`` dropped.

    Filesystem instances are cached per process (a Ray worker keeps one across tasks), and object stores cache
    folder listings: a file another process wrote since would look missing, or keep its old size, which reads
    as an empty or truncated file. Every size, existence check and read asks the store itself.
    """
    fs, path = url_to_fs(url, storage_options)
    if is_remote(url):
        fs.invalidate_cache(path)
    return fs, path


def open_url(url: str, mode: str = "rb", storage_options: StorageOptionsLike = None, **kwargs: Any) -> IO:
    """Open ``url`` like :func:`open` (binary or text mode); extra kwargs go to the filesystem's ``open``."""
    fs, path = _fresh(url, storage_options)
    if "w" in mode and not is_remote(url):
        fs.makedirs(posixpath.dirname(path) or ".", exist_ok=True)
    return fs.open(path, mode, **kwargs)


def read_bytes(url: str, storage_options: StorageOptionsLike = None, max_bytes: int | None = None) -> bytes:
    """The whole content of ``url``; with ``max_bytes``, a ``ValueError`` (one line) for anything longer, having read
    no more than ``max_bytes + 1`` bytes whatever the store says of the object's size."""
    fs, path = _fresh(url, storage_options)
    if max_bytes is None:
        return fs.cat_file(path)
    with fs.open(path, "rb") as handle:
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"{redact(url)} is over the {max_bytes}-byte bound for this kind of file")
    return data


def join_url(base: str, *parts: str) -> str:
    """Join path parts onto a URL or path, resolving ``..``; an absolute part replaces what precedes it.

    ``join_url("s3://b/data/v2", "../v1/shard-000000.tar") == "s3://b/data/v1/shard-000000.tar"``.
    """
    url = str(base)
    for part in parts:
        part = str(part)
        if "://" in part:
            url = part
            continue
        head, sep, path = url.partition("://")
        if not sep:
            head, path = "", url
        if part.startswith("/"):
            joined = part
        else:
            joined = posixpath.join(path, part) if path else part
        # normpath keeps a leading "//" and would turn "" into "."; both are not wanted here.
        normalised = posixpath.normpath(joined) if joined else joined
        if normalised.startswith("//"):
            normalised = "/" + normalised.lstrip("/")
        url = f"{head}://{normalised}" if sep else normalised
    return url


def parent_url(url: str) -> str:
    """The folder holding ``url`` (same protocol)."""
    head, sep, path = str(url).partition("://")
    if not sep:
        return posixpath.dirname(str(url).rstrip("/")) or "."
    return f"{head}://{posixpath.dirname(path.rstrip('/'))}"


def exists(url: str, storage_options: StorageOptionsLike = None) -> bool:
    """True when ``url`` names an existing file or folder."""
    fs, path = _fresh(url, storage_options)
    return fs.exists(path)


def size_of_url(url: str, storage_options: StorageOptionsLike = None) -> int:
    """Size of the file at ``url`` in bytes."""
    fs, path = _fresh(url, storage_options)
    return int(fs.size(path))


def sha256_of_url(url: str, storage_options: StorageOptionsLike = None) -> str:
    """Hex sha256 of the file at ``url``, streamed in 1 MiB chunks (constant memory)."""
    digest = hashlib.sha256()
    with open_url(url, "rb", storage_options) as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _temporary_sibling(path: str) -> str:
    folder, name = posixpath.split(path)
    return posixpath.join(folder, f".{name}{TEMP_MARKER}{uuid.uuid4().hex[:12]}")


@contextlib.contextmanager
def atomic_write(url: str, storage_options: StorageOptionsLike = None) -> Iterator[IO[bytes]]:
    """Context manager yielding a binary file; on clean exit its content appears at ``url`` atomically.

    The data goes to a temporary sibling first and is moved into place when the block ends without an
    exception; on an exception the temporary is removed and ``url`` is untouched (see the module docstring
    for what atomic means on each backend).
    """
    fs, path = url_to_fs(url, storage_options)
    if not is_remote(url):
        fs.makedirs(posixpath.dirname(path) or ".", exist_ok=True)
    temporary = _temporary_sibling(path)
    try:
        with fs.open(temporary, "wb") as handle:
            yield handle
        if not is_remote(url):  # durable: the bytes reach the disk before the name points at them
            fsync_file(temporary)
        fs.mv(temporary, path)
        if not is_remote(url):  # ... and the rename itself survives a power loss
            fsync_folder(posixpath.dirname(path) or ".")
    except BaseException:
        with contextlib.suppress(Exception):
            if fs.exists(temporary):
                fs.rm(temporary)
        raise


def fsync_file(path: str) -> None:
    """``fsync`` a local file's content (a checkpoint's small files after Ray copied them into place)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_folder(folder: str) -> None:
    """``fsync`` a local folder, so the names created or renamed in it survive a power loss (no-op where the
    platform cannot open folders)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a folder; nothing more can be done there
    finally:
        os.close(fd)


def publish_bytes(url: str, data: bytes, storage_options: StorageOptionsLike = None) -> None:
    """Write ``data`` to ``url`` atomically (see :func:`atomic_write`)."""
    with atomic_write(url, storage_options) as handle:
        handle.write(data)
