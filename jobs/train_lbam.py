"""Train LBAM on Ray Train + DeepSpeed and register the generator in MLflow.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train_lbam.py --config jobs/configs/train_lbam.yaml --set train.max_steps=1000

or directly: `python jobs/train_lbam.py --set scaling.num_workers=2`. See `pipeline/train/config.py` for every key.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script (`python jobs/train_lbam.py`, also inside a Ray job's working dir): make the repo importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.jobcli import run_job  # noqa: E402
from pipeline.lifecycle.training import training_job  # noqa: E402
from pipeline.train.config import TrainJobConfig  # noqa: E402

DEFAULT_CONFIG = str(Path(__file__).resolve().parent / "configs" / "train_lbam.yaml")


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point (`holefill-train-lbam`); returns the exit status."""
    return run_job("train_lbam", __doc__, TrainJobConfig, training_job("lbam"), argv, default_config=DEFAULT_CONFIG)


if __name__ == "__main__":
    sys.exit(main())
