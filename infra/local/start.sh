#!/usr/bin/env bash
# Start the local stack (Ray head + MLflow server on 127.0.0.1). Extra arguments go to stack.py,
# e.g. --state-dir DIR, --num-cpus N. Uses the repository's .venv unless HOLEFILL_PYTHON is set.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
exec "${HOLEFILL_PYTHON:-$repo/.venv/bin/python}" "$repo/infra/local/stack.py" start "$@"
