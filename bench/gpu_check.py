"""The GPU table of ``make gpu-check``: throughput, model FLOPs utilisation, memory and syncs per step.

For RN and LBAM at 256² and micro-batch 8/16/32 per GPU, the real training step (``optimiser_step`` on
holefill's DeepSpeed engines, pinned uint8 batches converted on the device) in fp32 and bf16 (ZeRO 0):

* images/s per GPU (median-free: one timed window of ``--steps`` steps after ``--warmup`` steps, the device
  synchronised at both ends only);
* MFU: FLOPs of one step counted by ``torch.utils.flop_counter`` (convolutions and matmuls, forward and
  backward, the gradient penalty's double backward included) x steps/s / the dense bf16 peak (989 TFLOPS,
  H100/H200 SXM) -- fp32 rows use the same peak, so they show how much bf16 buys;
* peak memory allocated, CUDA syncs per step (``torch.cuda.set_sync_debug_mode``), bf16 speed-up over fp32.

Then, at batch 16 bf16: ZeRO 1 and 2 against 0, and each speed switch (cudnn.benchmark, channels_last,
torch.compile of the generator) against none: the measurements the YAML defaults wait for. With more than
one GPU: the same step at world size 2..N (one process per GPU, NCCL) and the scaling efficiency.

Runs without Ray (DeepSpeed, pydantic, webdataset only). ``--device cpu`` runs the same logic on the CPU at
tiny sizes (the CPU-side check in tests/test_gpu_check.py).

    python bench/gpu_check.py                    # on a GPU machine (make gpu-check)
    python bench/gpu_check.py --device cpu --archs rn --batches 2 --size 32 --steps 1 --warmup 1
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

PEAK_BF16_FLOPS = 989e12  # H100 / H200 SXM, dense bf16 tensor-core peak


@dataclass
class Row:
    """One measured configuration."""

    label: str
    batch: int
    images_per_s: float
    flops_per_step: float
    peak_gib: float
    syncs_per_step: float

    @property
    def mfu(self) -> float:
        return mfu(self.flops_per_step, self.images_per_s / self.batch)


def mfu(flops_per_step: float, steps_per_s: float, peak: float = PEAK_BF16_FLOPS) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the peak."""
    return flops_per_step * steps_per_s / peak


