"""Planning the shard job: which inputs go into which shard, and what identifies a plan.

Deterministic throughout: the i-th block of ``samples_per_shard`` sorted items becomes ``shard-%06d.tar``
(:func:`plan_shards`); short shards left by rejections are regrouped into full ones by :func:`fill_plans`, a
function of the written shards alone. :func:`plan_fingerprint` names what one shard must contain (a re-run
reuses a shard only when its recorded fingerprint matches), :func:`run_fingerprint` what a whole run was asked
to do (a re-run into a folder holding a published version resumes it only when they agree).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Sequence

from pydantic import BaseModel, ConfigDict

from pipeline.data.manifest import HoleRatioHistogram, RejectedInput, canonical_json
from pipeline.data.masks.generators import describe
from pipeline.data.shardjob.config import ShardJobConfig, identity_bounds
from pipeline.data.sources import SourceItem

__all__ = [
    "SHARD_FORMAT",
    "FillPlan",
    "ShardPlan",
    "ShardResult",
    "derive_mask_seed",
    "fill_plans",
    "plan_fingerprint",
    "plan_shards",
    "round_robin_targets",
    "run_fingerprint",
    "shard_name",
]

# Bump when the bytes a shard task writes for the same inputs change (it invalidates old sidecars).
# 2: JPEGs decoded at the DCT scale that covers the target (no second resize); masks PNG rows unfiltered.
SHARD_FORMAT = 2


def shard_name(index: int) -> str:
    """File name of shard ``index``: ``shard-000042.tar``."""
    return f"shard-{index:06d}.tar"


def derive_mask_seed(seed: int, attempt: int) -> int:
    """Seed of the ``attempt``-th mask draw of an eval item (attempt 0 is ``seed`` itself)."""
    if attempt == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}:{attempt}".encode(), digest_size=8, person=b"holefill.retry").digest()
    return int.from_bytes(digest, "little") >> 1  # non-negative 63-bit


@dataclass(frozen=True)
class ShardPlan:
    """One shard's inputs, in write order; ``targets`` holds each item's bucket for eval sets."""

    index: int
    items: tuple[SourceItem, ...]
    targets: tuple[str, ...] | None = None

    @property
    def name(self) -> str:
        return shard_name(self.index)


class ShardResult(BaseModel):
    """What a shard task reports, and what its ``.tar.json`` sidecar records (timings excepted)."""

    model_config = ConfigDict(extra="forbid")

    index: int
    name: str
    fingerprint: str
    planned: int
    samples: int
    bytes: int
    sha256: str
    keys: list[str]
    rejected: list[RejectedInput]
    histogram: HoleRatioHistogram
    bucket_counts: dict[str, int] = {}
    reused: bool = False
    timings: dict[str, float] = {}

    def sidecar(self) -> bytes:
        return (canonical_json(self.model_dump(mode="json", exclude={"reused", "timings"})) + "\n").encode()


def task_settings(config: ShardJobConfig) -> dict[str, Any]:
    """The config fields that determine a shard's bytes (source identity lives in the item list)."""
    return {
        "format": SHARD_FORMAT,
        "masks": describe(config.masks),
        "seed": config.seed,
        "store_size": config.store_size,
        "center_crop": config.center_crop,
        "jpeg_quality": config.jpeg_quality,
        "jpeg_subsampling": config.jpeg_subsampling,
        "max_pixels": config.max_pixels,
        "eval": config.eval.model_dump(mode="json") if config.eval.enabled else None,
        **identity_bounds(config),
    }


def plan_fingerprint(plan: ShardPlan, config: ShardJobConfig) -> str:
    """sha256 identifying what shard ``plan`` must contain: settings plus each item's identity."""
    items = [item_identity(i) for i in plan.items]
    payload = {"settings": task_settings(config), "items": items, "targets": plan.targets, "name": plan.name}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


def plan_shards(
    items: Sequence[SourceItem], samples_per_shard: int, *, first_index: int = 0,
    targets: Sequence[str] | None = None,
) -> list[ShardPlan]:
    """Cut sorted ``items`` into consecutive blocks of ``samples_per_shard`` (the last may be shorter)."""
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if targets is not None and len(targets) != len(items):
        raise ValueError("targets must have one bucket per item")
    plans = []
    for number, start in enumerate(range(0, len(items), samples_per_shard)):
        stop = start + samples_per_shard
        plans.append(
            ShardPlan(
                index=first_index + number,
                items=tuple(items[start:stop]),
                targets=tuple(targets[start:stop]) if targets is not None else None,
            )
        )
    return plans



@dataclass(frozen=True)
class FillPlan:
    """A shard made of samples already written to short shards: ``sources`` is ``(shard name, keys)`` in order."""

    index: int
    sources: tuple[tuple[str, tuple[str, ...]], ...]

    @property
    def name(self) -> str:
        return shard_name(self.index)

    @property
    def keys(self) -> list[str]:
        return [key for _, keys in self.sources for key in keys]


def fill_plans(results: Sequence[ShardResult], samples_per_shard: int, first_index: int) -> list[FillPlan]:
    """Plans that regroup the samples of short shards into full ones (the last may stay short).

    Nothing to do (an empty list) when at most the final shard is short. Otherwise every short shard's samples,
    in shard and key order, are cut into blocks of ``samples_per_shard``: a function of the written shards
    only, so a re-run plans the same shards.
    """
    short = [result for result in results if result.samples < samples_per_shard]
    if not short or (len(short) == 1 and short[0] is results[-1]):
        return []
    pool = [(result.name, key) for result in short for key in result.keys]
    plans = []
    for number, start in enumerate(range(0, len(pool), samples_per_shard)):
        sources: list[tuple[str, list[str]]] = []
        for name, key in pool[start : start + samples_per_shard]:
            if not sources or sources[-1][0] != name:
                sources.append((name, []))
            sources[-1][1].append(key)
        plans.append(FillPlan(first_index + number, tuple((name, tuple(keys)) for name, keys in sources)))
    return plans


def fill_fingerprint(plan: FillPlan, sources: dict[str, ShardResult]) -> str:
    payload = {"format": SHARD_FORMAT, "name": plan.name,
               "sources": [[name, sources[name].sha256, list(keys)] for name, keys in plan.sources]}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


def round_robin_targets(needs: dict[str, int]) -> list[str]:
    """Bucket names interleaved, each repeated as often as it still needs samples."""
    remaining = dict(needs)
    order: list[str] = []
    while any(remaining.values()):
        for name in list(remaining):
            if remaining[name] > 0:
                order.append(name)
                remaining[name] -= 1
    return order



def item_identity(item: SourceItem) -> list[Any]:
    """What identifies one input: its key, path, label, size, mtime and archive offset (not its URL)."""
    return [item.key, item.path, item.label, item.size, item.mtime, item.offset]


def run_fingerprint(config: ShardJobConfig, items: Sequence[SourceItem], parent_hash: str | None) -> str:
    """sha256 naming what a run was asked to write: recorded config, shard settings, each input's identity and
    the parent version. Two runs with equal fingerprints write the same version, byte for byte."""
    payload = {"config": config.recorded(), "settings": task_settings(config), "parent": parent_hash,
               "items": [item_identity(item) for item in items]}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()
