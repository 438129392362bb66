"""Print hole-ratio statistics (mean / p10 / p90, share over 50 %) of the registered mask generators.

    python jobs/mask_stats.py                                  # every generator, 1000 masks each
    python jobs/mask_stats.py --set samples=300 --set 'generators=[lama_thin_256, lama_train_mix]'

Masks are drawn at each generator's nominal square size (256 or 512) unless ``size`` is set. For the
LaMa-configured generators the table also shows LaMa's own measured means (before its > 50 % eval cut),
so a drift of holefill's re-implementation is visible at a glance.
"""

from __future__ import annotations

import sys

from pipeline.jobcli import run_job
from pipeline.data.masks.stats import MaskStatsConfig, format_table


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    return run_job("mask_stats", __doc__, MaskStatsConfig, report, argv)


def report(config: MaskStatsConfig) -> int:
    """Print the hole-ratio table."""
    print(f"hole ratios over {config.samples} masks per generator (seed {config.seed})")
    print(format_table(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
