"""Specification of the RN models (models/rn.py): official numerics, quirks, options, input rules, conversion."""

from __future__ import annotations

import pytest
import torch

from models.convert import from_official
from models.rn import (
    RNB,
    RNL,
    RNDiscriminator,
    RNGenerator,
    convert_official_discriminator,
    convert_official_generator,
    init_rn_weights,
    region_normalize,
)
from pattern_weights import load_reference, official_keys, official_pattern_state_dict


def trainable(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


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


def test_trainable_parameter_counts_equal_the_official_ones(generator, discriminator):
    assert trainable(generator) == 11_596_591
    assert trainable(discriminator) == 2_763_776


@pytest.mark.parametrize("part", ["generator", "discriminator"])
def test_state_dict_keys_and_shapes_are_the_official_ones(part, generator, discriminator):
    model = generator if part == "generator" else discriminator
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    official = {key: shape for key, shape, _ in official_keys("rn", part)}
    assert ours == official


def test_generator_output_is_a_raw_prediction_in_unit_range_identical_in_train_and_eval_for_one_image(generator):
    image = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    mask = binary_map(1, 1, 32, 48)
    with torch.no_grad():
        generator.train()
        train_out = generator(image, mask)
        generator.eval()
        eval_out = generator(image, mask)
    assert train_out.shape == (1, 3, 32, 48)
    assert float(train_out.min()) >= 0.0 and float(train_out.max()) <= 1.0
    # No running statistics anywhere: for a batch of one, train and eval mode compute the same function.
    assert torch.equal(train_out, eval_out)


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


def test_generator_fills_holes_with_white_and_ignores_hole_content(generator):
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    mask = binary_map(1, 1, 32, 32, seed=3)
    seen = []
    hook = generator.encoder_prePad.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    scribbled = torch.where(mask.bool(), torch.rand_like(image), image)
    try:
        with torch.no_grad():
            assert torch.equal(generator(image, mask), generator(scribbled, mask))
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


# ----------------------------------------------------------------------- official numerical reference


def test_pattern_weights_reproduce_the_official_outputs():
    reference = load_reference()
    G = RNGenerator()
    D = RNDiscriminator()
    G.load_state_dict(from_official("rn", "generator", official_pattern_state_dict("rn", "generator")), strict=True)
    D.load_state_dict(
        from_official("rn", "discriminator", official_pattern_state_dict("rn", "discriminator")), strict=True
    )
    G.train()
    D.train()  # the reference D output is the first train-mode forward: one power iteration from the pattern u, v
    with torch.no_grad():
        g_out = G(reference["image"], reference["hole_mask"].float())
        d_out = D(reference["image"])
    assert (g_out - reference["rn_G_out"]).abs().max() < 1e-4
    assert (d_out - reference["rn_D_out"]).abs().max() < 1e-4
    G.eval()  # inference (per-sample statistics) on the official batch of one: the very same numbers
    with torch.no_grad():
        assert torch.equal(G(reference["image"], reference["hole_mask"].float()), g_out)


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


# ----------------------------------------------------------------------------------------------- input


@pytest.mark.parametrize(
    "image, mask, message",
    [
        (torch.rand(1, 3, 32, 32), torch.zeros(1, 32, 32), "mask must be a"),
        (torch.rand(1, 3, 32, 32), torch.zeros(1, 3, 32, 32), "1 channel"),
        (torch.rand(1, 3, 32, 32), torch.zeros(1, 1, 16, 16), "does not match"),
        (torch.rand(1, 4, 32, 32), torch.zeros(1, 1, 32, 32), r"\(B,3,H,W\)"),
        (torch.rand(1, 3, 32, 32), torch.full((1, 1, 32, 32), 255.0), r"\[0,1\]"),
        (torch.rand(1, 3, 30, 30), torch.zeros(1, 1, 30, 30), "multiples of 4"),
    ],
)
def test_generator_rejects_bad_input_with_a_message_naming_the_rule(generator, image, mask, message):
    with pytest.raises(ValueError, match=message):
        generator(image, mask)


# ----------------------------------------------------------------------------------------- conversion


def test_converter_returns_the_official_state_dict_unchanged_and_strips_data_parallel_prefixes():
    official = official_pattern_state_dict("rn", "discriminator")
    converted = from_official("rn", "discriminator", {f"module.{k}": v for k, v in official.items()})
    assert converted.keys() == official.keys()
    assert all(converted[k] is official[k] for k in official)


def test_converter_names_a_missing_key():
    official = official_pattern_state_dict("rn", "generator")
    del official["middle.3.conv_block.6.sa.beta_conv.bias"]
    with pytest.raises(ValueError, match=r"missing keys: middle\.3\.conv_block\.6\.sa\.beta_conv\.bias"):
        convert_official_generator(official)


def test_converter_names_an_unexpected_key():
    official = official_pattern_state_dict("rn", "discriminator")
    official["conv6.0.weight_orig"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"unexpected keys: conv6\.0\.weight_orig"):
        convert_official_discriminator(official)


def test_converter_names_a_mis_shaped_key():
    official = official_pattern_state_dict("rn", "discriminator")
    official["conv1.0.weight_orig"] = torch.zeros(64, 4, 4, 4)
    with pytest.raises(ValueError, match=r"mis-shaped keys: conv1\.0\.weight_orig \(64, 4, 4, 4\) != \(64, 3, 4, 4\)"):
        convert_official_discriminator(official)


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
