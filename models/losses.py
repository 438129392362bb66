"""Training losses of RN and LBAM, as pure functions and one small module (no I/O, no optimisers).

Conventions: images are (B,3,H,W) in [0,1]; ``mask`` is (B,1,H,W) with **1 = hole** (LBAM's own
1 = valid convention never leaves ``models/lbam.py``). Every loss returns a :class:`LossTerms`: the
weighted ``total`` to backpropagate and its unweighted ``parts`` for logging. Weights and modes are required
arguments: the training recipes pass them from their typed options (``pipeline.train.architectures.rn.RNSettings``,
``LBAMSettings``), the one place their defaults (the official values quoted below) are written.

RN (``geekyutao/RN``)
    D: ``½[BCE(D(gt), 1) + BCE(D(pred), 0)]`` on the raw prediction (not the composite), from D's logits
    (``BCEWithLogits`` in float32: the official sigmoid + BCE without its half-precision saturation).
    G: ``l1_weight · mean|gt − merged| / mean(mask) + gan_weight · BCE(D(pred), 1)``, where
    ``merged = pred·mask + gt·(1 − mask)``; i.e. the mean absolute error per hole pixel and channel.

LBAM (``Vious/LBAM_Pytorch``)
    Reconstruction (:class:`LBAMReconstructionLoss`): ``6·hole + 1·valid + 0.01·perceptual + 120·style``,
    the L1 terms as means over all elements (not normalised by the hole area, as in the official code),
    perceptual and style on both the raw output and the composite against the ground truth at VGG16
    pool1..pool3, Gram matrices ``f·fᵀ/(C·h·w)``.
    Adversarial: WGAN-GP. By default with the **sign fixed** (issue #7): D minimises
    ``mean D(fake) − mean D(real) + GP`` and G minimises ``−mean D(fake)``. ``adversarial="official"``
    reproduces the published code (D: ``mean D(fake) + mean D(real) + GP``; G: ``+mean D(fake)``) for
    comparison runs only. The gradient penalty works for any image size (the official one assumed
    square inputs). See ``docs/deviations.md`` for every departure from the official code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "ADVERSARIAL_MODES",
    "AdversarialMode",
    "LossTerms",
    "LBAMReconstructionLoss",
    "composite",
    "gradient_penalty",
    "gram_matrix",
    "rn_discriminator_loss",
    "rn_generator_loss",
    "wgan_discriminator_loss",
    "wgan_generator_loss",
]

AdversarialMode = Literal["wgan-gp", "official"]
ADVERSARIAL_MODES: tuple[str, ...] = ("wgan-gp", "official")


@dataclass(frozen=True)
class LossTerms:
    """A loss to backpropagate (``total``, weighted) and its named, unweighted ``parts`` for logging."""

    total: torch.Tensor
    parts: Mapping[str, torch.Tensor]

    def log_values(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Detached ``{prefix + name: value}`` for the total (under ``prefix + "loss"``) and every part."""
        values = {f"{prefix}loss": self.total.detach()}
        values.update({f"{prefix}{name}": value.detach() for name, value in self.parts.items()})
        return values


# --------------------------------------------------------------------------------------------- helpers


def _check_same_shape(a: torch.Tensor, b: torch.Tensor, names: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{names} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def _check_mask_for(image: torch.Tensor, mask: torch.Tensor) -> None:
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] != image.shape[0] or mask.shape[-2:] != image.shape[-2:]:
        raise ValueError(
            f"mask must be (B,1,H,W) matching image {tuple(image.shape)} (1 = hole), got {tuple(mask.shape)}"
        )


def _bce_with_logits(logits: torch.Tensor, target: float) -> torch.Tensor:
    """Mean binary cross-entropy of ``sigmoid(logits)`` against a constant target, computed in float32.

    The discriminator hands over logits, not probabilities: in bf16 ``sigmoid(9) == 1.0`` exactly, so
    ``BCE(sigmoid(x))`` saturates to a zero (or, in fp16, NaN) gradient, while ``BCEWithLogits`` in float32
    is the same function without that cliff. Autocast is disabled so the loss runs on a float32 copy
    whatever the surrounding precision.
    """
    with torch.autocast(device_type=logits.device.type, enabled=False):
        x = logits.float()
        return F.binary_cross_entropy_with_logits(x, torch.full_like(x, target))


