"""LPIPS v0.1 (Zhang et al. 2018): learned perceptual distance on VGG16 (as LaMa reports it) or AlexNet (as MAT).

Per image pair: both images in [-1,1] go through the fixed scaling layer and the ImageNet backbone; the
features after relu1_2 … relu5_3 (VGG) or relu1 … relu5 (AlexNet) are unit-normalised over channels, their
squared difference is weighted per channel by the v0.1 linear head (a 1×1 convolution without bias),
averaged over space and summed over the five layers. 0 means identical; larger is more different.

Weights: the heads from the lpips release (``weights/v0.1/vgg.pth`` / ``alex.pth``, keys ``linK.model.1.weight``)
plus torchvision's ImageNet backbone (``vgg16-397923af.pth`` / ``alexnet-owt-7be5be79.pth``, keys
``features.N.*``), or one state dict in lpips' own module layout (``net.sliceK.N.*``, ``linK.*``, ``lins.K.*``,
``scaling_layer.*``). Every load checks keys and shapes strictly. Module names follow lpips' layout.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Literal, Mapping

import torch
import torch.nn as nn

from models.statedict import check_state_dict
from models.vgg import VGG16_FULL_LAYOUT, build_vgg16_features

__all__ = ["LPIPS", "LPIPS_NETS"]

log = logging.getLogger(__name__)

Net = Literal["vgg", "alex"]
LPIPS_NETS: tuple[str, ...] = ("vgg", "alex")
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
_EPS = 1e-10
# Backbone ``features`` index ranges of lpips' five slices (each ends after the ReLU whose output is compared).
_SLICES: dict[str, tuple[tuple[int, int], ...]] = {
    "vgg": ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30)),
    "alex": ((0, 2), (2, 5), (5, 8), (8, 10), (10, 12)),
}
_CHANNELS = {"vgg": (64, 128, 256, 512, 512), "alex": (64, 192, 384, 256, 256)}


def _alexnet_features() -> nn.Sequential:
    """torchvision's ``alexnet().features`` (``features.0`` … ``features.12``)."""
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
    )


class _Backbone(nn.Module):
    """The backbone cut into lpips' five slices; ``sliceK.N`` keeps torchvision's ``features.N`` index."""

    def __init__(self, net: Net) -> None:
        super().__init__()
        features = build_vgg16_features(VGG16_FULL_LAYOUT) if net == "vgg" else _alexnet_features()
        for number, (start, stop) in enumerate(_SLICES[net], start=1):
            setattr(self, f"slice{number}", nn.Sequential(OrderedDict((str(i), features[i]) for i in range(start, stop))))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for number in range(1, 6):
            x = getattr(self, f"slice{number}")(x)
            outputs.append(x)
        return outputs


