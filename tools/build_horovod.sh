#!/usr/bin/env bash
# Install Horovod into .venv from its PyPI source release, reusing a cached wheel.
#
# Horovod 0.28.1 has no binary wheel on PyPI, and its sdist does not build as is here:
# - torch 2.x headers need C++17, but the sdist's CMakeLists.txt (top level and
#   horovod/torch/) sets CMAKE_CXX_STANDARD 14, so the unpacked sdist is patched to 17;
# - Horovod must link the same MPI library as mpi4py (the mpich wheel in .venv), because
#   two MPI libraries in one process cannot share MPI_COMM_WORLD. .venv/bin comes first on
#   PATH, so CMake's FindMPI finds .venv/bin/mpicxx.
# The wheel depends on the torch, MPICH and Python it was built against, so the cache key
# contains all three.
#
# Environment: VENV (default .venv), HOROVOD_WHEEL_CACHE (default ~/.cache/hpcdl/wheels),
# HOROVOD_BUILD_JOBS (default: number of CPUs).
set -euo pipefail

HOROVOD_VERSION=0.28.1
VENV=$(realpath "${VENV:-.venv}")
PY="$VENV/bin/python"
CACHE_ROOT="${HOROVOD_WHEEL_CACHE:-$HOME/.cache/hpcdl/wheels}"

installed=$("$PY" -c 'import importlib.metadata as m; print(m.version("horovod"))' 2>/dev/null || true)
if [[ "$installed" == "$HOROVOD_VERSION" ]] && "$PY" -c 'import horovod.torch' 2>/dev/null; then
    echo "horovod $HOROVOD_VERSION is already installed in $VENV"
    exit 0
fi

key=$("$PY" -c 'import sys, torch, importlib.metadata as m; print("py%d%d-torch%s-mpich%s" % (*sys.version_info[:2], torch.__version__, m.version("mpich")))')
cache="$CACHE_ROOT/$key"
mkdir -p "$cache"
wheel=$(ls "$cache"/horovod-"$HOROVOD_VERSION"-*.whl 2>/dev/null | head -n 1 || true)

if [[ -z "$wheel" ]]; then
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    echo "building horovod $HOROVOD_VERSION in $work (this takes several minutes)"
    "$VENV/bin/pip" download --no-binary :all: --no-deps -d "$work" "horovod==$HOROVOD_VERSION"
    tar -xzf "$work/horovod-$HOROVOD_VERSION.tar.gz" -C "$work"
    src="$work/horovod-$HOROVOD_VERSION"
    sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' \
        "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
    if grep -q 'set(CMAKE_CXX_STANDARD 14)' "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"; then
        echo "error: failed to raise CMAKE_CXX_STANDARD to 17 in the horovod sdist" >&2
        exit 1
    fi

    # --no-build-isolation: the build must see the torch in .venv, not a fresh one.
    PATH="$VENV/bin:$PATH" MPI_HOME="$VENV" \
    HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_CPU_OPERATIONS=MPI \
    HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_WITHOUT_GLOO=1 \
    MAKEFLAGS="-j${HOROVOD_BUILD_JOBS:-$(nproc)}" \
        "$VENV/bin/pip" wheel --no-build-isolation --no-deps -w "$cache" "$src"
    wheel=$(ls "$cache"/horovod-"$HOROVOD_VERSION"-*.whl | head -n 1)
    echo "cached $wheel"
fi

"$VENV/bin/pip" install "$wheel"
"$PY" -c 'import horovod, horovod.torch as hvd; assert hvd.mpi_built(), "horovod was built without MPI"; print("horovod", horovod.__version__, "with MPI")'