def composite(pred: torch.Tensor, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``pred`` inside the hole, ``image`` outside it (mask 1 = hole)."""
    return pred * mask + image * (1 - mask)


# ------------------------------------------------------------------------------------------------- RN


def rn_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> LossTerms:
    """RN discriminator loss ``½[BCE(D(gt), 1) + BCE(D(pred.detach()), 0)]``, from D's logits.

    ``real_logits``/``fake_logits`` are D's pre-sigmoid patch maps (``RNDiscriminator(use_sigmoid=False)``) for
    the ground truth and the (detached) raw prediction; the official sigmoid + BCE is computed as the same
    function, ``BCEWithLogits`` in float32. Parts: ``real`` and ``fake`` (the two BCE terms, unweighted).
    """
    real = _bce_with_logits(real_logits, 1.0)
    fake = _bce_with_logits(fake_logits, 0.0)
    return LossTerms(total=0.5 * (real + fake), parts={"real": real, "fake": fake})


def rn_generator_loss(
    pred: torch.Tensor,
    image: torch.Tensor,
    mask: torch.Tensor,
    fake_logits: torch.Tensor,
    *,
    l1_weight: float,
    gan_weight: float,
) -> LossTerms:
    """RN generator loss ``l1_weight·mean|gt − merged|/mean(mask) + gan_weight·BCE(D(pred), 1)``.

    ``fake_logits`` are the (updated) discriminator's logits on the raw, non-detached ``pred``.
    ``mean(mask)`` is taken over the whole batch tensor, as in the official code; a batch without any
    hole gives an L1 term of 0 rather than the official 0/0 = NaN.
    Parts: ``l1`` (hole L1) and ``adv`` (non-saturating GAN term), unweighted.
    """
    _check_same_shape(pred, image, "pred and image")
    _check_mask_for(image, mask)
    merged = composite(pred, image, mask)
    hole_fraction = mask.float().mean()
    # Outside the hole merged == gt, so the numerator only counts hole pixels; dividing by the hole
    # fraction turns the all-pixel mean into a per-hole-pixel mean. clamp_min keeps an empty mask finite.
    l1 = (image - merged).abs().float().mean() / hole_fraction.clamp_min(torch.finfo(torch.float32).tiny)
    adv = _bce_with_logits(fake_logits, 1.0)
    return LossTerms(total=l1_weight * l1 + gan_weight * adv, parts={"l1": l1, "adv": adv})


# ----------------------------------------------------------------------------------------------- LBAM


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """Per-sample Gram matrix ``f·fᵀ / (C·h·w)`` of (B,C,h,w) features, computed in float32 -> (B,C,C).

    Autocast is disabled here: ``bmm`` is on its low-precision list, so under bf16 autocast the ``.float()``
    would be undone and each Gram entry, a sum over h·w products, would carry bf16's 3 significant digits
    into LBAM's heaviest loss term (style, weight 120).
    """
    if features.dim() != 4:
        raise ValueError(f"features must be (B,C,h,w), got shape {tuple(features.shape)}")
    b, c, h, w = features.shape
    with torch.autocast(device_type=features.device.type, enabled=False):
        flat = features.float().reshape(b, c, h * w)
        return torch.bmm(flat, flat.transpose(1, 2)) / (c * h * w)


class LBAMReconstructionLoss(nn.Module):
    """LBAM's reconstruction loss: hole and valid L1, perceptual and style terms (official ``InpaintingLoss``).

    ``vgg`` maps a (B,3,H,W) image in [0,1] (no ImageNet normalisation, as in the official code) to a
    sequence of feature maps, pool1..pool3 for :class:`models.vgg.VGG16Features`. It is held frozen
    and in eval mode; its parameters never receive gradients. Terms, each a mean over all elements::

        hole       = L1(mask·out, mask·gt)                        (weight ``hole``, official 6)
        valid      = L1((1−mask)·out, (1−mask)·gt)                (weight ``valid``, official 1)
        perceptual = Σ_i L1(φ_i(out), φ_i(gt)) + L1(φ_i(comp), φ_i(gt))   (weight ``perceptual``, official 0.01)
        style      = Σ_i L1(G(φ_i(out)), G(φ_i(gt))) + L1(G(φ_i(comp)), G(φ_i(gt)))  (``style``, official 120)

    with ``comp = mask·out + (1−mask)·gt`` and ``G`` the Gram matrix ``f·fᵀ/(C·h·w)``. With both feature
    weights 0 the network is not run, and ``parts`` holds ``hole`` and ``valid`` only.
    """

    def __init__(
        self,
        vgg: nn.Module,
        *,
        hole: float,
        valid: float,
        perceptual: float,
        style: float,
    ) -> None:
        super().__init__()
        for name, weight in (("hole", hole), ("valid", valid), ("perceptual", perceptual), ("style", style)):
            if not weight >= 0:
                raise ValueError(f"LBAM loss weight {name} must be >= 0, got {weight}")
        self.vgg = vgg.eval()
        self.vgg.requires_grad_(False)
        self.weights = {"hole": hole, "valid": valid, "perceptual": perceptual, "style": style}

    def train(self, mode: bool = True) -> "LBAMReconstructionLoss":
        # The feature extractor is a fixed measuring device: keep it in eval mode whatever the caller does.
        super().train(mode)
        self.vgg.eval()
        return self

    def _features(self, images: torch.Tensor) -> Sequence[torch.Tensor]:
        parameter = next(self.vgg.parameters(), None)
        if parameter is not None and images.dtype != parameter.dtype:
            images = images.to(parameter.dtype)  # e.g. a bf16 generator output into an fp32 VGG
        return self.vgg(images)

    def forward(self, out: torch.Tensor, image: torch.Tensor, mask: torch.Tensor) -> LossTerms:
        """Reconstruction loss of the raw generator output ``out`` against ``image`` (mask 1 = hole)."""
        _check_same_shape(out, image, "out and image")
        _check_mask_for(image, mask)
        out32, gt32, hole_mask = out.float(), image.float(), mask.float()
        valid_mask = 1 - hole_mask
        hole = F.l1_loss(hole_mask * out32, hole_mask * gt32)
        valid = F.l1_loss(valid_mask * out32, valid_mask * gt32)

        w = self.weights
        if w["perceptual"] == 0 and w["style"] == 0:
            # Neither feature term counts (e.g. no ImageNet VGG16 at hand): skip the network, which with its
            # backward pass is most of a CPU step. The parts hold the terms that were computed.
            return LossTerms(total=w["hole"] * hole + w["valid"] * valid, parts={"hole": hole, "valid": valid})

        comp = composite(out, image.to(out.dtype), mask.to(out.dtype))
        batch = out.shape[0]
        # One VGG pass for output and composite together (same weights, no batch statistics in VGG);
        # the target features need no graph, so they are computed without one.
        predicted = self._features(torch.cat([out, comp], dim=0))
        with torch.no_grad():
            target = self._features(image)
        if len(predicted) != len(target) or not len(target):
            raise ValueError("vgg must return the same non-empty sequence of feature maps for every input")

        perceptual = out32.new_zeros(())
        style = out32.new_zeros(())
        for both, gt_features in zip(predicted, target):
            gt_features = gt_features.float()
            gt_gram = gram_matrix(gt_features)
            for features in (both[:batch], both[batch:]):
                perceptual = perceptual + F.l1_loss(features.float(), gt_features)
                style = style + F.l1_loss(gram_matrix(features), gt_gram)

        total = w["hole"] * hole + w["valid"] * valid + w["perceptual"] * perceptual + w["style"] * style
        return LossTerms(
            total=total, parts={"hole": hole, "valid": valid, "perceptual": perceptual, "style": style}
        )


def gradient_penalty(
    D: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    real: torch.Tensor,
    fake: torch.Tensor,
    mask: torch.Tensor,
    weight: float,
    *,
    alpha: torch.Tensor | None = None,
) -> torch.Tensor:
    """WGAN-GP penalty ``weight · mean_b (‖∇_x̂ D(x̂, mask)‖₂ − 1)²`` at ``x̂ = α·real + (1−α)·fake``.

    ``alpha`` holds one interpolation weight per sample (shape (B,)); it is drawn from U(0,1) when not
    given. Both endpoints are detached; the norm runs over all elements of each sample's gradient, so
    any image size works (the official code reshaped to a square ``(B,3,DIM,DIM)``). The result keeps
    its graph (``create_graph=True``) so the penalty trains D.
    """
    _check_same_shape(real, fake, "real and fake")
    batch = real.shape[0]
    if alpha is None:
        alpha = torch.rand(batch, device=real.device, dtype=real.dtype)
    elif alpha.shape != (batch,):
        raise ValueError(f"alpha must have shape ({batch},) (one weight per sample), got {tuple(alpha.shape)}")
    a = alpha.to(device=real.device, dtype=real.dtype).view(batch, *([1] * (real.dim() - 1)))
    interpolates = (a * real.detach() + (1 - a) * fake.detach()).requires_grad_(True)
    scores = D(interpolates, mask)
    (gradients,) = torch.autograd.grad(
        outputs=scores.sum(), inputs=interpolates, create_graph=True, retain_graph=True
    )
    norms = gradients.float().flatten(1).norm(2, dim=1)
    return weight * ((norms - 1) ** 2).mean()


def _check_mode(adversarial: str) -> None:
    if adversarial not in ADVERSARIAL_MODES:
        raise ValueError(f"adversarial must be one of {', '.join(ADVERSARIAL_MODES)}, got {adversarial!r}")


def wgan_discriminator_loss(
    d_real: torch.Tensor,
    d_fake: torch.Tensor,
    penalty: torch.Tensor,
    adversarial: AdversarialMode,
) -> LossTerms:
    """LBAM critic loss: ``mean D(fake) − mean D(real) + penalty`` (``"wgan-gp"``, the sign fixed).

    ``adversarial="official"`` gives the published ``mean D(fake) + mean D(real) + penalty`` (issue #7),
    kept only to compare against the official behaviour. Parts: ``real`` and ``fake`` (the mean critic
    scores) and ``gp`` (the penalty as added, weight included).
    """
    _check_mode(adversarial)
    real = d_real.float().mean()
    fake = d_fake.float().mean()
    sign = -1.0 if adversarial == "wgan-gp" else 1.0
    return LossTerms(total=fake + sign * real + penalty, parts={"real": real, "fake": fake, "gp": penalty})


def wgan_generator_loss(d_fake: torch.Tensor, adversarial: AdversarialMode) -> torch.Tensor:
    """LBAM generator adversarial term (unweighted): ``−mean D(fake)``, or ``+mean D(fake)`` if ``"official"``."""
    _check_mode(adversarial)
    fake = d_fake.float().mean()
    return -fake if adversarial == "wgan-gp" else fake
