"""Reading reference weight files for the metric networks: hashed, ``weights_only``, strictly checked.

The metric networks (FID Inception, LPIPS) are only meaningful with the exact reference weights, so a file
that misses an entry, has an extra one or has one of another shape is refused with the offending keys
named, never loaded partially. The file's sha256 travels with the weights so every metric can say which
network produced it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch

from models.convert import extract_state_dict, load_weights_bytes

__all__ = ["WeightsFile", "check_state_dict", "read_weights_file"]


@dataclass(frozen=True)
class WeightsFile:
    """A state dict read from ``source`` and the sha256 of the file's bytes."""

    source: str
    sha256: str
    state_dict: dict[str, torch.Tensor]


def read_weights_file(path_or_url: str, storage_options: Mapping[str, Any] | None = None) -> WeightsFile:
    """Read a ``.pth`` from a local path or fsspec URL with ``weights_only=True`` and hash its bytes.

    Raises ``ValueError`` (one line) when the file is missing, unreadable, needs pickle or holds no state dict.
    """
    import fsspec

    try:
        with fsspec.open(path_or_url, "rb", **dict(storage_options or {})) as handle:
            payload = handle.read()
    except FileNotFoundError:
        raise ValueError(f"weights file not found: {path_or_url}") from None
    state = extract_state_dict(load_weights_bytes(payload, path_or_url))
    return WeightsFile(path_or_url, hashlib.sha256(payload).hexdigest(), state)


def check_state_dict(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], what: str,
                     ignore: Iterable[str] = ()) -> None:
    """Require ``given`` to hold exactly ``expected``'s keys with the same shapes (``ignore``: keys allowed extra).

    ``what`` names the file or layout in the one-line ``ValueError``.
    """
    ignored = set(ignore)
    missing = sorted(k for k in expected if k not in given)
    unexpected = sorted(k for k in given if k not in expected and k not in ignored)
    misshaped = [f"{k} {tuple(given[k].shape)} (expected {tuple(expected[k].shape)})"
                 for k in expected if k in given and tuple(given[k].shape) != tuple(expected[k].shape)]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if keys:
            shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
            problems.append(f"{label} {shown}")
    if problems:
        raise ValueError(f"{what}: " + "; ".join(problems))
