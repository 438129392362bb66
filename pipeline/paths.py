"""Local paths in configs: made absolute against the caller's working directory before anything ships to Ray.

Ray workers (and the driver of a ``ray job submit`` job) run in other directories than the shell that started
the job, so a relative ``data.train_manifest`` that the driver can read is a missing file on every worker. A
config field typed :data:`PathStr` (or annotated with :class:`LocalPath`) holds a local path or a URL;
:func:`resolve_config_paths` turns every relative local path among them into an absolute one and returns what
it changed, so the job can log it. URLs (``s3://``, ``file://``, ``models:/``) are left alone.

Output locations (``LocalPath(output=True)``: checkpoints, shards) are refused when they would resolve into
Ray's temporary copy of a job's working directory: Ray deletes it with the session, and the user would never
find what was written there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel

__all__ = [
    "LocalPath",
    "OutputPathStr",
    "PathStr",
    "ResolvedPath",
    "is_local_relative",
    "ray_working_dir_copy",
    "resolve_config_paths",
    "resolve_local",
]

# ``scheme:`` at the start: s3://, file://, models:/, runs:/ ... (one letter would be a Windows drive).
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]+:")
# Where Ray unpacks a job's --working-dir: <temp>/session_*/runtime_resources/working_dir_files/_ray_pkg_<hash>.
_RAY_WORKING_DIR = re.compile(r"^(.*/runtime_resources/working_dir_files/_ray_pkg_[^/]+)(/|$)")


@dataclass(frozen=True)
class LocalPath:
    """Marks a config field (``str``, ``str | None``, or a ``dict`` of them with ``keys``) as a path or URL.

    ``output``: the job writes there, so it must not land in Ray's temporary working-dir copy.
    ``keys``: for a ``dict`` field, the entries that are paths (e.g. ``vgg_weights`` in recipe options).
    """

    output: bool = False
    keys: tuple[str, ...] = ()


PathStr = Annotated[str, LocalPath()]
OutputPathStr = Annotated[str, LocalPath(output=True)]


@dataclass(frozen=True)
class ResolvedPath:
    """One config value made absolute: ``key`` (dotted), what was given, what it became."""

    key: str
    given: str
    resolved: str


def is_local_relative(value: str) -> bool:
    """True for a relative local path (``data/x.json``, ``./x``, ``~/x``); False for absolute paths and URLs."""
    text = value.strip()
    return bool(text) and not text.startswith("/") and not _SCHEME.match(text)


def ray_working_dir_copy(path: str | Path) -> Path | None:
    """The Ray runtime working-dir copy that ``path`` lies in (a job's uploaded ``--working-dir``), else None."""
    match = _RAY_WORKING_DIR.match(str(path))
    return Path(match.group(1)) if match else None


def resolve_local(value: str, base: str | Path | None = None) -> str:
    """``value`` made absolute against ``base`` (default: the current directory) when it is a relative local path."""
    if not is_local_relative(value):
        return value
    path = Path(value.strip()).expanduser()
    if not path.is_absolute():
        path = Path(base if base is not None else Path.cwd()) / path
    return str(path.resolve())


def _marker(field_info: Any) -> LocalPath | None:
    for item in getattr(field_info, "metadata", ()):
        if isinstance(item, LocalPath):
            return item
    return None


def _resolve_one(key: str, value: str, marker: LocalPath, base: Path) -> ResolvedPath | None:
    if not isinstance(value, str) or not is_local_relative(value):
        return None
    resolved = resolve_local(value, base)
    if marker.output and ray_working_dir_copy(resolved) is not None:
        raise ValueError(
            f"config key {key}: {value!r} would be written inside Ray's temporary copy of the job's working dir "
            f"({ray_working_dir_copy(resolved)}), deleted with the Ray session: give an absolute path or a URL"
        )
    return ResolvedPath(key, value, resolved)


def resolve_config_paths(config: BaseModel, base: str | Path | None = None, prefix: str = "") -> list[ResolvedPath]:
    """Make every relative local path of ``config`` (fields marked :class:`LocalPath`) absolute, in place.

    Walks nested configs. A config whose fields are paths only in some settings (a file list's ``root`` is a
    folder, a tar archive's is a folder inside the archive) names them in a ``local_path_fields()`` method.
    Returns the changes in field order, for the job log. Raises ``ValueError`` (one line, naming the key) for an
    output path that would land in Ray's temporary working-dir copy.
    """
    root = Path(base if base is not None else Path.cwd())
    changes: list[ResolvedPath] = []
    conditional = set(getattr(config, "local_path_fields", lambda: ())())
    for name, field_info in type(config).model_fields.items():
        value = getattr(config, name)
        key = f"{prefix}{name}"
        marker = _marker(field_info) or (LocalPath() if name in conditional else None)
        if isinstance(value, BaseModel):
            changes += resolve_config_paths(value, root, prefix=f"{key}.")
        elif marker is not None and isinstance(value, dict):
            updated = dict(value)
            for entry in marker.keys:
                change = _resolve_one(f"{key}.{entry}", updated.get(entry), marker, root)
                if change is not None:
                    updated[entry] = change.resolved
                    changes.append(change)
            if updated != value:
                setattr(config, name, updated)
        elif marker is not None:
            change = _resolve_one(key, value, marker, root)
            if change is not None:
                setattr(config, name, change.resolved)
                changes.append(change)
    return changes
