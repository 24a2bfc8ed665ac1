#!/bin/sh
# The device checks, in one run, for a machine with a GPU and a pykvsmooth built for it
# (`make install GPU=cuda`, or GPU=vulkan): every step logs to OUT/ and the run goes on
# after a failure, so that one short session on a lent GPU yields every result.
#   usage: scripts/gpu_check.sh DEVICE [OUT]     (DEVICE: CUDA0, Vulkan0, MTL0, ...)
# Steps: the op tests on DEVICE (the fused kernel and the composed path, against the NumPy
# oracle); llama.cpp's test-backend-ops -o KVSMOOTH (the kernel against the CPU); the
# LLaMA fixture with every layer on the device against the NumPy reference
# (tests/vulkan_model_checks.py works on any device: it offloads every layer); the
# benchmark with every layer on the GPU. Not run by any session yet on a GPU.
set -u
dev=${1:?usage: scripts/gpu_check.sh DEVICE [OUT]}
out=${2:-gpu-check}
here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)
status=0
step() {
    name=$1; shift
    echo "== $name: $*"
    if "$@" >"$out/$name.log" 2>&1; then echo "   ok"; else echo "   FAILED (see $out/$name.log)"; status=1; fi
    tail -n 3 "$out/$name.log" | sed 's/^/   | /'
}
cd "$here/tests"
export GGML_VK_VISIBLE_DEVICES=${GGML_VK_VISIBLE_DEVICES:-0}
step op-tests python -m pytest -q -p no:cacheprovider test_kvsmooth_op.py --kvsmooth-backend "$dev" -k test_kvsmooth_op
step backend-ops test-backend-ops -o KVSMOOTH -b "$dev"
step backend-ops-perf test-backend-ops perf -o KVSMOOTH -b "$dev"
step model python -m pytest -q -s -p no:cacheprovider vulkan_model_checks.py
cd "$here"
step bench python scripts/bench.py --gpu --shapes 1b,7b --contexts 1000,3000 --out "$out/bench"
echo "logs and the benchmark report: $out"
exit $status
