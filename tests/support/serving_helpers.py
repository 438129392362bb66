"""Helpers for the serving tests: tiny registered generators, encoded requests, an environment without holefill."""

from __future__ import annotations

import io
import os
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.registry import get_architecture
from pipeline.lifecycle.packaging import HiresSettings, ServingDefaults, log_and_register_generator
from pipeline.tracking import RunTracker

# RN with one residual block: the real architecture, quick to build, save and run on a 2-core machine.
TINY_RN = {"residual_blocks": 1}


# LBAM at 1/8 width: the real architecture, exported and verified in seconds (RN's export takes far longer).
TINY_LBAM = {"width": 0.125}
TINY = {"rn": TINY_RN, "lbam": TINY_LBAM}


def register_tiny(tracking_uri: str, name: str, arch: str = "rn", seed: int = 0,
                  serving: ServingDefaults | None = None, size: int | None = None):
    """Register a randomly initialised tiny ``arch`` (:data:`TINY`) under ``name``; returns the ``ModelVersion``."""
    torch.manual_seed(seed)
    size = size or max(32, get_architecture(arch).size_multiple)
    generator = get_architecture(arch).generator(**TINY[arch]).eval()
    image = torch.rand(1, 3, size, size)
    mask = torch.zeros(1, 1, size, size)
    mask[..., size // 4: size // 2, size // 4: size // 2] = 1
    tracker = RunTracker.start_or_resume(tracking_uri, "serving-test", f"{name}-{seed}")
    try:
        return log_and_register_generator(tracking_uri, tracker.run_id, generator, image, mask, name,
                                          arch=arch, generator_kwargs=TINY[arch], serving=serving)
    finally:
        tracker.finish()


def register_tiny_rn(tracking_uri: str, name: str, seed: int = 0, serving: ServingDefaults | None = None,
                     size: int = 32):
    """Register a randomly initialised tiny RN under ``name``; returns the ``ModelVersion``."""
    return register_tiny(tracking_uri, name, "rn", seed, serving, size)


TINY_CHAMPION = "tiny-rn"
TINY_MAX_PIXELS = 200_000


@pytest.fixture(scope="session")
def tiny_champion(mlflow_server) -> str:
    """``models:/tiny-rn@champion`` (its version): one tiny RN registered once per session (200 000-pixel limit, 64-px windows).

    Shared by the serving, packaging and export tests, which only read it (the Ray Serve test moves the alias
    of a model of its own).
    """
    from mlflow import MlflowClient

    version = register_tiny_rn(mlflow_server, TINY_CHAMPION, serving=small_windows(max_pixels=TINY_MAX_PIXELS))
    MlflowClient(mlflow_server).set_registered_model_alias(TINY_CHAMPION, "champion", version.version)
    return version.version


TINY_MAX_WHOLE_PIXELS = 100_000
TINY_MAX_WINDOWS = 4


def small_windows(max_pixels: int = 1_000_000) -> ServingDefaults:
    """Serving defaults that send even a 300x451 photo through 64-pixel windows (fast, and exercises the strategy),
    at most 4 windows an image and whole images up to 100 000 pixels."""
    return ServingDefaults(max_pixels=max_pixels, max_whole_pixels=TINY_MAX_WHOLE_PIXELS,
                           hires=HiresSettings(strategy="crop", margin=8, trigger=128, limit=64,
                                               max_windows=TINY_MAX_WINDOWS))


def scattered_holes(height: int, width: int, every: int = 12) -> np.ndarray:
    """A (H,W) uint8 mask with a one-pixel hole every ``every`` pixels: a window explosion for a naive crop strategy."""
    mask = np.zeros((height, width), np.uint8)
    mask[::every, ::every] = 255
    return mask


def hostile_bodies(max_pixels: int) -> dict[str, bytes]:
    """Encoded hostile images that are small to send: formats outside the allow-list and a decode bomb."""
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n(/etc/passwd) (r) file\nshowpage\n%%EOF\n"
    dds = b"DDS " + (124).to_bytes(4, "little") + bytes(120)
    side = int(max_pixels ** 0.5) + 50
    return {"TGA": encode(photo(16, 16), "TGA"), "SGI": encode(photo(16, 16), "SGI"), "EPS": eps, "DDS": dds,
            "BMP": encode(photo(16, 16), "BMP"), "bomb": encode(np.zeros((side, side), np.uint8))}


def photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A (H,W,3) uint8 picture with structure (gradients plus noise), like a small photo."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), (x + y) % 256], axis=-1)
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def hole_mask(height: int, width: int) -> np.ndarray:
    """A (H,W) uint8 mask, 255 = hole: one rectangle off-centre."""
    mask = np.zeros((height, width), np.uint8)
    mask[height // 3: height // 2, width // 4: width // 2] = 255
    return mask


def encode(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


# Installed by the editable holefill install's .pth file, it maps pipeline/models/jobs/infra to a checkout.
_BLOCKER = textwrap.dedent('''
    """Remove holefill from this interpreter: the editable install's finder and any checkout on sys.path."""
    import sys
    def _editable(hook):
        return "__editable__" in getattr(hook, "__module__", "") or "__editable__" in getattr(hook, "__name__", "")
    sys.meta_path[:] = [f for f in sys.meta_path if not _editable(f)]
    sys.path_hooks[:] = [h for h in sys.path_hooks if not _editable(h)]
    sys.path_importer_cache.clear()
    _roots = {r for r in {ROOTS!r}}
    sys.path[:] = [p for p in sys.path if p.rstrip("/") not in _roots]
''')


def environment_without_holefill(folder: Path, repo: Path) -> dict[str, str]:
    """Environment variables for a subprocess in which ``pipeline``, ``models`` and ``holefill`` cannot be imported.

    The venv's editable holefill install puts a meta-path finder in every interpreter (via a .pth file), so
    unsetting PYTHONPATH is not enough: a ``sitecustomize`` (imported after the .pth files) removes that
    finder and any checkout from ``sys.path``. Run the subprocess from a folder that holds no checkout.
    """
    roots = sorted({str(repo.resolve()), str(Path(sys.prefix).resolve().parent)})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(_BLOCKER.replace("{ROOTS!r}", repr(roots)))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["PYTHONPATH"] = str(folder)
    # As in an activated venv: `mlflow models serve` execs `uvicorn` from PATH.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env
