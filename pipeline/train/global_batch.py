"""Statistics over the global batch (every rank's micro-batch together), as one process sees them.

The official RN and LBAM steps ran in one process on the whole batch: LBAM's discriminator BatchNorm saw
all 16 images, RN's hole L1 divided by the hole fraction of the whole batch. Split over data-parallel
ranks, each rank sees only its slice; official mode restores the global view with these two pieces:

* :func:`global_mean`: a detached scalar averaged over ranks (one all-reduce, no host read);
* :class:`GlobalBatchNorm2d`: ``BatchNorm2d`` whose training statistics are all-reduced over ranks.

Both are exact no-ops with one rank (or without a process group): the local computation *is* the global one.

Why not ``nn.SyncBatchNorm``: it refuses CPU tensors (gloo workers) and its backward is differentiable only
once, while LBAM's gradient penalty differentiates the discriminator twice. ``GlobalBatchNorm2d`` builds
the statistics from an all-reduce whose backward is itself that all-reduce, so first and second derivatives
flow across ranks on gloo and NCCL alike.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["GlobalBatchNorm2d", "distributed_world", "global_mean", "use_global_batch_norm"]


def distributed_world() -> int:
    """Number of ranks in the default process group (1 when there is none)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def global_mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar ``value`` over all ranks, detached (one all-reduce; ``value`` itself with one rank).

    Every rank must call it the same number of times (it is a collective). The value is read on the device:
    no host synchronisation.
    """
    world = distributed_world()
    value = value.detach().float()
    if world == 1:
        return value
    total = value.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)  # gloo has no AVG
    return total / world


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward is the same sum of the gradient (itself differentiable: double backward)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _AllReduceSum.apply(grad)


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    return _AllReduceSum.apply(tensor)


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that, in training mode, normalises with the mean and variance of the global batch.

    The state dict is BatchNorm2d's (weight, bias, running_mean, running_var, num_batches_tracked), so
    checkpoints load either way. Two all-reduces per call (sum, then sum of squared deviations: the stable
    two-pass variance), computed in float32; running statistics are updated from the global statistics
    with the unbiased variance, as BatchNorm2d does. Eval mode and single-rank runs are plain BatchNorm2d.
    Every rank must run the same forwards and backwards (true of data-parallel GAN steps).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or distributed_world() == 1:
            return super().forward(x)
        self._check_input_dim(x)
        dims = (0, 2, 3)
        x32 = x.float()
        local_count = x32.new_full((1,), float(x32.numel() // x32.shape[1]))
        sums = _all_reduce_sum(torch.cat([x32.sum(dim=dims), local_count]))
        count = sums[-1].detach()
        mean = sums[:-1] / count
        centred = x32 - mean.view(1, -1, 1, 1)
        var = _all_reduce_sum(centred.square().sum(dim=dims)) / count
        y = centred * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        if self.affine:
            y = y * self.weight.float().view(1, -1, 1, 1) + self.bias.float().view(1, -1, 1, 1)
        if self.track_running_stats and self.running_mean is not None:
            self._update_running_stats(mean.detach(), var.detach(), count)
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        unbiased = var * count / (count - 1).clamp_min(1)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)


def use_global_batch_norm(module: nn.Module) -> nn.Module:
    """Turn every ``nn.BatchNorm2d`` inside ``module`` into a :class:`GlobalBatchNorm2d`, in place; returns it.

    Parameters and buffers are kept as they are (only the class changes), so optimisers built before or after,
    state dicts and official checkpoints are unaffected.
    """
    for layer in module.modules():
        if type(layer) is nn.BatchNorm2d:
            layer.__class__ = GlobalBatchNorm2d
    return module

