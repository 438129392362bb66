#!/usr/bin/env bash
# Show the local stack (Ray head + MLflow server on 127.0.0.1): URLs, pids, logs. Extra arguments go to stack.py,
# e.g. --state-dir DIR. Exit status 3 when a service is down. Uses .venv unless HOLEFILL_PYTHON is set.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
exec "${HOLEFILL_PYTHON:-$repo/.venv/bin/python}" "$repo/infra/local/stack.py" status "$@"
