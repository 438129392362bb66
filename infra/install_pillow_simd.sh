#!/usr/bin/env bash
# Replace Pillow with pillow-simd (AVX2 resize kernels) when this machine can build it.
# Runs last in the install: any later `pip install` of a Pillow dependant would put Pillow back.
# Never fails the install: without AVX2, a compiler or the libjpeg/zlib headers, plain Pillow stays.
set -u
PY=${1:-python3}
SIMD_VERSION=${PILLOW_SIMD_VERSION:-12.1.1.post0}

notice() { echo "holefill: $*; keeping plain Pillow"; exit 0; }

[ "${HOLEFILL_NO_PILLOW_SIMD:-0}" = "1" ] && notice "HOLEFILL_NO_PILLOW_SIMD=1"
grep -qw avx2 /proc/cpuinfo 2>/dev/null || notice "CPU has no AVX2"
command -v cc >/dev/null 2>&1 || notice "no C compiler (cc)"
for h in jpeglib.h zlib.h; do
  [ -f "/usr/include/$h" ] || [ -f "/usr/include/x86_64-linux-gnu/$h" ] || notice "missing header $h (install libjpeg-dev zlib1g-dev)"
done
# Both distributions own the PIL package. A later install of a Pillow dependant (matplotlib, holefill itself)
# puts Pillow back over pillow-simd's files, so "pillow-simd is listed" is not enough: Pillow must be absent.
if "$PY" -m pip show pillow-simd >/dev/null 2>&1 && ! "$PY" -m pip show pillow >/dev/null 2>&1; then
  echo "holefill: pillow-simd already active"; exit 0
fi
# The built wheel is kept inside the venv so a re-install does not compile again.
cache="$(dirname "$PY")/../.pillow-simd"
mkdir -p "$cache"
if ! ls "$cache"/pillow_simd-"$SIMD_VERSION"-*.whl >/dev/null 2>&1; then
  # Build the wheel first, so a failed build leaves Pillow in place.
  if ! CC="cc -mavx2" "$PY" -m pip wheel -q --no-deps --no-binary pillow-simd -w "$cache" "pillow-simd==$SIMD_VERSION" >"$cache/build.log" 2>&1; then
    tail -3 "$cache/build.log"; notice "pillow-simd build failed"
  fi
fi
"$PY" -m pip uninstall -q -y pillow pillow-simd >/dev/null 2>&1
"$PY" -m pip install -q --no-deps "$cache"/pillow_simd-"$SIMD_VERSION"-*.whl \
  && echo "holefill: pillow-simd $SIMD_VERSION installed (AVX2)"
