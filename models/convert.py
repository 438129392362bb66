"""Bring official RN / LBAM checkpoints into holefill modules, and load weight files safely.

``from_official(arch, part, state_dict)`` maps the state dict of the official code (key lists in
``tests/data/official_keys_*.txt``) to one the matching holefill module loads with ``strict=True``.
Every weight file is read with ``torch.load(weights_only=True)``: a file that needs pickle to load
(arbitrary code execution) is refused with a clear error.
"""

from __future__ import annotations

import io
import pickle
import re
from typing import Any, Mapping

import torch

from models.registry import get_architecture

__all__ = ["from_official", "load_weights_bytes", "load_weights_file", "extract_state_dict"]

# Containers the official training scripts wrap their state dicts in.
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_WRAPPER_KEYS = ("state_dict", "model", "generator", "netG", "G", "params")


def from_official(arch: str, part: str, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert an official ``arch`` (``"rn"``/``"lbam"``) ``part`` (``"generator"``/``"discriminator"``) state dict."""
    architecture = get_architecture(arch)
    try:
        convert = architecture.official_converters[part]
    except KeyError:
        raise ValueError(
            f"unknown part {part!r} for {arch}; expected one of {sorted(architecture.official_converters)}"
        ) from None
    # DataParallel checkpoints prefix every key with "module."; drop it so both forms convert.
    cleaned = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    return convert(cleaned)


def load_weights_file(path_or_url: str, storage_options: Mapping[str, Any] | None = None) -> Any:
    """Load a ``.pth``/``.pt`` file from a local path or any fsspec URL with ``weights_only=True``.

    Raises ``ValueError`` (one line) when the file is missing, is not a torch file, or needs pickle.
    """
    import fsspec

    try:
        with fsspec.open(path_or_url, "rb", **dict(storage_options or {})) as f:
            payload = f.read()
    except FileNotFoundError:
        raise ValueError(f"weights file not found: {path_or_url}") from None
    return load_weights_bytes(payload, path_or_url)


def load_weights_bytes(payload: bytes, name: str = "weights") -> Any:
    """Deserialise torch weights with ``weights_only=True``; ``name`` only labels error messages."""
    path_or_url = name
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch decorates this message with terminal escapes; a one-line error carries plain text only.
        text = _ANSI_ESCAPE.sub("", str(exc)).strip()
        # torch's first lines are general advice; the line naming what the file asked for is the reason.
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        named = [line for line in lines if "GLOBAL" in line or "Unsupported" in line or "error:" in line]
        first = (named or lines or ["unsafe pickle content"])[0]
        raise ValueError(
            f"refusing to load {path_or_url}: it needs pickle to load (only plain tensors are accepted): {first}"
        ) from None
    except (RuntimeError, EOFError) as exc:
        raise ValueError(f"{path_or_url} is not a readable torch weights file: {str(exc).splitlines()[0]}") from None


def extract_state_dict(payload: Any) -> dict[str, torch.Tensor]:
    """Find the tensor dict inside a loaded checkpoint (plain dict or one wrapped under a usual key)."""
    if isinstance(payload, Mapping):
        if payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
            return dict(payload)
        for key in _WRAPPER_KEYS:
            if isinstance(payload.get(key), Mapping):
                return extract_state_dict(payload[key])
    raise ValueError("checkpoint holds no state dict of tensors")
