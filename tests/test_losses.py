"""Specification of the RN and LBAM losses on tiny, hand-checkable tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from models.losses import (
    LBAMReconstructionLoss,
    gradient_penalty,
    gram_matrix,
    rn_discriminator_loss,
    rn_generator_loss,
    wgan_discriminator_loss,
    wgan_generator_loss,
)
from pipeline.train.architectures.lbam import LBAMSettings
from pipeline.train.architectures.rn import RNSettings

# The official weights, from the one place they are written: the recipes' typed options.
RN_WEIGHTS = RNSettings().model_dump(include={"l1_weight", "gan_weight"})
LBAM_WEIGHTS = LBAMSettings(allow_random_vgg=True).model_dump(include={"hole", "valid", "perceptual", "style"})


def one_hole_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Black 2x2 image, prediction 0.5 everywhere, one hole pixel (a quarter of the image)."""
    image = torch.zeros(1, 3, 2, 2)
    pred = torch.full((1, 3, 2, 2), 0.5, requires_grad=True)
    mask = torch.zeros(1, 1, 2, 2)
    mask[0, 0, 0, 0] = 1
    return pred, image, mask


class IdentityFeatures(nn.Module):
    """Stand-in feature extractor: the image itself is the only "feature map"."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x * self.scale]


# ------------------------------------------------------------------------------------------------- RN


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_rn_discriminator_loss_is_half_the_sum_of_real_and_fake_bce():
    # D hands over logits; the loss is BCE of their sigmoid, i.e. of probabilities 0.8, 0.6 / 0.3, 0.1.
    d_real = torch.tensor([[_logit(0.8)], [_logit(0.6)]])
    d_fake = torch.tensor([[_logit(0.3)], [_logit(0.1)]])
    terms = rn_discriminator_loss(d_real, d_fake)
    real = -(math.log(0.8) + math.log(0.6)) / 2
    fake = -(math.log(0.7) + math.log(0.9)) / 2
    assert terms.parts["real"].item() == pytest.approx(real, rel=1e-6)
    assert terms.parts["fake"].item() == pytest.approx(fake, rel=1e-6)
    assert terms.total.item() == pytest.approx(0.5 * (real + fake), rel=1e-6)


def test_rn_generator_loss_is_hole_l1_per_hole_pixel_plus_weighted_nsgan():
    pred, image, mask = one_hole_batch()
    d_fake = torch.zeros(1, 1, 2, 2)  # logit 0: probability 0.5
    terms = rn_generator_loss(pred, image, mask, d_fake, **RN_WEIGHTS)
    # merged differs from gt only at the hole pixel, by 0.5 in each channel: 0.5 per hole pixel.
    assert terms.parts["l1"].item() == pytest.approx(0.5)
    assert terms.parts["adv"].item() == pytest.approx(math.log(2))
    assert terms.total.item() == pytest.approx(0.5 + 0.1 * math.log(2))
    weighted = rn_generator_loss(pred, image, mask, d_fake, l1_weight=2.0, gan_weight=0.0)
    assert weighted.total.item() == pytest.approx(1.0)


def test_rn_generator_l1_only_trains_the_hole():
    pred, image, mask = one_hole_batch()
    rn_generator_loss(pred, image, mask, torch.zeros(1, 1), l1_weight=1.0, gan_weight=0.0).total.backward()
    hole = mask.expand_as(pred).bool()
    assert torch.all(pred.grad[~hole] == 0)
    assert torch.all(pred.grad[hole] > 0)  # pred above gt: descending lowers it


def test_rn_generator_loss_without_holes_is_finite():
    pred, image, _ = one_hole_batch()
    terms = rn_generator_loss(pred, image, torch.zeros(1, 1, 2, 2), torch.zeros(1, 1), **RN_WEIGHTS)
    assert terms.parts["l1"].item() == 0.0
    assert math.isfinite(terms.total.item())


def test_rn_generator_loss_rejects_a_three_channel_mask():
    pred, image, _ = one_hole_batch()
    with pytest.raises(ValueError, match=r"mask must be \(B,1,H,W\)"):
        rn_generator_loss(pred, image, torch.zeros(1, 3, 2, 2), torch.zeros(1, 1), **RN_WEIGHTS)


# ----------------------------------------------------------------------------------------------- LBAM


def test_gram_matrix_is_f_ft_over_chw():
    features = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 2, 1, 2)
    expected = torch.tensor([[5.0, 11.0], [11.0, 25.0]]) / 4
    assert torch.allclose(gram_matrix(features)[0], expected)


def test_lbam_reconstruction_terms_by_hand():
    pred, image, mask = one_hole_batch()
    terms = LBAMReconstructionLoss(IdentityFeatures(), **LBAM_WEIGHTS)(pred, image, mask)
    parts = {name: value.item() for name, value in terms.parts.items()}
    # L1 means over all 12 elements: hole = 3·0.5/12, valid = 9·0.5/12 (no hole-area normalisation).
    assert parts["hole"] == pytest.approx(0.125)
    assert parts["valid"] == pytest.approx(0.375)
    # Perceptual on out (0.5 everywhere) and comp (0.5 at the hole only) vs the black image.
    assert parts["perceptual"] == pytest.approx(0.5 + 0.125)
    # Gram of out: every entry 4·0.25/(3·2·2) = 1/12; of comp: 0.25/12 = 1/48; of gt: 0.
    assert parts["style"] == pytest.approx(1 / 12 + 1 / 48)
    expected = 6 * 0.125 + 1 * 0.375 + 0.01 * 0.625 + 120 * (1 / 12 + 1 / 48)
    assert terms.total.item() == pytest.approx(expected)


def test_lbam_reconstruction_without_feature_terms_never_runs_the_feature_network():
    class Refuses(torch.nn.Module):
        def forward(self, images):
            raise AssertionError("the feature network ran although both of its weights are 0")

    pred, image, mask = one_hole_batch()
    terms = LBAMReconstructionLoss(Refuses(), hole=6.0, valid=1.0, perceptual=0.0, style=0.0)(pred, image, mask)
    assert set(terms.parts) == {"hole", "valid"}
    assert terms.total.item() == pytest.approx(6 * 0.125 + 1 * 0.375)


def test_lbam_reconstruction_is_zero_for_a_perfect_output_and_never_trains_the_vgg():
    from models.vgg import VGG16Features

    torch.manual_seed(0)
    vgg = VGG16Features(allow_random=True)
    loss = LBAMReconstructionLoss(vgg, **LBAM_WEIGHTS)
    image = torch.rand(2, 3, 16, 16)
    mask = (torch.rand(2, 1, 16, 16) > 0.7).float()
    assert loss(image.clone(), image, mask).total.item() == pytest.approx(0.0, abs=1e-7)

    pred = torch.rand(2, 3, 16, 16, requires_grad=True)
    loss.train()
    loss(pred, image, mask).total.backward()
    assert not vgg.training
    assert all(p.grad is None and not p.requires_grad for p in vgg.parameters())
    assert pred.grad is not None and pred.grad.abs().sum() > 0


def test_lbam_reconstruction_weights_are_validated():
    with pytest.raises(ValueError, match="weight style must be >= 0"):
        LBAMReconstructionLoss(IdentityFeatures(), **{**LBAM_WEIGHTS, "style": -1.0})


class QuadraticCritic(nn.Module):
    """D(x, m) = Σ w·x²·(1−m): gradient 2·w·x·(1−m), easy to write down directly."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.7))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return (self.w * x.pow(2) * (1 - mask)).flatten(1).sum(dim=1, keepdim=True)


