"""Adding an architecture is a model file under ``models/`` plus one module in ``pipeline/train/architectures/``:
a toy one, registered here, is configured and trains.

The "model file" is the two networks below (they know nothing of training) and the line that registers them;
the "architecture module" (as ``pipeline/train/architectures/rn.py``) is its typed settings, its recipe and the
line that registers its spec. Nothing else in holefill is edited: the training config accepts ``model.arch: toy``
with its typed settings, and the worker's own building blocks (spec -> generator, discriminator, recipe;
``optimiser_step``) train it.
"""

from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, create_model

import models.registry as model_registry
import pipeline.train.spec as spec_registry
from models.registry import Architecture, register_architecture
from pipeline.config import Config, ConfigError, load_config
from pipeline.train.config import TrainJobConfig, model_settings_union
from pipeline.train.loop import optimiser_step
from pipeline.train.recipes import GanRecipe, OptimizerSettings, torch_updater
from pipeline.train.spec import ArchitectureSpec, get_spec, register_spec

TINY_RN = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "train_rn_cpu_tiny.yaml"


# ----------------------------------------------------------------------------------- the "model file"


class ToyGenerator(nn.Module):
    """Two convolutions; ``width`` is its one constructor option (the spec reads it off this signature)."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.inp, self.out = nn.Conv2d(4, width, 3, padding=1), nn.Conv2d(width, 3, 3, padding=1)

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.out(F.relu(self.inp(torch.cat([image * (1 - mask), mask], dim=1)))))


class ToyDiscriminator(nn.Module):
    def __init__(self, use_sigmoid: bool = True) -> None:
        super().__init__()
        self.conv, self.use_sigmoid = nn.Conv2d(3, 1, 4, stride=4), use_sigmoid

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logits = self.conv(image)
        return torch.sigmoid(logits) if self.use_sigmoid else logits


def register_toy_architecture() -> Architecture:
    return register_architecture(Architecture("toy", ToyGenerator, ToyDiscriminator, size_multiple=4, train_size=None))


# ------------------------------------------------------------------------------ the "architecture module"


class ToySettings(Config):
    l1_weight: float = Field(1.0, ge=0)


class ToyRecipe(GanRecipe):
    """Hole L1 plus a non-saturating GAN term on D's logits."""

    name = "toy"

    def __init__(self, options: ToySettings) -> None:
        self.options = options
        self.generator_optimizer = OptimizerSettings(lr=1e-2, betas=(0.5, 0.9))
        self.discriminator_optimizer = OptimizerSettings(lr=1e-2, betas=(0.5, 0.9))

    def discriminator_loss(self, D, image, mask, pred_detached):
        real, fake = D(image), D(pred_detached)
        loss = F.softplus(-real).mean() + F.softplus(fake).mean()
        return loss, {"d_loss": loss.detach()}

    def generator_loss(self, D, image, mask, pred):
        l1 = ((pred - image).abs() * mask).mean()
        loss = self.options.l1_weight * l1 + 0.1 * F.softplus(-D(pred)).mean()
        return loss, {"g_loss": loss.detach(), "g_l1": l1.detach()}


def register_toy_spec(architecture: Architecture) -> ArchitectureSpec:
    return register_spec(ArchitectureSpec(architecture, options=ToySettings, recipe=ToyRecipe,
                                          discriminator_options={"use_sigmoid": False}))


# ------------------------------------------------------------------------------------------------ tests


@pytest.fixture
def toy(monkeypatch) -> ArchitectureSpec:
    """The toy architecture and spec, registered for this test only."""
    monkeypatch.setattr(model_registry.ARCHITECTURES, "_items", dict(model_registry.ARCHITECTURES._items))
    monkeypatch.setattr(spec_registry.SPECS, "_items", dict(spec_registry.SPECS._items))
    return register_toy_spec(register_toy_architecture())


def toy_job_config() -> type[TrainJobConfig]:
    """The training config as the job builds it, its ``model`` union taken from the registry now."""
    return create_model("ToyJobConfig", __base__=TrainJobConfig, model=(model_settings_union(), ...))


def loader_batches(batch: int = 2, size: int = 16):
    generator = torch.Generator().manual_seed(0)
    while True:
        image = torch.randint(0, 256, (batch, 3, size, size), generator=generator, dtype=torch.uint8)
        mask = (torch.rand(batch, size, size, generator=generator) > 0.6).to(torch.uint8) * 255
        yield {"image": image, "mask": mask}


def test_a_toy_architecture_is_configured_with_its_typed_options(toy):
    config_type = toy_job_config()
    config = load_config(config_type, TINY_RN, ["model.arch=toy", "model.options.l1_weight=2",
                                                 "model.generator_options.width=8"])
    assert isinstance(config.model.options, ToySettings) and config.model.options.l1_weight == 2.0
    assert config.model.generator_options.width == 8
    with pytest.raises(ConfigError, match=r"^config key model\.options\.gan_weight: unknown key$"):  # RN's, not toy's
        load_config(config_type, TINY_RN, ["model.arch=toy", "model.options.gan_weight=1"])
    with pytest.raises(ConfigError, match=r"^config key model\.generator_options\.width: "):
        load_config(config_type, TINY_RN, ["model.arch=toy", "model.generator_options.width=wide"])


def test_a_toy_architecture_trains_one_step_through_its_spec(toy):
    config = load_config(toy_job_config(), TINY_RN, ["model.arch=toy", "model.generator_options.width=8"])
    spec = get_spec(config.model.arch)
    torch.manual_seed(0)
    G, D = spec.build_generator(config.model.generator_options), spec.build_discriminator()
    recipe = spec.build_recipe(config.model.options)
    assert recipe.options is config.model.options and not D.use_sigmoid
    update_d = torch_updater(recipe.discriminator_optimizer.build(D.parameters()))
    update_g = torch_updater(recipe.generator_optimizer.build(G.parameters()))
    before = [p.detach().clone() for p in (*G.parameters(), *D.parameters())]

    cpu = torch.device("cpu")
    losses, image, mask = optimiser_step(recipe, G, D, update_d, update_g, loader_batches(), cpu, "fp32", 1)

    assert set(losses) == {"train/d_loss", "train/g_loss", "train/g_l1"}
    assert all(torch.isfinite(value) for value in losses.values())
    after = [*G.parameters(), *D.parameters()]
    assert all(not torch.equal(a, b) for a, b in zip(before, after)), "every parameter takes a step"
    assert image.shape == (2, 3, 16, 16) and mask.shape == (2, 1, 16, 16)
