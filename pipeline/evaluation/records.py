"""Evaluations in MLflow: record one as a run (metrics, N, weight hashes, table, pictures) and read it back.

One run in the evaluation experiment holds the eval manifest as its dataset input (context ``evaluation``),
every number of the summary as a metric (linked to the version's logged model when known, so they show on the
model's page), the networks' weight sha256s and the metric-set
id as tags, ``eval/per_bucket.json`` (an MLflow table), ``eval/table.txt`` and ``eval/samples.npz`` (the kept
pictures, so a later promotion can show them without evaluating again). :func:`read_evaluation` rebuilds the
:class:`EvaluationResult` from such a run: that is what the evaluation cache hands back.
"""

from __future__ import annotations

import io
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Mapping

import numpy as np

from pipeline.evaluation.evaluate import EvaluationResult, Sample
from pipeline.data.manifest import manifest_url_for
from pipeline.tracking import ManifestInput, get_or_create_experiment, log_manifest_inputs, redact, version_model_id

__all__ = ["EVAL_TAG_PREFIX", "log_evaluation", "read_evaluation", "samples_from_npz", "samples_to_npz"]

EVAL_TAG_PREFIX = "holefill.eval"
WEIGHTS_TAG = "holefill.weights."
SAMPLES_ARTIFACT = "eval/samples.npz"
TAGGED_METRICS = ("psnr", "ssim", "l1", "fid", "lpips", "p_ids", "u_ids", "count")


def _finite(summary: Mapping[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in summary.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def samples_to_npz(samples: list[Sample]) -> bytes:
    """The kept samples as one compressed ``.npz`` (per-sample arrays, so sizes may differ)."""
    arrays = {"index": np.frombuffer(json.dumps([[s.key, s.bucket] for s in samples]).encode(), dtype=np.uint8)}
    for i, s in enumerate(samples):
        arrays.update({f"{i}_masked": s.masked, f"{i}_output": s.output, f"{i}_truth": s.truth})
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def samples_from_npz(data: bytes) -> list[Sample]:
    """Inverse of :func:`samples_to_npz` (no pickle: plain arrays only)."""
    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
        index = json.loads(arrays["index"].tobytes().decode())
        return [Sample(key, bucket, arrays[f"{i}_masked"], arrays[f"{i}_output"], arrays[f"{i}_truth"])
                for i, (key, bucket) in enumerate(index)]


def log_evaluation(tracking_uri: str, result: EvaluationResult, model_name: str | None = None,
                   model_version: str | None = None, experiment: str = "holefill-evaluation") -> str:
    """Record an evaluation in MLflow; returns the evaluation run's id.

    When the model is a registered version, its tags get ``holefill.eval.<hash12>.<metric>`` for quick
    comparison and ``holefill.eval.<hash12>.<metric_set>.run_id`` (the cache entry).
    """
    # lazy: importing MLflow takes seconds, paid only by the callers that talk to a tracking server
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    model_id = None
    if model_name and model_version:
        model_id = version_model_id(client.get_model_version(model_name, str(model_version)))
    experiment_id = get_or_create_experiment(client, experiment)
    tags = {
        "holefill.model_ref": redact(result.model_ref), "holefill.arch": result.arch,
        "holefill.eval_manifest": redact(result.eval_manifest), "holefill.eval_manifest_hash": result.eval_manifest_hash,
        "holefill.metric_set": result.metric_set, "holefill.eval_seconds": f"{result.seconds:.1f}",
        **{f"{WEIGHTS_TAG}{name}": sha for name, sha in result.weights.items()},
    }
    if model_name and model_version:
        tags.update({"holefill.model_name": model_name, "holefill.model_version": str(model_version)})
    short = result.eval_manifest_hash[:12]
    run = client.create_run(experiment_id, run_name=f"eval-{model_name or result.arch}-{model_version or 'file'}-{short}",
                            tags=tags)
    run_id = run.info.run_id
    if result.eval_manifest and result.eval_manifest_hash:
        log_manifest_inputs(client, run_id, [ManifestInput(manifest_url_for(result.eval_manifest),
                                                           result.eval_manifest_hash, "evaluation")])
    stamp = int(time.time() * 1000)
    metrics = [Metric(k, v, stamp, 0, model_id=model_id) for k, v in _finite(result.summary).items()]
    for start in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[start: start + 1000])
    rows = result.rows()
    client.log_table(run_id, {key: [row.get(key) for row in rows] for key in rows[0]}, "eval/per_bucket.json")
    weights = "".join(f"{name} weights sha256 {sha}\n" for name, sha in result.weights.items())
    client.log_text(run_id, result.table() + "\n" + weights, "eval/table.txt")
    if result.samples:
        with tempfile.TemporaryDirectory(prefix="holefill-eval-") as folder:
            path = Path(folder) / Path(SAMPLES_ARTIFACT).name
            path.write_bytes(samples_to_npz(result.samples))
            client.log_artifact(run_id, str(path), str(Path(SAMPLES_ARTIFACT).parent))
    client.set_terminated(run_id)
    if model_name and model_version:
        for metric in TAGGED_METRICS:
            if metric in result.summary:
                client.set_model_version_tag(model_name, str(model_version), f"{EVAL_TAG_PREFIX}.{short}.{metric}",
                                             f"{result.summary[metric]:.6g}")
        client.set_model_version_tag(model_name, str(model_version), f"{EVAL_TAG_PREFIX}.{short}.run_id", run_id)
        if result.metric_set:
            client.set_model_version_tag(model_name, str(model_version), cache_tag(result.eval_manifest_hash, result.metric_set),
                                         run_id)
    return run_id


def cache_tag(eval_manifest_hash: str, metric_set: str) -> str:
    """The model-version tag holding the run id of an evaluation on this eval set with this metric set."""
    return f"{EVAL_TAG_PREFIX}.{eval_manifest_hash[:12]}.{metric_set}.run_id"


def read_evaluation(tracking_uri: str, run_id: str) -> EvaluationResult:
    """The :class:`EvaluationResult` recorded in run ``run_id`` by :func:`log_evaluation` (``cached=True``)."""
    # lazy: importing MLflow takes seconds, paid only by the callers that talk to a tracking server
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    run = client.get_run(run_id)
    tags = run.data.tags
    samples: list[Sample] = []
    if any(a.path == SAMPLES_ARTIFACT for a in client.list_artifacts(run_id, str(Path(SAMPLES_ARTIFACT).parent))):
        with tempfile.TemporaryDirectory(prefix="holefill-eval-") as folder:
            local = client.download_artifacts(run_id, SAMPLES_ARTIFACT, folder)
            samples = samples_from_npz(Path(local).read_bytes())
    weights = {k[len(WEIGHTS_TAG):]: v for k, v in tags.items() if k.startswith(WEIGHTS_TAG)}
    return EvaluationResult(tags.get("holefill.model_ref", ""), tags.get("holefill.arch", ""),
                            tags.get("holefill.eval_manifest", ""), tags.get("holefill.eval_manifest_hash", ""),
                            dict(run.data.metrics), float(tags.get("holefill.eval_seconds", 0.0)),
                            {"run_id": run_id}, weights, tags.get("holefill.metric_set", ""), samples, cached=True)
