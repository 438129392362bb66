"""Name -> architecture registry, so jobs and converters select models without if-chains."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch.nn as nn

__all__ = ["Architecture", "register", "get_architecture", "architectures"]


@dataclass(frozen=True)
class Architecture:
    """What the rest of holefill needs to know about one inpainting architecture.

    ``size_multiple``: generator H and W must be multiples of it. ``train_size``: the discriminator's
    required input size, or ``None`` if it takes any multiple of ``size_multiple``.
    ``official_converters`` maps a part (``"generator"``/``"discriminator"``) to a function turning an
    official state dict into one this project's module loads with ``strict=True``.
    """

    name: str
    generator: Callable[..., nn.Module]
    discriminator: Callable[..., nn.Module]
    size_multiple: int
    train_size: int | None
    official_converters: dict[str, Callable[[dict], dict]] = field(default_factory=dict)


_REGISTRY: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    """Register an architecture under ``arch.name`` (model modules call this at import)."""
    _REGISTRY[arch.name] = arch
    return arch


def _load_builtin() -> None:
    # Importing the model modules registers them.
    from models import lbam, rn  # noqa: F401


def get_architecture(name: str) -> Architecture:
    """Look up an architecture by name; a clear ``ValueError`` lists the known names."""
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def architectures() -> list[str]:
    """Names of all registered architectures."""
    _load_builtin()
    return sorted(_REGISTRY)
