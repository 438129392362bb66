"""The model lifecycle (the lock itself: tests/test_locks.py), end to end on a real MLflow server, the session's Ray head, real
shards and real LBAM training (ZeRO 2, 2 workers): first champion, a zero-step challenger refused, a better-trained challenger
promoted, retrain no-op, retrain on new images (only the new ones sharded, fine-tuned, gated), and two
overlapping retrains."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------
# End to end

ARCH = "lbam"
MODEL = "lbam-lifecycle"
# A few CPU steps of LBAM at its official learning rate barely move its metrics, so the first champion is
# trained with a learning rate 1000x too high: Adam's first steps then move every weight by about 0.1, which
# wrecks the network. The second, properly trained version must beat it. The networks are LBAM's at 1/4 width
# on 128 px crops (D built for them): measured on held-out scenes, 2 steps at 1000x take the hole PSNR from
# 12.9 to 6.1 dB and 2 steps at 1x leave it at 12.9 dB; at 1/8 width the ruin cost only 1.2 dB (too close to the
# 1 dB this test asks for) and at 1/16 width the test failed.
RUINOUS_LR = ["train.lr_scale=1000"]
WIDTH, CROP = 0.25, 128


@pytest.fixture(scope="module")
def world(tmp_path_factory, mlflow_server, ray_driver):
    """The session's Ray, a directory of 8 source images sharded as the base version, a pinned eval set."""

    from pipeline.data.sample_data import generate_sample_dataset
    from pipeline.data.shardjob.run import ShardJobConfig, run_shard_job

    root = tmp_path_factory.mktemp("lifecycle")
    sample = generate_sample_dataset(str(root / "places"), n_train=8, n_val=24, size=(288, 256),
                                     include_package_photos=False)
    base = run_shard_job(ShardJobConfig.model_validate({
        "source": {"url": sample.train_root}, "out": str(root / "base"), "samples_per_shard": 4, "store_size": 256,
    }))
    evaluation = run_shard_job(ShardJobConfig.model_validate({
        "source": {"url": sample.val_list, "root": sample.val_root}, "out": str(root / "eval"),
        "samples_per_shard": 3, "store_size": 256, "eval": {"enabled": True, "per_bucket": 1},
    }))
    yield {"root": root, "sample": sample, "base": base.manifest_url, "eval": evaluation.manifest_url,
           "tracking_uri": mlflow_server}


def _train_yaml(world) -> str:
    path = world["root"] / "train_lbam.yaml"
    path.write_text(textwrap.dedent(f"""
        model: {{arch: {ARCH}, options: {{allow_random_vgg: true}}, generator_options: {{width: {WIDTH}}},
                 discriminator_options: {{input_size: {CROP}, width: {WIDTH}}}}}
        data: {{train_manifest: {world['base']}, eval_manifest: {world['eval']}, crop_size: {CROP}, loader_workers: 0,
                eval_batch_size: 3}}
        train: {{max_steps: 2, batch_size: 1, log_every: 1, ckpt_every: 0, val_every: 2}}
        deepspeed: {{zero_stage: 2}}
        scaling: {{num_workers: 2, use_gpu: false}}
        run: {{name: lifecycle, storage_path: {world['root'] / 'ray_results'}}}
        mlflow: {{tracking_uri: {world['tracking_uri']}, experiment: holefill-lifecycle, registered_model: {MODEL}}}
    """))
    return str(path)


def _retrain_config(world, **extra):
    from pipeline.lifecycle.retraining import RetrainJobConfig

    return RetrainJobConfig.model_validate({
        "source": {"url": world["sample"].train_root}, "data_root": str(world["root"] / "versions"),
        "base_manifest": world["base"], "shard": {"samples_per_shard": 4, "store_size": 256},
        "train_config": _train_yaml(world), "eval_manifest": world["eval"], "registered_model": MODEL,
        "tracking_uri": world["tracking_uri"], "evaluation": {"batch_size": 3, "crop_size": 256}, **extra,
    })


def mlflow_client(world):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=world["tracking_uri"], registry_uri=world["tracking_uri"])


