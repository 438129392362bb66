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
if "$PY" -m pip show pillow-simd >/dev/null 2>&1; then
  echo "holefill: pillow-simd already installed"; exit 0
fi
# Build the wheel first, so a failed build leaves Pillow in place.
tmp=$(mktemp -d)
if ! CC="cc -mavx2" "$PY" -m pip wheel -q --no-deps --no-binary pillow-simd -w "$tmp" "pillow-simd==$SIMD_VERSION" >"$tmp/build.log" 2>&1; then
  tail -3 "$tmp/build.log"; rm -rf "$tmp"; notice "pillow-simd build failed"
fi
"$PY" -m pip uninstall -q -y pillow
"$PY" -m pip install -q --no-deps "$tmp"/pillow_simd-*.whl && echo "holefill: pillow-simd $SIMD_VERSION installed (AVX2)"
rm -rf "$tmp"
