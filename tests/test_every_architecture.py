"""The contracts every registered architecture keeps (as timm's test_models.py runs over ``list_models()``).

Each test is parametrised over :func:`models.registry.architectures`: official parameter counts and state-dict keys,
the official outputs of the pattern weights (``tests/data/official_pattern_A.pt``), hole content ignored, the same
answer in train and eval mode, bad input refused with a one-line reason, converters refusing missing, unexpected and
mis-shaped keys. What a contract needs to know of one architecture (the official counts, the sizes to test at, the
keys its converter is tried on) is in :data:`FACTS`, keyed by name; a registered architecture without an entry
fails every test here until it gets one. Layer-specific tests stay in ``test_rn.py`` / ``test_lbam.py``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch

from models.convert import from_official
from models.lbam import LBAMDiscriminator, LBAMGenerator
from models.lbam import convert_official_discriminator as lbam_discriminator_converter
from models.lbam import convert_official_generator as lbam_generator_converter
from models.registry import architectures, get_architecture
from models.rn import RNDiscriminator, RNGenerator
from models.rn import convert_official_discriminator as rn_discriminator_converter
from models.rn import convert_official_generator as rn_generator_converter
from support.pattern_weights import load_reference, official_keys, official_pattern_state_dict

PARTS = ("generator", "discriminator")


@dataclass(frozen=True)
class ConverterCase:
    """An official state dict of ``part`` edited by ``edit``, and the reason its converter must give."""

    part: str
    edit: Callable[[dict[str, torch.Tensor]], None]
    message: str


def _delete(key: str) -> Callable[[dict], None]:
    return lambda state: state.pop(key)


def _set(key: str, value: torch.Tensor) -> Callable[[dict], None]:
    return lambda state: state.__setitem__(key, value)


@dataclass(frozen=True)
class Facts:
    """What the contracts need to know of one architecture."""

    generator: type
    discriminator: type
    converters: dict[str, Callable]
    size_multiple: int
    train_size: int | None
    trainable: dict[str, int]  # official trainable parameter counts per part
    side: int  # a small valid square image side
    one_image: tuple[int, int]  # (H, W) of the one-image train/eval check
    bad_size: tuple[int, int]  # (H, W) that breaks the size rule
    discriminator_takes_mask: bool
    reference_d_shape: tuple[int, ...]
    converter_cases: dict[str, ConverterCase] = field(default_factory=dict)


FACTS: dict[str, Facts] = {
    "rn": Facts(
        generator=RNGenerator, discriminator=RNDiscriminator,
        converters={"generator": rn_generator_converter, "discriminator": rn_discriminator_converter},
        size_multiple=4, train_size=None,
        trainable={"generator": 11_596_591, "discriminator": 2_763_776},
        side=32, one_image=(32, 48), bad_size=(30, 30),
        discriminator_takes_mask=False, reference_d_shape=(1, 1, 30, 30),
        converter_cases={
            "missing": ConverterCase("generator", _delete("middle.3.conv_block.6.sa.beta_conv.bias"),
                                     r"missing keys: middle\.3\.conv_block\.6\.sa\.beta_conv\.bias"),
            "unexpected": ConverterCase("discriminator", _set("conv6.0.weight_orig", torch.zeros(1)),
                                        r"unexpected keys: conv6\.0\.weight_orig"),
            "misshaped": ConverterCase("discriminator", _set("conv1.0.weight_orig", torch.zeros(64, 4, 4, 4)),
                                       r"mis-shaped keys: conv1\.0\.weight_orig \(64, 4, 4, 4\) != \(64, 3, 4, 4\)"),
        },
    ),
    "lbam": Facts(
        generator=LBAMGenerator, discriminator=LBAMDiscriminator,
        converters={"generator": lbam_generator_converter, "discriminator": lbam_discriminator_converter},
        size_multiple=128, train_size=256,
        trainable={"generator": 68_304_948, "discriminator": 22_316_417},
        side=128, one_image=(128, 128), bad_size=(192, 128),
        discriminator_takes_mask=True, reference_d_shape=(1, 1),
        converter_cases={
            "missing": ConverterCase("generator", _delete("dc3.conv.weight"), r"missing \[dc3\.conv\.weight\]"),
            "unexpected": ConverterCase("generator", _set("ec1.conv.bn.weight", torch.ones(64)),
                                        r"unexpected \[ec1\.conv\.bn\.weight\]"),
            "misshaped": ConverterCase("discriminator", _set("fusionLayer.0.bias", torch.zeros(2)),
                                       r"mis-shaped \[fusionLayer\.0\.bias \(2,\) \(expected \(1,\)\)\]"),
        },
    ),
}

ARCHS = architectures()
CONVERTER_CASES = ("missing", "unexpected", "misshaped")


def facts(arch: str) -> Facts:
    assert arch in FACTS, f"architecture {arch!r} is registered but has no entry in FACTS: add its contract facts"
    return FACTS[arch]


@functools.cache
def networks(arch: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The architecture's official generator and discriminator, built once per test session (seeded)."""
    architecture = get_architecture(arch)
    torch.manual_seed(0)
    return architecture.generator(), architecture.discriminator()


