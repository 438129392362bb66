"""Retrain on newly arrived images: shard only what is new, fine-tune the champion, gate, maybe promote.

    python jobs/retrain.py --config jobs/configs/retrain.yaml
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/retrain.py --config ...

Meant for cron / a KubeRay RayCronJob. Exit status 0 for every clean outcome (retrained, nothing new, another
run holds the lock: each says so in one line), 2 for bad configuration, 1 for a failed run.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.joblog import setup_job_logging  # noqa: E402
from pipeline.config import ConfigError, add_config_arguments, parse_job_config  # noqa: E402
from pipeline.retraining import RetrainJobConfig, run_retraining  # noqa: E402

DEFAULT_CONFIG = str(Path(__file__).with_name("configs") / "retrain.yaml")


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    setup_job_logging("retrain")
    parser = argparse.ArgumentParser(prog="retrain", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, DEFAULT_CONFIG)
    args = parser.parse_args(argv)
    try:
        config = parse_job_config(RetrainJobConfig, args)
        outcome = run_retraining(config, os.environ)
    except (ConfigError, ValueError) as exc:
        print(f"retrain: {exc}", file=sys.stderr)
        return 2
    print(f"retrain: {outcome.action}: {outcome.message}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
