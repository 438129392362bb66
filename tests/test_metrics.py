"""Specification of the per-image metrics and their bucketed, distributed accumulation."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.buckets import BUCKET_NAMES
from pipeline.evaluation.metrics import BucketedMetrics, l1, psnr, ssim


def reference_ssim(x: torch.Tensor, y: torch.Tensor) -> float:
    """Direct SSIM of one (C,H,W) pair in float64: explicit 11x11 Gaussian windows, 'valid' positions."""
    x, y = x.double(), y.double()
    offsets = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-(offsets**2) / (2 * 1.5**2))
    window = torch.outer(g, g) / torch.outer(g, g).sum()
    c1, c2 = 0.01**2, 0.03**2
    per_channel = []
    for c in range(x.shape[0]):
        values = []
        for i in range(x.shape[1] - 10):
            for j in range(x.shape[2] - 10):
                a, b = x[c, i : i + 11, j : j + 11], y[c, i : i + 11, j : j + 11]
                mu_a, mu_b = (window * a).sum(), (window * b).sum()
                var_a = (window * (a - mu_a) ** 2).sum()
                var_b = (window * (b - mu_b) ** 2).sum()
                cov = (window * (a - mu_a) * (b - mu_b)).sum()
                values.append(
                    ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
                )
        per_channel.append(torch.stack(values).mean())
    return float(torch.stack(per_channel).mean())


def test_psnr_of_a_known_mse():
    target = torch.full((2, 3, 8, 8), 0.5)
    pred = target.clone()
    pred[0] += 0.1  # MSE 0.01 -> 20 dB
    pred[1] -= 0.01  # MSE 1e-4 -> 40 dB
    assert psnr(pred, target).tolist() == pytest.approx([20.0, 40.0], rel=1e-4)


def test_psnr_of_a_perfect_image_is_capped_at_100_db():
    image = torch.rand(1, 3, 8, 8)
    assert psnr(image, image).item() == pytest.approx(100.0)


def test_l1_is_the_mean_absolute_error_per_image():
    target = torch.zeros(2, 3, 4, 4)
    pred = torch.zeros(2, 3, 4, 4)
    pred[0, 0] = 0.6  # one of three channels off by 0.6
    assert l1(pred, target).tolist() == pytest.approx([0.2, 0.0])


def test_ssim_of_an_image_with_itself_is_one():
    image = torch.rand(2, 3, 16, 16)
    assert ssim(image, image).tolist() == pytest.approx([1.0, 1.0], abs=1e-6)


@pytest.mark.parametrize("size", [(16, 16), (13, 17)])
def test_ssim_matches_a_direct_reference(size):
    torch.manual_seed(0)
    target = torch.rand(2, 3, *size)
    pred = (target + 0.2 * torch.randn_like(target)).clamp(0, 1)
    expected = [reference_ssim(pred[i], target[i]) for i in range(2)]
    assert ssim(pred, target).tolist() == pytest.approx(expected, abs=1e-5)


def test_ssim_rejects_images_smaller_than_its_window():
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.rand(1, 3, 10, 32), torch.rand(1, 3, 10, 32))


def test_metrics_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        psnr(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 9))


def noisy_pair(seed: int, batch: int, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    target = torch.rand(batch, 3, size, size, generator=generator)
    pred = (target + 0.1 * torch.rand(batch, 3, size, size, generator=generator)).clamp(0, 1)
    return pred, target


def test_bucketed_metrics_average_per_bucket_and_overall():
    pred, target = noisy_pair(0, 4)
    ratios = [0.05, 0.07, 0.35, 0.9]  # two in the first bucket, one in (0.3,0.4], one outside every bucket
    metrics = BucketedMetrics()
    metrics.update(pred[:2], target[:2], ratios[:2])
    metrics.update(pred[2:], target[2:], torch.tensor(ratios[2:]))
    summary = metrics.summary()

    per_image = {"psnr": psnr(pred, target), "ssim": ssim(pred, target), "l1": l1(pred, target)}
    assert summary["count"] == 4 and metrics.count == 4
    for name, values in per_image.items():
        assert summary[name] == pytest.approx(values.double().mean().item())
        assert summary[f"{name}/0.01-0.10"] == pytest.approx(values[:2].double().mean().item())
        assert summary[f"{name}/0.30-0.40"] == pytest.approx(values[2].item())
    assert summary["count/0.01-0.10"] == 2 and summary["count/0.30-0.40"] == 1
    # An empty bucket reports its zero count and no metric values.
    assert summary["count/0.50-0.60"] == 0 and "psnr/0.50-0.60" not in summary
    assert {key.split("/", 1)[1] for key in summary if "/" in key} == set(BUCKET_NAMES)


def test_bucketed_metrics_require_one_ratio_per_image():
    pred, target = noisy_pair(0, 2)
    with pytest.raises(ValueError, match="one value per image"):
        BucketedMetrics().update(pred, target, [0.2])


def test_all_reduce_without_a_process_group_keeps_local_numbers_and_is_idempotent():
    pred, target = noisy_pair(1, 3)
    metrics = BucketedMetrics()
    metrics.update(pred, target, [0.15, 0.25, 0.45])
    before = metrics.summary()
    assert metrics.all_reduce().all_reduce().summary() == before
    metrics.update(pred[:1], target[:1], [0.15])
    assert metrics.summary()["count"] == 4
    metrics.reset()
    assert metrics.summary() == {"count": 0.0, **{f"count/{name}": 0.0 for name in BUCKET_NAMES}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reduce_on_rank(rank: int, world: int, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        pred, target = noisy_pair(10 + rank, 2)
        metrics = BucketedMetrics()
        metrics.update(pred, target, [0.05 + 0.2 * rank, 0.55])
        results[rank] = metrics.all_reduce().all_reduce().summary()
    finally:
        dist.destroy_process_group()


def test_all_reduce_sums_every_rank_exactly_once():
    world = 2
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_reduce_on_rank, args=(world, _free_port(), results), nprocs=world, join=True)
        per_rank = dict(results)

    expected = BucketedMetrics()
    for rank in range(world):
        pred, target = noisy_pair(10 + rank, 2)
        expected.update(pred, target, [0.05 + 0.2 * rank, 0.55])
    for rank in range(world):
        assert per_rank[rank].keys() == expected.summary().keys()
        for key, value in expected.summary().items():
            assert per_rank[rank][key] == pytest.approx(value), key
    assert per_rank[0]["count"] == 4 and per_rank[0]["count/0.50-0.60"] == 2
    assert math.isfinite(per_rank[0]["ssim"])
