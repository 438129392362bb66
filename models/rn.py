"""Region Normalization (RN, Yu et al., AAAI 2020) for image inpainting, to the official code's behaviour.

The official implementation (``geekyutao/RN``) is the reference: module names reproduce its state-dict keys
exactly, so official checkpoints load through an identity conversion that is checked key by key, and the
numerics match it layer for layer (verified against ``tests/data/official_pattern_A.pt``). Its quirks are
kept on purpose and documented where they live:

* in training, statistics are pooled over the whole batch ("BN-style" RN, official issue #12), so an image's
  output depends on its batch-mates; ``per_sample=True`` is the opt-in instance-style alternative. At
  inference (eval mode) every RN layer uses per-sample statistics, whatever it was built with: an answer
  depends only on its own input (serving, evaluation and export batch requests), and for a batch of one this
  *is* the official computation, so official numerics are kept exactly where the official code ran them;
* the effective epsilon of the normaliser is ``eps * N / S_r``, not ``eps``;
* RN-B adds both region betas at every pixel (only the gammas are region-specific);
* the decoder's RN-L layers always use the threshold 0.8, whatever the residual blocks use;
* conv biases are initialised from N(1e-4, 1) (almost certainly meant to be a constant 1e-4).

Conventions: images are float (B,3,H,W) in [0,1]; masks are float (B,1,H,W) with **1 = hole**.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.spectral_norm import SpectralNorm

from models.registry import Architecture, register_architecture
from models.input_checks import check_inpainting_inputs

__all__ = [
    "region_normalize",
    "RNB",
    "RNL",
    "SelfAwareAffine",
    "RNResidualBlock",
    "RNGenerator",
    "RNDiscriminator",
    "init_rn_weights",
    "convert_official_generator",
    "convert_official_discriminator",
    "DECODER_THRESHOLD",
]

# The official decoder builds its RN-L layers with the constructor default, ignoring ``--threshold``.
DECODER_THRESHOLD = 0.8
# Generator H and W must be multiples of this: two stride-2 convs down, two PixelShuffle(2) up.
SIZE_MULTIPLE = 4


# --------------------------------------------------------------------------------------------------
# The region normaliser (official ``RN_binarylabel``)
# --------------------------------------------------------------------------------------------------


def _check_feature_map(x: torch.Tensor, name: str = "features") -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a (B,C,h,w) tensor, got shape {shape}")


def _normalize_one_region(x: torch.Tensor, region: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise ``x`` with the statistics of ``region`` pooled over batch and space (official ``RN_binarylabel.rn``).

    Inside the region the result is ``(x - mu_r) / sqrt(var_r + eps * N / S_r)``; outside it is ~0.
    The official code gets there by filling the outside with the region mean, batch-normalising and
    rescaling by ``sqrt(S_r / N)``; we follow the same route so the numbers (outside ~1e-8 included)
    and the behaviour for non-binary labels are the official ones.
    """
    dims = (0, 2, 3)
    count = x.shape[0] * x.shape[2] * x.shape[3]  # N of A1.3: pixels the statistics pool over
    inside = x * region
    region_size = region.sum(dim=dims, keepdim=True)
    # An empty region would divide by zero; the official code substitutes 1 (the region then maps to 0).
    region_size = torch.where(region_size == 0, torch.ones_like(region_size), region_size)
    region_mean = inside.sum(dim=dims, keepdim=True) / region_size
    filled = inside + (1 - region) * region_mean
    if torch.onnx.is_in_onnx_export():
        # The TorchScript ONNX exporter cannot export batch_norm over a symbolic channel count (dynamic image
        # sizes); the same batch statistics spelled out export, and agree with batch_norm to ~1e-7.
        mean = filled.mean(dim=dims, keepdim=True)
        variance = (filled - mean).square().mean(dim=dims, keepdim=True)
        normalized = (filled - mean) * torch.rsqrt(variance + eps)
    else:
        # BatchNorm2d(affine=False, track_running_stats=False): batch statistics in train and eval alike.
        normalized = F.batch_norm(filled, None, None, training=True, momentum=0.0, eps=eps)
    return normalized * torch.sqrt(region_size / count)


