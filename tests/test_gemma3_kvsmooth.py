"""KVSmooth on Gemma 3 (iSWA) against the NumPy reference (SPEC §4.1).

The tiny Gemma 3 of scripts/make_tiny_gemma3.py (window 8; layers 0, 2, 4 slide, 1, 3, 5 are
global) and tests/reference_families.py, whose forward tests/test_gemma3.py checks against
llama.cpp with KVSmooth off. Every layer range here holds both kinds of layer: [1, 4) (global,
sliding, global), [0, 6), and the default [3, 5) (global 3, sliding 4) in the CLI test. A
sliding layer's entropy is over its window's cells; its previous cell is the previous position
in that layer's own (SWA) cache. The cache is the small SWA one of llama.cpp's CLIs (swa_full
off: 256 cells, reused as the window moves; the LONG workload runs 290 positions through it)
and the full-size one.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from conftest import TinyFamily

import families_native as fn
import llama_cpp.llama_cpp as L
from families_native import Params, max_diff
from pykvsmooth import _capi
from reference_families import ReferenceFamily
from test_cli import chunk_ranges, run as run_cli
from test_gemma3 import FA_ATOL, LOGIT_ATOL, N_CTX, N_UBATCH, make_workloads, tokens

N_GEN = 30
# The f16-GELU flips (test_gemma3.LOGIT_ATOL) move the hidden states, and with them the
# entropies: measured up to 1.6e-4 (12 settings, both caches), no rank ever differing.
Z_ATOL = 5e-4


@pytest.fixture(scope="module")
def model(tiny_gemma3: TinyFamily) -> Iterator[fn.Model]:
    with fn.load_model(tiny_gemma3.text) as m:
        yield m


@pytest.fixture(scope="module")
def ref(tiny_gemma3: TinyFamily) -> ReferenceFamily:
    return ReferenceFamily(tiny_gemma3.text)


@pytest.fixture(scope="module")
def workloads(ref: ReferenceFamily):
    return make_workloads(ref)


@pytest.fixture(scope="module")
def gen(ref: ReferenceFamily) -> list[int]:
    return tokens(ref, N_GEN, 2)


@pytest.fixture(scope="module")
def reference(ref: ReferenceFamily, workloads, gen):
    cache: dict[tuple, fn.RefRun] = {}

    def get(params: Params | None, workload: str) -> fn.RefRun:
        if (params, workload) not in cache:
            cache[(params, workload)] = fn.run_reference(ref, params, workloads[workload], gen)
        return cache[(params, workload)]

    return get


def ctx_of(model: fn.Model, params: Params | None, *, swa_full: bool, flash_attn: bool = False):
    return fn.context(model, params, flash_attn=flash_attn, n_ctx=N_CTX, n_batch=N_UBATCH, n_ubatch=N_UBATCH,
                      swa_full=swa_full)


GRID = [pytest.param(Params(mode=m, layer_start=s, layer_end=e, lambda_ref=lr, window=w),
                     id=f"{m}-layers{s}-{e}-lref{lr}-w{w}")
        for m in ("adaptive", "fixed", "keys") for s, e, lr, w in [(1, 4, 0.9, 0.2), (0, 6, 0.5, 0.5)]]


def test_layer_ranges_hold_both_kinds(ref: ReferenceFamily) -> None:
    for p in GRID:
        kinds = {ref.is_swa[il] for il in p.values[0].layers}
        assert kinds == {True, False}
    assert {ref.is_swa[3], ref.is_swa[4]} == {True, False}  # the default range [3, 5)


@pytest.mark.parametrize("impl", ["auto", "composed"])
@pytest.mark.parametrize("params,swa_full", [pytest.param(p.values[0], False, id=f"{p.id}-swa-small") for p in GRID]
                         + [pytest.param(p.values[0], True, id=f"{p.id}-swa-full") for p in GRID[:2]])
def test_matches_reference(model, workloads, gen, reference, params: Params, swa_full: bool, impl: str) -> None:
    want = reference(params, "short")
    params = dataclasses.replace(params, impl=impl)
    assert max_diff(want.logits, reference(None, "short").logits) > 100 * LOGIT_ATOL
    with ctx_of(model, params, swa_full=swa_full) as ctx:
        got = fn.run_native(ctx, model.n_vocab, workloads["short"], gen, max_chunk=N_UBATCH)
    print(params, "swa_full", swa_full, "max |dlogit| =", max_diff(got.logits, want.logits))
    assert max_diff(got.logits, want.logits) <= LOGIT_ATOL
    fn.check_trace(got, want, params, z_atol=Z_ATOL)


def test_sliding_entropy_is_over_the_window(model, ref: ReferenceFamily, workloads, gen, reference) -> None:
    """Negative control: a reference whose layers are all global (the window ignored) has other
    entropies in the sliding layers than llama.cpp, by far more than Z_ATOL; the windowed
    reference has llama.cpp's."""
    params = GRID[1].values[0]  # every layer
    with ctx_of(model, params, swa_full=False) as ctx:
        got = fn.run_native(ctx, model.n_vocab, workloads["short"], gen, max_chunk=N_UBATCH)
    flat = [r for step in got.trace for r in step]
    glob = ReferenceFamily.__new__(ReferenceFamily)
    glob.__dict__.update(ref.__dict__)
    glob.is_swa = [False] * ref.n_layer
    unwindowed = fn.run_reference(glob, params, workloads["short"], gen).trace
    windowed = reference(params, "short").trace
    sliding = [i for i, r in enumerate(flat) if ref.is_swa[r.layer] and r.pos >= 8]
    assert len(sliding) == 3 * len(got.trace)
    assert max(abs(flat[i].z - windowed[i].z) for i in sliding) <= Z_ATOL
    assert np.median([abs(flat[i].z - unwindowed[i].z) for i in sliding]) > 100 * Z_ATOL


