"""Whether this CPU runs bf16 convolutions natively, and the one-line refusal when it does not.

oneDNN has bf16 convolution kernels only for CPUs with AVX-512-BF16 or AMX. Elsewhere (every AVX2-only CPU,
and any CPU forced to ``ATEN_CPU_CAPABILITY=avx2`` / ``ONEDNN_MAX_CPU_ISA=AVX2``) it falls back to a reference
path: measured on a 2-core AVX2 machine, a 3x3 convolution (batch 4, 64 channels, 64x64) took 18.9 ms in fp32
and 4,540 ms in bf16, about 240x slower. A CPU training run asking for bf16 there would look hung, so the
training config refuses it up front (GPU workers are unaffected: CUDA has bf16 tensor cores).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["CpuBf16Support", "cpu_bf16_support", "SLOWDOWN_ORDER"]

# The order of the slowdown measured above; quoted in the refusal so the user knows why.
SLOWDOWN_ORDER = "~100-240x"


@dataclass(frozen=True)
class CpuBf16Support:
    """``capability``: what ATen dispatches to (``torch.backends.cpu.get_cpu_capability()``); ``native``: whether
    bf16 convolutions have hardware kernels (AVX-512 dispatch and AVX512_BF16 or AMX present)."""

    capability: str
    native: bool


def cpu_bf16_support() -> CpuBf16Support:
    """Read this process's CPU: ATen's dispatch capability and the bf16 instruction sets."""
    capability = torch.backends.cpu.get_cpu_capability()
    # An AVX2 dispatch (the hardware's, or one forced with ATEN_CPU_CAPABILITY) never reaches the bf16 kernels.
    hardware = bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return CpuBf16Support(capability=capability, native=capability.startswith("AVX512") and hardware)
