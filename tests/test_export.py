"""Export to TorchScript and ONNX: dynamic sizes, checked against the eager generator, logged on the version."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.registry import get_architecture
from pipeline.lifecycle.exporting import CompositedGenerator, export_generator, verification_sizes, verify_export
from support.serving_helpers import TINY_CHAMPION, TINY_RN

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rn():
    torch.manual_seed(0)
    return get_architecture("rn").generator(**TINY_RN).eval()


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_rn_exports_match_eager_within_1e_4_at_two_sizes_and_any_batch(rn, tmp_path, fmt):
    path = export_generator(rn, "rn", fmt, tmp_path / f"rn.{fmt}")
    diffs = verify_export(path, fmt, rn, "rn", tolerance=1e-4)
    assert sorted(diffs) == sorted(verification_sizes("rn")) == [(64, 64), (64, 128)]
    assert max(diffs.values()) <= 1e-4


def test_the_exported_graph_is_the_composited_inpainting(rn, tmp_path):
    path = export_generator(rn, "rn", "torchscript", tmp_path / "rn.pt")
    exported = torch.jit.load(str(path))
    image, mask = torch.rand(1, 3, 32, 48), torch.zeros(1, 1, 32, 48)
    mask[..., 8:16, 8:24] = 1
    out = exported(image, mask)
    assert torch.equal(out[(mask == 0).expand_as(image)], image[(mask == 0).expand_as(image)])
    torch.testing.assert_close(out, CompositedGenerator(rn)(image, mask))


def test_an_export_that_does_not_match_is_refused_naming_the_size(rn, tmp_path):
    path = export_generator(rn, "rn", "torchscript", tmp_path / "rn.pt")
    torch.manual_seed(1)
    other = get_architecture("rn").generator(**TINY_RN).eval()
    with pytest.raises(ValueError, match=r"torchscript export differs from the eager generator by .* at 64x64"):
        verify_export(path, "torchscript", other, "rn")


@pytest.mark.e2e
def test_export_job_pins_the_alias_writes_verifies_and_logs_the_file_on_the_version(mlflow_server, tiny_champion,
                                                                                   tmp_path):
    from mlflow import MlflowClient

    name, version = TINY_CHAMPION, tiny_champion
    client = MlflowClient(mlflow_server)
    done = subprocess.run([sys.executable, str(REPO / "jobs" / "export.py"), f"models:/{name}@champion",
                           "--format", "onnx", "--set", f"tracking_uri={mlflow_server}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / f"{name}-v{version}.onnx").is_file()
    tags = client.get_model_version(name, version).tags
    run_id = client.get_model_version(name, version).run_id
    assert tags["holefill.export.onnx"] == f"runs:/{run_id}/exports/v{version}/{name}-v{version}.onnx"
    assert float(tags["holefill.export.onnx.max_abs_diff"]) <= 1e-4
    assert [a.path for a in client.list_artifacts(run_id, f"exports/v{version}")] == \
        [f"exports/v{version}/{name}-v{version}.onnx"]
