"""A hybrid model (LFM2: short-conv + attention layers, llama_memory_hybrid) in libllama against
the independent NumPy reference of tests/reference_hybrid.py, at the C API level, KVSmooth off;
the fixtures and helpers that test_hybrid_kvsmooth.py (KVSmooth on) shares.

The tiny random LFM2 of scripts/make_tiny_lfm2.py has 6 layers, conv / attn / conv / conv /
attn / attn (GQA, 4 query heads over 2 KV heads, head size 64, f32 weights, tied output head).
It runs through llama_cpp's low-level ctypes API, teacher-forced with test_llama_kvsmooth.py's
harness: a 40-token prompt with output on its last token, then N_GEN fixed tokens, one
llama_decode each; every step's logits are compared with the reference, which never calls
llama.cpp. With KVSmooth off this checks the reference's hybrid stack itself (the conv states
carried over decodes and ubatches, QK norm, NEOX RoPE, tied head), which the KVSmooth-on tests
then rely on; and the reference's own smoothing touches attention layers only (SPEC §4.1).
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest

import pykvsmooth  # noqa: F401  (points llama_cpp at the patched libllama: import it first)
import llama_cpp.llama_cpp as L  # noqa: E402

import make_tiny_lfm2 as maker  # noqa: E402  (scripts/ is on sys.path: conftest.py)
from reference_hybrid import ReferenceLFM2  # noqa: E402
from reference_llama import SequenceState  # noqa: E402
from test_llama_kvsmooth import (  # noqa: E402  (the C-API harness of the LLaMA tests)
    LogCapture, Model, Params, Run, context, max_diff, run_native, tokens)

N_PROMPT = 40
N_GEN = 40
# f32 weights and f32 cache against the float64 reference (measured: see test output, ~1e-5)
LOGIT_ATOL = 2e-3

ATTN = [il for il, t in enumerate(maker.LAYER_TYPES) if t == "attn"]   # 1, 4, 5
CONV = [il for il, t in enumerate(maker.LAYER_TYPES) if t == "conv"]   # 0, 2, 3
MIXED = (3, 5)      # the default range [3, n_layer - 1): conv layer 3, attention layer 4
CONV_ONLY = (2, 4)  # conv layers 2 and 3


@dataclasses.dataclass
class RefRun:
    logits: np.ndarray
    trace: list
    state: SequenceState


# ---------------------------------------------------------------------------------------
# the model, the log, the reference


@pytest.fixture(scope="module")
def lfm2_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-lfm2")
    maker.write_text_model(out / maker.TEXT_FILE, seed=0)
    return out / maker.TEXT_FILE


@pytest.fixture(scope="module")
def log() -> Iterator[LogCapture]:
    import llama_cpp._logger as llama_logger

    cap = LogCapture()
    L.llama_log_set(cap._callback, ctypes.c_void_p(0))
    yield cap
    L.llama_log_set(llama_logger.llama_log_callback, ctypes.c_void_p(0))


@pytest.fixture(scope="module")
def model(lfm2_gguf: Path, log: LogCapture) -> Iterator[Model]:
    L.llama_backend_init()
    ptr = L.llama_model_load_from_file(str(lfm2_gguf).encode(), L.llama_model_default_params())
    assert ptr, "the tiny LFM2 did not load"
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(ptr))
    yield Model(ptr, n_vocab, L.llama_model_n_layer(ptr))
    L.llama_model_free(ptr)


@pytest.fixture(scope="module")
def ref(lfm2_gguf: Path) -> ReferenceLFM2:
    return ReferenceLFM2(lfm2_gguf)


@pytest.fixture(scope="module")
def workload(model: Model) -> tuple[list[int], list[int]]:
    return tokens(model.n_vocab, N_PROMPT, seed=1), tokens(model.n_vocab, N_GEN, seed=2)


@pytest.fixture(scope="module")
def reference(ref: ReferenceLFM2, workload) -> Callable[..., RefRun]:
    cache: dict[Any, RefRun] = {}

    def get(params: Params | None) -> RefRun:
        if params not in cache:
            prompt, gen = workload
            st = ref.new_sequence(kvsmooth=params.reference() if params else None)
            rows = [ref.eval(st, prompt)[-1]] + [ref.eval(st, [t])[-1] for t in gen]
            cache[params] = RefRun(np.array(rows), list(st.trace), st)
        return cache[params]

    return get


def smoothed_layers(params: Params) -> list[int]:
    return [il for il in ATTN if params.layer_start <= il < params.layer_end]


def check_trace(run: Run, want: RefRun, params: Params, n_prompt: int, *, z_atol: float = 1e-4,
                exact_lambda: bool = True) -> None:
    """One record per smoothed attention layer for each generation step, at that step's position
    (no conv layer); entropies, and when `exact_lambda` ranks and λ, as the reference's."""
    layers = smoothed_layers(params)
    assert layers, "the range must hold an attention layer"
    for step, records in enumerate(run.trace):
        assert [(r.seq_id, r.pos, r.layer) for r in records] == [(0, n_prompt - 1 + step, il) for il in layers]
    flat = [r for step in run.trace for r in step]
    assert len(flat) == len(want.trace)
    lo, hi = params.lambda_ref - params.window, params.lambda_ref + params.window
    for got, exp in zip(flat, want.trace):
        assert (got.pos, got.layer) == (exp.pos, exp.layer)
        assert got.applied and exp.blended
        assert lo - 1e-6 <= got.lam <= hi + 1e-6
        assert abs(got.z - exp.z) <= z_atol, (got, exp)
        if params.mode == "fixed":
            assert got.lam == pytest.approx(params.lambda_ref, abs=1e-7)
        if exact_lambda:
            assert got.rank == exp.k, (got, exp)
            assert got.lam == pytest.approx(exp.lam, abs=1e-6), (got, exp)


