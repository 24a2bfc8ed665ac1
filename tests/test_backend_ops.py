"""llama.cpp's own op checker, `test-backend-ops`, with the KVSmooth case of patch 0014
(issue 11: the op in the tool llama.cpp developers run on every backend). It compares each
backend with the CPU (`test-backend-ops -o KVSMOOTH -b DEVICE`); a CPU-only machine has no
second backend to compare, so here the perf mode runs the case on the CPU (the graph
builds, the initialised ids and queues are valid, the op runs) and the eval mode lists the
backends it skipped. tests/test_vulkan.py runs the eval mode against Vulkan0, which has no
KVSmooth kernel and must say so.
"""

from __future__ import annotations

import re
import subprocess

from server_process import program
from test_llama_server import clean_env

TIMEOUT_S = 300


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([program("test-backend-ops"), *args], capture_output=True, text=True, timeout=TIMEOUT_S,
                          env=clean_env())


def test_kvsmooth_case_runs_on_the_cpu() -> None:
    r = run("perf", "-o", "KVSMOOTH", "-b", "CPU")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    runs = re.findall(r"KVSMOOTH\(source=(\d),.*?\):\s+(\d+) runs", r.stdout)
    # probabilities, scores recomputed by the op, flash attention's entropy side output
    assert sorted(src for src, _ in runs) == ["0", "1", "2"], r.stdout[-3000:]
    assert all(int(n) > 0 for _, n in runs)


def test_flash_attn_entropy_case_runs_on_the_cpu() -> None:
    """The side output's perf cases, with and without it on the same tensors."""
    r = run("perf", "-o", "FLASH_ATTN_EXT", "-b", "CPU", "-p", "entropy")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    runs = re.findall(r"FLASH_ATTN_EXT\(.*?kv=(\d+),.*?type_KV=(\w+),entropy=(\d)\):\s+(\d+) runs", r.stdout)
    assert sorted((kv, t, e) for kv, t, e, _ in runs) == sorted(
        (kv, t, e) for kv in ("1000", "3000") for t in ("f16", "q8_0") for e in ("0", "1")
    ), r.stdout[-3000:]
    assert all(int(n) > 0 for *_, n in runs)


def test_eval_mode_knows_the_op() -> None:
    r = run("-o", "KVSMOOTH")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "backends passed" in r.stdout
