"""Overhead of the distributed training machinery over a plain PyTorch loop, measured side by side.

Both sides run the same ``gan_step`` on the same model and batch in one process:

* plain: ``torch.optim.Adam`` (fused, like the engines') through ``pipeline.train.recipes.torch_updater``;
* holefill: the DeepSpeed engines of ``pipeline.train.engines`` (ZeRO stage, precision from the flags) on a
  one-rank process group, i.e. everything a Ray Train worker does per step except the data loader.

Their steps alternate (plain, DeepSpeed, plain, ...) and each side reports its median, so drift of a shared
machine (other jobs, clock changes) hits both alike. On CPU the DeepSpeed step is also timed inside a
one-worker Ray Train ``TorchTrainer``, as a training job runs it (start-up excluded: it is paid once per run),
against plain steps timed right after in this process. Prints milliseconds per image and the ratios (target:
overhead <= 10 % at batch >= 4 on CPU). On a GPU it also prints images/s in bf16 for ZeRO 0 vs 1, peak memory
and the speed-up over fp32.

    python bench/train_overhead.py --arch rn --batch 4 --size 64 --steps 5

``--global-stats`` instead measures what official mode's global-batch statistics cost, on 2 gloo workers (one
thread each) taking turns with the local version: RN's whole official step (carried D gradient, sigmoid BCE,
all-reduced hole-L1 normaliser) against the default step, and LBAM's D step (three D forwards and the gradient
penalty's double backward) with ``GlobalBatchNorm2d`` against per-worker BatchNorm. Neither side all-reduces
gradients (plain optimisers), so the ratios isolate official mode's own collectives and extra work:

    python bench/train_overhead.py --global-stats --steps 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

Step = Callable[[], object]


def _timed(step: Step, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def median_step_times(steps: dict[str, Step], rounds: int, device: torch.device) -> dict[str, float]:
    """Median seconds per call of each step, the steps taking turns for ``rounds`` rounds after one warm-up
    call each (allocations, DeepSpeed's first-step set-up)."""
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            times[name].append(_timed(step, device))
    return {name: statistics.median(values) for name, values in times.items()}


def _batch(batch: int, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(batch, 3, size, size, generator=generator).to(device)
    mask = (torch.rand(batch, 1, size, size, generator=generator) > 0.7).float().to(device)
    return image, mask


def _recipe(arch: str, device: torch.device):
    from pipeline.train.spec import build_recipe

    return build_recipe(arch, **({"allow_random_vgg": True} if arch == "lbam" else {})).to(device)


def plain_step(arch: str, batch: int, size: int, device: torch.device) -> Step:
    """One GAN step of ``arch`` with plain ``torch.optim.Adam``."""
    from pipeline.train.recipes import gan_step, torch_updater
    from models.registry import get_architecture

    from pipeline.train.spec import discriminator_options

    spec = get_architecture(arch)
    recipe = _recipe(arch, device)
    G, D = spec.generator().to(device), spec.discriminator(**discriminator_options(arch)).to(device)
    # Fused Adam, as the engines use: the comparison is of the machinery, not of two Adam kernels.
    opt_g = recipe.generator_optimizer.build(G.parameters(), fused=True)
    opt_d = recipe.discriminator_optimizer.build(D.parameters(), fused=True)
    image, mask = _batch(batch, size, device)
    return lambda: gan_step(recipe, G, D, image, mask, torch_updater(opt_d), torch_updater(opt_g))


def engine_step(arch: str, batch: int, size: int, device: torch.device, zero_stage: int, precision: str) -> Step:
    """One GAN step of ``arch`` through holefill's DeepSpeed engines, as a training worker runs it."""
    from pipeline.train.recipes import gan_step
    from pipeline.train.spec import discriminator_options
    from models.registry import get_architecture
    from pipeline.train.config import DeepSpeedSettings
    from pipeline.train.engines import DiscriminatorCaller, build_engines, precision_context, step_updater

    spec = get_architecture(arch)
    recipe = _recipe(arch, device)
    engines = build_engines(
        recipe, spec.generator(), spec.discriminator(**discriminator_options(arch)),
        DeepSpeedSettings(zero_stage=zero_stage, precision=precision),
        micro_batch_size=batch, world_size=1, steps_per_epoch=10_000, device=device,
    )
    D = DiscriminatorCaller(engines.discriminator)
    update_g, update_d = step_updater(engines.generator), step_updater(engines.discriminator)
    image, mask = _batch(batch, size, device)

    def step():
        with precision_context(precision, device):
            gan_step(recipe, engines.generator, D, image, mask, update_d, update_g)

    return step


def engine_step_time(arch: str, batch: int, size: int, steps: int, device: torch.device, zero_stage: int, precision: str) -> float:
    """Median seconds of ``steps`` DeepSpeed GAN steps (after a warm-up step)."""
    step = engine_step(arch, batch, size, device, zero_stage, precision)
    return median_step_times({"engine": step}, steps, device)["engine"]


def ray_train_step_time(arch: str, batch: int, size: int, steps: int, zero_stage: int, runtime_env: dict) -> float:
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
        Path(cfg["out"]).write_text(json.dumps({"seconds": seconds, "threads": torch.get_num_threads()}))

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
                run_config=RunConfig(storage_path=tmp, name="overhead", worker_runtime_env=runtime_env),
            ).fit()
        finally:
            ray.shutdown()
        result = json.loads(out.read_text())
        if result["threads"] != torch.get_num_threads():
            print(f"  note: the Ray Train worker ran {result['threads']} torch threads, this process "
                  f"{torch.get_num_threads()}")
        return result["seconds"]


def _global_stats_worker(rank: int, port: int, rounds: int, out: str) -> None:
    """One of 2 gloo ranks: RN default vs official step, LBAM D step local vs global BatchNorm (see the docstring)."""
    import copy
    import json

    import torch.nn as nn

    from models.registry import get_architecture
    from pipeline.train.global_batch import use_global_batch_norm
    from pipeline.train.architectures.lbam import LBAMRecipe, LBAMSettings
    from pipeline.train.recipes import gan_step, torch_updater
    from pipeline.train.spec import build_recipe, discriminator_options

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    cpu = torch.device("cpu")
    results: dict[str, float] = {}

    steps: dict[str, Step] = {}
    image, mask = _batch(4, 64, cpu)
    for label, official in (("rn default", False), ("rn official", True)):
        recipe = build_recipe("rn", official=official)
        torch.manual_seed(0)
        G = get_architecture("rn").generator()
        D = recipe.prepare_discriminator(get_architecture("rn").discriminator(**discriminator_options("rn")))
        update_d = torch_updater(recipe.discriminator_optimizer.build(D.parameters(), fused=True))
        update_g = torch_updater(recipe.generator_optimizer.build(G.parameters(), fused=True))
        steps[label] = (lambda r, g, d, ud, ug: lambda: gan_step(r, g, d, image, mask, ud, ug))(recipe, G, D, update_d, update_g)
    results.update(median_step_times(steps, rounds, cpu))

    lbam = LBAMRecipe(LBAMSettings(allow_random_vgg=True), vgg=nn.Identity())  # the D loss needs no VGG
    torch.manual_seed(0)
    local = get_architecture("lbam").discriminator()
    global_ = use_global_batch_norm(copy.deepcopy(local))
    image, mask = _batch(2, 256, cpu)
    pred = torch.rand_like(image)

    def d_step(D: nn.Module) -> Step:
        def step() -> None:
            loss, _ = lbam.discriminator_loss(D, image, mask, pred)
            loss.backward()
        return step

    results.update(median_step_times({"lbam D local BN": d_step(local), "lbam D global BN": d_step(global_)}, rounds, cpu))
    gathered: list[dict[str, float]] = [{}, {}]
    dist.all_gather_object(gathered, results)
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))
    dist.destroy_process_group()