class _Head(nn.Module):
    """lpips' ``NetLinLayer``: (dropout, 1×1 conv without bias); dropout is a no-op at evaluation."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class LPIPS(nn.Module):
    """LPIPS v0.1 distance of image pairs; :meth:`forward` takes [0,1] images, :meth:`distance` [-1,1] ones.

    Build with :meth:`from_files_state` (release heads + torchvision backbone), :meth:`from_lpips_state`
    (lpips' whole-module layout) or :meth:`random` (tests only). Frozen, always in eval mode.
    """

    def __init__(self, net: Net = "vgg") -> None:
        super().__init__()
        if net not in LPIPS_NETS:
            raise ValueError(f"LPIPS net must be one of {', '.join(LPIPS_NETS)}, got {net!r}")
        self.net_name = net
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        self.net = _Backbone(net)
        for index, channels in enumerate(_CHANNELS[net]):
            setattr(self, f"lin{index}", _Head(channels))
        # channels_last convolutions: ~1.3x less CPU time for the VGG backbone here (oneDNN); loading keeps the layout.
        self.to(memory_format=torch.channels_last)
        self.requires_grad_(False)
        self.eval()

    def _backbone_keys(self) -> dict[str, str]:
        """torchvision ``features.N.*`` key -> this module's ``net.sliceK.N.*`` key."""
        return {f"features.{key.split('.', 1)[1]}": f"net.{key}" for key in self.net.state_dict()}

    @classmethod
    def from_files_state(cls, net: Net, heads: Mapping[str, torch.Tensor], backbone: Mapping[str, torch.Tensor],
                         heads_source: str = "heads", backbone_source: str = "backbone") -> "LPIPS":
        """Heads from the lpips release (``linK.model.1.weight``) + a torchvision backbone (``features.N.*``;
        its classifier entries are ignored)."""
        model = cls(net)
        own = model.state_dict()
        head_keys = {k: v for k, v in own.items() if k.startswith("lin")}
        check_state_dict(head_keys, heads, f"{heads_source} is not an LPIPS v0.1 {net} head file")
        mapping = model._backbone_keys()
        expected_backbone = {tv: own[mine] for tv, mine in mapping.items()}
        extras = [k for k in backbone if k.startswith("classifier.")]
        check_state_dict(expected_backbone, backbone, f"{backbone_source} is not a torchvision {net} backbone", extras)
        state = {**{k: heads[k] for k in head_keys}, **{mapping[k]: backbone[k] for k in mapping}}
        model.load_state_dict(state, strict=True)
        return model

    @classmethod
    def from_lpips_state(cls, net: Net, state_dict: Mapping[str, torch.Tensor], source: str = "state dict") -> "LPIPS":
        """lpips' own ``LPIPS(net=…, version="0.1").state_dict()`` layout (``lins.K`` duplicates and the fixed
        ``scaling_layer`` buffers are checked, then dropped)."""
        model = cls(net)
        own = model.state_dict()
        expected = dict(own)
        for index in range(5):
            expected[f"lins.{index}.model.1.weight"] = own[f"lin{index}.model.1.weight"]
        expected["scaling_layer.shift"], expected["scaling_layer.scale"] = model.shift, model.scale
        check_state_dict(expected, state_dict, f"{source} is not an LPIPS v0.1 {net} state dict")
        for name, buffer in (("shift", model.shift), ("scale", model.scale)):
            if not torch.allclose(state_dict[f"scaling_layer.{name}"].float(), buffer, atol=1e-6):
                raise ValueError(f"{source}: scaling_layer.{name} differs from LPIPS' fixed values")
        model.load_state_dict({k: state_dict[k] for k in own}, strict=True)
        return model

    @classmethod
    def random(cls, net: Net = "vgg", seed: int = 0) -> "LPIPS":
        """Random backbone and uniform heads (tests only; warns)."""
        log.warning("LPIPS built with random weights: its distances will not compare with any published number")
        model = cls(net)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, tensor in model.state_dict().items():
                if name.startswith("lin"):
                    tensor.fill_(1.0 / tensor.shape[1])
                elif name.endswith("weight"):
                    tensor.copy_(torch.randn(tensor.shape, generator=generator) * (2.0 / tensor[0].numel()) ** 0.5)
                else:
                    tensor.zero_()
        return model

    def train(self, mode: bool = True) -> "LPIPS":
        """Stay in eval mode whatever the caller asks."""
        return super().train(False)

    @torch.no_grad()
    def distance(self, in0: torch.Tensor, in1: torch.Tensor) -> torch.Tensor:
        """LPIPS (B,) of image pairs (B,3,H,W) in [-1, 1] (lpips' ``forward(…, normalize=False)``)."""
        if in0.shape != in1.shape or in0.dim() != 4 or in0.shape[1] != 3:
            raise ValueError(f"LPIPS takes two (B,3,H,W) images of one shape, got {tuple(in0.shape)} and {tuple(in1.shape)}")
        both = torch.cat([in0, in1]).float()
        features = self.net((both - self.shift) / self.scale)
        total = torch.zeros(in0.shape[0], device=in0.device)
        for index, feature in enumerate(features):
            unit = feature / (feature.pow(2).sum(dim=1, keepdim=True).sqrt() + _EPS)
            f0, f1 = unit.chunk(2)
            total = total + getattr(self, f"lin{index}")((f0 - f1) ** 2).mean(dim=(1, 2, 3))
        return total

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """LPIPS (B,) of float [0,1] image pairs."""
        return self.distance(pred * 2 - 1, target * 2 - 1)
