"""Count the places a training step waits for the device: host reads of tensor values and explicit syncs.

A GPU step is fast only while the CPU queues kernels ahead of the GPU. Every read of a device value back to
the host (``.item()``, ``bool(t)``, ``float(t)``, ``.tolist()``, ``.cpu()``, ...) and every
``synchronize()`` drains that queue. Two counters:

* :func:`count_host_reads` works on any device, the CPU included: a ``TorchFunctionMode`` sees every such
  read, and DeepSpeed's accelerator ``synchronize`` (its throughput timer's) is counted too. On CPU nothing
  actually waits, so this is the proxy the CPU tests use for "would sync on a GPU".
* :func:`count_cuda_syncs` asks CUDA itself (``torch.cuda.set_sync_debug_mode``): every synchronising call
  warns, and the warnings are counted. GPU only.
"""

from __future__ import annotations

import collections
import contextlib
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["HOST_READS", "SyncCount", "count_cuda_syncs", "count_host_reads"]

# Tensor methods whose result is a host value (or host copy) of the tensor's data.
HOST_READS: frozenset[Callable[..., Any]] = frozenset({
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.__bool__,
    torch.Tensor.__float__,
    torch.Tensor.__int__,
    torch.Tensor.__index__,
    torch.Tensor.numpy,
    torch.Tensor.cpu,
})


@dataclass
class SyncCount:
    """How many host reads / syncs were seen, and where (``file:line`` of the caller -> count)."""

    total: int = 0
    sites: collections.Counter = field(default_factory=collections.Counter)

    def add(self, what: str) -> None:
        self.total += 1
        self.sites[f"{what} at {_caller()}"] += 1

    def report(self) -> str:
        """One line per site, most frequent first (for assertion messages)."""
        return "; ".join(f"{count}x {site}" for site, count in self.sites.most_common()) or "none"


def _caller() -> str:
    # The innermost frame outside torch's dispatch machinery and this module: the code that asked for the value.
    for frame in reversed(traceback.extract_stack()[:-2]):
        name = frame.filename
        if name != __file__ and "torch/overrides" not in name and "torch/utils/_device" not in name:
            return f"{name}:{frame.lineno}"
    return "?"


class _HostReadMode(TorchFunctionMode):
    def __init__(self, count: SyncCount) -> None:
        super().__init__()
        self.count = count

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            self.count.add(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_host_reads() -> Iterator[SyncCount]:
    """Count host reads of tensor values, and DeepSpeed accelerator ``synchronize`` calls, inside the block."""
    count = SyncCount()
    patched = _patch_accelerator_synchronize(count)
    try:
        with _HostReadMode(count):
            yield count
    finally:
        patched()


def _patch_accelerator_synchronize(count: SyncCount) -> Callable[[], None]:
    try:
        from deepspeed.accelerator import get_accelerator
    except ImportError:
        return lambda: None
    accelerator = get_accelerator()
    original = accelerator.synchronize

    def synchronize(*args: Any, **kwargs: Any) -> Any:
        count.add("accelerator.synchronize")
        return original(*args, **kwargs)

    accelerator.synchronize = synchronize
    return lambda: setattr(accelerator, "synchronize", original)


@contextlib.contextmanager
def count_cuda_syncs() -> Iterator[SyncCount]:
    """Count CUDA synchronisations inside the block via ``torch.cuda.set_sync_debug_mode("warn")``."""
    count = SyncCount()
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield count
        finally:
            torch.cuda.set_sync_debug_mode(previous)
            for warning in caught:
                if "synchroniz" in str(warning.message):
                    count.total += 1
                    count.sites[f"{warning.filename}:{warning.lineno}"] += 1
