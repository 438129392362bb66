"""Run holefill's real training step on DeepSpeed engines in a one-rank process group; print JSON results.

Also the building blocks of the GPU tests (``tests/gpu``) and ``bench/gpu_check.py`` (``device=cuda``).

Run as a subprocess by the tests (a DeepSpeed process group must not leak into the pytest process):

    python tests/support/engine_probe.py PORT syncs:rn:0:fp32 syncs:lbam:0:bf16 ...  host reads per non-logging step
    python tests/support/engine_probe.py PORT resume:rn:0:fp32 ...                   save -> restore -> next-step losses
    python tests/support/engine_probe.py PORT planted:rn:1:bf16 ...                  a payload in each checkpoint file

Each case is ``mode:arch:zero_stage:precision``. The step is ``pipeline.train.loop.optimiser_step`` with the
engines, discriminator caller and updaters of ``train_worker``, fed uint8 batches like the loader's.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

SIZES = {"rn": (32, 2), "lbam": (256, 1)}  # crop, micro-batch: the smallest each official network trains on
# CPU cases (``tiny=True``): one RN residual block; LBAM at 1/16 width and 128 px with a 3-layer stand-in for the
# VGG16 of its perceptual/style losses. The same step code (autocast placement, fp32 Gram/BCE, DeepSpeed engines)
# at a cost where bf16 on a CPU without native bf16 (~240x slower than fp32) takes seconds; full size: tests/gpu.
TINY_SIZES = {"rn": (32, 2), "lbam": (128, 1)}
TINY_WIDTH = 1 / 16


class StandInFeatures(torch.nn.Module):
    """Three ReLU conv stages with a 2x2 max-pool after each, like VGG16's pool1..pool3 (``widths`` channels):
    LBAM's perceptual and style terms keep their shape at a cost tiny tests can pay."""

    def __init__(self, widths: tuple[int, int, int] = (8, 16, 32)) -> None:
        super().__init__()
        self.stages = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Conv2d(i, o, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2))
            for i, o in zip((3, *widths[:-1]), widths)
        )

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        features, x = [], images
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


def uint8_batches(arch: str, seed: int = 0, batch: int | None = None, size: int | None = None, pin: bool = False,
                  tiny: bool = False):
    """Endless loader-like batches: uint8 image (B,3,S,S), uint8 0|255 mask (B,S,S) (pinned when ``pin``)."""
    sizes = TINY_SIZES if tiny else SIZES
    size, batch = size or sizes[arch][0], batch or sizes[arch][1]
    generator = torch.Generator().manual_seed(seed)
    while True:
        image = torch.randint(0, 256, (batch, 3, size, size), generator=generator, dtype=torch.uint8)
        mask = (torch.rand(batch, size, size, generator=generator) > 0.7).to(torch.uint8) * 255
        yield {"image": image.pin_memory(), "mask": mask.pin_memory()} if pin else {"image": image, "mask": mask}


def build(arch: str, zero_stage: int, precision: str, seed: int = 0, device: torch.device = torch.device("cpu"),
          batch: int | None = None, tiny: bool = False):
    """Recipe, engines and the step's callables, built as ``train_worker`` builds them (``tiny``: the CPU sizes)."""
    from models.registry import get_architecture
    from pipeline.train.config import DeepSpeedSettings
    from pipeline.train.engines import DiscriminatorCaller, build_engines, step_updater
    from pipeline.train.spec import build_recipe, discriminator_options

    spec = get_architecture(arch)
    torch.manual_seed(seed)
    if tiny and arch == "lbam":
        from pipeline.train.architectures.lbam import LBAMRecipe, LBAMSettings

        generator = spec.generator(width=TINY_WIDTH)
        discriminator = spec.discriminator(input_size=TINY_SIZES["lbam"][0], width=TINY_WIDTH)
        recipe = LBAMRecipe(LBAMSettings(allow_random_vgg=True), vgg=StandInFeatures())
    else:
        generator = spec.generator(residual_blocks=1) if tiny else spec.generator()
        discriminator = spec.discriminator(**discriminator_options(arch))
        recipe = build_recipe(arch, **({"allow_random_vgg": True} if arch == "lbam" else {}))
    engines = build_engines(
        recipe, generator, discriminator, DeepSpeedSettings(zero_stage=zero_stage, precision=precision),
        micro_batch_size=batch or (TINY_SIZES if tiny else SIZES)[arch][1], world_size=dist.get_world_size(), steps_per_epoch=10_000, device=device,
    )
    recipe.to(device)
    D = DiscriminatorCaller(engines.discriminator)
    return recipe, engines, (engines.generator, D, step_updater(engines.discriminator), step_updater(engines.generator))