def step_flops(run_step) -> float:
    """FLOPs of one call of ``run_step`` (forward and backward) as ``torch.utils.flop_counter`` counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        run_step()
    return float(counter.get_total_flops())


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(arch: str, batch: int, size: int, precision: str, device: torch.device, *, zero_stage: int = 0,
            steps: int, warmup: int, switches: dict | None = None, label: str | None = None) -> Row:
    """Build the engines like a training worker and time ``steps`` optimiser steps."""
    import engine_probe as probe

    from pipeline.train.config import PerformanceSection
    from pipeline.train.host_sync import count_cuda_syncs, count_host_reads
    from pipeline.train.loop import apply_speed_switches

    recipe, engines, parts = probe.build(arch, zero_stage, precision, device=device, batch=batch)
    performance = PerformanceSection(**(switches or {}))
    apply_speed_switches(performance, engines.generator.module, engines.discriminator.module, device)
    batches = probe.uint8_batches(arch, batch=batch, size=size, pin=device.type == "cuda")

    def run_step():
        return probe.step(recipe, parts, batches, precision, device)

    for _ in range(warmup):
        run_step()
    flops = step_flops(run_step)
    _synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    counter = count_cuda_syncs() if device.type == "cuda" else count_host_reads()
    start = time.perf_counter()
    with counter as syncs:
        for _ in range(steps):
            run_step()
    _synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    torch.backends.cudnn.benchmark = False
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Row(label or f"{arch} {precision}", batch, steps * batch / seconds,
               flops, peak, syncs.total / steps)


def format_table(rows: list[Row], speedups: dict[tuple[str, int], float] | None = None) -> str:
    """A fixed-width table; ``speedups`` maps (label, batch) to the bf16/fp32 ratio shown beside bf16 rows."""
    speedups = speedups or {}
    header = f"{'config':<34}{'batch':>6}{'img/s/GPU':>11}{'MFU':>8}{'peak GiB':>10}{'syncs/step':>12}{'bf16 x':>8}"
    lines = [header, "-" * len(header)]
    for row in rows:
        ratio = speedups.get((row.label, row.batch))
        lines.append(
            f"{row.label:<34}{row.batch:>6}{row.images_per_s:>11.1f}{100 * row.mfu:>7.1f}%{row.peak_gib:>10.2f}"
            f"{row.syncs_per_step:>12.1f}{(f'{ratio:.2f}' if ratio else ''):>8}"
        )
    return "\n".join(lines)


def _init_group(device: torch.device, rank: int = 0, world_size: int = 1, port: int | None = None) -> None:
    from pipeline.train.engines import init_distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port or _free_port()), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", rank=rank, world_size=world_size, device_id=device)
    else:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    init_distributed(device.type == "cuda")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _scaling_worker(rank: int, world_size: int, port: int, args: argparse.Namespace, out) -> None:
    device = torch.device("cuda", rank)
    _init_group(device, rank, world_size, port)
    for arch in args.archs:
        row = measure(arch, 16, args.size, "bf16", device, steps=args.steps, warmup=args.warmup)
        if rank == 0:
            out.put((arch, row.images_per_s))
    dist.destroy_process_group()


def scaling(args: argparse.Namespace, single: dict[str, float]) -> str:
    """Per-GPU images/s at world size 2..N (bf16, batch 16, ZeRO 0) and efficiency against one GPU."""
    import torch.multiprocessing as mp

    lines = [f"{'model':<8}{'GPUs':>6}{'img/s/GPU':>11}{'efficiency':>12}"]
    for world_size in range(2, torch.cuda.device_count() + 1):
        queue = mp.get_context("spawn").SimpleQueue()
        mp.spawn(_scaling_worker, args=(world_size, _free_port(), args, queue), nprocs=world_size, join=True)
        while not queue.empty():
            arch, rate = queue.get()
            lines.append(f"{arch:<8}{world_size:>6}{rate:>11.1f}{100 * rate / single[arch]:>11.1f}%")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--archs", nargs="+", default=["rn", "lbam"], choices=["rn", "lbam"])
    parser.add_argument("--batches", nargs="+", type=int, default=[8, 16, 32])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-switches", action="store_true", help="skip the ZeRO and speed-switch comparison")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device visible (use --device cpu for the CPU-side smoke run)")
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    _init_group(device)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"holefill gpu-check on {name}, torch {torch.__version__}, {args.size}², ZeRO 0 unless said, "
          f"{args.steps} timed steps; MFU against {PEAK_BF16_FLOPS / 1e12:.0f} TFLOPS (dense bf16)")
    rows, speedups, single = [], {}, {}
    for arch in args.archs:
        size = 256 if arch == "lbam" else args.size
        for batch in args.batches:
            fp32 = measure(arch, batch, size, "fp32", device, steps=args.steps, warmup=args.warmup)
            bf16 = measure(arch, batch, size, "bf16", device, steps=args.steps, warmup=args.warmup)
            rows += [fp32, bf16]
            speedups[(bf16.label, batch)] = bf16.images_per_s / fp32.images_per_s
            if batch == 16:
                single[arch] = bf16.images_per_s  # the one-GPU reference of the scaling table
        if not args.no_switches:
            batch = 16 if 16 in args.batches else args.batches[0]
            for stage in (1, 2):
                rows.append(measure(arch, batch, size, "bf16", device, zero_stage=stage, steps=args.steps,
                                    warmup=args.warmup, label=f"{arch} bf16 ZeRO {stage}"))
            for switch in ("cudnn_benchmark", "channels_last", "compile_generator"):
                if device.type == "cpu" and switch != "channels_last":
                    continue  # cudnn is GPU-only; compiling on the CPU only costs the smoke run time
                rows.append(measure(arch, batch, size, "bf16", device, steps=args.steps, warmup=args.warmup,
                                    switches={switch: True}, label=f"{arch} bf16 + {switch}"))
    print(format_table(rows, speedups))
    dist.destroy_process_group()
    if device.type == "cuda" and torch.cuda.device_count() > 1:
        if len(single) == len(args.archs):
            print(scaling(args, single))
        else:
            print("scaling table skipped: it compares batch 16 against one GPU; include 16 in --batches")


if __name__ == "__main__":
    main()
