"""FID, LPIPS and P-IDS/U-IDS on an eval set: which to compute, their networks' weights, per-bucket accumulation.

* :class:`PerceptualSettings` says which metrics to compute and where the networks' weights are (path or
  fsspec URL); a metric asked for without its weights is a one-line config error naming the key, before any
  work. Random weights only with ``allow_random_weights`` (tests: the numbers mean nothing).
* :func:`load_metric_weights` reads and hashes the files once, in the driver, and checks them strictly
  (:class:`MetricWeights` is what travels to the Ray workers; they need no access to the files).
* :class:`PerceptualAccumulator` collects, per image, the Inception pool3 features of the composited output and
  of the truth, and the LPIPS distance; :func:`perceptual_summary` turns the merged collection into ``fid``,
  ``lpips`` overall and per bucket (``fid/0.01-0.10`` …) and ``p_ids`` / ``u_ids`` overall.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Mapping, Sequence

import numpy as np
import torch
from pydantic import Field, ValidationInfo, field_validator

from models.inception import FIDInceptionV3, to_uint8
from models.lpips import LPIPS
from models.statedict import read_weights_file
from pipeline.buckets import HOLE_RATIO_BUCKETS, Bucket, bucket_names, bucket_of
from pipeline.config import Config
from pipeline.evaluation.fid import fid_from_features
from pipeline.evaluation.pids import inception_discriminative_scores
from pipeline.paths import LocalPath

__all__ = [
    "PERCEPTUAL_METRICS",
    "MetricWeights",
    "PerceptualAccumulator",
    "PerceptualPart",
    "PerceptualSettings",
    "load_metric_weights",
    "perceptual_summary",
]

log = logging.getLogger(__name__)

PerceptualMetric = Literal["fid", "lpips", "pids"]
PERCEPTUAL_METRICS: tuple[str, ...] = ("fid", "lpips", "pids")
RANDOM = "random"  # the "hash" recorded for random weights


class PerceptualSettings(Config):
    """Which perceptual metrics to compute and the weights of their networks.

    ``metrics``: ``None`` (default) computes every metric whose weights are configured: FID and P-IDS/U-IDS with
    ``inception_weights`` (``pt_inception-2015-12-05-6726825d.pth``), LPIPS with ``lpips_weights`` (the v0.1 head
    file ``vgg.pth``/``alex.pth``) and ``lpips_backbone_weights`` (torchvision's ``vgg16-397923af.pth`` /
    ``alexnet-owt-7be5be79.pth``) for ``lpips_net``. A metric listed explicitly without its weights is an error,
    unless ``allow_random_weights`` (tests only). ``lpips_net`` defaults to AlexNet (MAT's choice, lpips' own
    default): on CPU LPIPS-VGG costs more than the generator it judges (``bench/metrics.py``); ``vgg`` gives LaMa's.
    ``truth_feature_cache``: a folder where the truths' Inception features are kept per eval set
    (:mod:`pipeline.evaluation.feature_cache`), halving the Inception work of every later evaluation.
    """

    metrics: list[PerceptualMetric] | None = None
    allow_random_weights: bool = False
    lpips_net: Literal["vgg", "alex"] = "alex"
    inception_weights: Annotated[str | None, LocalPath()] = Field(None, validate_default=True)
    lpips_weights: Annotated[str | None, LocalPath()] = Field(None, validate_default=True)
    lpips_backbone_weights: Annotated[str | None, LocalPath()] = Field(None, validate_default=True)
    truth_feature_cache: Annotated[str | None, LocalPath(output=True)] = None
    storage_options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("inception_weights", "lpips_weights", "lpips_backbone_weights")
    @classmethod
    def _weights_for_requested_metrics(cls, value: str | None, info: ValidationInfo) -> str | None:
        requested = info.data.get("metrics") or []
        needs = {"inception_weights": ("fid", "pids"), "lpips_weights": ("lpips",),
                 "lpips_backbone_weights": ("lpips",)}[info.field_name]
        wanted = [m for m in needs if m in requested]
        if value is None and wanted and not info.data.get("allow_random_weights"):
            raise ValueError(f"{'/'.join(wanted)} needs this weights file ({_FILES[info.field_name]}); "
                             "set it (path or fsspec URL) or drop the metric")
        return value

    def active(self) -> tuple[str, ...]:
        """The metrics this evaluation computes, in canonical order."""
        if self.metrics is not None:
            return tuple(m for m in PERCEPTUAL_METRICS if m in self.metrics)
        chosen = []
        if self.inception_weights:
            chosen += ["fid", "pids"]
        if self.lpips_weights and self.lpips_backbone_weights:
            chosen.append("lpips")
        return tuple(m for m in PERCEPTUAL_METRICS if m in chosen)


_FILES = {
    "inception_weights": "pt_inception-2015-12-05-6726825d.pth",
    "lpips_weights": "LPIPS v0.1 vgg.pth or alex.pth",
    "lpips_backbone_weights": "torchvision vgg16-397923af.pth or alexnet-owt-7be5be79.pth",
}


@dataclass
class MetricWeights:
    """Checked state dicts of the metric networks and the sha256 of the files they came from (picklable)."""

    metrics: tuple[str, ...]
    lpips_net: str = "vgg"
    inception: dict[str, torch.Tensor] | None = None
    lpips: dict[str, torch.Tensor] | None = None
    hashes: dict[str, str] = field(default_factory=dict)

    def build(self, device: torch.device | str = "cpu") -> tuple[FIDInceptionV3 | None, LPIPS | None]:
        """The networks this evaluation needs, on ``device`` (random ones where no state dict was given)."""
        inception = lpips = None
        if "fid" in self.metrics or "pids" in self.metrics:
            inception = FIDInceptionV3.random() if self.inception is None else FIDInceptionV3.from_state_dict(self.inception)
            inception = inception.to(device)
        if "lpips" in self.metrics:
            lpips = LPIPS.random(self.lpips_net) if self.lpips is None else LPIPS(self.lpips_net)
            if self.lpips is not None:
                lpips.load_state_dict(self.lpips, strict=True)
            lpips = lpips.to(device)
        return inception, lpips


def _read(settings: PerceptualSettings, key: str):
    try:
        return read_weights_file(getattr(settings, key), settings.storage_options or None)
    except ValueError as exc:
        raise ValueError(f"evaluation.perceptual.{key}: {exc}") from None


def load_metric_weights(settings: PerceptualSettings) -> MetricWeights:
    """Read, hash and strictly check the weights the active metrics need (one-line error naming the key)."""
    metrics = settings.active()
    weights = MetricWeights(metrics, settings.lpips_net)
    if "fid" in metrics or "pids" in metrics:
        if settings.inception_weights:
            read = _read(settings, "inception_weights")
            try:
                FIDInceptionV3.from_state_dict(read.state_dict, read.source)
            except ValueError as exc:
                raise ValueError(f"evaluation.perceptual.inception_weights: {exc}") from None
            weights.inception, weights.hashes["inception"] = read.state_dict, read.sha256
        else:
            weights.hashes["inception"] = RANDOM
    if "lpips" in metrics:
        if settings.lpips_weights and settings.lpips_backbone_weights:
            heads, backbone = _read(settings, "lpips_weights"), _read(settings, "lpips_backbone_weights")
            try:
                model = LPIPS.from_files_state(settings.lpips_net, heads.state_dict, backbone.state_dict,
                                               heads.source, backbone.source)
            except ValueError as exc:
                raise ValueError(f"evaluation.perceptual.lpips_weights: {exc}") from None
            weights.lpips = model.state_dict()
            weights.hashes.update({f"lpips_{settings.lpips_net}": heads.sha256,
                                   f"lpips_{settings.lpips_net}_backbone": backbone.sha256})
        else:
            weights.hashes[f"lpips_{settings.lpips_net}"] = RANDOM
    return weights


@dataclass
class PerceptualPart:
    """Per-image records of one worker (or merged): key, bucket row, pool3 of output and truth, LPIPS."""

    keys: list[str] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    fake: list[np.ndarray] = field(default_factory=list)
    real: list[np.ndarray] = field(default_factory=list)
    lpips: list[np.ndarray] = field(default_factory=list)

    @staticmethod
    def merge(parts: Sequence["PerceptualPart"]) -> "PerceptualPart":
        """All parts' records in key order (so results do not depend on how the set was split)."""
        keys = [k for p in parts for k in p.keys]
        rows = [r for p in parts for r in p.rows]
        fake = np.concatenate([np.concatenate(p.fake) for p in parts if p.fake]) if any(p.fake for p in parts) else None
        real = np.concatenate([np.concatenate(p.real) for p in parts if p.real]) if any(p.real for p in parts) else None
        lp = np.concatenate([np.concatenate(p.lpips) for p in parts if p.lpips]) if any(p.lpips for p in parts) else None
        order = sorted(range(len(keys)), key=keys.__getitem__)
        merged = PerceptualPart([keys[i] for i in order], [rows[i] for i in order])
        merged.fake = [fake[order]] if fake is not None else []
        merged.real = [real[order]] if real is not None else []
        merged.lpips = [lp[order]] if lp is not None else []
        return merged


