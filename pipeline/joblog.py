"""Job start-up logging: one format for every job, and the facts a job log should open with."""

from __future__ import annotations

import logging
from importlib import metadata

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_job_logging(job: str) -> logging.Logger:
    """Configure INFO logging to stderr (stdout stays for results such as paths and hashes; Ray job logs capture
    both) and log which image library is active.

    pillow-simd silently loses to Pillow whenever a later install of a Pillow dependant puts Pillow back, so
    every job states which one it runs with.
    """

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    log = logging.getLogger(f"holefill.{job}")
    log.info("image library: %s", pillow_flavour())
    return log


def pillow_flavour() -> str:
    """Which Pillow build is active, e.g. ``"pillow-simd 9.5.0.post2 (libjpeg-turbo 3.0.4)"``.

    pillow-simd and Pillow install the same ``PIL`` package; a later ``pip install`` of anything that
    depends on Pillow silently swaps pillow-simd out, so jobs log this line at start.
    """
    import PIL
    from PIL import features

    name = "Pillow"
    for dist in ("pillow-simd", "Pillow-SIMD"):
        try:
            metadata.version(dist)
            name = "pillow-simd"
            break
        except metadata.PackageNotFoundError:
            continue
    jpeg = "libjpeg-turbo" if features.check_feature("libjpeg_turbo") else "libjpeg"
    jpeg_version = features.version_feature("libjpeg_turbo") or features.version_codec("jpg") or "?"
    return f"{name} {PIL.__version__} ({jpeg} {jpeg_version})"
