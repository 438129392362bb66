"""The CPU-side logic of ``bench/gpu_check.py`` (the check ``make gpu-check`` runs), for RN and LBAM."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import gpu_check  # noqa: E402


def test_step_flops_count_forward_and_backward_convolutions():
    conv = torch.nn.Conv2d(3, 8, kernel_size=3, padding=1, bias=False)
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    forward = 2 * (2 * 8 * 16 * 16) * (3 * 3 * 3)  # 2 FLOPs per multiply-add, per output element

    def step():
        conv(x).sum().backward()

    # backward: one conv for the input gradient, one for the weight gradient
    assert gpu_check.step_flops(step) == 3 * forward


def _critic():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 1))


def _penalty_step(D, x):
    (gradients,) = torch.autograd.grad(D(x).sum(), x, create_graph=True)
    ((gradients.flatten(1).norm(dim=1) - 1) ** 2).mean().backward()


def test_the_gradient_penalty_is_counted_with_its_double_backward():
    """LBAM's penalty: ``autograd.grad`` on a leaf, then backward through it. Stock ``FlopCounterMode`` raises
    there (its module tracker); the step counter counts it, and agrees with the stock counter on the same
    maths with a non-leaf input, where the stock one works."""
    real = torch.rand(2, 3, 8, 8)
    D = _critic()
    counted = gpu_check.step_flops(lambda: _penalty_step(D, real.clone().requires_grad_(True)))
    with FlopCounterMode(display=False) as stock:
        _penalty_step(D, real.clone().requires_grad_(True) * 1.0)  # non-leaf: no tracker hook trouble
    assert counted == stock.get_total_flops()
    forward_only = gpu_check.step_flops(lambda: D(real))
    assert counted > 3 * forward_only  # forward, input gradient, and the double backward through both


def test_mfu_is_achieved_flops_over_the_bf16_peak():
    assert gpu_check.PEAK_BF16_FLOPS == 989e12
    assert gpu_check.mfu(989e9, steps_per_s=500.0) == pytest.approx(0.5)
    row = gpu_check.Row("rn bf16", batch=16, images_per_s=1600.0, flops_per_step=98.9e9, peak_gib=3.0,
                        syncs_per_step=0.0)
    assert row.mfu == pytest.approx(0.01)  # 100 steps/s x 98.9 GFLOP = 9.89 TFLOP/s


def _row(arch, batch, precision, images_per_s, zero_stage=0, switch=None, flops=1e12, **kw):
    case = gpu_check.Case(arch, batch, precision, zero_stage, switch)
    return gpu_check.Row(case.label, batch, images_per_s, flops, 1.5, 0.0, arch=arch, precision=precision,
                         zero_stage=zero_stage, switch=switch, **kw)


def test_the_table_shows_the_bf16_speed_up_and_each_variant_against_its_base():
    rows = [_row("rn", 16, "bf16", 250.0), _row("rn", 16, "fp32", 100.0), _row("rn", 16, "bf16", 200.0, zero_stage=2),
            _row("rn", 16, "bf16", 300.0, switch="channels_last")]
    table = gpu_check.format_table(rows).splitlines()
    assert table[0].split() == ["config", "batch", "img/s/GPU", "MFU", "peak", "GiB", "syncs/step", "bf16", "x",
                                "vs", "base", "row", "s"]
    assert len(table) == 2 + len(rows)
    assert table[2].split()[:2] == ["rn", "bf16"] and table[2].split()[-2] == "2.50"  # over the fp32 row
    assert table[4].split()[:4] == ["rn", "bf16", "ZeRO", "2"] and table[4].split()[-2] == "0.80"
    assert table[5].split()[-2] == "1.20"


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_rows_are_estimated_from_measured_flop_rates_and_skipped_when_they_do_not_fit():
    clock = _Clock()
    budget = gpu_check.Budget(100.0, start=0.0, clock=clock)
    estimator = gpu_check.Estimator(steps=10, warmup=3)
    assert estimator.estimate(gpu_check.Case("rn", 16, "bf16")) is None  # nothing known: the first row just runs
    # rn bf16 at batch 16: 1.6 TFLOP per step, 10 ms per step (160 TFLOP/s), 5 s of set-up
    estimator.record(_row("rn", 16, "bf16", 1600.0, flops=1.6e12, setup_s=5.0, step_s=0.01))
    assert estimator.estimate(gpu_check.Case("rn", 32, "bf16")) == pytest.approx(5.0 + 14 * 0.02)
    assert estimator.basis(gpu_check.Case("rn", 32, "bf16")) == "measured"
    fp32 = gpu_check.Case("rn", 16, "fp32")  # no fp32 row yet: the assumed fp32 rate
    assert estimator.estimate(fp32) == pytest.approx(5.0 + 14 * 1.6e12 / gpu_check.ASSUMED_FLOPS_PER_S["fp32"])
    assert estimator.basis(fp32) == "assumed"
    compiled = gpu_check.Case("rn", 16, "bf16", switch="compile_generator")
    assert estimator.estimate(compiled) == pytest.approx(5.0 + 0.14 + gpu_check.ASSUMED_COMPILE_S)
    clock.now = 95.0
    assert budget.fits(4.0) and not budget.fits(4.5)  # 1.2 x the estimate must fit in the 5 s left
    assert budget.stamp() == "[   95 s of 100]"


def test_rows_are_written_to_the_output_folder_as_they_are_measured(tmp_path):
    recorder = gpu_check.Recorder(tmp_path / "out", {"device": "test"})
    recorder.add(_row("lbam", 16, "bf16", 120.0))
    assert json.loads((tmp_path / "out" / "rows.jsonl").read_text())["label"] == "lbam bf16"
    assert "lbam bf16" in (tmp_path / "out" / "table.txt").read_text()
    recorder.note("zero: skipped lbam bf16 ZeRO 1")
    assert (tmp_path / "out" / "notes.txt").read_text() == "zero: skipped lbam bf16 ZeRO 1\n"
    assert json.loads((tmp_path / "out" / "meta.json").read_text()) == {"device": "test"}


def test_the_check_runs_on_the_cpu_for_both_models_and_the_gpu_tests_skip(tmp_path):
    """The check's logic for RN and LBAM (the essential bf16 rows, then the gpu tests, which collect and skip) at
    the tiny sizes of ``engine_probe`` (RN 32² with one residual block; LBAM at 1/16 width, 128², a stand-in VGG:
    the same step, gradient penalty included), in a subprocess (a DeepSpeed process group must not leak here)."""
    out = tmp_path / "check"
    command = [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--device", "cpu", "--tiny", "--batch", "1",
               "--size", "32", "--steps", "1", "--warmup", "0", "--sections", "essential", "tests",
               "--budget", "3600", "--out", str(out)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=850)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert [row["label"] for row in rows] == ["rn bf16", "lbam bf16"]
    assert all(row["flops_per_step"] > 0 and row["syncs_per_step"] == 0 and row["images_per_s"] > 0 for row in rows)
    table = (out / "table.txt").read_text().splitlines()
    assert [line.split()[:2] for line in table[2:]] == [["rn", "bf16"], ["lbam", "bf16"]]
    assert "lbam bf16" in result.stdout
    notes = (out / "notes.txt").read_text()
    assert "tests: exit 0" in notes and "skipped" in notes, notes  # every gpu test skips without CUDA
    assert "passed" not in (out / "tests.log").read_text()


def _args(**overrides):
    import argparse

    values = dict(archs=["rn", "lbam"], batch=16, batches=[8, 16, 32], precision="bf16", size=256, steps=10, warmup=3,
                  tiny=False)
    return argparse.Namespace(**{**values, **overrides})


def test_the_essential_rows_come_first_and_compiles_come_after_the_cheap_switches():
    assert gpu_check.SECTIONS[:2] == ("essential", "tests")
    cuda = torch.device("cuda")  # a device object only: nothing runs
    essential = gpu_check.section_cases("essential", _args(), cuda)
    assert [(s.arch, s.batch, s.precision) for s in essential] == [("rn", 16, "bf16"), ("lbam", 16, "bf16")]
    switches = [(s.switch, s.arch) for s in gpu_check.section_cases("switches", _args(), cuda)]
    assert switches[-2:] == [("compile_generator", "rn"), ("compile_generator", "lbam")] and len(switches) == 6
    assert gpu_check.section_cases("speedup", _args(precision="fp32"), cuda) == []  # nothing to compare


def test_a_row_that_does_not_fit_the_budget_is_skipped_with_a_note_and_the_check_goes_on(tmp_path, monkeypatch):
    clock = _Clock()
    budget = gpu_check.Budget(60.0, start=0.0, clock=clock)
    estimator = gpu_check.Estimator(steps=10, warmup=3)
    recorder = gpu_check.Recorder(tmp_path, {})

    def measure(case, size, device, *, steps, warmup, tiny=False):  # 10 s per row: 5 s set-up + 14 steps of 1 TFLOP
        clock.now += 10.0
        return _row(case.arch, case.batch, case.precision, 100.0, case.zero_stage, case.switch, flops=1e12,
                    setup_s=5.0, step_s=1e12 / 4e12)

    monkeypatch.setattr(gpu_check, "measure", measure)
    cases = [gpu_check.Case("rn", 16, "bf16"), gpu_check.Case("rn", 64, "bf16"), gpu_check.Case("rn", 8, "bf16")]
    clock.now = 30.0
    gpu_check.run_rows("batches", cases, _args(), torch.device("cpu"), budget, estimator, recorder)
    # batch 64 needs 5 + 14 x 1 s = 19 s (x 1.2 > the 20 s left): skipped; batch 8 (~6.8 s) still runs
    assert [row.batch for row in recorder.rows] == [16, 8]
    notes = (tmp_path / "notes.txt").read_text()
    assert "skipped rn bf16 batch 64: needs ~19 s (measured), 20 s left" in notes
    assert [json.loads(line)["batch"] for line in (tmp_path / "rows.jsonl").read_text().splitlines()] == [16, 8]


def test_a_row_that_fails_is_noted_and_the_check_goes_on(tmp_path, monkeypatch):
    recorder = gpu_check.Recorder(tmp_path, {})

    def measure(case, size, device, *, steps, warmup, tiny=False):
        if case.batch == 32:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
        return _row(case.arch, case.batch, case.precision, 100.0, flops=1e12, setup_s=1.0, step_s=0.01)

    monkeypatch.setattr(gpu_check, "measure", measure)
    cases = [gpu_check.Case("lbam", 32, "bf16"), gpu_check.Case("lbam", 8, "bf16")]
    budget = gpu_check.Budget(1e9)
    gpu_check.run_rows("batches", cases, _args(), torch.device("cpu"), budget, gpu_check.Estimator(10, 3), recorder)
    assert [row.batch for row in recorder.rows] == [8] and recorder.failures == 1
    assert "lbam bf16 batch 32 failed: RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB\n" in (
        tmp_path / "notes.txt").read_text()


def test_the_wheelhouse_asks_the_gpu_host_for_any_pytest_from_8_while_the_cpu_suite_keeps_its_xdist_cap(tmp_path):
    """The GPU host's pytest is whatever its image holds (9.2 today): ``tests/gpu`` runs without xdist, so the
    wheelhouse's host requirements carry pytest's floor only; pyproject's ``<9.2`` (xdist's loadgroup) stays for the
    CPU suite. Checked on the file ``make wheelhouse`` writes, with the specifier ``offline_install.py`` applies."""
    out = tmp_path / "host-requirements.txt"
    subprocess.run([sys.executable, str(REPO / "infra" / "gpu" / "wheelhouse_plan.py"), "--target-python", "3.12",
                    "--host-requirements", str(out)], cwd=REPO, check=True, capture_output=True, timeout=120)
    lines = [line.split("#")[0].strip() for line in out.read_text().splitlines() if not line.startswith("#")]
    assumed = {req.name: req.specifier for req in map(Requirement, filter(None, lines))}
    for version in ("8.0.0", "8.4.2", "9.1.1", "9.2.0", "9.3.0"):
        assert assumed["pytest"].contains(version), (version, assumed["pytest"])
    assert not assumed["pytest"].contains("7.4.4")
    assert assumed["pytest-timeout"].contains("2.4.0")
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"pytest>=8,<9.2"' in pyproject and '"pytest-xdist>=' in pyproject  # the CPU suite's pin is untouched


# Run in a fresh interpreter: every module of a distribution that neither the wheelhouse nor the GPU host image carries
# is made missing (as it is on that host), then the GPU check's imports are imported.
_IMPORT_AS_ON_THE_GPU_HOST = """
import importlib, importlib.abc, importlib.metadata as metadata, sys
sys.path.insert(0, "infra/gpu")
import wheelhouse_plan as plan
from offline_install import GPU_PATH_IMPORTS

