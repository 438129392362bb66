"""Image-quality metrics per image (PSNR, SSIM, L1) and their accumulation per hole-ratio bucket.

All metrics take float (B,3,H,W) tensors in [0,1] (data range 1) and return one value per image (B,).
Evaluation feeds them *composited* outputs (prediction inside the hole, ground truth elsewhere).

* PSNR: ``10·log10(1 / MSE)`` over the whole image. A perfect image would give +inf, which would poison
  every average, so MSE is floored at 1e-10 (100 dB).
* SSIM (Wang et al. 2004): 11×11 Gaussian window with σ = 1.5, ``C1 = 0.01²``, ``C2 = 0.03²``, averaged over
  the SSIM map and then over channels. Padding: **'valid'** — the map only covers positions where the
  whole window lies inside the image, which is what ``skimage.metrics.structural_similarity(...,
  gaussian_weights=True, data_range=1)`` computes (it filters the padded image and then crops the
  border). Zero padding (the ``pytorch_ssim`` package LBAM used) drags border windows towards black.
* L1: mean absolute error over all pixels and channels.

:class:`BucketedMetrics` sums these per hole-ratio bucket (:mod:`pipeline.buckets`) and all-reduces
the sums and counts across ranks. It does not deduplicate: reading every evaluation sample exactly once
across ranks is the eval loader's job.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline.buckets import HOLE_RATIO_BUCKETS, Bucket, bucket_names, bucket_of, check_buckets

__all__ = ["BucketedMetrics", "METRIC_NAMES", "l1", "psnr", "ssim"]

METRIC_NAMES: tuple[str, ...] = ("psnr", "ssim", "l1")

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_C1 = 0.01**2
SSIM_C2 = 0.03**2
_MIN_MSE = 1e-10  # PSNR ceiling of 100 dB for a perfect reconstruction


def _check_pair(pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    if pred.dim() != 4:
        raise ValueError(f"pred and target must be (B,C,H,W) images, got shape {tuple(pred.shape)}")
    if not (pred.is_floating_point() and target.is_floating_point()):
        raise ValueError(f"pred and target must be float tensors in [0,1], got {pred.dtype} and {target.dtype}")


def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image (data range 1), shape (B,)."""
    _check_pair(pred, target)
    mse = (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(1.0 / mse.clamp_min(_MIN_MSE))


def l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error per image over all pixels and channels, shape (B,)."""
    _check_pair(pred, target)
    return (pred.float() - target.float()).abs().flatten(1).mean(dim=1)


@functools.lru_cache(maxsize=8)
def _gaussian_taps(device: torch.device) -> torch.Tensor:
    offsets = torch.arange(SSIM_WINDOW, dtype=torch.float64) - (SSIM_WINDOW - 1) / 2
    taps = torch.exp(-(offsets**2) / (2 * SSIM_SIGMA**2))
    return (taps / taps.sum()).to(device=device, dtype=torch.float32)


def _window_mean(x: torch.Tensor) -> torch.Tensor:
    """Gaussian-weighted local mean of every channel, 'valid' positions only (separable: rows then columns)."""
    channels = x.shape[1]
    taps = _gaussian_taps(x.device)
    horizontal = taps.view(1, 1, 1, SSIM_WINDOW).expand(channels, 1, 1, SSIM_WINDOW)
    vertical = taps.view(1, 1, SSIM_WINDOW, 1).expand(channels, 1, SSIM_WINDOW, 1)
    return F.conv2d(F.conv2d(x, horizontal, groups=channels), vertical, groups=channels)


def ssim(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Structural similarity per image, shape (B,): Gaussian 11×11 window (σ 1.5), 'valid' padding.

    Constants ``C1 = 0.01²`` and ``C2 = 0.03²`` assume data range 1. The SSIM map is averaged over all
    valid positions of each channel, then over channels. Images must be at least 11×11.
    """
    _check_pair(pred, target)
    h, w = pred.shape[-2:]
    if h < SSIM_WINDOW or w < SSIM_WINDOW:
        raise ValueError(f"ssim needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {h}x{w}")
    x, y = pred.float(), target.float()
    # One filtering pass over the five moments stacked along the batch axis.
    batch = x.shape[0]
    moments = _window_mean(torch.cat([x, y, x * x, y * y, x * y], dim=0))
    mu_x, mu_y, xx, yy, xy = moments.split(batch, dim=0)
    mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
    var_x, var_y, cov_xy = xx - mu_xx, yy - mu_yy, xy - mu_xy
    ssim_map = ((2 * mu_xy + SSIM_C1) * (2 * cov_xy + SSIM_C2)) / (
        (mu_xx + mu_yy + SSIM_C1) * (var_x + var_y + SSIM_C2)
    )
    return ssim_map.flatten(2).mean(dim=2).mean(dim=1)


class BucketedMetrics:
    """Running sums of PSNR, SSIM and L1 per hole-ratio bucket, reducible across ranks.

    ``update`` takes composited outputs, targets and each image's hole ratio; images whose ratio lies
    outside every bucket count towards the overall numbers only. ``summary()`` gives ``psnr``, ``ssim``,
    ``l1`` and ``count`` overall plus ``psnr/0.01-0.10``, …, ``count/0.50-0.60`` per bucket (metric keys
    of an empty bucket are left out; its count is 0). ``buckets``: the eval set's own (default: the papers').
    """

    def __init__(self, buckets: Sequence[Bucket] = HOLE_RATIO_BUCKETS) -> None:
        self.buckets = check_buckets(buckets)
        self.names = bucket_names(self.buckets)
        # Rows: one per bucket, then one for "outside every bucket"; columns: psnr, ssim, l1 sums and count.
        self._outside = len(self.names)
        self._local = torch.zeros(len(self.names) + 1, len(METRIC_NAMES) + 1, dtype=torch.float64)
        self._reduced: torch.Tensor | None = None

    def reset(self) -> None:
        """Forget everything accumulated."""
        self._local.zero_()
        self._reduced = None

    @torch.no_grad()
    def update(
        self, pred: torch.Tensor, target: torch.Tensor, hole_ratio: torch.Tensor | Sequence[float]
    ) -> None:
        """Add a batch of composited ``pred`` vs ``target`` images with their hole ratios (B,)."""
        _check_pair(pred, target)
        ratios = torch.as_tensor(hole_ratio, dtype=torch.float64).detach().cpu().reshape(-1)
        if ratios.numel() != pred.shape[0]:
            raise ValueError(f"hole_ratio must hold one value per image ({pred.shape[0]}), got {ratios.numel()}")
        values = torch.stack([psnr(pred, target), ssim(pred, target), l1(pred, target)], dim=1)
        values = values.to(device="cpu", dtype=torch.float64)
        rows = torch.tensor([self._row_of(r) for r in ratios.tolist()], dtype=torch.long)
        update = torch.cat([values, torch.ones(values.shape[0], 1, dtype=torch.float64)], dim=1)
        self._local.index_add_(0, rows, update)
        self._reduced = None  # a previous all-reduce no longer describes the local state

    def _row_of(self, ratio: float) -> int:
        name = bucket_of(ratio, self.buckets)
        return self._outside if name is None else self.names.index(name)

    def all_reduce(self) -> "BucketedMetrics":
        """Sum the sums and counts of every rank (a collective: call it on all ranks); returns ``self``.

        Without an initialised ``torch.distributed`` process group the local numbers stand. The local
        state is kept, so calling it twice never double-counts.
        """
        if not (dist.is_available() and dist.is_initialized()):
            self._reduced = self._local.clone()
            return self
        device = torch.device("cpu")
        if dist.get_backend() == "nccl":  # NCCL only reduces CUDA tensors
            device = torch.device("cuda", torch.cuda.current_device())
        totals = self._local.to(device, copy=True)  # .to() alone aliases on CPU; keep the local sums
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
        self._reduced = totals.cpu()
        return self

    def summary(self) -> dict[str, float]:
        """Means overall and per bucket (after :meth:`all_reduce`, over all ranks; before it, this rank's)."""
        table = self._reduced if self._reduced is not None else self._local
        out = self._means(table.sum(dim=0), suffix="")
        for index, name in enumerate(self.names):
            out.update(self._means(table[index], suffix=f"/{name}"))
        return out

    @staticmethod
    def _means(row: torch.Tensor, suffix: str) -> dict[str, float]:
        count = float(row[-1])
        out = {f"count{suffix}": count}
        if count > 0:
            for column, metric in enumerate(METRIC_NAMES):
                out[f"{metric}{suffix}"] = float(row[column]) / count
        return out

    def sums(self) -> torch.Tensor:
        """A copy of this rank's running sums (rows: buckets then "outside"; columns: metrics then count)."""
        return self._local.clone()

    @classmethod
    def from_sums(cls, sums: Sequence[torch.Tensor], buckets: Sequence[Bucket] = HOLE_RATIO_BUCKETS) -> "BucketedMetrics":
        """Accumulated sums of several workers (from :meth:`sums`, with the same ``buckets``) added into one."""
        merged = cls(buckets)
        for table in sums:
            if table.shape != merged._local.shape:
                raise ValueError(f"bucketed sums must have shape {tuple(merged._local.shape)}, got {tuple(table.shape)}")
            merged._local += table.to(torch.float64)
        return merged

    @property
    def count(self) -> int:
        """Images accumulated (over all ranks after :meth:`all_reduce`)."""
        table = self._reduced if self._reduced is not None else self._local
        return int(table[:, -1].sum())