@pytest.mark.parametrize("params", [GRID[0], GRID[3], GRID[4]])
def test_small_swa_cache_with_reused_cells(model, workloads, gen, reference, params: Params) -> None:
    """290 positions through the small SWA cache's 256 cells: the sliding layers' current and
    previous cells are reused ones, their window the last 8 positions."""
    want = reference(params, "long")
    with ctx_of(model, params, swa_full=False) as ctx:
        got = fn.run_native(ctx, model.n_vocab, workloads["long"], gen, max_chunk=N_UBATCH)
        assert L.llama_memory_seq_pos_min(L.llama_get_memory(ctx), 0) > 0  # cells were reused
    print(params, "max |dlogit| =", max_diff(got.logits, want.logits))
    assert max_diff(got.logits, want.logits) <= LOGIT_ATOL
    fn.check_trace(got, want, params, z_atol=Z_ATOL)


@pytest.mark.parametrize("workload", ["embd", "embd-noncausal"])
def test_with_input_embeddings(model, workloads, gen, reference, workload: str) -> None:
    """An image's embeddings between text, decoded causally or (as mtmd does for Gemma 3) not:
    prompt tokens, never smoothed; the generation after them matches."""
    params = GRID[1].values[0]
    want = reference(params, workload)
    with ctx_of(model, params, swa_full=False) as ctx:
        got = fn.run_native(ctx, model.n_vocab, workloads[workload], gen)
    assert max_diff(got.logits, want.logits) <= LOGIT_ATOL
    fn.check_trace(got, want, params, z_atol=Z_ATOL)