@pytest.mark.e2e
def test_first_trained_lbam_becomes_champion_and_a_zero_step_challenger_is_refused(world):
    import torch

    from pipeline.lifecycle.evaluations import registry_evaluator
    from pipeline.lifecycle.promotion import GateSettings, current_champion, promote
    from pipeline.lifecycle.packaging import load_generator, log_and_register_generator
    from pipeline.tracking import RunTracker
    from pipeline.train.config import load_train_config
    from pipeline.lifecycle.training import train_and_register as run_training

    result = run_training(load_train_config(_train_yaml(world), RUINOUS_LR))
    client = mlflow_client(world)
    evaluator = registry_evaluator(world["tracking_uri"], world["eval"])
    first = promote(client, MODEL, result.model_version, evaluator, GateSettings(), eval_set="eval")
    assert first.action == "first_champion" and current_champion(client, MODEL) == result.model_version
    assert first.challenger_metrics["count"] == 6  # one eval image per hole-ratio bucket

    # A zero-step challenger: fine-tuning the champion for zero steps gives back the champion's weights.
    champion_weights, arch = load_generator(f"models:/{MODEL}@champion", world["tracking_uri"])
    run = RunTracker.start_or_resume(world["tracking_uri"], "holefill-lifecycle", "zero-step")
    image, mask = torch.rand(1, 3, 128, 128), (torch.rand(1, 1, 128, 128) > 0.7).float()
    zero = log_and_register_generator(world["tracking_uri"], run.run_id, champion_weights, image, mask, MODEL, arch=arch)
    run.finish()
    refused = promote(client, MODEL, zero.version, evaluator, GateSettings(), eval_set="eval")
    assert refused.action == "refused" and current_champion(client, MODEL) == result.model_version
    assert refused.challenger_metrics == refused.champion_metrics  # same weights, same pinned eval set
    assert refused.decision.reasons[0].startswith("psnr overall: improvement +0.0000 < required +0.0100")
    version = client.get_model_version(MODEL, zero.version)
    assert version.tags["holefill.promotion.decision"] == "refused"
    assert version.tags["holefill.promotion.compared_to"] == result.model_version
    evaluations = client.search_runs([client.get_experiment_by_name("holefill-evaluation").experiment_id])
    assert {r.data.tags["holefill.model_version"] for r in evaluations} >= {result.model_version, zero.version}


@pytest.mark.e2e
def test_a_better_trained_lbam_is_promoted_and_the_old_champion_kept_as_previous(world):
    from pipeline.lifecycle.evaluations import registry_evaluator
    from pipeline.lifecycle.promotion import PREVIOUS_CHAMPION, GateSettings, current_champion, promote
    from pipeline.train.config import load_train_config
    from pipeline.lifecycle.training import train_and_register as run_training

    client = mlflow_client(world)
    champion = current_champion(client, MODEL)
    assert champion is not None, "needs the first champion of the test above"
    result = run_training(load_train_config(_train_yaml(world), ["run.name=lifecycle-official-lr"]))
    # Trained with ZeRO 2 on 2 workers, validated on every eval image once across the ranks.
    assert result.final_step == 2 and result.metrics["val/count"] == 6
    assert all(math.isfinite(v) for k, v in result.metrics.items() if k.startswith("train/"))
    evaluator = registry_evaluator(world["tracking_uri"], world["eval"])
    decision = promote(client, MODEL, result.model_version, evaluator, GateSettings(), eval_set="eval")
    assert decision.action == "promoted", decision.decision.reasons
    assert decision.challenger_metrics["psnr"] > decision.champion_metrics["psnr"] + 1.0
    assert current_champion(client, MODEL) == result.model_version
    assert current_champion(client, MODEL, PREVIOUS_CHAMPION) == champion
    version = client.get_model_version(MODEL, result.model_version)
    assert version.tags["holefill.promotion.decision"] == "promoted"
    assert version.tags["holefill.promotion.compared_to"] == champion
    assert "promoted" in version.description and "psnr" in version.description


