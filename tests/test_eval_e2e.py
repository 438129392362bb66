"""Evaluation end to end: ``jobs/evaluate.py`` on a registered model with two Ray workers and weight files for
FID, LPIPS and P-IDS/U-IDS; then a promotion that reuses the champion's cached evaluation and records the
per-bucket table and pictures. Real MLflow server, real Ray, real eval shards; the weight files hold the
reference-checked pattern weights (tests/support/metrics_pattern.py), in the layouts of the released files."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.data.manifest import manifest_url_for
from support.metrics_pattern import metric_pattern_state_dict

REPO = Path(__file__).resolve().parents[1]
MODEL = "rn-eval"
CROP = 64


def _write_weight_files(folder: Path) -> dict[str, Path]:
    """The three files a user downloads, in their release layouts, filled with the pattern weights."""
    import torch

    lpips = metric_pattern_state_dict("lpips_vgg")
    files = {
        "inception_weights": (folder / "pt_inception-2015-12-05-6726825d.pth", metric_pattern_state_dict("inception")),
        "lpips_weights": (folder / "vgg.pth", {k: v for k, v in lpips.items() if k.startswith("lin") and not k.startswith("lins")}),
        "lpips_backbone_weights": (folder / "vgg16-397923af.pth",
                                   {"features." + k.split(".", 2)[2]: v for k, v in lpips.items() if k.startswith("net.")}),
    }
    for path, state in files.values():
        torch.save(state, path)
    return {key: path for key, (path, _) in files.items()}


@pytest.fixture(scope="module")
def world(tmp_path_factory, mlflow_server, ray_driver):
    """The session's Ray, a pinned eval set of 6 images (one per hole bucket, 2 shards), weight files, a champion."""
    import torch

    from models.registry import get_architecture
    from pipeline.data.sample_data import generate_sample_dataset
    from pipeline.data.shardjob.run import ShardJobConfig, run_shard_job
    from pipeline.lifecycle.packaging import log_and_register_generator
    from pipeline.tracking import RunTracker

    root = tmp_path_factory.mktemp("evaluation")
    sample = generate_sample_dataset(str(root / "places"), n_train=0, n_val=24, size=(96, 80), include_package_photos=False)
    evaluation = run_shard_job(ShardJobConfig.model_validate({
        "source": {"url": sample.val_list, "root": sample.val_root}, "out": str(root / "eval"),
        "samples_per_shard": 3, "store_size": CROP, "eval": {"enabled": True, "per_bucket": 1},
    }))
    versions = []
    run = RunTracker.start_or_resume(mlflow_server, "holefill-eval-e2e", "generators")
    for seed in (0, 1):
        torch.manual_seed(seed)
        image, mask = torch.rand(1, 3, 32, 32), (torch.rand(1, 1, 32, 32) > 0.7).float()
        versions.append(log_and_register_generator(mlflow_server, run.run_id, get_architecture("rn").generator(),
                                                   image, mask, MODEL, arch="rn").version)
    run.finish()
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    client.set_registered_model_alias(MODEL, "champion", versions[0])
    yield {"root": root, "eval": evaluation.manifest_url, "tracking_uri": mlflow_server, "client": client,
           "versions": versions, "weights": _write_weight_files(root)}


def _settings(world) -> dict:
    return {"crop_size": CROP, "batch_size": 3, "num_workers": 2,
            "perceptual": {"lpips_net": "vgg", "truth_feature_cache": str(world["root"] / "features"),
                           **{key: str(path) for key, path in world["weights"].items()}}}


