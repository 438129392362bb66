"""Reading a training checkpoint's files without pickle: ``weights_only`` for holefill's files and DeepSpeed's.

Checkpoints live under ``run.storage_path``, often a bucket prefix that jobs and people share: a file there that
needed pickle would run its author's code on every training worker, with the workers' credentials, at the next
resume. So every file a resume reads goes through :func:`load_checkpoint_file`: ``torch.load(weights_only=True)``
with an allow-list of the few plain-data classes DeepSpeed stores, and a file that needs anything else is refused
with :class:`CheckpointRefused`, one line naming the file and the globals it asks for. Nothing is unpickled first.

DeepSpeed 0.19's own ``TorchCheckpointEngine.load`` calls ``torch.load(weights_only=False)``;
:func:`use_weights_only_loads` replaces the ``load`` of each engine's checkpoint engine (its ``save`` and the rest
stay DeepSpeed's). What DeepSpeed stores, for ZeRO 0, 1 and 2 in fp32 and bf16 (torch autocast over fp32
parameters, see ``engines.deepspeed_config``): ``mp_rank_00_model_states.pt`` holds tensors, dicts, lists,
``torch.Size`` and strings only (the module, the client optimiser and LR-scheduler state dicts, the config, shapes);
ZeRO 1/2's ``zero_pp_rank_<r>_mp_rank_00_optim_states.pt`` add three DeepSpeed classes: ``ZeroStageEnum`` (an int
enum), ``fragment_address`` (a dataclass of two ints) and ``LossScaler`` (a static scale: attributes only). They
are :data:`DEEPSPEED_CHECKPOINT_GLOBALS`, named by import path: one a DeepSpeed upgrade removes is skipped (no file
of that version can hold it), and one it starts storing is refused by name, which the resume tests of every ZeRO
stage catch at the upgrade.
"""

from __future__ import annotations

import importlib
import pickle
import zipfile
from pathlib import Path
from typing import Any, Iterable

import torch

from pipeline.errors import chain, one_line

__all__ = [
    "DEEPSPEED_CHECKPOINT_GLOBALS",
    "CheckpointRefused",
    "WeightsOnlyLoads",
    "checkpoint_refusal",
    "deepspeed_checkpoint_globals",
    "load_checkpoint_file",
    "use_weights_only_loads",
]

DEEPSPEED_CHECKPOINT_GLOBALS = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
)
_REFUSAL = "refusing checkpoint file"


class CheckpointRefused(ValueError):
    """A checkpoint file that cannot be read without pickle, or is not what its name says: the run must not start."""


def deepspeed_checkpoint_globals() -> list[type]:
    """The classes of :data:`DEEPSPEED_CHECKPOINT_GLOBALS` this DeepSpeed has (imports DeepSpeed's modules)."""
    found = []
    for dotted in DEEPSPEED_CHECKPOINT_GLOBALS:
        module, _, name = dotted.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue  # renamed or gone in this DeepSpeed: files it writes cannot hold it
    return found


def _unsafe_globals(path: Path, allowed: Iterable[type]) -> list[str]:
    """The globals ``path``'s pickle asks for beyond torch's and ``allowed`` (read from its opcodes, never run)."""
    names = {f"{c.__module__}.{c.__qualname__}" for c in allowed}
    try:
        return [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) if g not in names]
    except (RuntimeError, ValueError, OSError, zipfile.BadZipFile, pickle.UnpicklingError):
        return []


def load_checkpoint_file(path: str | Path, map_location: Any = "cpu", allowed: Iterable[type] = (),
                         hint: str = "") -> Any:
    """``torch.load(path, weights_only=True)`` with the classes ``allowed`` besides torch's own.

    Raises :class:`CheckpointRefused` (one line naming ``path``; ``hint`` appended) when the file needs pickle,
    is missing or is not a torch file.
    """
    path = Path(path)
    allowed = list(allowed)
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        wanted = _unsafe_globals(path, allowed)
        if wanted:
            reason = f"it needs pickle to load ({', '.join(wanted[:4])})"
        else:  # torch's reason is the last of its many lines
            detail = str(exc).rpartition("WeightsUnpickler error:")[2].strip().splitlines()
            reason = f"it cannot be read weights_only ({detail[0][:200] if detail and detail[0] else 'not a torch file'})"
        raise CheckpointRefused(
            f"{_REFUSAL} {path}: {reason}, and holefill never unpickles checkpoints; the run does not start{hint}"
        ) from None
    except FileNotFoundError:
        raise CheckpointRefused(f"{_REFUSAL} {path}: the file is missing{hint}") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointRefused(f"{_REFUSAL} {path}: not a readable torch file ({one_line(exc, 200)}){hint}") from None


class WeightsOnlyLoads:
    """A DeepSpeed checkpoint engine whose ``load`` is :func:`load_checkpoint_file`; everything else (``save``,
    ``create``, ``commit``...) is the wrapped engine's."""

    def __init__(self, inner: Any, allowed: Iterable[type]) -> None:
        self._inner = inner
        self._allowed = list(allowed)

    def load(self, path: str, map_location: Any = None) -> Any:
        return load_checkpoint_file(path, map_location, self._allowed)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def use_weights_only_loads(engine: Any) -> None:
    """Make ``engine`` (a ``DeepSpeedEngine``) read every checkpoint file through :func:`load_checkpoint_file`.

    DeepSpeed reads its files through ``engine.checkpoint_engine`` only (``load_checkpoint`` →
    ``_load_checkpoint`` via its state-dict loader, ``_load_zero_checkpoint`` for the ZeRO shards). holefill's
    config never asks for another engine than DeepSpeed's ``TorchCheckpointEngine``; if a DeepSpeed version picks
    one, building the engine stops here rather than resume through loads holefill has not checked.
    """
    # lazy: importing DeepSpeed costs seconds; the engine exists, so it is imported already
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    inner = engine.checkpoint_engine
    if isinstance(inner, WeightsOnlyLoads):
        return
    if type(inner) is not TorchCheckpointEngine:
        raise RuntimeError(f"DeepSpeed chose the checkpoint engine {type(inner).__name__}; holefill reads "
                           "checkpoints through TorchCheckpointEngine only (weights_only)")
    engine.checkpoint_engine = WeightsOnlyLoads(inner, deepspeed_checkpoint_globals())


def checkpoint_refusal(exc: BaseException) -> str | None:
    """The one-line refusal inside a failed training run's error (Ray wraps a worker's exception), if any."""
    for error in chain(exc):
        if isinstance(error, CheckpointRefused):
            return one_line(error)
        text = str(error)
        if _REFUSAL in text:
            return text[text.index(_REFUSAL):].splitlines()[0]
    return None
