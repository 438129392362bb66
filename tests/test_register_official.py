"""The authors' released generators into the registry (``jobs/register_official.py``): files in the forms the
official code saves, written from the pattern weights (whose official outputs ``tests/data/official_pattern_A.pt``
holds), become versions with their provenance that compute the official outputs, serve through
``mlflow models serve`` and fine-tune through ``model.init_weights: models:/<name>/<N>``."""

from __future__ import annotations

import base64
import hashlib
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from jobs import register_official as register_job
from pipeline.generators import read_generator
from models.convert import from_official
from models.record import GeneratorRecord
from pipeline.lifecycle.official import PAPERS, pattern_forward
from pipeline.lifecycle.packaging import load_generator_record
from support.pattern_weights import official_pattern_state_dict
from support.serving_helpers import decode, encode, environment_without_holefill, hole_mask, photo

REPO = Path(__file__).resolve().parents[1]
MLFLOW = Path(sys.executable).with_name("mlflow")


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """Official-format generator files: RN plain and wrapped as its training script saves it, LBAM DataParallel."""
    folder = tmp_path_factory.mktemp("official")
    rn, lbam = official_pattern_state_dict("rn", "generator"), official_pattern_state_dict("lbam", "generator")
    files = {"rn_plain": (folder / "rn_places2.pth", rn),
             "rn_wrapped": (folder / "rn_G_100000.pth", {"iteration": 100000, "generator": rn}),
             "lbam_data_parallel": (folder / "LBAM_G_500.pth", {f"module.{k}": v for k, v in lbam.items()})}
    for path, payload in files.values():
        torch.save(payload, path)
    return {key: path for key, (path, _) in files.items()}


def _register(mlflow_server: str, arch: str, path: Path, model: str, capsys) -> str:
    assert register_job.main(["--arch", arch, "--weights", str(path), "--model", model,
                              "--set", f"tracking_uri={mlflow_server}"]) == 0
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert out.startswith(f"official {arch} release {path}"), out
    return out.rsplit("/", 1)[1]


def _official_output_matches(model_uri: str, tracking_uri: str, arch: str) -> None:
    """The version holds exactly the converted official pattern weights (which compute the official outputs:
    tests/test_every_architecture.py) and its module, built from the registry, computes what they compute."""
    converted = from_official(arch, "generator", official_pattern_state_dict(arch, "generator"))
    record = load_generator_record(model_uri, tracking_uri)
    assert record.arch == arch and record.state_dict.keys() == converted.keys()
    assert all(torch.equal(record.state_dict[k], v) for k, v in converted.items())
    assert torch.equal(pattern_forward(record), pattern_forward(GeneratorRecord(arch, {}, converted)))


@pytest.mark.e2e
def test_official_rn_files_become_versions_with_provenance_computing_the_official_outputs(mlflow_server, released,
                                                                                          capsys):
    version = _register(mlflow_server, "rn", released["rn_plain"], "official-rn", capsys)
    tags = mlflow.MlflowClient(mlflow_server).get_model_version("official-rn", version).tags
    sha = hashlib.sha256(released["rn_plain"].read_bytes()).hexdigest()
    assert tags["holefill.provenance.kind"] == "official release" and tags["holefill.provenance.sha256"] == sha
    assert tags["holefill.provenance.source"] == str(released["rn_plain"])
    assert tags["holefill.provenance.paper"] == PAPERS["rn"] and tags["holefill.arch"] == "rn"
    record = load_generator_record(f"models:/official-rn/{version}", mlflow_server)
    assert record.provenance["sha256"] == sha and record.kwargs == {}
    _official_output_matches(f"models:/official-rn/{version}", mlflow_server, "rn")

    # The same file again: reported, not registered twice. The wrapped file (other bytes): a version of its own.
    assert _register(mlflow_server, "rn", released["rn_plain"], "official-rn", capsys) == version
    wrapped = _register(mlflow_server, "rn", released["rn_wrapped"], "official-rn", capsys)
    assert wrapped != version
    _official_output_matches(f"models:/official-rn/{wrapped}", mlflow_server, "rn")


@pytest.mark.e2e
def test_an_official_data_parallel_lbam_file_becomes_a_version(mlflow_server, released, capsys):
    version = _register(mlflow_server, "lbam", released["lbam_data_parallel"], "official-lbam", capsys)
    _official_output_matches(f"models:/official-lbam/{version}", mlflow_server, "lbam")
    # The same file given to any --model reads as the same network (the authors' keys are holefill's for LBAM).
    direct = read_generator(str(released["lbam_data_parallel"]), arch="lbam")
    registered = load_generator_record(f"models:/official-lbam/{version}", mlflow_server)
    assert direct.kwargs == {} and all(torch.equal(direct.state_dict[k], v) for k, v in registered.state_dict.items())


