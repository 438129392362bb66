"""MLflow tracking: URI resolution, fail-fast server check, redaction, run tracking against a real server,
transient failures, sample grids, and the generator log/register/load round trip in a fresh process."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from models.registry import get_architecture
from pipeline.lifecycle.packaging import load_generator, load_generator_record, log_and_register_generator
from pipeline.tracking import (
    REDACTED,
    ManifestInput,
    RunTracker,
    check_tracking_server,
    is_secret_name,
    redact,
    resolve_tracking_uri,
    sample_grid,
    to_hwc_uint8,
    version_model_id,
)

from support.serving_helpers import TINY_RN

REPO = Path(__file__).resolve().parents[1]


def _closed_port_uri() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


# ----------------------------------------------------------------------------------------------------
# URI resolution and server check


def test_tracking_uri_prefers_config_then_environment_then_local_sqlite(tmp_path):
    env = {"MLFLOW_TRACKING_URI": "http://env:5000"}
    assert resolve_tracking_uri("http://cfg:5000", env) == "http://cfg:5000"
    assert resolve_tracking_uri(None, env) == "http://env:5000"
    assert resolve_tracking_uri("", env) == "http://env:5000"
    assert resolve_tracking_uri(None, {}, default_dir=tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"


def test_unreachable_server_is_one_line_error_naming_the_uri_without_its_password():
    uri = _closed_port_uri().replace("http://", "http://alice:hunter2@")
    with pytest.raises(ValueError, match="unreachable") as err:
        check_tracking_server(uri, timeout_s=2)
    message = str(err.value)
    assert "\n" not in message and "hunter2" not in message and "alice:***@127.0.0.1" in message


def test_sqlite_store_in_a_missing_folder_is_refused(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        check_tracking_server(f"sqlite:///{tmp_path}/nope/mlflow.db")
    check_tracking_server(f"sqlite:///{tmp_path}/mlflow.db")


# ----------------------------------------------------------------------------------------------------
# Redaction


def test_redact_masks_passwords_in_urls_and_secret_assignments():
    assert redact("s3://AKIA123:s3cr3t@bucket/data") == f"s3://AKIA123:{REDACTED}@bucket/data"
    assert redact("postgresql://mlflow:pw@db:5432/mlflow") == f"postgresql://mlflow:{REDACTED}@db:5432/mlflow"
    assert redact("https://h/x?X-Amz-Signature=abc&region=eu") == f"https://h/x?X-Amz-Signature={REDACTED}&region=eu"
    assert redact("--aws_secret_access_key=xyz --steps=3") == f"--aws_secret_access_key={REDACTED} --steps=3"
    assert redact("s3://bucket/plain/path.tar") == "s3://bucket/plain/path.tar"


def test_a_long_value_is_redacted_like_a_short_one_in_one_pass():
    # A run of name characters is scanned once, wherever a match could start in it: 100,000 characters take
    # milliseconds (a 10,000-character parameter once took 19 s, backtracking from every position of the run).
    long_run = "x" * 100_000
    assert redact(long_run) == long_run
    assert redact(f"{long_run}token=abc s3://u:pw@{long_run}") == f"{long_run}token={REDACTED} s3://u:{REDACTED}@{long_run}"
    assert redact(f"1{long_run}://u:pw@h") == f"1{long_run}://u:{REDACTED}@h"  # a scheme starts at a letter


def test_redact_masks_values_under_secret_keys_recursively_without_touching_the_input():
    config = {
        "data": {"train_manifest": "s3://u:p@b/m.json", "storage_options": {"key": "AKIA", "secret": "s", "anon": False}},
        "aws_access_key_id": "AKIA", "MLFLOW_TRACKING_TOKEN": "t", "db": {"password": "pw"},
        "sort_keys": True, "monkey": "banana", "steps": [1, "https://a:b@c"],
    }
    clean = redact(config)
    assert clean["data"]["storage_options"] == {"key": REDACTED, "secret": REDACTED, "anon": False}
    assert clean["data"]["train_manifest"] == f"s3://u:{REDACTED}@b/m.json"
    assert clean["aws_access_key_id"] == clean["MLFLOW_TRACKING_TOKEN"] == clean["db"]["password"] == REDACTED
    assert clean["sort_keys"] is True and clean["monkey"] == "banana"
    assert clean["steps"] == [1, f"https://a:{REDACTED}@c"]
    assert config["db"]["password"] == "pw"  # input unchanged


@pytest.mark.parametrize("name,secret", [
    ("aws_access_key_id", True), ("storage_options.secret", True), ("apiKey", True), ("refresh_token", True),
    ("sort_keys", False), ("keyword", False), ("data.key_prefix", True), ("tokenizer", False),
])
def test_secret_names_match_on_word_parts(name, secret):
    assert is_secret_name(name) is secret


# ----------------------------------------------------------------------------------------------------
# Images


def test_sample_grid_rows_are_samples_and_columns_input_masked_output_truth():
    b, h, w = 3, 8, 10
    image, output, truth = torch.full((b, 3, h, w), 0.25), torch.full((b, 3, h, w), 0.5), torch.ones(b, 3, h, w)
    mask = torch.zeros(b, 1, h, w)
    mask[:, :, :4] = 1
    grid = sample_grid(image, mask, output, truth, max_rows=2, gap=2)
    assert grid.shape == (2 * h + 2, 4 * w + 3 * 2, 3) and grid.dtype == np.uint8
    second_row = grid[h + 2:]
    assert (second_row[:, :w] == 64).all()  # input
    assert (second_row[:4, w + 2: 2 * w + 2] == 255).all() and (second_row[4:h, w + 2: 2 * w + 2] == 64).all()
    assert (second_row[:, 2 * (w + 2): 2 * (w + 2) + w] == 128).all()  # output


def test_every_picture_draws_the_hole_one_way():
    from pipeline.pictures import HOLE_FILL, show_hole

    image, mask = torch.full((1, 3, 4, 4), 0.25), torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1
    shown = show_hole(image, mask)
    assert (shown[..., :2, :] == HOLE_FILL).all() and (shown[..., 2:, :] == 0.25).all()
    grid = sample_grid(image, mask, image, image, max_rows=1, gap=0)
    assert (grid[:2, 4:8] == round(HOLE_FILL * 255)).all()  # the grid's "masked" column uses it too


def test_images_convert_from_chw_float_and_hwc_uint8():
    chw = torch.zeros(3, 4, 5)
    chw[0] = 1.0
    hwc = to_hwc_uint8(chw)
    assert hwc.shape == (4, 5, 3) and (hwc[..., 0] == 255).all() and (hwc[..., 1] == 0).all()
    gray = np.arange(6, dtype=np.uint8).reshape(2, 3)
    assert to_hwc_uint8(gray).shape == (2, 3, 3)
    with pytest.raises(ValueError, match="CHW or HW"):
        to_hwc_uint8(torch.zeros(2, 2, 3, 4, 5))


# ----------------------------------------------------------------------------------------------------
# Run tracking against a real server


def mlflow_client(uri):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def test_run_tracker_logs_redacted_truncated_params_metrics_images_and_tags(mlflow_server):
    tracker = RunTracker.start_or_resume(mlflow_server, "tracking-test", "run-a", tags={"arch": "rn"})
    tracker.log_params({"data.train_manifest": "s3://k:secret@b/m.json", "data.storage_options.secret": "s",
                        "train.lr": 1e-4, "long": "x" * 10_000, "list": [1, 2]})
    for step in range(3):
        tracker.log_metrics({"loss/g": 1.0 / (step + 1), "psnr/0.01-0.10": 20.0 + step}, step=step)
    tracker.log_image(torch.rand(3, 8, 8), "samples/step_00000002.png", step=2)
    tracker.set_tags({"dataset_version": "v1", "token": "abc"})
    tracker.finish()

    run = mlflow_client(mlflow_server).get_run(tracker.run_id)
    params = run.data.params
    assert params["data.train_manifest"] == f"s3://k:{REDACTED}@b/m.json"
    assert params["data.storage_options.secret"] == REDACTED
    assert params["train.lr"] == "0.0001" and params["list"] == "[1, 2]"
    assert len(params["long"]) == 6000 and params["long"].endswith("[truncated]")
    history = mlflow_client(mlflow_server).get_metric_history(tracker.run_id, "loss/g")
    assert [(m.step, round(m.value, 4)) for m in history] == [(0, 1.0), (1, 0.5), (2, 0.3333)]
    assert run.data.tags["dataset_version"] == "v1" and run.data.tags["token"] == REDACTED
    assert run.data.tags["arch"] == "rn" and run.info.status == "FINISHED"
    artifacts = [a.path for a in mlflow_client(mlflow_server).list_artifacts(tracker.run_id, "samples")]
    assert artifacts == ["samples/step_00000002.png"]


def test_same_run_name_resumes_the_same_run_and_params_are_idempotent(mlflow_server, caplog):
    first = RunTracker.start_or_resume(mlflow_server, "resume-test", "job-1")
    first.log_params({"train.max_steps": 10, "train.batch_size": 2})
    first.log_metrics({"loss": 1.0}, step=1)
    first.finish("FAILED")

    with caplog.at_level(logging.WARNING, logger="pipeline.tracking"):
        again = RunTracker.start_or_resume(mlflow_server, "resume-test", "job-1")
        assert again.run_id == first.run_id
        assert mlflow_client(mlflow_server).get_run(again.run_id).info.status == "RUNNING"
        again.log_params({"train.max_steps": 10, "train.batch_size": 4, "train.seed": 7})
        again.log_metrics({"loss": 0.5}, step=2)
        again.finish()
    assert "train.batch_size changed on resume" in caplog.text
    run = mlflow_client(mlflow_server).get_run(first.run_id)
    assert run.data.params == {"train.max_steps": "10", "train.batch_size": "2", "train.seed": "7"}
    assert [m.step for m in mlflow_client(mlflow_server).get_metric_history(first.run_id, "loss")] == [1, 2]
    other = RunTracker.start_or_resume(mlflow_server, "resume-test", "job-2")
    assert other.run_id != first.run_id
    other.finish()


class _FlakyClient:
    """A real MlflowClient whose first ``fail_batches`` log_batch calls and every log_image call fail."""

    def __init__(self, real, fail_batches: int):
        self._real, self.fail_batches, self.calls = real, fail_batches, 0

    def __getattr__(self, name):
        return getattr(self._real, name)

    def log_batch(self, *args, **kwargs):
        self.calls += 1
        if self.calls <= self.fail_batches:
            raise ConnectionError("simulated outage")
        return self._real.log_batch(*args, **kwargs)

    def log_image(self, *args, **kwargs):
        raise ConnectionError("simulated outage")


def test_transient_failures_buffer_metrics_retry_and_drop_images_after_max_attempts(mlflow_server, caplog):
    run_id = RunTracker.start_or_resume(mlflow_server, "flaky-test", "flaky").run_id
    flaky = _FlakyClient(mlflow_client(mlflow_server), fail_batches=2)
    tracker = RunTracker(flaky, run_id, flush_interval_s=0.05, max_attempts=2)
    with caplog.at_level(logging.WARNING, logger="pipeline.tracking"):
        for step in range(5):
            tracker.log_metrics({"loss": float(step)}, step=step)  # never raises, never blocks
        tracker.log_image(np.zeros((4, 4, 3), np.uint8), "grid.png", step=0)
        assert tracker.flush(timeout_s=20)
        tracker.finish()
    assert [m.step for m in mlflow_client(mlflow_server).get_metric_history(run_id, "loss")] == [0, 1, 2, 3, 4]
    assert tracker.losses.operations_dropped == ["image grid.png@0"]
    assert "dropped image grid.png@0 after 2 failed attempts" in caplog.text


def test_dead_server_never_blocks_or_raises_into_training(monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    tracker = RunTracker.attach(_closed_port_uri(), "0" * 32, flush_interval_s=0.05, max_buffered_metrics=10,
                                finish_timeout_s=2)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="pipeline.tracking"):
        for step in range(25):
            tracker.log_metrics({"loss": 1.0}, step=step)
        assert time.monotonic() - started < 1.0
        assert not tracker.flush(timeout_s=0.5)  # a worker about to exit is told what it loses
        assert "still unsent after" in caplog.text
        tracker.finish()
    assert tracker.losses.metrics_dropped >= 15
    assert "metric buffer full" in caplog.text and "were not recorded" in caplog.text


# ----------------------------------------------------------------------------------------------------
# Model logging, registration, loading in a fresh process

_LOAD_SCRIPT = textwrap.dedent("""
    import sys, torch
    import mlflow
    from pipeline.lifecycle.packaging import load_generator
    mlflow.set_tracking_uri(sys.argv[1])
    generator, arch = load_generator(sys.argv[2])
    inputs = torch.load(sys.argv[3], weights_only=True)
    with torch.no_grad():
        out = generator(inputs["image"], inputs["mask"])
    torch.save({"out": out, "arch": arch, "training": generator.training}, sys.argv[4])
