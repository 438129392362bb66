"""Evaluate a generator on the pinned eval set with Ray workers: per-bucket PSNR / SSIM / L1 / FID / LPIPS and
P-IDS / U-IDS overall, with N and the metric networks' weight hashes, printed and recorded in MLflow.

    python jobs/evaluate.py --model models:/lbam@champion --eval-manifest s3://bucket/eval-v1/manifest.json
    python jobs/evaluate.py --model models:/rn/3 --eval-manifest /data/eval-v1
    python jobs/evaluate.py --model /ckpt/checkpoint_000004 --eval-manifest /data/eval-v1   # a training checkpoint
    python jobs/evaluate.py --model weights.pt --arch rn --eval-manifest /data/eval-v1 --no-log

MLflow references (``models:/name@alias``, ``models:/name/version``, ``runs:/...``) are resolved on the
tracking server (``--set tracking_uri=...``, else ``MLFLOW_TRACKING_URI``, else an existing ./mlflow.db). The metrics
and a per-bucket table are logged to an evaluation run linked to the model version (and tagged on it).
FID, LPIPS and P-IDS/U-IDS are computed when their weights are configured, e.g.
``--set evaluation.perceptual.inception_weights=/w/pt_inception-2015-12-05-6726825d.pth`` (see README,
"Evaluation metrics"); ``--set evaluation.num_workers=4`` spreads the eval set over four Ray workers.
"""

from __future__ import annotations

import os
import sys

from pipeline.evaluation.perceptual import load_metric_weights
from pipeline.evaluation.records import log_evaluation
from pipeline.jobcli import Flag, run_job
from pipeline.lifecycle.evaluations import (
    EvaluateJobConfig,
    RegistryEvaluator,
    evaluate_model,
    parse_registered_ref,
)
from pipeline.tracking import check_tracking_server, resolve_tracking_uri

FLAGS = {
    "model": Flag("model", "models:/name@alias, models:/name/version, runs:/..., checkpoint or weights file"),
    "eval_manifest": Flag("eval_manifest", "manifest URL (or dataset folder) of the pinned eval set"),
    "arch": Flag("arch", "architecture of a plain weights file (rn, lbam)"),
    "no_log": Flag("log_to_mlflow", "print only; record nothing in MLflow", const=False),
    "workers": Flag("evaluation.num_workers", "Ray workers sharing the eval set", options={"type": int}),
    "reuse_cached": Flag("reuse_cached", "reuse a registered version's recorded evaluation (same eval and metric set)",
                         const=True),
}


def evaluate(config: EvaluateJobConfig) -> int:
    """Evaluate, print the per-bucket table, record it in MLflow unless told not to."""
    reads_registry = config.model.startswith(("models:/", "runs:/"))
    tracking_uri = resolve_tracking_uri(config.tracking_uri, os.environ, local_store=not reads_registry)
    if config.log_to_mlflow or reads_registry:
        check_tracking_server(tracking_uri)
    weights = load_metric_weights(config.evaluation.perceptual)  # a missing weights file stops here, before any work
    registered = None
    if config.model.startswith("models:/"):
        # lazy: importing MLflow takes seconds, paid only by the callers that talk to a tracking server
        from mlflow import MlflowClient

        registered = parse_registered_ref(config.model, MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri))
    result = None
    if registered and config.reuse_cached:
        result = RegistryEvaluator(tracking_uri, config.eval_manifest, config.evaluation, weights=weights).cached(*registered)
    if result is None:
        result = evaluate_model(config.model, config.eval_manifest, config.evaluation, tracking_uri, config.arch, weights,
                                config.generator_kwargs)
    workers = f", {result.extra['workers']} Ray workers" if "workers" in result.extra else ", cached"
    print(f"model {config.model} ({result.arch}) on eval set {result.eval_manifest_hash[:12]} "
          f"({int(result.summary['count'])} images, {result.seconds:.1f} s{workers}; metric set {result.metric_set})")
    print(result.table())
    for name, sha in result.weights.items():
        print(f"{name} weights sha256 {sha}")
    if config.log_to_mlflow and not result.cached:
        run_id = log_evaluation(tracking_uri, result, *(registered or (None, None)), config.evaluation.experiment)
        print(f"recorded in MLflow run {run_id}" + (f" for {registered[0]} version {registered[1]}" if registered else ""))
    elif result.cached:
        print(f"recorded in MLflow run {result.extra['run_id']} (cached)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 bad input)."""
    return run_job("evaluate", __doc__, EvaluateJobConfig, evaluate, argv, FLAGS)


if __name__ == "__main__":
    sys.exit(main())