@pytest.mark.e2e
def test_files_that_are_not_official_generators_are_refused_in_one_line(mlflow_server, released, tmp_path, capsys):
    torch.save({"x": torch.zeros(2)}, tmp_path / "other.pth")
    for args, message in (
            (["--arch", "lbam", "--weights", str(released["rn_plain"])], "not an official LBAM generator"),
            (["--arch", "rn", "--weights", str(tmp_path / "other.pth")], "not an official RN generator"),
            (["--arch", "rn", "--weights", str(tmp_path / "missing.pth")], "no such file"),
            (["--arch", "rn", "--weights", str(released["rn_plain"]), "--promote"], "pass --eval-manifest")):
        assert register_job.main([*args, "--set", f"tracking_uri={mlflow_server}"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _served(model_uri: str, tracking_uri: str, cwd: Path):
    """``mlflow models serve`` of ``model_uri`` where holefill cannot be imported; yields its URL."""
    env = {**environment_without_holefill(cwd / "site", REPO), "MLFLOW_TRACKING_URI": tracking_uri,
           "OMP_NUM_THREADS": "2"}
    port = _free_port()
    with open(cwd / "serve.log", "wb") as log:
        server = subprocess.Popen([str(MLFLOW), "models", "serve", "-m", model_uri, "--env-manager", "local",
                                   "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                  cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 300
            while not _answers(f"http://127.0.0.1:{port}/ping"):
                assert server.poll() is None and time.monotonic() < deadline, (cwd / "serve.log").read_text()[-3000:]
                time.sleep(0.5)
            yield f"http://127.0.0.1:{port}"
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)


@pytest.mark.e2e
def test_a_registered_official_rn_serves_through_mlflow_models_serve(mlflow_server, released, tmp_path, capsys):
    version = _register(mlflow_server, "rn", released["rn_plain"], "official-rn", capsys)
    pixels, hole = photo(96, 128), hole_mask(96, 128)
    body = json.dumps({"dataframe_split": {"columns": ["image", "mask"], "data": [
        [base64.b64encode(encode(pixels)).decode(), base64.b64encode(encode(hole)).decode()]]}}).encode()
    with _served(f"models:/official-rn/{version}", mlflow_server, tmp_path) as url:
        request = urllib.request.Request(f"{url}/invocations", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as response:
            result = decode(base64.b64decode(json.loads(response.read())["predictions"][0]["image"]))
    assert result.shape == (96, 128, 3) and np.array_equal(result[hole == 0], pixels[hole == 0])


@pytest.mark.e2e
def test_a_registered_official_rn_fine_tunes_through_init_weights(mlflow_server, ray_driver, released, tmp_path, capsys):
    from pipeline.data.sample_data import generate_sample_dataset
    from pipeline.data.shardjob.run import ShardJobConfig, run_shard_job
    from pipeline.lifecycle.training import train_and_register
    from pipeline.train.config import load_train_config

    version = _register(mlflow_server, "rn", released["rn_plain"], "official-rn", capsys)
    sample = generate_sample_dataset(str(tmp_path / "places"), n_train=4, n_val=12, size=(96, 80),
                                     include_package_photos=False)
    train = run_shard_job(ShardJobConfig.model_validate({"source": {"url": sample.train_root}, "out": str(tmp_path / "train"),
                                                         "samples_per_shard": 4, "store_size": 64}))
    evaluation = run_shard_job(ShardJobConfig.model_validate({
        "source": {"url": sample.val_list, "root": sample.val_root}, "out": str(tmp_path / "eval"),
        "samples_per_shard": 3, "store_size": 64, "eval": {"enabled": True, "per_bucket": 1}}))
    (tmp_path / "train.yaml").write_text(textwrap.dedent(f"""
        model: {{arch: rn, init_weights: "models:/official-rn/{version}"}}
        data: {{train_manifest: {train.manifest_url}, eval_manifest: {evaluation.manifest_url}, crop_size: 64,
                loader_workers: 0, eval_batch_size: 3}}
        train: {{max_steps: 1, batch_size: 1, log_every: 1, ckpt_every: 0, val_every: 0}}
        scaling: {{num_workers: 1, use_gpu: false}}
        run: {{name: finetune-official, storage_path: {tmp_path / 'ray_results'}}}
        mlflow: {{tracking_uri: {mlflow_server}, experiment: holefill-official-finetune, registered_model: tuned-rn}}
    """))
    result = train_and_register(load_train_config(tmp_path / "train.yaml"))
    start = read_generator(str(tmp_path / "ray_results" / "finetune-official" / "init_generator.pt"))
    assert start.provenance["init_from"] == f"models:/official-rn/{version}"
    assert start.provenance["kind"] == "official release"
    tuned = load_generator_record(f"models:/tuned-rn/{result.model_version}", mlflow_server)
    assert tuned.provenance["kind"] == "training run" and tuned.arch == "rn" and tuned.kwargs == {}
    # One step from the official weights: close to them, not equal (it trained), nothing like a fresh network.
    moved = [float((tuned.state_dict[k] - v).abs().max()) for k, v in start.state_dict.items() if v.is_floating_point()]
    assert max(moved) > 0 and max(moved) < 0.1
