"""What a training checkpoint holds, how every rank writes its part, and how a restarted worker reads it back.

Ray Train (V2) persists a reported checkpoint by copying each worker's local directory into **one**
storage directory whose name rank 0 chooses and broadcasts; files from different ranks are merged and a
file name written by two ranks is overwritten by whichever upload lands last. So every file here is either
written by exactly one rank or carries the rank in its name:

```
<checkpoint>/
  state.json                                  rank 0: step, world size, ZeRO stage, precision, arch, generator_kwargs
  generator.pt                                rank 0: the generator record (models.record: arch, keywords, fp32
                                              weights, provenance), what registration and every --model reads
  generator/state/mp_rank_00_model_states.pt  rank 0: DeepSpeed module + client state of G
  generator/state/zero_pp_rank_<r>_mp_rank_00_optim_states.pt   every rank under ZeRO 1/2: its optimiser shard
  discriminator/...                           the same for D
  rng/rank_<r>.pt                             every rank: Python, NumPy, torch RNG states and its own GPU's,
                                              as tensors and ints (RNG_FORMAT)
```

On restore, Ray downloads the whole merged directory to every worker, so each rank finds its own ZeRO shard
and RNG file beside rank 0's files. A rank saves and restores the CUDA RNG state of its own device only: a
node may expose a different number of GPUs to the restarted worker, and one rank must never reset another
rank's generator. ZeRO 0 checkpoints resume on any number of workers (ranks without an RNG file of their own
keep their fresh seeds); ZeRO 1/2 shards are only valid for the world size that wrote them, and a resume
on another one stops with a one-line error saying which settings to use.

Every file a resume reads is read ``weights_only`` (:mod:`pipeline.train.safe_checkpoint`; DeepSpeed's through
the engines' checkpoint engine): a file that needs pickle is refused in one line naming it, and the run does
not start.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.distributed as dist

from models.record import GeneratorRecord
from pipeline.errors import one_line
from pipeline.fsutil import fsync_file, fsync_folder
from pipeline.generators import CHECKPOINT_GENERATOR, CHECKPOINT_STATE, read_generator
from pipeline.train.engines import GanEngines
from pipeline.train.safe_checkpoint import CheckpointRefused, load_checkpoint_file

__all__ = [
    "CHECKPOINT_TAG",
    "GENERATOR_FILE",
    "CheckpointState",
    "consolidated_generator_state",
    "load_generator_record",
    "make_durable",
    "restore_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]

CHECKPOINT_TAG = "state"
GENERATOR_FILE = CHECKPOINT_GENERATOR
STATE_FILE = CHECKPOINT_STATE


@dataclass(frozen=True)
class CheckpointState:
    """The small, human-readable part of a checkpoint (``state.json``)."""

    step: int
    world_size: int
    zero_stage: int
    precision: str
    arch: str
    generator_kwargs: dict[str, Any] = field(default_factory=dict)  # non-default keywords; {} in older checkpoints


RNG_FORMAT = "holefill.rng/2"
_MT_WORDS = 624  # Mersenne Twister state words (Python's random and NumPy's legacy RandomState alike)


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's RNG states as tensors and ints (``weights_only``-loadable): Python, NumPy, torch's CPU
    generator and, on a GPU, ``device``'s only."""
    version, words, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "format": RNG_FORMAT,
        "python": {"version": version, "state": torch.tensor(words, dtype=torch.int64), "gauss_next": gauss_next},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda_device"] = torch.cuda.get_rng_state(device)
    return state


def _words(value: Any, count: int, what: str) -> list[int]:
    if not (isinstance(value, torch.Tensor) and value.dtype == torch.int64 and tuple(value.shape) == (count,)):
        raise ValueError(f"{what} is not {count} int64 words")
    if bool(((value < 0) | (value >= 1 << 32)).any()):
        raise ValueError(f"{what} holds values outside 32 bits")
    return value.tolist()


