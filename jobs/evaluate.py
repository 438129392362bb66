"""Evaluate a generator on the pinned eval set: per-bucket PSNR / SSIM / L1, printed and recorded in MLflow.

    python jobs/evaluate.py --model models:/lbam@champion --eval-manifest s3://bucket/eval-v1/manifest.json
    python jobs/evaluate.py --model models:/rn/3 --eval-manifest /data/eval-v1
    python jobs/evaluate.py --model /ckpt/checkpoint_000004 --eval-manifest /data/eval-v1   # a training checkpoint
    python jobs/evaluate.py --model weights.pt --arch rn --eval-manifest /data/eval-v1 --no-log

MLflow references (``models:/name@alias``, ``models:/name/version``, ``runs:/...``) are resolved on the
tracking server (``--set tracking_uri=...``, else ``MLFLOW_TRACKING_URI``, else an existing ./mlflow.db). The metrics
and a per-bucket table are logged to an evaluation run linked to the model version (and tagged on it).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.evaluation.evaluate import log_evaluation  # noqa: E402
from pipeline.jobcli import Flag, run_job  # noqa: E402
from pipeline.lifecycle.evaluations import EvaluateJobConfig, evaluate_model, parse_registered_ref  # noqa: E402
from pipeline.tracking import check_tracking_server, resolve_tracking_uri  # noqa: E402

FLAGS = {
    "model": Flag("model", "models:/name@alias, models:/name/version, runs:/..., checkpoint or weights file"),
    "eval_manifest": Flag("eval_manifest", "manifest URL (or dataset folder) of the pinned eval set"),
    "arch": Flag("arch", "architecture of a plain weights file (rn, lbam)"),
    "no_log": Flag("log_to_mlflow", "print only; record nothing in MLflow", const=False),
}


def evaluate(config: EvaluateJobConfig) -> int:
    """Evaluate, print the per-bucket table, record it in MLflow unless told not to."""
    reads_registry = config.model.startswith(("models:/", "runs:/"))
    tracking_uri = resolve_tracking_uri(config.tracking_uri, os.environ, local_store=not reads_registry)
    if config.log_to_mlflow or reads_registry:
        check_tracking_server(tracking_uri)
    result = evaluate_model(config.model, config.eval_manifest, config.evaluation, tracking_uri, config.arch)
    print(f"model {config.model} ({result.arch}) on eval set {result.eval_manifest_hash[:12]} "
          f"({int(result.summary['count'])} images, {result.seconds:.1f} s)")
    print(result.table())
    if config.log_to_mlflow:
        from mlflow import MlflowClient

        registered = parse_registered_ref(config.model, MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri))
        run_id = log_evaluation(tracking_uri, result, *(registered or (None, None)), config.evaluation.experiment)
        print(f"recorded in MLflow run {run_id}" + (f" for {registered[0]} version {registered[1]}" if registered else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 bad input)."""
    return run_job("evaluate", __doc__, EvaluateJobConfig, evaluate, argv, FLAGS)


if __name__ == "__main__":
    sys.exit(main())
