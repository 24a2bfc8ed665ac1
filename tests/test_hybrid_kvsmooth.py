"""KVSmooth on hybrid models (lfm2: short-conv + attention; qwen35: gated delta-net + attention;
both llama_memory_hybrid) against the independent NumPy references (SPEC §1-2, §4.1), at the
C API level.

The fixtures, the teacher-forced workload and the references are test_hybrid.py's (KVSmooth off
is verified there). SPEC §4.1: only the attention layers in the range are smoothed — a recurrent
layer has no KV cell and never appears in the trace; a range of recurrent layers only is refused.

Covered, for each family: the three modes on the default range [3, 5) (one recurrent and one
attention layer) and on all layers; the prompt over several decodes and ubatches; flash
attention (tolerance: test_hybrid.FA_GRID); a range of recurrent layers only (refused with a
clear error, the previous configuration kept); and a second generation on the same context
equal, bit for bit, to a fresh one, with graph reuse on and off (`can_reuse` must look at the
hybrid memory context, not a plain KV-cache one).
"""

from __future__ import annotations

import dataclasses

import ctypes
from typing import Callable

import numpy as np
import pytest

import pykvsmooth  # noqa: F401  (points llama_cpp at the patched libllama: import it first)
import llama_cpp.llama_cpp as L  # noqa: E402
from pykvsmooth import _capi  # noqa: E402

from test_hybrid import (  # noqa: F401, E402  (the fixtures are used by name)
    FA_GRID, GRID, LOGIT_ATOL, N_GEN, Family, check_trace, family, gguf_path, graph_reuse, log,
    model, ref, reference, workload)
from test_llama_kvsmooth import (  # noqa: E402
    Batch, LogCapture, Model, Params, TraceRec, context, logits_row, max_diff, read_trace, run_native, tokens)


@pytest.mark.parametrize("impl", ["auto", "composed"])
@pytest.mark.parametrize("params", GRID)
def test_matches_reference(family: Family, model: Model, workload, reference, params: Params, impl: str) -> None:
    prompt, gen = workload
    want = reference(params)
    params = dataclasses.replace(params, impl=impl)
    with context(model, params) as ctx:
        got = run_native(ctx, model.n_vocab, prompt, gen)
    print(params, "max |dlogit| =", max_diff(got.logits, want.logits))
    assert max_diff(got.logits, want.logits) <= LOGIT_ATOL
    check_trace(got, want, family, params, len(prompt))


@pytest.mark.parametrize("params", [GRID[1], GRID[2]])
def test_prompt_in_several_batches(family: Family, model: Model, workload, reference, params: Params) -> None:
    """Three llama_decode calls of 16, 16 and 8 tokens, in ubatches of 8: only the last prompt
    token is smoothed, so the reference is the one-batch run."""
    prompt, gen = workload
    want = reference(params)
    with context(model, params, n_batch=16, n_ubatch=8) as ctx:
        got = run_native(ctx, model.n_vocab, prompt, gen, chunk=16)
    assert max_diff(got.logits, want.logits) <= LOGIT_ATOL
    check_trace(got, want, family, params, len(prompt))


@pytest.mark.parametrize("impl", ["auto", "composed"])
@pytest.mark.parametrize("params", FA_GRID)
def test_flash_attn_matches_reference(family: Family, model: Model, workload, reference, params: Params,
                                      impl: str) -> None:
    prompt, gen = workload
    want = reference(params)
    params = dataclasses.replace(params, impl=impl)
    with context(model, params, flash_attn=True) as ctx:
        got = run_native(ctx, model.n_vocab, prompt, gen, chunk=16)
    d = max_diff(got.logits, want.logits)
    print(params, f"FA max |dlogit| = {d:.3g}")
    assert d <= family.fa_atol
    check_trace(got, want, family, params, len(prompt), z_atol=0.05, exact_lambda=False)
    if params.mode != "fixed":
        flat = [r for step in got.trace for r in step]
        assert all(abs(r.rank - e.k) <= 3 for r, e in zip(flat, want.trace))


# ---------------------------------------------------------------------------------------
# ranges and refusals


def _set(ctx: int, log: LogCapture, params: Params) -> tuple[int, list[str]]:
    log.errors.clear()
    rc = _capi.llama_kvsmooth_set(ctx, ctypes.byref(params.native()))
    return rc, list(log.errors)