def test_gradient_penalty_equals_a_direct_computation_on_a_non_square_image():
    torch.manual_seed(0)
    real, fake = torch.rand(3, 3, 4, 6), torch.rand(3, 3, 4, 6)
    mask = (torch.rand(3, 1, 4, 6) > 0.5).float()
    alpha = torch.tensor([0.0, 0.25, 1.0])
    critic = QuadraticCritic()
    penalty = gradient_penalty(critic, real, fake, mask, weight=10.0, alpha=alpha)

    x_hat = alpha.view(3, 1, 1, 1) * real + (1 - alpha.view(3, 1, 1, 1)) * fake
    grad = 2 * 0.7 * x_hat * (1 - mask)
    expected = 10.0 * ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()
    assert penalty.item() == pytest.approx(expected.item(), rel=1e-5)


def test_gradient_penalty_trains_the_critic_and_draws_alpha_per_sample():
    real, fake = torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8)
    mask = torch.zeros(4, 1, 8, 8)
    critic = QuadraticCritic()
    torch.manual_seed(1)
    drawn = gradient_penalty(critic, real, fake, mask, 10.0)
    torch.manual_seed(1)
    explicit = gradient_penalty(critic, real, fake, mask, 10.0, alpha=torch.rand(4))
    assert drawn.item() == pytest.approx(explicit.item(), rel=1e-6)
    drawn.backward()
    assert critic.w.grad is not None and critic.w.grad.abs() > 0
    with pytest.raises(ValueError, match="one weight per sample"):
        gradient_penalty(critic, real, fake, mask, 10.0, alpha=torch.rand(1))


