"""Training recipes: each architecture's optimisers, LR schedule and losses, and the one GAN step.

A :class:`GanRecipe` says *how* an architecture trains (MODELS.md A4/A5 for RN, A10/A12 for LBAM);
:func:`gan_step` is the single training step shared by the plain-PyTorch loop (tests, benchmarks) and
the DeepSpeed loop: it never touches an optimiser itself but calls ``update_d(loss)`` / ``update_g(loss)``,
which backpropagate and step (:func:`torch_updater` for plain PyTorch; ``engine.backward`` +
``engine.step`` under DeepSpeed).

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
from typing import Any, Callable, ClassVar, Iterable, Iterator, Literal, Mapping

import torch
import torch.nn as nn
from pydantic import Field, ValidationError

from models.losses import (
    LBAMReconstructionLoss,
    composite,
    gradient_penalty,
    rn_discriminator_loss,
    rn_generator_loss,
    wgan_discriminator_loss,
    wgan_generator_loss,
)
from pipeline.config import Config

__all__ = [
    "GanRecipe",
    "LBAMRecipe",
    "LBAMRecipeOptions",
    "OptimizerSettings",
    "RECIPE_OPTIONS",
    "RNRecipe",
    "RNRecipeOptions",
    "build_recipe",
    "discriminator_options",
    "frozen_parameters",
    "gan_step",
    "logs_to_floats",
    "recipe_names",
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

    def as_dict(self) -> dict[str, Any]:
        """Plain values, e.g. for MLflow params or a DeepSpeed ``optimizer.params`` section."""
        return {"lr": self.lr, "betas": list(self.betas), "weight_decay": self.weight_decay}


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
    or ``g_loss`` and the unweighted parts prefixed ``d_``/``g_``. ``discriminator_options`` are the keyword
    arguments the recipe's losses need the architecture's discriminator built with.
    """

    name: ClassVar[str]
    discriminator_options: ClassVar[Mapping[str, Any]] = {}
    generator_optimizer: OptimizerSettings
    discriminator_optimizer: OptimizerSettings

    def lr_factor(self, epoch: int) -> float:
        """Multiplier on both base learning rates during ``epoch`` (1-based). Constant 1 unless overridden."""
        _check_epoch(epoch)
        return 1.0

    def learning_rates(self, epoch: int) -> tuple[float, float]:
        """``(generator_lr, discriminator_lr)`` to use during ``epoch`` (1-based)."""
        factor = self.lr_factor(epoch)
        return self.generator_optimizer.lr * factor, self.discriminator_optimizer.lr * factor

    def generate(self, G: nn.Module, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The generator's raw prediction (not composited) for ``image`` with holes where ``mask`` is 1."""
        return G(image, mask)

    def composite(self, pred: torch.Tensor, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``pred`` inside the hole and ``image`` elsewhere: what evaluation and inference show."""
        return composite(pred, image, mask)

    def to(self, device: torch.device | str) -> "GanRecipe":
        """Move any loss-side modules (e.g. LBAM's VGG) to ``device``; returns ``self``."""
        return self

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


class RNRecipe(GanRecipe):
    """Region Normalization (``geekyutao/RN``): hole L1 + 0.1 non-saturating GAN; Adam (0, 0.9), G 1e-4, D 1e-5.

    The LR schedule multiplies both rates by ``0.8^(epoch − 2)`` from epoch 3 on (epochs 1–2 at base),
    which is the official "after epoch e, lr = base·0.8^(e−1)" rule stated per training epoch.
    D sees the raw prediction, not the composite; real and fake pass through D separately (each forward
    runs one spectral-norm power iteration, as in the official step). D outputs logits and the BCE terms take
    them (``BCEWithLogits`` in float32: the official sigmoid + BCE without its half-precision saturation).
    """

    name = "rn"
    discriminator_options = {"use_sigmoid": False}

    def __init__(self, l1_weight: float = 1.0, gan_weight: float = 0.1) -> None:
        options = _validated(RNRecipeOptions, "rn", {"l1_weight": l1_weight, "gan_weight": gan_weight})
        self.l1_weight = options.l1_weight
        self.gan_weight = options.gan_weight
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


class LBAMRecipe(GanRecipe):
    """LBAM (``Vious/LBAM_Pytorch``): reconstruction loss + WGAN-GP with the sign fixed; no LR schedule.

    G: Adam 1e-4, betas (0.5, 0.9); D: Adam 1e-5, betas (0, 0.9); one D step per G step. ``vgg`` is the
    frozen feature extractor of the perceptual/style terms (pool1..pool3). The adversarial term enters
    G's loss with ``adversarial_weight`` (0.1), the gradient penalty D's loss with ``gp_weight`` (10).
    Every D call (real, fake, interpolates) is its own forward, so BatchNorm statistics match the official
    training step.
    """

    name = "lbam"

    def __init__(
        self,
        vgg: nn.Module,
        hole: float = 6.0,
        valid: float = 1.0,
        perceptual: float = 0.01,
        style: float = 120.0,
        adversarial_weight: float = 0.1,
        gp_weight: float = 10.0,
        adversarial: Literal["wgan-gp", "official"] = "wgan-gp",
    ) -> None:
        options = _validated(
            LBAMRecipeOptions,
            "lbam",
            {
                "hole": hole, "valid": valid, "perceptual": perceptual, "style": style,
                "adversarial_weight": adversarial_weight, "gp_weight": gp_weight, "adversarial": adversarial,
            },
        )
        self.reconstruction = LBAMReconstructionLoss(
            vgg, hole=options.hole, valid=options.valid, perceptual=options.perceptual, style=options.style
        )
        self.adversarial_weight = options.adversarial_weight
        self.gp_weight = options.gp_weight
        self.adversarial = options.adversarial
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


# ------------------------------------------------------------------------------------ options/registry


class RNRecipeOptions(Config):
    """Options of :class:`RNRecipe` accepted by :func:`build_recipe` (``--set train.recipe.gan_weight=…``)."""

    l1_weight: float = Field(1.0, ge=0)
    gan_weight: float = Field(0.1, ge=0)


class LBAMRecipeOptions(Config):
    """Options of :class:`LBAMRecipe` accepted by :func:`build_recipe`; the VGG is built from the last two."""

    hole: float = Field(6.0, ge=0)
    valid: float = Field(1.0, ge=0)
    perceptual: float = Field(0.01, ge=0)
    style: float = Field(120.0, ge=0)
    adversarial_weight: float = Field(0.1, ge=0)
    gp_weight: float = Field(10.0, ge=0)
    adversarial: Literal["wgan-gp", "official"] = "wgan-gp"
    vgg_weights: str | None = None
    allow_random_vgg: bool = False


RECIPE_OPTIONS: dict[str, type[Config]] = {"rn": RNRecipeOptions, "lbam": LBAMRecipeOptions}


def _validated(options_type: type[Config], arch: str, values: Mapping[str, Any]) -> Any:
    """Validate recipe options; the first problem becomes a one-line ``ValueError`` naming the option."""
    try:
        return options_type(**values)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "options"
        raise ValueError(f"{arch} recipe option {where}: {error['msg']}") from None


def _build_rn(options: RNRecipeOptions) -> RNRecipe:
    return RNRecipe(l1_weight=options.l1_weight, gan_weight=options.gan_weight)


def _build_lbam(options: LBAMRecipeOptions) -> LBAMRecipe:
    from models.vgg import VGG16Features  # imported lazily: only LBAM needs it

    vgg = VGG16Features(options.vgg_weights, allow_random=options.allow_random_vgg)
    loss_options = options.model_dump(exclude={"vgg_weights", "allow_random_vgg"})
    return LBAMRecipe(vgg, **loss_options)


_BUILDERS: dict[str, Callable[[Any], GanRecipe]] = {"rn": _build_rn, "lbam": _build_lbam}


def discriminator_options(arch: str) -> dict[str, Any]:
    """Keyword arguments for ``get_architecture(arch).discriminator`` that ``arch``'s recipe trains with."""
    recipe_type = {"rn": RNRecipe, "lbam": LBAMRecipe}.get(arch)
    if recipe_type is None:
        raise ValueError(f"unknown recipe architecture {arch!r}; known: {', '.join(recipe_names())}")
    return dict(recipe_type.discriminator_options)


def recipe_names() -> list[str]:
    """Architectures that have a training recipe."""
    return sorted(_BUILDERS)


def build_recipe(arch: str, **options: Any) -> GanRecipe:
    """The training recipe of ``arch`` (``"rn"`` or ``"lbam"``) with validated ``options``.

    RN options: ``l1_weight``, ``gan_weight``. LBAM options: the loss weights of :class:`LBAMRecipe`,
    ``adversarial`` and, for its VGG16, ``vgg_weights`` (path or fsspec URL of torchvision-format
    weights) and ``allow_random_vgg`` (tests and smoke runs only). Unknown options are errors.
    """
    if arch not in _BUILDERS:
        raise ValueError(f"unknown recipe architecture {arch!r}; known: {', '.join(recipe_names())}")
    return _BUILDERS[arch](_validated(RECIPE_OPTIONS[arch], arch, options))
