"""Job start-up logging: one format for every job, and the facts a job log should open with."""

from __future__ import annotations

import logging

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_job_logging(job: str) -> logging.Logger:
    """Configure INFO logging to stderr (stdout stays for results such as paths and hashes; Ray job logs capture
    both) and log which image library is active.

    pillow-simd silently loses to Pillow whenever a later install of a Pillow dependant puts Pillow back, so
    every job states which one it runs with.
    """
    from pipeline.imageops import pillow_flavour

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    log = logging.getLogger(f"holefill.{job}")
    log.info("image library: %s", pillow_flavour())
    return log
