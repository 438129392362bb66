"""Specification of the RN models (models/rn.py): region normalisation, RN-B/L, quirks, options, init.

What every architecture keeps (official counts and keys, the pattern outputs, hole content ignored, train/eval
agreement, bad input refused, converters refusing broken state dicts) is in ``test_every_architecture.py``.
"""

from __future__ import annotations

import pytest
import torch

from models.convert import from_official
from models.rn import (
    RNB,
    RNL,
    RNDiscriminator,
    RNGenerator,
    init_rn_weights,
    region_normalize,
)
from support.pattern_weights import official_pattern_state_dict


def binary_map(*shape: int, p: float = 0.3, seed: int = 0) -> torch.Tensor:
    return (torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) < p).float()


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def closed_form_region_norm(x: torch.Tensor, region: torch.Tensor, per_sample: bool, eps: float = 1e-5):
    """A1.3 closed form: per region, (x - mu_r) / sqrt(var_r + eps * N / S_r), regions summed."""
    region = region.expand_as(x)
    dims = (2, 3) if per_sample else (0, 2, 3)
    count = x[:, :1, :, :].numel() if not per_sample else x.shape[2] * x.shape[3]
    out = torch.zeros_like(x)
    for r in (region, 1 - region):
        size = r.sum(dims, keepdim=True).clamp_min(1)
        mean = (x * r).sum(dims, keepdim=True) / size
        var = ((x - mean) ** 2 * r).sum(dims, keepdim=True) / size
        out += r * (x - mean) / torch.sqrt(var + eps * count / size)
    return out


@pytest.fixture(scope="module")
def generator() -> RNGenerator:
    return RNGenerator()


@pytest.fixture(scope="module")
def discriminator() -> RNDiscriminator:
    return RNDiscriminator()


# ----------------------------------------------------------------------------------------- architecture


def test_in_eval_mode_each_image_gets_its_official_batch_of_one_output_whatever_its_batch_mates():
    torch.manual_seed(4)
    # Official statistics (pooled over the batch in training); constant biases so the outputs do not saturate.
    model = init_rn_weights(RNGenerator(residual_blocks=1), bias_std=0.0)
    # 64 px: bit-exactness also needs the convolution kernels to be batch-size invariant, which oneDNN's are at
    # these shapes (at 8x8 features its 3x3 256->512 kernel differs by ~1e-6 between batches of 1 and 3).
    image = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    image[1], image[2] = 1.0, 0.0  # a white and a black batch-mate
    mask = binary_map(3, 1, 64, 64, seed=6)
    with torch.no_grad():
        model.train()  # the official computation: batch statistics, here of one image each
        alone = torch.cat([model(image[i:i + 1], mask[i:i + 1]) for i in range(3)])
        pooled = model(image, mask)
        model.eval()
        batched = model(image, mask)
    assert torch.equal(batched, alone)
    # Training keeps the official pooled statistics: there the batch-mates change the first image's output.
    assert (pooled[:1] - alone[:1]).abs().max() > 0.05


def test_generator_fills_holes_with_white_before_encoding(generator):
    # That the output ignores what the hole holds is every architecture's contract (test_every_architecture.py).
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    mask = binary_map(1, 1, 32, 32, seed=3)
    seen = []
    hook = generator.encoder_prePad.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    try:
        with torch.no_grad():
            generator(image, mask)
    finally:
        hook.remove()
    # The encoder's input is the image with holes set to 1.0; the mask is not concatenated (3 channels).
    torch.testing.assert_close(seen[0], image * (1 - mask) + mask)


def test_discriminator_returns_the_patch_map_and_exposes_features(discriminator):
    image = torch.rand(2, 3, 64, 64)
    discriminator.eval()  # no power iteration: successive calls see the same weights
    with torch.no_grad():
        probabilities = discriminator(image)
        maps = discriminator.features(image)
    assert probabilities.shape == (2, 1, 6, 6)
    assert [m.shape[1] for m in maps] == [64, 128, 256, 512, 1]
    torch.testing.assert_close(probabilities, torch.sigmoid(maps[-1]))
    logits_model = RNDiscriminator(use_sigmoid=False)
    logits_model.load_state_dict(discriminator.state_dict())
    logits_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(logits_model(image), maps[-1])


