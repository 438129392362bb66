"""Shared test settings: small thread pools (2-core CI), quiet third-party logging, deterministic seeds."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Keep every process of the suite (Ray workers included) from oversubscribing the 2 CI cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")

REPO = Path(__file__).resolve().parents[1]
# Jobs are scripts under jobs/; tests import helpers from tests/ and the packages from the repo root.
for path in (REPO, REPO / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


def pytest_collection_modifyitems(config, items):
    """``gpu``-marked tests need CUDA: skipped elsewhere with the reason (``make gpu-check`` runs them)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (make gpu-check)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield

# Session fixtures as plugins: one MLflow server / Ray head / registered tiny model for every module that uses them
# without importing them (a fixture imported into a module is a new fixture there, started again per module).
pytest_plugins = ["local_stack", "serving_helpers", "suite_log"]
