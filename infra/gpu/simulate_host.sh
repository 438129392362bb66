#!/usr/bin/env bash
# Rehearse `make gpu-check-offline` on a simulation of the GPU host, on this CPU machine. Run by hand (it
# installs ~5 GB the first time), never by `make test`:
#
#   nice -n 19 bash infra/gpu/simulate_host.sh [SIM_DIR] 2>&1 | tee simulate_host.log   # SIM_DIR: /tmp/holefill-gpu-sim
#   HOST_PYTEST=8.4.2 bash infra/gpu/simulate_host.sh   # the same host with another pytest (the image's is not known)
#
# 1. The host image: Python 3.12 (pyenv's, or BASE_PYTHON) in a virtualenv, SIM_DIR/opt/torch/.venv, like the
#    lent machines' /opt/torch/.venv/bin/python3, holding infra/gpu/host_packages.txt (torch 2.11.0: PyPI's
#    Linux x86_64 wheel is the CUDA 13.0 build) and nothing of holefill's. Reused while that list is unchanged.
# 2. The wheelhouse, built here with `make wheelhouse`'s script (BUILD_PYTHON, default .venv/bin/python).
# 3. A fresh clone of this repository's HEAD, the wheelhouse copied in.
# 4. In a new network namespace (no network but loopback) and mount namespace (this machine's local package
#    mirrors /opt/pypi*, /opt/wheels hidden), with the host venv's python3 first on PATH:
#    - the bug it fixes: a venv made with `--system-site-packages` from the host's python3 cannot import torch;
#    - the README's command, `make gpu-check-offline`: it must get through the host checks, the venv, the
#      offline install and the imports, and stop at the CUDA check (this machine has no GPU);
#    - `pytest tests/gpu` in that venv: every test collected and skipped;
#    - `bench/gpu_check.py --device cpu` for RN and LBAM, in that venv: the real models at batch 1 in fp32, then
#      the tiny variants in bf16 with the gpu tests section;
#    - the same install for a host whose packages sit in a `pip install --target` folder on PYTHONPATH;
#    - the one-line answers when the host lacks a package the wheelhouse assumes, or has too old a one.
# Exits non-zero if any of these does not hold.
set -euo pipefail

REPO=$(git -C "$(dirname "${BASH_SOURCE[0]}")" rev-parse --show-toplevel)
SIM=${1:-${SIM_DIR:-/tmp/holefill-gpu-sim}}
HOST=$SIM/opt/torch/.venv
CLONE=$SIM/clone

say() { echo "[simulate-host $(date -u +%H:%M:%S)] $*"; }
fail() { say "FAILED: $*"; exit 1; }

