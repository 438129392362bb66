"""First-run surprises, as specifications: relative paths, the checkpoint location, where MLflow writes (and
where it must not), empty datasets, and the local stack handing its MLflow server to submitted jobs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from pipeline.config import Config
from pipeline.jobcli import run_job
from pipeline.paths import PathStr, ray_working_dir_copy, resolve_config_paths
from pipeline.tracking import resolve_tracking_uri
from pipeline.train.config import TrainJobConfig

REPO = Path(__file__).resolve().parents[1]
TINY_RN = str(REPO / "jobs" / "configs" / "train_rn_cpu_tiny.yaml")
RAY_COPY = "session_2026/runtime_resources/working_dir_files/_ray_pkg_0123abcd"


def _configured(argv: list[str], config_type=TrainJobConfig) -> tuple[int, Config | None]:
    seen = {}

    def work(config):
        seen["config"] = config
        return 0

    status = run_job("probe", None, config_type, work, argv)
    return status, seen.get("config")


def test_jobs_make_relative_paths_absolute_against_the_callers_directory_and_log_them(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.INFO)
    status, config = _configured(["--config", TINY_RN, "--set", "data.train_manifest=shards/train-v1/manifest.json",
                                  "--set", "data.eval_manifest=s3://bucket/eval-v1/manifest.json",
                                  "--set", "model.init_weights=weights/generator.pt"])
    assert status == 0
    assert config.data.train_manifest == str(tmp_path / "shards" / "train-v1" / "manifest.json")
    assert config.data.eval_manifest == "s3://bucket/eval-v1/manifest.json"  # URLs are left alone
    assert config.model.init_weights == str(tmp_path / "weights" / "generator.pt")
    assert f"path data.train_manifest: shards/train-v1/manifest.json -> {config.data.train_manifest}" in caplog.text


def test_checkpoints_default_to_a_persistent_absolute_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    _, config = _configured(["--config", TINY_RN, "--set", "data.train_manifest=/d/t.json",
                             "--set", "data.eval_manifest=/d/e.json"])
    assert config.run.storage_path == str(tmp_path / "home" / "ray_results")


def test_an_output_path_inside_rays_copy_of_the_working_dir_is_refused(tmp_path, monkeypatch, capsys):
    copy = tmp_path / RAY_COPY
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    status, _ = _configured(["--config", TINY_RN, "--set", "data.train_manifest=/d/t.json",
                             "--set", "data.eval_manifest=/d/e.json", "--set", "run.storage_path=ray_results"])
    error = capsys.readouterr().err.strip()
    assert status == 2 and len(error.splitlines()) == 1
    assert "config key run.storage_path: 'ray_results' would be written inside Ray's temporary copy" in error
    assert ray_working_dir_copy(copy / "a" / "b") == copy and ray_working_dir_copy(tmp_path) is None


def test_urls_and_absolute_paths_are_never_rewritten(tmp_path):
    class Probe(Config):
        where: PathStr

    for value in ("models:/lbam@champion", "s3://b/k", "file:///x", "/abs/x"):
        probe = Probe(where=value)
        assert resolve_config_paths(probe, tmp_path) == [] and probe.where == value
    probe = Probe(where="a/../b")
    assert [c.resolved for c in resolve_config_paths(probe, tmp_path)] == [probe.where] == [str(tmp_path / "b")]


# ---------------------------------------------------------------------------------------------- MLflow


def test_a_reader_with_no_tracking_server_says_so_instead_of_creating_a_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"^no MLflow tracking server configured .*export MLFLOW_TRACKING_URI="):
        resolve_tracking_uri(None, {}, local_store=False)
    assert not (tmp_path / "mlflow.db").exists()
    (tmp_path / "mlflow.db").write_bytes(b"")  # an existing local store (embedded training ran here) is used
    assert resolve_tracking_uri(None, {}, local_store=False) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert resolve_tracking_uri(None, {"MLFLOW_TRACKING_URI": "http://h:5000"}, local_store=False) == "http://h:5000"


def test_the_inpaint_job_names_the_missing_server_in_one_line(tmp_path, monkeypatch, capsys):
    from jobs import inpaint

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    status = inpaint.main(["--model", "models:/lbam@champion", "--image", "x.jpg", "--out", "y.png"])
    error = capsys.readouterr().err.strip()
    assert status == 2 and error.startswith("inpaint: no MLflow tracking server configured")
    assert not (tmp_path / "mlflow.db").exists()


def test_a_ray_job_without_a_tracking_uri_stops_instead_of_writing_sqlite_into_rays_temp_copy(tmp_path):
    copy = tmp_path / RAY_COPY
    copy.mkdir(parents=True)
    with pytest.raises(ValueError, match=r"^MLFLOW_TRACKING_URI is not set in this Ray job.*--runtime-env-json"):
        resolve_tracking_uri("", {}, default_dir=copy)
    assert resolve_tracking_uri("", {"MLFLOW_TRACKING_URI": "http://h:5000"}, default_dir=copy) == "http://h:5000"
    # Outside Ray's copy a training job (a writer) still gets the embedded store.
    assert resolve_tracking_uri("", {}, default_dir=tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"


def test_the_local_stack_starts_its_ray_head_with_its_mlflow_server_and_prints_every_export(tmp_path):
    from infra.local.stack import LocalStack

    stack = LocalStack(tmp_path, mlflow_port=5123)
    assert stack.head_env()["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5123"
    report = stack.status().report()
    assert "export MLFLOW_TRACKING_URI=http://127.0.0.1:5123" in report
    # a client needs the mode and the token the head was started with (the stack's own file)
    assert "export RAY_AUTH_MODE=token" in report and f"export RAY_AUTH_TOKEN_PATH={tmp_path / 'auth_token'}" in report
    assert stack.head_env()["RAY_AUTH_TOKEN_PATH"] == str(tmp_path / "auth_token")


# ---------------------------------------------------------------------------------------------- data


def test_training_refuses_a_manifest_without_samples_before_ray_starts(tmp_path):
    ray = pytest.importorskip("ray")
    from pipeline.data.manifest import HoleRatioHistogram, Manifest, ManifestError, SourceDescription, Watermark, write_manifest
    from pipeline.train.launch import run_training

    empty = Manifest(kind="train", dataset_version="1", config={}, shards=[], total_samples=0, total_bytes=0,
                     source=SourceDescription(kind="file_list", url="/d/list.txt", items=606, list_sha256="0" * 64),
                     hole_ratio_histogram=HoleRatioHistogram.empty(), watermark=Watermark(keys_count=0, keys_sha256="0" * 64))
    url = write_manifest(empty, str(tmp_path / "train-v1"))
    config = TrainJobConfig.model_validate(json.loads(json.dumps({
        "model": {"arch": "rn"}, "data": {"train_manifest": url, "eval_manifest": url, "crop_size": 64},
        "train": {"max_steps": 1, "batch_size": 1}, "scaling": {"num_workers": 1, "use_gpu": False},
        "run": {"name": "empty", "storage_path": str(tmp_path / "ckpt")},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    })))
    with pytest.raises(ManifestError, match=r"^config key data.train_manifest: manifest .* holds no samples"):
        run_training(config)
    assert not ray.is_initialized() and not (tmp_path / "mlflow.db").exists()


# ---------------------------------------------------------------------------------------------- the demo


def test_the_demo_picture_shows_the_input_with_its_hole_each_model_and_the_truth_captioned_with_steps():
    import numpy as np
    import torch

    from jobs.demo import comparison_picture
    from pipeline.tracking import to_hwc_uint8

    image = torch.linspace(0, 1, 64 * 96).reshape(1, 1, 64, 96).repeat(1, 3, 1, 1)
    mask = torch.zeros(1, 1, 64, 96)
    mask[..., 16:48, 24:72] = 1
    rn, lbam = torch.full_like(image, 0.5), torch.full_like(image, 0.25)

    picture = comparison_picture(image, mask, [("RN", 4, rn), ("LBAM", 2, lbam)])

    band, gap, w = 22, 4, 96
    assert picture.shape == (band + 64, 4 * w + 3 * gap, 3)
    tiles = [picture[band:, i * (w + gap): i * (w + gap) + w] for i in range(4)]
    assert (tiles[0][16:48, 24:72] == 255).all()  # the hole, white, in the input
    assert np.array_equal(tiles[0][:16], to_hwc_uint8(image)[:16])
    assert np.array_equal(tiles[1], to_hwc_uint8(rn)) and np.array_equal(tiles[2], to_hwc_uint8(lbam))
    assert np.array_equal(tiles[3], to_hwc_uint8(image))  # the truth
    captions = [picture[:band, i * (w + gap): i * (w + gap) + w] for i in range(4)]
    assert all((caption < 128).any() for caption in captions)  # every tile says what it is
    assert not np.array_equal(captions[1], captions[2])  # "RN after 4 steps" vs "LBAM after 2 steps"


def test_artifacts_of_a_local_store_live_beside_it_not_in_the_current_directory(tmp_path, monkeypatch):
    from pipeline.tracking import get_or_create_experiment, mlflow_client

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    client = mlflow_client(uri)
    run = client.create_run(get_or_create_experiment(client, "holefill demo"))
    client.log_text(run.info.run_id, "hello", "note.txt")

    assert (tmp_path / "store" / "mlartifacts" / "holefill_demo" / run.info.run_id / "artifacts" / "note.txt").is_file()
    assert not (elsewhere / "mlruns").exists()