class PerceptualAccumulator:
    """Collects one worker's per-image features and LPIPS (the distances are computed from the merged set)."""

    def __init__(self, inception: FIDInceptionV3 | None, lpips: LPIPS | None,
                 truth_features: Mapping[str, np.ndarray] | None = None,
                 buckets: Sequence[Bucket] = HOLE_RATIO_BUCKETS) -> None:
        self.inception, self.lpips = inception, lpips
        self.truth_features = truth_features or {}
        self.buckets = tuple(buckets)
        self.part = PerceptualPart()

    @torch.no_grad()
    def update(self, output: torch.Tensor, truth: torch.Tensor, hole_ratio: torch.Tensor, keys: Sequence[str]) -> None:
        """Add composited outputs and truths (float [0,1], quantised to uint8 as saved images are)."""
        if self.inception is None and self.lpips is None:
            return
        fake_u8, real_u8 = to_uint8(output), to_uint8(truth)
        self.part.keys.extend(keys)
        self.part.rows.extend(_row(float(r), self.buckets) for r in hole_ratio.reshape(-1).tolist())
        if self.inception is not None:
            if all(k in self.truth_features for k in keys):  # truths of this eval set seen before: outputs only
                self.part.fake.append(self.inception(fake_u8).cpu().numpy())
                self.part.real.append(np.stack([self.truth_features[k] for k in keys]))
            else:  # one pass over outputs and truths together: the network's batch is the expensive part
                features = self.inception(torch.cat([fake_u8, real_u8])).cpu().numpy()
                self.part.fake.append(features[: len(keys)])
                self.part.real.append(features[len(keys):])
        if self.lpips is not None:
            self.part.lpips.append(self.lpips(fake_u8.float() / 255, real_u8.float() / 255).cpu().numpy())


