"""DeepSpeed engines for a GAN: one engine for the generator, one for the discriminator.

A GAN cannot share one engine: G and D have their own optimisers, learning rates and step order, and
DeepSpeed ties one optimiser (and one ZeRO partitioning) to one engine. Each engine therefore gets its own
config dict built by :func:`deepspeed_config` from the same :class:`DeepSpeedSettings`.

The optimiser is always a client ``torch.optim.Adam`` built by the recipe's ``OptimizerSettings``: DeepSpeed's own
FusedAdam needs a CUDA build, and ZeRO 1/2 accept ``torch.optim.Adam`` as a supported optimiser, so CPU and
GPU runs take the same path. It is PyTorch's fused Adam on CPU and CUDA alike: its step counters live on the
parameters' device, where the default implementation reads a host counter with ``.item()`` every step. The learning-rate schedule is the recipe's
``lr_factor(epoch)`` with ``epoch = optimiser_step // steps_per_epoch`` (1-based epochs, like RN's code).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

from pipeline.train.config import DeepSpeedSettings
from pipeline.train.recipes import GanRecipe, OptimizerSettings
from pipeline.train.safe_checkpoint import use_weights_only_loads

__all__ = ["DiscriminatorCaller", "GanEngines", "build_engines", "deepspeed_config", "init_distributed", "precision_context", "step_updater"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def deepspeed_config(ds: DeepSpeedSettings, micro_batch_size: int, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict for one engine (both engines of a run get equal dicts)."""
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage > 0:
        # ZeRO 1/2 otherwise compute the global gradient norm every step and test it with a bool() (a device
        # sync) even when nothing is clipped; the norm is only needed for clipping.
        zero["compute_grad_norm"] = ds.gradient_clipping > 0
        # Overlap the gradient reduce-scatter with the backward pass (only meaningful with > 1 rank).
        zero["overlap_comm"] = ds.overlap_comm
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": ds.gradient_accumulation_steps,
        "train_batch_size": micro_batch_size * ds.gradient_accumulation_steps * world_size,
        "zero_optimization": zero,
        # Always explicit: DeepSpeed 0.19's default is 1.0, which would clip silently when the user asked for none.
        "gradient_clipping": ds.gradient_clipping,
        "steps_per_print": 1 << 30,  # holefill logs its own throughput; DeepSpeed's per-step prints are noise
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer is on by default and calls synchronize() in every engine forward and
        # step: the CPU could never queue work ahead of the GPU. holefill measures throughput over a window.
        "timers": {"throughput": {"enabled": False, "synchronized": False}},
    }
    if ds.precision in _DTYPES:
        # DeepSpeed's torch_autocast mode, not its bf16/fp16 model cast: parameters, buffers and optimiser
        # state stay fp32 while convolutions run in half precision. The cast mode breaks RN's spectral norm
        # (fp32 power-iteration buffers against half weights) and would leave LBAM's fp32 VGG outside the
        # engine; with fp32 masters the generator is also registered without any gather. Gradients of
        # conv/linear weights are all-reduced in the half dtype. fp16 is refused by the config check.
        config["torch_autocast"] = {"enabled": True, "dtype": str(_DTYPES[ds.precision]).replace("torch.", "")}
    return config


def init_distributed(use_gpu: bool) -> None:
    """Make DeepSpeed's communication layer reuse the process group Ray Train already set up.

    ``deepspeed.init_distributed`` only creates a group when none exists, so calling it after Ray's
    ``setup_torch_process_group`` wraps that group (gloo on CPU, NCCL on GPU) instead of starting another.
    """
    import deepspeed  # lazy: importing DeepSpeed costs seconds; the config and recipe code here runs without it

    if not use_gpu:
        skip_cpu_shm_op()
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo", auto_mpi_discovery=False)


def skip_cpu_shm_op() -> None:
    """Tell DeepSpeed not to build its CPU shared-memory all-reduce op in this process.

    On CPU, DeepSpeed's communication backend JIT-compiles that op (~30 s) at every process start whose build
    environment differs from the last, under a file lock that a worker killed mid-build leaves behind, after
    which every later run waits on it forever. The op only serves ``inference_all_reduce``; training
    all-reduces through gloo and never touches it.
    """
    import deepspeed.ops  # lazy: importing DeepSpeed costs seconds
    from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


@dataclass
class GanEngines:
    """The two engines of one training worker."""

    generator: Any  # deepspeed.DeepSpeedEngine
    discriminator: Any

    def learning_rates(self) -> dict[str, float]:
        """Current learning rates, for logging."""
        return {
            "lr/generator": float(self.generator.get_lr()[0]),
            "lr/discriminator": float(self.discriminator.get_lr()[0]),
        }


def _epoch_schedule(lr_factor: Callable[[int], float], steps_per_epoch: int) -> Callable[[int], float]:
    def factor(optimiser_step: int) -> float:
        return float(lr_factor(optimiser_step // steps_per_epoch + 1))

    return factor


def _engine(
    module: nn.Module,
    settings: OptimizerSettings,
    lr_factor: Callable[[int], float],
    steps_per_epoch: int,
    ds_config: dict[str, Any],
    lr_scale: float,
    reduce_gradients: bool,
) -> Any:
    import deepspeed  # lazy: importing DeepSpeed costs seconds

    optimizer = settings.build((p for p in module.parameters() if p.requires_grad), lr_factor=lr_scale, fused=True)
    schedule = _epoch_schedule(lr_factor, steps_per_epoch)
    engine, _, _, _ = deepspeed.initialize(
        model=module,
        optimizer=optimizer,
        # A callable, so the scheduler wraps the optimiser DeepSpeed returns (ZeRO / bf16 wrappers), not ours.
        lr_scheduler=lambda wrapped: torch.optim.lr_scheduler.LambdaLR(wrapped, schedule),
        config=ds_config,
        dist_init_required=False,
    )
    if not reduce_gradients:
        engine.enable_backward_allreduce = False
    use_weights_only_loads(engine)  # DeepSpeed's own loads unpickle (weights_only=False)
    return engine


def build_engines(
    recipe: GanRecipe,
    generator: nn.Module,
    discriminator: nn.Module,
    ds: DeepSpeedSettings,
    *,
    micro_batch_size: int,
    world_size: int,
    steps_per_epoch: int,
    device: torch.device,
    lr_scale: float = 1.0,
) -> GanEngines:
    """Move G and D to ``device`` and wrap each in its own DeepSpeed engine with the recipe's Adam settings
    (:meth:`~pipeline.train.recipes.OptimizerSettings.build`) and LR schedule; ``lr_scale`` multiplies both base
    learning rates (``train.lr_scale``). D is first passed through ``recipe.prepare_discriminator`` (official
    LBAM: global-batch BatchNorm), so every engine trains the discriminator its recipe expects."""
    discriminator = recipe.prepare_discriminator(discriminator)
    ds_config = deepspeed_config(ds, micro_batch_size, world_size)
    # One ZeRO-0 rank has nothing to average, yet DeepSpeed's fallback all-reduce still flattens every gradient
    # into a buffer, reduces it and copies it back (ZeRO 1/2 reduce inside their own optimiser).
    reduce_gradients = world_size > 1 or ds.zero_stage > 0
    generator.to(device)
    discriminator.to(device)
    return GanEngines(
        generator=_engine(
            generator, recipe.generator_optimizer, recipe.lr_factor, steps_per_epoch, ds_config, lr_scale,
            reduce_gradients,
        ),
        discriminator=_engine(
            discriminator, recipe.discriminator_optimizer, recipe.lr_factor, steps_per_epoch, dict(ds_config),
            lr_scale, reduce_gradients,
        ),
    )


class DiscriminatorCaller(nn.Module):
    """The ``D`` handed to ``gan_step``: D's engine for the D loss on real and fake images, its bare module
    whenever a gradient must flow *through* D to its input.

    Every engine forward hooks its outputs so that a backward through them runs that engine's backward
    prologue (ZeRO bookkeeping, accumulation scaling). Two backwards pass through D without being D's own
    ``engine.backward``: G's loss (D frozen by ``gan_step``) and the gradient penalty's ``autograd.grad``
    with respect to the interpolates. Through the engine, DeepSpeed refuses both at ZeRO 0 and at ZeRO 1/2
    closes a gradient reduction that never started. Both are recognised by an input that requires grad (or
    frozen parameters) and go to the bare module; D's own backward still meets the engine's hooks through
    D(real) and D(fake).
    """

    def __init__(self, engine: Any) -> None:
        super().__init__()
        self.engine = engine
        self._first_param = next(engine.module.parameters())

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        inputs = [*args, *kwargs.values()]
        through_input = any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs)
        if self._first_param.requires_grad and not through_input:
            return self.engine(*args, **kwargs)
        return self.engine.module(*args, **kwargs)


def step_updater(engine: Any) -> Callable[[torch.Tensor], None]:
    """The ``update_g`` / ``update_d`` callback of ``gan_step``: backward and step through the engine.

    ``engine.step()`` only applies the optimiser at gradient-accumulation boundaries and handles loss scaling,
    clipping and ZeRO gradient reduction itself.
    """

    def update(loss: torch.Tensor) -> None:
        engine.backward(loss)
        engine.step()

    return update


@contextlib.contextmanager
def precision_context(precision: str, device: torch.device) -> Iterator[None]:
    """Autocast for the whole GAN step under bf16/fp16.

    DeepSpeed autocasts each engine's forward, but the GAN step also runs losses outside the engines (LBAM's
    frozen VGG for the perceptual loss, the gradient penalty); one autocast around the whole step gives every
    op the dtype it is safe in, so no dtype plumbing leaks into the recipe.
    """
    dtype = _DTYPES.get(precision)
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield
