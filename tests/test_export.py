"""Export with torch.export (ExportedProgram) and its ONNX exporter: dynamic sizes, checked against eager, logged."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from models.registry import get_architecture
from pipeline.lifecycle.exporting import (
    CompositedGenerator,
    export_program,
    verification_sizes,
    verify_export,
    write_export,
)
from support.serving_helpers import TINY, register_tiny

REPO = Path(__file__).resolve().parents[1]
# The real architectures at sizes a 2-core machine exports in seconds: RN with one residual block, LBAM at 1/8 width.


@pytest.fixture(scope="module")
def generators():
    torch.manual_seed(0)
    return {arch: get_architecture(arch).generator(**kwargs).eval() for arch, kwargs in TINY.items()}


@pytest.fixture(scope="module")
def programs(generators):
    """One torch.export per architecture, exported with every deprecation turned into an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        warnings.simplefilter("error", FutureWarning)
        return {arch: export_program(generator, arch) for arch, generator in generators.items()}


@pytest.mark.parametrize("fmt", ["exported_program", "onnx"])
@pytest.mark.parametrize("arch", ["rn", "lbam"])
def test_exports_match_eager_within_1e_4_at_three_sizes(generators, programs, tmp_path, arch, fmt):
    path = write_export(programs[arch], fmt, tmp_path / f"{arch}.{'pt2' if fmt == 'exported_program' else fmt}")
    diffs = verify_export(path, fmt, generators[arch], arch, tolerance=1e-4)
    side = max(64, get_architecture(arch).size_multiple)
    assert sorted(diffs) == sorted(verification_sizes(arch)) == sorted([(side, side), (side, 2 * side),
                                                                         (3 * side, side)])
    assert max(diffs.values()) <= 1e-4


def test_the_exported_program_is_the_composited_inpainting_at_any_batch_and_size(generators, programs):
    rn = generators["rn"]
    exported = programs["rn"].module()  # what is saved (its file round trip: the test above)
    for batch, (height, width) in [(1, (32, 48)), (3, (12, 16))]:  # 12: RN's smallest (reflection padding)
        image, mask = torch.rand(batch, 3, height, width), torch.zeros(batch, 1, height, width)
        mask[..., 4:8, 0:4] = 1
        out = exported(image, mask)
        kept = (mask == 0).expand_as(image)
        assert torch.equal(out[kept], image[kept])
        torch.testing.assert_close(out, CompositedGenerator(rn)(image, mask))


def test_the_exported_program_refuses_a_size_the_architecture_does_not_take(programs):
    exported = programs["lbam"].module()
    with pytest.raises(Exception, match=r"(?i)guard|constraint|expected|size"):
        exported(torch.rand(1, 3, 128, 192), torch.zeros(1, 1, 128, 192))  # 192 is no multiple of 128


def test_an_export_that_does_not_match_is_refused_naming_the_size(programs, tmp_path):
    path = write_export(programs["lbam"], "exported_program", tmp_path / "lbam.pt2")
    torch.manual_seed(1)
    other = get_architecture("lbam").generator(**TINY["lbam"]).eval()
    with pytest.raises(ValueError, match=r"exported_program export differs from the eager generator by .* at 128x128"):
        verify_export(path, "exported_program", other, "lbam")


def test_the_export_path_uses_neither_torchscript_nor_the_torchscript_onnx_exporter():
    source = (REPO / "pipeline" / "lifecycle" / "exporting.py").read_text()
    code = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("#", "``", "back)")))
    for deprecated in ("torch.jit", "dynamo=False", "dynamic_axes"):
        assert deprecated not in code


@pytest.mark.e2e
def test_export_job_pins_the_alias_writes_verifies_and_logs_the_file_on_the_version(mlflow_server, tmp_path):
    from mlflow import MlflowClient

    name = "export-lbam"  # tiny LBAM: the job's path is the architecture's; its export takes seconds, RN's a minute
    version = register_tiny(mlflow_server, name, "lbam").version
    client = MlflowClient(mlflow_server)
    client.set_registered_model_alias(name, "champion", version)
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


def test_the_suite_fails_a_test_that_reaches_torchscript():
    with pytest.raises(DeprecationWarning, match="torch.export"):
        warnings.warn("`torch.jit.trace` is deprecated. Please switch to `torch.compile` or `torch.export`.",
                      DeprecationWarning, stacklevel=1)
