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

# Tests that use the suite's Ray head or S3 endpoint run in one xdist worker (group "services"): those services
# start once, and two of its e2e tests never fight over the same 2 cores' worth of Ray workers. Tests that need only
# an MLflow server (registration, promotion, serving through MLflow) and e2e tests that start what they need
# themselves (the local stack, an embedded Ray) run in a second group (its worker starts an MLflow server of its
# own): the services group alone was most of the suite's wall time. Everything else spreads over both workers.
# Measured on a 2-core VM, both cores are 90-100 % busy for most of a run: the wall time is the suite's CPU work
# over two cores, so a shorter suite needs less work, not another split.
RAY_FIXTURES = frozenset({"ray_head", "ray_driver", "s3_endpoint"})
REGISTRY_FIXTURES = frozenset({"mlflow_server"})


def service_group(fixtures: set[str], e2e: bool) -> str | None:
    """The xdist group of a test that uses ``fixtures`` (``None``: spread freely)."""
    if fixtures & RAY_FIXTURES:
        return "services"
    if fixtures & REGISTRY_FIXTURES or e2e:
        return "registry"
    return None


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the group marks
def pytest_collection_modifyitems(config, items):
    """``gpu``-marked tests need CUDA: skipped elsewhere with the reason (``make gpu-check`` runs them).
    Service users and ``e2e`` tests are grouped by :func:`service_group`."""
    for item in items:
        group = service_group(set(getattr(item, "fixturenames", ())), "e2e" in item.keywords)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))
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
