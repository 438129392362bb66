"""Train LBAM on Ray Train + DeepSpeed and register the generator in MLflow.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train_lbam.py --config jobs/configs/train_lbam.yaml --set train.max_steps=1000

or directly: `python jobs/train_lbam.py --set scaling.num_workers=2`. LBAM's discriminator takes 256x256 crops
only, and its perceptual and style losses need torchvision VGG16 weights: `model.options.vgg_weights` (path or
URL; `model.options.allow_random_vgg=true` for smoke runs). Other options: the loss weights
`model.options.{hole,valid,perceptual,style,adversarial_weight,gp_weight}` and `adversarial`. Every key:
`pipeline/train/config.py`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.lifecycle.training import training_main


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point (`holefill-train-lbam`); returns the exit status."""
    return training_main("lbam", __doc__, argv, Path(__file__).resolve().parent / "configs" / "train_lbam.yaml")


if __name__ == "__main__":
    sys.exit(main())
