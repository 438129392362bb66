"""What the ``gpu`` tests need when run on their own (``bench/gpu_check.py`` runs them with ``--confcutdir
tests/gpu``, so the suite's root conftest, with its MLflow and Ray fixtures, stays out on an offline GPU host
that has neither, nor an installed holefill): the repository and ``tests/`` on ``sys.path`` (``support.engine_probe``,
``test_train_local``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
for path in (TESTS.parent, TESTS):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
