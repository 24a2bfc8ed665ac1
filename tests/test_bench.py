"""`scripts/bench.py --quick` end to end: it runs, and its report and raw figures are whole.

No timing is asserted: the quick shape's figures mean nothing, the test proves that every
code path (KVSmooth off/adaptive/fixed, flash attention off/on, f16 and q8_0 caches, the
per-op profile, the separate-process comparison with another library) works.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "scripts" / "bench.py"
MODES = ("off", "adaptive", "fixed", "composed")  # the quick run measures every mode
CONFIGS = {(False, "f16"), (False, "q8_0"), (True, "f16"), (True, "q8_0")}


def _load_bench() -> Any:
    sys.path.insert(0, str(BENCH.parent))
    try:
        import bench
    finally:
        sys.path.remove(str(BENCH.parent))
    return bench


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import pykvsmooth

    out = tmp_path_factory.mktemp("bench-out")
    env = dict(os.environ, PYKVSMOOTH_CACHE_DIR=str(tmp_path_factory.mktemp("bench-cache")))
    # the installed (patched) library stands in for an unpatched one: the same code path
    subprocess.run([sys.executable, str(BENCH), "--quick", "--out", str(out),
                    "--unpatched-lib", str(pykvsmooth.lib_dir()), "--unpatched-rounds", "1"],
                   check=True, env=env, cwd=str(out), timeout=300)
    return out


def _positive(xs: list[float], n: int) -> None:
    assert len(xs) == n
    assert all(isinstance(x, float) and math.isfinite(x) and x > 0 for x in xs), xs


def test_raw_figures_are_complete(quick_run: Path) -> None:
    raw = json.loads((quick_run / "benchmarks.json").read_text())
    assert {"cpu", "commit", "date", "build", "device"} <= set(raw["machine"])
    (res,) = raw["results"]
    assert res["patched"] and res["shape"] == "quick" and res["modes"] == list(MODES)
    assert {(c["fa"], c["cache"]) for c in res["configs"]} == CONFIGS
    for c in res["configs"]:
        for m in MODES:
            _positive(c["pp"][m], 2)
        assert set(c["decode"]) == {"16", "40"}
        for N, dec in c["decode"].items():
            for m in MODES:
                _positive(dec[m], 2)
            b = c["bytes"][N]
            assert 0 < b["op"] < b["step"]
        assert set(c["memory"]) == {"adaptive", "fixed", "composed"}
        assert c["logits_sha_off"]
        # llama.cpp quantizes the V cache only with flash attention
        assert c["type_v"] == (c["cache"] if c["fa"] else "f16")
    assert {p["fa"] for p in res["profile"]} == {False, True}
    for p in res["profile"]:
        assert "KVSMOOTH" in p["ops_ms"]["adaptive"] and "KVSMOOTH" not in p["ops_ms"]["off"]
    cross = raw["unpatched"]
    assert [x["tag"] for x in cross] == ["quick-unpatched-0", "quick-patched-off-0"]
    for x in cross:
        assert x["modes"] == ["off"]
        for c in x["configs"]:
            _positive(c["decode"]["40"]["off"], 2)
    # KVSmooth off gives the same logits whichever process computed them
    assert cross[0]["configs"][0]["logits_sha_off"] == cross[1]["configs"][0]["logits_sha_off"]


def test_report_has_every_row(quick_run: Path) -> None:
    md = (quick_run / "benchmarks.md").read_text()
    for heading in ("## Targets (SPEC §5)", "## quick test shape", "## KVSmooth off vs unpatched llama.cpp"):
        assert heading in md
    assert ("| flash attn | cache K/V | figure | off | adaptive | fixed | composed | adaptive/off | fixed/off "
            "| composed/off |") in md
    for fa, kv in (("off", "f16/f16"), ("off", "q8_0/f16"), ("on", "f16/f16"), ("on", "q8_0/q8_0")):
        assert f"| {fa} | {kv} | prompt 24 tok, tok/s |" in md
        for N in (16, 40):
            assert f"| {fa} | {kv} | decode @{N}, ms/tok |" in md
            assert f"| {fa} | {kv} | {N} |" in md  # bytes table
    for target in ("decode +1.5% at most, flash attention off", "decode +1.5% at most, flash attention on",
                   "prompt processing unchanged",
                   "extra memory under 1 MiB per context", "KVSmooth off: same speed and outputs as unpatched"):
        assert target in md
    assert "| KVSMOOTH |" in md  # the per-op profile names the op


def test_quick_run_leaves_docs_alone(quick_run: Path) -> None:
    assert (quick_run / "benchmarks.md").exists()
    assert "--quick" in (quick_run / "benchmarks.md").read_text()


def test_model_writer_shapes(tmp_path: Path) -> None:
    import gguf

    bench = _load_bench()
    shape = bench.SHAPES["quick"]
    path = tmp_path / "m.gguf"
    bench.write_model(shape, path)
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    expected = shape.tensors()
    assert list(tensors) == [name for name, _, _ in expected]
    for name, ne, t in expected:
        assert tuple(int(x) for x in tensors[name].shape) == ne
        assert int(tensors[name].tensor_type) == t
        assert int(tensors[name].n_bytes) == bench.tensor_nbytes(ne, t)
    # Q4_0 scales are finite, nonzero f16
    import numpy as np

    q = np.asarray(tensors["blk.0.attn_q.weight"].data).reshape(-1, 18)
    d = q[:, :2].copy().view(np.float16)
    assert np.all(np.isfinite(d)) and np.all(d > 0)


def test_step_bytes_7b() -> None:
    """SPEC §5's arithmetic at 1,000 tokens: the op adds ~0.1% bytes with flash attention off, almost
    nothing with the CPU kernel's entropy side output, and ~5-6% where it recomputes the scores (GPU)."""
    bench = _load_bench()
    shape = bench.SHAPES["7b"]
    off = bench.step_bytes(shape, 1000, False, bench.GGML_F16, bench.GGML_F16)
    on = bench.step_bytes(shape, 1000, True, bench.GGML_F16, bench.GGML_F16)
    on_gpu = bench.step_bytes(shape, 1000, True, bench.GGML_F16, bench.GGML_F16, gpu=True)
    assert 3.5e9 < off["weights"] < 4.0e9
    assert 0.0005 < off["op"] / off["step"] < 0.002
    assert on["op"] / on["step"] < 0.001
    assert 0.04 < on_gpu["op"] / on_gpu["step"] < 0.07
    assert bench.state_bytes(shape) == 28 * 16 * 4