@pytest.mark.parametrize("forget", ["memory_clear", "seq_rm"])
def test_second_run_after_forgetting(model, workloads, gen, reference, forget: str) -> None:
    """Both caches' queues follow both caches' sequence operations: a second run after
    llama_memory_clear / seq_rm(0, -1, -1) gives the very same numbers."""
    params = GRID[0].values[0]
    with ctx_of(model, params, swa_full=False) as ctx:
        first = fn.run_native(ctx, model.n_vocab, workloads["long"], gen[:10], max_chunk=N_UBATCH)
        mem = L.llama_get_memory(ctx)
        if forget == "memory_clear":
            L.llama_memory_clear(mem, True)
        else:
            assert L.llama_memory_seq_rm(mem, 0, -1, -1)
        second = fn.run_native(ctx, model.n_vocab, workloads["long"], gen[:10], max_chunk=N_UBATCH)
    assert np.array_equal(first.logits, second.logits)
    assert first.trace == second.trace
    assert max_diff(second.logits, reference(params, "long").logits[:11]) <= LOGIT_ATOL


# FA_ATOL from test_gemma3 (f16 K/V): measured 0.022 (fixed) and 0.037 (adaptive, M = 256 so that
# a rank flip from the FA-drifted entropies moves λ by 1/256 only), on the small SWA cache.
FA_GRID = [
    pytest.param(Params(mode="fixed", layer_start=0, layer_end=6), id="fixed-layers0-6"),
    pytest.param(Params(mode="adaptive", queue=256, lambda_ref=0.3, window=0.3, layer_start=1, layer_end=4),
                 id="adaptive-layers1-4-M256"),
]


@pytest.mark.parametrize("impl", ["auto", "composed"])
@pytest.mark.parametrize("params", FA_GRID)
def test_flash_attn_matches_reference(model, workloads, gen, reference, params: Params, impl: str) -> None:
    want = reference(params, "long")
    params = dataclasses.replace(params, impl=impl)
    assert max_diff(want.logits, reference(None, "long").logits) > 5 * FA_ATOL
    with ctx_of(model, params, swa_full=False, flash_attn=True) as ctx:
        got = fn.run_native(ctx, model.n_vocab, workloads["long"], gen, max_chunk=N_UBATCH)
    print(params, "FA max |dlogit| =", max_diff(got.logits, want.logits))
    assert max_diff(got.logits, want.logits) <= FA_ATOL
    fn.check_trace(got, want, params, z_atol=0.05, exact_lambda=False)


def test_accepted_with_default_layers(model) -> None:
    with ctx_of(model, None, swa_full=False) as ctx:
        p = _capi.llama_kvsmooth_default_params()
        assert _capi.llama_kvsmooth_set(ctx, ctypes.byref(p)) == 0
        got = _capi.llama_kvsmooth_params()
        assert _capi.llama_kvsmooth_get_params(ctx, ctypes.byref(got))
        assert (got.layer_start, got.layer_end) == (3, 5)


# ---------------------------------------------------------------------------------------
# llama-mtmd-cli

N_PREDICT = 16


def test_mtmd_cli_smooths_final_prompt_token_and_generated(tiny_gemma3: TinyFamily, tmp_path: Path) -> None:
    """With Gemma's template ("<start_of_turn>model\\n" ends the prompt), the CLI's defaults
    (small SWA cache, flash attention auto) and the default layers [3, 5) (one global, one
    sliding): the smoothed positions are exactly the final prompt token and the generated ones;
    none in the image's 16 (non-causal) embeddings."""
    trace = tmp_path / "trace.jsonl"
    base = ["-m", str(tiny_gemma3.text), "--mmproj", str(tiny_gemma3.mmproj), "--image", str(tiny_gemma3.png),
            "-p", "Describe the image.", "-n", str(N_PREDICT), "--temp", "0", "--seed", "1", "-t", "1",
            "-c", "1024"]
    r = run_cli("llama-mtmd-cli", base + ["--kvsmooth", "0.9", "--kvsmooth-trace", str(trace)])
    assert r.returncode == 0, r.stderr[-3000:]
    records = [json.loads(line) for line in trace.read_text(encoding="utf-8").splitlines() if line.strip()]
    text, media = chunk_ranges(r.stderr)
    assert len(media) == 1 and len(media[0]) == 16, r.stderr[-2000:]
    last_prompt = text[-1].stop - 1
    assert records and records[0]["pos"] == last_prompt and records[0]["token"] == "\n"
    positions = sorted({rec["pos"] for rec in records})
    assert positions == list(range(last_prompt, last_prompt + len(positions)))
    assert 1 < len(positions) <= N_PREDICT + 1
    by_pos: dict[int, list[int]] = {}
    for rec in records:
        by_pos.setdefault(rec["pos"], []).append(rec["layer"])
        assert rec["applied"] is True and 0.7 - 1e-6 <= rec["lambda"] <= 1.1 + 1e-6
    assert all(sorted(v) == [3, 4] for v in by_pos.values())
    assert not any(rec["pos"] in media[0] for rec in records)


