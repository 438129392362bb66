"""Evaluation as a Ray job: the pinned eval set's shards spread over workers (GPUs where present).

:func:`evaluate_on_manifest` is the one entry point (``jobs/evaluate.py``, promotion and retraining use it
through :mod:`pipeline.lifecycle.evaluations`). In the driver it checks the eval manifest, reads, hashes and
checks the metric networks' weights (a missing file fails here, before any work), puts the generator's
record (:class:`models.record.GeneratorRecord`: arch, keywords, weights) and the metric weights in the object
store once, then runs one Ray task per worker: each builds the generator (``record.build()``) and the networks, evaluates its rank's slice of the shards (:func:`evaluate_slice`) and returns
sums, per-image features and LPIPS values and a few pictures. The driver merges them into per-bucket results
(FID needs the features of the whole set, so it is computed once, from the merged features).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time

import torch

from models.record import GeneratorRecord
from pipeline.buckets import Bucket
from pipeline.data.manifest import load_manifest, manifest_hash
from pipeline.evaluation.evaluate import (
    METRICS,
    EvaluationResult,
    EvaluationSettings,
    SlicePart,
    eval_set_buckets,
    evaluate_slice,
    merge_slices,
)
from pipeline.evaluation.feature_cache import covers, load_truth_features, save_truth_features, truth_cache_url
from pipeline.evaluation.perceptual import RANDOM, MetricWeights, load_metric_weights
from pipeline.joblog import LOG_FORMAT
from pipeline.raycluster import ensure_ray

__all__ = ["evaluate_on_manifest", "metric_set_id", "numerics_class"]

log = logging.getLogger(__name__)


def numerics_class(settings: EvaluationSettings) -> str:
    """What kind of arithmetic the workers do: ``cpu``, or ``cuda`` with its TF32 switches (matmul, cuDNN), which
    change the metric networks' features (and so FID) by more than float rounding."""
    if not settings.use_gpu and not settings.device.startswith("cuda"):
        return "cpu"
    return f"cuda-tf32-matmul{int(torch.backends.cuda.matmul.allow_tf32)}-cudnn{int(torch.backends.cudnn.allow_tf32)}"


def metric_set_id(settings: EvaluationSettings, weights: MetricWeights) -> str:
    """12 hex digits naming what the numbers depend on besides model and eval set (whose manifest hash covers its
    buckets): metrics, their weights' sha256, crop, fit and the workers' numerics (with the model version and eval
    manifest hash: the evaluation cache key). Batch size and worker count are not in it: an image's output and
    metrics do not depend on what it is batched with (``models/rn.py``: per-sample statistics at inference)."""
    identity = {"metrics": [*METRICS, *weights.metrics], "weights": dict(sorted(weights.hashes.items())),
                "lpips_net": weights.lpips_net if "lpips" in weights.metrics else None,
                "crop_size": settings.crop_size, "fit": settings.fit, "numerics": numerics_class(settings)}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


def _evaluate_worker(record: GeneratorRecord, eval_manifest: str, settings: EvaluationSettings, weights: MetricWeights,
                     rank: int, world_size: int, truth_features: dict | None,
                     buckets: tuple[Bucket, ...]) -> SlicePart:
    """One Ray task: build the generator from its record and evaluate rank ``rank``'s slice."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    return evaluate_slice(record.build(), record.arch, eval_manifest, settings, weights, rank, world_size, truth_features,
                          buckets=buckets)


def _truth_cache(settings: EvaluationSettings, weights: MetricWeights, manifest_hash: str) -> str | None:
    folder = settings.perceptual.truth_feature_cache
    if folder is None or weights.hashes.get("inception", RANDOM) == RANDOM:
        return None  # random networks differ per build: nothing to keep
    return truth_cache_url(folder, manifest_hash, weights.hashes["inception"], settings.crop_size,
                           numerics_class(settings))


def evaluate_on_manifest(record: GeneratorRecord, model_ref: str, eval_manifest: str,
                         settings: EvaluationSettings | None = None,
                         weights: MetricWeights | None = None) -> EvaluationResult:
    """Evaluate the generator of ``record`` (known to its caller as ``model_ref``) on the pinned set ``eval_manifest``
    with ``settings.num_workers`` Ray workers. ``weights``: metric weights already loaded by the caller
    (:func:`load_metric_weights`), else they are loaded here first."""
    settings = settings or EvaluationSettings()
    manifest = load_manifest(eval_manifest, settings.storage_options or None)
    if manifest.kind != "eval":
        raise ValueError(f"{eval_manifest} is a {manifest.kind!r} manifest; evaluation needs an 'eval' manifest")
    weights = weights if weights is not None else load_metric_weights(settings.perceptual)
    # A worker without a shard would only cost a process: never start more workers than shards.
    world_size = max(1, min(settings.num_workers, len(manifest.shards)))
    ray = ensure_ray()
    task = ray.remote(_evaluate_worker).options(num_cpus=settings.cpus_per_worker,
                                                num_gpus=1 if settings.use_gpu else 0, max_retries=1)
    started = time.monotonic()
    cache_url = _truth_cache(settings, weights, manifest_hash(manifest))
    truth = load_truth_features(cache_url, settings.perceptual.storage_options or None) if cache_url else None
    record_ref, weights_ref, truth_ref = ray.put(record), ray.put(weights), ray.put(truth)
    log.info("evaluating %s on %s (%d samples) with %d Ray workers; metrics %s", model_ref, manifest_hash(manifest)[:12],
             manifest.total_samples, world_size, ", ".join([*METRICS, *weights.metrics]))
    buckets = eval_set_buckets(manifest)  # the eval set's own: what it was balanced over
    parts = ray.get([task.remote(record_ref, eval_manifest, settings, weights_ref, rank, world_size, truth_ref, buckets)
                     for rank in range(world_size)])
    summary, samples, records = merge_slices(parts, weights.metrics, settings.samples_per_bucket)
    if cache_url and not covers(truth, records.keys) and records.real:
        save_truth_features(cache_url, records.keys, records.real[0], settings.perceptual.storage_options or None)
    seconds = time.monotonic() - started
    log.info("evaluated %d images in %.1f s (%.2f images/s)", int(summary["count"]), seconds,
             summary["count"] / max(seconds, 1e-9))
    return EvaluationResult(model_ref, record.arch, eval_manifest, manifest_hash(manifest), summary, seconds,
                            {"dataset_version": manifest.dataset_version, "workers": world_size},
                            weights=dict(weights.hashes), metric_set=metric_set_id(settings, weights), samples=samples)
