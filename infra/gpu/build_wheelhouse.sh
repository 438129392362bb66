#!/usr/bin/env bash
# Build the wheelhouse that lets `make gpu-check-offline` run on an air-gapped GPU host which has only
# Python + torch (CUDA) + torchvision + numpy + pillow + pytest, and no package index.
#
#   infra/gpu/build_wheelhouse.sh [OUT_DIR]          # default: wheelhouse/
#   PYTHON=.venv/bin/python TARGET_PYTHON=3.12 PLATFORM=manylinux2014_x86_64 infra/gpu/build_wheelhouse.sh
#
# It holds, at the versions this project is tested with (read from PYTHON's environment):
#   * DeepSpeed as a pure-Python wheel built from its sdist with DS_BUILD_OPS=0 (no compiled ops: holefill
#     uses torch's Adam and DeepSpeed's torch_autocast, so none is needed) and DS_ACCELERATOR=cuda;
#   * the light dependencies of the model / engine / throughput path: pydantic (+ core, for TARGET_PYTHON),
#     webdataset, pyyaml, fsspec, DeepSpeed's own requirements, pytest-timeout (pyproject's addopts use it).
# Not Ray (its wheel alone is 79 MB) nor MLflow: the Ray Train end-to-end GPU test is skipped without them.
# Needs a package index here (pip download) and torch in PYTHON's environment (DeepSpeed's setup imports it).
# Fails if the result exceeds 64 MiB. Writes OUT_DIR/requirements.txt for `pip install --no-index`.
set -euo pipefail

OUT=${1:-wheelhouse}
PYTHON=${PYTHON:-.venv/bin/python}
TARGET_PYTHON=${TARGET_PYTHON:-3.12}
PLATFORM=${PLATFORM:-manylinux2014_x86_64}
LIMIT_MIB=64
# Import names are not always distribution names; these are distributions.
PACKAGES=(
  pydantic pydantic-core annotated-types typing-extensions typing-inspection
  webdataset braceexpand pyyaml fsspec
  hjson msgpack ninja psutil py-cpuinfo einops tqdm packaging
  pytest-timeout
)

version_of() {
  "$PYTHON" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"
}

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

ds_version=$(version_of deepspeed)
requirements=("deepspeed==$ds_version")
for package in "${PACKAGES[@]}"; do
  requirements+=("$package==$(version_of "$package")")
done

echo "wheelhouse: DeepSpeed $ds_version (pure Python, DS_BUILD_OPS=0) -> $OUT"
"$PYTHON" -m pip download --quiet --no-deps --no-binary :all: "deepspeed==$ds_version" -d "$work/src"
DS_BUILD_OPS=0 DS_ACCELERATOR=cuda "$PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation \
  -w "$OUT" "$work"/src/deepspeed-*.tar.gz

echo "wheelhouse: ${#PACKAGES[@]} dependencies for CPython $TARGET_PYTHON on $PLATFORM"
"$PYTHON" -m pip download --quiet --no-deps --only-binary :all: \
  --python-version "$TARGET_PYTHON" --implementation cp --platform "$PLATFORM" \
  --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  -d "$OUT" "${requirements[@]:1}"

printf '%s\n' "${requirements[@]}" > "$OUT/requirements.txt"

bytes=$(du -cb "$OUT"/*.whl | tail -1 | cut -f1)
mib=$(( (bytes + 1048575) / 1048576 ))
ls -1 "$OUT"/*.whl | sed 's|.*/|  |'
echo "wheelhouse: $(ls "$OUT"/*.whl | wc -l) wheels, ${mib} MiB (limit ${LIMIT_MIB} MiB)"
if (( bytes > LIMIT_MIB * 1048576 )); then
  echo "wheelhouse: larger than ${LIMIT_MIB} MiB" >&2
  exit 1
fi
