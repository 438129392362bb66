"""Rebuild the closed-form pattern weights of ``shared/reference/PATTERN.md`` from official key names.

The official code was run with every state-dict entry overwritten by this pattern; the outputs are stored
in ``tests/data/official_pattern_A.pt``. Rebuilding the same weights here, converting them with
``models.convert.from_official`` and comparing outputs proves the re-implementation computes what the
official code computes.
"""

from __future__ import annotations

import re
import zlib
from pathlib import Path

import numpy as np
import torch

DATA = Path(__file__).resolve().parents[1] / "data"
PATTERN_FILE = DATA / "official_pattern_A.pt"
_M = 0xFFFFFFFF

# Official initial values of LBAM's asymmetric Gaussian activation parameters.
_LBAM_GA_FORWARD = {"a": 1.1, "mu": 2.0, "sigma1": 1.0, "sigma2": 1.0}
_LBAM_GA_REVERSE = {"a": 1.1, "mu": 1.0, "sigma1": 0.5, "sigma2": 0.5}


def pattern_values(key: str, n: int, case: str = "A") -> np.ndarray:
    """The pattern's n values in [-1, 1) (float64) for the entry named ``key``."""
    seed = zlib.crc32((key + case).encode("utf-8")) & _M
    h = (np.arange(n, dtype=np.int64) * 2654435761 + seed) & _M
    h ^= h >> 15
    h = (h * 2246822519) & _M
    h ^= h >> 13
    h = (h * 3266489917) & _M
    h ^= h >> 16
    return h.astype(np.float64) / 2**32 * 2 - 1


def pattern_tensor(key: str, shape: tuple[int, ...], case: str = "A") -> torch.Tensor:
    """One state-dict entry of the pattern, exceptions of PATTERN.md included."""
    n = int(np.prod(shape)) if shape else 1
    if key.endswith("running_mean"):
        return torch.zeros(shape)
    if key.endswith("running_var"):
        return torch.ones(shape)
    if key.endswith("num_batches_tracked"):
        return torch.zeros(shape, dtype=torch.long)
    match = re.search(r"(ec\d+|reverseConv\d+)\..*activationFuncG_A\.(a|mu|sigma1|sigma2)$", key)
    if match:
        table = _LBAM_GA_FORWARD if match.group(1).startswith("ec") else _LBAM_GA_REVERSE
        return torch.full(shape, table[match.group(2)], dtype=torch.float32)
    v = pattern_values(key, n, case)
    if key.endswith("weight_u") or key.endswith("weight_v"):
        v = v / np.linalg.norm(v)
    elif len(shape) >= 2:
        v = v / np.sqrt(n / shape[0])
    elif len(shape) == 1:
        v = v * 0.1
    return torch.from_numpy(v.astype(np.float32)).reshape(shape)


def official_keys(arch: str, part: str) -> list[tuple[str, tuple[int, ...], str]]:
    """(key, shape, dtype) rows of an official state dict, read from ``official_keys_{arch}.txt``."""
    section = {"generator": 0, "discriminator": 1}[part]
    rows: list[list[tuple[str, tuple[int, ...], str]]] = []
    for line in (DATA / f"official_keys_{arch}.txt").read_text().splitlines():
        if line.startswith("# ====="):
            rows.append([])
        elif line and not line.startswith("#"):
            key, shape, _n, dtype = line.split("\t")
            dims = tuple(int(d) for d in shape.strip("[]").split(",") if d.strip())
            rows[-1].append((key, dims, dtype))
    return rows[section]


def official_pattern_state_dict(arch: str, part: str, case: str = "A") -> dict[str, torch.Tensor]:
    """The official-keyed state dict filled with the pattern."""
    out = {}
    for key, shape, dtype in official_keys(arch, part):
        t = pattern_tensor(key, shape, case)
        out[key] = t.long() if dtype.startswith("int") else t
    return out


def load_reference() -> dict[str, torch.Tensor]:
    """The official outputs under the pattern weights (image, hole_mask, rn_G_out, ...)."""
    return torch.load(PATTERN_FILE, weights_only=True)
