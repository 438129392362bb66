"""LBAM's training spec: the LBAM networks, its loss options (VGG16 weights among them) and recipe."""

from __future__ import annotations

from models.registry import get_architecture
from pipeline.train.official import lbam_recipe
from pipeline.train.recipes import LBAMOptions
from pipeline.train.spec import ArchitectureSpec, register_spec

SPEC = register_spec(ArchitectureSpec(architecture=get_architecture("lbam"), options=LBAMOptions, recipe=lbam_recipe))
