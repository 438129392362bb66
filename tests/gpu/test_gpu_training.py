"""GPU proof of the training path (``make gpu-check``): skipped without CUDA.

One NCCL process group of one rank for the module; the real step is ``pipeline.train.loop.optimiser_step`` on
holefill's DeepSpeed engines (``tests/support/engine_probe.py`` builds them as ``train_worker`` does), fed pinned uint8
batches converted on the device. Syncs are counted by CUDA itself (``torch.cuda.set_sync_debug_mode``).
"""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
pytest.importorskip("deepspeed")

DEVICE = torch.device("cuda", 0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def nccl():
    import torch.distributed as dist

    from pipeline.train.engines import init_distributed

    torch.cuda.set_device(DEVICE)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=DEVICE)
    init_distributed(True)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("arch, zero_stage", [("rn", 0), ("rn", 2), ("lbam", 0), ("lbam", 1)])
def test_bf16_gan_steps_are_finite_and_never_sync(nccl, arch, zero_stage):
    from support import engine_probe as probe
    from pipeline.train.host_sync import count_cuda_syncs
    from pipeline.train.recipes import logs_to_floats

    recipe, engines, parts = probe.build(arch, zero_stage, "bf16", device=DEVICE)
    batches = probe.uint8_batches(arch, pin=True)
    for _ in range(2):  # DeepSpeed's and cuDNN's one-off set-up
        probe.step(recipe, parts, batches, "bf16", DEVICE)
    with count_cuda_syncs() as syncs:
        for _ in range(3):
            losses = probe.step(recipe, parts, batches, "bf16", DEVICE)
    assert syncs.total == 0, syncs.report()
    values = logs_to_floats(losses)
    assert all(math.isfinite(v) for v in values.values()), values
    for engine in (engines.generator, engines.discriminator):
        params = [p for p in engine.module.parameters() if p.requires_grad]
        assert all(torch.isfinite(p).all() for p in params)
        assert all(p.dtype == torch.float32 for p in params), "autocast keeps fp32 master weights"


@pytest.mark.parametrize("zero_stage", [0, 1, 2])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_engines_on_nccl_restore_to_the_same_next_step(nccl, zero_stage, precision):
    from support import engine_probe as probe

    torch.backends.cudnn.deterministic = True
    try:
        result = probe.resume("rn", zero_stage, precision, device=DEVICE)
    finally:
        torch.backends.cudnn.deterministic = False
    original, restored = result["original"], result["restored"]
    # D's loss comes before any backward of the step: bit-identical. The rest follow D's update.
    assert restored["train/d_loss"] == original["train/d_loss"]
    assert restored == pytest.approx(original, rel=1e-5)


def test_cuda_rng_state_is_saved_and_restored_for_the_ranks_own_device_only(nccl):
    from pipeline.train.checkpoint import rng_state, set_rng_state

    state = rng_state(DEVICE)
    assert "cuda_device" in state and "cuda" not in state
    expected = torch.rand(4, device=DEVICE)
    set_rng_state(state, DEVICE)
    assert torch.equal(torch.rand(4, device=DEVICE), expected)


def test_bucketed_metrics_all_reduce_on_nccl(nccl):
    from pipeline.evaluation.metrics import BucketedMetrics

    torch.manual_seed(0)
    target = torch.rand(4, 3, 32, 32, device=DEVICE)
    pred = (target + 0.05 * torch.randn_like(target)).clamp(0, 1)
    metrics = BucketedMetrics()
    metrics.update(pred, target, torch.tensor([0.05, 0.15, 0.35, 0.55], device=DEVICE))
    local = dict(metrics.summary())
    reduced = metrics.all_reduce().summary()
    assert reduced["count"] == 4
    assert reduced == pytest.approx(local)
