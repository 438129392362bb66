"""Promote a challenger model version to `champion` when it beats the current champion on the pinned eval set.

    python jobs/promote.py --model lbam --challenger 7 --eval-manifest s3://bucket/eval-v1/manifest.json
    python jobs/promote.py --config jobs/configs/promote.yaml --set gate.rules.0.min_improvement=0.1

Both models are evaluated now, on the same eval set; the decision (tags `holefill.promotion.*` and a
description with the comparison table) is recorded on the challenger version whether it passes or not.
With no champion yet, the first valid model becomes champion. A `champion` alias moved by hand in the MLflow
UI is what this job compares against. Exit status: 0 when the job ran (promoted or refused), 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.joblog import setup_job_logging  # noqa: E402
from pipeline.config import ConfigError, add_config_arguments, parse_job_config  # noqa: E402
from pipeline.evaluation import registry_evaluator  # noqa: E402
from pipeline.manifest import load_manifest, manifest_hash  # noqa: E402
from pipeline.registry import PromoteJobConfig, promote, resolve_version  # noqa: E402
from pipeline.tracking import check_tracking_server, resolve_tracking_uri  # noqa: E402

DEFAULT_CONFIG = str(Path(__file__).with_name("configs") / "promote.yaml")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="promote", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="registered model name (lbam, rn)")
    parser.add_argument("--challenger", help="version number, alias or 'latest'")
    parser.add_argument("--eval-manifest", help="manifest URL of the pinned eval set")
    add_config_arguments(parser, DEFAULT_CONFIG)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    setup_job_logging("promote")
    args = build_parser().parse_args(argv)
    flags = {"registered_model": args.model, "challenger": args.challenger, "eval_manifest": args.eval_manifest}
    try:
        config = parse_job_config(PromoteJobConfig, args,
                                  [f"{k}={json.dumps(v)}" for k, v in flags.items() if v is not None])
        tracking_uri = resolve_tracking_uri(config.tracking_uri, os.environ)
        check_tracking_server(tracking_uri)
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        version = resolve_version(client, config.registered_model, config.challenger)
        eval_set = manifest_hash(load_manifest(config.eval_manifest, config.evaluation.storage_options or None))
        evaluator = registry_evaluator(tracking_uri, config.eval_manifest, config.evaluation)
        outcome = promote(client, config.registered_model, version, evaluator, config.gate, eval_set=eval_set)
    except (ConfigError, ValueError) as exc:
        print(f"promote: {exc}", file=sys.stderr)
        return 2
    reasons = "; ".join(outcome.decision.reasons) if outcome.decision else ""
    print(f"{config.registered_model} version {version}: {outcome.action} "
          f"(champion {outcome.champion_before or 'none'} -> {outcome.champion_after or 'none'}) {reasons}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
