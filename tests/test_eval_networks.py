"""The evaluation networks and distances match their reference implementations.

``tests/data/metrics_pattern.pt`` holds torch-fidelity's FID Inception and lpips' LPIPS outputs under closed-form
pattern weights (``shared/reference/METRICS.md``); holefill's networks, loaded with the same weights through their
strict loaders, must reproduce them. The Fréchet distance and P-IDS/U-IDS are checked against closed forms.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from support.metrics_pattern import load_metrics_reference, metric_pattern_state_dict
from models.inception import FIDInceptionV3, resize_like_tensorflow1x, to_uint8
from models.lpips import LPIPS
from pipeline.evaluation.fid import fid_from_features, frechet_distance
from pipeline.evaluation.pids import inception_discriminative_scores


@pytest.fixture(scope="module")
def reference():
    return load_metrics_reference()


@pytest.fixture(scope="module")
def inception():
    return FIDInceptionV3.from_state_dict(metric_pattern_state_dict("inception"), "pattern")


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def test_fid_inception_matches_torch_fidelity_pool3_and_logits(inception, reference):
    images = reference["fid_input_uint8"]  # 256x341: exercises the resize to 299
    pool3 = inception(images)
    assert pool3.shape == (4, 2048) and pool3.dtype == torch.float32
    assert _relative(pool3, reference["fid_pool3_2048"]) < 1e-5
    assert _relative(inception.logits_unbiased(pool3), reference["fid_logits_unbiased"]) < 1e-5


def test_tensorflow_resize_is_not_torch_bilinear():
    # TF1 samples source pixel dst*in/out (no half-pixel centres): an upscale of a ramp keeps its first value
    # and reaches the last one early, where F.interpolate would not.
    ramp = torch.arange(4, dtype=torch.float32).view(1, 1, 1, 4).expand(1, 1, 4, 4)
    ours = resize_like_tensorflow1x(ramp, size=8)[0, 0, 0]
    assert torch.allclose(ours, torch.tensor([0, 0.5, 1, 1.5, 2, 2.5, 3, 3]))
    assert not torch.allclose(ours, F.interpolate(ramp, size=(8, 8), mode="bilinear", align_corners=False)[0, 0, 0])


def test_uint8_quantisation_rounds_like_saving_a_png():
    assert to_uint8(torch.tensor([0.0, 0.5 / 255, 0.49 / 255, 1.0, 1.2, -0.1])).tolist() == [0, 1, 0, 255, 255, 0]


@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_lpips_matches_the_lpips_package_in_both_weight_layouts(net, reference):
    state = metric_pattern_state_dict(f"lpips_{net}")
    whole = LPIPS.from_lpips_state(net, state)
    heads = {k: v for k, v in state.items() if k.startswith("lin") and not k.startswith("lins")}
    backbone = {"features." + k.split(".", 2)[2]: v for k, v in state.items() if k.startswith("net.")}
    backbone["classifier.0.weight"] = torch.zeros(2, 2)  # torchvision files carry the classifier: ignored
    from_files = LPIPS.from_files_state(net, heads, backbone)
    for model in (whole, from_files):
        distance = model.distance(reference["lpips_in0"], reference["lpips_in1"])
        assert _relative(distance, reference[f"lpips_{net}"]) < 1e-5


def test_lpips_of_an_image_with_itself_is_zero(reference):
    model = LPIPS.from_lpips_state("vgg", metric_pattern_state_dict("lpips_vgg"))
    image = (reference["lpips_in0"] + 1) / 2
    assert torch.equal(model(image, image), torch.zeros(3))


def test_strict_loading_names_missing_extra_and_misshaped_entries():
    state = metric_pattern_state_dict("inception")
    broken = dict(state)
    del broken["Mixed_7c.branch_pool.conv.weight"]
    broken["AuxLogits.fc.weight"] = torch.zeros(1)
    broken["fc.weight"] = torch.zeros(1000, 2048)
    with pytest.raises(ValueError, match=r"missing Mixed_7c\.branch_pool\.conv\.weight; unexpected AuxLogits\.fc\.weight; "
                                         r"mis-shaped fc\.weight \(1000, 2048\) \(expected \(1008, 2048\)\)"):
        FIDInceptionV3.from_state_dict(broken, "bad.pth")
    alex_heads = {k: v for k, v in metric_pattern_state_dict("lpips_alex").items() if k.startswith("lin")
                  and not k.startswith("lins")}
    with pytest.raises(ValueError, match=r"heads.pth is not an LPIPS v0.1 vgg head file: mis-shaped lin1.model.1.weight "
                                         r"\(1, 192, 1, 1\) \(expected \(1, 128, 1, 1\)\)"):
        LPIPS.from_files_state("vgg", alex_heads, {}, heads_source="heads.pth")


def test_frechet_distance_matches_torch_fidelity(reference):
    value = fid_from_features(reference["fd_features_a"].numpy(), reference["fd_features_b"].numpy())
    assert abs(value - float(reference["fd_value"])) <= 1e-6 * float(reference["fd_value"])


@pytest.mark.parametrize("n", [64, 8])  # more samples than dimensions (sqrtm), fewer (the exact low-rank form)
def test_fid_of_a_set_against_itself_is_zero(n):
    features = np.random.default_rng(0).normal(size=(n, 16))
    assert abs(fid_from_features(features, features)) < 1e-8


def test_the_low_rank_form_equals_scipy_sqrtm_where_both_apply(reference):
    from pipeline.evaluation.fid import _fid_low_rank

    a, b = reference["fd_features_a"].numpy(), reference["fd_features_b"].numpy()
    assert _fid_low_rank(a, b) == pytest.approx(float(reference["fd_value"]), rel=1e-9)
    few = np.random.default_rng(4).normal(size=(2, 30, 40))  # 30 samples of 40-d: singular covariances
    assert _fid_low_rank(few[0], few[1]) == pytest.approx(frechet_distance(
        few[0].mean(0), np.cov(few[0], rowvar=False), few[1].mean(0), np.cov(few[1], rowvar=False)), rel=1e-4)


def test_frechet_distance_of_gaussians_matches_the_closed_form():
    # For commuting (here diagonal) covariances Tr((S1 S2)^1/2) = sum sqrt(s1 s2), so
    # FID = |mu1 - mu2|^2 + sum (sqrt(s1) - sqrt(s2))^2.
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    s1, s2 = rng.uniform(0.5, 2.0, size=8), rng.uniform(0.5, 2.0, size=8)
    closed = float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(closed, rel=1e-10)
    # Sampled Gaussian features converge to it (FID's estimate from N samples is biased upwards: report N).
    a = mu1 + rng.normal(size=(20000, 8)) * np.sqrt(s1)
    b = mu2 + rng.normal(size=(20000, 8)) * np.sqrt(s2)
    assert fid_from_features(a, b) == pytest.approx(closed, rel=0.02)


def test_pids_uids_are_half_for_indistinguishable_sets_and_zero_for_separable_ones():
    rng = np.random.default_rng(2)
    real = rng.normal(size=(200, 8))
    p_ids, u_ids = inception_discriminative_scores(real, real + 5.0)  # every fake is far off: the SVM never errs
    assert (p_ids, u_ids) == (0.0, 0.0)
    p_ids, u_ids = inception_discriminative_scores(real, rng.normal(size=(200, 8)))
    assert 0.3 < p_ids < 0.7 and 0.3 < u_ids <= 0.6
