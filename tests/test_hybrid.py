"""Hybrid models in libllama against the independent NumPy references of tests/reference_hybrid.py,
at the C API level, KVSmooth off; and the fixtures and helpers that test_hybrid_kvsmooth.py
(KVSmooth on) shares.

Two families, both with `llama_memory_hybrid` (a KV cache for the attention layers, a recurrent
cache for the others), as tiny random-weight 6-layer fixtures (GQA, 4 query heads over 2 KV
heads, head size 64, f32 weights, tied output head):
- lfm2 (scripts/make_tiny_lfm2.py, LFM2 / LFM2-VL): conv / attn / conv / conv / attn / attn,
  short-conv layers, QK norm, NEOX RoPE;
- qwen35 (scripts/make_tiny_qwen35.py, Qwen3.5): delta / attn / delta / attn / delta / attn,
  gated delta-net layers, gated attention with QK norm and partial IMROPE (32 of 64 dims).
Each runs through llama_cpp's low-level ctypes API, teacher-forced with test_llama_kvsmooth.py's
harness: a 40-token prompt with output on its last token, then N_GEN fixed tokens, one
llama_decode each; every step's logits are compared with the family's reference, a full NumPy
forward of the layer stack (recurrent layers included) that never calls llama.cpp. With
KVSmooth off this checks the references themselves, which the KVSmooth-on tests rely on; and
that a reference's smoothing touches attention layers only (SPEC §4.1).
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

import make_tiny_lfm2  # noqa: E402  (scripts/ is on sys.path: conftest.py)
import make_tiny_qwen35  # noqa: E402
from reference_hybrid import ReferenceLFM2, ReferenceQwen35  # noqa: E402
from reference_llama import SequenceState  # noqa: E402
from test_llama_kvsmooth import (  # noqa: E402  (the C-API harness of the LLaMA tests)
    LogCapture, Model, Params, Run, context, max_diff, run_native, tokens)

N_PROMPT = 40
N_GEN = 32
# f32 weights and f32 cache against the float64 reference: measured 2-3e-5 (printed below)
LOGIT_ATOL = 2e-3


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    write: Callable[[Path], Any]   # writes the text GGUF to the path
    reference: type
    attn: tuple[int, ...]          # attention layers
    recurrent: tuple[int, ...]     # conv / delta-net layers
    mixed: tuple[int, int]         # the default range [3, n_layer - 1): one recurrent, one attention layer
    recurrent_only: tuple[int, int]
    fa_atol: float                 # flash attention vs the reference (see FA_GRID)

    def smoothed(self, params: Params) -> list[int]:
        return [il for il in self.attn if params.layer_start <= il < params.layer_end]


FAMILIES = {
    "lfm2": Family("lfm2", lambda p: make_tiny_lfm2.write_text_model(p, seed=0), ReferenceLFM2,
                   attn=(1, 4, 5), recurrent=(0, 2, 3), mixed=(3, 5), recurrent_only=(2, 4), fa_atol=0.05),
    "qwen35": Family("qwen35", lambda p: make_tiny_qwen35.write_text_model(p, seed=0), ReferenceQwen35,
                     attn=(1, 3, 5), recurrent=(0, 2, 4), mixed=(3, 5), recurrent_only=(4, 5), fa_atol=0.2),
}


@dataclasses.dataclass
class RefRun:
    logits: np.ndarray
    trace: list
    state: SequenceState


# ---------------------------------------------------------------------------------------
# the model, the log, the reference (one of each per family)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request: pytest.FixtureRequest) -> Family:
    return FAMILIES[request.param]


@pytest.fixture(scope="module")
def gguf_path(family: Family, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp(f"tiny-{family.name}") / f"tiny-{family.name}-text.gguf"
    family.write(path)
    return path


@pytest.fixture(scope="module")
def log() -> Iterator[LogCapture]:
    import llama_cpp._logger as llama_logger

    cap = LogCapture()
    L.llama_log_set(cap._callback, ctypes.c_void_p(0))
    yield cap
    L.llama_log_set(llama_logger.llama_log_callback, ctypes.c_void_p(0))


@pytest.fixture(scope="module")
def model(gguf_path: Path, log: LogCapture) -> Iterator[Model]:
    L.llama_backend_init()
    ptr = L.llama_model_load_from_file(str(gguf_path).encode(), L.llama_model_default_params())
    assert ptr, f"{gguf_path.name} did not load"
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(ptr))
    yield Model(ptr, n_vocab, L.llama_model_n_layer(ptr))
    L.llama_model_free(ptr)


@pytest.fixture(scope="module")
def ref(family: Family, gguf_path: Path):
    return family.reference(gguf_path)


@pytest.fixture(scope="module")
def workload(model: Model) -> tuple[list[int], list[int]]:
    return tokens(model.n_vocab, N_PROMPT, seed=1), tokens(model.n_vocab, N_GEN, seed=2)


@pytest.fixture(scope="module")
def reference(ref, workload) -> Callable[..., RefRun]:
    """The reference's teacher-forced run for a Params (None: KVSmooth off), computed once."""
    cache: dict[Any, RefRun] = {}

    def get(params: Params | None) -> RefRun:
        if params not in cache:
            prompt, gen = workload
            st = ref.new_sequence(kvsmooth=params.reference() if params else None)
            rows = [ref.eval(st, prompt)[-1]] + [ref.eval(st, [t])[-1] for t in gen]
            cache[params] = RefRun(np.array(rows), list(st.trace), st)
        return cache[params]

    return get


