"""What FID + LPIPS cost next to the generator they judge: time per eval image at 256², side by side.

For each generator (RN, LBAM) it times, in one run on the same device, the generator's forward (inpainting a
batch, as the evaluation does) and the metric networks' work on the same batch: the FID Inception's pool3
features of outputs and truths (resize to 299) and LPIPS (VGG as LaMa, AlexNet as MAT) of each output/truth
pair. Medians over ``--iters`` batches, scaled to ``--images`` eval images (default 1,000), and the ratio
metrics / generator (the issue's target: <= 1 on CPU). Each is measured as wall time and as this process's CPU
time (all threads): on a shared machine the CPU time is the steadier measure of cost, so the ratios use it.
Weights are random: cost does not depend on them.

    .venv/bin/python bench/metrics.py --iters 3 --batch 8
    .venv/bin/python bench/metrics.py --device cuda --iters 10 --batch 32
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable

# Run as a script, this file's folder leads sys.path and its name would shadow the ``models`` package.
_BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _BENCH_DIR]

import torch  # noqa: E402

from models.inception import FIDInceptionV3, to_uint8  # noqa: E402
from models.inpaint import inpaint_tensor  # noqa: E402
from models.lpips import LPIPS  # noqa: E402
from models.registry import get_architecture  # noqa: E402

SIZE = 256


def _median_seconds(work: Callable[[], object], iters: int, device: torch.device) -> tuple[float, float]:
    """Median (wall, CPU) seconds of ``work`` over ``iters`` calls after one warm-up call."""
    walls, cpus = [], []
    for step in range(iters + 1):  # the first call warms up (allocator, kernel selection) and is not counted
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall, cpu = time.perf_counter(), time.process_time()
        work()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step:
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def main(argv: list[str] | None = None) -> int:
    """Print seconds per image and for ``--images`` images: generator vs FID Inception vs LPIPS."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--archs", default="rn,lbam")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(args.batch, 3, SIZE, SIZE, generator=generator).to(device)
    mask = torch.zeros(args.batch, 1, SIZE, SIZE, device=device)
    mask[:, :, SIZE // 4: SIZE // 2, SIZE // 4: 3 * SIZE // 4] = 1
    print(f"device {device}, batch {args.batch}, {args.iters} timed batches, {SIZE}x{SIZE}, torch threads "
          f"{torch.get_num_threads()}; seconds per image, and for {args.images} images")

    inception = FIDInceptionV3.random().to(device)
    real_u8 = to_uint8(image)
    costs: dict[str, tuple[float, float]] = {}

    def per_image(work: Callable[[], object]) -> tuple[float, float]:
        wall, cpu = _median_seconds(work, args.iters, device)
        return wall / args.batch, cpu / args.batch

    with torch.no_grad():
        costs["FID Inception (output + truth)"] = per_image(lambda: inception(torch.cat([to_uint8(image), real_u8])))
        costs["FID Inception (output; truth cached)"] = per_image(lambda: inception(to_uint8(image)))
        for net in ("vgg", "alex"):
            lpips = LPIPS.random(net).to(device)
            costs[f"LPIPS {net}"] = per_image(lambda: lpips(image, image.flip(-1)))
        generators = {}
        for arch in args.archs.split(","):
            model = get_architecture(arch).generator().to(device).eval()
            generators[arch] = per_image(lambda: inpaint_tensor(model, arch, image, mask))

    width = 40
    print(f"{'':<{width}}{'wall s/img':>11}{'CPU s/img':>11}{f'CPU s/{args.images}':>13}")
    for name, (wall, cpu) in {**{f"generator {a} forward": s for a, s in generators.items()}, **costs}.items():
        print(f"{name:<{width}}{wall:>11.4f}{cpu:>11.4f}{cpu * args.images:>13.1f}")
    print("\nratios of CPU time, metric networks / generator forward, on the same images:")
    metric_cpu = {name: cpu for name, (_, cpu) in costs.items()}
    for arch, (_, gen) in generators.items():
        for lpips_name in ("LPIPS vgg", "LPIPS alex"):
            for fid_name in ("FID Inception (output + truth)", "FID Inception (output; truth cached)"):
                total = metric_cpu[fid_name] + metric_cpu[lpips_name]
                print(f"{arch}: {fid_name.split('(')[1][:-1]:<22} + {lpips_name:<10}  metrics / generator = "
                      f"{total / gen:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
