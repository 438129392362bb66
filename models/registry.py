"""Name -> architecture registry, so jobs, converters and serving select models without if-chains.

The registry knows no architecture itself: each model file registers its own :class:`Architecture` with
:func:`register_architecture` when it is imported, and :mod:`models` imports every model file, so any import
from ``models`` sees them all. The arrow runs one way (model file -> registry), never back, so a model file
can be added, or registered from a test, without editing this module.

A new architecture is a model file that ends with ``register_architecture(Architecture(...))``, listed in
``models/__init__.py``; training it needs one spec beside the two in ``pipeline/train/architectures/``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch.nn as nn

__all__ = ["Architecture", "architectures", "get_architecture", "register_architecture"]


@dataclass(frozen=True)
class Architecture:
    """What the rest of holefill needs to know about one inpainting architecture's networks.

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


def register_architecture(architecture: Architecture) -> Architecture:
    """Make ``architecture`` known under its name and return it; another one of that name is a ``ValueError``."""
    known = _REGISTRY.get(architecture.name)
    if known is not None and known != architecture:
        raise ValueError(f"architecture {architecture.name!r} is already registered")
    _REGISTRY[architecture.name] = architecture
    return architecture


def get_architecture(name: str) -> Architecture:
    """Look up an architecture by name; a clear ``ValueError`` lists the known names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def architectures() -> list[str]:
    """Names of all registered architectures."""
    return sorted(_REGISTRY)
