"""A generator at rest: its architecture, the keywords it was built with, its fp32 weights and where it came from.

:class:`GeneratorRecord` is the one form in which a trained (or released) generator travels through holefill:
training writes it into every checkpoint and hands it to registration, a registered version stores it as two
artifacts, and inference, evaluation, serving and fine-tuning read it back. :meth:`GeneratorRecord.build` is the
one place a module is built from (arch, keywords, weights): strict load, fp32, eval mode.

On disk a record is :meth:`~GeneratorRecord.to_payload`: a plain dict of strings, numbers, dicts and tensors with
the format id :data:`RECORD_FORMAT`, written by ``torch.save`` and read back by ``torch.load(weights_only=True)``
(nothing is unpickled). :meth:`~GeneratorRecord.from_payload` checks every field of a payload read from outside.

``kwargs`` holds only the keywords that differ from the constructor's defaults (normalised on construction), so
two records of the same network compare equal whichever way their keywords were written. A plain state dict that
comes without keywords is matched to them by :func:`kwargs_for_weights` (the architecture's
``generator_kwargs_from_state_dict`` hook reads what its shapes imply) or refused in one line.

This module knows nothing of files, MLflow or Ray (it travels inside every registered model's bundle).
"""

from __future__ import annotations

import functools
import inspect
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn as nn

from models.registry import get_architecture
from models.statedict import check_state_dict

__all__ = ["KWARGS_OPTION", "RECORD_FORMAT", "GeneratorRecord", "default_generator_kwargs", "generator_shapes", "is_record_payload",
           "kwargs_for_weights", "normalise_kwargs", "weights_problem"]

RECORD_FORMAT = "holefill-generator-record/1"
KWARGS_OPTION = "--set generator_kwargs.<name>=<value>"  # how a job is told the keywords of a plain weights file


