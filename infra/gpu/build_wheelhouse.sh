#!/usr/bin/env bash
# Build the wheelhouse that lets `make gpu-check-offline` run on an air-gapped GPU host (no package index)
# whose python3 already holds a CUDA torch and the packages of infra/gpu/host_packages.txt.
#
#   infra/gpu/build_wheelhouse.sh [OUT_DIR]          # default: wheelhouse/
#   PYTHON=.venv/bin/python TARGET_PYTHON=3.12 PLATFORM=manylinux2014_x86_64 infra/gpu/build_wheelhouse.sh
#   WHEELHOUSE_ADD="numpy nvidia-ml-py" infra/gpu/build_wheelhouse.sh   # for a host that lacks these
#
# It holds what DeepSpeed and holefill's GPU path (bench/gpu_check.py, tests/gpu) import that the host image
# lacks, and nothing it has (infra/gpu/wheelhouse_plan.py decides, at the versions installed in PYTHON's
# environment): DeepSpeed as a pure-Python wheel built from its sdist with DS_BUILD_OPS=0 (no compiled ops:
# holefill uses torch's Adam and DeepSpeed's torch_autocast) and DS_ACCELERATOR=cuda, pydantic (+ its core
# for TARGET_PYTHON), webdataset and their requirements. Not Ray (79 MB) nor MLflow: the Ray Train end-to-end
# GPU test is skipped without them. It writes OUT_DIR/requirements.txt (what to install) and
# OUT_DIR/host-requirements.txt (what it assumes the host has: offline_install.py checks it first).
# Needs a package index here (pip download) and torch in PYTHON's environment (DeepSpeed's setup imports it).
# Fails if the result exceeds 64 MiB.
set -euo pipefail

OUT=${1:-wheelhouse}
PYTHON=${PYTHON:-.venv/bin/python}
TARGET_PYTHON=${TARGET_PYTHON:-3.12}
PLATFORM=${PLATFORM:-manylinux2014_x86_64}
WHEELHOUSE_ADD=${WHEELHOUSE_ADD:-}
LIMIT_MIB=64
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
rm -f "$OUT"/*.whl "$OUT"/requirements.txt "$OUT"/host-requirements.txt  # two versions of one wheel break pip
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

ds_version=$("$PYTHON" -c "import importlib.metadata as m; print(m.version('deepspeed'))")
echo "wheelhouse: DeepSpeed $ds_version (pure Python, DS_BUILD_OPS=0, DS_ACCELERATOR=cuda) -> $OUT"
"$PYTHON" -m pip download --quiet --no-deps --no-binary :all: "deepspeed==$ds_version" -d "$work/src"
DS_BUILD_OPS=0 DS_ACCELERATOR=cuda "$PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation \
  -w "$OUT" "$work"/src/deepspeed-*.tar.gz

mapfile -t requirements < <("$PYTHON" "$HERE/wheelhouse_plan.py" --target-python "$TARGET_PYTHON" \
  --host-requirements "$OUT/host-requirements.txt" --add "$WHEELHOUSE_ADD" --wheel "$OUT"/deepspeed-*.whl)
echo "wheelhouse: ${#requirements[@]} distributions the host image lacks, for CPython $TARGET_PYTHON on $PLATFORM"
"$PYTHON" -m pip download --quiet --no-deps --only-binary :all: \
  --python-version "$TARGET_PYTHON" --implementation cp --platform "$PLATFORM" \
  --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  -d "$OUT" "${requirements[@]:1}"

printf '%s\n' "${requirements[@]}" > "$OUT/requirements.txt"

bytes=$(du -cb "$OUT"/*.whl | tail -1 | cut -f1)
mib=$(( (bytes + 1048575) / 1048576 ))
ls -1 "$OUT"/*.whl | sed 's|.*/|  |'
echo "wheelhouse: $(ls "$OUT"/*.whl | wc -l) wheels, ${mib} MiB (limit ${LIMIT_MIB} MiB); assumes the host has:"
grep -v '^#' "$OUT/host-requirements.txt" | sed 's|^|  |'
if (( bytes > LIMIT_MIB * 1048576 )); then
  echo "wheelhouse: larger than ${LIMIT_MIB} MiB" >&2
  exit 1
fi
