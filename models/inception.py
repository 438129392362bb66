"""The FID InceptionV3: TensorFlow's 2015-12-05 Inception graph as pytorch-fid and torch-fidelity run it.

FID, P-IDS and U-IDS are only comparable with published numbers when they come from this exact network:
torchvision's Inception3 layout with the FID patches (pytorch-fid's ``FIDInceptionA``, ``FIDInceptionC``,
``FIDInceptionE_1`` average-pool their pooling branch without counting the padding; ``FIDInceptionE_2``
(Mixed_7c) max-pools it), 1008 classes, no auxiliary head, and TensorFlow 1.x input handling: uint8 RGB of
any size, bilinear resize to 299 without half-pixel centres, then ``(x - 128) / 128``.

Weights: ``pt_inception-2015-12-05-6726825d.pth`` (pytorch-fid's release; torch-fidelity ships the same as
``weights-inception-2015-12-05-6726825d.pth``), loaded with strict key and shape checks.
"""

from __future__ import annotations

import logging
from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.statedict import check_state_dict

__all__ = ["FIDInceptionV3", "INPUT_SIZE", "POOL3_DIM", "resize_like_tensorflow1x", "to_uint8"]

log = logging.getLogger(__name__)

INPUT_SIZE = 299
POOL3_DIM = 2048
NUM_CLASSES = 1008
BN_EPS = 0.001


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """Quantise float [0,1] images to uint8 the way saving them as PNG does (round half up, clamp)."""
    return (image.float() * 255 + 0.5).clamp(0, 255).to(torch.uint8)


def _source_coords(out_size: int, in_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # TF1 resize_bilinear(align_corners=False): src = dst * in/out, no half-pixel offset.
    scale = torch.tensor(in_size / out_size, dtype=torch.float32)
    coords = torch.arange(out_size, dtype=torch.float32) * scale
    lo = coords.long()
    hi = (lo + 1).clamp_max(in_size - 1)
    return lo.to(device), hi.to(device), (coords - lo.float()).to(device)


def resize_like_tensorflow1x(x: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """Bilinear resize of float (B,C,H,W) to ``size``², as TensorFlow 1.x ``resize_bilinear`` does it.

    ``F.interpolate(mode="bilinear")`` uses half-pixel centres and moves pool3 features by ~0.2 %: enough to
    make FID numbers incomparable with the published ones.
    """
    y_lo, y_hi, dy = _source_coords(size, x.shape[-2], x.device)
    x_lo, x_hi, dx = _source_coords(size, x.shape[-1], x.device)
    top, bottom = x[:, :, y_lo, :], x[:, :, y_hi, :]
    top = top[..., x_lo] + (top[..., x_hi] - top[..., x_lo]) * dx.view(1, 1, 1, -1)
    bottom = bottom[..., x_lo] + (bottom[..., x_hi] - bottom[..., x_lo]) * dx.view(1, 1, 1, -1)
    return top + (bottom - top) * dy.view(1, 1, -1, 1)


class BasicConv2d(nn.Module):
    """Convolution without bias, BatchNorm (eps 0.001), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, **kwargs) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


def _fid_avg_pool(x: torch.Tensor) -> torch.Tensor:
    # The TF graph averages only over real pixels at the border (count_include_pad=False).
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    """Mixed_5b/5c/5d: 1x1, 5x5, double 3x3 and pooling branches."""

    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_fid_avg_pool(x)),
        ], 1)


class InceptionB(nn.Module):
    """Mixed_6a: grid reduction 35 -> 17."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], 1)


class FIDInceptionC(nn.Module):
    """Mixed_6b..6e: factorised 7x7 branches."""

    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dbl = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            dbl = layer(dbl)
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            dbl,
            self.branch_pool(_fid_avg_pool(x)),
        ], 1)


class InceptionD(nn.Module):
    """Mixed_7a: grid reduction 17 -> 8."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionE(nn.Module):
    """Mixed_7b (``max_pool=False``: FIDInceptionE_1) and Mixed_7c (``max_pool=True``: FIDInceptionE_2)."""

    def __init__(self, in_channels: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        # The TF graph's last block max-pools its pooling branch (a bug in the original network, kept for FID).
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _fid_avg_pool(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl),
            self.branch_pool(pooled),
        ], 1)


class FIDInceptionV3(nn.Module):
    """The FID network: uint8 (B,3,H,W) images of any size -> ``pool3`` (B,2048) features.

    Build it with :meth:`from_state_dict` (reference weights) or ``random=True`` (tests only: random
    features say nothing about image quality). It is frozen and stays in eval mode.
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, max_pool=False)
        self.Mixed_7c = FIDInceptionE(2048, max_pool=True)
        self.fc = nn.Linear(POOL3_DIM, NUM_CLASSES)
        # channels_last convolutions: ~1.4x less CPU time per image here (oneDNN), the norm on GPUs; loading a state
        # dict copies into these parameters and keeps their layout.
        self.to(memory_format=torch.channels_last)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], source: str = "state dict") -> "FIDInceptionV3":
        """The network with the ``pt_inception-2015-12-05`` state dict (exact keys and shapes, else ``ValueError``)."""
        network = cls()
        check_state_dict(network.state_dict(), state_dict, f"{source} is not the pt_inception-2015-12-05 FID Inception")
        network.load_state_dict(dict(state_dict), strict=True)
        return network

    @classmethod
    def random(cls, seed: int = 0) -> "FIDInceptionV3":
        """Random weights with the reference initialisation's scale (tests only; warns)."""
        log.warning("FID Inception built with random weights: FID/P-IDS/U-IDS will not compare with any published number")
        network = cls()
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for module in network.modules():
                if isinstance(module, (nn.Conv2d, nn.Linear)):
                    fan_in = module.weight[0].numel()
                    module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
        return network

    def train(self, mode: bool = True) -> "FIDInceptionV3":
        """Stay in eval mode whatever the caller asks: BatchNorm must use the reference statistics."""
        return super().train(False)

    def _pool3(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"FID Inception takes uint8 (B,3,H,W) images, got {images.dtype} {tuple(images.shape)}")
        x = resize_like_tensorflow1x(images.float())
        x = (x - 128) / 128
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"):
            x = getattr(self, name)(x)
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                     "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(self, name)(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``pool3`` features (B,2048) float32 of uint8 RGB images (B,3,H,W), any H and W."""
        return self._pool3(images).float()

    @torch.no_grad()
    def logits_unbiased(self, pool3: torch.Tensor) -> torch.Tensor:
        """``pool3 · fc.weightᵀ`` (B,1008) of features from :meth:`forward`: the logits without bias (Inception
        Score's input; torch-fidelity's ``logits_unbiased``)."""
        return pool3 @ self.fc.weight.T
