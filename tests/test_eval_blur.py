"""Why the gate moved off PSNR: a blurry fill beats a sharp one on PSNR, loses on FID and LPIPS, and the default
gate (FID + LPIPS when measured) refuses it while a gate on PSNR alone would promote it.

The networks carry the reference-checked pattern weights of ``tests/data/metrics_pattern.pt`` (no real weights
can be downloaded here); the ranking comes from what the networks compute (texture statistics), not from
trained features.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from support.metrics_pattern import metric_pattern_state_dict
from pipeline.buckets import BUCKET_NAMES
from pipeline.evaluation.perceptual import MetricWeights, PerceptualAccumulator, perceptual_summary
from pipeline.lifecycle.promotion import GateSettings, evaluate_gate
from pipeline.evaluation.metrics import BucketedMetrics

N, SIZE, HOLE = 4, 64, slice(16, 48)


def _textures(n: int) -> torch.Tensor:
    """Images with fine texture (what inpainting must reproduce): sums of random high-frequency gratings."""
    generator = torch.Generator().manual_seed(3)
    y, x = torch.meshgrid(torch.arange(SIZE, dtype=torch.float32), torch.arange(SIZE, dtype=torch.float32), indexing="ij")
    images = torch.zeros(n, 3, SIZE, SIZE)
    for _ in range(6):
        fy, fx = (torch.rand(2, n, 1, 1, generator=generator) - 0.5) * 1.6
        phase = torch.rand(n, 3, 1, 1, generator=generator) * 6.28
        images += torch.sin(fy[:, None] * y + fx[:, None] * x + phase)
    return (images / 12 + 0.5).clamp(0, 1)


def _gaussian_blur(images: torch.Tensor, sigma: float = 5.0) -> torch.Tensor:
    taps = torch.exp(-torch.arange(-9, 10, dtype=torch.float32) ** 2 / (2 * sigma**2))
    taps = (taps / taps.sum()).view(1, 1, 1, -1).repeat(3, 1, 1, 1)
    padded = F.pad(images, (9, 9, 9, 9), mode="reflect")
    return F.conv2d(F.conv2d(padded, taps, groups=3), taps.transpose(2, 3), groups=3)


def _fill(truth: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    out = truth.clone()
    out[:, :, HOLE, HOLE] = content[:, :, HOLE, HOLE]
    return out


@pytest.fixture(scope="module")
def scores():
    """Summaries (as an evaluation gives them) of a sharp and a blurry inpainting of the same holes."""
    weights = MetricWeights(("fid", "lpips"), "vgg", inception=metric_pattern_state_dict("inception"))
    inception, _ = weights.build()
    from models.lpips import LPIPS

    lpips = LPIPS.from_lpips_state("vgg", metric_pattern_state_dict("lpips_vgg"))
    truth = _textures(N)
    sharp = _fill(truth, torch.roll(truth, shifts=(2, 2), dims=(2, 3)))  # right texture, slightly misplaced
    blurry = _fill(truth, _gaussian_blur(truth))  # the mean-seeking guess PSNR rewards
    ratio = torch.full((N,), (HOLE.stop - HOLE.start) ** 2 / SIZE**2)
    out = {}
    for name, images in (("sharp", sharp), ("blurry", blurry)):
        bucketed, perceptual = BucketedMetrics(), PerceptualAccumulator(inception, lpips)
        bucketed.update(images, truth, ratio)
        perceptual.update(images, truth, ratio, [f"k{i}" for i in range(N)])
        out[name] = {**bucketed.summary(), **perceptual_summary(perceptual.part, ("fid", "lpips"))}
    return out


def test_a_blurred_fill_wins_on_psnr_and_loses_on_fid_and_lpips(scores):
    sharp, blurry = scores["sharp"], scores["blurry"]
    bucket = BUCKET_NAMES[2]  # hole ratio 0.25
    assert sharp["count"] == blurry["count"] == N and sharp[f"count/{bucket}"] == N
    assert blurry["psnr"] > sharp["psnr"] + 0.5
    assert blurry["fid"] > sharp["fid"] and blurry[f"fid/{bucket}"] > sharp[f"fid/{bucket}"]
    assert blurry["lpips"] > sharp["lpips"] and blurry[f"lpips/{bucket}"] > sharp[f"lpips/{bucket}"]


def test_the_default_gate_refuses_the_blurry_challenger_a_psnr_gate_would_promote(scores):
    sharp, blurry = scores["sharp"], scores["blurry"]
    decision = evaluate_gate(blurry, sharp, GateSettings())
    assert not decision.passed and decision.basis.startswith("default FID + LPIPS rules")
    assert any(r.startswith("fid overall: improvement -") for r in decision.reasons)
    assert any(r.startswith("lpips overall: improvement -") for r in decision.reasons)

    def psnr_only(summary):
        return {k: v for k, v in summary.items() if not k.startswith(("fid", "lpips"))}

    fallback = evaluate_gate(psnr_only(blurry), psnr_only(sharp), GateSettings())
    assert fallback.basis.startswith("default PSNR rules: FID/LPIPS weights are not configured")
    psnr_gate = GateSettings.model_validate({"rules": [{"metric": "psnr", "min_improvement": 0.01},
                                                     {"metric": "psnr", "scope": "each_bucket", "min_improvement": -0.5}]})
    assert evaluate_gate(blurry, sharp, psnr_gate).passed  # a gate on PSNR alone is fooled by the blur


def test_gate_rules_on_fid_and_lpips_are_configurable_per_bucket(scores):
    sharp, blurry = scores["sharp"], scores["blurry"]
    bucket = BUCKET_NAMES[2]
    lenient = GateSettings.model_validate({"rules": [
        {"metric": "psnr", "min_improvement": 0.0},
        {"metric": "fid", "scope": bucket, "min_improvement": -1e9},  # tolerate any FID rise in this bucket
    ]})
    decision = evaluate_gate(blurry, sharp, lenient)
    assert decision.passed and decision.basis.startswith("configured rules: psnr overall >= +0")
    strict = GateSettings.model_validate({"rules": [{"metric": "lpips", "scope": "each_bucket", "min_improvement": 0.0}]})
    refused = evaluate_gate(blurry, sharp, strict)
    assert refused.reasons == [f"lpips {bucket}: improvement {sharp['lpips'] - blurry['lpips']:+.4f} < required +0.0000"]
    assert [c.scope for c in refused.checks] == [bucket] and not refused.passed