carried_names = set(plan.read_host_packages()) | {plan.canonical(name) for name in plan.GPU_PATH}
carried = plan.host_closure(dict.fromkeys(carried_names), plan.target_environment("3.12"))
missing = {module for module, dists in metadata.packages_distributions().items()
           if not any(plan.canonical(dist) in carried for dist in dists)}
# holefill's own packages, and setuptools' shim
missing -= {"pipeline", "models", "jobs", "infra", "bench", "tests", "_distutils_hack"}

class MissingOnTheHost(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in missing:
            raise ModuleNotFoundError(f"{name} (not on the GPU host)", name=name)

sys.meta_path.insert(0, MissingOnTheHost())
for module in GPU_PATH_IMPORTS:
    importlib.import_module(module)
print("made missing:", sorted(missing & {"scipy", "ray", "mlflow", "s3fs", "boto3"}))
"""


def test_the_gpu_check_imports_nothing_that_neither_the_wheelhouse_nor_the_host_image_carries():
    """``make gpu-check-offline`` imports the GPU path in a venv of the wheelhouse on the host image, which has no
    scipy, Ray or MLflow: a module on that path importing one of them at import time stops the check on the lent
    machine before it measures anything. Checked here on this venv with those distributions made missing."""
    result = subprocess.run([sys.executable, "-c", _IMPORT_AS_ON_THE_GPU_HOST], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "made missing: ['boto3', 'mlflow', 'ray', 's3fs', 'scipy']" in result.stdout, result.stdout[-2000:]
