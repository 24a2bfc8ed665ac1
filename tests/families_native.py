"""Running the tiny family fixtures (Qwen2-VL, Gemma 3) through libllama, teacher-forced, with
the KVSmooth C API: the native half of tests/test_qwen2vl.py and tests/test_gemma3*.py.

A run is a list of chunks, as mtmd decodes a prompt (text, image embeddings, text), each one
llama_decode with no output, except the final prompt token; then one llama_decode per fed-back
token, with output. Embedding chunks carry n_pos_per_embd positions per embedding in
llama_batch.pos, section-major (pos[j * n_tokens + i], src/llama-batch.cpp), as
mtmd_helper_decode_image_chunk passes them; token chunks one position per token.
"""

from __future__ import annotations

import ctypes
import dataclasses
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

import pykvsmooth  # noqa: F401  (points llama_cpp at the patched libllama: import it first)
import llama_cpp.llama_cpp as L  # noqa: E402
from pykvsmooth import _capi  # noqa: E402

from reference_families import FamilyState, ReferenceFamily  # noqa: E402
from test_llama_kvsmooth import Params, TraceRec, logits_row, max_diff, read_trace  # noqa: E402,F401


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Text tokens (`tokens`) or input embeddings (`embd`, [n, n_embd] float32) at `pos`: [n],
    or [n_pos, n] for embeddings of an M-RoPE model."""

    pos: np.ndarray
    tokens: tuple[int, ...] | None = None
    embd: np.ndarray | None = None
    causal: bool = True  # False: decoded with llama_set_causal_attn(ctx, false), as mtmd does Gemma 3 images

    @property
    def n(self) -> int:
        return len(self.tokens) if self.tokens is not None else int(self.embd.shape[0])  # type: ignore[union-attr]

    @property
    def seq_pos(self) -> np.ndarray:
        """Sequential positions (section 0)."""
        return self.pos if self.pos.ndim == 1 else self.pos[0]


def text_chunk(tokens: Sequence[int], start: int) -> Chunk:
    return Chunk(pos=np.arange(start, start + len(tokens), dtype=np.int64), tokens=tuple(int(t) for t in tokens))


def embd_chunk(embd: np.ndarray, pos: np.ndarray, causal: bool = True) -> Chunk:
    return Chunk(pos=np.asarray(pos, dtype=np.int64), embd=np.ascontiguousarray(embd, dtype=np.float32),
                 causal=causal)


class Batch:
    """One llama_batch for one sequence, built from ctypes arrays this object owns (never
    passed to llama_batch_free)."""

    def __init__(self, chunk: Chunk, seq: int, outputs: Sequence[bool]) -> None:
        n = chunk.n
        b = L.llama_batch()
        b.n_tokens = n
        self._keep: list[object] = []
        if chunk.tokens is not None:
            tok = (L.llama_token * n)(*chunk.tokens)
            self._keep.append(tok)
            b.token = ctypes.cast(tok, ctypes.POINTER(L.llama_token))
        else:
            embd = np.ascontiguousarray(chunk.embd, dtype=np.float32)
            self._keep.append(embd)
            b.embd = embd.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        flat = [int(p) for p in np.asarray(chunk.pos).reshape(-1)]  # [n] or section-major [n_pos * n]
        pos = (L.llama_pos * len(flat))(*flat)
        n_seq = (ctypes.c_int32 * n)(*([1] * n))
        ids = [(L.llama_seq_id * 1)(seq) for _ in range(n)]
        seq_ptrs = (ctypes.POINTER(L.llama_seq_id) * (n + 1))(
            *[ctypes.cast(a, ctypes.POINTER(L.llama_seq_id)) for a in ids], None)
        logits = (ctypes.c_int8 * n)(*[1 if o else 0 for o in outputs])
        self._keep += [pos, n_seq, ids, seq_ptrs, logits]
        b.pos = ctypes.cast(pos, ctypes.POINTER(L.llama_pos))
        b.n_seq_id = ctypes.cast(n_seq, ctypes.POINTER(ctypes.c_int32))
        b.seq_id = ctypes.cast(seq_ptrs, ctypes.POINTER(ctypes.POINTER(L.llama_seq_id)))
        b.logits = ctypes.cast(logits, ctypes.POINTER(ctypes.c_int8))
        self.b = b

    def decode(self, ctx: int) -> None:
        rc = L.llama_decode(ctx, self.b)
        assert rc == 0, f"llama_decode returned {rc}"


@dataclasses.dataclass
class Model:
    ptr: int
    n_vocab: int
    n_layer: int
    n_embd: int


@contextmanager
def load_model(path: Path) -> Iterator[Model]:
    L.llama_backend_init()
    ptr = L.llama_model_load_from_file(str(path).encode(), L.llama_model_default_params())
    assert ptr, f"{path} did not load"
    try:
        yield Model(ptr, L.llama_vocab_n_tokens(L.llama_model_get_vocab(ptr)), L.llama_model_n_layer(ptr),
                    L.llama_model_n_embd(ptr))
    finally:
        L.llama_model_free(ptr)


@contextmanager
def context(model: Model, kvsmooth: Params | None = None, *, flash_attn: bool = False, n_ctx: int = 512,
            n_batch: int = 512, n_ubatch: int = 512, swa_full: bool = True, n_threads: int = 1,
            n_seq_max: int = 1) -> Iterator[int]:
    """A context with an f32 KV cache, with KVSmooth set to `kvsmooth` if given (asserted to be
    accepted). One thread: see test_llama_kvsmooth.context."""
    cp = L.llama_context_default_params()
    cp.n_ctx = n_ctx
    cp.n_batch, cp.n_ubatch = n_batch, n_ubatch
    cp.n_seq_max, cp.kv_unified = n_seq_max, True
    cp.swa_full = swa_full
    cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else L.LLAMA_FLASH_ATTN_TYPE_DISABLED
    cp.type_k = cp.type_v = L.GGML_TYPE_F32
    cp.n_threads = cp.n_threads_batch = n_threads
    ctx = L.llama_init_from_model(model.ptr, cp)
    assert ctx, "llama_init_from_model failed"
    try:
        if kvsmooth is not None:
            rc = _capi.llama_kvsmooth_set(ctx, ctypes.byref(kvsmooth.native()))
            assert rc == 0, f"llama_kvsmooth_set returned {rc}"
        yield ctx
    finally:
        L.llama_free(ctx)


@dataclasses.dataclass
class Run:
    logits: np.ndarray            # [1 + n_gen, n_vocab]: one row per generation step
    trace: list[list[TraceRec]]   # the trace of each generation step's decode
    positions: list[int]          # the sequential position of each generation step


def run_native(ctx: int, n_vocab: int, prompt: Sequence[Chunk], gen: Sequence[int], *, seq: int = 0,
               max_chunk: int | None = None) -> Run:
    """Decode the prompt chunks (split into decodes of at most `max_chunk` entries), output on
    the very last prompt token only, then each token of `gen` at the following positions."""
    last = prompt[-1]
    for ci, ch in enumerate(prompt):
        step = max_chunk or ch.n
        for s in range(0, ch.n, step):
            e = min(s + step, ch.n)
            part = Chunk(pos=ch.pos[..., s:e], tokens=ch.tokens[s:e] if ch.tokens is not None else None,
                         embd=ch.embd[s:e] if ch.embd is not None else None)
            out = [ci == len(prompt) - 1 and s + i == ch.n - 1 for i in range(e - s)]
            if not ch.causal:
                assert step >= ch.n, "a non-causal chunk must be one decode"
                L.llama_set_causal_attn(ctx, False)
            try:
                Batch(part, seq, out).decode(ctx)
            finally:
                L.llama_set_causal_attn(ctx, True)
            if not any(out):
                assert _capi.llama_kvsmooth_trace_n(ctx) == 0  # tokens without output are never smoothed
    p = int(last.seq_pos[-1])
    rows, trace, positions = [logits_row(ctx, -1, n_vocab)], [read_trace(ctx)], [p]
    for j, tok in enumerate(gen):
        Batch(text_chunk([tok], p + 1 + j), seq, [True]).decode(ctx)
        rows.append(logits_row(ctx, -1, n_vocab))
        trace.append(read_trace(ctx))
        positions.append(p + 1 + j)
    return Run(np.array(rows), trace, positions)


@dataclasses.dataclass
class RefRun:
    logits: np.ndarray
    trace: list
    state: FamilyState


def run_reference(ref: ReferenceFamily, params: Params | None, prompt: Sequence[Chunk], gen: Sequence[int]) -> RefRun:
    """The same run through the NumPy reference: each chunk one ubatch, the final token smoothed."""
    st = ref.new_sequence(kvsmooth=params.reference() if params else None)
    for ci, ch in enumerate(prompt):
        final = ci == len(prompt) - 1
        if ch.tokens is not None:
            logits = ref.eval(st, ch.tokens, pos=ch.pos, smooth_last=final)
        else:
            logits = ref.eval_embd(st, ch.embd, pos=ch.pos, smooth_last=final, causal=ch.causal)
    rows = [logits[-1]]
    p = int(prompt[-1].seq_pos[-1])
    for j, tok in enumerate(gen):
        rows.append(ref.eval(st, [tok], pos=[p + 1 + j])[-1])
    return RefRun(np.array(rows), list(st.trace), st)


def check_trace(run: Run, want: RefRun, params: Params, *, z_atol: float = 1e-4, exact_lambda: bool = True) -> None:
    """One record per smoothed layer for each generation step, at that step's sequential
    position, blended; z within z_atol of the reference's; rank and λ exactly (when asked)."""
    lo, hi = params.lambda_ref - params.window, params.lambda_ref + params.window
    flat = [r for step in run.trace for r in step]
    assert len(flat) == len(run.trace) * len(params.layers) == len(want.trace)
    for step, records in enumerate(run.trace):
        assert [(r.seq_id, r.pos, r.layer) for r in records] == [(0, run.positions[step], il) for il in params.layers]
    for got, exp in zip(flat, want.trace):
        assert (got.pos, got.layer) == (exp.pos, exp.layer)
        assert got.applied and exp.blended
        assert lo - 1e-6 <= got.lam <= hi + 1e-6
        assert abs(got.z - exp.z) <= z_atol, (got, exp)
        if params.mode == "fixed":
            assert abs(got.lam - params.lambda_ref) <= 1e-7
        if exact_lambda:
            assert got.rank == exp.k, (got, exp)
            assert abs(got.lam - exp.lam) <= 1e-6, (got, exp)
