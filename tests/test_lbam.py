"""LBAM generator and discriminator: official initialisation, layer behaviour, D input rules, DeepSpeed, scaling.

What every architecture keeps (official counts and keys, the pattern outputs, hole content ignored, train/eval
agreement, bad input refused, converters refusing broken state dicts) is in ``test_every_architecture.py``.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from models.lbam import (
    GaussActivation,
    LBAMDiscriminator,
    LBAMGenerator,
    MaskUpdate,
    ReverseAttention,
    ForwardAttention,
    convert_official_discriminator,
    convert_official_generator,
)


@pytest.fixture(scope="module")
def generator() -> LBAMGenerator:
    torch.manual_seed(0)
    return LBAMGenerator()


@pytest.fixture(scope="module")
def discriminator() -> LBAMDiscriminator:
    torch.manual_seed(0)
    return LBAMDiscriminator()


def _hole_mask(size: int, batch: int = 1) -> torch.Tensor:
    """A (batch,1,size,size) mask with one rectangular hole (1 = hole)."""
    mask = torch.zeros(batch, 1, size, size)
    mask[..., size // 4 : size // 2, size // 3 : 3 * size // 4] = 1
    return mask


# --- initialisation ---------------------------------------------------------------------------------


def test_generator_starts_from_the_official_initialisation(generator):
    for name in ("ec1.conv.conv", "ec4.conv.maskConv", "reverseConv3.reverseMaskConv", "dc2.conv"):
        weight = generator.get_submodule(name).weight.detach()
        assert abs(float(weight.std()) - 0.02) < 0.001, name
        assert abs(float(weight.mean())) < 0.001, name
    # dc7 keeps PyTorch's default kaiming-uniform: bound 1/sqrt(fan_in = 3*4*4), far wider than N(0, 0.02).
    dc7 = generator.dc7.weight.detach()
    assert float(dc7.abs().max()) <= 48**-0.5
    assert float(dc7.std()) > 0.06
    forward_g = generator.ec5.conv.activationFuncG_A
    reverse_g = generator.reverseConv2.activationFuncG_A
    assert [p.item() for p in (forward_g.a, forward_g.mu, forward_g.sigma1, forward_g.sigma2)] == pytest.approx(
        [1.1, 2.0, 1.0, 1.0]
    )
    assert [p.item() for p in (reverse_g.a, reverse_g.mu, reverse_g.sigma1, reverse_g.sigma2)] == pytest.approx(
        [1.1, 1.0, 0.5, 0.5]
    )


# --- layers --------------------------------------------------------------------------------------------


def test_gauss_activation_clamps_its_parameters_in_place_on_every_forward():
    g = GaussActivation(7.0, -1.0, 0.1, 3.0)
    parameters = (g.a, g.mu, g.sigma1, g.sigma2)
    g(torch.zeros(4))
    assert [p.item() for p in parameters] == pytest.approx([6.0, 0.1, 0.5, 2.0])
    assert (g.a, g.mu, g.sigma1, g.sigma2) == parameters  # the same Parameter objects, modified in place


def test_gauss_activation_saves_official_scalars_and_loads_either_shape():
    g = GaussActivation(1.1, 2.0, 1.0, 1.0)
    assert g.a.shape == (1,)  # held 1-D so DeepSpeed can broadcast it
    state = g.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == {"a": (), "mu": (), "sigma1": (), "sigma2": ()}
    g.load_state_dict({"a": torch.tensor(3.0), "mu": torch.tensor(1.5), "sigma1": torch.tensor(0.7),
                       "sigma2": torch.tensor([0.9])})
    assert [p.item() for p in (g.a, g.mu, g.sigma1, g.sigma2)] == pytest.approx([3.0, 1.5, 0.7, 0.9])
    assert g.a.shape == (1,)


def test_gauss_activation_clamp_does_not_invalidate_an_earlier_graph():
    g = GaussActivation(1.1, 2.0, 1.0, 1.0)
    x = torch.linspace(-1, 4, 11)
    first = g(x)
    g.a.data.fill_(9.0)  # what an optimiser step can do; the next forward clamps it back
    second = g(x)
    (first.sum() + second.sum()).backward()  # must not raise "modified by an inplace operation"
    assert g.a.item() == pytest.approx(6.0)
    assert torch.isfinite(g.a.grad)


def test_gauss_activation_is_the_asymmetric_gaussian():
    g = GaussActivation(1.5, 1.0, 0.8, 1.6)
    x = torch.tensor([-1.0, 0.5, 1.0, 1.5, 3.0])
    expected = torch.where(
        x < 1.0, 1.5 * torch.exp(-0.8 * (x - 1.0) ** 2), 1 + 0.5 * torch.exp(-1.6 * (x - 1.0) ** 2)
    )
    torch.testing.assert_close(g(x), expected)
    assert g(torch.tensor([1.0])).item() == pytest.approx(1.5)  # peak a at x = mu


@pytest.mark.parametrize("side, idle", [("left", "sigma2"), ("right", "sigma1")])
def test_gauss_activation_gives_the_inactive_branch_exactly_zero_gradient(side, idle):
    g = GaussActivation(1.1, 1.0, 1.0, 1.0)
    x = torch.linspace(-2.0, 0.9, 7) if side == "left" else torch.linspace(1.0, 4.0, 7)
    g(x).sum().backward()
    assert getattr(g, idle).grad.item() == 0.0
    active = "sigma1" if idle == "sigma2" else "sigma2"
    assert getattr(g, active).grad.item() != 0.0


def test_mask_update_has_finite_gradients_where_the_input_is_exactly_zero():
    x = torch.tensor([-1.0, 0.0, 0.0, 0.5, 2.0], requires_grad=True)
    y = MaskUpdate(0.8)(x)
    torch.testing.assert_close(y.detach(), F.relu(x.detach()) ** 0.8)
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(x.grad[:3], torch.zeros(3))
    torch.testing.assert_close(x.grad[3:], 0.8 * x.detach()[3:] ** -0.2)


def test_mask_update_rejects_an_exponent_outside_zero_one():
    with pytest.raises(ValueError, match="alpha"):
        MaskUpdate(1.5)


def test_forward_attention_returns_activated_features_mask_update_skip_and_map():
    torch.manual_seed(1)
    layer = ForwardAttention(4, 8, mask_channels=3)
    x, mask = torch.randn(2, 4, 16, 16), torch.rand(2, 3, 16, 16)
    out, mask_next, skip, attention = layer(x, mask)
    assert all(t.shape == (2, 8, 8, 8) for t in (out, mask_next, skip, attention))
    conv = layer.conv
    torch.testing.assert_close(skip, conv.conv(x))
    torch.testing.assert_close(attention, conv.activationFuncG_A(conv.maskConv(mask)))
    torch.testing.assert_close(out, F.leaky_relu(skip * attention, 0.2))
    torch.testing.assert_close(mask_next, F.relu(conv.maskConv(mask)) ** 0.8)


def test_reverse_attention_puts_the_encoder_skip_and_forward_map_first():
    layer = ReverseAttention(8, 4)
    torch.nn.init.zeros_(layer.conv.weight)  # the upsampled half becomes 0
    skip = torch.randn(1, 4, 8, 8)
    forward_map, reverse_map = torch.full((1, 4, 8, 8), 2.0), torch.full((1, 4, 8, 8), 3.0)
    out = layer(skip, torch.randn(1, 8, 4, 4), forward_map, reverse_map)
    assert out.shape == (1, 8, 8, 8)
    torch.testing.assert_close(out[:, :4], F.leaky_relu(2.0 * skip, 0.2))
    torch.testing.assert_close(out[:, 4:], torch.zeros(1, 4, 8, 8))


# --- generator / discriminator behaviour -------------------------------------------------------------


def test_generator_gradients_are_finite_with_all_hole_windows(generator):
    # A large hole makes whole mask-conv windows zero: exact zeros reach every MaskUpdate.
    mask = torch.zeros(1, 1, 128, 128)
    mask[..., 16:112, 16:112] = 1
    generator(torch.rand(1, 3, 128, 128), mask).mean().backward()
    grads = {name: p.grad for name, p in generator.named_parameters()}
    generator.zero_grad(set_to_none=True)
    assert [name for name, g in grads.items() if g is None or not torch.isfinite(g).all()] == []


def test_discriminator_routes_known_pixels_to_the_global_column_and_holes_to_the_local_column(discriminator):
    seen = {}
    hooks = [
        getattr(discriminator, name).register_forward_pre_hook(lambda m, args, name=name: seen.update({name: args[0]}))
        for name in ("globalConv", "localConv")
    ]
    try:
        image, mask = torch.rand(2, 3, 256, 256), _hole_mask(256, batch=2)
        with torch.no_grad():
            score = discriminator.train()(image, mask)
    finally:
        for hook in hooks:
            hook.remove()
    assert score.shape == (2, 1) and bool(((score > 0) & (score < 1)).all())
    torch.testing.assert_close(seen["globalConv"], image * (1 - mask))
    torch.testing.assert_close(seen["localConv"], image * mask)


# --- input rules -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, mask_channels, message",
    [(128, 1, "256x256"), (512, 1, "256x256"), (256, 3, "1 channel")],
)
def test_discriminator_rejects_bad_inputs(discriminator, size, mask_channels, message):
    with pytest.raises(ValueError, match=message):
        discriminator(torch.rand(1, 3, size, size), torch.zeros(1, mask_channels, size, size))


# --- official converters -----------------------------------------------------------------------------


def test_converter_returns_a_strict_loadable_state_dict(generator):
    official = {k: v.clone() for k, v in reversed(generator.state_dict().items())}
    converted = convert_official_generator(official)
    assert list(converted) == list(generator.state_dict())
    generator.load_state_dict(converted, strict=True)


def test_converter_refuses_the_state_dict_of_another_network_outright(generator):
    # Missing, unexpected and mis-shaped keys are every architecture's contract (test_every_architecture.py); a
    # state dict of another network is refused as a whole, not half-loaded.
    with pytest.raises(ValueError, match="not an official LBAM discriminator"):
        convert_official_discriminator(dict(generator.state_dict()))


# --- DeepSpeed ---------------------------------------------------------------------------------------

_DEEPSPEED_SCRIPT = """
import os, sys, torch, torch.nn as nn
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import deepspeed
from models.lbam import ForwardAttention, ReverseMaskConv
from pipeline.train.engines import skip_cpu_shm_op
skip_cpu_shm_op()

