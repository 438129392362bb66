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

TESTS = Path(__file__).resolve().parent
# The shared helpers are the `support` package in tests/ (pytest puts this folder first on sys.path too); holefill's
# packages come from the editable install (`make test`).
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

import pytest  # noqa: E402
import torch  # noqa: E402

# Under pytest-xdist (`make test` runs two workers) each worker keeps to one core's worth of threads.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)

# Tests that use the suite's services (one Ray head, one MLflow server, one S3 endpoint per session), or start
# clusters and servers of their own, run in one xdist worker: the services start once, and two e2e tests never
# fight over the same 2 cores' worth of Ray workers. Everything else spreads over both workers, filling the
# core that the e2e tests leave idle while one process imports or waits.
SERVICE_FIXTURES = frozenset({"ray_head", "ray_driver", "mlflow_server", "s3_endpoint"})


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the group marks
def pytest_collection_modifyitems(config, items):
    """``gpu``-marked tests need CUDA: skipped elsewhere with the reason (``make gpu-check`` runs them).
    Service users and ``e2e`` tests share one xdist group (see ``SERVICE_FIXTURES``)."""
    services = pytest.mark.xdist_group("services")
    for item in items:
        if "e2e" in item.keywords or SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(services)
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
pytest_plugins = ["support.local_stack", "support.serving_helpers", "support.suite_log"]