def test_fixed_wgan_terms_push_real_up_and_fake_down():
    d_real = torch.tensor([[0.9], [0.7]], requires_grad=True)
    d_fake = torch.tensor([[0.2], [0.4]], requires_grad=True)
    penalty = torch.tensor(0.25)
    terms = wgan_discriminator_loss(d_real, d_fake, penalty, "wgan-gp")
    assert terms.total.item() == pytest.approx(0.3 - 0.8 + 0.25)
    terms.total.backward()
    # Gradient descent on D raises its real scores and lowers its fake scores.
    assert torch.all(d_real.grad < 0) and torch.all(d_fake.grad > 0)

    g_fake = torch.tensor([[0.2], [0.4]], requires_grad=True)
    adv = wgan_generator_loss(g_fake, "wgan-gp")
    assert adv.item() == pytest.approx(-0.3)
    adv.backward()
    assert torch.all(g_fake.grad < 0)  # G descends towards higher critic scores on its output


def test_official_wgan_mode_reproduces_the_published_signs():
    d_real = torch.tensor([[0.9], [0.7]])
    d_fake = torch.tensor([[0.2], [0.4]])
    terms = wgan_discriminator_loss(d_real, d_fake, torch.tensor(0.5), adversarial="official")
    assert terms.total.item() == pytest.approx(0.3 + 0.8 + 0.5)
    assert wgan_generator_loss(d_fake, adversarial="official").item() == pytest.approx(0.3)
    with pytest.raises(ValueError, match="adversarial must be one of"):
        wgan_generator_loss(d_fake, adversarial="hinge")


def test_bce_terms_work_inside_autocast():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = rn_discriminator_loss(torch.zeros(2, 1), torch.zeros(2, 1))
    assert terms.total.dtype == torch.float32
    assert terms.total.item() == pytest.approx(math.log(2), rel=1e-6)


# ------------------------------------------------------------------------------------- precision


def test_bce_with_logits_is_the_official_sigmoid_then_bce_in_fp32():
    logits = torch.linspace(-6, 6, 25, dtype=torch.float64).view(1, 1, 5, 5)
    for target, loss in ((1.0, lambda x: rn_discriminator_loss(x, -x).parts["real"]),
                         (0.0, lambda x: rn_discriminator_loss(-x, x).parts["fake"])):
        official = torch.nn.functional.binary_cross_entropy(torch.sigmoid(logits), torch.full_like(logits, target))
        assert loss(logits.float()).item() == pytest.approx(official.item(), rel=1e-6)


def test_a_saturated_bf16_discriminator_still_gives_the_generator_a_gradient():
    # A bf16 logit of 9 is a probability of exactly 1.0 in bf16: sigmoid + BCE has a zero gradient there
    # (and NaN in fp16), while the float32 BCEWithLogits gives the true -sigmoid(-9)/n.
    logits = torch.full((1, 1, 2, 2), 9.0, dtype=torch.bfloat16, requires_grad=True)
    assert torch.sigmoid(logits).eq(1).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rn_discriminator_loss(logits, logits.detach()).parts["real"].backward()
    expected = -torch.sigmoid(torch.tensor(-9.0)).item() / 4
    assert logits.grad.float().mean().item() == pytest.approx(expected, rel=1e-2)


def test_gram_matrices_are_fp32_accurate_under_bf16_autocast():
    # bmm is on autocast's low-precision list: without an autocast-disabled region the float32 cast is undone
    # and the Gram entries carry bf16 rounding (measured 0.4 % relative error on VGG-like features).
    torch.manual_seed(0)
    features = torch.rand(2, 64, 32, 32)
    reference = gram_matrix(features.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gram = gram_matrix(features)
    assert gram.dtype == torch.float32
    relative = ((gram.double() - reference).abs().max() / reference.abs().max()).item()
    assert relative < 1e-5, f"relative error {relative:.2e}"
