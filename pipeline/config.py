"""Typed configuration: YAML files plus ``--set key.path=value`` overrides, validated up front.

Every job describes its settings as a pydantic model deriving from :class:`Config`. The job calls
:func:`parse_job_config` (or :func:`load_config`), which reads the YAML file, applies overrides in order,
validates the result and, on any problem, raises :class:`ConfigError` whose message is one line naming
the offending key. A program that needs a variant of a validated config (retraining's run on a new data
version, the demo's short runs) derives it with :func:`derive` or passes ``updates`` to :func:`load_config`:
nested values, never ``key=value`` strings. Nothing in the library reads ``sys.argv`` or the environment
except through here.
"""

from __future__ import annotations

import argparse
import os
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.errors import one_line

__all__ = [
    "Config",
    "ConfigError",
    "add_config_arguments",
    "deep_merge",
    "derive",
    "apply_override",
    "first_error",
    "flatten",
    "load_config",
    "parse_job_config",
    "validated",
]


class ConfigError(ValueError):
    """A configuration problem; the message is a single line that names the key.

    :meth:`at` builds the usual ``config key <key>: <rule>`` and keeps both parts, so a rule raised inside a
    validator reaches the user under its own key rather than the validated model's.
    """

    def __init__(self, message: str, *, key: str | None = None, rule: str | None = None) -> None:
        super().__init__(message)
        self.key, self.rule = key, rule

    @classmethod
    def at(cls, key: str, rule: str) -> "ConfigError":
        """``config key <key>: <rule>``."""
        return cls(f"config key {key}: {rule}", key=key, rule=rule)


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
        raise ConfigError(f"config file {path}: not valid YAML ({one_line(exc)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping")
    return data


def _model_type(annotation: Any) -> type[BaseModel] | None:
    """The config class behind a field annotation (``X`` or ``X | None``), else ``None``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    members = [a for a in typing.get_args(annotation) if a is not type(None)]
    return _model_type(members[0]) if len(members) == 1 else None


def _union_member(annotation: Any, discriminator: Any, tag: Any) -> type[BaseModel] | None:
    name = getattr(discriminator, "discriminator", discriminator)
    for member in typing.get_args(annotation):
        field_info = getattr(member, "model_fields", {}).get(name)
        if field_info is not None and tag in typing.get_args(field_info.annotation):
            return member
    return None


def _key(loc: Sequence[Any], model: type[BaseModel] | None) -> str:
    """The dotted key of a pydantic error location, without the tags it adds inside a discriminated union
    (``model.lbam.options`` -> ``model.options``), found by walking ``model``'s fields along the location."""
    parts, node, rest = [], model, list(loc)
    while rest:
        part = rest.pop(0)
        parts.append(str(part))
        field_info = node.model_fields.get(part) if node is not None and isinstance(part, str) else None
        if field_info is None:
            node = None
        elif field_info.discriminator is not None and rest:
            node = _union_member(field_info.annotation, field_info.discriminator, rest.pop(0))
        else:
            node = _model_type(field_info.annotation)
    return ".".join(parts) or "<root>"


def first_error(exc: ValidationError, model: type[BaseModel] | None = None) -> tuple[str, str]:
    """``(dotted key, one-line message)`` of the first problem in a pydantic ``ValidationError``.

    The one reading of a validation error that configs, manifests, mask parameters and CLIs share: "unknown key"
    for a key the model does not have, validators' "Value error, " prefixes dropped, "(and N more)" when there
    are more, a :class:`ConfigError` raised by a validator under its own key, and with ``model`` (the validated
    class) the union tags pydantic puts into locations removed.
    """
    err = exc.errors()[0]
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    cause = (err.get("ctx") or {}).get("error")  # a ValueError a validator raised
    if isinstance(cause, ConfigError) and cause.key is not None:
        return cause.key, f"{cause.rule}{more}"
    key, ctx = _key(err.get("loc", ()), model), err.get("ctx") or {}
    if err.get("type") == "extra_forbidden":
        msg = "unknown key"
    elif err.get("type") in ("union_tag_invalid", "union_tag_not_found"):
        # The tag picks the variant (``model.arch``): name its own key and the known values.
        key = f"{key}.{str(ctx.get('discriminator', '')).strip(chr(39))}"
        msg = f"must be one of {ctx['expected_tags']}, got {ctx['tag']!r}" if "tag" in ctx else "Field required"
    else:
        # pydantic prefixes messages raised by validators with "Value error, "; the key already says where.
        msg = err.get("msg", "invalid value").removeprefix("Value error, ").removeprefix("Assertion failed, ")
    return key, f"{msg}{more}"


def _first_error(exc: ValidationError, model: type[BaseModel] | None = None) -> str:
    key, msg = first_error(exc, model)
    return f"config key {key}: {msg}"


def load_config(
    cls: type[C],
    path: str | os.PathLike | None = None,
    overrides: Iterable[str] = (),
    base: Mapping[str, Any] | None = None,
    updates: Mapping[str, Any] | None = None,
) -> C:
    """Build ``cls`` from ``base`` (defaults), then the YAML at ``path``, then ``overrides`` in order, then
    ``updates`` (nested values a program sets, e.g. ``{"data": {"train_manifest": url}}``, which win)."""
    tree: dict = deep_merge(dict(base or {}), _read_yaml(path) if path else {})
    for assignment in overrides:
        apply_override(tree, assignment)
    return validated(cls, deep_merge(tree, updates or {}))


def validated(cls: type[C], tree: Mapping[str, Any]) -> C:
    """``cls`` validated from ``tree``; the first problem is a one-line :class:`ConfigError` naming the key."""
    try:
        return cls.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_first_error(exc, cls)) from None


def derive(config: C, changes: Mapping[str, Any]) -> C:
    """A new config: ``config`` with nested ``changes`` (``{"model": {"init_weights": url}}``), validated as
    ``config`` was (every rule, cross-section ones included); ``config`` itself is left unchanged."""
    return validated(type(config), deep_merge(config.model_dump(round_trip=True), changes))


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
