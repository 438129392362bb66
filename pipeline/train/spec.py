"""One spec per trainable architecture: its networks, its typed settings and its recipe, in one record.

An :class:`ArchitectureSpec` is the single place that says how an architecture trains:

* ``architecture``: its networks and size rules (the :mod:`models.registry` record its model file registered);
* ``options``: the typed settings of ``model.options`` (loss weights, switches; e.g.
  :class:`~pipeline.train.architectures.rn.RNSettings`), whose defaults are written there and nowhere else; the
  validated object reaches ``recipe`` as is;
* ``recipe``: builds the :class:`~pipeline.train.recipes.GanRecipe` (fixed or official) from that object;
* ``discriminator_options``: the keyword arguments training always builds the discriminator with;
* ``discriminator_config``: the typed settings of ``model.discriminator_options`` (the discriminator's other
  constructor keywords, e.g. LBAM's ``input_size`` and ``width``), read off its constructor signature;
* ``generator_options``: the typed settings of ``model.generator_options``; by default read off the generator's
  constructor signature, so its defaults stay where the network is defined.

Each architecture is one module of :mod:`pipeline.train.architectures` holding its settings, its recipes and the
:func:`register_spec` call that runs when it is imported; the training config (``model``: a union discriminated
on ``arch``) and the worker look specs up here by name. Adding an architecture is one model file under
``models/`` plus one module in ``pipeline/train/architectures/`` (``tests/test_architecture_spec.py`` trains a
toy one).
"""

from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Mapping, TypeVar

import torch.nn as nn
from pydantic import ValidationError, create_model

from models.registry import Architecture, Registry
from pipeline.config import Config, ConfigError, first_error
from pipeline.train.recipes import GanRecipe

__all__ = [
    "ArchitectureSpec",
    "build_recipe",
    "discriminator_options",
    "get_spec",
    "settings_from_signature",
    "register_spec",
    "spec_names",
    "specs",
]

O = TypeVar("O", bound=Config)


def settings_from_signature(build: Callable[..., Any], name: str, exclude: frozenset[str] = frozenset()) -> type[Config]:
    """A :class:`Config` model of ``build``'s keyword parameters, with their annotations and defaults.

    Lets a generator's constructor be the one place its options and their defaults are written, while the
    training config still validates them up front (wrong name or type: a one-line error naming the key).
    """
    target = build.__init__ if isinstance(build, type) else build
    hints = typing.get_type_hints(target)
    fields: dict[str, Any] = {}
    for parameter in inspect.signature(build).parameters.values():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD) or parameter.name in exclude:
            continue
        default = ... if parameter.default is parameter.empty else parameter.default
        fields[parameter.name] = (hints.get(parameter.name, Any), default)
    model = create_model(name, __base__=Config, **fields)
    model.__doc__ = f"Keyword arguments of ``{getattr(build, '__qualname__', name)}``, defaults as it declares them."
    globals()[name] = model  # importable by name: a config holding one pickles by reference (Ray workers)
    return model


@dataclass(frozen=True, eq=False)
class ArchitectureSpec(Generic[O]):
    """How one architecture trains (see the module docstring). Build one per architecture and register it."""

    architecture: Architecture
    options: type[O]
    recipe: Callable[[O], GanRecipe]
    discriminator_options: Mapping[str, Any] = field(default_factory=dict)
    generator_options: type[Config] | None = None
    discriminator_config: type[Config] | None = None

    def __post_init__(self) -> None:
        if self.generator_options is None:
            derived = settings_from_signature(self.architecture.generator, f"{self.name.upper()}GeneratorSettings")
            object.__setattr__(self, "generator_options", derived)
        if self.discriminator_config is None:
            # What training fixes (``discriminator_options``) is not the user's to set.
            derived = settings_from_signature(self.architecture.discriminator, f"{self.name.upper()}DiscriminatorSettings",
                                              exclude=frozenset(self.discriminator_options))
            object.__setattr__(self, "discriminator_config", derived)

    @property
    def name(self) -> str:
        """The architecture's name: ``model.arch`` in a training config."""
        return self.architecture.name

    def build_generator(self, options: Config | None = None) -> nn.Module:
        """The generator with ``options`` (an instance of :attr:`generator_options`; ``None``: its defaults)."""
        options = options if options is not None else self.generator_options()
        return self.architecture.generator(**options.model_dump())

    def build_discriminator(self, options: Config | None = None) -> nn.Module:
        """The discriminator as training builds it: ``options`` (an instance of :attr:`discriminator_config`;
        ``None``: its defaults) plus the fixed ``discriminator_options``."""
        options = options if options is not None else self.discriminator_config()
        return self.architecture.discriminator(**options.model_dump(), **self.discriminator_options)

    def build_recipe(self, options: O | None = None) -> GanRecipe:
        """The training recipe from its typed ``options`` (``None``: the defaults)."""
        return self.recipe(options if options is not None else self.options())


SPECS: Registry[ArchitectureSpec] = Registry("recipe architecture")


def register_spec(spec: ArchitectureSpec) -> ArchitectureSpec:
    """Make ``spec`` known under its architecture's name; returns it. Another spec of that name is a ``ValueError``."""
    return SPECS.register(spec)


def get_spec(name: str) -> ArchitectureSpec:
    """The spec of architecture ``name``; a one-line ``ValueError`` lists the trainable ones."""
    return SPECS.get(name)


def specs() -> list[ArchitectureSpec]:
    """Every registered spec, by name."""
    return [SPECS.get(name) for name in SPECS.names()]


def spec_names() -> list[str]:
    """Names of the architectures that can be trained."""
    return SPECS.names()


def build_recipe(arch: str, **options: Any) -> GanRecipe:
    """The recipe of ``arch`` from plain keyword options (benchmarks, tests, notebooks), validated into its
    typed options first: a bad or unknown option is a one-line ``ConfigError`` naming it."""
    spec = get_spec(arch)
    try:
        typed = spec.options.model_validate(options)
    except ValidationError as exc:
        key, message = first_error(exc)
        raise ConfigError(f"{arch} recipe option {key}: {message}") from None
    return spec.build_recipe(typed)


def discriminator_options(arch: str) -> dict[str, Any]:
    """Keyword arguments for ``get_architecture(arch).discriminator`` that ``arch``'s recipe trains with."""
    return dict(get_spec(arch).discriminator_options)