def set_rng_state(state: Any, device: torch.device) -> None:
    """Restore :func:`rng_state`; the CUDA state goes to ``device`` (whatever its index was when saved).

    ``state`` comes from a file: anything but what :func:`rng_state` writes raises ``ValueError`` (one line)
    before any generator is touched."""
    if not isinstance(state, dict) or state.get("format") != RNG_FORMAT:
        raise ValueError(f"not an RNG state of format {RNG_FORMAT}")
    try:
        python, numpy_state = state["python"], state["numpy"]
        gauss_next = python["gauss_next"]
        if not (gauss_next is None or isinstance(gauss_next, float)):
            raise ValueError("python.gauss_next is not a float or None")
        python_state = (int(python["version"]), tuple(_words(python["state"], _MT_WORDS + 1, "python.state")),
                        gauss_next)
        pos, has_gauss = int(numpy_state["pos"]), int(numpy_state["has_gauss"])
        if numpy_state["kind"] != "MT19937" or not 0 <= pos <= _MT_WORDS or has_gauss not in (0, 1):
            raise ValueError("numpy is not an MT19937 state")
        numpy_state = ("MT19937", np.asarray(_words(numpy_state["keys"], _MT_WORDS, "numpy.keys"), dtype=np.uint32),
                       pos, has_gauss, float(numpy_state["cached_gaussian"]))
        cpu, cuda = state["torch"], state.get("cuda_device")
        for name, value in (("torch", cpu), ("cuda_device", cuda)):
            if value is not None and not (isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() == 1):
                raise ValueError(f"{name} is not a uint8 RNG state tensor")
        if cpu.numel() != torch.get_rng_state().numel():
            raise ValueError("torch is not a CPU generator state")
        # Checked above, or by the setter itself (Python's version, the CUDA state) before it changes anything.
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(cpu)
        if device.type == "cuda" and cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"not an RNG state of format {RNG_FORMAT}: {one_line(exc, 200)}") from None


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


def save_checkpoint(directory: str | Path, engines: GanEngines, state: CheckpointState, rank: int,
                    provenance: Mapping[str, str] | None = None) -> None:
    """Write this rank's part of a checkpoint into the local ``directory`` (collective: every rank calls it).

    ``provenance`` (strings: run name, MLflow run id, ...) goes into the generator record with the step."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # DeepSpeed writes module states from rank 0 and ZeRO shards from every rank, each under a rank-unique name.
    engines.generator.save_checkpoint(str(directory / "generator"), tag=CHECKPOINT_TAG, save_latest=False)
    engines.discriminator.save_checkpoint(str(directory / "discriminator"), tag=CHECKPOINT_TAG, save_latest=False)
    (directory / "rng").mkdir(exist_ok=True)
    torch.save(rng_state(_device(engines)), directory / "rng" / f"rank_{rank}.pt")
    if rank == 0:
        record = GeneratorRecord(state.arch, state.generator_kwargs, consolidated_generator_state(engines.generator),
                                 {"kind": "training run", **dict(provenance or {}), "step": str(state.step)})
        torch.save(record.to_payload(), directory / GENERATOR_FILE)
        (directory / STATE_FILE).write_text(json.dumps(asdict(state), indent=2, sort_keys=True))


def make_durable(directory: str | Path, rank: int) -> None:
    """After Ray copied a checkpoint into local storage: ``fsync`` this rank's small files there (``state.json``
    and the generator record on rank 0, its ``rng/rank_<n>.pt``) and the folders naming them, so a power loss
    cannot leave a 0-byte ``state.json`` in a checkpoint Ray lists. DeepSpeed's large files are Ray's copy's
    business. A file that is not there (another rank's) is skipped."""
    directory = Path(directory).expanduser()
    files = [directory / "rng" / f"rank_{rank}.pt"]
    if rank == 0:
        files += [directory / STATE_FILE, directory / GENERATOR_FILE]
    for path in files:
        if path.is_file():
            fsync_file(str(path))
    for folder in (directory / "rng", directory, directory.parent):
        fsync_folder(str(folder))


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
        # An RNG file of holefill before RNG_FORMAT 2 held NumPy's state as a pickled ndarray: refused, never unpickled.
        rng = load_checkpoint_file(rng_file, hint=f" (a checkpoint from before {RNG_FORMAT} resumes with fresh RNG "
                                                   "states once its rng/ folder is deleted)")
        try:
            set_rng_state(rng, _device(engines))
        except ValueError as exc:
            raise CheckpointRefused(f"refusing checkpoint file {rng_file}: {exc}") from None
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return state


def load_generator_record(directory: str | Path) -> GeneratorRecord:
    """The generator record of a (downloaded) checkpoint: :func:`pipeline.generators.read_generator` (checkpoints
    written before records, holding a plain state dict, read too)."""
    return read_generator(str(directory))
