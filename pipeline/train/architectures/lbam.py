"""LBAM (Learnable Bidirectional Attention Maps, ``Vious/LBAM_Pytorch``) as holefill trains it: settings, recipes, spec.

:class:`LBAMSettings` is ``model.options`` of an LBAM training config (the one place its defaults are written);
:class:`LBAMRecipe` is the fixed recipe, :class:`LBAMOfficialRecipe` the official step (``model.options.official``).
The networks are ``models/lbam.py``'s. Deviations of the fixed recipe from the official code (``docs/deviations.md``):

* the adversarial sign is fixed (issue #7): D minimises ``mean D(fake) − mean D(real) + GP``, G minimises
  ``−0.1·mean D(fake)``; ``adversarial="official"`` keeps the published signs for comparison;
* G's loss is scored by D after its update (the official ``D_fake`` was stale, see below);
* the gradient penalty works on any image size (the official one assumed square images); its D loss sees
  ``pred.detach()`` (the official one did not detach and cleared G's gradients afterwards).

The official step (``train.py`` + ``loss/InpaintingLoss.py``):

* the published adversarial signs: D minimises ``mean D(fake) + mean D(real) + GP``, G adds ``+0.1·mean D(fake)``;
* D calls in the official order (real, fake, then the gradient penalty's interpolates);
* G's adversarial term is the ``D_fake`` of the D step, i.e. scored by D **before** its update. The official
  code backpropagates that graph after ``D_optimizer.step()`` changed D's weights in place, which current
  PyTorch refuses ("modified by an inplace operation"); PyTorch ≤ 1.4 silently differentiated with the
  *updated* weights against the *old* activations. The well-defined equivalent used here scores ``pred`` with a
  snapshot of D's parameters and buffers taken before the update, so value and gradient both belong to the
  pre-update D;
* D's BatchNorm statistics over the global batch (:class:`~pipeline.train.global_batch.GlobalBatchNorm2d`), as
  one process saw the whole batch of 16.
"""

from __future__ import annotations

from itertools import chain
from typing import Annotated

import torch
import torch.nn as nn
from pydantic import Field, ValidationInfo, field_validator
from torch.func import functional_call

from models.losses import AdversarialMode, LBAMReconstructionLoss, gradient_penalty, wgan_discriminator_loss, wgan_generator_loss
from models.registry import get_architecture
from models.vgg import VGG16Features
from pipeline.config import Config
from pipeline.paths import LocalPath
from pipeline.train.global_batch import use_global_batch_norm
from pipeline.train.recipes import GanRecipe, Logs, OptimizerSettings, bare_module, detached
from pipeline.train.spec import ArchitectureSpec, register_spec

__all__ = ["SPEC", "LBAMOfficialRecipe", "LBAMRecipe", "LBAMSettings", "lbam_recipe"]


class LBAMSettings(Config):
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
        "pre-update D, global-batch D BatchNorm (pipeline.train.architectures.lbam, docs/deviations.md)",
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
    """Reconstruction loss + WGAN-GP with the sign fixed; no LR schedule.

    G: Adam 1e-4, betas (0.5, 0.9); D: Adam 1e-5, betas (0, 0.9); one D step per G step. ``vgg`` is the
    frozen feature extractor of the perceptual/style terms (pool1..pool3), built from ``options`` unless given.
    The adversarial term enters G's loss with ``adversarial_weight``, the gradient penalty D's loss with
    ``gp_weight``. Every D call (real, fake, interpolates) is its own forward, so BatchNorm statistics match the
    official training step.
    """

    name = "lbam"

    def __init__(self, options: LBAMSettings, vgg: nn.Module | None = None) -> None:
        self.options = o = options
        if vgg is None:
            vgg = VGG16Features(o.vgg_weights, allow_random=o.allow_random_vgg)
        self.reconstruction = LBAMReconstructionLoss(vgg, hole=o.hole, valid=o.valid, perceptual=o.perceptual, style=o.style)
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
        return terms.total, detached(terms.log_values("d_"))

    def generator_loss(self, D, image, mask, pred):
        reconstruction = self.reconstruction(pred, image, mask)
        adv = wgan_generator_loss(D(pred, mask), self.adversarial)
        total = reconstruction.total + self.adversarial_weight * adv
        logs = {"g_loss": total.detach(), "g_reconstruction": reconstruction.total.detach(), "g_adv": adv.detach()}
        logs.update({f"g_{name}": value.detach() for name, value in reconstruction.parts.items()})
        return total, detached(logs)


class LBAMOfficialRecipe(LBAMRecipe):
    """LBAM's official training step (see the module docstring); losses, optimisers as :class:`LBAMRecipe`."""

    official = True

    def __init__(self, options: LBAMSettings, vgg: nn.Module | None = None) -> None:
        super().__init__(options, vgg)
        self.adversarial = "official"  # the published signs, whatever ``options.adversarial`` says
        self._before_update: dict[str, torch.Tensor] | None = None

    def prepare_discriminator(self, discriminator: nn.Module) -> nn.Module:
        """BatchNorm over the global batch, as the official single process saw it."""
        return use_global_batch_norm(discriminator)

    def discriminator_loss(self, D, image, mask, pred_detached):
        module = bare_module(D)
        # G's adversarial term is scored by this D, before its update: keep its parameters and buffers.
        self._before_update = {
            name: t.detach().clone() for name, t in chain(module.named_parameters(), module.named_buffers())
        }
        d_real = D(image, mask)
        d_fake = D(pred_detached, mask)
        penalty = gradient_penalty(D, image, pred_detached, mask, weight=self.gp_weight)
        terms = wgan_discriminator_loss(d_real, d_fake, penalty, "official")
        return terms.total, detached(terms.log_values("d_"))

    def generator_loss(self, D, image, mask, pred) -> tuple[torch.Tensor, Logs]:
        state, self._before_update = self._before_update, None
        if state is None:
            raise RuntimeError("LBAM official generator_loss needs the discriminator_loss of the same step first")
        module = bare_module(D)
        # Buffers are copies too: this re-scoring must not move BatchNorm's running statistics a fourth time.
        before_update = lambda pred_, mask_: functional_call(module, state, (pred_, mask_))  # noqa: E731
        return super().generator_loss(before_update, image, mask, pred)


def lbam_recipe(options: LBAMSettings) -> LBAMRecipe:
    """LBAM's recipe for ``model.options``: the official step when ``official`` is set, the fixed one otherwise."""
    return LBAMOfficialRecipe(options) if options.official else LBAMRecipe(options)


SPEC = register_spec(ArchitectureSpec(architecture=get_architecture("lbam"), options=LBAMSettings, recipe=lbam_recipe))
