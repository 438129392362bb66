"""Evaluate a generator on its slice of a pinned eval set; merge slices into per-bucket results and a table.

:func:`evaluate_slice` is holefill's one evaluation loop: an evaluation worker and every training rank's
validation run it. It reads its rank's share of the eval manifest exactly once
(``pipeline.data.loaders.make_eval_loader``), inpaints every sample with the generator in eval mode
(:func:`models.inpaint.inpaint_tensor`, so the numbers are of *composited* outputs, as in the papers' tables,
and each image's output is what it gets alone: see ``models/rn.py``), and accumulates PSNR/SSIM/L1
(:class:`pipeline.evaluation.metrics.BucketedMetrics`), the perceptual records (:mod:`pipeline.evaluation.perceptual`) and
a few sample pictures per bucket, filed under the eval set's own buckets (those its manifest records).
:func:`merge_slices` turns the workers' parts into one summary. Spreading the slices over Ray workers is
:mod:`pipeline.evaluation.ray_eval`; training all-reduces them (``pipeline.train.loop.validate``). Results are
identified by the eval manifest's hash, so two numbers are only ever compared when they come from the same
pinned set.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Literal, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
from pydantic import Field

from models.inception import to_uint8
from models.inpaint import inpaint_tensor
from pipeline.buckets import HOLE_RATIO_BUCKETS, Bucket, bucket_names, bucket_of, check_buckets, hole_ratios
from pipeline.config import Config
from pipeline.data.loaders import make_eval_loader
from pipeline.data.manifest import load_manifest
from pipeline.evaluation.metrics import BucketedMetrics
from pipeline.evaluation.perceptual import (
    MetricWeights,
    PerceptualAccumulator,
    PerceptualPart,
    PerceptualSettings,
    perceptual_summary,
)
from pipeline.pictures import show_hole

__all__ = [
    "EvaluationSettings",
    "EvaluationResult",
    "Sample",
    "SlicePart",
    "eval_set_buckets",
    "evaluate_slice",
    "format_table",
    "merge_slices",
    "metric_columns",
]

log = logging.getLogger(__name__)

METRICS = ("psnr", "ssim", "l1")
PER_BUCKET_METRICS = ("psnr", "ssim", "l1", "fid", "lpips")
OVERALL_ONLY_METRICS = ("p_ids", "u_ids")


class EvaluationSettings(Config):
    """How to run an evaluation (the eval set itself is given by its manifest URL).

    ``crop_size`` centre-crops eval samples (as training's validation does; ``None`` keeps the stored size),
    ``fit`` is how sizes that are not multiples of the model's rule are handled (see ``models.inpaint``),
    ``num_workers`` Ray workers share the eval set (``cpus_per_worker`` each, one GPU each with ``use_gpu``),
    ``samples_per_bucket`` pictures are kept per hole bucket for the promotion record, ``perceptual`` chooses
    FID / LPIPS / P-IDS-U-IDS and their weights, ``experiment`` is where evaluation runs are recorded.
    """

    batch_size: int = Field(default=8, ge=1)
    crop_size: int | None = 256
    fit: Literal["pad", "crop"] = "pad"
    device: str = "cpu"
    num_workers: int = Field(default=2, ge=1)
    cpus_per_worker: float = Field(default=1.0, gt=0)
    use_gpu: bool = False
    samples_per_bucket: int = Field(default=2, ge=0)
    perceptual: PerceptualSettings = Field(default_factory=PerceptualSettings)
    experiment: str = "holefill-evaluation"
    storage_options: dict[str, Any] = {}


@dataclass
class Sample:
    """One eval sample kept for pictures: uint8 (3,H,W) input with its hole shown, output, truth."""

    key: str
    bucket: str
    masked: np.ndarray
    output: np.ndarray
    truth: np.ndarray


@dataclass
class SlicePart:
    """What one worker returns: PSNR/SSIM/L1 sums per bucket row, perceptual records, kept samples, the buckets."""

    table: torch.Tensor
    perceptual: PerceptualPart
    samples: list[Sample]
    images: int
    seconds: float
    buckets: tuple[Bucket, ...] = HOLE_RATIO_BUCKETS


@dataclass
class EvaluationResult:
    """Metrics of one model on one eval set.

    ``summary`` has ``psnr``, ``ssim``, ``l1``, ``count`` and ``<metric>/<bucket>`` keys (see
    :class:`pipeline.evaluation.metrics.BucketedMetrics`), plus ``fid``, ``lpips`` (overall and per bucket) and ``p_ids``,
    ``u_ids`` when computed. ``count`` / ``count/<bucket>`` is N for every number. ``weights`` maps each metric
    network to the sha256 of its weights file (``random`` for random weights); ``metric_set`` identifies the
    metrics, their weights and the settings that change the numbers (the evaluation cache key with the model
    version and the eval manifest hash).
    """

    model_ref: str
    arch: str
    eval_manifest: str
    eval_manifest_hash: str
    summary: dict[str, float]
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, str] = field(default_factory=dict)
    metric_set: str = ""
    samples: list[Sample] = field(default_factory=list)
    cached: bool = False

    def table(self) -> str:
        """The per-bucket table as printed by ``jobs/evaluate.py``."""
        return format_table(self.summary)

    def rows(self) -> list[dict[str, Any]]:
        """One dict per bucket plus ``all``: bucket, count and every metric measured (``None`` where empty)."""
        return table_rows(self.summary)


def metric_columns(summary: Mapping[str, float]) -> list[str]:
    """The per-bucket metrics present in ``summary``, in table order."""
    return [m for m in PER_BUCKET_METRICS if m in summary or any(k.startswith(f"{m}/") for k in summary)]


def summary_buckets(summary: Mapping[str, float]) -> list[str]:
    """The bucket names a summary holds counts for, in order (an eval set's own buckets, whatever they are)."""
    return sorted(key.split("/", 1)[1] for key in summary if key.startswith("count/"))


def table_rows(summary: Mapping[str, float]) -> list[dict[str, Any]]:
    """Rows of the per-bucket table of a metrics summary (buckets in order, then ``all``)."""
    rows = []
    for bucket, suffix in [*((b, f"/{b}") for b in summary_buckets(summary)), ("all", "")]:
        row: dict[str, Any] = {"bucket": bucket, "count": int(summary.get(f"count{suffix}", 0))}
        for metric in metric_columns(summary):
            row[metric] = summary.get(f"{metric}{suffix}")
        rows.append(row)
    return rows


_FORMATS = {"psnr": ("PSNR", 2), "ssim": ("SSIM", 4), "l1": ("L1", 4), "fid": ("FID", 2), "lpips": ("LPIPS", 4)}


def format_table(summary: Mapping[str, float]) -> str:
    """A fixed-width text table: hole-ratio bucket | images (N) | PSNR | SSIM | L1 [| FID | LPIPS], then P-IDS/U-IDS."""
    columns = metric_columns(summary)
    lines = [f"{'hole ratio':<12}{'images':>8}" + "".join(f"{_FORMATS[m][0]:>9}" for m in columns)]
    for row in table_rows(summary):
        cells = [f"{row[m]:>9.{_FORMATS[m][1]}f}" if row[m] is not None else f"{'-':>9}" for m in columns]
        lines.append(f"{row['bucket']:<12}{row['count']:>8}{''.join(cells)}")
    if "p_ids" in summary:
        lines.append(f"P-IDS {summary['p_ids']:.4f}  U-IDS {summary['u_ids']:.4f}  (overall, N={int(summary['count'])})")
    return "\n".join(lines)


def _keep_samples(kept: dict[str, list[Sample]], limit: int, image: torch.Tensor, mask: torch.Tensor,
                  output: torch.Tensor, keys: Sequence[str], ratios: torch.Tensor, buckets: Sequence[Bucket]) -> None:
    """Keep the ``limit`` smallest keys per bucket (a rule that does not depend on how the set was split)."""
    if limit == 0:
        return

    masked = show_hole(image, mask)
    for index, key in enumerate(keys):
        bucket = bucket_of(float(ratios[index]), buckets)
        if bucket is None:
            continue
        chosen = kept.setdefault(bucket, [])
        if len(chosen) >= limit and key >= chosen[-1].key:
            continue
        chosen.append(Sample(key, bucket, to_uint8(masked[index]).cpu().numpy(), to_uint8(output[index]).cpu().numpy(),
                             to_uint8(image[index]).cpu().numpy()))
        chosen.sort(key=lambda s: s.key)
        del chosen[limit:]


def eval_set_buckets(manifest: Any) -> tuple[Bucket, ...]:
    """The hole-ratio buckets an eval manifest was balanced over (its recorded ``eval.buckets``; the papers' by default)."""
    recorded = ((manifest.config or {}).get("eval") or {}).get("buckets")
    return check_buckets(recorded) if recorded else HOLE_RATIO_BUCKETS


def _buckets_of(eval_manifest: str, storage_options: Mapping[str, Any] | None) -> tuple[Bucket, ...]:
    if not str(eval_manifest).endswith(".json"):  # a shard list: no manifest to read its buckets from
        return HOLE_RATIO_BUCKETS
    return eval_set_buckets(load_manifest(eval_manifest, storage_options))


@torch.no_grad()
def evaluate_slice(generator: nn.Module, arch: str, eval_manifest: str, settings: EvaluationSettings,
                   weights: MetricWeights, rank: int = 0, world_size: int = 1,
                   truth_features: Mapping[str, np.ndarray] | None = None, *,
                   buckets: Sequence[Bucket] | None = None, loader_workers: int = 0,
                   forward_context: Callable[[], ContextManager] | None = None,
                   storage_options: Any = None) -> SlicePart:
    """Evaluate ``generator`` on rank ``rank``'s share of ``eval_manifest`` (every sample read once over all ranks).

    ``truth_features``: known Inception features of the truths by sample key (skips them in the network).
    ``buckets``: default, the eval manifest's own. ``loader_workers``: the eval loader's worker processes.
    ``forward_context``: entered around each generator call (training's autocast). ``storage_options``: for the
    shards (default: ``settings.storage_options``). The generator runs in eval mode and is handed back in the mode
    it came in."""
    storage_options = storage_options if storage_options is not None else (settings.storage_options or None)
    buckets = check_buckets(buckets) if buckets is not None else _buckets_of(eval_manifest, storage_options)
    device = torch.device("cuda" if settings.use_gpu else settings.device)
    was_training = generator.training
    generator = generator.to(device).eval()
    inception, lpips = weights.build(device)
    metrics = BucketedMetrics(buckets)
    perceptual = PerceptualAccumulator(inception, lpips, truth_features, buckets)
    kept: dict[str, list[Sample]] = {}
    loader = make_eval_loader(eval_manifest, batch_size=settings.batch_size, crop_size=settings.crop_size,
                              rank=rank, world_size=world_size, num_workers=loader_workers,
                              storage_options=storage_options)
    started, seen = time.monotonic(), 0
    try:
        for batch in loader:
            image, mask = batch["image"].to(device), batch["mask"].to(device)
            ratios = hole_ratios(mask)  # float64 count / pixels: for the stored mask, its json's value exactly
            with forward_context() if forward_context is not None else contextlib.nullcontext():
                output = inpaint_tensor(generator, arch, image, mask, fit=settings.fit)
            metrics.update(output, image, ratios)
            perceptual.update(output, image, ratios, batch["key"])
            _keep_samples(kept, settings.samples_per_bucket, image, mask, output, batch["key"], ratios, buckets)
            seen += image.shape[0]
            log.info("rank %d/%d: evaluated %d images (%.2f images/s)", rank, world_size, seen,
                     seen / max(time.monotonic() - started, 1e-9))
    finally:
        generator.train(was_training)
    samples = [s for bucket in bucket_names(buckets) for s in kept.get(bucket, [])]
    return SlicePart(metrics.sums(), perceptual.part, samples, seen, time.monotonic() - started, tuple(buckets))


def merge_slices(parts: Sequence[SlicePart], metrics: Sequence[str],
                 samples_per_bucket: int) -> tuple[dict[str, float], list[Sample], PerceptualPart]:
    """One summary, the kept samples (smallest keys per bucket) and the merged per-image records of every part."""
    if sum(p.images for p in parts) == 0:
        raise ValueError("the eval set yielded no samples")
    buckets = parts[0].buckets
    summary = BucketedMetrics.from_sums([p.table for p in parts], buckets).summary()
    records = PerceptualPart.merge([p.perceptual for p in parts])
    summary.update(perceptual_summary(records, metrics, buckets))
    samples = []
    for bucket in bucket_names(buckets):
        in_bucket = sorted((s for p in parts for s in p.samples if s.bucket == bucket), key=lambda s: s.key)
        samples += in_bucket[:samples_per_bucket]
    return summary, samples, records