def region_normalize(
    x: torch.Tensor, region: torch.Tensor, per_sample: bool = False, eps: float = 1e-5
) -> torch.Tensor:
    """Region Normalization: normalise ``x`` separately inside ``region`` and inside its complement.

    Args:
        x: features (B,C,h,w).
        region: region label (B,1,h,w) shared by all channels, or (B,C,h,w); 1 inside the region, 0
            outside. It is detached: no gradient flows into the label.
        per_sample: ``False`` (official) pools each region's mean and variance per channel over the
            whole batch and space, so an image's output depends on its batch-mates (RN issue #12).
            ``True`` pools per sample and channel over space only (instance-style): each image is
            normalised exactly as the official mode normalises it in a batch of one, bit for bit (each image goes
            through the official code alone; traced/exported graphs compute the same statistics vectorised).
        eps: the BatchNorm epsilon of the official normaliser; the effective epsilon inside a region of
            ``S_r`` pixels out of ``N`` is ``eps * N / S_r``.

    Returns:
        (B,C,h,w), same dtype as ``x``: inside each region ``(x - mu_r) / sqrt(var_r + eps*N/S_r)``,
        the two regions' results summed.
    """
    _check_feature_map(x)
    _check_feature_map(region, "region")
    if region.shape[0] != x.shape[0] or region.shape[-2:] != x.shape[-2:] or region.shape[1] not in (1, x.shape[1]):
        raise ValueError(
            f"region shape {tuple(region.shape)} must be (B,1,h,w) or (B,C,h,w) for features {tuple(x.shape)}"
        )
    # Region sizes reach B*h*w (about 1e6): half-precision sums and means would be visibly wrong, so the
    # statistics are always computed in at least float32 (as autocast does for BatchNorm).
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    features = x.to(compute_dtype)
    label = region.detach().to(compute_dtype)
    if not per_sample:
        out = _both_regions(features, label, eps)
    elif torch.compiler.is_exporting() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        # Exported (torch.export, and the ONNX exporter built on it) and traced graphs must keep a dynamic batch,
        # which the loop below would specialise: (B,C,h,w) -> (1,B*C,h,w), whose per-channel
        # statistics are each image's own (shape-agnostic ops only; equal to the loop below up to float rounding).
        flat_label = label.expand_as(features).flatten(0, 1).unsqueeze(0)
        out = _both_regions(features.flatten(0, 1).unsqueeze(0), flat_label, eps).view_as(features)
    else:
        # Each image through the official code as a batch of one: the same shapes and memory layout, so the same
        # kernels, and bit for bit what it gets alone, whatever it is batched with.
        parts = [_both_regions(features[i:i + 1], label[i:i + 1], eps) for i in range(features.shape[0])]
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
    return out.to(x.dtype)


def _both_regions(features: torch.Tensor, label: torch.Tensor, eps: float) -> torch.Tensor:
    return _normalize_one_region(features, label, eps) + _normalize_one_region(features, 1 - label, eps)


def _per_channel(v: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, 1, 1)


class RNB(nn.Module):
    """RN-B (basic Region Normalization, official ``RN_B``): the encoder's mask-guided normaliser.

    Normalises the hole region and the valid region separately, then applies a per-channel affine
    transform whose gammas are region-specific. Official quirk kept: both betas are added at every pixel.
    Parameters ``foreground_gamma``, ``foreground_beta`` (hole region), ``background_gamma``,
    ``background_beta`` (valid region), each (C,), start at 0 so the layer starts as plain RN. Statistics:
    per sample in eval mode (inference), pooled over the batch in training unless ``per_sample``.

    forward(x, mask):
        x: features (B,C,h,w). mask: the full-resolution (B,1,H,W) mask, 1 = hole. It is resized to
        (h,w) with ``F.interpolate(mode="nearest")``, which for a factor-k reduction takes the top-left
        pixel of each k×k block (not max-pooling). Returns (B,C,h,w).
    """

    def __init__(self, channels: int, per_sample: bool = False) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"RNB channels must be >= 1, got {channels}")
        self.per_sample = per_sample
        self.foreground_gamma = nn.Parameter(torch.zeros(channels))
        self.foreground_beta = nn.Parameter(torch.zeros(channels))
        self.background_gamma = nn.Parameter(torch.zeros(channels))
        self.background_beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        _check_feature_map(x)
        if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] != x.shape[0]:
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"RNB mask must be (B,1,H,W) with B={x.shape[0]} (1 = hole), got shape {shape}")
        hole = F.interpolate(mask.to(x.dtype), size=x.shape[-2:], mode="nearest")
        normalized = region_normalize(x, hole, per_sample=self.per_sample or not self.training)
        foreground = normalized * hole * (1 + _per_channel(self.foreground_gamma)) + _per_channel(self.foreground_beta)
        background = normalized * (1 - hole) * (1 + _per_channel(self.background_gamma)) + _per_channel(
            self.background_beta
        )
        return foreground + background

    def extra_repr(self) -> str:
        return f"{self.foreground_gamma.numel()}, per_sample={self.per_sample}"


