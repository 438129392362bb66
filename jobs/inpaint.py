"""Inpaint images with a registered (or local) generator: any size in, same size out, composited.

    python jobs/inpaint.py --image photo.jpg --mask hole.png --out filled.png          # models:/lbam@champion
    python jobs/inpaint.py --model models:/rn/4 --image photos/ --mask masks/ --out filled/
    python jobs/inpaint.py --model ckpt/checkpoint_000010 --image photo.jpg --out filled.png   # generated mask

Masks are 8-bit gray PNGs the size of the image, 255 = hole. Without ``--mask`` a mask is drawn by
``mask_generator`` (seeded by ``seed`` and the file name) and saved beside the output as ``<name>.mask.png``.
Sizes that are not multiples of the model's size rule are reflect-padded (``--fit pad``) or covered by
corner windows (``--fit crop``) and brought back to the input size; pixels outside the hole are the input's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.joblog import setup_job_logging  # noqa: E402
from pipeline.config import ConfigError, add_config_arguments, parse_job_config  # noqa: E402
from pipeline.inference import InpaintJobConfig, inpaint_paths, load_model_ref  # noqa: E402
from pipeline.tracking import check_tracking_server, resolve_tracking_uri  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inpaint", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="models:/name@alias (default models:/lbam@champion), models:/name/N, checkpoint, weights")
    parser.add_argument("--arch", help="architecture of a plain weights file (rn, lbam)")
    parser.add_argument("--image", help="image file or folder")
    parser.add_argument("--mask", help="mask PNG (255 = hole) or folder of <stem>.png / <stem>.mask.png")
    parser.add_argument("--out", help="output file, or folder")
    parser.add_argument("--fit", choices=("pad", "crop"), help="how to meet the model's size multiple")
    add_config_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 bad input)."""
    setup_job_logging("inpaint")
    args = build_parser().parse_args(argv)
    flags = {k: getattr(args, k) for k in ("model", "arch", "image", "mask", "out", "fit")}
    try:
        config = parse_job_config(InpaintJobConfig, args,
                                  [f"{k}={json.dumps(v)}" for k, v in flags.items() if v is not None])
        tracking_uri = resolve_tracking_uri(config.tracking_uri, os.environ)
        if config.model.startswith(("models:/", "runs:/")):
            check_tracking_server(tracking_uri)
        generator, arch = load_model_ref(config.model, tracking_uri, config.arch)
        generator.to(config.device)
        written = inpaint_paths(generator, arch, config.image, config.out, config.mask, config.fit,
                                config.mask_generator, config.seed)
    except (ConfigError, ValueError) as exc:
        print(f"inpaint: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