@pytest.mark.e2e
def test_evaluate_job_prints_the_bucket_table_and_records_it_against_the_version(world):
    env = {**os.environ, "MLFLOW_TRACKING_URI": world["tracking_uri"]}
    done = subprocess.run([sys.executable, "jobs/evaluate.py", "--model", f"models:/{MODEL}@champion",
                           "--eval-manifest", world["eval"]], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    table = lines[lines.index(next(l for l in lines if l.startswith("hole ratio"))):]
    assert [row.split()[0] for row in table[1:8]] == ["0.01-0.10", "0.10-0.20", "0.20-0.30", "0.30-0.40",
                                                      "0.40-0.50", "0.50-0.60", "all"]
    assert all(row.split()[1] == "1" for row in table[1:7]) and table[7].split()[1] == "6"
    run_id = next(l for l in lines if l.startswith("recorded in MLflow run")).split()[4]
    client = mlflow_client(world)
    champion = client.get_model_version_by_alias(MODEL, "champion")
    run = client.get_run(run_id)
    assert run.data.tags["holefill.model_version"] == champion.version and "psnr/0.50-0.60" in run.data.metrics
    assert {a.path for a in client.list_artifacts(run_id, "eval")} == {"eval/per_bucket.json", "eval/table.txt",
                                                                       "eval/samples.npz"}
    assert any(k.endswith(".psnr") for k in client.get_model_version(MODEL, champion.version).tags)


@pytest.mark.e2e
def test_inpaint_job_loads_the_version_an_alias_was_moved_to_by_hand(world, tmp_path):
    import numpy as np
    import torch
    from PIL import Image

    from pipeline.lifecycle.inference import inpaint_tensor, load_image, load_mask
    from pipeline.lifecycle.packaging import load_generator, log_and_register_generator
    from pipeline.tracking import RunTracker

    client = mlflow_client(world)
    original = client.get_model_version_by_alias(MODEL, "champion").version
    generator, arch = load_generator(f"models:/{MODEL}@champion", world["tracking_uri"])
    with torch.no_grad():  # a visibly different model: scale up the output layer
        generator.dc7.weight.mul_(1000.0)
    run = RunTracker.start_or_resume(world["tracking_uri"], "holefill-lifecycle", "hand-picked")
    probe_image, probe_mask = torch.rand(1, 3, 128, 128), (torch.rand(1, 1, 128, 128) > 0.7).float()
    picked = log_and_register_generator(world["tracking_uri"], run.run_id, generator, probe_image, probe_mask, MODEL,
                                        arch=arch).version
    run.finish()
    client.set_registered_model_alias(MODEL, "champion", picked)  # what moving the alias in the MLflow UI does
    try:
        image_path, mask_path, out_path = tmp_path / "in.png", tmp_path / "hole.png", tmp_path / "out.png"
        Image.fromarray((np.random.default_rng(0).random((60, 90, 3)) * 255).astype(np.uint8)).save(image_path)
        hole = np.zeros((60, 90), np.uint8)
        hole[20:40, 30:70] = 255
        Image.fromarray(hole).save(mask_path)
        env = {**os.environ, "MLFLOW_TRACKING_URI": world["tracking_uri"]}
        done = subprocess.run([sys.executable, "jobs/inpaint.py", "--model", f"models:/{MODEL}@champion",
                               "--image", str(image_path), "--mask", str(mask_path), "--out", str(out_path)],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        written = np.asarray(Image.open(out_path).convert("RGB"), dtype=np.float32) / 255
        image, mask = load_image(image_path), load_mask(mask_path, 60, 90)

        def expected(version: str) -> np.ndarray:
            model, _ = load_generator(f"models:/{MODEL}/{version}", world["tracking_uri"])
            with torch.no_grad():
                out = inpaint_tensor(model, arch, image, mask)
            return out[0].permute(1, 2, 0).numpy()

        assert np.abs(written - expected(picked)).max() <= 1 / 255 + 1e-6
        assert np.abs(written - expected(original)).max() > 0.1
    finally:
        client.set_registered_model_alias(MODEL, "champion", original)


@pytest.mark.e2e
def test_retrain_with_nothing_new_exits_zero_at_once(world):
    config_path = world["root"] / "retrain_noop.yaml"
    config_path.write_text(json.dumps(_retrain_config(world).model_dump(mode="json")))
    started = time.monotonic()
    done = subprocess.run([sys.executable, "jobs/retrain.py", "--config", str(config_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "retrain: nothing_new: nothing new: 0 new of 8 source items" in done.stdout
    assert not (world["root"] / "versions" / "v0001").exists()
    assert time.monotonic() - started < 120


def _add_new_images(world, count: int) -> list[Path]:
    source = Path(world["sample"].train_root)
    extra = sorted(p for p in source.rglob("*.jpg"))[:count]
    added = []
    for path in extra:
        target = source / "arrived_later" / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        added.append(target)
    return added


@pytest.mark.e2e
def test_retrain_shards_only_new_images_fine_tunes_registers_a_challenger_and_gates_it(world):
    from pipeline.data.manifest import load_manifest
    from pipeline.lifecycle.promotion import CHALLENGER, current_champion
    from pipeline.lifecycle.retraining import read_latest, run_name, run_retraining

    _add_new_images(world, 4)
    client = mlflow_client(world)
    champion_before = current_champion(client, MODEL)
    outcome = run_retraining(_retrain_config(world), env={})
    assert outcome.action == "retrained" and outcome.new_items == 4

    manifest = load_manifest(outcome.manifest_url)
    base = load_manifest(world["base"])
    assert manifest.parent is not None and manifest.total_samples == base.total_samples + 4
    assert len(manifest.shards) == len(base.shards) + 1  # the 4 new images fill one new shard
    assert read_latest(str(world["root"] / "versions"))["manifest"] == outcome.manifest_url

    version = client.get_model_version(MODEL, outcome.model_version)
    assert current_champion(client, MODEL, CHALLENGER) == outcome.model_version
    assert version.tags["holefill.retrain.dataset_version"] == "1"
    # The training run is bound to this data: a retry on other images is another run, not a resume of this one.
    assert outcome.details["run_name"] == run_name(MODEL, 1, manifest.plan_sha256)
    assert version.tags["holefill.retrain.data_plan"] == manifest.plan_sha256
    # Fine-tuned from the champion of the moment: its weights were exported beside the new data version.
    assert version.tags["holefill.retrain.fine_tuned_from"] == f"version {champion_before}"
    assert (world["root"] / "versions" / "v0001" / "init" / f"champion-v{champion_before}.pt").is_file()
    assert version.tags["holefill.promotion.decision"] == outcome.promotion.action
    assert version.tags["holefill.promotion.compared_to"] == (champion_before or "none")
    expected = outcome.model_version if outcome.promotion.promoted else champion_before
    assert current_champion(client, MODEL) == expected

    again = run_retraining(_retrain_config(world), env={})
    assert again.action == "nothing_new" and again.manifest_url == outcome.manifest_url


@pytest.mark.e2e
def test_two_overlapping_retrains_the_second_exits_cleanly_saying_why(world, tmp_path):
    config_path = tmp_path / "retrain.yaml"
    config_path.write_text(json.dumps(_retrain_config(world).model_dump(mode="json")))
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from pipeline.lifecycle.retraining import RetrainJobConfig, retrain_lock
            lock = retrain_lock(RetrainJobConfig.model_validate_json(open({str(config_path)!r}).read()))
            lock.acquire()
            print("locked", flush=True)
            time.sleep(600)
        """)], cwd=REPO, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = subprocess.run([sys.executable, "jobs/retrain.py", "--config", str(config_path)], cwd=REPO,
                                capture_output=True, text=True, timeout=300)
        assert second.returncode == 0, second.stderr[-3000:]
        assert "retrain: locked: another retrain job holds" in second.stdout and f"pid {holder.pid}" in second.stdout
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
    # The holder died without releasing: its lock is stale now, and the next run proceeds (nothing new).
    third = subprocess.run([sys.executable, "jobs/retrain.py", "--config", str(config_path)], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert third.returncode == 0 and "retrain: nothing_new" in third.stdout, third.stderr[-3000:]
    assert "breaking the stale retrain job lock" in third.stderr


@pytest.mark.e2e
def test_a_retrain_with_an_empty_day_old_lock_breaks_it_and_runs(world, tmp_path):
    config_path = tmp_path / "retrain.yaml"
    config_path.write_text(json.dumps(_retrain_config(world).model_dump(mode="json")))
    lock = world["root"] / "versions" / ".retrain.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_bytes(b"")  # a kill or a full disk between creating a lock and writing its record
    day_ago = time.time() - 86400
    os.utime(lock, (day_ago, day_ago))
    done = subprocess.run([sys.executable, "jobs/retrain.py", "--config", str(config_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "retrain: nothing_new" in done.stdout, done.stderr[-3000:]
    assert "breaking the stale retrain job lock" in done.stderr and "its record is unreadable (0 bytes)" in done.stderr
    assert not lock.exists()
    # A young unreadable lock is not somebody's live run: one line, non-zero exit (never a silent "locked").
    lock.write_bytes(b"")
    young = subprocess.run([sys.executable, "jobs/retrain.py", "--config", str(config_path)], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    lock.unlink()
    assert young.returncode == 2 and young.stderr.strip().splitlines()[-1].startswith(
        "retrain: the retrain job lock"), young.stderr[-2000:]


def _add_images(world, folder: str, count: int, offset: int) -> None:
    """``count`` images (copies of existing ones under other names) arriving in ``<source>/<folder>/``."""
    source = Path(world["sample"].train_root)
    originals = sorted(p for p in source.rglob("*.jpg") if "arrived" not in p.parts[-2] and folder not in p.parts)
    for path in originals[offset: offset + count]:
        target = source / folder / f"{path.stem}-{folder}{path.suffix}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)


@pytest.mark.e2e
@pytest.mark.skipif(not os.environ.get("HOLEFILL_LONG_E2E"), reason="two retrain runs, ~4.5 min on 2 cores: the "
                    "suite's 15-minute budget leaves it out; HOLEFILL_LONG_E2E=1 make test runs it")
def test_a_retrain_killed_after_training_then_rerun_with_more_images_trains_a_new_run_on_all_of_them(
        world, ray_head, tmp_path):
    from pipeline.data.manifest import load_manifest
    from pipeline.lifecycle.promotion import current_champion
    from pipeline.lifecycle.retraining import read_latest, run_retraining

    client = mlflow_client(world)
    data_root = str(world["root"] / "versions")
    latest_before = read_latest(data_root)
    previous_url = latest_before["manifest"] if latest_before else world["base"]
    previous_total = load_manifest(previous_url).total_samples
    _add_images(world, "arrived-first", 2, 0)
    config_path = tmp_path / "retrain.json"
    config_path.write_text(json.dumps(_retrain_config(world).model_dump(mode="json")))
    # A real process, killed (SIGKILL) right after its training run registered a version: nothing after that ran.
    killed = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import os, signal
        from pipeline.lifecycle.retraining import RetrainJobConfig, run_retraining
        from pipeline.lifecycle.training import train_and_register

        def train_then_die(train_config):
            result = train_and_register(train_config)
            print("trained", train_config.run.name, result.model_version, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

        run_retraining(RetrainJobConfig.model_validate_json(open({str(config_path)!r}).read()), env=dict(os.environ),
                       train_fn=train_then_die)
    """)], cwd=REPO, env={**os.environ, "RAY_ADDRESS": ray_head.address}, capture_output=True, text=True, timeout=900)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    _, killed_run, killed_version = killed.stdout.split()[-3:]
    assert read_latest(data_root) == latest_before  # the watermark did not move: nothing was gated

    # More images arrive; the re-run must train on all new ones: another plan, so another run, from the champion.
    _add_images(world, "arrived-second", 2, 2)
    champion = current_champion(client, MODEL)
    outcome = run_retraining(_retrain_config(world), env={})
    assert outcome.action == "retrained" and outcome.new_items == 4, outcome
    assert outcome.details["run_name"] != killed_run and outcome.model_version != killed_version
    assert outcome.details["fine_tuned_from"] == (f"version {champion}" if champion else "none (trained from scratch)")
    manifest = load_manifest(outcome.manifest_url)
    assert manifest.total_samples == previous_total + 4
    version = client.get_model_version(MODEL, outcome.model_version)
    assert version.tags["holefill.retrain.data_plan"] == manifest.plan_sha256
    assert version.tags["holefill.retrain.manifest"] == outcome.manifest_url
    # A run folder of its own beside the killed attempt's (which Ray Train would have resumed, zero steps, had the
    # run name been reused): trained from the champion's weights, not resumed from weights that never saw the data.
    assert (world["root"] / "ray_results" / killed_run).is_dir()
    assert (world["root"] / "ray_results" / outcome.details["run_name"]).is_dir()
    assert read_latest(data_root)["manifest"] == outcome.manifest_url  # moved, after the challenger was registered
