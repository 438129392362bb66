"""Official mode: each paper's published training step, quirks included (config ``model.options.official: true``).

The default recipes (:mod:`pipeline.train.recipes`) fix the official code's bugs; ``docs/deviations.md`` lists
each fix. Official mode undoes them where the official code runs on current PyTorch, so a run reproduces the
authors' recipe rather than the fixed one. It runs through the same :func:`~pipeline.train.recipes.gan_step`
(``pred = G(...)`` once; D loss -> ``update_d``; G loss -> ``update_g``) with plain PyTorch optimisers or
DeepSpeed engines alike.

RN (``geekyutao/RN`` ``main.py``), checked against three iterations of the official loop
(``tests/data/rn_train_step_T.pt``):

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

LBAM (``Vious/LBAM_Pytorch`` ``train.py`` + ``loss/InpaintingLoss.py``):

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
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from models.losses import composite, gradient_penalty, wgan_discriminator_loss
from pipeline.train.global_batch import global_mean, use_global_batch_norm
from pipeline.train.recipes import LBAMOptions, LBAMRecipe, Logs, RNOptions, RNRecipe, _detached

__all__ = [
    "CarriedGradient", "LBAMOfficialRecipe", "RNOfficialRecipe", "bare_module", "bce_on_probabilities", "lbam_recipe",
    "rn_recipe",
]


def bare_module(D: nn.Module) -> nn.Module:
    """The discriminator module itself: unwraps holefill's ``DiscriminatorCaller`` (and its DeepSpeed engine)."""
    engine = getattr(D, "engine", None)
    return engine.module if engine is not None else D


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

    def __init__(self, options: RNOptions | None = None) -> None:
        super().__init__(options)
        self.carried = CarriedGradient()

    def discriminator_loss(self, D, image, mask, pred_detached):
        real = bce_on_probabilities(D(image), 1.0)
        fake = bce_on_probabilities(D(pred_detached), 0.0)
        d_loss = (real + fake) / 2
        carried = self.carried.take()
        total = d_loss if carried is None else d_loss + carried
        return total, _detached({"d_loss": d_loss, "d_real": real, "d_fake": fake})

    def generator_loss(self, D, image, mask, pred):
        adv = bce_on_probabilities(self.carried.discriminator(D)(pred), 1.0)
        merged = composite(pred, image, mask)
        # The official loss ran on the whole (gathered) batch: divide by the hole fraction of all ranks' images.
        # A batch without holes gives 0 instead of the official 0/0 = NaN.
        hole_fraction = global_mean(mask.float().mean()).clamp_min(torch.finfo(torch.float32).tiny)
        l1 = (image - merged).abs().float().mean() / hole_fraction
        total = self.gan_weight * adv + self.l1_weight * l1
        return total, _detached({"g_loss": total, "g_l1": l1, "g_adv": adv})


class LBAMOfficialRecipe(LBAMRecipe):
    """LBAM's official training step (see the module docstring); losses, optimisers as :class:`LBAMRecipe`."""

    official = True

    def __init__(self, options: LBAMOptions, vgg: nn.Module | None = None) -> None:
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
        return terms.total, _detached(terms.log_values("d_"))

    def generator_loss(self, D, image, mask, pred) -> tuple[torch.Tensor, Logs]:
        state, self._before_update = self._before_update, None
        if state is None:
            raise RuntimeError("LBAM official generator_loss needs the discriminator_loss of the same step first")
        module = bare_module(D)
        # Buffers are copies too: this re-scoring must not move BatchNorm's running statistics a fourth time.
        before_update = lambda pred_, mask_: functional_call(module, state, (pred_, mask_))  # noqa: E731
        return super().generator_loss(before_update, image, mask, pred)


def rn_recipe(options: RNOptions) -> RNRecipe:
    """RN's recipe for ``model.options``: the official step when ``official`` is set, the fixed one otherwise."""
    return RNOfficialRecipe(options) if options.official else RNRecipe(options)


def lbam_recipe(options: LBAMOptions) -> LBAMRecipe:
    """LBAM's recipe for ``model.options``: the official step when ``official`` is set, the fixed one otherwise."""
    return LBAMOfficialRecipe(options) if options.official else LBAMRecipe(options)
