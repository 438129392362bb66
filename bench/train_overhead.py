"""Overhead of the distributed training machinery over a plain PyTorch loop, measured side by side.

Both sides run the same ``gan_step`` on the same model and batch in one process:

* plain: ``torch.optim.Adam`` through ``models.recipes.torch_updater``;
* holefill: the DeepSpeed engines of ``pipeline.train.engines`` (ZeRO stage, precision from the flags) on a
  one-rank process group, i.e. everything a Ray Train worker does per step except the data loader.

On CPU the DeepSpeed step is also timed inside a one-worker Ray Train ``TorchTrainer``, as a training job
runs it (start-up excluded: it is paid once per run). Prints seconds per image for both and their ratio (target: overhead
<= 10 % at batch >= 4 on CPU). On a GPU it also prints images/s in bf16 for ZeRO 0 vs 1, peak memory and the
speed-up over fp32.

    python bench/train_overhead.py --arch rn --batch 4 --size 64 --steps 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def _timed_steps(step, steps: int, device: torch.device) -> float:
    step()  # warm-up: allocations, DeepSpeed's first-step JIT
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _batch(batch: int, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(batch, 3, size, size, generator=generator).to(device)
    mask = (torch.rand(batch, 1, size, size, generator=generator) > 0.7).float().to(device)
    return image, mask


def plain_step_time(arch: str, batch: int, size: int, steps: int, device: torch.device) -> float:
    from models.recipes import build_recipe, gan_step, torch_updater
    from models.registry import get_architecture

    spec = get_architecture(arch)
    recipe = build_recipe(arch, **({"allow_random_vgg": True} if arch == "lbam" else {})).to(device)
    G, D = spec.generator().to(device), spec.discriminator().to(device)
    opt_g = recipe.generator_optimizer.build(G.parameters())
    opt_d = recipe.discriminator_optimizer.build(D.parameters())
    image, mask = _batch(batch, size, device)
    return _timed_steps(lambda: gan_step(recipe, G, D, image, mask, torch_updater(opt_d), torch_updater(opt_g)), steps, device)


def engine_step_time(arch: str, batch: int, size: int, steps: int, device: torch.device, zero_stage: int, precision: str) -> float:
    from models.recipes import build_recipe, gan_step
    from models.registry import get_architecture
    from pipeline.train.config import DeepSpeedSection
    from pipeline.train.engines import DiscriminatorCaller, build_engines, precision_context, step_updater

    spec = get_architecture(arch)
    recipe = build_recipe(arch, **({"allow_random_vgg": True} if arch == "lbam" else {})).to(device)
    engines = build_engines(
        recipe, spec.generator(), spec.discriminator(), DeepSpeedSection(zero_stage=zero_stage, precision=precision),
        micro_batch_size=batch, world_size=1, steps_per_epoch=10_000, device=device,
    )
    D = DiscriminatorCaller(engines.discriminator)
    update_g, update_d = step_updater(engines.generator), step_updater(engines.discriminator)
    image, mask = _batch(batch, size, device)

    def step():
        with precision_context(precision, device):
            gan_step(recipe, engines.generator, D, image, mask, update_d, update_g)

    return _timed_steps(step, steps, device)


def ray_train_step_time(arch: str, batch: int, size: int, steps: int, zero_stage: int) -> float:
    """``engine_step_time`` inside a one-worker Ray Train ``TorchTrainer`` (CPU, gloo), as a training job runs it."""
    import json
    import tempfile

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def worker(cfg: dict) -> None:
        from pipeline.train.engines import init_distributed

        init_distributed(False)
        seconds = engine_step_time(cfg["arch"], cfg["batch"], cfg["size"], cfg["steps"], torch.device("cpu"),
                                   cfg["zero_stage"], "fp32")
        Path(cfg["out"]).write_text(json.dumps({"seconds": seconds}))

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": str(torch.get_num_threads())}})
        try:
            TorchTrainer(
                worker,
                train_loop_config={"arch": arch, "batch": batch, "size": size, "steps": steps,
                                   "zero_stage": zero_stage, "out": str(out)},
                scaling_config=ScalingConfig(num_workers=1, use_gpu=False, resources_per_worker={"CPU": 2}),
                run_config=RunConfig(storage_path=tmp, name="overhead"),
            ).fit()
        finally:
            ray.shutdown()
        return json.loads(out.read_text())["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="rn", choices=["rn", "lbam"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=64, help="crop size (LBAM: 256 only)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--zero-stage", type=int, default=0)
    args = parser.parse_args()

    use_gpu = torch.cuda.is_available()
    device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("nccl" if use_gpu else "gloo", rank=0, world_size=1)
    from pipeline.train.engines import init_distributed

    init_distributed(use_gpu)

    plain = plain_step_time(args.arch, args.batch, args.size, args.steps, device)
    engine = engine_step_time(args.arch, args.batch, args.size, args.steps, device, args.zero_stage, "fp32")
    print(f"{args.arch} batch {args.batch} at {args.size}², {device.type}, median of {args.steps} steps")
    print(f"  plain PyTorch      {plain / args.batch * 1e3:9.2f} ms/image")
    print(f"  DeepSpeed ZeRO {args.zero_stage}   {engine / args.batch * 1e3:9.2f} ms/image   ratio {engine / plain:.3f}"
          f"  (overhead {100 * (engine / plain - 1):+.1f} %)")
    if not use_gpu:
        dist.destroy_process_group()
        in_ray = ray_train_step_time(args.arch, args.batch, args.size, args.steps, args.zero_stage)
        print(f"  Ray Train + DeepSpeed {in_ray / args.batch * 1e3:9.2f} ms/image   ratio {in_ray / plain:.3f}"
              f"  (overhead {100 * (in_ray / plain - 1):+.1f} %)")
        return

    if use_gpu:
        for stage in (0, 1):
            torch.cuda.reset_peak_memory_stats()
            bf16 = engine_step_time(args.arch, args.batch, args.size, args.steps, device, stage, "bf16")
            peak = torch.cuda.max_memory_allocated() / 2**30
            print(f"  bf16 ZeRO {stage}: {args.batch / bf16:8.1f} images/s per GPU, peak {peak:.2f} GiB, "
                  f"speed-up over fp32 ZeRO {args.zero_stage}: {engine / bf16:.2f}x")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