inside_namespace() {
  ip link set lo up
  for dir in /opt/pypi /opt/pypi-more /opt/wheels; do
    if [ -d "$dir" ]; then mount -t tmpfs none "$dir"; fi  # this machine's local package mirrors: hidden
  done
  export PATH="$HOST/bin:$PATH"
  cd "$CLONE"
  if python3 -c "import socket; socket.create_connection(('pypi.org', 443), timeout=5)" 2>/dev/null; then
    fail "the namespace reaches pypi.org"
  fi
  say "offline: no network (pypi.org unreachable), no local package mirror; python3 is $(command -v python3)"

  say "the bug: python3 -m venv --system-site-packages from the host's python3 (itself a venv)"
  python3 -m venv --system-site-packages "$SIM/naive-venv"
  if "$SIM/naive-venv/bin/python" -c "import torch" 2>/dev/null; then
    fail "a --system-site-packages venv of a venv saw torch: the simulation is not faithful"
  fi
  say "  -> it cannot import torch (it sees the base interpreter's site-packages, not the host venv's)"

  say "README: make gpu-check-offline"
  local began=$SECONDS rc=0
  make gpu-check-offline 2>&1 | tee "$SIM/offline.log" || rc=$?
  say "make gpu-check-offline: exit $rc after $((SECONDS - began)) s"
  grep -q "sees no CUDA GPU" "$SIM/offline.log" || fail "make gpu-check-offline did not reach the CUDA check"
  grep -q "imports deepspeed, pydantic, webdataset" "$SIM/offline.log" || fail "the install did not finish"
  say "  -> reached the CUDA check with the host checks, venv, offline install and imports done"
  say "  .venv-gpu holds only the wheelhouse's distributions:"
  .venv-gpu/bin/python - <<'EOF'
import importlib.metadata as m, sysconfig
own = sysconfig.get_path("purelib")
names = sorted(f"{d.metadata['Name']} {d.version}" for d in m.distributions(path=[own]))
print("    " + ", ".join(names))
EOF

  say "pytest tests/gpu in .venv-gpu (as bench/gpu_check.py runs it)"
  began=$SECONDS
  .venv-gpu/bin/python -m pytest -m gpu -rs -q -p no:cacheprovider --confcutdir tests/gpu tests/gpu 2>&1 \
    | tee "$SIM/tests_gpu.log"
  grep -Eq "^[0-9]+ skipped" "$SIM/tests_gpu.log" || fail "tests/gpu did not collect and skip cleanly"
  if grep -Eq "passed|failed|error" "$SIM/tests_gpu.log"; then fail "tests/gpu ran or errored without a GPU"; fi
  say "  -> all collected and skipped in $((SECONDS - began)) s"

  say "bench/gpu_check.py --device cpu at tiny sizes, RN and LBAM, in .venv-gpu"
  began=$SECONDS
  .venv-gpu/bin/python bench/gpu_check.py --device cpu --precision fp32 --batch 1 --size 32 --steps 1 \
    --warmup 0 --sections essential --out "$SIM/cpu-check" 2>&1 | grep -v "^\[.*WARNING" | tee "$SIM/cpu_check.log"
  grep -q "^rn fp32" "$SIM/cpu-check/table.txt" && grep -q "^lbam fp32" "$SIM/cpu-check/table.txt" \
    || fail "gpu_check.py --device cpu did not print rows for RN and LBAM"
  say "  -> rows for RN and LBAM in $((SECONDS - began)) s"

  say "bench/gpu_check.py --device cpu --tiny (bf16 essential rows, then the gpu tests section), in .venv-gpu"
  began=$SECONDS
  .venv-gpu/bin/python bench/gpu_check.py --device cpu --tiny --batch 1 --size 32 --steps 1 --warmup 0 \
    --sections essential tests --out "$SIM/cpu-check-tiny" 2>&1 | grep -v "^\[.*WARNING" | tee -a "$SIM/cpu_check.log"
  grep -q "^rn bf16" "$SIM/cpu-check-tiny/table.txt" && grep -q "^lbam bf16" "$SIM/cpu-check-tiny/table.txt" \
    && grep -q "tests: exit 0" "$SIM/cpu-check-tiny/notes.txt" || fail "the --tiny check did not hold"
  say "  -> bf16 rows for RN and LBAM and the tests section in $((SECONDS - began)) s"

  local base site
  base=$(python3 -c "import sys, os; print(os.path.join(sys.base_prefix, 'bin', 'python3'))")
  site=$(python3 -c "import sysconfig; print(sysconfig.get_path('purelib'))")
  say "a host whose packages sit in a \`pip install --target\` folder on PYTHONPATH (python3 = $base):"
  began=$SECONDS
  PYTHONPATH="$site" "$base" infra/gpu/offline_install.py --wheelhouse wheelhouse --venv "$SIM/venv-target" \
    || fail "offline_install.py failed for a PYTHONPATH host"
  "$SIM/venv-target/bin/python" -c "import torch, deepspeed, pydantic" 2>/dev/null \
    || fail "the venv of a PYTHONPATH host does not see the host's packages without PYTHONPATH"
  say "  -> installed and importing in $((SECONDS - began)) s, and still importing without PYTHONPATH"

  say "a host that lacks a package the wheelhouse assumes, and one with too old a package:"
  for extra in "not-on-this-host>=1  # simulated" "numpy>=99  # simulated"; do
    rm -rf "$SIM/wheelhouse-check" && cp -r wheelhouse "$SIM/wheelhouse-check"
    echo "$extra" >> "$SIM/wheelhouse-check/host-requirements.txt"
    local out
    out=$(python3 infra/gpu/offline_install.py --wheelhouse "$SIM/wheelhouse-check" --venv "$SIM/venv-check" 2>&1) \
      && fail "offline_install.py accepted a host without ${extra%% *}"
    echo "    $(echo "$out" | tail -1)"
    [ "$(echo "$out" | grep -c "gpu-check-offline: the host lacks")" = 1 ] || fail "no one-line answer"
  done
  say "simulated host: all checks held"
}

