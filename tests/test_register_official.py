"""The authors' released generators into the registry (``jobs/register_official.py``): files in the forms the
official code saves, written from the pattern weights (whose official outputs ``tests/data/official_pattern_A.pt``
holds), become versions with their provenance that compute the official outputs, serve through
``mlflow models serve`` and start a fine-tune through ``model.init_weights: models:/<name>/<N>``."""

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
from pipeline.lifecycle.training import resolve_init_weights
from pipeline.train.config import load_train_config
from pipeline.train.loop import initial_generator
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


def test_an_official_data_parallel_lbam_file_reads_as_the_official_network(released):
    # What registration packages (the RN test above shows the registry keeps it exactly): the authors' DataParallel
    # keys are read as holefill's, and the network computes the official outputs.
    record = read_generator(str(released["lbam_data_parallel"]), arch="lbam")
    converted = from_official("lbam", "generator", official_pattern_state_dict("lbam", "generator"))
    assert record.arch == "lbam" and record.kwargs == {} and record.state_dict.keys() == converted.keys()
    assert all(torch.equal(record.state_dict[k], v) for k, v in converted.items())
    assert torch.equal(pattern_forward(record), pattern_forward(GeneratorRecord("lbam", {}, converted)))


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
def test_a_registered_official_rn_is_where_a_fine_tune_starts(mlflow_server, released, tmp_path, capsys):
    # The driver's half of ``model.init_weights: models:/official-rn/N`` (resolved to a record file under the run's
    # storage) and the workers' half (every rank loads that file); a Ray Train run from a registered version:
    # tests/test_lifecycle_e2e.py (retraining fine-tunes the champion).
    version = _register(mlflow_server, "rn", released["rn_plain"], "official-rn", capsys)
    config = load_train_config(REPO / "jobs" / "configs" / "train_rn_cpu_tiny.yaml", [
        f"model.init_weights=models:/official-rn/{version}", f"mlflow.tracking_uri={mlflow_server}",
        "run.name=finetune-official", f"run.storage_path={tmp_path / 'ray_results'}"])
    resolved = resolve_init_weights(config)
    assert resolved.model.init_weights == str(tmp_path / "ray_results" / "finetune-official" / "init_generator.pt")
    start = initial_generator(resolved)
    assert start.provenance["init_from"] == f"models:/official-rn/{version}"
    assert start.provenance["kind"] == "official release" and start.arch == "rn" and start.kwargs == {}
    converted = from_official("rn", "generator", official_pattern_state_dict("rn", "generator"))
    assert all(torch.equal(start.state_dict[k], v) for k, v in converted.items())
    # A version of another network is refused before anything trains, in one line.
    other = load_train_config(REPO / "jobs" / "configs" / "train_lbam_cpu_tiny.yaml", [
        f"model.init_weights=models:/official-rn/{version}", f"mlflow.tracking_uri={mlflow_server}",
        f"run.storage_path={tmp_path}"])
    with pytest.raises(ValueError, match="model.init_weights") as refused:
        resolve_init_weights(other)
    assert "\n" not in str(refused.value)