class Layers(nn.Module):
    def __init__(self):
        super().__init__()
        self.ec1 = ForwardAttention(4, 8, mask_channels=3)
        self.reverseConv1 = ReverseMaskConv(3, 8)
    def forward(self, x, valid):
        return (self.ec1(x, valid)[0] * self.reverseConv1(1 - valid)[0]).mean()

torch.manual_seed(0)
model = Layers()
before = {k: v.clone() for k, v in model.state_dict().items()}
config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2},
          "optimizer": {"type": "Adam", "params": {"lr": 0.01, "torch_adam": True}}}
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
for _ in range(2):
    loss = engine(torch.rand(2, 4, 16, 16), torch.rand(2, 3, 16, 16))
    engine.backward(loss)
    engine.step()
after = engine.module.state_dict()
assert tuple(after["ec1.conv.activationFuncG_A.a"].shape) == (), "state dict must keep the official scalar shape"
changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
print("CHANGED", ",".join(changed))
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.e2e
def test_attention_layers_train_under_deepspeed_zero2():
    # A separate process: deepspeed.initialize creates a process group that must not leak into other tests.
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_DEEPSPEED_SCRIPT), str(_free_port())],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    changed = result.stdout.split("CHANGED ")[-1].split()[0].split(",")
    # Every learnable tensor moved, the Gaussian scalars included.
    assert "ec1.conv.activationFuncG_A.mu" in changed and "reverseConv1.activationFuncG_A.a" in changed
    assert "ec1.conv.maskConv.weight" in changed and "reverseConv1.reverseMaskConv.weight" in changed


