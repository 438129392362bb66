"""Train RN on Ray Train + DeepSpeed and register the generator in MLflow.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train_rn.py --config jobs/configs/train_rn.yaml --set train.max_steps=1000

or directly: `python jobs/train_rn.py --set scaling.num_workers=2`. RN trains on any crop size that is a multiple
of 4; its options: `model.options.{l1_weight,gan_weight}` (loss weights, official 1 and 0.1) and
`model.generator_options.{residual_blocks,threshold,per_sample_stats}`. The LR falls by 0.8 per epoch from epoch 3
(`train.steps_per_epoch` says how long an epoch is). Every key: `pipeline/train/config.py`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.lifecycle.training import training_main


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point (`holefill-train-rn`); returns the exit status."""
    return training_main("rn", __doc__, argv, Path(__file__).resolve().parent / "configs" / "train_rn.yaml")


if __name__ == "__main__":
    sys.exit(main())
