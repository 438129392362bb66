"""Frozen VGG16 feature extractor (pool1, pool2, pool3) for perceptual and style losses.

The layers are torchvision's ``vgg16().features[:17]`` written out here (no torchvision build exists for
every target machine), under the same ``features.N`` names, so torchvision's ImageNet checkpoint
(``vgg16-397923af.pth``) loads directly; its classifier and deeper layers are ignored.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import torch
import torch.nn as nn

from models.convert import extract_state_dict, load_weights_file
from models.input_checks import check_image

__all__ = ["VGG16Features", "IMAGENET_MEAN", "IMAGENET_STD", "VGG16_FULL_LAYOUT", "build_vgg16_features"]

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# torchvision VGG16 configuration up to pool3: conv output channels, "M" = 2x2 max pool.
_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M")
# All of torchvision's ``vgg16().features`` (31 modules, ``features.0`` ... ``features.30``), as LPIPS uses it.
VGG16_FULL_LAYOUT = (*_LAYOUT, 512, 512, 512, "M", 512, 512, 512, "M")


def build_vgg16_features(layout: tuple = _LAYOUT) -> nn.Sequential:
    """torchvision's VGG16 ``features`` layers for ``layout`` (indices, hence state-dict keys, match torchvision)."""
    layers: list[nn.Module] = []
    in_channels = 3
    for item in layout:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            # In-place ReLU is safe here: a conv's backward does not need its own output.
            layers += [nn.Conv2d(in_channels, int(item), kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            in_channels = int(item)
    return nn.Sequential(*layers)


class VGG16Features(nn.Module):
    """VGG16 ``features`` up to pool3, returning ``[pool1, pool2, pool3]`` (64, 128, 256 channels; /2, /4, /8).

    ``weights``: a torchvision-format VGG16 state dict file (local path or fsspec URL, read with
    ``weights_only=True``). Without weights the extractor refuses to build unless ``allow_random=True``
    (random features make perceptual and style losses meaningless outside tests), and then warns.
    ``normalize_input``: LBAM feeds [0,1] images **without** ImageNet mean/std normalisation, so the
    default is ``False``; ``True`` normalises as torchvision's ImageNet models expect.

    The module is frozen (no parameter requires grad; gradients still flow to the input) and stays in
    eval mode even when a parent module calls ``.train()``.
    """

    POOL_INDICES = (4, 9, 16)

    def __init__(
        self,
        weights: str | os.PathLike[str] | None = None,
        *,
        allow_random: bool = False,
        storage_options: Mapping[str, Any] | None = None,
        normalize_input: bool = False,
    ) -> None:
        super().__init__()
        self.features = build_vgg16_features()
        self.normalize_input = normalize_input
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        if weights is not None:
            self.load_torchvision_weights(os.fspath(weights), storage_options=storage_options)
        elif allow_random:
            self._init_random()
            logger.warning(
                "VGG16Features built with random weights (allow_random=True): perceptual and style "
                "losses will not reflect ImageNet features; pass weights= for real training"
            )
        else:
            raise ValueError(
                "VGG16Features needs torchvision-format weights (vgg16-397923af.pth): pass weights=PATH_OR_URL, "
                "or allow_random=True to accept random features (tests only)"
            )
        self.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def _init_random(self) -> None:
        # torchvision's VGG initialisation, so random features at least have a sensible scale.
        for layer in self.features:
            if isinstance(layer, nn.Conv2d):
                nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(layer.bias)

    def load_torchvision_weights(self, path_or_url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        """Load the ``features.N.weight/bias`` entries of a torchvision VGG16 checkpoint (others are ignored).

        Raises ``ValueError`` naming missing or mis-shaped entries, or when the file needs pickle to load.
        """
        state_dict = extract_state_dict(load_weights_file(path_or_url, storage_options))
        expected = {f"features.{key}": tuple(value.shape) for key, value in self.features.state_dict().items()}
        missing = sorted(key for key in expected if key not in state_dict)
        if missing:
            raise ValueError(
                f"{path_or_url} is not a torchvision VGG16 state dict: missing {', '.join(missing)}"
            )
        misshaped = [
            f"{key} {tuple(state_dict[key].shape)} (expected {shape})"
            for key, shape in expected.items()
            if tuple(state_dict[key].shape) != shape
        ]
        if misshaped:
            raise ValueError(f"{path_or_url} has mis-shaped VGG16 entries: {', '.join(misshaped)}")
        prefix = len("features.")
        self.features.load_state_dict({key[prefix:]: state_dict[key] for key in expected}, strict=True)

    def train(self, mode: bool = True) -> "VGG16Features":
        """Stay in eval mode whatever the caller asks: the extractor is a fixed loss network."""
        return super().train(False)

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        """``[pool1, pool2, pool3]`` of a (B,3,H,W) image in [0,1]."""
        check_image(image, size_multiple=1)
        x = (image - self.mean) / self.std if self.normalize_input else image
        pooled: list[torch.Tensor] = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in self.POOL_INDICES:
                pooled.append(x)
        return pooled