class SelfAwareAffine(nn.Module):
    """RN-L's spatial response branch (official ``SelfAware_Affine``), 198 parameters at kernel 7.

    forward(x) with x (B,C,h,w) returns ``(importance, gamma, beta)``, each (B,1,h,w):
    ``importance = sigmoid(conv1([mean_c(x), max_c(x)]))`` in (0,1), and ``gamma``/``beta`` are
    ``gamma_conv(importance)``/``beta_conv(importance)``, a spatially varying affine shared by all channels.
    """

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"SelfAwareAffine kernel_size must be a positive odd number, got {kernel_size}")
        padding = kernel_size // 2
        self.conv1 = nn.Conv2d(2, 1, kernel_size, padding=padding, bias=False)
        self.gamma_conv = nn.Conv2d(1, 1, kernel_size, padding=padding)
        self.beta_conv = nn.Conv2d(1, 1, kernel_size, padding=padding)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        importance = torch.sigmoid(self.conv1(pooled))
        return importance, self.gamma_conv(importance), self.beta_conv(importance)


class RNL(nn.Module):
    """RN-L (learnable Region Normalization, official ``RN_L``): normalisation without a mask.

    The sub-module ``sa`` (:class:`SelfAwareAffine`) maps the features to a spatial response ``s``;
    pixels with ``s >= threshold`` (detached, not differentiable) form one region, the rest the other;
    :func:`region_normalize` normalises each, and ``y = n * (1 + gamma) + beta`` applies the spatial
    affine. Gradients reach ``sa.conv1`` only through ``gamma``/``beta``. Statistics: per sample in eval mode
    (inference), pooled over the batch in training unless ``per_sample``.

    forward(x): x (B,C,h,w) -> (B,C,h,w).
    """

    def __init__(self, channels: int, threshold: float = 0.8, per_sample: bool = False) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"RNL channels must be >= 1, got {channels}")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"RNL threshold must lie in [0,1] (it thresholds a sigmoid), got {threshold}")
        self.channels = channels
        self.threshold = threshold
        self.per_sample = per_sample
        self.sa = SelfAwareAffine(kernel_size=7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_feature_map(x)
        if x.shape[1] != self.channels:
            raise ValueError(f"RNL expects {self.channels} channels, got {x.shape[1]}")
        importance, gamma, beta = self.sa(x)
        region = (importance.detach() >= self.threshold).to(x.dtype)
        # A (B,1,h,w) label gives the same per-channel statistics as the official expanded (B,C,h,w) one.
        normalized = region_normalize(x, region, per_sample=self.per_sample or not self.training)
        return normalized * (1 + gamma) + beta

    def extra_repr(self) -> str:
        return f"{self.channels}, threshold={self.threshold}, per_sample={self.per_sample}"


# --------------------------------------------------------------------------------------------------
# Generator
# --------------------------------------------------------------------------------------------------


class RNResidualBlock(nn.Module):
    """Residual block of the RN generator (official ``saRN_ResnetBlock``): EdgeConnect's block with RN-L.

    ``x + [RP(d), conv3x3 dil d, RN-L, ReLU, RP(1), conv3x3, RN-L](x)``, no activation after the sum.
    ``conv_block`` indices 1/5 (convs) and 2/6 (RN-L) are the official state-dict names.
    """

    def __init__(self, channels: int, dilation: int = 2, threshold: float = 0.8, per_sample: bool = False) -> None:
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(dilation),
            nn.Conv2d(channels, channels, kernel_size=3, dilation=dilation),
            RNL(channels, threshold, per_sample),
            nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, kernel_size=3),
            RNL(channels, threshold, per_sample),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class RNGenerator(nn.Module):
    """The RN inpainting generator (official ``G_Net``), 11,596,591 parameters at the defaults.

    Encoder (conv7 + RN-B, two stride-2 conv4 + RN-B), ``residual_blocks`` dilated residual blocks with
    RN-L at ``threshold``, and a PixelShuffle decoder with RN-L fixed at :data:`DECODER_THRESHOLD`
    (official behaviour). In eval mode every RN layer normalises each image with its own statistics (an
    image's output is what the official model gives it in a batch of one, whatever it is batched with);
    in training they pool over the batch as the official code does, or per sample with ``per_sample_stats=True``.
    The constructor applies the official initialisation (:func:`init_rn_weights`).

    forward(image, mask):
        image: (B,3,H,W) float in [0,1]; mask: (B,1,H,W) float in [0,1], 1 = hole; H, W multiples of 4.
        Holes are filled with 1.0 (white) before the encoder; the mask reaches the network only through
        RN-B. Returns the raw prediction (B,3,H,W) in [0,1], ``(tanh(y)+1)/2``, **not composited**:
        callers composite with ``pred * mask + image * (1 - mask)``.
    """

    def __init__(self, residual_blocks: int = 8, threshold: float = 0.8, per_sample_stats: bool = False) -> None:
        super().__init__()
        if residual_blocks < 0:
            raise ValueError(f"residual_blocks must be >= 0, got {residual_blocks}")
        # What rebuilds this network from its state dict (a registered model records it).
        self.constructor_kwargs = {"residual_blocks": residual_blocks, "threshold": threshold,
                                   "per_sample_stats": per_sample_stats}
        self.per_sample_stats = per_sample_stats
        self.encoder_prePad = nn.ReflectionPad2d(3)
        self.encoder_conv1 = nn.Conv2d(3, 64, kernel_size=7)
        self.encoder_in1 = RNB(64, per_sample_stats)
        self.encoder_conv2 = nn.Conv2d(64, 128, kernel_size=4, stride=2, padding=1)
        self.encoder_in2 = RNB(128, per_sample_stats)
        self.encoder_conv3 = nn.Conv2d(128, 256, kernel_size=4, stride=2, padding=1)
        self.encoder_in3 = RNB(256, per_sample_stats)
        self.encoder_relu = nn.ReLU(inplace=True)
        self.middle = nn.Sequential(
            *(
                RNResidualBlock(256, dilation=2, threshold=threshold, per_sample=per_sample_stats)
                for _ in range(residual_blocks)
            )
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(256, 512, kernel_size=3, padding=1),
            nn.PixelShuffle(2),
            RNL(128, DECODER_THRESHOLD, per_sample_stats),
            nn.ReLU(inplace=True),
            nn.Conv2d(128, 256, kernel_size=3, padding=1),
            nn.PixelShuffle(2),
            RNL(64, DECODER_THRESHOLD, per_sample_stats),
            nn.ReLU(inplace=True),
            nn.ReflectionPad2d(3),
            nn.Conv2d(64, 3, kernel_size=7),
        )
        init_rn_weights(self)

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        check_inpainting_inputs(image, mask, size_multiple=SIZE_MULTIPLE)
        mask = mask.to(image.dtype)
        x = image * (1 - mask) + mask  # official: holes become white, the mask is not concatenated
        x = self.encoder_relu(self.encoder_in1(self.encoder_conv1(self.encoder_prePad(x)), mask))
        x = self.encoder_relu(self.encoder_in2(self.encoder_conv2(x), mask))
        x = self.encoder_relu(self.encoder_in3(self.encoder_conv3(x), mask))
        x = self.decoder(self.middle(x))
        return (torch.tanh(x) + 1) / 2


