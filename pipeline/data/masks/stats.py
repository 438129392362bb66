"""Hole-ratio statistics of the registered mask generators beside LaMa's own measurements (``jobs/mask_stats.py``).

Masks are drawn at each generator's nominal square size (256 or 512) unless ``size`` is set. For the
LaMa-configured generators the table also shows LaMa's own measured means (before its > 50 % eval cut),
so a drift of holefill's re-implementation is visible at a glance.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from pipeline.config import Config
from pipeline.data.masks.generators import generator_names, get_generator, hole_ratio_stats

__all__ = ["LAMA_MEASURED_MEANS", "MaskStatsConfig", "format_table"]

# LaMa's measured hole-ratio means of its own generators (PLATFORM.md), for side-by-side comparison.
LAMA_MEASURED_MEANS: dict[str, float] = {
    "lama_thin_256": 0.29,
    "lama_medium_256": 0.22,
    "lama_thick_256": 0.36,
    "lama_train_mix": 0.34,
}


class MaskStatsConfig(Config):
    """What to measure: which generators, how many masks each, at which size, from which seed."""

    generators: list[str] = Field(default_factory=lambda: list(generator_names()))
    samples: int = Field(default=1000, gt=0)
    seed: int = 0
    size: int | None = Field(default=None, gt=0, description="square side; default: each generator's nominal size")

    @field_validator("generators")
    @classmethod
    def _known(cls, names: list[str]) -> list[str]:
        for name in names:
            get_generator(name)  # ValueError naming the known generators
        return names


def format_table(config: MaskStatsConfig) -> str:
    """The statistics table as text, one generator per line."""
    lines = [f"{'generator':<20} {'mean':>6} {'p10':>6} {'p90':>6} {'>50%':>6}   LaMa mean (diff)"]
    for name in config.generators:
        stats = hole_ratio_stats(name, config.samples, seed=config.seed, height=config.size, width=config.size)
        reference = LAMA_MEASURED_MEANS.get(name)
        ref = f"{reference:.2f} ({stats.mean - reference:+.3f})" if reference is not None else "-"
        lines.append(f"{name:<20} {stats.mean:6.3f} {stats.p10:6.3f} {stats.p90:6.3f} {stats.over_half:6.3f}   {ref}")
    return "\n".join(lines)
