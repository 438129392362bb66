"""The training step is ready for a GPU: no host-device sync outside logging steps, and checkpoints resume.

The real step (``pipeline.train.loop.optimiser_step`` on holefill's DeepSpeed engines) runs in a one-rank
gloo process group in a subprocess (``tests/support/engine_probe.py``). On CPU nothing waits for a device, so the
proxy for a sync is a host read of a tensor value (``.item()``, ``bool()``, ``float()``, ``.tolist()``,
``.cpu()``...) or a DeepSpeed ``synchronize()``: each of them stalls the CPU on a GPU. The GPU tests check
the same with CUDA's own sync detector.
"""

from __future__ import annotations

import pytest

from support.engine_probe import run_cases

pytest.importorskip("deepspeed")

CASES = [  # tiny networks on CPU (engine_probe.TINY_SIZES); every model meets ZeRO 0, 1 and 2 and both precisions
    "syncs:rn:0:fp32", "syncs:rn:1:bf16", "syncs:rn:2:fp32",
    "syncs:lbam:0:bf16", "syncs:lbam:1:fp32", "syncs:lbam:2:bf16",
    "resume:rn:0:fp32", "resume:rn:1:fp32",
]


@pytest.fixture(scope="module")
def probe() -> dict:
    return run_cases(*CASES)


@pytest.mark.parametrize("case", [c for c in CASES if c.startswith("syncs:")])
def test_a_non_logging_training_step_reads_nothing_back_from_the_device(probe, case):
    # ZeRO 0 and 1 (1 and 2 share DeepSpeed's code path), fp32 and bf16, RN and LBAM (LBAM calls its models
    # five times per step on one mask): timers off, no grad-norm test, losses kept as tensors, masks trusted.
    assert probe[case]["per_step"] == 0, probe[case]["sites"]


@pytest.mark.parametrize("case", [c for c in CASES if c.startswith("syncs:")])
def test_every_model_trains_on_its_engines_at_every_zero_stage_and_precision(probe, case):
    # Both networks' weights move and the losses are finite after three steps. End to end on Ray Train, each stage
    # trains in tests/test_train_local.py (ZeRO 2) and every other training test (ZeRO 0).
    assert probe[case]["moved"] == {"generator": True, "discriminator": True}
    assert probe[case]["finite"]


def test_a_zero0_checkpoint_resumes_to_the_same_next_step_on_any_number_of_workers(probe):
    result = probe["resume:rn:0:fp32"]
    assert result["restored"] == result["original"]
    assert result["restored_from_2_workers"] == result["original"]


def test_a_zero1_checkpoint_refuses_another_world_size_in_one_line_naming_the_settings(probe):
    result = probe["resume:rn:1:fp32"]
    assert result["restored"] == result["original"]
    message = result["restored_from_2_workers"]
    assert isinstance(message, str) and "\n" not in message
    assert "deepspeed.zero_stage=1" in message and "scaling.num_workers=2" in message


def test_device_batch_converts_the_loaders_uint8_batch_into_the_float_convention():
    import torch

    from pipeline.train.loop import device_batch

    image = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 2, 2).contiguous()
    mask = torch.tensor([[[0, 255], [255, 0]]], dtype=torch.uint8)
    image_f, mask_f = device_batch({"image": image, "mask": mask}, torch.device("cpu"))
    assert image_f.dtype == mask_f.dtype == torch.float32
    assert image_f[0, :, 0, 0].tolist() == pytest.approx([0.0, 0.2, 1.0])
    assert mask_f.shape == (1, 1, 2, 2) and mask_f.flatten().tolist() == [0.0, 1.0, 1.0, 0.0]


def test_the_throughput_window_leaves_out_paused_time():
    import time

    import torch

    from pipeline.train.loop import ThroughputWindow

    window = ThroughputWindow(torch.device("cpu"))
    time.sleep(0.05)
    window.steps += 1
    window.pause()  # e.g. validation and a checkpoint
    time.sleep(0.3)
    window.resume()
    seconds, steps = window.read()
    assert steps == 1 and 0.05 <= seconds < 0.25
    assert window.read()[1] == 0  # a read starts a new window
