"""Shard Places2 (or any image collection laid out like it) into WebDataset tar shards with precomputed masks.

    python jobs/shard_places2.py --source /data/places365_train_standard.txt --root /data/data_large \
        --out s3://bucket/places2/v1 --config jobs/configs/shard_places2.yaml

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/shard_places2.py --config jobs/configs/shard_sample.yaml

    python jobs/shard_places2.py --source /data/places365_val.txt --root /data/val_large \
        --out /data/eval-v1 --eval --set eval.per_bucket=2000       # the pinned eval set

Runs on the Ray cluster named by RAY_ADDRESS, else on an embedded local Ray. Re-running after a crash skips
the shards already published. One job per ``out`` at a time: a job started while another one writes
the same ``out`` prints ``skipped: another shard job holds <out>/.shardjob.lock (host, pid, since ...)`` and exits
0. Prints the manifest URL and its hash at the end. Every key of the config is in
``pipeline/data/shardjob/config.py::ShardJobConfig``; flags below are shortcuts for the common ones (``--set`` wins).
"""

from __future__ import annotations

import sys

from pipeline.data.manifest import ManifestError
from pipeline.data.shardjob.run import ShardJobConfig, ShardJobError, run_shard_job
from pipeline.jobcli import Flag, run_job
from pipeline.errors import one_line
from pipeline.redaction import redact
from pipeline.locks import LockBusy

FLAGS = {
    "source": Flag("source.url", "file list (.txt), tar archive (.tar) or image folder; any fsspec URL"),
    "root": Flag("source.root", "image folder of a file list / folder inside a tar archive"),
    "out": Flag("out", "dataset folder for the shards and manifest.json"),
    "samples_per_shard": Flag("samples_per_shard", options={"type": int}),
    "masks": Flag("masks.name", "mask generator name (pipeline.data.masks.generators), default lama_train_mix"),
    "seed": Flag("seed", options={"type": int}),
    "store_size": Flag("store_size", "short side of stored images in px (default 256)", options={"type": int}),
    "eval": Flag("eval.enabled", "build the pinned, bucket-balanced eval set", const=True),
    "limit": Flag("limit", "shard only the first N items (sorted by key)", options={"type": int}),
}


def shard(config: ShardJobConfig) -> int:
    """Run the shard job; print the manifest URL and hash. A failed run (not bad config) exits 1."""
    try:
        result = run_shard_job(config)
    except LockBusy as exc:  # another shard job is writing this out: nothing to do now
        print(f"shard_places2: skipped: {exc}")
        return 0
    except (ManifestError, OSError, ValueError, ShardJobError) as exc:  # OSError: storage refused a list or write
        print(f"shard_places2: {redact(one_line(exc))}", file=sys.stderr)
        return 1
    print(f"manifest: {result.manifest_url}")
    print(f"manifest_hash: {result.manifest_hash}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point (`holefill-shard`); returns the exit status."""
    return run_job("shard_places2", __doc__, ShardJobConfig, shard, argv, FLAGS, log_name="sharding")


if __name__ == "__main__":
    sys.exit(main())