def global_stats_bench(rounds: int) -> None:
    """Print the cost of official mode's global-batch statistics on 2 gloo workers (ratios, slowest rank)."""
    import json
    import socket
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.json")
        mp.spawn(_global_stats_worker, args=(port, rounds, out), nprocs=2, join=True)
        ranks = json.loads(Path(out).read_text())
    slowest = {name: max(r[name] for r in ranks) for name in ranks[0]}
    print(f"official mode's global statistics, 2 gloo workers x 1 thread, median of {rounds} alternating rounds "
          f"(slowest rank)")
    for base, other, what in (("rn default", "rn official", "RN step (batch 4/worker, 64²)"),
                              ("lbam D local BN", "lbam D global BN", "LBAM D step (batch 2/worker, 256²)")):
        a, b = slowest[base], slowest[other]
        print(f"  {what:<36} {base}: {a * 1e3:9.1f} ms   {other}: {b * 1e3:9.1f} ms   ratio {b / a:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="rn", choices=["rn", "lbam"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=64, help="crop size (LBAM: 256 only)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--zero-stage", type=int, default=0)
    parser.add_argument("--global-stats", action="store_true",
                        help="measure official mode's global-batch statistics on 2 gloo workers instead")
    args = parser.parse_args()
    if args.global_stats:
        global_stats_bench(args.steps)
        return

    use_gpu = torch.cuda.is_available()
    device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("nccl" if use_gpu else "gloo", rank=0, world_size=1)
    from pipeline.train.engines import init_distributed

    init_distributed(use_gpu)

    plain = plain_step(args.arch, args.batch, args.size, device)
    medians = median_step_times(
        {"plain": plain, "engine": engine_step(args.arch, args.batch, args.size, device, args.zero_stage, "fp32")},
        args.steps, device,
    )
    engine = medians["engine"]

    def row(label: str, seconds: float, reference: float) -> str:
        return (f"  {label:<24}{seconds / args.batch * 1e3:9.2f} ms/image   ratio {seconds / reference:.3f}"
                f"  (overhead {100 * (seconds / reference - 1):+.1f} %)")

    print(f"{args.arch} batch {args.batch} at {args.size}², {device.type}, {torch.get_num_threads()} threads, "
          f"median of {args.steps} alternating steps")
    print(f"  {'plain PyTorch':<24}{medians['plain'] / args.batch * 1e3:9.2f} ms/image")
    print(row(f"DeepSpeed ZeRO {args.zero_stage}", engine, medians["plain"]))
    if not use_gpu:
        dist.destroy_process_group()
        from pipeline.train.config import ScalingSettings
        from pipeline.train.launch import worker_runtime_env

        holefill_env = worker_runtime_env(ScalingSettings(num_workers=1, use_gpu=False))
        in_ray = {
            "Ray Train + DeepSpeed": ray_train_step_time(args.arch, args.batch, args.size, args.steps,
                                                         args.zero_stage, holefill_env),
            "  same, malloc default": ray_train_step_time(args.arch, args.batch, args.size, args.steps,
                                                          args.zero_stage, {}),
        }
        # The plain reference again, right after, so both sides see the machine in the same state.
        after = median_step_times({"plain": plain}, args.steps, device)["plain"]
        print(f"  {'plain PyTorch (after)':<24}{after / args.batch * 1e3:9.2f} ms/image")
        for label, seconds in in_ray.items():
            print(row(label, seconds, after))
        print(f"  (holefill's CPU workers run with {holefill_env['env_vars']}; see pipeline.train.launch.worker_runtime_env)")
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
