"""LBAM: Learnable Bidirectional Attention Maps (Xie et al., ICCV 2019), in holefill's conventions.

This is the model of the current official PyTorch code (``Vious/LBAM_Pytorch``, no BatchNorm in the
generator, output ``(tanh(y) + 1) / 2``). Module and attribute
names (``ec1.conv.maskConv``, ``reverseConv1.reverseMaskConv``, ``globalConv.3`` ...) are chosen so the
state dict carries exactly the official keys: converting an official checkpoint is a checked identity.

Mask conventions: the public ``forward(image, mask)`` of both networks takes holefill's mask
(B,1,H,W), **1 = hole**. LBAM's own convention (a 3-channel mask, 1 = valid) exists only inside this
file, in ``LBAMGenerator.forward_official`` and the layers.
"""

from __future__ import annotations

import functools
from typing import Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.registry import Architecture, register_architecture
from models.input_checks import check_image, check_inpainting_inputs, check_mask

__all__ = [
    "Float32Sigmoid",
    "GaussActivation",
    "MaskUpdate",
    "ForwardAttentionConv",
    "ForwardAttention",
    "ReverseMaskConv",
    "ReverseAttention",
    "LBAMGenerator",
    "LBAMDiscriminator",
    "convert_official_generator",
    "convert_official_discriminator",
    "SIZE_MULTIPLE",
    "DISCRIMINATOR_SIZE",
]

# Seven stride-2 downsamplings in the generator.
SIZE_MULTIPLE = 128
# The discriminator's fusion conv (k4, no padding) turns the 4x4 map of a 256x256 input into one score.
DISCRIMINATOR_SIZE = 256

# Official initial values (a, mu, sigma1, sigma2) of the asymmetric Gaussian activation.
FORWARD_GAUSS_INIT = (1.1, 2.0, 1.0, 1.0)
REVERSE_GAUSS_INIT = (1.1, 1.0, 0.5, 0.5)
# Fixed exponent of the mask update in the current official code (the learnable version is commented out).
MASK_UPDATE_ALPHA = 0.8
LEAKY_SLOPE = 0.2
# weights_init('gaussian') of the official code: N(0, 0.02) on every attention/reverse conv and dc1-dc6.
INIT_STD = 0.02

_ENCODER_CHANNELS = (64, 128, 256, 512, 512, 512, 512)  # ec1..ec7 outputs
_REVERSE_CHANNELS = (64, 128, 256, 512, 512, 512)  # reverseConv1..6 outputs
# (deconv input, deconv output) of dc1..dc6; each output is concatenated with the same-size encoder skip.
_DECODER_CHANNELS = ((512, 512), (1024, 512), (1024, 512), (1024, 256), (512, 128), (256, 64))


