"""Name -> architecture registry, so jobs and converters select models without if-chains.

The one place that knows every architecture: it imports the model files (which know nothing of it)
and lists what the rest of holefill needs from each. A new architecture is a new model file plus one
entry in :data:`_REGISTRY`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch.nn as nn

from models import lbam, rn

__all__ = ["Architecture", "get_architecture", "architectures"]


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


def _official(module) -> dict[str, Callable[[dict], dict]]:
    return {"generator": module.convert_official_generator, "discriminator": module.convert_official_discriminator}


_REGISTRY: dict[str, Architecture] = {
    arch.name: arch
    for arch in (
        Architecture("rn", rn.RNGenerator, rn.RNDiscriminator, size_multiple=rn.SIZE_MULTIPLE, train_size=None,
                     official_converters=_official(rn)),
        Architecture("lbam", lbam.LBAMGenerator, lbam.LBAMDiscriminator, size_multiple=lbam.SIZE_MULTIPLE,
                     train_size=lbam.DISCRIMINATOR_SIZE, official_converters=_official(lbam)),
    )
}


def get_architecture(name: str) -> Architecture:
    """Look up an architecture by name; a clear ``ValueError`` lists the known names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def architectures() -> list[str]:
    """Names of all registered architectures."""
    return sorted(_REGISTRY)