@pytest.mark.e2e
def test_evaluate_job_prints_and_records_every_metric_per_bucket_with_n_and_weight_hashes(world, ray_head):
    # The job joins the session's Ray head, as a job submitted to a cluster does (no Ray start of its own).
    env = {**os.environ, "MLFLOW_TRACKING_URI": world["tracking_uri"], "RAY_ADDRESS": ray_head.address}
    sets = [f"--set=evaluation.{key}={value}" for key, value in _settings(world).items() if key != "perceptual"]
    sets += [f"--set=evaluation.perceptual.{key}={value}" for key, value in _settings(world)["perceptual"].items()]
    done = subprocess.run([sys.executable, "jobs/evaluate.py", "--model", f"models:/{MODEL}@champion",
                           "--eval-manifest", world["eval"], *sets], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert "(6 images" in lines[0] and "2 Ray workers" in lines[0]
    header = next(i for i, line in enumerate(lines) if line.startswith("hole ratio"))
    assert lines[header].split() == ["hole", "ratio", "images", "PSNR", "SSIM", "L1", "FID", "LPIPS"]
    rows = [line.split() for line in lines[header + 1: header + 8]]
    assert [r[0] for r in rows][-1] == "all" and [r[1] for r in rows] == ["1"] * 6 + ["6"]
    assert all(r[5] == "-" for r in rows[:6]) and rows[6][5] != "-"  # FID needs >= 2 images: overall only here
    assert all(r[6] != "-" for r in rows)  # LPIPS per image, so per bucket
    assert lines[header + 8].startswith("P-IDS ") and "U-IDS" in lines[header + 8] and "N=6" in lines[header + 8]
    for name, path in (("inception", "inception_weights"), ("lpips_vgg", "lpips_weights"),
                       ("lpips_vgg_backbone", "lpips_backbone_weights")):
        assert f"{name} weights sha256 {hashlib.sha256(world['weights'][path].read_bytes()).hexdigest()}" in lines

    run_id = next(line for line in lines if line.startswith("recorded in MLflow run")).split()[4]
    run = world["client"].get_run(run_id)
    assert {"fid", "lpips", "p_ids", "u_ids", "psnr/0.50-0.60", "lpips/0.50-0.60", "count"} <= set(run.data.metrics)
    (read,) = run.inputs.dataset_inputs  # the eval manifest, as the run's dataset input
    assert [(t.key, t.value) for t in read.tags] == [("mlflow.data.context", "evaluation")]
    assert read.dataset.digest == run.data.tags["holefill.eval_manifest_hash"][:36]
    assert json.loads(read.dataset.source)["uri"] == manifest_url_for(world["eval"])
    assert run.data.tags["holefill.weights.inception"] == hashlib.sha256(
        world["weights"]["inception_weights"].read_bytes()).hexdigest()
    version = world["client"].get_model_version(MODEL, world["versions"][0])
    assert version.tags[f"holefill.eval.{run.data.tags['holefill.eval_manifest_hash'][:12]}."
                        f"{run.data.tags['holefill.metric_set']}.run_id"] == run_id


@pytest.mark.e2e
def test_a_metric_without_weights_stops_the_job_naming_the_key(world):
    done = subprocess.run([sys.executable, "jobs/evaluate.py", "--model", f"models:/{MODEL}@champion",
                           "--eval-manifest", world["eval"], "--set", "evaluation.perceptual.metrics=[fid]"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "evaluate: config key evaluation.perceptual.inception_weights: fid needs this weights file "
        "(pt_inception-2015-12-05-6726825d.pth); set it (path or fsspec URL) or drop the metric"]


@pytest.mark.e2e
def test_promotion_reuses_the_cached_champion_evaluation_and_records_table_and_pictures(world):
    from pipeline.evaluation.evaluate import EvaluationSettings, evaluate_slice, merge_slices
    from pipeline.lifecycle.evaluations import RegistryEvaluator
    from pipeline.lifecycle.packaging import load_generator
    from pipeline.lifecycle.promotion import GateSettings, promote

    client, (champion, challenger) = world["client"], world["versions"]
    settings = EvaluationSettings.model_validate(_settings(world))
    evaluator = RegistryEvaluator(world["tracking_uri"], world["eval"], settings)
    runs_before = client.search_runs([client.get_experiment_by_name("holefill-evaluation").experiment_id])
    outcome = promote(client, MODEL, challenger, evaluator, GateSettings(), eval_set=evaluator.manifest_hash)

    # The job above kept the truths' Inception features of this eval set: the challenger only paid for its outputs.
    assert len(list((world["root"] / "features").glob("truth-pool3-*-crop64.npz"))) == 1
    # The champion was evaluated by the job above with the same eval set and metric set: reused, not re-run.
    assert evaluator.results[(MODEL, champion)].cached and not evaluator.results[(MODEL, challenger)].cached
    runs_after = client.search_runs([client.get_experiment_by_name("holefill-evaluation").experiment_id])
    assert len(runs_after) == len(runs_before) + 1
    assert outcome.decision.basis.startswith("default FID + LPIPS rules")
    assert {"fid", "lpips"} <= set(outcome.champion_metrics) and {"fid", "lpips"} <= set(outcome.challenger_metrics)

    version = client.get_model_version(MODEL, challenger)
    assert "Champion vs challenger per hole bucket" in version.description and "fid champion" in version.description
    evidence = version.tags["holefill.promotion.evidence_run"]
    pictures = {a.path for a in client.list_artifacts(evidence, "pictures")}
    assert pictures == {f"pictures/{b}.png" for b in ("0.01-0.10", "0.10-0.20", "0.20-0.30", "0.30-0.40", "0.40-0.50",
                                                      "0.50-0.60")}

    # Two Ray workers (with cached truth features) give what one in-process pass computing everything gives.
    generator, arch = load_generator(f"models:/{MODEL}/{challenger}", world["tracking_uri"])
    alone = evaluate_slice(generator, arch, world["eval"], settings, evaluator.weights)
    summary, _, _ = merge_slices([alone], evaluator.weights.metrics, settings.samples_per_bucket)
    distributed = evaluator.results[(MODEL, challenger)].summary
    assert summary.keys() == distributed.keys()
    assert all(summary[k] == pytest.approx(distributed[k], rel=1e-5, abs=1e-6) for k in summary)
