"""Name -> architecture registry, so jobs, converters and serving select models without if-chains.

The registry knows no architecture itself: each model file registers its own :class:`Architecture` with
:func:`register_architecture` when it is imported, and :mod:`models` imports every model file, so any import
from ``models`` sees them all. The arrow runs one way (model file -> registry), never back, so a model file
can be added, or registered from a test, without editing this module.

A new architecture is a model file that ends with ``register_architecture(Architecture(...))``, listed in
``models/__init__.py``; training it needs one module (settings, recipes, spec) beside the two in
``pipeline/train/architectures/``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Mapping, Protocol, TypeVar

import torch.nn as nn

__all__ = ["Architecture", "Registry", "architectures", "get_architecture", "register_architecture"]


class _Named(Protocol):
    name: str


T = TypeVar("T", bound=_Named)


class Registry(Generic[T]):
    """Records by name, filled by the modules that define them (never by importing them from here).

    ``kind`` names the records in errors: ``unknown <kind> 'x'; known: a, b``. Registering a record equal to
    the known one of its name is a no-op (a module imported twice); a different one is a ``ValueError``.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, item: T) -> T:
        """Make ``item`` known under ``item.name``; returns it."""
        known = self._items.get(item.name)
        if known is not None and known != item:
            raise ValueError(f"{self.kind} {item.name!r} is already registered")
        self._items[item.name] = item
        return item

    def get(self, name: str) -> T:
        """The record called ``name``; a one-line ``ValueError`` lists the known names."""
        try:
            return self._items[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        return sorted(self._items)


@dataclass(frozen=True)
class Architecture:
    """What the rest of holefill needs to know about one inpainting architecture's networks.

    ``size_multiple``: generator H and W must be multiples of it. ``train_size``: the discriminator's
    required input size, or ``None`` if it takes any multiple of ``size_multiple``.
    ``official_converters`` maps a part (``"generator"``/``"discriminator"``) to a function turning an
    official state dict into one this project's module loads with ``strict=True``.
    ``generator_kwargs_from_state_dict`` (optional) reads the generator constructor's keywords that a state dict's
    shapes imply (e.g. a depth from the number of blocks, a width from channel counts); keywords its shapes do not
    show are left out (they keep their defaults). ``models.record.kwargs_for_weights`` uses it for plain weights
    files of non-default networks, and accepts its answer only when the network it names fits the weights exactly.
    """

    name: str
    generator: Callable[..., nn.Module]
    discriminator: Callable[..., nn.Module]
    size_multiple: int
    train_size: int | None
    official_converters: dict[str, Callable[[dict], dict]] = field(default_factory=dict)
    generator_kwargs_from_state_dict: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None


ARCHITECTURES: Registry[Architecture] = Registry("architecture")


def register_architecture(architecture: Architecture) -> Architecture:
    """Make ``architecture`` known under its name and return it; another one of that name is a ``ValueError``."""
    return ARCHITECTURES.register(architecture)


def get_architecture(name: str) -> Architecture:
    """Look up an architecture by name; a clear ``ValueError`` lists the known names."""
    return ARCHITECTURES.get(name)


def architectures() -> list[str]:
    """Names of all registered architectures."""
    return ARCHITECTURES.names()