# --------------------------------------------------------------------------------------------------
# Discriminator
# --------------------------------------------------------------------------------------------------


class _Float32SpectralNorm(SpectralNorm):
    """The legacy spectral-norm hook with its power iteration and ``σ`` computed in float32 under autocast.

    The hook runs inside the forward, i.e. inside any autocast region, where ``mv`` is on CUDA's
    low-precision list: the power iteration and ``σ`` would run in bf16/fp16 and the normalised weight
    would carry their rounding. Outside autocast the computation is unchanged, op for op.
    """

    def __call__(self, module: nn.Module, inputs: object) -> None:
        device_type = getattr(module, self.name + "_orig").device.type
        with torch.autocast(device_type=device_type, enabled=False):
            super().__call__(module, inputs)


def _sn_conv(in_channels: int, out_channels: int, stride: int) -> nn.Conv2d:
    # Legacy hook-based spectral norm on purpose: its parameter/buffer names (weight_orig/_u/_v) are the
    # official checkpoint's, and it runs one power iteration per training-mode forward like the original.
    conv = nn.utils.spectral_norm(nn.Conv2d(in_channels, out_channels, kernel_size=4, stride=stride, padding=1, bias=False))
    # SpectralNorm.apply builds its hook object itself, so the float32 behaviour is given to that object; the
    # state-dict hooks share it, and isinstance(hook, SpectralNorm) (remove_spectral_norm) still holds.
    for hook in conv._forward_pre_hooks.values():
        if type(hook) is SpectralNorm:
            hook.__class__ = _Float32SpectralNorm
    return conv