def _down_conv(in_channels: int, out_channels: int) -> nn.Conv2d:
    """The k4 s2 p1 bias-free conv every LBAM encoder and reverse layer uses (halves H and W)."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=4, stride=2, padding=1, bias=False)


def _up_conv(in_channels: int, out_channels: int) -> nn.ConvTranspose2d:
    """The k4 s2 p1 bias-free transposed conv of the decoder (doubles H and W)."""
    return nn.ConvTranspose2d(in_channels, out_channels, kernel_size=4, stride=2, padding=1, bias=False)


class GaussActivation(nn.Module):
    """Asymmetric Gaussian g_A(x; a, mu, sigma1, sigma2) turning mask-conv responses into attention.

    ``a * exp(-sigma1 * (x - mu)^2)`` left of ``mu`` and ``1 + (a - 1) * exp(-sigma2 * (x - mu)^2)`` from
    ``mu`` on; the peak ``a`` sits at ``x = mu``. The four parameters are learnable scalars shared over
    channels and positions.

    Each parameter is held with shape (1,) while the state dict carries the official 0-dim entries
    (hooks reshape on save and load; both shapes load). DeepSpeed cannot wrap a model with 0-dim
    parameters: its initial broadcast views every parameter as bytes, which fails for 0-dim tensors.
    """

    A_RANGE = (1.01, 6.0)
    MU_RANGE = (0.1, 3.0)
    SIGMA_RANGE = (0.5, 2.0)
    PARAMETER_NAMES = ("a", "mu", "sigma1", "sigma2")

    def __init__(self, a: float, mu: float, sigma1: float, sigma2: float) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor([float(a)]))
        self.mu = nn.Parameter(torch.tensor([float(mu)]))
        self.sigma1 = nn.Parameter(torch.tensor([float(sigma1)]))
        self.sigma2 = nn.Parameter(torch.tensor([float(sigma2)]))
        self.register_state_dict_post_hook(_gauss_state_dict_as_scalars)
        self.register_load_state_dict_pre_hook(_gauss_load_scalars)

    @torch.no_grad()
    def clamp_parameters_(self) -> None:
        """Clamp the parameters into their official ranges, in place.

        The official code does this on ``.data`` at the start of every forward: outside autograd, and
        without bumping the parameters' version counters, so a graph built by an earlier forward can
        still be backpropagated after a later forward clamped the values.
        """
        self.a.data.clamp_(*self.A_RANGE)
        self.mu.data.clamp_(*self.MU_RANGE)
        self.sigma1.data.clamp_(*self.SIGMA_RANGE)
        self.sigma2.data.clamp_(*self.SIGMA_RANGE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_exporting():
            # torch.export cannot trace the in-place write to .data (it would lift a fake tensor into the graph's
            # constants): the exported graph clamps out of place, to the same values, and as 0-dim scalars, since
            # broadcasting a (1,) parameter against a 1-pixel-wide map (128-pixel inputs) would fix the width at 1.
            a, mu = self.a.clamp(*self.A_RANGE).view(()), self.mu.clamp(*self.MU_RANGE).view(())
            sigma1 = self.sigma1.clamp(*self.SIGMA_RANGE).view(())
            sigma2 = self.sigma2.clamp(*self.SIGMA_RANGE).view(())
        else:
            self.clamp_parameters_()
            a, mu, sigma1, sigma2 = self.a, self.mu, self.sigma1, self.sigma2
        below_mu = x < mu
        squared = (x - mu) ** 2
        # Both branches are computed everywhere and the unused one is zeroed, as in the official code:
        # the inactive branch contributes exactly zero value and zero gradient to its parameters.
        left = (a * torch.exp(-sigma1 * squared)).masked_fill(~below_mu, 0.0)
        right = (1 + (a - 1) * torch.exp(-sigma2 * squared)).masked_fill(below_mu, 0.0)
        return left + right

    def extra_repr(self) -> str:
        if self.a.is_meta:  # shape-only modules (converters build them on the meta device) have no values
            return ""
        return (
            f"a={self.a.item():.4g}, mu={self.mu.item():.4g}, "
            f"sigma1={self.sigma1.item():.4g}, sigma2={self.sigma2.item():.4g}"
        )


def _gauss_state_dict_as_scalars(module: GaussActivation, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    # A view, not a copy: state_dict(keep_vars=True) callers still see the live values.
    for name in GaussActivation.PARAMETER_NAMES:
        if prefix + name in state_dict:
            state_dict[prefix + name] = state_dict[prefix + name].view(())


def _gauss_load_scalars(module: GaussActivation, state_dict: dict, prefix: str, *_: object) -> None:
    for name in GaussActivation.PARAMETER_NAMES:
        value = state_dict.get(prefix + name)
        if isinstance(value, torch.Tensor) and value.dim() == 0:
            state_dict[prefix + name] = value.view(1)


class MaskUpdate(nn.Module):
    """Mask update g_M(x) = ReLU(x)^alpha, the soft mask handed to the next layer.

    A real ReLU is needed: pow's gradient at 0 is infinite, and ReLU's backward zeroes it, whereas
    ``clamp(min=0)`` passes it through. Exact zeros are common (a bias-free conv over an all-hole window).
    """

    def __init__(self, alpha: float = MASK_UPDATE_ALPHA) -> None:
        super().__init__()
        if not 0 < alpha <= 1:
            raise ValueError(f"mask update exponent alpha must lie in (0, 1], got {alpha}")
        self.alpha = float(alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.pow(F.relu(x), self.alpha)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"


class ForwardAttentionConv(nn.Module):
    """Feature conv modulated by the forward attention map of a parallel mask conv (before activation).

    Returns ``(F * A, g_M(Mc), F, A)`` with ``F = conv(x)``, ``Mc = maskConv(m)`` and ``A = g_A(Mc)``.
    """

    def __init__(self, in_channels: int, out_channels: int, mask_channels: int) -> None:
        super().__init__()
        # Attribute names are the official ones, so state-dict keys match official checkpoints.
        self.conv = _down_conv(in_channels, out_channels)
        self.maskConv = _down_conv(mask_channels, out_channels)
        self.activationFuncG_A = GaussActivation(*FORWARD_GAUSS_INIT)
        self.updateMask = MaskUpdate()

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        features = self.conv(x)
        mask_response = self.maskConv(mask)
        attention = self.activationFuncG_A(mask_response)
        return features * attention, self.updateMask(mask_response), features, attention


class ForwardAttention(nn.Module):
    """Encoder layer ``ec_k``: forward-attention conv followed by LeakyReLU(0.2).

    ``forward(x, mask)`` returns ``(x_out, mask_next, skip, attention)``: ``skip`` is the raw feature
    conv output (the decoder's skip connection) and ``attention`` the forward map the decoder reuses.
    The first layer takes the 4-channel input (masked image + mask) and a 3-channel mask; later layers
    take the previous layer's features and its updated mask, both with ``in_channels`` channels.
    """

    def __init__(self, in_channels: int, out_channels: int, mask_channels: int | None = None) -> None:
        super().__init__()
        self.conv = ForwardAttentionConv(in_channels, out_channels, mask_channels or in_channels)
        self.activ = nn.LeakyReLU(LEAKY_SLOPE)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        attended, mask_next, skip, attention = self.conv(x, mask)
        return self.activ(attended), mask_next, skip, attention


class ReverseMaskConv(nn.Module):
    """Reverse mask layer ``reverseConv_k``: conv on the hole mask, returns ``(g_A(Mr), g_M(Mr))``.

    Its Gaussian starts at the reverse constants (1.1, 1.0, 0.5, 0.5) of the official code.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.reverseMaskConv = _down_conv(in_channels, out_channels)
        self.activationFuncG_A = GaussActivation(*REVERSE_GAUSS_INIT)
        self.updateMask = MaskUpdate()

    def forward(self, reverse_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        response = self.reverseMaskConv(reverse_mask)
        return self.activationFuncG_A(response), self.updateMask(response)


class ReverseAttention(nn.Module):
    """Decoder layer ``dc_k``: LeakyReLU([skip, up(x)] * [forward_map, reverse_map]).

    The encoder skip and its forward attention map come first in the channel concatenation, the
    upsampled decoder features and the reverse attention map second (official order).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = _up_conv(in_channels, out_channels)
        self.activ = nn.LeakyReLU(LEAKY_SLOPE)

    def forward(
        self, skip: torch.Tensor, x: torch.Tensor, forward_map: torch.Tensor, reverse_map: torch.Tensor
    ) -> torch.Tensor:
        features = torch.cat((skip, self.conv(x)), dim=1)
        return self.activ(features * torch.cat((forward_map, reverse_map), dim=1))


class LBAMGenerator(nn.Module):
    """LBAM generator (official ``LBAMModel(4, 3)``, current code): 68,304,948 trainable parameters.

    ``forward(image, mask)``: image (B,3,H,W) in [0,1], mask (B,1,H,W) with **1 = hole**, H and W
    multiples of 128. Returns the raw output (B,3,H,W) in [0,1], before compositing with the known
    pixels. Train and eval modes compute the same thing (there is no normalisation layer).

    ``width`` scales every layer's channel count (1.0, the default, is the official network; e.g. 0.125 gives a
    network ~64x cheaper for CPU tests and CPU-sized learning runs). Depth and wiring stay the same.
    """

    def __init__(self, width: float = 1.0) -> None:
        super().__init__()
        self.constructor_kwargs = {"width": width}  # what rebuilds this network from its state dict
        encoder = _scaled(_ENCODER_CHANNELS, width)
        reverse = encoder[: len(_REVERSE_CHANNELS)]
        # dc_k's output meets reverse map k from the inside out; its input is the innermost encoder output, then
        # the previous decoder output concatenated with its skip.
        outs = tuple(reversed(reverse))
        decoder = tuple(zip((encoder[-1],) + tuple(2 * c for c in outs[:-1]), outs))
        in_channels = 4
        for index, out_channels in enumerate(encoder, start=1):
            # ec1's mask conv sees the 3-channel mask; later ones see the previous layer's updated mask.
            mask_channels = 3 if index == 1 else in_channels
            self.add_module(f"ec{index}", ForwardAttention(in_channels, out_channels, mask_channels))
            in_channels = out_channels
        in_channels = 3
        for index, out_channels in enumerate(reverse, start=1):
            self.add_module(f"reverseConv{index}", ReverseMaskConv(in_channels, out_channels))
            in_channels = out_channels
        for index, (deconv_in, deconv_out) in enumerate(decoder, start=1):
            self.add_module(f"dc{index}", ReverseAttention(deconv_in, deconv_out))
        self.dc7 = _up_conv(2 * decoder[-1][1], 3)
        self.reset_parameters()

    def _layers(self, prefix: str, count: int) -> list[nn.Module]:
        return [getattr(self, f"{prefix}{index}") for index in range(1, count + 1)]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Official initialisation: N(0, 0.02) on ec/reverseConv/dc1-6 convs, default init on dc7, g_A constants."""
        for ec in self._layers("ec", len(_ENCODER_CHANNELS)):
            nn.init.normal_(ec.conv.conv.weight, 0.0, INIT_STD)
            nn.init.normal_(ec.conv.maskConv.weight, 0.0, INIT_STD)
            _reset_gauss(ec.conv.activationFuncG_A, FORWARD_GAUSS_INIT)
        for rc in self._layers("reverseConv", len(_REVERSE_CHANNELS)):
            nn.init.normal_(rc.reverseMaskConv.weight, 0.0, INIT_STD)
            _reset_gauss(rc.activationFuncG_A, REVERSE_GAUSS_INIT)
        for dc in self._layers("dc", len(_DECODER_CHANNELS)):
            nn.init.normal_(dc.conv.weight, 0.0, INIT_STD)
        # The official code leaves dc7 at PyTorch's default (kaiming-uniform, a=sqrt(5)).
        self.dc7.reset_parameters()

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Inpaint ``image`` where ``mask`` is 1; returns the raw (B,3,H,W) output in [0,1]."""
        check_inpainting_inputs(image, mask, size_multiple=SIZE_MULTIPLE)
        valid = (1 - mask.to(image.dtype)).expand(-1, 3, -1, -1)
        # Holes are filled with 0 and the 1-channel valid mask rides along as the fourth channel.
        inputs = torch.cat((image * valid, valid[:, :1]), dim=1)
        return self.forward_official(inputs, valid)

    def forward_official(self, inputs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The official forward: ``inputs`` (B,4,H,W) = [image*valid, valid], ``valid`` (B,3,H,W) 1 = known.

        No input checks; prefer :meth:`forward` unless porting code written against the official model.
        """
        encoders = self._layers("ec", len(_ENCODER_CHANNELS))
        x, mask = inputs, valid
        skips: list[torch.Tensor] = []
        forward_maps: list[torch.Tensor] = []
        for ec in encoders[:-1]:
            x, mask, skip, attention = ec(x, mask)
            skips.append(skip)
            forward_maps.append(attention)
        # The innermost layer's skip, attention map and mask update have no decoder partner.
        x = encoders[-1](x, mask)[0]

        reverse_mask = 1 - valid
        reverse_maps: list[torch.Tensor] = []
        for rc in self._layers("reverseConv", len(_REVERSE_CHANNELS)):
            reverse_map, reverse_mask = rc(reverse_mask)
            reverse_maps.append(reverse_map)

        # dc1 pairs with the deepest kept encoder level (ec6 / reverseConv6), dc6 with ec1 / reverseConv1.
        decoders = self._layers("dc", len(_DECODER_CHANNELS))
        for dc, skip, forward_map, reverse_map in zip(
            decoders, reversed(skips), reversed(forward_maps), reversed(reverse_maps)
        ):
            x = dc(skip, x, forward_map, reverse_map)
        return (torch.tanh(self.dc7(x)) + 1) / 2


def _reset_gauss(activation: GaussActivation, values: tuple[float, float, float, float]) -> None:
    for parameter, value in zip((activation.a, activation.mu, activation.sigma1, activation.sigma2), values):
        parameter.fill_(value)


_DISCRIMINATOR_CHANNELS = (64, 128, 256, 512, 512, 512)
# Each column halves the input until the fusion conv's 4x4 map.
_FUSION_MAP = 4


def _scaled(channels: tuple[int, ...], width: float) -> tuple[int, ...]:
    if not 0 < width <= 1:
        raise ValueError(f"width must be in (0, 1], got {width}")
    return tuple(max(1, round(c * width)) for c in channels)


def _column_channels(input_size: int, width: float) -> tuple[int, ...]:
    depth = (input_size // _FUSION_MAP).bit_length() - 1
    return _scaled(_DISCRIMINATOR_CHANNELS[:depth], width)


def _discriminator_column(input_size: int, width: float) -> nn.Sequential:
    """One column of the LBAM discriminator: 3 -> 64 -> 128 -> 256 -> 512 -> 512 -> 512, each k4 s2 p1 (at 256
    px and full width; a smaller ``input_size`` keeps the first log2(input_size / 4) layers).

    Kept as a flat ``nn.Sequential`` because official checkpoints address layers by index
    (``globalConv.0`` conv, ``.2`` conv, ``.3`` BN, ...).
    """
    channels = _column_channels(input_size, width)
    layers: list[nn.Module] = [nn.Conv2d(3, channels[0], 4, stride=2, padding=1), nn.LeakyReLU(LEAKY_SLOPE)]
    for in_channels, out_channels in zip(channels, channels[1:]):
        layers += [
            nn.Conv2d(in_channels, out_channels, 4, stride=2, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(LEAKY_SLOPE),
        ]
    return nn.Sequential(*layers)


class Float32Sigmoid(nn.Module):
    """``nn.Sigmoid`` evaluated in float32 whatever the input dtype (identical to it on float32 input)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x.float())


class LBAMDiscriminator(nn.Module):
    """LBAM two-column discriminator (official ``DiscriminatorDoubleColumn(3)``): 22,316,417 trainable parameters.

    ``forward(image, mask)``: image (B,3,256,256), mask (B,1,256,256) with **1 = hole**. The global column
    sees the known pixels (``image * valid``), the local column the hole pixels (``image * (1 - valid)``);
    their 512x4x4 maps are fused by a 4x4 conv into one sigmoid score per sample, shape (B,1), float32 (the
    sigmoid runs in float32 under autocast: in bf16 it saturates to exactly 1.0 from a logit of 9 on, and its
    gradient, the WGAN critic's, with it).
    BatchNorm uses batch statistics in train mode. PyTorch default initialisation, as in the official code.

    ``input_size`` (a power of two from 16 to 256) and ``width`` (channel scale) give smaller discriminators for
    smaller crops and CPU runs; the defaults are the official network.
    """

    def __init__(self, input_size: int = DISCRIMINATOR_SIZE, width: float = 1.0) -> None:
        super().__init__()
        if input_size not in (16, 32, 64, 128, 256):
            raise ValueError(f"input_size must be a power of two from 16 to {DISCRIMINATOR_SIZE}, got {input_size}")
        self.input_size = input_size
        self.globalConv = _discriminator_column(input_size, width)
        self.localConv = _discriminator_column(input_size, width)
        features = 2 * _column_channels(input_size, width)[-1]
        self.fusionLayer = nn.Sequential(nn.Conv2d(features, 1, kernel_size=4), Float32Sigmoid())

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Score (B,1) in (0,1) for ``image`` with holes where ``mask`` is 1."""
        check_image(image, size_multiple=1)
        height, width = image.shape[-2:]
        if (height, width) != (self.input_size, self.input_size):
            raise ValueError(
                f"LBAM discriminator input must be {self.input_size}x{self.input_size} "
                f"(its fusion conv needs a 4x4 map), got {height}x{width}"
            )
        check_mask(mask, image)
        valid = 1 - mask.to(image.dtype)
        known = self.globalConv(image * valid)
        holes = self.localConv(image * (1 - valid))
        return self.fusionLayer(torch.cat((known, holes), dim=1)).view(image.shape[0], -1)


@functools.lru_cache(maxsize=None)
def _expected_shapes(build: Callable[[], nn.Module]) -> dict[str, tuple[int, ...]]:
    # Built on the meta device: shapes only, no memory and no initialisation cost.
    with torch.device("meta"):
        module = build()
    return {key: tuple(value.shape) for key, value in module.state_dict().items()}


def _check_official(
    state_dict: Mapping[str, torch.Tensor], expected: dict[str, tuple[int, ...]], what: str
) -> dict[str, torch.Tensor]:
    """Verify an official state dict has exactly the expected keys and shapes; return it in module order."""
    not_tensors = sorted(k for k, v in state_dict.items() if not isinstance(v, torch.Tensor))
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    misshaped = [
        f"{key} {tuple(state_dict[key].shape)} (expected {expected[key]})"
        for key in expected
        if key in state_dict and isinstance(state_dict[key], torch.Tensor)
        and tuple(state_dict[key].shape) != expected[key]
    ]
    problems = [
        f"{label} {_preview(items)}"
        for label, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("mis-shaped", misshaped),
            ("not tensors", not_tensors),
        )
        if items
    ]
    if problems:
        raise ValueError(f"not an official {what} state dict: " + "; ".join(problems))
    return {key: state_dict[key] for key in expected}


def _preview(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return f"[{shown}{more}]"


def convert_official_generator(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Check an official ``LBAMModel(4, 3)`` state dict and return it for strict ``LBAMGenerator`` loading.

    Key names and shapes are identical by construction (the Gaussian scalars stay 0-dim in state dicts);
    a missing, unexpected or mis-shaped key is a ``ValueError``.
    """
    return _check_official(state_dict, _expected_shapes(LBAMGenerator), "LBAM generator (LBAMModel)")


def convert_official_discriminator(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Check an official ``DiscriminatorDoubleColumn(3)`` state dict and return it for strict loading."""
    return _check_official(
        state_dict, _expected_shapes(LBAMDiscriminator), "LBAM discriminator (DiscriminatorDoubleColumn)"
    )


def generator_kwargs_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """The ``LBAMGenerator`` keywords a state dict's shapes imply: ``width``, from the innermost encoder layer's
    channels (the widest, so the most precise: ``ec7`` has ``round(512 * width)`` output channels)."""
    channels = int(state_dict[f"ec{len(_ENCODER_CHANNELS)}.conv.conv.weight"].shape[0])
    return {"width": channels / _ENCODER_CHANNELS[-1]}


register_architecture(Architecture(
    "lbam", LBAMGenerator, LBAMDiscriminator, size_multiple=SIZE_MULTIPLE, train_size=DISCRIMINATOR_SIZE,
    official_converters={"generator": convert_official_generator, "discriminator": convert_official_discriminator},
    generator_kwargs_from_state_dict=generator_kwargs_from_state_dict,
))
