#!/usr/bin/env bash
# Installs llama-cpp-python (Igora's llama engine) into the environment of PYTHON, built
# for a portable CPU baseline so that it runs on any machine of its architecture:
#   scripts/install-llama.sh [PYTHON]      (default: python3; `make up` gives .venv/bin/python)
#   scripts/install-llama.sh --wheelhouse [PYTHON]   only print the folder of its wheel
#
# Why not `pip install llama-cpp-python`: pip builds llama.cpp for the building machine's
# own CPU (-march=native: AVX-512, AMX where present), which can crash elsewhere and even
# there, and keeps that wheel in its cache keyed by the source alone, so a rebuild with
# other flags never happens. Here the wheel is built once per (version, build flags,
# machine, Python) into a folder of its own, and exactly that wheel is installed.
#
# IGORA_LLAMA_CMAKE_ARGS replaces the build flags, e.g. "-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF"
# for a CPU older than the baseline (no AVX2); that wheel then gets its own folder.
set -euo pipefail
WHEELHOUSE_ONLY=
if [ "${1:-}" = "--wheelhouse" ]; then
  WHEELHOUSE_ONLY=1
  shift
fi
PYTHON=${1:-python3}
if [[ "$PYTHON" == */* ]]; then  # a relative path stays right after the cd below
  PYTHON="$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")"
fi
cd "$(dirname "$0")/.."

# The version pinned by the `llama` extra in pyproject.toml (its one home).
VERSION=$(sed -n 's/.*"llama-cpp-python==\([0-9][0-9.]*\)".*/\1/p' pyproject.toml | head -n 1)
if [ -z "$VERSION" ]; then
  echo "install-llama: no \"llama-cpp-python==X\" pin in pyproject.toml" >&2
  exit 2
fi

# GGML_NATIVE=OFF: ggml's baseline instead of -march=native (x86-64: SSE4.2, AVX, AVX2,
# FMA, F16C, BMI2, no AVX-512, no AMX; 64-bit ARM: the ARMv8-A base). LLAVA_BUILD=OFF:
# skip the multimodal library, which Igora does not use.
PORTABLE="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF"
CMAKE_ARGS=${IGORA_LLAMA_CMAKE_ARGS:-$PORTABLE}
# With SOURCE_DATE_EPOCH set, ggml also turns its instruction-set defaults off (slow build).
unset SOURCE_DATE_EPOCH

MACHINE=$(uname -m)
PYTAG=$("$PYTHON" -c 'import sys; print(sys.implementation.cache_tag)')
FLAGS_ID=$(printf '%s' "$CMAKE_ARGS" | sha256sum | cut -c1-12)
KEY="llama-cpp-python-$VERSION-$FLAGS_ID-$MACHINE-$PYTAG"
HOUSE="${XDG_CACHE_HOME:-$HOME/.cache}/igora/wheels/$KEY"
if [ -n "$WHEELHOUSE_ONLY" ]; then
  echo "$HOUSE"
  exit 0
fi
if [ "$CMAKE_ARGS" = "$PORTABLE" ]; then
  WHAT="portable $MACHINE baseline"
else
  WHAT="CMAKE_ARGS=$CMAKE_ARGS"
fi

# The installed build: its version, and where pip took it from (direct_url.json, written
# when a wheel file is installed; absent for a build from an index, such as a native one).
read -r installed origin < <("$PYTHON" -c '
import importlib.metadata as m, json
try:
    d = m.distribution("llama-cpp-python")
except m.PackageNotFoundError:
    print("- -")
else:
    print(d.version, json.loads(d.read_text("direct_url.json") or "{}").get("url") or "-")
')
if [ "$installed" = "$VERSION" ] && [[ "$origin" == *"/$KEY/"* ]]; then
  echo "llama.cpp: llama-cpp-python $VERSION ($WHAT) is installed"
  exit 0
fi

WHEEL=$(ls "$HOUSE"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$WHEEL" ]; then
  echo "building llama.cpp ($WHAT) ... about 5 min on 2 cores, once; the wheel is kept in $HOUSE"
  mkdir -p "$HOUSE"
  tmp=$(mktemp -d "$HOUSE.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  start=$SECONDS
  # --no-binary: a source build even where an index or --find-links offers a wheel of
  # unknown flags; --no-cache-dir: neither take a wheel from pip's cache nor leave one there.
  CMAKE_ARGS="$CMAKE_ARGS" "$PYTHON" -m pip wheel --no-cache-dir --no-deps \
    --no-binary llama-cpp-python --progress-bar off -w "$tmp" "llama-cpp-python==$VERSION"
  mv "$tmp"/llama_cpp_python-"$VERSION"-*.whl "$HOUSE"/
  WHEEL=$(ls "$HOUSE"/llama_cpp_python-"$VERSION"-*.whl | head -n 1)
  echo "llama.cpp: built in $(( (SECONDS - start) / 60 )) min $(( (SECONDS - start) % 60 )) s"
fi

echo "llama.cpp: installing llama-cpp-python $VERSION ($WHAT) from $WHEEL"
if [ "$installed" != "-" ]; then
  echo "llama.cpp: replacing llama-cpp-python $installed (another build) with $WHEEL"
  "$PYTHON" -m pip install --quiet --force-reinstall --no-deps "$WHEEL"
fi
"$PYTHON" -m pip install --quiet --progress-bar off "$WHEEL"  # and its dependencies
"$PYTHON" -c 'import llama_cpp
print("llama.cpp:", llama_cpp.llama_print_system_info().decode().strip())'
