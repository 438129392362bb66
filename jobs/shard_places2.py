"""Shard Places2 (or any image collection laid out like it) into WebDataset tar shards with precomputed masks.

    python jobs/shard_places2.py --source /data/places365_train_standard.txt --root /data/data_large \
        --out s3://bucket/places2/v1 --config jobs/configs/shard_places2.yaml

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/shard_places2.py --config jobs/configs/shard_sample.yaml

    python jobs/shard_places2.py --source /data/places365_val.txt --root /data/val_large \
        --out /data/eval-v1 --eval --set eval.per_bucket=2000       # the pinned eval set

Runs on the Ray cluster named by RAY_ADDRESS, else on an embedded local Ray. Re-running after a crash skips
the shards already published. Prints the manifest URL and its hash at the end. Every key of the config is in
``pipeline/sharding.py::ShardJobConfig``; flags below are shortcuts for the common ones (``--set`` wins).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Run as a script (`python jobs/shard_places2.py`, also inside a Ray job's working dir): make the repo importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import ConfigError, add_config_arguments, parse_job_config  # noqa: E402
from pipeline.joblog import setup_job_logging  # noqa: E402
from pipeline.manifest import ManifestError  # noqa: E402
from pipeline.sharding import ShardJobConfig, run_shard_job  # noqa: E402

# flag -> config key. String values are JSON-quoted so a path such as "2024" stays a string.
_FLAG_KEYS = {
    "source": "source.url",
    "root": "source.root",
    "out": "out",
    "samples_per_shard": "samples_per_shard",
    "masks": "masks.name",
    "seed": "seed",
    "store_size": "store_size",
    "limit": "limit",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shard_places2", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", help="file list (.txt), tar archive (.tar) or image folder; any fsspec URL")
    parser.add_argument("--root", help="image folder of a file list / folder inside a tar archive")
    parser.add_argument("--out", help="dataset folder for the shards and manifest.json")
    parser.add_argument("--samples-per-shard", type=int)
    parser.add_argument("--masks", help="mask generator name (pipeline.masks), default lama_train_mix")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--store-size", type=int, help="short side of stored images in px (default 256)")
    parser.add_argument("--eval", action="store_true", help="build the pinned, bucket-balanced eval set")
    parser.add_argument("--limit", type=int, help="shard only the first N items (sorted by key)")
    add_config_arguments(parser)
    return parser


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """``key=value`` overrides for the shortcut flags that were given."""
    overrides = [
        f"{key}={json.dumps(getattr(args, flag))}"
        for flag, key in _FLAG_KEYS.items()
        if getattr(args, flag) is not None
    ]
    if args.eval:
        overrides.append("eval.enabled=true")
    return overrides


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point (`holefill-shard`); returns the exit status."""
    args = build_parser().parse_args(argv)
    # Config errors are reported in one line before any Ray resource is requested.
    try:
        config = parse_job_config(ShardJobConfig, args, flag_overrides(args))
    except ConfigError as exc:
        print(f"shard_places2: {exc}", file=sys.stderr)
        return 2
    setup_job_logging("sharding")
    try:
        result = run_shard_job(config)
    except (ManifestError, FileNotFoundError, ValueError) as exc:
        print(f"shard_places2: {exc}", file=sys.stderr)
        return 1
    print(f"manifest: {result.manifest_url}")
    print(f"manifest_hash: {result.manifest_hash}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
