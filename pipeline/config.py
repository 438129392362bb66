"""Typed configuration: YAML files plus ``--set key.path=value`` overrides, validated up front.

Every job describes its settings as a pydantic model deriving from :class:`Config`. The job calls
:func:`parse_job_config` (or :func:`load_config`), which reads the YAML file, applies overrides in order,
validates the result and, on any problem, raises :class:`ConfigError` whose message is one line naming
the offending key. Nothing in the library reads ``sys.argv`` or the environment except through here.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

__all__ = [
    "Config",
    "ConfigError",
    "add_config_arguments",
    "deep_merge",
    "apply_override",
    "flatten",
    "load_config",
    "parse_job_config",
]


class ConfigError(ValueError):
    """A configuration problem; the message is a single line that names the key."""


class Config(BaseModel):
    """Base of every holefill config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


C = TypeVar("C", bound=Config)


def _parse_scalar(text: str) -> Any:
    """Parse an override value with YAML rules (``3`` -> int, ``true`` -> bool, ``[1, 2]`` -> list)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(tree: dict, assignment: str) -> None:
    """Apply one ``a.b.c=value`` assignment to a nested dict in place."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key.path=value")
    path, _, raw = assignment.partition("=")
    parts = [p for p in path.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {assignment!r}: empty key")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {path}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = _parse_scalar(raw)


def _read_yaml(path: str | os.PathLike) -> dict:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping")
    return data


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err.get("loc", ())) or "<root>"
    msg = err.get("msg", "invalid value")
    # pydantic prefixes messages raised by validators with "Value error, "; the key already says where.
    msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if err.get("type") == "extra_forbidden":
        msg = "unknown key"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"config key {key}: {msg}{more}"


def load_config(
    cls: type[C],
    path: str | os.PathLike | None = None,
    overrides: Iterable[str] = (),
    base: Mapping[str, Any] | None = None,
) -> C:
    """Build ``cls`` from ``base`` (defaults), then the YAML at ``path``, then ``overrides`` in order."""
    tree: dict = deep_merge(dict(base or {}), _read_yaml(path) if path else {})
    for assignment in overrides:
        apply_override(tree, assignment)
    try:
        return cls.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_first_error(exc)) from None


def deep_merge(into: dict, other: Mapping[str, Any]) -> dict:
    """Merge ``other`` into ``into`` recursively (nested mappings merge, other values replace); returns ``into``."""
    for key, value in other.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), Mapping):
            into[key] = deep_merge(dict(into[key]), value)
        else:
            into[key] = value
    return into


def add_config_arguments(parser: argparse.ArgumentParser, default_config: str | None = None) -> None:
    """Add the ``--config FILE`` and repeatable ``--set key.path=value`` options every job accepts."""
    parser.add_argument("--config", default=default_config, help="YAML config file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value, e.g. --set train.max_steps=100 (repeatable)",
    )


def parse_job_config(
    cls: type[C], args: argparse.Namespace, extra_overrides: Sequence[str] = ()
) -> C:
    """Load the config of a job from parsed ``--config``/``--set`` arguments plus job-specific overrides."""
    return load_config(cls, getattr(args, "config", None), [*extra_overrides, *getattr(args, "overrides", [])])


def flatten(config: BaseModel | Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten a config into ``{"a.b.c": value}`` (for MLflow params and logs)."""
    data = config.model_dump(mode="json") if isinstance(config, BaseModel) else dict(config)
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat
