"""What a training checkpoint holds, how every rank writes its part, and how a restarted worker reads it back.

Ray Train (V2) persists a reported checkpoint by copying each worker's local directory into **one**
storage directory whose name rank 0 chooses and broadcasts; files from different ranks are merged and a
file name written by two ranks is overwritten by whichever upload lands last. So every file here is either
written by exactly one rank or carries the rank in its name:

```
<checkpoint>/
  state.json                                  rank 0: step, world size, ZeRO stage, precision, arch
  generator.pt                                rank 0: consolidated fp32 generator state dict (for registration)
  generator/state/mp_rank_00_model_states.pt  rank 0: DeepSpeed module + client state of G
  generator/state/zero_pp_rank_<r>_mp_rank_00_optim_states.pt   every rank under ZeRO 1/2: its optimiser shard
  discriminator/...                           the same for D
  rng/rank_<r>.pt                             every rank: Python, NumPy, torch RNG states and its own GPU's
```

On restore, Ray downloads the whole merged directory to every worker, so each rank finds its own ZeRO shard
and RNG file beside rank 0's files. A rank saves and restores the CUDA RNG state of its own device only: a
node may expose a different number of GPUs to the restarted worker, and one rank must never reset another
rank's generator. ZeRO 0 checkpoints resume on any number of workers (ranks without an RNG file of their own
keep their fresh seeds); ZeRO 1/2 shards are only valid for the world size that wrote them, and a resume
on another one stops with a one-line error saying which settings to use.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pipeline.train.engines import GanEngines

__all__ = [
    "CHECKPOINT_TAG",
    "GENERATOR_FILE",
    "CheckpointState",
    "consolidated_generator_state",
    "load_generator_state",
    "restore_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]

CHECKPOINT_TAG = "state"
GENERATOR_FILE = "generator.pt"
STATE_FILE = "state.json"


@dataclass(frozen=True)
class CheckpointState:
    """The small, human-readable part of a checkpoint (``state.json``)."""

    step: int
    world_size: int
    zero_stage: int
    precision: str
    arch: str


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's RNG states: Python, NumPy, torch's CPU generator and, on a GPU, ``device``'s only."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_device"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore :func:`rng_state`; the CUDA state goes to ``device`` (whatever its index was when saved)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda_device" in state:
        torch.cuda.set_rng_state(state["cuda_device"], device)


def _device(engines: GanEngines) -> torch.device:
    return next(engines.generator.module.parameters()).device


def consolidated_generator_state(engine: Any) -> dict[str, torch.Tensor]:
    """Full fp32 state dict of the engine's module, on CPU.

    Every rank holds the full fp32 weights: ZeRO 1/2 partition only optimiser state and gradients, and
    bf16/fp16 run as autocast over fp32 parameters (see ``engines.deepspeed_config``), so nothing needs
    gathering.
    """
    return {name: t.detach().float().cpu().clone() if t.is_floating_point() else t.detach().cpu().clone()
            for name, t in engine.module.state_dict().items()}


def save_checkpoint(directory: str | Path, engines: GanEngines, state: CheckpointState, rank: int) -> None:
    """Write this rank's part of a checkpoint into the local ``directory`` (collective: every rank calls it)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # DeepSpeed writes module states from rank 0 and ZeRO shards from every rank, each under a rank-unique name.
    engines.generator.save_checkpoint(str(directory / "generator"), tag=CHECKPOINT_TAG, save_latest=False)
    engines.discriminator.save_checkpoint(str(directory / "discriminator"), tag=CHECKPOINT_TAG, save_latest=False)
    (directory / "rng").mkdir(exist_ok=True)
    torch.save(rng_state(_device(engines)), directory / "rng" / f"rank_{rank}.pt")
    if rank == 0:
        torch.save(consolidated_generator_state(engines.generator), directory / GENERATOR_FILE)
        (directory / STATE_FILE).write_text(json.dumps(asdict(state), indent=2, sort_keys=True))


def read_state(directory: str | Path) -> CheckpointState:
    """The ``state.json`` of a (downloaded) checkpoint directory."""
    path = Path(directory) / STATE_FILE
    try:
        return CheckpointState(**json.loads(path.read_text()))
    except FileNotFoundError:
        raise ValueError(f"checkpoint {directory} has no {STATE_FILE}: not a holefill training checkpoint") from None


def restore_checkpoint(directory: str | Path, engines: GanEngines, *, rank: int, world_size: int, zero_stage: int, arch: str) -> CheckpointState:
    """Load both engines (weights, optimiser shards, LR schedulers) and this rank's RNG state; return the state."""
    directory = Path(directory)
    state = read_state(directory)
    if state.arch != arch:
        raise ValueError(f"checkpoint {directory} holds a {state.arch} model, this run trains {arch}")
    if state.zero_stage != zero_stage or (zero_stage > 0 and state.world_size != world_size):
        # ZeRO 1/2 optimiser shards are cut for one world size; ZeRO 0 state is whole and resumes anywhere.
        workers = f" and scaling.num_workers={state.world_size}" if state.zero_stage > 0 else ""
        raise ValueError(
            f"checkpoint {directory} was written with ZeRO stage {state.zero_stage} by {state.world_size} workers; "
            f"resume with deepspeed.zero_stage={state.zero_stage}{workers} (or start a new run.name)"
        )
    for name, engine in (("generator", engines.generator), ("discriminator", engines.discriminator)):
        path, _ = engine.load_checkpoint(
            str(directory / name), tag=CHECKPOINT_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise ValueError(f"checkpoint {directory}: DeepSpeed could not load the {name} engine state")
    rng_file = directory / "rng" / f"rank_{rank}.pt"
    if rng_file.exists():
        # weights_only=False: NumPy's RNG state is a tuple holding an ndarray; the file is our own, never user data.
        set_rng_state(torch.load(rng_file, weights_only=False), _device(engines))
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return state


def load_generator_state(directory: str | Path) -> dict[str, torch.Tensor]:
    """The consolidated fp32 generator weights of a checkpoint (tensors only, loaded with ``weights_only``)."""
    return torch.load(Path(directory) / GENERATOR_FILE, map_location="cpu", weights_only=True)
