"""Inpaint images with a registered (or local) generator: any size in, same size out, composited.

    python jobs/inpaint.py --image photo.jpg --mask hole.png --out filled.png          # models:/lbam@champion
    python jobs/inpaint.py --model models:/rn/4 --image photos/ --mask masks/ --out filled/
    python jobs/inpaint.py --model ckpt/checkpoint_000010 --image photo.jpg --out filled.png   # generated mask

Masks are 8-bit gray PNGs the size of the image, 255 = hole. Without ``--mask`` a mask is drawn by
``mask_generator`` (seeded by ``seed`` and the file name) and saved beside the output as ``<name>.mask.png``.
Sizes that are not multiples of the model's size rule are reflect-padded (``--fit pad``) or covered by
corner windows (``--fit crop``) and brought back to the input size; pixels outside the hole are the input's.
Photos larger than ``hires.trigger`` (1024 px) are inpainted in windows around their holes (``hires.margin``
pixels of context, downscaled to ``hires.limit`` when larger), the rest copied: ``--hires whole`` sends
the whole photo through the generator instead.
"""

from __future__ import annotations

import os
import sys

from pipeline.jobcli import Flag, run_job
from pipeline.lifecycle.inference import InpaintJobConfig, inpaint_paths, load_model_ref
from pipeline.tracking import check_tracking_server, resolve_tracking_uri

FLAGS = {
    "model": Flag("model", "models:/name@alias (default models:/lbam@champion), models:/name/N, checkpoint, weights"),
    "arch": Flag("arch", "architecture of a plain weights file (rn, lbam)"),
    "image": Flag("image", "image file or folder"),
    "mask": Flag("mask", "mask PNG (255 = hole) or folder of <stem>.png / <stem>.mask.png"),
    "out": Flag("out", "output file, or folder"),
    "fit": Flag("fit", "how to meet the model's size multiple", options={"choices": ("pad", "crop")}),
    "hires": Flag("hires.strategy", "large photos: windows around the holes, or the whole image",
                  options={"choices": ("crop", "whole")}),
}


def inpaint(config: InpaintJobConfig) -> int:
    """Load the model, inpaint every image, print the paths written."""
    tracking_uri = None
    if config.model.startswith(("models:/", "runs:/")):  # only registry references need a tracking server
        tracking_uri = resolve_tracking_uri(config.tracking_uri, os.environ, local_store=False)
        check_tracking_server(tracking_uri)
    generator, arch = load_model_ref(config.model, tracking_uri, config.arch, config.generator_kwargs)
    generator.to(config.device)
    written = inpaint_paths(generator, arch, config.image, config.out, config.mask, config.fit,
                            config.mask_generator, config.seed, config.hires.crop_strategy())
    for path in written:
        print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 bad input)."""
    return run_job("inpaint", __doc__, InpaintJobConfig, inpaint, argv, FLAGS)


if __name__ == "__main__":
    sys.exit(main())
