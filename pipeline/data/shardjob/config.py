"""The shard job's configuration: what to shard, where, how, and how hard to retry (validated up front).

Everything here is checked before any Ray resource is requested; a bad value is a one-line error naming
the key. :meth:`ShardJobConfig.recorded` is the part stored in the manifest (no secrets, no output location,
no execution-only settings), so a dataset's identity does not depend on where or how fast it was sharded.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.buckets import HOLE_RATIO_BUCKETS, check_buckets
from pipeline.config import Config
from pipeline.fsutil import ReadRetry, StorageSettings
from pipeline.paths import LocalPath, OutputPathStr
from pipeline.redaction import redact
from pipeline.data.imageops import DEFAULT_MAX_PIXELS
from pipeline.data.masks.generators import MaskSettings
from pipeline.data.sources import DEFAULT_MAX_INPUT_BYTES, SourceSettings

__all__ = ["EXECUTION_ONLY", "EvalSetSettings", "ShardJobConfig", "identity_bounds"]

# Settings that change how a run goes, never what it writes: left out of the manifest and its hash.
EXECUTION_ONLY = frozenset({"out", "storage_options", "num_cpus", "max_in_flight", "verify", "max_rejected_fraction",
                            "read_retry", "task_retries"})


class EvalSetSettings(Config):
    """The ``eval`` section: the pinned evaluation set this job writes, ``per_bucket`` samples in each hole-ratio
    bucket (how a generator is evaluated on it is evaluation's ``EvaluationSettings``)."""

    enabled: bool = False
    per_bucket: int = Field(default=100, ge=1)
    buckets: tuple[tuple[float, float], ...] = HOLE_RATIO_BUCKETS
    max_attempts: int = Field(default=500, ge=1, description="mask draws per item before it is given up")

    @field_validator("buckets")
    @classmethod
    def _valid_buckets(cls, buckets: tuple[tuple[float, float], ...]) -> tuple[tuple[float, float], ...]:
        # Disjoint, in order, distinct labels: evaluation files samples under these (pipeline.buckets).
        return check_buckets(buckets)


class ShardJobConfig(Config):
    """Everything the shard job needs; validated before any Ray resource is requested."""

    source: SourceSettings
    out: OutputPathStr = Field(min_length=1, description="dataset folder (local path or URL) for shards and manifest")
    dataset_version: str = Field(default="1", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    samples_per_shard: int = Field(default=1000, ge=1)
    masks: MaskSettings = Field(default_factory=MaskSettings)
    seed: int = Field(default=0, ge=0)
    store_size: int = Field(default=256, ge=32, le=8192)
    center_crop: bool = False
    jpeg_quality: int = Field(default=95, ge=1, le=100)
    jpeg_subsampling: Literal["4:4:4", "4:2:2", "4:2:0"] = "4:4:4"
    max_pixels: int = Field(default=DEFAULT_MAX_PIXELS, ge=1, description="decompression-bomb guard")
    max_input_bytes: int = Field(
        default=DEFAULT_MAX_INPUT_BYTES, ge=1,
        description="largest input file read; larger ones are rejected 'too large' before any byte is read",
    )
    eval: EvalSetSettings = Field(default_factory=EvalSetSettings)
    limit: int | None = Field(default=None, ge=1, description="use only the first N items (sorted by key)")
    parent: Annotated[str | None, LocalPath()] = Field(default=None, description="manifest of the version this one extends")
    incremental_by: Literal["keys", "mtime"] = "keys"
    storage_options: StorageSettings = Field(default_factory=StorageSettings)
    num_cpus: float = Field(default=1.0, gt=0, description="CPUs reserved per shard task")
    max_in_flight: int = Field(default=0, ge=0, description="shard tasks queued at once; 0 = 2 x cluster CPUs")
    max_rejected_fraction: float = Field(
        default=0.5, ge=0.0, le=1.0,
        description="fail, publishing no manifest, when more than this share of the inputs is rejected",
    )
    verify: Literal["sha256", "size"] = Field(
        default="sha256", description="how a re-run checks an existing shard before skipping it"
    )
    read_retry: ReadRetry = Field(
        default_factory=ReadRetry, description="retries of a read that failed transiently (after the S3 client's own)"
    )
    task_retries: int = Field(
        default=2, ge=0, description="Ray retries of a shard task whose reads kept failing or whose worker died"
    )

    @model_validator(mode="before")
    @classmethod
    def _eval_sets_are_cropped(cls, data: Any) -> Any:
        # Eval images are centre-cropped squares; make that the default in eval mode, and refuse an
        # explicit contradiction instead of silently writing a different set.
        if isinstance(data, dict):
            evaluation = data.get("eval")
            if isinstance(evaluation, dict):
                enabled = evaluation.get("enabled", False)
            else:
                enabled = getattr(evaluation, "enabled", False)
            if enabled:
                if data.get("center_crop") is False:
                    raise ValueError("eval sets are centre-cropped: center_crop cannot be false with eval.enabled")
                data = {**data, "center_crop": True}
        return data

    @model_validator(mode="after")
    def _eval_has_no_parent(self) -> "ShardJobConfig":
        if self.eval.enabled and self.parent is not None:
            raise ValueError("eval sets are pinned: parent (incremental versions) applies to training sets only")
        return self

    def recorded(self) -> dict[str, Any]:
        """The config as stored in the manifest: no secrets (URL credentials redacted: ``bob:***@``,
        ``X-Amz-Signature=***``), no output location (a copy keeps its hash), no execution-only settings (the
        same data sharded on another cluster has the same hash); ``max_input_bytes`` only when not its default."""
        recorded = self.model_dump(mode="json", exclude=set(EXECUTION_ONLY) | {"max_input_bytes"})
        recorded.update(identity_bounds(self))
        source = recorded["source"]
        for name in ("url", "root", "index_url"):
            if isinstance(source.get(name), str):
                source[name] = redact(source[name])
        if isinstance(recorded.get("parent"), str):
            recorded["parent"] = redact(recorded["parent"])
        return recorded


def identity_bounds(config: ShardJobConfig) -> dict[str, Any]:
    """Bounds added after versions were published that belong to a version's identity only when changed: at their
    default a version keeps the identity (manifest, plan fingerprint) it had before they existed, so published
    versions resume instead of being written again beside themselves."""
    default = ShardJobConfig.model_fields["max_input_bytes"].default
    return {} if config.max_input_bytes == default else {"max_input_bytes": config.max_input_bytes}