# ------------------------------------------------------------------------------------- region normaliser


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("label_channels", [1, 6])
def test_region_normalize_equals_the_closed_form(per_sample, label_channels):
    x = randn(3, 6, 9, 11) * 2 + 0.5
    region = binary_map(3, label_channels, 9, 11, p=0.2, seed=4)
    expected = closed_form_region_norm(x, region, per_sample)
    torch.testing.assert_close(region_normalize(x, region, per_sample=per_sample), expected, atol=1e-5, rtol=1e-5)


def test_region_normalize_effective_epsilon_grows_as_the_region_shrinks():
    # A two-pixel region of a large map: eps*N/S_r dominates the tiny variance, shrinking the output.
    x = torch.zeros(1, 1, 64, 64)
    region = torch.zeros(1, 1, 64, 64)
    region[0, 0, 0, :2] = 1
    x[0, 0, 0, :2] = torch.tensor([-1e-2, 1e-2])
    out = region_normalize(x, region)
    plain_eps = 1e-2 / (1e-4 + 1e-5) ** 0.5
    effective_eps = 1e-2 / (1e-4 + 1e-5 * 64 * 64 / 2) ** 0.5
    assert float(out[0, 0, 0, 1]) == pytest.approx(effective_eps, rel=1e-4)
    assert float(out[0, 0, 0, 1]) < plain_eps / 10


def test_region_normalize_treats_an_empty_region_as_zero_not_nan():
    x = randn(2, 4, 8, 8)
    out = region_normalize(x, torch.zeros(2, 1, 8, 8))
    torch.testing.assert_close(out, torch.nn.functional.batch_norm(x, None, None, training=True))


def test_per_sample_statistics_make_an_image_independent_of_its_batch_mates():
    x = randn(2, 4, 8, 8, seed=5)
    x[1] = x[1] * 3 + 2  # a batch-mate with clearly different statistics
    region = binary_map(2, 1, 8, 8, seed=6)
    alone = region_normalize(x[:1], region[:1], per_sample=True)
    batched = region_normalize(x, region, per_sample=True)
    torch.testing.assert_close(batched[:1], alone, atol=1e-6, rtol=1e-6)
    # Per-sample mode normalises each image as the official mode does in a batch of one ...
    torch.testing.assert_close(alone, region_normalize(x[:1], region[:1]), atol=1e-6, rtol=1e-6)
    # ... whereas the official batch-pooled statistics let the batch-mate change the output.
    assert (region_normalize(x, region)[:1] - alone).abs().max() > 0.1


def test_region_label_receives_no_gradient():
    x = randn(2, 3, 6, 6).requires_grad_()
    region = binary_map(2, 1, 6, 6).requires_grad_()
    (region_normalize(x, region) * randn(2, 3, 6, 6, seed=9)).sum().backward()
    assert x.grad is not None and region.grad is None


def test_region_normalize_keeps_half_precision_inputs_accurate():
    x = randn(4, 8, 32, 32, seed=7) * 5 + 3
    region = binary_map(4, 1, 32, 32, seed=8)
    out = region_normalize(x.bfloat16(), region.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), region_normalize(x.bfloat16().float(), region), atol=2e-2, rtol=1e-2)


def test_region_normalize_rejects_mismatched_labels():
    with pytest.raises(ValueError, match="region shape"):
        region_normalize(randn(2, 4, 8, 8), torch.ones(2, 2, 8, 8))
    with pytest.raises(ValueError, match="region shape"):
        region_normalize(randn(2, 4, 8, 8), torch.ones(2, 1, 4, 4))


# ---------------------------------------------------------------------------------------------- RN-B/L


