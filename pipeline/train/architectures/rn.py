"""RN (Region Normalization, ``geekyutao/RN``) as holefill trains it: its settings, recipes and spec.

:class:`RNSettings` is ``model.options`` of an RN training config (the one place its defaults are written);
:class:`RNRecipe` is the fixed recipe, :class:`RNOfficialRecipe` the official step (``model.options.official``).
The networks are ``models/rn.py``'s. Deviations of the fixed recipe from the official code (``docs/deviations.md``):

* D outputs logits and the BCE terms take them (``BCEWithLogits`` in float32: the official sigmoid + BCE without its
  half-precision saturation), so the spec builds the training D with ``use_sigmoid=False``;
* the hole L1 on a batch without holes is 0 instead of 0/0 = NaN.

The official step, checked against three iterations of the official loop (``tests/data/rn_train_step_T.pt``):

* three D forwards in the official order: ``D(gt)``, ``D(pred.detach())``, then after D's step ``D(pred)``
  (each moves spectral norm's ``u``/``v``);
* BCE on D's sigmoid output (``nn.BCELoss``: log clamped at −100, saturating), in float32;
* **the stale D gradient**: the official loop clears D's gradient *before* ``g_loss.backward()``, so G's loss
  writes ``∂g_loss/∂θ_D`` into ``D.grad`` and the next D step adds it to its own gradient. Here
  :class:`CarriedGradient` lets the G loss see D through detached copies of its parameters, reads
  ``∂g_loss/∂θ_D`` off those copies after ``update_g``, and adds ``Σ θ_D · that gradient`` to the next D loss,
  whose gradient is exactly the carried one (D's own ``.grad`` is never written out of turn, so DeepSpeed's
  ZeRO gradient hooks see nothing unusual);
* the hole L1 divided by the hole fraction of the **global** batch (all-reduced over ranks), as the
  official single-process loss on the gathered batch did.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field
from torch.func import functional_call

from models.losses import composite, rn_discriminator_loss, rn_generator_loss
from models.registry import get_architecture
from pipeline.config import Config
from pipeline.train.global_batch import global_mean
from pipeline.train.recipes import GanRecipe, OptimizerSettings, bare_module, check_epoch, detached
from pipeline.train.spec import ArchitectureSpec, register_spec

__all__ = ["SPEC", "CarriedGradient", "RNOfficialRecipe", "RNRecipe", "RNSettings", "bce_on_probabilities", "rn_recipe"]


class RNSettings(Config):
    """``model.options`` of RN: the weights of its generator loss (the only place their defaults are written)."""

    l1_weight: float = Field(1.0, ge=0)
    gan_weight: float = Field(0.1, ge=0)
    official: bool = Field(
        False,
        description="train with the official step, quirks included (pipeline.train.architectures.rn, docs/deviations.md)",
    )


class RNRecipe(GanRecipe):
    """Hole L1 + 0.1 non-saturating GAN; Adam (0, 0.9), G 1e-4, D 1e-5.

    The LR schedule multiplies both rates by ``0.8^(epoch − 2)`` from epoch 3 on (epochs 1–2 at base),
    which is the official "after epoch e, lr = base·0.8^(e−1)" rule stated per training epoch.
    D sees the raw prediction, not the composite; real and fake pass through D separately (each forward
    runs one spectral-norm power iteration, as in the official step); D outputs logits (see the module docstring).
    """

    name = "rn"

    def __init__(self, options: RNSettings | None = None) -> None:
        self.options = options if options is not None else RNSettings()
        self.l1_weight = self.options.l1_weight
        self.gan_weight = self.options.gan_weight
        self.generator_optimizer = OptimizerSettings(lr=1e-4, betas=(0.0, 0.9))
        self.discriminator_optimizer = OptimizerSettings(lr=1e-5, betas=(0.0, 0.9))

    def lr_factor(self, epoch: int) -> float:
        check_epoch(epoch)
        return 0.8 ** max(epoch - 2, 0)

    def discriminator_loss(self, D, image, mask, pred_detached):
        terms = rn_discriminator_loss(D(image), D(pred_detached))
        return terms.total, detached(terms.log_values("d_"))

    def generator_loss(self, D, image, mask, pred):
        terms = rn_generator_loss(
            pred, image, mask, D(pred), l1_weight=self.l1_weight, gan_weight=self.gan_weight
        )
        return terms.total, detached(terms.log_values("g_"))


# ----------------------------------------------------------------------------------------- official step


def bce_on_probabilities(logits: torch.Tensor, target: float) -> torch.Tensor:
    """The official ``nn.BCELoss()(sigmoid(logits), target)``, in float32 whatever the autocast.

    Unlike ``BCEWithLogits`` it saturates: where ``sigmoid`` rounds to exactly 0 or 1 the log is clamped at
    −100 and the gradient vanishes, as in the official code.
    """
    with torch.autocast(device_type=logits.device.type, enabled=False):
        probabilities = torch.sigmoid(logits.float())
        return F.binary_cross_entropy(probabilities, torch.full_like(probabilities, target))


class CarriedGradient:
    """Carries ``∂(G loss)/∂θ_D`` of one step into the next D step, as RN's official loop does.

    :meth:`discriminator` returns D evaluated on detached copies of its parameters (same storage, fresh leaves
    that require grad): the G loss built with it records its gradient with respect to D's parameters on those
    leaves when ``update_g`` backpropagates, and nowhere else. :meth:`take` turns that gradient into the term
    ``Σ_p (p · g_p)`` for the next D loss: its gradient with respect to each ``p`` is exactly ``g_p``, so D's
    optimiser steps with ``∂d_loss/∂θ_D + g``, the official ``D.grad`` (the value of the term is not logged).
    With gradient accumulation the carried gradient would be scaled by the updater as well, so official mode
    requires ``gradient_accumulation_steps: 1``, like the official loop.
    """

    def __init__(self) -> None:
        self._pairs: list[tuple[nn.Parameter, torch.Tensor]] = []

    def discriminator(self, D: nn.Module) -> Callable[..., torch.Tensor]:
        """D as a function whose parameter gradients land on leaves this object keeps (one call per step)."""
        module = bare_module(D)
        leaves = {name: p.detach().requires_grad_(True) for name, p in module.named_parameters()}
        self._pairs = [(p, leaves[name]) for name, p in module.named_parameters()]
        return lambda *args: functional_call(module, leaves, args, strict=False)

    def take(self) -> torch.Tensor | None:
        """The carried term for this D loss (``None`` on the first step), and forget it."""
        pairs, self._pairs = self._pairs, []
        terms = [(p.float() * leaf.grad.float()).sum() for p, leaf in pairs if leaf.grad is not None]
        return torch.stack(terms).sum() if terms else None

    def reset(self) -> None:
        """Drop any carried gradient (e.g. after a resume: the official code also restarts without one)."""
        self._pairs = []


class RNOfficialRecipe(RNRecipe):
    """RN's official training step (see the module docstring); optimisers and LR schedule as :class:`RNRecipe`."""

    official = True

    def __init__(self, options: RNSettings | None = None) -> None:
        super().__init__(options)
        self.carried = CarriedGradient()

    def discriminator_loss(self, D, image, mask, pred_detached):
        real = bce_on_probabilities(D(image), 1.0)
        fake = bce_on_probabilities(D(pred_detached), 0.0)
        d_loss = (real + fake) / 2
        carried = self.carried.take()
        total = d_loss if carried is None else d_loss + carried
        return total, detached({"d_loss": d_loss, "d_real": real, "d_fake": fake})

    def generator_loss(self, D, image, mask, pred):
        adv = bce_on_probabilities(self.carried.discriminator(D)(pred), 1.0)
        merged = composite(pred, image, mask)
        # The official loss ran on the whole (gathered) batch: divide by the hole fraction of all ranks' images.
        # A batch without holes gives 0 instead of the official 0/0 = NaN.
        hole_fraction = global_mean(mask.float().mean()).clamp_min(torch.finfo(torch.float32).tiny)
        l1 = (image - merged).abs().float().mean() / hole_fraction
        total = self.gan_weight * adv + self.l1_weight * l1
        return total, detached({"g_loss": total, "g_l1": l1, "g_adv": adv})


def rn_recipe(options: RNSettings) -> RNRecipe:
    """RN's recipe for ``model.options``: the official step when ``official`` is set, the fixed one otherwise."""
    return RNOfficialRecipe(options) if options.official else RNRecipe(options)


SPEC = register_spec(ArchitectureSpec(
    architecture=get_architecture("rn"),
    options=RNSettings,
    recipe=rn_recipe,
    # The recipe's BCE terms take logits (BCEWithLogits in float32), so training drops D's final sigmoid.
    discriminator_options={"use_sigmoid": False},
))
