"""Training recipes: each architecture's optimisers, LR schedule and losses, and the one GAN step.

A :class:`GanRecipe` says *how* an architecture trains (RN: ``geekyutao/RN``; LBAM: ``Vious/LBAM_Pytorch``), from
its typed options (:class:`RNOptions`, :class:`LBAMOptions`: ``model.options`` of the training config, whose
defaults are written there and nowhere else). :func:`gan_step` is the single training step shared by the
plain-PyTorch loop (tests, benchmarks) and the DeepSpeed loop: it never touches an optimiser itself but calls
``update_d(loss)`` / ``update_g(loss)``, which backpropagate and step (:func:`torch_updater` for plain PyTorch;
``engine.backward`` + ``engine.step`` under DeepSpeed). Which recipe, options and networks an architecture
trains with is its spec's business (:mod:`pipeline.train.spec`, :mod:`pipeline.train.architectures`).

Order of one step (the official RN order since 2022, applied to both models)::

    pred = G(image, mask)                                   # once
    D loss on pred.detach()  -> update_d                    # D step
    G loss with the *updated* D, recomputing D(pred), with D's parameters frozen -> update_g

Deviations from the official code (details and reasons in ``docs/deviations.md``):

* LBAM adversarial sign fixed (issue #7): D minimises ``mean D(fake) − mean D(real) + GP``, G minimises
  ``−0.1·mean D(fake)``. ``adversarial="official"`` keeps the published signs for comparison.
* LBAM's G loss used ``D_fake`` computed before the D update (stale, and an in-place autograd error on
  torch ≥ 1.5); here D(pred) is recomputed after the D step, as RN's current code does.
* RN's pre-2022 order (both losses first, then D step, then G backward) fails with the same in-place
  error; the current order is used.
* LBAM's gradient penalty works on any image size (the official one assumed square images); its D
  loss sees ``pred.detach()`` (the official one did not detach and cleared G's gradients afterwards).
* D's parameters are frozen while the G loss is built and backpropagated, so no gradient ever reaches D
  from the G loss (needed for DeepSpeed ZeRO-2 gradient hooks; the official code zeroed them instead).
* RN's hole L1 on a batch without holes is 0 instead of 0/0 = NaN.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Annotated, Callable, ClassVar, Iterable, Iterator, Mapping

import torch
import torch.nn as nn
from pydantic import Field, ValidationInfo, field_validator

from models.losses import (
    AdversarialMode,
    LBAMReconstructionLoss,
    composite,
    gradient_penalty,
    rn_discriminator_loss,
    rn_generator_loss,
    wgan_discriminator_loss,
    wgan_generator_loss,
)
from pipeline.config import Config
from pipeline.paths import LocalPath

__all__ = [
    "GanRecipe",
    "LBAMOptions",
    "LBAMRecipe",
    "OptimizerSettings",
    "RNOptions",
    "RNRecipe",
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


def _detached(values: Mapping[str, torch.Tensor]) -> Logs:
    return {name: value.detach().float().reshape(()) for name, value in values.items()}


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
    options object, which it receives as is.
    """

    name: ClassVar[str]
    # True for the official-mode recipes (pipeline.train.official): the authors' step, quirks included.
    official: ClassVar[bool] = False
    generator_optimizer: OptimizerSettings
    discriminator_optimizer: OptimizerSettings

    def lr_factor(self, epoch: int) -> float:
        """Multiplier on both base learning rates during ``epoch`` (1-based). Constant 1 unless overridden."""
        _check_epoch(epoch)
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


def _check_epoch(epoch: int) -> None:
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1:
        raise ValueError(f"epoch must be an integer >= 1 (epochs are 1-based), got {epoch!r}")


class RNOptions(Config):
    """``model.options`` of RN: the weights of its generator loss (the only place their defaults are written)."""

    l1_weight: float = Field(1.0, ge=0)
    gan_weight: float = Field(0.1, ge=0)
    official: bool = Field(
        False, description="train with the official step, quirks included (pipeline.train.official, docs/deviations.md)"
    )


class RNRecipe(GanRecipe):
    """Region Normalization (``geekyutao/RN``): hole L1 + 0.1 non-saturating GAN; Adam (0, 0.9), G 1e-4, D 1e-5.

    The LR schedule multiplies both rates by ``0.8^(epoch − 2)`` from epoch 3 on (epochs 1–2 at base),
    which is the official "after epoch e, lr = base·0.8^(e−1)" rule stated per training epoch.
    D sees the raw prediction, not the composite; real and fake pass through D separately (each forward
    runs one spectral-norm power iteration, as in the official step). D outputs logits and the BCE terms take
    them (``BCEWithLogits`` in float32: the official sigmoid + BCE without its half-precision saturation), so
    RN's spec builds the training D with ``use_sigmoid=False``.
    """

    name = "rn"

    def __init__(self, options: RNOptions | None = None) -> None:
        self.options = options if options is not None else RNOptions()
        self.l1_weight = self.options.l1_weight
        self.gan_weight = self.options.gan_weight
        self.generator_optimizer = OptimizerSettings(lr=1e-4, betas=(0.0, 0.9))
        self.discriminator_optimizer = OptimizerSettings(lr=1e-5, betas=(0.0, 0.9))

    def lr_factor(self, epoch: int) -> float:
        _check_epoch(epoch)
        return 0.8 ** max(epoch - 2, 0)

    def discriminator_loss(self, D, image, mask, pred_detached):
        terms = rn_discriminator_loss(D(image), D(pred_detached))
        return terms.total, _detached(terms.log_values("d_"))

    def generator_loss(self, D, image, mask, pred):
        terms = rn_generator_loss(
            pred, image, mask, D(pred), l1_weight=self.l1_weight, gan_weight=self.gan_weight
        )
        return terms.total, _detached(terms.log_values("g_"))