class RNDiscriminator(nn.Module):
    """RN's discriminator (official ``D_Net``): EdgeConnect's 70×70 PatchGAN with spectral norm.

    Five bias-free 4×4 convs (stride 2, 2, 2, 1, 1; channels 64-128-256-512-1), LeakyReLU(0.2) after the
    first four, all spectral-normalised; 2,763,776 parameters at ``in_channels=3``. Each training-mode
    forward runs one power iteration and updates ``weight_u``/``weight_v`` in place. The constructor
    applies the official initialisation.

    forward(image): image (B,in_channels,H,W) -> patch map (B,1,H/8-2,W/8-2), sigmoid probabilities when
    ``use_sigmoid`` (official; computed in float32), raw logits otherwise (training: ``BCEWithLogits``, see
    ``models.losses.rn_discriminator_loss``). The power iteration runs in float32 under autocast.
    """

    def __init__(self, in_channels: int = 3, use_sigmoid: bool = True) -> None:
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        self.use_sigmoid = use_sigmoid
        self.conv1 = nn.Sequential(_sn_conv(in_channels, 64, 2), nn.LeakyReLU(0.2, inplace=True))
        self.conv2 = nn.Sequential(_sn_conv(64, 128, 2), nn.LeakyReLU(0.2, inplace=True))
        self.conv3 = nn.Sequential(_sn_conv(128, 256, 2), nn.LeakyReLU(0.2, inplace=True))
        self.conv4 = nn.Sequential(_sn_conv(256, 512, 1), nn.LeakyReLU(0.2, inplace=True))
        self.conv5 = nn.Sequential(_sn_conv(512, 1, 1))
        init_rn_weights(self)

    def features(self, image: torch.Tensor) -> list[torch.Tensor]:
        """The five intermediate maps conv1..conv5 (conv5 before the sigmoid), as the official D returns them."""
        if not isinstance(image, torch.Tensor) or image.dim() != 4:
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"discriminator input must be a (B,C,H,W) tensor, got shape {shape}")
        maps = []
        x = image
        for layer in (self.conv1, self.conv2, self.conv3, self.conv4, self.conv5):
            x = layer(x)
            maps.append(x)
        return maps

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logits = self.features(image)[-1]
        # The sigmoid in float32: in bf16 it reaches exactly 1.0 from a logit of 9 on (identical in fp32).
        return torch.sigmoid(logits.float()) if self.use_sigmoid else logits