def default_generator_kwargs(arch: str) -> dict[str, Any]:
    """The keyword parameters of ``arch``'s generator constructor and their defaults."""
    builder = get_architecture(arch).generator
    return {p.name: p.default for p in inspect.signature(builder).parameters.values()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def normalise_kwargs(arch: str, kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """``kwargs`` without the ones equal to ``arch``'s constructor defaults; unknown names or values that are not
    JSON are a one-line ``ValueError``."""
    known = default_generator_kwargs(arch)
    given = dict(kwargs or {})
    unknown = sorted(k for k in given if not isinstance(k, str) or k not in known)
    if unknown:
        raise ValueError(f"unknown {arch} generator keyword(s) {', '.join(map(str, unknown))}; "
                         f"known: {', '.join(sorted(known))}")
    try:
        json.dumps(given)
    except (TypeError, ValueError):
        raise ValueError(f"{arch} generator keywords must be JSON values (numbers, strings, booleans), got {given!r}") from None
    return {k: v for k, v in sorted(given.items()) if not _same(v, known[k])}


def _same(value: Any, default: Any) -> bool:
    """``value`` equals ``default`` (``1 == 1.0``, but a boolean only equals a boolean)."""
    if isinstance(value, bool) or isinstance(default, bool):
        return type(value) is type(default) and value == default
    return value == default


def generator_shapes(arch: str, kwargs: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The state dict (on the meta device: shapes only, no memory) of ``arch``'s generator built with ``kwargs``.

    Kept per (arch, keywords): the first meta build in a process pays torch's import of its decompositions."""
    return dict(_meta_state(arch, json.dumps(dict(kwargs or {}), sort_keys=True)))


@functools.lru_cache(maxsize=32)
def _meta_state(arch: str, kwargs_json: str) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return dict(get_architecture(arch).generator(**json.loads(kwargs_json)).state_dict())


def weights_problem(arch: str, kwargs: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """``None`` when ``state_dict`` has exactly the keys and shapes of ``arch`` built with ``kwargs``, else why not."""
    what = f"{arch} generator {dict(kwargs) or 'defaults'}"
    try:
        expected = generator_shapes(arch, kwargs)
    except (TypeError, ValueError) as exc:  # keywords the constructor refuses
        return f"{what}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    try:
        check_state_dict(expected, state_dict, what)
    except ValueError as exc:
        return str(exc)
    return None


def kwargs_for_weights(arch: str, state_dict: Mapping[str, torch.Tensor], option: str = KWARGS_OPTION) -> dict[str, Any]:
    """The (non-default) keywords of the ``arch`` network ``state_dict`` belongs to, read off its shapes.

    The default network when its keys and shapes fit; else the architecture's ``generator_kwargs_from_state_dict``
    hook (keywords its weights' shapes imply; those not visible in shapes keep their defaults), accepted only when
    the network it names fits exactly. Otherwise a one-line ``ValueError`` naming ``option`` (what supplies them).
    """
    problem = weights_problem(arch, {}, state_dict)
    if problem is None:
        return {}
    hook = get_architecture(arch).generator_kwargs_from_state_dict
    if hook is not None:
        try:
            guessed = normalise_kwargs(arch, hook(state_dict))
        except (ValueError, KeyError, TypeError, IndexError):
            guessed = None
        if guessed is not None and weights_problem(arch, guessed, state_dict) is None:
            return guessed
    raise ValueError(f"the weights do not fit the default {arch} network ({problem}) and its keywords cannot be read "
                     f"off their shapes: pass them with {option}")


def _fp32_cpu(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().contiguous()
            for k, v in state_dict.items()}


@dataclass(frozen=True, eq=False)
class GeneratorRecord:
    """One generator at rest (see the module docstring).

    ``arch``: a registered architecture name; ``kwargs``: its generator constructor's keywords (only the
    non-default ones are kept); ``state_dict``: fp32 CPU tensors; ``provenance``: strings saying where it came from
    (``kind``: ``training run`` / ``official release`` / ``weights file`` / ``checkpoint``, ``source``, ``sha256``,
    ``run_id``, ``step``, ``paper``, ...). Construction checks names and types, not shapes (:meth:`build` does).
    """

    arch: str
    kwargs: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    provenance: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.arch, str):
            raise ValueError(f"generator record: arch must be a string, got {type(self.arch).__name__}")
        get_architecture(self.arch)  # one line naming the known ones
        if not isinstance(self.state_dict, Mapping) or not self.state_dict or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in self.state_dict.items()):
            raise ValueError("generator record: state_dict must be a non-empty dict of name -> tensor")
        if not isinstance(self.provenance, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.provenance.items()):
            raise ValueError("generator record: provenance must be a dict of strings")
        if not isinstance(self.kwargs, Mapping):
            raise ValueError(f"generator record: kwargs must be a dict, got {type(self.kwargs).__name__}")
        object.__setattr__(self, "kwargs", normalise_kwargs(self.arch, self.kwargs))
        object.__setattr__(self, "state_dict", _fp32_cpu(self.state_dict))
        object.__setattr__(self, "provenance", dict(self.provenance))

    def build(self) -> nn.Module:
        """The generator: ``arch`` built with ``kwargs``, ``state_dict`` loaded strictly, fp32, in eval mode.

        Weights that do not fit the network are a one-line ``ValueError`` naming the missing, unexpected or
        mis-shaped keys (the only place holefill builds a generator from weights)."""
        problem = weights_problem(self.arch, self.kwargs, self.state_dict)
        if problem is not None:
            raise ValueError(f"weights do not fit: {problem}")
        module = get_architecture(self.arch).generator(**self.kwargs)
        module.load_state_dict(self.state_dict, strict=True)
        return module.float().eval()

    def with_provenance(self, **more: str) -> "GeneratorRecord":
        """The same generator with ``more`` added to (or replacing entries of) its provenance."""
        return GeneratorRecord(self.arch, self.kwargs, self.state_dict, {**self.provenance, **more})

    def matches(self, arch: str, kwargs: Mapping[str, Any] | None) -> str | None:
        """``None`` when this record is the ``arch`` network built with ``kwargs``, else one line saying how it differs."""
        if arch != self.arch:
            return f"it holds a {self.arch} generator, not {arch}"
        wanted = normalise_kwargs(arch, kwargs)
        if wanted != self.kwargs:
            return f"it holds {arch} generator keywords {self.kwargs or 'defaults'}, not {wanted or 'defaults'}"
        return None

    @classmethod
    def from_module(cls, module: nn.Module, arch: str, kwargs: Mapping[str, Any] | None = None,
                    provenance: Mapping[str, str] | None = None) -> "GeneratorRecord":
        """The record of a built generator of ``arch``; ``kwargs`` default to those it declares it was built with
        (``constructor_kwargs``). The weights are copied (fp32, CPU); ``module`` is left as it is."""
        if kwargs is None:
            kwargs = getattr(module, "constructor_kwargs", {})
        with torch.no_grad():
            state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        return cls(arch, dict(kwargs), state, dict(provenance or {}))

    def to_payload(self) -> dict[str, Any]:
        """A plain dict (format id, arch, kwargs, provenance, state dict) that ``torch.save`` writes and
        ``torch.load(weights_only=True)`` reads back."""
        return {"format": RECORD_FORMAT, "arch": self.arch, "kwargs": dict(self.kwargs),
                "provenance": dict(self.provenance), "state_dict": dict(self.state_dict)}

    @classmethod
    def from_payload(cls, payload: Any, name: str = "generator record") -> "GeneratorRecord":
        """The record of a payload written by :meth:`to_payload` (``name`` labels the one-line ``ValueError``)."""
        if not is_record_payload(payload):
            raise ValueError(f"{name} is not a holefill generator record (format {RECORD_FORMAT})")
        missing = [k for k in ("arch", "kwargs", "provenance", "state_dict") if k not in payload]
        if missing:
            raise ValueError(f"{name}: generator record without {', '.join(missing)}")
        try:
            return cls(payload["arch"], payload["kwargs"], payload["state_dict"], payload["provenance"])
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None


def is_record_payload(payload: Any) -> bool:
    """Whether ``payload`` (a loaded torch file) says it is a :class:`GeneratorRecord` payload."""
    return isinstance(payload, Mapping) and payload.get("format") == RECORD_FORMAT