def test_rnb_resizes_the_mask_by_nearest_top_left_sampling_and_starts_as_plain_rn():
    x = randn(2, 5, 8, 8)
    mask = binary_map(2, 1, 32, 32, seed=10)
    layer = RNB(5)
    torch.testing.assert_close(layer(x, mask), region_normalize(x, mask[:, :, ::4, ::4]))


def test_rnb_gammas_are_region_specific_but_betas_are_added_everywhere():
    x = randn(1, 2, 8, 8)
    hole = binary_map(1, 1, 8, 8, seed=11)
    normalized = region_normalize(x, hole)
    layer = RNB(2)
    with torch.no_grad():
        layer.foreground_gamma.fill_(1.0)  # doubles the hole region only
        layer.foreground_beta.fill_(0.25)
        layer.background_beta.fill_(0.5)
    expected = normalized * (1 + hole) + 0.75  # official quirk: both betas at every pixel
    torch.testing.assert_close(layer(x, hole), expected)


def test_rnb_rejects_a_mask_that_is_not_one_channel_per_image():
    with pytest.raises(ValueError, match="RNB mask must be"):
        RNB(4)(randn(2, 4, 8, 8), torch.ones(2, 3, 16, 16))


@pytest.mark.parametrize("threshold", [0.0, 1.0])
def test_rnl_with_a_one_region_threshold_is_normalisation_then_spatial_affine(threshold):
    # sigmoid lies strictly in (0,1): threshold 0 puts every pixel in the region, 1 puts none there.
    x = randn(2, 4, 8, 8)
    layer = RNL(4, threshold=threshold)
    importance, gamma, beta = layer.sa(x)
    plain = torch.nn.functional.batch_norm(x, None, None, training=True)
    torch.testing.assert_close(layer(x), plain * (1 + gamma) + beta, atol=1e-5, rtol=1e-5)


def test_rnl_rejects_a_threshold_outside_the_sigmoid_range():
    with pytest.raises(ValueError, match="threshold"):
        RNL(4, threshold=1.5)


# ----------------------------------------------------------------------------------------- conversion


def test_converter_returns_the_official_state_dict_unchanged_and_strips_data_parallel_prefixes():
    # RN's keys are the official ones, so its converter is the identity; missing, unexpected and mis-shaped keys are
    # every architecture's contract (test_every_architecture.py).
    official = official_pattern_state_dict("rn", "discriminator")
    converted = from_official("rn", "discriminator", {f"module.{k}": v for k, v in official.items()})
    assert converted.keys() == official.keys()
    assert all(converted[k] is official[k] for k in official)


# --------------------------------------------------------------------------------------------- init


@torch.no_grad()
def test_official_initialisation_statistics(generator, discriminator):
    assert float(generator.encoder_conv1.weight.std()) == pytest.approx(0.1 * (2 / 147) ** 0.5, rel=0.05)
    sa_conv = generator.middle[0].conv_block[2].sa.conv1.weight
    assert float(sa_conv.std()) == pytest.approx(0.1 * (2 / 98) ** 0.5, rel=0.3)
    assert float(discriminator.conv4[0].weight_orig.std()) == pytest.approx(0.1 * (2 / 4096) ** 0.5, rel=0.05)
    # Official quirk: conv biases ~ N(1e-4, 1) rather than the constant 1e-4.
    biases = torch.cat([m.bias for m in generator.modules() if isinstance(m, torch.nn.Conv2d) and m.bias is not None])
    assert biases.numel() > 4000
    assert float(biases.std()) == pytest.approx(1.0, abs=0.05)
    assert abs(float(biases.mean())) < 0.05
    for layer in (generator.encoder_in1, generator.encoder_in2, generator.encoder_in3):
        assert all(bool((p == 0).all()) for p in layer.parameters())


def test_init_is_reproducible_with_a_generator_and_can_fix_the_bias_quirk():
    first = init_rn_weights(RNL(8), generator=torch.Generator().manual_seed(3))
    second = init_rn_weights(RNL(8), generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    constant = init_rn_weights(RNL(8), bias_std=0.0)
    assert bool((constant.sa.gamma_conv.bias == 1e-4).all())
