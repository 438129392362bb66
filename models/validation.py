"""Input checks shared by the generators: one clear ``ValueError`` per broken rule."""

from __future__ import annotations

import torch


def check_image(image: torch.Tensor, size_multiple: int, name: str = "image") -> None:
    """Require a float (B,3,H,W) tensor whose H and W are multiples of ``size_multiple``."""
    if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[1] != 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"{name} must be a (B,3,H,W) tensor, got shape {shape}")
    if not image.is_floating_point():
        raise ValueError(f"{name} must be a float tensor in [0,1], got dtype {image.dtype}")
    h, w = image.shape[-2:]
    if h % size_multiple or w % size_multiple:
        raise ValueError(f"{name} height and width must be multiples of {size_multiple}, got {h}x{w}")


def check_mask(mask: torch.Tensor, image: torch.Tensor, name: str = "mask") -> None:
    """Require a float (B,1,H,W) mask matching ``image`` with values in [0,1] (1 = hole)."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{name} must be a (B,1,H,W) tensor, got shape {shape}")
    if mask.shape[1] != 1:
        raise ValueError(f"{name} must have 1 channel (1 = hole), got {mask.shape[1]} channels")
    if mask.shape[0] != image.shape[0] or mask.shape[-2:] != image.shape[-2:]:
        raise ValueError(
            f"{name} shape {tuple(mask.shape)} does not match image shape {tuple(image.shape)} (expected B,1,H,W)"
        )
    if not mask.is_floating_point():
        raise ValueError(f"{name} must be a float tensor with values in [0,1], got dtype {mask.dtype}")
    if mask.numel() and (bool(mask.min() < 0) or bool(mask.max() > 1)):
        raise ValueError(
            f"{name} values must lie in [0,1] (1 = hole), got [{float(mask.min()):.3g}, {float(mask.max()):.3g}]"
        )


def check_inpainting_inputs(image: torch.Tensor, mask: torch.Tensor, size_multiple: int) -> None:
    """Validate a generator's (image, mask) pair."""
    check_image(image, size_multiple)
    check_mask(mask, image)