def check_trace(run: Run, want: RefRun, family: Family, params: Params, n_prompt: int, *,
                z_atol: float = 1e-4, exact_lambda: bool = True) -> None:
    """One record per smoothed attention layer for each generation step, at that step's position
    (no recurrent layer); entropies, and when `exact_lambda` ranks and λ, as the reference's."""
    layers = family.smoothed(params)
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
# the default range [3, 5) (one recurrent and one attention layer in both families) with the
# paper's λref / window, and every layer with λref = w = 0.5 (λ = k / M unclipped, following
# the rank one step at a time)
SETTINGS = [(3, 5, 0.9, 0.2), (0, 6, 0.5, 0.5)]
GRID = [pytest.param(Params(mode=m, layer_start=s, layer_end=e, lambda_ref=lr, window=w),
                     id=f"{m}-layers{s}-{e}-lref{lr}-w{w}")
        for m in MODES for s, e, lr, w in SETTINGS]

# Flash attention: as in test_llama_kvsmooth.py, llama.cpp casts the f32 K/V cache to f16 for
# ggml_flash_attn_ext, a relative error of up to 2^-11 per element in every attention layer that
# the float64 reference does not have. Measured over this workload (logits of std ~3), KVSmooth
# off / on (the FA_GRID cases, printed by the tests): lfm2 0.016 / 0.016-0.020; qwen35
# 0.048 / 0.037-0.108, whose gated attention output and delta-net states carry the drift on
# with more gain (it grows with the number of steps: 0.033 off after 20), and whose adaptive
# case adds rank flips (see below). Family.fa_atol (0.05, 0.2) is about 2x the worst of these;
# the baseline must stay within half of it, and smoothing moves the logits of every FA case by
# more than 4x it (test_reference_smoothing_exceeds_fa_tolerance), so a missing or misplaced
# blend cannot hide in it. Entropies drift by up to ~1e-2, which can flip a rank when two queued
# values are that close: the adaptive/keys cases use M = 256 and an unclipped window (a flip
# moves λ by 1/256), and λ / rank are checked within a few steps, not exactly.
FA_GRID = [
    pytest.param(Params(mode="fixed", layer_start=3, layer_end=5), id="fixed-layers3-5"),
    pytest.param(Params(mode="fixed", layer_start=0, layer_end=6, lambda_ref=0.5, window=0.5), id="fixed-layers0-6"),
    pytest.param(Params(mode="adaptive", queue=256, lambda_ref=0.3, window=0.3, layer_start=0, layer_end=6),
                 id="adaptive-layers0-6-M256"),
    pytest.param(Params(mode="keys", queue=256, lambda_ref=0.3, window=0.3, layer_start=1, layer_end=5),
                 id="keys-layers1-5-M256"),
]


# ---------------------------------------------------------------------------------------
# KVSmooth off: the hybrid stacks themselves


def test_fixture_is_hybrid(family: Family, model: Model, ref) -> None:
    assert tuple(ref.attn_layers) == family.attn and tuple(ref.recurrent_layers) == family.recurrent
    assert model.n_layer == 6
    assert L.llama_model_is_hybrid(model.ptr) and not L.llama_model_is_recurrent(model.ptr)


@pytest.mark.parametrize("chunk,n_ubatch", [(None, 512), (16, 8)], ids=["one-batch", "batch16-ubatch8"])
def test_off_matches_reference(model: Model, workload, reference, chunk: int | None, n_ubatch: int) -> None:
    """Teacher-forced logits with KVSmooth off: the recurrent states carried over decodes (and
    over the ubatches a prompt is split into) and the attention layers, against the reference."""
    prompt, gen = workload
    with context(model, None, n_batch=chunk or 512, n_ubatch=n_ubatch) as ctx:
        got = run_native(ctx, model.n_vocab, prompt, gen, chunk=chunk)
    d = max_diff(got.logits, reference(None).logits)
    print(f"KVSmooth off: max |dlogit| = {d:.3g}")
    assert d <= LOGIT_ATOL
    assert all(not t for t in got.trace)


def test_flash_attn_baseline_without_kvsmooth(family: Family, model: Model, workload, reference) -> None:
    """The f16 rounding of FA alone, with KVSmooth off: the part of fa_atol that is llama.cpp's."""
    prompt, gen = workload
    with context(model, None, flash_attn=True) as ctx:
        got = run_native(ctx, model.n_vocab, prompt, gen)
    d = max_diff(got.logits, reference(None).logits)
    print(f"FA, KVSmooth off: max |dlogit| = {d:.3g}")
    assert d <= family.fa_atol / 2


def test_reference_smoothing_changes_the_logits(reference) -> None:
    """The comparisons of test_hybrid_kvsmooth.py cannot pass with smoothing silently off: it
    moves the logits far beyond LOGIT_ATOL, on the default range (one attention layer) too."""
    off = reference(None).logits
    for p in GRID:
        assert max_diff(reference(p.values[0]).logits, off) > 100 * LOGIT_ATOL


def test_reference_smoothing_exceeds_fa_tolerance(family: Family, reference) -> None:
    off = reference(None).logits
    for p in FA_GRID:
        assert max_diff(reference(p.values[0]).logits, off) > 4 * family.fa_atol


def test_reference_smooths_attention_layers_only(family: Family, reference) -> None:
    for p in GRID:
        params = p.values[0]
        assert {e.layer for e in reference(params).trace} == set(family.smoothed(params))
