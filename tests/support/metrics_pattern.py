"""The deterministic weights under which ``tests/data/metrics_pattern.pt`` was made (``shared/reference/METRICS.md``).

torch-fidelity's Inception and lpips' LPIPS were run with every state-dict entry overwritten by the closed-form
pattern of ``PATTERN.md`` (case letter ``M``) with the metric rules below; rebuilding the same state dicts from
the key lists and loading them into holefill's networks must give the same outputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from support.pattern_weights import pattern_values

DATA = Path(__file__).resolve().parents[1] / "data"
REFERENCE_FILE = DATA / "metrics_pattern.pt"
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)


def metric_keys(name: str) -> list[tuple[str, tuple[int, ...], str]]:
    """(key, shape, dtype) rows of ``metrics_keys_<name>.txt`` (``inception``, ``lpips_vgg``, ``lpips_alex``)."""
    rows = []
    for line in (DATA / f"metrics_keys_{name}.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape, _n, dtype = line.split("\t")
            rows.append((key, tuple(int(d) for d in shape.strip("[]").split(",") if d.strip()), dtype))
    return rows


def _pattern(key: str, shape: tuple[int, ...]) -> np.ndarray:
    n = int(np.prod(shape)) if shape else 1
    v = pattern_values(key, n, "M")
    if len(shape) >= 2:
        return v / np.sqrt(n / shape[0]) * np.sqrt(6)
    return v * 0.1


def metric_pattern_tensor(key: str, shape: tuple[int, ...], dtype: str) -> torch.Tensor:
    """One entry of the metrics pattern (rules of METRICS.md)."""
    if key.endswith("running_mean") or key.endswith("running_var") or key.endswith("num_batches_tracked"):
        fill = 1.0 if key.endswith("running_var") else 0.0
        return torch.full(shape, fill, dtype=torch.long if dtype.startswith("int") else torch.float32)
    if key.startswith("scaling_layer."):
        values = LPIPS_SHIFT if key.endswith("shift") else LPIPS_SCALE
        return torch.tensor(values, dtype=torch.float32).view(shape)
    if key.startswith("lins."):  # lpips registers each head twice: one tensor, the pattern of the linK name
        index, rest = key[len("lins."):].split(".", 1)
        key = f"lin{index}.{rest}"
    value = _pattern(key, shape)
    if key.startswith("lin"):
        value = np.abs(value)
    elif key.endswith(".bn.weight"):
        value = 1 + value
    return torch.from_numpy(value.astype(np.float32)).reshape(shape)


def metric_pattern_state_dict(name: str) -> dict[str, torch.Tensor]:
    """The reference-layout state dict of ``name`` filled with the metrics pattern."""
    return {key: metric_pattern_tensor(key, shape, dtype) for key, shape, dtype in metric_keys(name)}


def load_metrics_reference() -> dict[str, torch.Tensor]:
    """Outputs of torch-fidelity / lpips under the pattern weights (see METRICS.md for the keys)."""
    return torch.load(REFERENCE_FILE, weights_only=True)