@functools.cache
def _official_pattern(arch: str, part: str) -> dict[str, torch.Tensor]:
    return official_pattern_state_dict(arch, part)


def official_pattern(arch: str, part: str) -> dict[str, torch.Tensor]:
    """The official-keyed pattern state dict (a fresh dict each call; the tensors are shared, never edited)."""
    return dict(_official_pattern(arch, part))


def trainable(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def binary_map(*shape: int, p: float = 0.3, seed: int = 0) -> torch.Tensor:
    return (torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) < p).float()


def rectangle_hole(size: int, batch: int = 1) -> torch.Tensor:
    """A (batch,1,size,size) mask with one rectangular hole (1 = hole)."""
    mask = torch.zeros(batch, 1, size, size)
    mask[..., size // 4 : size // 2, size // 3 : 3 * size // 4] = 1
    return mask


# ----------------------------------------------------------------------------------------- registration


@pytest.mark.parametrize("arch", ARCHS)
def test_the_architecture_is_registered_with_its_networks_size_rules_and_converters(arch):
    known, registered = facts(arch), get_architecture(arch)
    assert registered.generator is known.generator and registered.discriminator is known.discriminator
    assert (registered.size_multiple, registered.train_size) == (known.size_multiple, known.train_size)
    assert registered.official_converters == known.converters


# ------------------------------------------------------------------------------------ official structure


@pytest.mark.parametrize("part", PARTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_parameter_count_and_state_dict_keys_and_shapes_are_the_official_ones(arch, part):
    model = dict(zip(PARTS, networks(arch)))[part]
    assert trainable(model) == facts(arch).trainable[part]
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert ours == [(k, shape) for k, shape, _ in official_keys(arch, part)]


# --------------------------------------------------------------------------- official numerical reference


@pytest.mark.parametrize("arch", ARCHS)
def test_pattern_weights_reproduce_the_official_outputs_in_train_and_eval_mode(arch):
    reference = load_reference()
    image, mask = reference["image"], reference["hole_mask"].float()
    architecture = get_architecture(arch)
    # Built on the meta device and filled by assignment: strict loading checks every key, nothing is initialised twice.
    with torch.device("meta"):
        generator, discriminator = architecture.generator(), architecture.discriminator()
    for module, part in ((generator, "generator"), (discriminator, "discriminator")):
        module.load_state_dict(from_official(arch, part, official_pattern(arch, part)), strict=True, assign=True)
    generator.train()
    discriminator.train()  # the reference D output is D's first train-mode forward (e.g. one power iteration)
    d_inputs = (image, mask) if facts(arch).discriminator_takes_mask else (image,)
    with torch.no_grad():
        g_out = generator(image, mask)
        d_out = discriminator(*d_inputs)
    assert g_out.shape == reference[f"{arch}_G_out"].shape
    assert float((g_out - reference[f"{arch}_G_out"]).abs().max()) < 1e-4
    assert d_out.shape == reference[f"{arch}_D_out"].shape == facts(arch).reference_d_shape
    assert float((d_out - reference[f"{arch}_D_out"]).abs().max()) < 1e-4
    generator.eval()  # inference on the official batch of one: the very same numbers
    with torch.no_grad():
        assert torch.equal(generator(image, mask), g_out)


# --------------------------------------------------------------------------------------- generator contract


@pytest.mark.parametrize("arch", ARCHS)
def test_generator_output_is_a_raw_prediction_in_unit_range_identical_in_train_and_eval_for_one_image(arch):
    generator = networks(arch)[0]
    height, width = facts(arch).one_image
    image = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(1))
    mask = binary_map(1, 1, height, width)
    with torch.no_grad():
        train_out = generator.train()(image, mask)
        eval_out = generator.eval()(image, mask)
    assert train_out.shape == (1, 3, height, width)
    assert float(train_out.min()) >= 0.0 and float(train_out.max()) <= 1.0
    # No running statistics in the generator: for a batch of one, train and eval mode compute the same function.
    assert torch.equal(train_out, eval_out)


@pytest.mark.parametrize("hole", ["scattered", "rectangle"])
@pytest.mark.parametrize("arch", ARCHS)
def test_generator_output_ignores_what_the_hole_holds(arch, hole):
    generator = networks(arch)[0].train()
    side = facts(arch).side
    image = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(2))
    mask = binary_map(1, 1, side, side, seed=3) if hole == "scattered" else rectangle_hole(side)
    scribbled = torch.where(mask.bool(), torch.rand_like(image), image)
    assert not torch.equal(scribbled, image)
    with torch.no_grad():
        assert torch.equal(generator(image, mask), generator(scribbled, mask))