def test_default_range_holds_both_kinds_and_is_accepted(family: Family, model: Model) -> None:
    """-1/-1 resolves to [3, n_layer - 1) = [3, 5): one recurrent and one attention layer."""
    with context(model, None) as ctx:
        p = _capi.llama_kvsmooth_default_params()
        assert _capi.llama_kvsmooth_set(ctx, ctypes.byref(p)) == 0
        got = _capi.llama_kvsmooth_params()
        assert _capi.llama_kvsmooth_get_params(ctx, ctypes.byref(got))
        assert (got.layer_start, got.layer_end) == family.mixed == (3, 5)
        assert len(family.smoothed(Params(layer_start=3, layer_end=5))) == 1


@pytest.mark.parametrize("flash_attn", [False, True], ids=["fa-off", "fa-on"])
def test_recurrent_only_range_is_refused(family: Family, model: Model, workload, log: LogCapture,
                                         flash_attn: bool) -> None:
    """A range of conv / delta-net layers only: refused with an error that says the range has no
    attention layer; the previous (valid, mixed) configuration stays, and on a context without
    KVSmooth it stays off."""
    prompt, gen = workload
    valid = Params(layer_start=family.mixed[0], layer_end=family.mixed[1])
    bad = Params(layer_start=family.recurrent_only[0], layer_end=family.recurrent_only[1])
    assert not family.smoothed(bad)
    with context(model, None, flash_attn=flash_attn) as ctx:
        rc, errors = _set(ctx, log, bad)
        assert rc in (_capi.LLAMA_KVSMOOTH_ERR_INVALID_PARAM, _capi.LLAMA_KVSMOOTH_ERR_UNSUPPORTED)
        assert any("layer" in line and "attention" in line for line in errors), errors
        assert not _capi.llama_kvsmooth_enabled(ctx)
        assert _set(ctx, log, valid)[0] == 0
        assert _set(ctx, log, bad)[0] == rc
        got = _capi.llama_kvsmooth_params()
        assert _capi.llama_kvsmooth_enabled(ctx) and _capi.llama_kvsmooth_get_params(ctx, ctypes.byref(got))
        assert (got.layer_start, got.layer_end) == family.mixed
        run = run_native(ctx, model.n_vocab, prompt, gen[:4])
        assert [[r.layer for r in step] for step in run.trace] == [family.smoothed(valid)] * 5


# ---------------------------------------------------------------------------------------
# the same context again


def _clear(ctx: int) -> None:
    L.llama_memory_clear(L.llama_get_memory(ctx), True)


def _seq_rm(ctx: int) -> None:
    assert L.llama_memory_seq_rm(L.llama_get_memory(ctx), 0, -1, -1)


@pytest.mark.parametrize("reuse", [True, False], ids=["graph-reuse", "no-graph-reuse"])
@pytest.mark.parametrize("forget", [_clear, _seq_rm], ids=["memory_clear", "seq_rm"])
def test_second_generation_equals_fresh(family: Family, model: Model, workload, reference,
                                        forget: Callable[[int], None], reuse: bool) -> None:
    """A generation on a context that ran one before (memory emptied) is the same, bit for bit,
    as on a fresh context, with the graph reused from step to step or rebuilt every time; and
    both are the reference's. Reusing a graph whose KVSmooth inputs were not refreshed for the
    hybrid memory context would smooth the wrong cells or with stale queues."""
    params = GRID[1].values[0]  # adaptive on all layers
    prompt, gen = workload
    with graph_reuse(reuse):
        with context(model, params) as ctx:
            fresh = run_native(ctx, model.n_vocab, prompt, gen)
        with context(model, params) as ctx:
            run_native(ctx, model.n_vocab, prompt, tokens(model.n_vocab, N_GEN, seed=7))
            forget(ctx)
            second = run_native(ctx, model.n_vocab, prompt, gen)
    assert np.array_equal(second.logits, fresh.logits)
    assert second.trace == fresh.trace
    want = reference(params)
    assert max_diff(second.logits, want.logits) <= LOGIT_ATOL
    check_trace(second, want, family, params, len(prompt))


