"""Under autocast every quantity that feeds a loss or a normalisation is computed in float32.

The GPU runs bf16 autocast; CPU autocast (bf16) shows the same behaviour for the ops checked here. The Gram
matrix and BCE cases are in test_losses.py.
"""

from __future__ import annotations

import pytest
import torch

from models.lbam import LBAMDiscriminator
from models.rn import RNDiscriminator


def _power_iteration_autocast_states(D: torch.nn.Module, device_type: str) -> list[bool]:
    """Whether autocast was on during each ``mv`` of the spectral-norm power iterations of one forward."""
    seen: list[bool] = []

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.mv:
                seen.append(torch.is_autocast_enabled(device_type))
            return func(*args, **(kwargs or {}))

    with torch.autocast(device_type, dtype=torch.bfloat16), Spy():
        D(torch.rand(1, 3, 32, 32))
    return seen


def test_rn_spectral_norm_power_iteration_runs_outside_autocast():
    # CUDA autocast runs mv in half precision; the hook must leave autocast for the iteration and sigma.
    torch.manual_seed(0)
    seen = _power_iteration_autocast_states(RNDiscriminator(use_sigmoid=False), "cpu")
    assert seen and not any(seen), f"{sum(seen)} of {len(seen)} power-iteration products ran under autocast"


def test_rn_spectral_norm_is_unchanged_in_fp32_and_keeps_its_official_state_dict():
    torch.manual_seed(0)
    D = RNDiscriminator()
    reference = RNDiscriminator()
    reference.load_state_dict(D.state_dict())
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(D(x), reference(x), rtol=0, atol=0)
    assert any(key.endswith("weight_u") for key in D.state_dict())
    torch.nn.utils.remove_spectral_norm(D.conv1[0])  # still a SpectralNorm hook to the library


# LBAM's discriminator at 32 px and 1/8 width: the same layers and float32 sigmoid as the official 256 px one, at a
# size where bf16 on a CPU without native bf16 (~240x slower than fp32) costs milliseconds. Full size: tests/gpu.
@pytest.mark.parametrize("make", [lambda: RNDiscriminator(), lambda: LBAMDiscriminator(input_size=32, width=0.125)],
                         ids=["rn", "lbam"])
def test_discriminator_probabilities_are_float32_and_do_not_saturate_under_bf16(make):
    torch.manual_seed(0)
    D = make()
    size = 32
    image, mask = torch.rand(1, 3, size, size), torch.zeros(1, 1, size, size)
    args = (image, mask) if isinstance(D, LBAMDiscriminator) else (image,)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        score = D(*args)
    assert score.dtype == torch.float32
    # The final sigmoid itself: a logit of 9 is < 1 in float32 (exactly 1.0 in bf16).
    last = D.fusionLayer[1] if isinstance(D, LBAMDiscriminator) else None
    if last is not None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert last(torch.tensor([9.0], dtype=torch.bfloat16)).item() < 1.0