if [ "${2:-}" = --inside-namespace ]; then
  inside_namespace
  exit
fi

say "repository $REPO at $(git -C "$REPO" rev-parse --short HEAD); simulation in $SIM"
mkdir -p "$SIM"

# 1. The host image.
if ! cmp -s "$REPO/infra/gpu/host_packages.txt" "$HOST/.simulated-host" 2>/dev/null; then
  BASE_PYTHON=${BASE_PYTHON:-$(ls -d "$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"/versions/3.12.*/bin/python3.12 \
    2>/dev/null | sort -V | tail -1)}
  BASE_PYTHON=${BASE_PYTHON:-python3.12}
  say "building the host image from $BASE_PYTHON (a few GB)"
  rm -rf "$HOST"
  "$BASE_PYTHON" -m venv "$HOST"
  # PyPI itself, not this machine's pip configuration (local mirrors, constraints)
  PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= "$HOST/bin/python" -m pip install -q --upgrade pip
  PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= "$HOST/bin/python" -m pip install -q \
    $(grep -v '^#' "$REPO/infra/gpu/host_packages.txt")
  cp "$REPO/infra/gpu/host_packages.txt" "$HOST/.simulated-host"
fi
if [ -n "${HOST_PYTEST:-}" ]; then
  say "the host's pytest: $HOST_PYTEST"
  PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= "$HOST/bin/python" -m pip install -q "pytest==$HOST_PYTEST"
fi
"$HOST/bin/python3" - <<'EOF'
import importlib.metadata as m, sys, torch
assert sys.prefix != sys.base_prefix, "the host's python3 must be a venv"
assert torch.version.cuda, "torch must be a CUDA build"
print(f"[simulate-host] host python3: {sys.executable} (Python {sys.version.split()[0]}, a venv of "
      f"{sys.base_prefix}), torch {torch.__version__} (CUDA {torch.version.cuda}, GPU visible: "
      f"{torch.cuda.is_available()}), pytest {m.version('pytest')}, {len(list(m.distributions()))} distributions")
EOF

# 2. The wheelhouse (needs a package index: here, not on the host).
PYTHON=${BUILD_PYTHON:-$REPO/.venv/bin/python} bash "$REPO/infra/gpu/build_wheelhouse.sh" "$SIM/wheelhouse" 2>&1 \
  | grep -v "^WARNING: Location"

# 3. A fresh clone.
rm -rf "$CLONE" "$SIM/naive-venv" "$SIM/venv-check" "$SIM/venv-target" "$SIM/cpu-check" "$SIM/cpu-check-tiny"
git clone -q "$REPO" "$CLONE"
cp -r "$SIM/wheelhouse" "$CLONE/wheelhouse"
say "fresh clone at $(git -C "$CLONE" rev-parse --short HEAD) in $CLONE, wheelhouse copied in"

# 4. Offline.
unshare --net --mount --propagation private bash "${BASH_SOURCE[0]}" "$SIM" --inside-namespace
