"""Generator forward+backward time per image at 256² for RN and LBAM, variants side by side.

CPU: fp32 only. CUDA: fp32, bf16 autocast, channels_last, and bf16 autocast + channels_last, each with
its speed-up over fp32 measured in the same run (compare ratios, never absolute times across machines).

    .venv/bin/python bench/models.py --batch 1 --iters 3 --device cpu
    .venv/bin/python bench/models.py --batch 8 --iters 20 --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

# Run as a script, this file's folder leads sys.path and its name would shadow the ``models`` package.
_BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _BENCH_DIR]

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from models.registry import get_architecture  # noqa: E402

SIZE = 256


@dataclass(frozen=True)
class Variant:
    name: str
    autocast_dtype: torch.dtype | None
    channels_last: bool


FP32 = Variant("fp32", None, False)
CUDA_VARIANTS = (
    FP32,
    Variant("bf16-autocast", torch.bfloat16, False),
    Variant("channels_last", None, True),
    Variant("bf16+channels_last", torch.bfloat16, True),
)


def _batch(batch: int, device: torch.device, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(batch, 3, SIZE, SIZE, generator=generator)
    mask = torch.zeros(batch, 1, SIZE, SIZE)
    mask[:, :, SIZE // 4 : SIZE // 2, SIZE // 4 : 3 * SIZE // 4] = 1  # a 12.5% rectangular hole
    image, mask = image.to(device), mask.to(device)
    if channels_last:
        image, mask = image.contiguous(memory_format=torch.channels_last), mask.contiguous(
            memory_format=torch.channels_last
        )
    return image, mask


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_generator(
    build: Callable[[], nn.Module], variant: Variant, batch: int, iters: int, warmup: int, device: torch.device
) -> float:
    """Median seconds per image of one forward+backward of a freshly built generator."""
    model = build().to(device).train()
    if variant.channels_last:
        model = model.to(memory_format=torch.channels_last)
    image, mask = _batch(batch, device, variant.channels_last)
    autocast = (
        torch.autocast(device_type=device.type, dtype=variant.autocast_dtype)
        if variant.autocast_dtype is not None
        else contextlib.nullcontext()
    )
    times = []
    for step in range(warmup + iters):
        model.zero_grad(set_to_none=True)
        _synchronize(device)
        start = time.perf_counter()
        with autocast:
            pred = model(image, mask)
        # A reduction of the output stands in for the loss: the backward pass through G is what is timed.
        pred.float().mean().backward()
        _synchronize(device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times) / batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1, help="images per forward+backward (default 1)")
    parser.add_argument("--iters", type=int, default=3, help="timed iterations per variant (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first (default 1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", nargs="+", default=["rn", "lbam"], help="architectures to time")
    args = parser.parse_args()
    if args.batch < 1 or args.iters < 1 or args.warmup < 0:
        parser.error("--batch and --iters must be >= 1 and --warmup >= 0")

    device = torch.device(args.device)
    variants = CUDA_VARIANTS if device.type == "cuda" else (FP32,)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"generator forward+backward at {SIZE}x{SIZE}, batch {args.batch}, median of {args.iters} "
          f"after {args.warmup} warm-up; {where}; torch {torch.__version__}")
    print(f"{'arch':<6}{'variant':<22}{'ms/image':>10}{'vs fp32':>10}")
    for arch in args.arch:
        build = get_architecture(arch).generator
        baseline = None
        for variant in variants:
            torch.manual_seed(0)
            seconds = time_generator(build, variant, args.batch, args.iters, args.warmup, device)
            baseline = baseline or seconds
            print(f"{arch:<6}{variant.name:<22}{seconds * 1e3:>10.1f}{baseline / seconds:>9.2f}x", flush=True)


if __name__ == "__main__":
    main()
