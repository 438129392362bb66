"""Retrain on newly arrived images: shard only what is new, fine-tune the champion, gate, maybe promote.

    python jobs/retrain.py --config jobs/configs/retrain.yaml
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/retrain.py --config ...

Meant for cron / a KubeRay RayCronJob. Exit status 0 for every clean outcome (retrained, nothing new, another
run holds the lock: each says so in one line), 2 for bad configuration, 1 for a failed run.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pipeline.jobcli import run_job
from pipeline.lifecycle.retraining import RetrainJobConfig, run_retraining

DEFAULT_CONFIG = str(Path(__file__).with_name("configs") / "retrain.yaml")


def retrain(config: RetrainJobConfig) -> int:
    """One retrain run; prints its outcome in one line."""
    outcome = run_retraining(config, os.environ)
    print(f"retrain: {outcome.action}: {outcome.message}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    return run_job("retrain", __doc__, RetrainJobConfig, retrain, argv, default_config=DEFAULT_CONFIG)


if __name__ == "__main__":
    sys.exit(main())
