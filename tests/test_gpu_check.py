"""The CPU-side logic of ``bench/gpu_check.py`` (the table ``make gpu-check`` prints)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import gpu_check  # noqa: E402


def test_step_flops_count_forward_and_backward_convolutions():
    conv = torch.nn.Conv2d(3, 8, kernel_size=3, padding=1, bias=False)
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    forward = 2 * (2 * 8 * 16 * 16) * (3 * 3 * 3)  # 2 FLOPs per multiply-add, per output element

    def step():
        conv(x).sum().backward()

    # backward: one conv for the input gradient, one for the weight gradient
    assert gpu_check.step_flops(step) == 3 * forward


def test_mfu_is_achieved_flops_over_the_bf16_peak():
    assert gpu_check.PEAK_BF16_FLOPS == 989e12
    assert gpu_check.mfu(989e9, steps_per_s=500.0) == pytest.approx(0.5)
    row = gpu_check.Row("rn bf16", batch=16, images_per_s=1600.0, flops_per_step=98.9e9, peak_gib=3.0, syncs_per_step=0.0)
    assert row.mfu == pytest.approx(0.01)  # 100 steps/s x 98.9 GFLOP = 9.89 TFLOP/s


def test_the_table_has_one_line_per_row_with_the_bf16_speed_up():
    rows = [gpu_check.Row("rn fp32", 8, 100.0, 1e12, 2.0, 0.0), gpu_check.Row("rn bf16", 8, 250.0, 1e12, 1.5, 0.0)]
    table = gpu_check.format_table(rows, {("rn bf16", 8): 2.5}).splitlines()
    assert table[0].split() == ["config", "batch", "img/s/GPU", "MFU", "peak", "GiB", "syncs/step", "bf16", "x"]
    assert len(table) == 4 and table[3].split()[-1] == "2.50"