def test_graph_reuse_changes_nothing(model: Model, workload) -> None:
    params = GRID[0].values[0]  # adaptive on the default range
    prompt, gen = workload
    runs = []
    for reuse in (True, False):
        with graph_reuse(reuse), context(model, params) as ctx:
            runs.append(run_native(ctx, model.n_vocab, prompt, gen))
    assert np.array_equal(runs[0].logits, runs[1].logits)
    assert runs[0].trace == runs[1].trace


# ---------------------------------------------------------------------------------------
# KVSmooth off on a hybrid context, and two sequences in one batch


def test_disabled_is_bit_identical(model: Model, workload) -> None:
    """Set then disabled before any decode, and disabled after a smoothed run (memory cleared):
    the very same logits as a context where KVSmooth was never set."""
    prompt, gen = workload
    params = GRID[1].values[0]
    with context(model, None) as ctx:
        plain = run_native(ctx, model.n_vocab, prompt, gen)
    with context(model, params) as ctx:
        _capi.llama_kvsmooth_disable(ctx)
        assert not _capi.llama_kvsmooth_enabled(ctx)
        at_once = run_native(ctx, model.n_vocab, prompt, gen)
    with context(model, params) as ctx:
        smoothed = run_native(ctx, model.n_vocab, prompt, gen)
        _capi.llama_kvsmooth_disable(ctx)
        _clear(ctx)
        after_use = run_native(ctx, model.n_vocab, prompt, gen)
    assert np.array_equal(at_once.logits, plain.logits)
    assert np.array_equal(after_use.logits, plain.logits)
    assert all(not t for t in after_use.trace)
    assert max_diff(smoothed.logits, plain.logits) > 1.0


@pytest.mark.parametrize("kv_unified", [True, False], ids=["unified", "per-seq-streams"])
def test_two_sequences_in_one_batch(family: Family, model: Model, ref, kv_unified: bool) -> None:
    """Two sequences (prompts of 40 and 33 tokens) decoded together — both prompts in one batch,
    then both generation tokens of each step in one batch — each smoothed as the reference
    smooths it alone: its own queues, its own previous cell, its own recurrent state."""
    params = GRID[1].values[0]
    n_gen = 16
    prompts = [tokens(model.n_vocab, 40, seed=1), tokens(model.n_vocab, 33, seed=3)]
    gens = [tokens(model.n_vocab, n_gen, seed=2), tokens(model.n_vocab, n_gen, seed=4)]
    rows: list[list[np.ndarray]] = [[], []]
    traces: list[list[list[TraceRec]]] = [[], []]
    with context(model, params, n_seq_max=2, kv_unified=kv_unified) as ctx:
        batch = Batch(len(prompts[0]) + len(prompts[1]), n_seq_max=2)
        try:
            items = [(t, i, seq, i == len(p) - 1) for seq, p in enumerate(prompts) for i, t in enumerate(p)]
            for step in range(1 + n_gen):
                if step:
                    items = [(gens[seq][step - 1], len(prompts[seq]) + step - 1, seq, True) for seq in (0, 1)]
                batch.decode(ctx, items)
                out = [i for i, it in enumerate(items) if it[3]]
                trace = read_trace(ctx)
                for seq in (0, 1):
                    rows[seq].append(logits_row(ctx, out[seq], model.n_vocab))
                    traces[seq].append([r for r in trace if r.seq_id == seq])
        finally:
            batch.free()
    layers = family.smoothed(params)
    for seq in (0, 1):
        st = ref.new_sequence(kvsmooth=params.reference())
        want = np.array([ref.eval(st, prompts[seq])[-1]] + [ref.eval(st, [t])[-1] for t in gens[seq]])
        assert max_diff(np.array(rows[seq]), want) <= LOGIT_ATOL
        n = len(prompts[seq])
        assert [[(r.pos, r.layer) for r in step] for step in traces[seq]] == \
               [[(n - 1 + step, il) for il in layers] for step in range(1 + n_gen)]
        flat = [r for step in traces[seq] for r in step]
        assert [(r.rank, r.applied) for r in flat] == [(e.k, e.blended) for e in st.trace]
        assert [r.z for r in flat] == pytest.approx([e.z for e in st.trace], abs=1e-4)