def step(recipe, parts, batches, precision: str, device: torch.device = torch.device("cpu")):
    """One ``optimiser_step`` (no accumulation); returns its ``train/*`` loss tensors."""
    from pipeline.train.loop import optimiser_step

    G, D, update_d, update_g = parts
    return optimiser_step(recipe, G, D, update_d, update_g, batches, device, precision, 1)[0]


def syncs(arch: str, zero_stage: int, precision: str, steps: int = 2) -> dict:
    from pipeline.train.host_sync import count_host_reads
    from pipeline.train.recipes import logs_to_floats

    recipe, engines, parts = build(arch, zero_stage, precision, tiny=True)
    networks = {"generator": engines.generator.module, "discriminator": engines.discriminator.module}
    before = {name: [p.detach().float().clone() for p in net.parameters()] for name, net in networks.items()}
    batches = uint8_batches(arch, tiny=True)
    losses = logs_to_floats(step(recipe, parts, batches, precision))  # first step: DeepSpeed's one-off set-up
    with count_host_reads() as count:
        for _ in range(steps):
            step(recipe, parts, batches, precision)
    moved = {name: any(not torch.equal(a, b.detach().float()) for a, b in zip(before[name], net.parameters()))
             for name, net in networks.items()}
    return {"per_step": count.total / steps, "sites": count.report(), "moved": moved,
            "finite": all(math.isfinite(v) for v in losses.values())}


def resume(arch: str, zero_stage: int, precision: str, device: torch.device = torch.device("cpu")) -> dict:
    """Train 2 steps, checkpoint, train a 3rd; a fresh set of engines restored from the checkpoint (and a
    checkpoint relabelled as written by 2 workers) must give the same 3rd-step losses."""
    from pipeline.train.checkpoint import CheckpointState, restore_checkpoint, save_checkpoint
    from pipeline.train.recipes import logs_to_floats

    tiny = device.type == "cpu"
    recipe, engines, parts = build(arch, zero_stage, precision, seed=0, device=device, tiny=tiny)
    batches = uint8_batches(arch, seed=1, tiny=tiny)
    for _ in range(2):
        step(recipe, parts, batches, precision, device)
    results = {}
    with tempfile.TemporaryDirectory() as directory:
        state = CheckpointState(step=2, world_size=1, zero_stage=zero_stage, precision=precision, arch=arch)
        save_checkpoint(directory, engines, state, rank=0)
        next_batch = next(batches)
        results["original"] = logs_to_floats(step(recipe, parts, iter([next_batch]), precision, device))
        for label, written_by in (("restored", 1), ("restored_from_2_workers", 2)):
            state_file = Path(directory) / "state.json"
            tree = json.loads(state_file.read_text())
            state_file.write_text(json.dumps({**tree, "world_size": written_by}))
            recipe2, engines2, parts2 = build(arch, zero_stage, precision, seed=123, device=device, tiny=tiny)  # other weights
            try:
                restore_checkpoint(directory, engines2, rank=0, world_size=1, zero_stage=zero_stage, arch=arch)
            except ValueError as exc:
                results[label] = str(exc)
                continue
            results[label] = logs_to_floats(step(recipe2, parts2, iter([next_batch]), precision, device))
    return results


