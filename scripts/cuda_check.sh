#!/bin/sh
# Compile (only) every CUDA source that the patch series adds or changes, for sm_75, sm_86
# and sm_89, against a prepared (patched) llama.cpp tree.  Nothing is linked or run: this
# proves syntax and types on machines without a GPU, not correctness.
#
#   usage: scripts/cuda_check.sh [--if-available] TREE
#
# The sources are the .cu files under ggml/src/ggml-cuda/ that native/ provides or that a
# patch in patches/ touches.  ggml-cuda/common.cuh includes cuBLAS headers, which a bare
# CUDA toolkit may lack; they are then taken from the nvidia-cublas wheel (pip download,
# only nvidia/cu13/include/ is extracted) and cached in $PYKVSMOOTH_CACHE_DIR/cublas
# (default ~/.cache/pykvsmooth/cublas).
#
# Without nvcc the check fails, unless --if-available is given (CI): then it says so and
# succeeds.  NVCC chooses the compiler, CUDA_ARCHS the architectures ("75 86 89").
set -eu

if_available=0
if [ "${1:-}" = "--if-available" ]; then
    if_available=1
    shift
fi
tree=${1:?usage: scripts/cuda_check.sh [--if-available] TREE}
[ -d "$tree/ggml/src/ggml-cuda" ] || { echo "error: $tree is not a llama.cpp tree" >&2; exit 1; }
tree=$(cd "$tree" && pwd)
here=$(cd "$(dirname "$0")/.." && pwd)

nvcc=${NVCC:-}
if [ -z "$nvcc" ]; then
    for c in nvcc "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"; do
        if command -v "$c" >/dev/null 2>&1; then nvcc=$(command -v "$c"); break; fi
    done
fi
if [ -z "$nvcc" ]; then
    if [ "$if_available" = 1 ]; then
        echo "cuda-check: nvcc not found, CUDA sources not compiled (skipped)"
        exit 0
    fi
    echo "error: nvcc not found (install the CUDA toolkit, or set NVCC)" >&2
    exit 1
fi

# the CUDA sources of the series: native/ files and patched files, without duplicates
sources=$(
    {
        (cd "$here/native" 2>/dev/null && find ggml/src/ggml-cuda -name '*.cu' 2>/dev/null) || true
        cat "$here"/patches/*.patch 2>/dev/null | sed -n 's|^+++ b/\(ggml/src/ggml-cuda/.*\.cu\)$|\1|p'
    } | sort -u
)
if [ -z "$sources" ]; then
    echo "cuda-check: the series has no CUDA sources"
    exit 0
fi

# cuBLAS headers: the toolkit's own when present, else the cached wheel's include folder
cuda_root=$(cd "$(dirname "$nvcc")/.." && pwd)
cublas_inc=""
if [ ! -f "$cuda_root/include/cublas_v2.h" ]; then
    cache=${PYKVSMOOTH_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/pykvsmooth}
    cublas_inc=$cache/cublas/nvidia/cu13/include
    if [ ! -f "$cublas_inc/cublas_v2.h" ]; then
        echo "cuda-check: fetching cuBLAS headers (nvidia-cublas wheel) into $cache/cublas"
        mkdir -p "$cache"
        dl=$(mktemp -d "$cache/cublas-dl.XXXXXX")
        trap 'rm -rf "$dl"' EXIT
        python3 -m pip download --quiet --no-deps --dest "$dl" "nvidia-cublas==13.10.0.20"
        python3 - "$dl" "$cache/cublas" <<'PY'
import shutil, sys, tempfile, zipfile
from pathlib import Path

dl, dest = Path(sys.argv[1]), Path(sys.argv[2])
wheel = next(dl.glob("nvidia_cublas-*.whl"))
prefix = "nvidia/cu13/include/"
tmp = Path(tempfile.mkdtemp(dir=dl))
with zipfile.ZipFile(wheel) as z:
    members = [n for n in z.namelist() if n.startswith(prefix) and not n.endswith("/")]
    if not members:
        sys.exit(f"error: {wheel.name} has no {prefix}")
    z.extractall(tmp, members)
shutil.rmtree(dest, ignore_errors=True)
shutil.move(str(tmp), str(dest))  # appears complete or not at all
PY
        rm -rf "$dl"
        trap - EXIT
    fi
fi

out=$(mktemp -d "${TMPDIR:-/tmp}/cuda-check.XXXXXX")
trap 'rm -rf "$out"' EXIT

# as ggml-cuda's CMakeLists.txt builds (CUDA_FLAGS, default compile definitions)
set -- -std=c++17 -use_fast_math -extended-lambda -Xcompiler -Wno-pedantic \
    -DGGML_USE_CUDA -DGGML_CUDA_USE_GRAPHS -DGGML_BACKEND_BUILD -DGGML_BACKEND_SHARED \
    -DGGML_SHARED -DGGML_BUILD -DNDEBUG -O3 \
    -I "$tree/ggml/include" -I "$tree/ggml/src" -I "$tree/ggml/src/ggml-cuda"
if [ -n "$cublas_inc" ]; then
    set -- "$@" -I "$cublas_inc"
fi

failed=0
for arch in ${CUDA_ARCHS:-75 86 89}; do
    for src in $sources; do
        obj="$out/$(basename "$src" .cu)-sm_$arch.o"
        printf 'cuda-check: sm_%s %s ... ' "$arch" "$src"
        if "$nvcc" "$@" -gencode "arch=compute_$arch,code=sm_$arch" -c "$tree/$src" -o "$obj" \
                >"$out/log" 2>&1; then
            echo ok
            cat "$out/log" >&2 # warnings
        else
            echo FAILED
            cat "$out/log" >&2
            failed=1
        fi
    done
done

[ "$failed" = 0 ] || { echo "cuda-check: FAILED" >&2; exit 1; }
echo "cuda-check: all CUDA sources compile"