def _row(ratio: float, buckets: Sequence[Bucket]) -> int:
    names = bucket_names(buckets)
    name = bucket_of(ratio, buckets)
    return len(names) if name is None else names.index(name)


def perceptual_summary(part: PerceptualPart, metrics: Sequence[str],
                       buckets: Sequence[Bucket] = HOLE_RATIO_BUCKETS) -> dict[str, float]:
    """``fid``/``lpips`` overall and per bucket (FID where a bucket has ≥ 2 images), ``p_ids``/``u_ids`` overall."""
    out: dict[str, float] = {}
    rows = np.asarray(part.rows, dtype=np.int64)
    scopes = [("", np.ones(len(rows), dtype=bool))] + [(f"/{b}", rows == i) for i, b in enumerate(bucket_names(buckets))]
    if "fid" in metrics and part.fake:
        fake, real = part.fake[0], part.real[0]
        for suffix, selected in scopes:
            if selected.sum() >= 2:
                out[f"fid{suffix}"] = fid_from_features(real[selected], fake[selected])
    if "lpips" in metrics and part.lpips:
        values = part.lpips[0]
        for suffix, selected in scopes:
            if selected.any():
                out[f"lpips{suffix}"] = float(values[selected].mean())
    if "pids" in metrics and part.fake and len(rows) >= 2:
        out["p_ids"], out["u_ids"] = inception_discriminative_scores(part.real[0], part.fake[0])
    return out