class Payload:
    """Pickles as a call that creates ``marker``: it exists afterwards only if something unpickled the file."""

    def __init__(self, marker: str | Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(path: Path, marker: str) -> None:
    """Rewrite the torch file ``path`` with a :class:`Payload` beside its top-level keys (everything else kept)."""
    from pipeline.train.safe_checkpoint import deepspeed_checkpoint_globals, load_checkpoint_file

    content = load_checkpoint_file(path, allowed=deepspeed_checkpoint_globals())
    torch.save({**content, "planted": Payload(marker)}, path)


def planted(arch: str, zero_stage: int, precision: str) -> dict:
    """Write a real checkpoint (2 steps); resume a fresh set of engines from it as a worker does (next-step
    losses compared); then, for each file of it in turn, plant a payload in a copy and resume (and read the
    generator record, which registration and ``--model`` read): what each attempt raised and whether the payload
    ran. Last, the payload's control: the same file loaded with pickle (``weights_only=False``) does run it."""
    import shutil

    from pipeline.train.checkpoint import CheckpointState, load_generator_record, restore_checkpoint, save_checkpoint
    from pipeline.train.recipes import logs_to_floats

    recipe, engines, parts = build(arch, zero_stage, precision, seed=0, tiny=True)
    batches = uint8_batches(arch, seed=1, tiny=True)
    for _ in range(2):
        step(recipe, parts, batches, precision)
    results: dict = {"files": {}}
    with tempfile.TemporaryDirectory() as tmp:
        original = Path(tmp) / "checkpoint"
        save_checkpoint(original, engines, CheckpointState(step=2, world_size=1, zero_stage=zero_stage,
                                                           precision=precision, arch=arch), rank=0)
        next_batch = next(batches)
        results["original"] = logs_to_floats(step(recipe, parts, iter([next_batch]), precision))
        recipe2, engines2, parts2 = build(arch, zero_stage, precision, seed=123, tiny=True)
        restore_checkpoint(original, engines2, rank=0, world_size=1, zero_stage=zero_stage, arch=arch)
        results["restored"] = logs_to_floats(step(recipe2, parts2, iter([next_batch]), precision))
        files = sorted(str(p.relative_to(original)) for p in original.rglob("*.pt"))
        fresh = engines2  # every planted copy is resumed into it: a refused resume only has to refuse
        for index, name in enumerate(files):
            copy, marker = Path(tmp) / f"copy{index}", str(Path(tmp) / f"ran{index}")
            shutil.copytree(original, copy)
            plant(copy / name, marker)
            outcome: dict = {}
            for what, attempt in (
                ("resume", lambda: restore_checkpoint(copy, fresh, rank=0, world_size=1, zero_stage=zero_stage, arch=arch)),
                ("generator_record", lambda: load_generator_record(copy)),
            ):
                try:
                    attempt()
                    outcome[what] = None
                except Exception as exc:  # noqa: BLE001 - the probe reports whatever each attempt raised
                    outcome[what] = {"type": type(exc).__name__, "message": str(exc)}
            outcome["payload_ran"] = os.path.exists(marker)
            torch.load(copy / name, weights_only=False)  # the control: pickle runs the payload
            outcome["payload_runs_under_pickle"] = os.path.exists(marker)
            results["files"][name] = outcome
    return results


def run_cases(*cases: str, timeout: float = 900) -> dict:
    """Run this probe on ``cases`` in a subprocess (a free port, one rank); the parsed results by case."""
    import socket
    import subprocess

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = subprocess.run([sys.executable, __file__, str(port), *cases], capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.split("RESULT ", 1)[1])


def main() -> None:
    port, *cases = sys.argv[1:]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)
    from pipeline.train.engines import init_distributed

    init_distributed(False)
    out = {}
    for case in cases:
        mode, arch, stage, precision = case.split(":")
        out[case] = {"syncs": syncs, "resume": resume, "planted": planted}[mode](arch, int(stage), precision)
    print("RESULT " + json.dumps(out))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
