"""What every GAN recipe shares: the recipe interface, optimiser settings and the one GAN step.

A :class:`GanRecipe` says *how* an architecture trains (optimisers, LR schedule, losses) from its typed settings
(``model.options`` of the training config). Each architecture's recipes, fixed and official, sit with its settings
in its own module (:mod:`pipeline.train.architectures.rn`, :mod:`pipeline.train.architectures.lbam`), which also
registers its :class:`~pipeline.train.spec.ArchitectureSpec`. :func:`gan_step` is the single training step shared
by the plain-PyTorch loop (tests, benchmarks) and the DeepSpeed loop: it never touches an optimiser itself but calls
``update_d(loss)`` / ``update_g(loss)``, which backpropagate and step (:func:`torch_updater` for plain PyTorch;
``engine.backward`` + ``engine.step`` under DeepSpeed).

Order of one step (the official RN order since 2022, applied to every architecture)::

    pred = G(image, mask)                                   # once
    D loss on pred.detach()  -> update_d                    # D step
    G loss with the *updated* D, recomputing D(pred), with D's parameters frozen -> update_g

Deviations from the official code that the shared step makes (the per-architecture ones are listed in each
architecture's module; details and reasons in ``docs/deviations.md``):

* D(pred) is recomputed after the D step for G's loss (LBAM's official G loss used the stale ``D_fake``, an
  in-place autograd error on torch >= 1.5; RN's pre-2022 order fails with the same error).
* D's parameters are frozen while the G loss is built and backpropagated, so no gradient ever reaches D
  from the G loss (needed for DeepSpeed ZeRO-2 gradient hooks; the official code zeroed them instead).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterable, Iterator, Mapping

import torch
import torch.nn as nn

from models.losses import composite

__all__ = [
    "GanRecipe",
    "Logs",
    "OptimizerSettings",
    "Updater",
    "bare_module",
    "check_epoch",
    "detached",
    "frozen_parameters",
    "gan_step",
    "logs_to_floats",
    "torch_updater",
]

Updater = Callable[[torch.Tensor], None]
# Detached 0-dim tensors on the training device: turning them into Python numbers is a host-device sync, so
# the step returns tensors and only logging steps read them (:func:`logs_to_floats`).
Logs = dict[str, torch.Tensor]


# ------------------------------------------------------------------------------------------ optimisers


@dataclass(frozen=True)
class OptimizerSettings:
    """Adam settings of one network; ``lr`` is the base rate that :meth:`GanRecipe.lr_factor` scales."""

    lr: float
    betas: tuple[float, float]
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"optimizer lr must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optimizer betas must be two values in [0, 1), got {self.betas}")
        if not self.weight_decay >= 0:
            raise ValueError(f"optimizer weight_decay must be >= 0, got {self.weight_decay}")

    def build(self, parameters: Iterable[nn.Parameter], lr_factor: float = 1.0, fused: bool | None = None) -> torch.optim.Adam:
        """A ``torch.optim.Adam`` over ``parameters`` at ``lr · lr_factor`` (``fused``: PyTorch's fused kernel)."""
        return torch.optim.Adam(
            parameters, lr=self.lr * lr_factor, betas=self.betas, weight_decay=self.weight_decay, fused=fused
        )


# ------------------------------------------------------------------------------------------- the step


@contextlib.contextmanager
def frozen_parameters(module: nn.Module) -> Iterator[None]:
    """Temporarily set ``requires_grad=False`` on ``module``'s parameters; restores exactly those it froze.

    Building a loss through a frozen module records no gradient path into its parameters, so a later
    backward cannot write their ``.grad`` nor fire DeepSpeed's gradient hooks on them.
    """
    trainable = [p for p in module.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


def detached(values: Mapping[str, torch.Tensor]) -> Logs:
    """A recipe's log values as detached float32 scalars on their device (no host read: see :func:`logs_to_floats`)."""
    return {name: value.detach().float().reshape(()) for name, value in values.items()}


def bare_module(D: nn.Module) -> nn.Module:
    """The discriminator module itself: unwraps holefill's ``DiscriminatorCaller`` (and its DeepSpeed engine), for
    recipes that call D functionally (``torch.func.functional_call``) or read its parameters."""
    engine = getattr(D, "engine", None)
    return engine.module if engine is not None else D


def logs_to_floats(values: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Scalar log tensors -> Python floats with one host read (one device sync) instead of one per value."""
    if not values:
        return {}
    stacked = torch.stack([v.detach().float().reshape(()) for v in values.values()]).tolist()
    return dict(zip(values.keys(), stacked))


def torch_updater(optimizer: torch.optim.Optimizer) -> Updater:
    """``update(loss)`` for plain PyTorch: ``zero_grad`` -> ``loss.backward()`` -> ``optimizer.step()``."""

    def update(loss: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return update


def gan_step(
    recipe: "GanRecipe",
    G: nn.Module,
    D: nn.Module,
    image: torch.Tensor,
    mask: torch.Tensor,
    update_d: Updater,
    update_g: Updater,
) -> Logs:
    """One GAN training step: D update on ``pred.detach()``, then G update against the updated D.

    ``G`` runs once. ``update_d``/``update_g`` backpropagate and step (see module docstring). While the
    G loss is built and ``update_g`` runs, D's parameters are frozen, so D receives no gradient from it.
    Returns the merged logs as detached scalar tensors on the step's device (no host read; see
    :func:`logs_to_floats`): ``d_loss``, ``g_loss`` and the recipe's named parts.
    """
    pred = recipe.generate(G, image, mask)
    d_loss, d_logs = recipe.discriminator_loss(D, image, mask, pred.detach())
    update_d(d_loss)
    with frozen_parameters(D):
        g_loss, g_logs = recipe.generator_loss(D, image, mask, pred)
        update_g(g_loss)
    return {**d_logs, **g_logs}


# -------------------------------------------------------------------------------------------- recipes


class GanRecipe(ABC):
    """How one architecture trains: optimiser settings, LR schedule, generation and the two losses.

    Losses return ``(loss, logs)``: the tensor to backpropagate and detached scalar logs, among them ``d_loss``
    or ``g_loss`` and the unweighted parts prefixed ``d_``/``g_``. A recipe is built from its architecture's typed
    settings object (``model.options``), which it receives as is.
    """

    name: ClassVar[str]
    # True for the official-mode recipes (each architecture's module): the authors' step, quirks included.
    official: ClassVar[bool] = False
    generator_optimizer: OptimizerSettings
    discriminator_optimizer: OptimizerSettings

    def lr_factor(self, epoch: int) -> float:
        """Multiplier on both base learning rates during ``epoch`` (1-based). Constant 1 unless overridden."""
        check_epoch(epoch)
        return 1.0

    def generate(self, G: nn.Module, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The generator's raw prediction (not composited) for ``image`` with holes where ``mask`` is 1."""
        return G(image, mask)

    def composite(self, pred: torch.Tensor, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``pred`` inside the hole and ``image`` elsewhere: what evaluation and inference show."""
        return composite(pred, image, mask)

    def to(self, device: torch.device | str) -> "GanRecipe":
        """Move any loss-side modules (e.g. LBAM's VGG) to ``device``; returns ``self``."""
        return self

    def prepare_discriminator(self, discriminator: nn.Module) -> nn.Module:
        """The discriminator as this recipe trains it, called once before optimisers or engines are built.

        Unchanged by default; LBAM's official mode gives its BatchNorm layers global-batch statistics.
        """
        return discriminator

    @abstractmethod
    def discriminator_loss(
        self, D: nn.Module, image: torch.Tensor, mask: torch.Tensor, pred_detached: torch.Tensor
    ) -> tuple[torch.Tensor, Logs]:
        """D's loss on real ``image`` and the detached prediction."""

    @abstractmethod
    def generator_loss(
        self, D: nn.Module, image: torch.Tensor, mask: torch.Tensor, pred: torch.Tensor
    ) -> tuple[torch.Tensor, Logs]:
        """G's loss for ``pred`` (with its graph), judged by the current D."""


def check_epoch(epoch: int) -> None:
    """Refuse an epoch that is not a 1-based integer (what :meth:`GanRecipe.lr_factor` receives)."""
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1:
        raise ValueError(f"epoch must be an integer >= 1 (epochs are 1-based), got {epoch!r}")
