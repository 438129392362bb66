"""Input checks shared by the generators: one clear ``ValueError`` per broken rule.

Shape and dtype checks read tensor metadata only and are free. The mask *value* check reads the mask's
minimum and maximum back to the host: on a GPU that is a device synchronisation, which stops the CPU from
queueing work ahead of the GPU. A training step calls the models several times on the same mask (LBAM: five
times), whose values hold by construction (the loader turns 0|255 PNG masks into 0|1), so a caller that
guarantees the range wraps its step in :func:`mask_values_trusted` and the value check is skipped there.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import torch

__all__ = ["check_image", "check_inpainting_inputs", "check_mask", "check_mask_values", "mask_values_trusted"]

_VALUES_TRUSTED: contextvars.ContextVar[bool] = contextvars.ContextVar("holefill_mask_values_trusted", default=False)


@contextlib.contextmanager
def mask_values_trusted() -> Iterator[None]:
    """Skip the mask *value* check (not the shape/dtype checks) inside this block.

    For callers whose masks lie in [0,1] by construction, e.g. the training loop, whose loader thresholds
    8-bit masks into 0|1: the check would cost one host-device synchronisation per model call.
    """
    token = _VALUES_TRUSTED.set(True)
    try:
        yield
    finally:
        _VALUES_TRUSTED.reset(token)


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


def check_mask_values(mask: torch.Tensor, name: str = "mask") -> None:
    """Require mask values in [0,1] (1 = hole); one host read of the min and max (a sync on a GPU)."""
    if not mask.numel():
        return
    low, high = torch.stack(torch.aminmax(mask.detach())).float().tolist()  # one read, not four
    if low < 0 or high > 1:
        raise ValueError(f"{name} values must lie in [0,1] (1 = hole), got [{low:.3g}, {high:.3g}]")


def check_mask(mask: torch.Tensor, image: torch.Tensor, name: str = "mask") -> None:
    """Require a float (B,1,H,W) mask matching ``image`` with values in [0,1] (1 = hole).

    The value check is skipped inside :func:`mask_values_trusted`.
    """
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
    if not _VALUES_TRUSTED.get():
        check_mask_values(mask, name)


def check_inpainting_inputs(image: torch.Tensor, mask: torch.Tensor, size_multiple: int) -> None:
    """Validate a generator's (image, mask) pair."""
    check_image(image, size_multiple)
    check_mask(mask, image)