# --------------------------------------------------------------------------------------------------
# Initialisation
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def init_rn_weights(
    module: nn.Module, scale: float = 0.1, bias_std: float = 1.0, generator: torch.Generator | None = None
) -> nn.Module:
    """Official RN initialisation (``module_util.initialize_weights``), applied in place; returns ``module``.

    Every ``nn.Conv2d`` (RN-L's self-aware convs and the discriminator's spectral-norm convs included)
    gets ``kaiming_normal_(fan_in, a=0)`` scaled by ``scale``; for spectral-norm convs this is written to
    ``weight_orig``, as the official code does through the shared storage. Conv biases are drawn from
    N(1e-4, ``bias_std``): the official call ``init.normal_(bias, 0.0001)`` sets the *mean* to 1e-4 and
    keeps std 1, almost certainly meant as a constant; ``bias_std=1.0`` reproduces it, a small value
    (e.g. 0) gives the evident intent. RN-B's gammas and betas are left as they are (0 when fresh).
    ``generator`` makes the draw independent of the global RNG.
    """
    if scale <= 0:
        raise ValueError(f"init scale must be > 0, got {scale}")
    if bias_std < 0:
        raise ValueError(f"bias_std must be >= 0, got {bias_std}")
    for layer in module.modules():
        if not isinstance(layer, nn.Conv2d):
            continue
        weight = layer.weight_orig if hasattr(layer, "weight_orig") else layer.weight
        nn.init.kaiming_normal_(weight, a=0, mode="fan_in", generator=generator)
        weight.mul_(scale)
        if layer.bias is not None:
            nn.init.normal_(layer.bias, mean=1e-4, std=bias_std, generator=generator)
    return module


# --------------------------------------------------------------------------------------------------
# Official checkpoints
# --------------------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _expected_shapes(part: str) -> dict[str, tuple[int, ...]]:
    # Built on the meta device: the key set and shapes without allocating or initialising 14M weights.
    builder: Callable[[], nn.Module] = RNGenerator if part == "generator" else RNDiscriminator
    with torch.device("meta"):
        model = builder()
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def _summarise(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def _convert_identity(state_dict: Mapping[str, torch.Tensor], part: str) -> dict[str, torch.Tensor]:
    expected = _expected_shapes(part)
    missing = [k for k in expected if k not in state_dict]
    unexpected = sorted(k for k in state_dict if k not in expected)
    misshaped = [
        f"{k} {tuple(state_dict[k].shape)} != {expected[k]}"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != expected[k]
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_summarise(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_summarise(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped keys: {_summarise(misshaped)}")
    if problems:
        raise ValueError(f"not an official RN {part} state dict: " + "; ".join(problems))
    not_float = [k for k in expected if not state_dict[k].is_floating_point()]
    if not_float:
        raise ValueError(f"official RN {part} state dict entries must be floating point: {_summarise(not_float)}")
    # holefill's module names are the official ones, so the conversion is the identity once checked.
    return {key: state_dict[key] for key in expected}


def convert_official_generator(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Check an official ``G_Net`` state dict (146 entries); return it for ``RNGenerator.load_state_dict(strict=True)``.

    Raises ``ValueError`` naming missing, unexpected or mis-shaped keys.
    """
    return _convert_identity(state_dict, "generator")


def convert_official_discriminator(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Check an official ``D_Net`` state dict (15 spectral-norm entries) and return it for ``RNDiscriminator``.

    Raises ``ValueError`` naming missing, unexpected or mis-shaped keys.
    """
    return _convert_identity(state_dict, "discriminator")


def generator_kwargs_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """The ``RNGenerator`` keywords a state dict's shapes imply: ``residual_blocks``, the number of ``middle`` blocks.

    ``threshold`` and ``per_sample_stats`` leave no trace in the weights: they keep their defaults."""
    blocks = {int(key.split(".")[1]) for key in state_dict if key.startswith("middle.") and key.split(".")[1].isdigit()}
    if blocks != set(range(len(blocks))):
        raise ValueError(f"middle blocks are not numbered 0..n-1: {sorted(blocks)}")
    return {"residual_blocks": len(blocks)}


register_architecture(Architecture(
    "rn", RNGenerator, RNDiscriminator, size_multiple=SIZE_MULTIPLE, train_size=None,
    official_converters={"generator": convert_official_generator, "discriminator": convert_official_discriminator},
    generator_kwargs_from_state_dict=generator_kwargs_from_state_dict,
))