""")


def test_generator_round_trips_through_registry_into_a_fresh_process(mlflow_server, tmp_path):
    generator = get_architecture("rn").generator().eval()
    image, mask = torch.rand(1, 3, 16, 16), torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1
    import mlflow

    tracker = RunTracker.start_or_resume(mlflow_server, "model-test", "rn-model")
    tracker.log_params({"train.lr": 1e-4, "model.arch": "rn"})
    tracker.log_metrics({"train/g_loss": 2.0, "val/psnr": 18.5}, step=5)
    tracker.log_metrics({"train/g_loss": 1.5}, step=10)  # val/psnr's last value stays the one of step 5
    tracker.log_manifests([ManifestInput("s3://bucket/places2/v3/manifest.json", "ab" * 32, "training", "3"),
                           ManifestInput("/data/eval/manifest.json", "cd" * 32, "validation")])
    assert tracker.flush(timeout_s=30)
    global_state = (mlflow.get_tracking_uri(), mlflow.get_registry_uri(), os.environ.get("MLFLOW_TRACKING_URI"),
                    os.environ.get("MLFLOW_REGISTRY_URI"))
    version = log_and_register_generator(mlflow_server, tracker.run_id, generator, image, mask,
                                         "rn-roundtrip", tags={"dataset_version": "v7", "password": "x"}, arch="rn",
                                         step=10)
    tracker.finish()
    # MLflow's fluent state (and the environment it exports) is as it was: the library leaks no configuration.
    assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri(), os.environ.get("MLFLOW_TRACKING_URI"),
            os.environ.get("MLFLOW_REGISTRY_URI")) == global_state
    assert mlflow.active_run() is None
    assert version.version == "1" and version.run_id == tracker.run_id
    assert version.tags["holefill.arch"] == "rn" and version.tags["dataset_version"] == "v7"
    assert version.tags["password"] == REDACTED
    # MLflow 3's logged model: the run's params, the final step, the run's metrics at their last values; the run
    # lists it as its output at that step, in the run's own experiment.
    client = mlflow_client(mlflow_server)
    logged = client.get_logged_model(version_model_id(version))
    run = client.get_run(tracker.run_id)
    assert logged.source_run_id == tracker.run_id and logged.experiment_id == run.info.experiment_id
    assert logged.params["train.lr"] == "0.0001" and logged.params["model.arch"] == "rn"
    assert sorted((m.key, m.step, m.value) for m in logged.metrics) == [("train/g_loss", 10, 1.5), ("val/psnr", 5, 18.5)]
    assert [(o.model_id, o.step) for o in run.outputs.model_outputs] == [(logged.model_id, 10)]
    # The manifests the run read are its dataset inputs: source = manifest URL, digest = its hash (MLflow keeps 36).
    inputs = {[t.value for t in i.tags if t.key == "mlflow.data.context"][0]: i.dataset for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"training", "validation"}
    assert json.loads(inputs["training"].source) == {"uri": "s3://bucket/places2/v3/manifest.json"}
    assert inputs["training"].source_type == "s3" and inputs["training"].name == "v3"
    assert inputs["training"].digest == ("ab" * 32)[:36]
    assert json.loads(inputs["training"].profile) == {"manifest_sha256": "ab" * 32, "dataset_version": "3"}
    assert inputs["validation"].source_type == "local" and inputs["validation"].name == "eval"

    with torch.no_grad():
        expected = generator(image, mask)
    torch.save({"image": image, "mask": mask}, tmp_path / "inputs.pt")
    mlflow_client(mlflow_server).set_registered_model_alias("rn-roundtrip", "champion", "1")
    script = tmp_path / "load.py"
    script.write_text(_LOAD_SCRIPT)
    subprocess.run([sys.executable, str(script), mlflow_server, "models:/rn-roundtrip@champion",
                    str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")], check=True, cwd=REPO, timeout=300,
                   env={**os.environ, "PYTHONPATH": str(REPO)})  # this checkout's code, not another install's
    result = torch.load(tmp_path / "out.pt", weights_only=True)
    assert result["arch"] == "rn" and result["training"] is False
    torch.testing.assert_close(result["out"], expected, atol=1e-5, rtol=0)


def test_loading_a_registered_model_leaves_no_download_behind(mlflow_server, tmp_path, monkeypatch):
    tracker = RunTracker.start_or_resume(mlflow_server, "model-test", "rn-download")
    image, mask = torch.rand(1, 3, 16, 16), torch.zeros(1, 1, 16, 16)
    mask[..., 4:8, 4:8] = 1
    version = log_and_register_generator(mlflow_server, tracker.run_id, get_architecture("rn").generator().eval(),
                                         image, mask, "rn-download", arch="rn")
    tracker.finish()
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    generator, arch = load_generator(f"models:/rn-download/{version.version}", mlflow_server)
    assert arch == "rn" and not generator.training
    assert list(scratch.iterdir()) == []


def test_loading_a_model_that_does_not_exist_is_a_clear_error(mlflow_server):
    with pytest.raises(ValueError, match="cannot load model models:/no-such-model@champion"):
        load_generator("models:/no-such-model@champion", mlflow_server)


def test_a_generator_registers_into_a_local_sqlite_store_whatever_the_process_points_at(tmp_path, monkeypatch):
    # make demo and a laptop register into sqlite:///<cwd>/mlflow.db; MLflow's local registry looks a logged model
    # up in the process-wide store, so the caller's URI must reach it (and be put back afterwards).
    monkeypatch.chdir(tmp_path)  # a local store keeps its artifacts under ./mlruns
    elsewhere = f"sqlite:///{tmp_path}/elsewhere.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere)
    store = f"sqlite:///{tmp_path}/mlflow.db"
    torch.manual_seed(0)
    generator = get_architecture("rn").generator(**TINY_RN).eval()
    image, mask = torch.rand(1, 3, 32, 32), torch.zeros(1, 1, 32, 32)
    mask[..., 8:16, 8:16] = 1
    tracker = RunTracker.start_or_resume(store, "local-store", "rn-local")
    try:
        version = log_and_register_generator(store, tracker.run_id, generator, image, mask, "local-rn", arch="rn",
                                             generator_kwargs=TINY_RN)
    finally:
        tracker.finish()
    assert str(version.version) == "1" and os.environ["MLFLOW_TRACKING_URI"] == elsewhere
    record = load_generator_record("models:/local-rn/1", store)
    assert record.kwargs == TINY_RN
    assert all(torch.equal(record.state_dict[k], v) for k, v in generator.state_dict().items())