@contextmanager
def graph_reuse(enabled: bool) -> Iterator[None]:
    """llama_context reads LLAMA_GRAPH_REUSE_DISABLE when it is created."""
    old = os.environ.get("LLAMA_GRAPH_REUSE_DISABLE")
    os.environ["LLAMA_GRAPH_REUSE_DISABLE"] = "0" if enabled else "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["LLAMA_GRAPH_REUSE_DISABLE"]
        else:
            os.environ["LLAMA_GRAPH_REUSE_DISABLE"] = old


MODES = ("adaptive", "fixed", "keys")
# the mixed default range with the paper's λref / window, and every layer with λref = w = 0.5
# (λ = k / M unclipped, following the rank one step at a time)
SETTINGS = [(*MIXED, 0.9, 0.2), (0, 6, 0.5, 0.5)]
GRID = [pytest.param(Params(mode=m, layer_start=s, layer_end=e, lambda_ref=lr, window=w),
                     id=f"{m}-layers{s}-{e}-lref{lr}-w{w}")
        for m in MODES for s, e, lr, w in SETTINGS]


# ---------------------------------------------------------------------------------------
# KVSmooth off: the hybrid stack itself


def test_fixture_is_hybrid(model: Model, ref: ReferenceLFM2) -> None:
    assert ref.attn_layers == ATTN and ref.conv_layers == CONV
    assert model.n_layer == len(maker.LAYER_TYPES)
    assert L.llama_model_is_hybrid(model.ptr) and not L.llama_model_is_recurrent(model.ptr)


@pytest.mark.parametrize("chunk,n_ubatch", [(None, 512), (16, 16), (None, 8)],
                         ids=["one-batch", "batch16", "ubatch8"])
def test_off_matches_reference(model: Model, workload, reference, chunk: int | None, n_ubatch: int) -> None:
    """Teacher-forced logits with KVSmooth off: the conv states carried over decodes (and over
    the ubatches a prompt is split into) and the attention layers, against the reference."""
    prompt, gen = workload
    with context(model, None, n_batch=chunk or 512, n_ubatch=n_ubatch) as ctx:
        got = run_native(ctx, model.n_vocab, prompt, gen, chunk=chunk)
    d = max_diff(got.logits, reference(None).logits)
    print(f"KVSmooth off: max |dlogit| = {d:.3g}")
    assert d <= LOGIT_ATOL
    assert all(not t for t in got.trace)


def test_reference_smoothing_changes_the_logits(reference) -> None:
    """The comparisons below cannot pass with smoothing silently off: it moves the logits far
    beyond LOGIT_ATOL, on the mixed range (one attention layer) too."""
    off = reference(None).logits
    for p in GRID:
        assert max_diff(reference(p.values[0]).logits, off) > 100 * LOGIT_ATOL


def test_reference_smooths_attention_layers_only(reference) -> None:
    for p in GRID:
        params = p.values[0]
        assert {e.layer for e in reference(params).trace} == set(smoothed_layers(params))


# Flash attention: as in test_llama_kvsmooth.py, llama.cpp casts the f32 K/V cache to f16 for
# ggml_flash_attn_ext, a relative error of up to 2^-11 per element in every attention layer that
# the float64 reference does not have; the QK norm keeps Q and K at RMS ~1.6 per element, so the
# scores' error is of the same order as for the LLaMA fixture. Measured on this workload (see
# test_flash_attn_baseline_without_kvsmooth's output): ~0.01 with KVSmooth off, the same order
# with it on; FA_ATOL = 0.05 keeps a margin of a few times that and is far below the effect of
# smoothing (> 0.2, asserted). Entropies drift by up to ~1e-2, which can flip a rank when two
# queued values are that close: the adaptive/keys cases use M = 256 and an unclipped window
# (a flip moves λ by 1/256), and λ / rank are checked within a few steps, not exactly.
FA_ATOL = 0.05
FA_GRID = [
    pytest.param(Params(mode="fixed", layer_start=MIXED[0], layer_end=MIXED[1]), id="fixed-layers3-5"),
    pytest.param(Params(mode="fixed", layer_start=0, layer_end=6, lambda_ref=0.5, window=0.5), id="fixed-layers0-6"),
    pytest.param(Params(mode="adaptive", queue=256, lambda_ref=0.3, window=0.3, layer_start=0, layer_end=6),
                 id="adaptive-layers0-6-M256"),
    pytest.param(Params(mode="keys", queue=256, lambda_ref=0.3, window=0.3, layer_start=1, layer_end=5),
                 id="keys-layers1-5-M256"),
]


def test_flash_attn_baseline_without_kvsmooth(model: Model, workload, reference) -> None:
    prompt, gen = workload
    with context(model, None, flash_attn=True) as ctx:
        got = run_native(ctx, model.n_vocab, prompt, gen)
    d = max_diff(got.logits, reference(None).logits)
    print(f"FA, KVSmooth off: max |dlogit| = {d:.3g}")
    assert d <= FA_ATOL / 2




def test_reference_smoothing_exceeds_fa_tolerance(reference) -> None:
    """The flash-attention cases of test_hybrid_kvsmooth.py compare within FA_ATOL: smoothing
    must move the logits well beyond it there."""
    off = reference(None).logits
    for p in FA_GRID:
        assert max_diff(reference(p.values[0]).logits, off) > 4 * FA_ATOL
