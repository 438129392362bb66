"""Evaluate a generator on the pinned eval set: per-bucket PSNR / SSIM / L1, printed and recorded in MLflow.

    python jobs/evaluate.py --model models:/lbam@champion --eval-manifest s3://bucket/eval-v1/manifest.json
    python jobs/evaluate.py --model models:/rn/3 --eval-manifest /data/eval-v1
    python jobs/evaluate.py --model /ckpt/checkpoint_000004 --eval-manifest /data/eval-v1   # a training checkpoint
    python jobs/evaluate.py --model weights.pt --arch rn --eval-manifest /data/eval-v1 --no-log

MLflow references (``models:/name@alias``, ``models:/name/version``, ``runs:/...``) are resolved on the
tracking server (``--set tracking_uri=...``, else ``MLFLOW_TRACKING_URI``, else ./mlflow.db). The metrics
and a per-bucket table are logged to an evaluation run linked to the model version (and tagged on it).
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
from pipeline.evaluation import EvaluateJobConfig, evaluate_model, log_evaluation, parse_registered_ref  # noqa: E402
from pipeline.tracking import check_tracking_server, resolve_tracking_uri  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evaluate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="models:/name@alias, models:/name/version, runs:/..., checkpoint or weights file")
    parser.add_argument("--eval-manifest", help="manifest URL (or dataset folder) of the pinned eval set")
    parser.add_argument("--arch", help="architecture of a plain weights file (rn, lbam)")
    parser.add_argument("--no-log", action="store_true", help="print only; record nothing in MLflow")
    add_config_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 bad input)."""
    setup_job_logging("evaluate")
    args = build_parser().parse_args(argv)
    flags = {"model": args.model, "eval_manifest": args.eval_manifest, "arch": args.arch}
    overrides = [f"{key}={json.dumps(value)}" for key, value in flags.items() if value is not None]
    if args.no_log:
        overrides.append("log_to_mlflow=false")
    try:
        config = parse_job_config(EvaluateJobConfig, args, overrides)
        tracking_uri = resolve_tracking_uri(config.tracking_uri, os.environ)
        if config.log_to_mlflow or config.model.startswith(("models:/", "runs:/")):
            check_tracking_server(tracking_uri)
        result = evaluate_model(config.model, config.eval_manifest, config.evaluation, tracking_uri, config.arch)
    except (ConfigError, ValueError) as exc:
        print(f"evaluate: {exc}", file=sys.stderr)
        return 2
    print(f"model {config.model} ({result.arch}) on eval set {result.eval_manifest_hash[:12]} "
          f"({int(result.summary['count'])} images, {result.seconds:.1f} s)")
    print(result.table())
    if config.log_to_mlflow:
        from mlflow import MlflowClient

        registered = parse_registered_ref(config.model, MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri))
        run_id = log_evaluation(tracking_uri, result, *(registered or (None, None)), config.evaluation.experiment)
        print(f"recorded in MLflow run {run_id}" + (f" for {registered[0]} version {registered[1]}" if registered else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
