"""Register the authors' released RN or LBAM generator as a model version: fine-tune, evaluate, promote and serve it
like any trained version.

    python jobs/register_official.py --arch rn --weights /downloads/places2_rn.pth
    python jobs/register_official.py --arch lbam --weights s3://bucket/official/LBAM_G_500.pth --promote \\
        --eval-manifest s3://bucket/eval-v1/manifest.json

The file is what the authors' code saves (a plain state dict, a DataParallel ``module.``-prefixed one, or one
wrapped in a dict, e.g. ``{"generator": ...}``), from any fsspec URL (``--set storage_options...`` for its
credentials). It is read ``weights_only`` (a file that needs pickle is refused), converted and checked (strict keys
and shapes; the version read back from the registry computes, bit for bit, what the converted weights compute),
and registered under ``--model`` (default: the architecture's name) with its provenance as version tags
(``holefill.provenance.kind: official release``, ``source``, ``sha256``, ``paper``, ``release``) and the serving
bundle of a trained version (``mlflow models serve -m models:/rn/<N>`` runs it). A file already registered there
(same sha256) is reported, not registered again. ``--promote`` then evaluates it and runs it through the gate, as
``jobs/promote.py`` does. Fine-tune from it with ``--set model.init_weights=models:/rn/<N>`` on a train job.
Exit status: 0 registered (or already there), 2 on bad input (one line).
"""

from __future__ import annotations

import os
import sys

from jobs.promote import run_promotion
from pipeline.jobcli import Flag, run_job
from pipeline.lifecycle.official import RegisterOfficialConfig, register_official
from pipeline.tracking import check_tracking_server, resolve_tracking_uri

FLAGS = {
    "arch": Flag("arch", "architecture of the released generator", options={"choices": ("rn", "lbam")}),
    "weights": Flag("weights", "the authors' generator file (path or fsspec URL)"),
    "model": Flag("registered_model", "registered model name (default: the architecture's)"),
    "promote": Flag("promote", "evaluate the new version and run it through the gate", const=True),
    "eval_manifest": Flag("eval_manifest", "manifest URL of the pinned eval set (with --promote)"),
}


def register(config: RegisterOfficialConfig) -> int:
    """Register the release, print the version, optionally run the gate."""
    tracking_uri = resolve_tracking_uri(config.tracking_uri, os.environ, local_store=False)
    check_tracking_server(tracking_uri)
    if config.promote:
        config.promote_config("1")  # --promote without an eval set: refused before anything is registered
    outcome = register_official(config, tracking_uri)
    state = "already registered as" if outcome.already_registered else "registered as"
    print(f"official {config.arch} release {outcome.provenance['source']} (sha256 {outcome.provenance['sha256'][:12]}) "
          f"{state} models:/{outcome.registered_model}/{outcome.version}")
    if config.promote:
        return run_promotion(config.promote_config(outcome.version))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 bad input)."""
    return run_job("register_official", __doc__, RegisterOfficialConfig, register, argv, FLAGS)


if __name__ == "__main__":
    sys.exit(main())