class LBAMOptions(Config):
    """``model.options`` of LBAM: loss weights, the adversarial sign and the VGG16 of the perceptual/style terms.

    The only place their defaults are written: reconstruction ``6·hole + 1·valid + 0.01·perceptual + 120·style``,
    adversarial weight 0.1, gradient penalty 10, the fixed WGAN-GP sign. ``vgg_weights`` is a path or fsspec URL
    of torchvision-format VGG16 weights; ``allow_random_vgg`` (tests and smoke runs only) stands in random ones.
    """

    hole: float = Field(6.0, ge=0)
    valid: float = Field(1.0, ge=0)
    perceptual: float = Field(0.01, ge=0)
    style: float = Field(120.0, ge=0)
    adversarial_weight: float = Field(0.1, ge=0)
    gp_weight: float = Field(10.0, ge=0)
    adversarial: AdversarialMode = "wgan-gp"
    official: bool = Field(
        False,
        description="train with the official step: published signs (whatever adversarial says), G scored by the "
        "pre-update D, global-batch D BatchNorm (pipeline.train.official, docs/deviations.md)",
    )
    allow_random_vgg: bool = False  # before vgg_weights: its check reads this
    vgg_weights: Annotated[str | None, LocalPath()] = Field(None, validate_default=True)

    @field_validator("vgg_weights")
    @classmethod
    def _weights_or_random(cls, weights: str | None, info: ValidationInfo) -> str | None:
        if weights is None and not info.data.get("allow_random_vgg", True):
            raise ValueError(
                "the perceptual/style losses' VGG16 needs torchvision-format weights (path or URL); "
                "set allow_random_vgg=true only for smoke tests"
            )
        return weights


class LBAMRecipe(GanRecipe):
    """LBAM (``Vious/LBAM_Pytorch``): reconstruction loss + WGAN-GP with the sign fixed; no LR schedule.

    G: Adam 1e-4, betas (0.5, 0.9); D: Adam 1e-5, betas (0, 0.9); one D step per G step. ``vgg`` is the
    frozen feature extractor of the perceptual/style terms (pool1..pool3), built from ``options`` unless given.
    The adversarial term enters G's loss with ``adversarial_weight``, the gradient penalty D's loss with
    ``gp_weight``. Every D call (real, fake, interpolates) is its own forward, so BatchNorm statistics match the
    official training step.
    """

    name = "lbam"

    def __init__(self, options: LBAMOptions, vgg: nn.Module | None = None) -> None:
        self.options = options
        if vgg is None:
            from models.vgg import VGG16Features  # imported lazily: only LBAM needs it

            vgg = VGG16Features(self.options.vgg_weights, allow_random=self.options.allow_random_vgg)
        o = self.options
        self.reconstruction = LBAMReconstructionLoss(
            vgg, hole=o.hole, valid=o.valid, perceptual=o.perceptual, style=o.style
        )
        self.adversarial_weight = o.adversarial_weight
        self.gp_weight = o.gp_weight
        self.adversarial = o.adversarial
        self.generator_optimizer = OptimizerSettings(lr=1e-4, betas=(0.5, 0.9))
        self.discriminator_optimizer = OptimizerSettings(lr=1e-5, betas=(0.0, 0.9))

    def to(self, device: torch.device | str) -> "LBAMRecipe":
        self.reconstruction.to(device)
        return self

    def discriminator_loss(self, D, image, mask, pred_detached):
        penalty = gradient_penalty(D, image, pred_detached, mask, weight=self.gp_weight)
        terms = wgan_discriminator_loss(D(image, mask), D(pred_detached, mask), penalty, self.adversarial)
        return terms.total, _detached(terms.log_values("d_"))

    def generator_loss(self, D, image, mask, pred):
        reconstruction = self.reconstruction(pred, image, mask)
        adv = wgan_generator_loss(D(pred, mask), self.adversarial)
        total = reconstruction.total + self.adversarial_weight * adv
        logs = {"g_loss": total.detach(), "g_reconstruction": reconstruction.total.detach(), "g_adv": adv.detach()}
        logs.update({f"g_{name}": value.detach() for name, value in reconstruction.parts.items()})
        return total, _detached(logs)
