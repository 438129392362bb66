"""Promote a challenger model version to `champion` when it beats the current champion on the pinned eval set.

    python jobs/promote.py --model lbam --challenger 7 --eval-manifest s3://bucket/eval-v1/manifest.json
    python jobs/promote.py --config jobs/configs/promote.yaml --set evaluation.perceptual.inception_weights=/w/pt_inception.pth

Both models are evaluated now, on the same eval set; the decision (tags `holefill.promotion.*` and a
description with the comparison table) is recorded on the challenger version whether it passes or not.
With no champion yet, the first valid model becomes champion. A `champion` alias moved by hand in the MLflow
UI is what this job compares against, and this job never moves it back.

Promotions of one registered model run one at a time: the job takes the model's lock (`lock_root`, shared by every
promoting job; `~/.holefill/locks` by default, an `s3://` folder on a cluster) and waits up to `lock_wait_s` for
another promotion to finish, then compares against the champion that one left. Still held after that: it prints
`skipped: another promotion of <model> job holds <lock> (host, pid, since ...)` and exits 0.

Exit status: 0 when the job ran (promoted, refused, conflict, skipped), 2 on bad input or a lock it cannot read or
break (one line).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pipeline.jobcli import Flag, run_job
from pipeline.lifecycle.evaluations import RegistryEvaluator
from pipeline.lifecycle.promotion import PromoteJobConfig, promote, promotion_lock, resolve_version
from pipeline.locks import LockBusy
from pipeline.tracking import check_tracking_server, resolve_tracking_uri

DEFAULT_CONFIG = str(Path(__file__).with_name("configs") / "promote.yaml")
FLAGS = {
    "model": Flag("registered_model", "registered model name (lbam, rn)"),
    "challenger": Flag("challenger", "version number, alias or 'latest'"),
    "eval_manifest": Flag("eval_manifest", "manifest URL of the pinned eval set"),
}


def run_promotion(config: PromoteJobConfig) -> int:
    """Take the model's promotion lock, evaluate challenger and champion, apply the gate, print the decision."""
    tracking_uri = resolve_tracking_uri(config.tracking_uri, os.environ, local_store=False)
    check_tracking_server(tracking_uri)
    # lazy: importing MLflow takes seconds, paid only by the callers that talk to a tracking server
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    # Reads the eval manifest and the metric weights first: a missing file stops the job before any evaluation.
    evaluator = RegistryEvaluator(tracking_uri, config.eval_manifest, config.evaluation)
    version = resolve_version(client, config.registered_model, config.challenger)
    lock = promotion_lock(config.lock_root, config.registered_model, config.lock, config.storage_options)
    try:
        lock.acquire(wait_s=config.lock_wait_s)
    except LockBusy as exc:
        print(f"{config.registered_model} version {version}: skipped: {exc}")
        return 0
    try:
        outcome = promote(client, config.registered_model, version, evaluator, config.gate,
                          eval_set=evaluator.manifest_hash, lock=lock)
    finally:
        lock.release()
    reasons = "; ".join(outcome.decision.reasons) if outcome.decision else ""
    print(f"{config.registered_model} version {version}: {outcome.action} "
          f"(champion {outcome.champion_before or 'none'} -> {outcome.champion_after or 'none'}) {reasons}")
    if outcome.decision is not None:
        print(f"gate: {outcome.decision.basis}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    return run_job("promote", __doc__, PromoteJobConfig, run_promotion, argv, FLAGS, DEFAULT_CONFIG)


if __name__ == "__main__":
    sys.exit(main())
