"""Evaluate a generator on a pinned eval set: per-bucket PSNR/SSIM/L1, a printable table, MLflow records.

An evaluation reads every sample of the eval manifest exactly once (``pipeline.data.loaders.make_eval_loader``),
inpaints it with the generator (:func:`pipeline.lifecycle.inference.inpaint_tensor`, so the numbers are of
*composited* outputs, as in the papers' tables) and accumulates :class:`pipeline.metrics.BucketedMetrics`.
Results are identified by the eval manifest's hash, so two numbers are only ever compared when they
come from the same pinned set.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

import torch
import torch.nn as nn

from models.inpaint import inpaint_tensor
from pipeline.config import Config
from pipeline.buckets import BUCKET_NAMES

__all__ = [
    "EvaluationSettings",
    "EvaluationResult",
    "evaluate_generator",
    "evaluate_on_manifest",
    "format_table",
    "log_evaluation",
]

log = logging.getLogger(__name__)

METRICS = ("psnr", "ssim", "l1")
EVAL_TAG_PREFIX = "holefill.eval"


class EvaluationSettings(Config):
    """How to run an evaluation (the eval set itself is given by its manifest URL).

    ``crop_size`` centre-crops eval samples (as training's validation does; ``None`` keeps the stored size),
    ``fit`` is how sizes that are not multiples of the model's rule are handled (see ``pipeline.lifecycle.inference``),
    ``experiment`` is where evaluation runs are recorded.
    """

    batch_size: int = 8
    crop_size: int | None = 256
    fit: Literal["pad", "crop"] = "pad"
    device: str = "cpu"
    experiment: str = "holefill-evaluation"
    storage_options: dict[str, Any] = {}


@dataclass
class EvaluationResult:
    """Metrics of one model on one eval set: ``summary`` has ``psnr``, ``ssim``, ``l1``, ``count`` and
    ``<metric>/<bucket>`` keys (see :class:`pipeline.metrics.BucketedMetrics`)."""

    model_ref: str
    arch: str
    eval_manifest: str
    eval_manifest_hash: str
    summary: dict[str, float]
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def table(self) -> str:
        """The per-bucket table as printed by ``jobs/evaluate.py``."""
        return format_table(self.summary)

    def rows(self) -> list[dict[str, Any]]:
        """One dict per bucket plus ``all``: bucket, count, psnr, ssim, l1 (``None`` where empty)."""
        return table_rows(self.summary)


def table_rows(summary: Mapping[str, float]) -> list[dict[str, Any]]:
    """Rows of the per-bucket table of a metrics summary (buckets in order, then ``all``)."""
    rows = []
    for bucket, suffix in [*((b, f"/{b}") for b in BUCKET_NAMES), ("all", "")]:
        row: dict[str, Any] = {"bucket": bucket, "count": int(summary.get(f"count{suffix}", 0))}
        for metric in METRICS:
            row[metric] = summary.get(f"{metric}{suffix}")
        rows.append(row)
    return rows


def format_table(summary: Mapping[str, float]) -> str:
    """A fixed-width text table: hole-ratio bucket | images | PSNR | SSIM | L1."""
    lines = [f"{'hole ratio':<12}{'images':>8}{'PSNR':>9}{'SSIM':>9}{'L1':>9}"]
    for row in table_rows(summary):
        cells = [
            f"{row[m]:>9.{p}f}" if row[m] is not None else f"{'-':>9}"
            for m, p in (("psnr", 2), ("ssim", 4), ("l1", 4))
        ]
        lines.append(f"{row['bucket']:<12}{row['count']:>8}{''.join(cells)}")
    return "\n".join(lines)


@torch.no_grad()
def evaluate_generator(generator: nn.Module, arch: str, eval_manifest: str,
                       settings: EvaluationSettings | None = None) -> dict[str, float]:
    """Run ``generator`` over every sample of ``eval_manifest`` once; returns the metrics summary."""
    from pipeline.data.loaders import make_eval_loader
    from pipeline.metrics import BucketedMetrics

    settings = settings or EvaluationSettings()
    device = torch.device(settings.device)
    generator = generator.to(device).eval()
    metrics = BucketedMetrics()
    loader = make_eval_loader(eval_manifest, batch_size=settings.batch_size, crop_size=settings.crop_size,
                              storage_options=settings.storage_options or None)
    started, seen = time.monotonic(), 0
    for batch in loader:
        image, mask = batch["image"].to(device), batch["mask"].to(device)
        output = inpaint_tensor(generator, arch, image, mask, fit=settings.fit)
        metrics.update(output, image, batch["hole_ratio"])
        seen += image.shape[0]
        elapsed = time.monotonic() - started
        log.info("evaluated %d images (%.1f images/s)", seen, seen / max(elapsed, 1e-9))
    if seen == 0:
        raise ValueError(f"eval set {eval_manifest} yielded no samples")
    return metrics.all_reduce().summary()


def evaluate_on_manifest(generator: nn.Module, arch: str, model_ref: str, eval_manifest: str,
                         settings: EvaluationSettings | None = None) -> EvaluationResult:
    """Evaluate ``generator`` (known to its caller as ``model_ref``) on the pinned set ``eval_manifest``."""
    from pipeline.data.manifest import load_manifest, manifest_hash

    settings = settings or EvaluationSettings()
    manifest = load_manifest(eval_manifest, settings.storage_options or None)
    if manifest.kind != "eval":
        raise ValueError(f"{eval_manifest} is a {manifest.kind!r} manifest; evaluation needs an 'eval' manifest")
    started = time.monotonic()
    summary = evaluate_generator(generator, arch, eval_manifest, settings)
    return EvaluationResult(model_ref, arch, eval_manifest, manifest_hash(manifest), summary,
                            time.monotonic() - started, {"dataset_version": manifest.dataset_version})


def _finite(summary: Mapping[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in summary.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def log_evaluation(tracking_uri: str, result: EvaluationResult, model_name: str | None = None,
                   model_version: str | None = None, experiment: str = "holefill-evaluation") -> str:
    """Record an evaluation in MLflow; returns the evaluation run's id.

    One run in ``experiment`` holds the metrics (linked to the version's logged model when known, so they
    show on the model's page), ``eval/per_bucket.json`` (an MLflow table) and ``eval/table.txt``. When the
    model is a registered version, its tags get ``holefill.eval.<hash12>.<metric>`` for quick comparison.
    """
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from pipeline.tracking import get_or_create_experiment, redact

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    model_id = None
    if model_name and model_version:
        model_id = client.get_model_version(model_name, str(model_version)).model_id
    experiment_id = get_or_create_experiment(client, experiment)
    tags = {
        "holefill.model_ref": redact(result.model_ref), "holefill.arch": result.arch,
        "holefill.eval_manifest": redact(result.eval_manifest), "holefill.eval_manifest_hash": result.eval_manifest_hash,
    }
    if model_name and model_version:
        tags.update({"holefill.model_name": model_name, "holefill.model_version": str(model_version)})
    short = result.eval_manifest_hash[:12]
    run = client.create_run(experiment_id, run_name=f"eval-{model_name or result.arch}-{model_version or 'file'}-{short}",
                            tags=tags)
    stamp = int(time.time() * 1000)
    metrics = [Metric(k, v, stamp, 0, model_id=model_id) for k, v in _finite(result.summary).items()]
    for start in range(0, len(metrics), 1000):
        client.log_batch(run.info.run_id, metrics=metrics[start: start + 1000])
    rows = result.rows()
    client.log_table(run.info.run_id, {key: [row[key] for row in rows] for key in rows[0]}, "eval/per_bucket.json")
    client.log_text(run.info.run_id, result.table() + "\n", "eval/table.txt")
    client.set_terminated(run.info.run_id)
    if model_name and model_version:
        for metric in (*METRICS, "count"):
            if metric in result.summary:
                client.set_model_version_tag(model_name, str(model_version), f"{EVAL_TAG_PREFIX}.{short}.{metric}",
                                             f"{result.summary[metric]:.6g}")
        client.set_model_version_tag(model_name, str(model_version), f"{EVAL_TAG_PREFIX}.{short}.run_id",
                                     run.info.run_id)
    return run.info.run_id