def _bad_inputs(arch: str) -> list[tuple[torch.Tensor, torch.Tensor, str]]:
    known = facts(arch)
    s, (bad_h, bad_w) = known.side, known.bad_size
    return [
        (torch.rand(1, 3, s, s), torch.zeros(1, s, s), "mask must be a"),
        (torch.rand(1, 3, s, s), torch.zeros(1, 3, s, s), "1 channel"),
        (torch.rand(1, 3, s, s), torch.zeros(1, 1, s // 2, s // 2), "does not match"),
        (torch.rand(1, 4, s, s), torch.zeros(1, 1, s, s), r"\(B,3,H,W\)"),
        (torch.rand(1, 3, s, s), torch.full((1, 1, s, s), 255.0), r"\[0,1\]"),
        (torch.rand(1, 3, bad_h, bad_w), torch.zeros(1, 1, bad_h, bad_w), f"multiples of {known.size_multiple}"),
    ]


@pytest.mark.parametrize("case", range(6))
@pytest.mark.parametrize("arch", ARCHS)
def test_generator_rejects_bad_input_with_a_message_naming_the_rule(arch, case):
    image, mask, message = _bad_inputs(arch)[case]
    with pytest.raises(ValueError, match=message):
        networks(arch)[0](image, mask)


# --------------------------------------------------------------------------------------- official converters


@pytest.mark.parametrize("part", PARTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_conversion_strips_data_parallel_prefixes(arch, part):
    official = official_pattern(arch, part)
    plain = from_official(arch, part, official)
    prefixed = from_official(arch, part, {f"module.{k}": v for k, v in official.items()})
    assert list(prefixed) == list(plain)
    assert all(torch.equal(prefixed[k], plain[k]) for k in plain)


@pytest.mark.parametrize("case", CONVERTER_CASES)
@pytest.mark.parametrize("arch", ARCHS)
def test_converter_names_a_missing_an_unexpected_and_a_mis_shaped_key(arch, case):
    known = facts(arch)
    assert set(known.converter_cases) == set(CONVERTER_CASES), f"{arch}: FACTS lacks converter cases"
    broken = known.converter_cases[case]
    official = official_pattern(arch, broken.part)
    broken.edit(official)
    with pytest.raises(ValueError, match=broken.message):
        get_architecture(arch).official_converters[broken.part](official)