@pytest.mark.parametrize("width", [0.5, 1 / 16])
def test_a_narrower_generator_keeps_the_wiring_and_scales_every_layer(width):
    narrow = LBAMGenerator(width=width)
    official = dict(LBAMGenerator().state_dict().items())
    assert narrow.state_dict().keys() == official.keys()
    assert narrow.ec1.conv.conv.out_channels == round(64 * width)
    image, mask = torch.rand(2, 3, 128, 128), (torch.rand(2, 1, 128, 128) > 0.6).float()
    out = narrow(image, mask)
    assert out.shape == image.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("size", [32, 64, 128])
def test_a_smaller_discriminator_scores_its_own_crop_size_and_refuses_others(size):
    D = LBAMDiscriminator(input_size=size, width=0.25)
    image, mask = torch.rand(2, 3, size, size), torch.zeros(2, 1, size, size)
    assert D(image, mask).shape == (2, 1)
    with pytest.raises(ValueError, match=f"must be {size}x{size}"):
        D(torch.rand(1, 3, 2 * size, 2 * size), torch.zeros(1, 1, 2 * size, 2 * size))


def test_scaled_networks_refuse_widths_and_sizes_they_cannot_build():
    with pytest.raises(ValueError, match="width must be in"):
        LBAMGenerator(width=0)
    with pytest.raises(ValueError, match="power of two"):
        LBAMDiscriminator(input_size=96)
