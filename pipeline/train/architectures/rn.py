"""RN's training spec: the RN networks, its loss options and recipe, D built to output logits."""

from __future__ import annotations

from models.registry import get_architecture
from pipeline.train.official import rn_recipe
from pipeline.train.recipes import RNOptions
from pipeline.train.spec import ArchitectureSpec, register_spec

SPEC = register_spec(ArchitectureSpec(
    architecture=get_architecture("rn"),
    options=RNOptions,
    recipe=rn_recipe,
    # The recipe's BCE terms take logits (BCEWithLogits in float32), so training drops D's final sigmoid.
    discriminator_options={"use_sigmoid": False},
))