@pytest.mark.parametrize("flash_attn", [False, True], ids=["fa-off", "fa-on"])
def test_off_is_bit_identical(model, workloads, gen, flash_attn: bool) -> None:
    """KVSmooth never set, and set then disabled: the very same logits, bit for bit."""
    kw = dict(swa_full=False, flash_attn=flash_attn)
    with ctx_of(model, None, **kw) as ctx:
        plain = fn.run_native(ctx, model.n_vocab, workloads["long"], gen[:10], max_chunk=N_UBATCH)
    with ctx_of(model, GRID[1].values[0], **kw) as ctx:
        _capi.llama_kvsmooth_disable(ctx)
        disabled = fn.run_native(ctx, model.n_vocab, workloads["long"], gen[:10], max_chunk=N_UBATCH)
    assert np.array_equal(plain.logits, disabled.logits)
    assert not any(disabled.trace)


def test_two_sequences_in_one_batch(model, ref: ReferenceFamily, reference) -> None:
    """Two sequences (prompts of 40 and 27 tokens) in one batch, then both generation tokens of
    each step in one decode, on the small SWA cache: each has its own queues and previous cells
    in both caches, and matches its own reference run."""
    from test_llama_kvsmooth import Batch as MultiBatch

    params = GRID[0].values[0]
    prompts = [tokens(ref, 40, 1), tokens(ref, 27, 3)]
    gens = [tokens(ref, 20, 2), tokens(ref, 20, 4)]
    with fn.context(model, params, n_ctx=N_CTX, swa_full=False, n_seq_max=2) as ctx:
        batch = MultiBatch(len(prompts[0]) + len(prompts[1]), n_seq_max=2)
        rows: list[list[np.ndarray]] = [[], []]
        traces: list[list[list]] = [[], []]
        try:
            items = [(t, i, seq, i == len(p) - 1) for seq, p in enumerate(prompts) for i, t in enumerate(p)]
            for step in range(1 + len(gens[0])):
                if step:
                    items = [(gens[seq][step - 1], len(prompts[seq]) + step - 1, seq, True) for seq in (0, 1)]
                batch.decode(ctx, items)
                out = [i for i, it in enumerate(items) if it[3]]
                trace = fn.read_trace(ctx)
                for seq in (0, 1):
                    rows[seq].append(fn.logits_row(ctx, out[seq], model.n_vocab))
                    traces[seq].append([r for r in trace if r.seq_id == seq])
        finally:
            batch.free()
    for seq in (0, 1):
        want = fn.run_reference(ref, params, [fn.text_chunk(prompts[seq], 0)], gens[seq])
        got = fn.Run(np.array(rows[seq]), [[dataclasses.replace(r, seq_id=0) for r in st] for st in traces[seq]],
                     list(range(len(prompts[seq]) - 1, len(prompts[seq]) + len(gens[seq]))))
        print(f"seq {seq}: max |dlogit| =", max_diff(got.logits, want.logits))
        assert max_diff(got.logits, want.logits) <= LOGIT_ATOL
        assert all(r.seq_id == seq for st in traces[seq] for r in st)
        fn.check_trace(got, want, params, z_atol=Z_ATOL)
