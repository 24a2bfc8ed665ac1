"""Independent NumPy oracle of the KVSmooth op (SPEC §1, docs/design.md §1).

Pure NumPy: nothing here calls native code, so the op tests hold the C/CUDA/Metal
kernels to the paper's arithmetic rather than to one another. Entropies, scores and
blends are evaluated in float64; only what the contract defines in f32 (λ, the rounding
into the cache type) is emulated in f32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

# ggml_type values (ggml.h)
GGML_TYPE_F32 = 0
GGML_TYPE_F16 = 1
GGML_TYPE_Q8_0 = 8
GGML_TYPE_BF16 = 30

TYPE_NAMES = {GGML_TYPE_F32: "f32", GGML_TYPE_F16: "f16", GGML_TYPE_Q8_0: "q8_0", GGML_TYPE_BF16: "bf16"}

# enum ggml_kvsmooth_mode
MODE_ADAPTIVE = 0
MODE_FIXED = 1
MODE_KEYS = 2

MODE_NAMES = {MODE_ADAPTIVE: "adaptive", MODE_FIXED: "fixed", MODE_KEYS: "keys"}

QK8_0 = 32
Q8_0_BLOCK_BYTES = 2 + QK8_0  # f16 d, then 32 int8


@dataclass(frozen=True)
class OpCase:
    """Shapes and parameters of one op call; mirrors struct kvsmooth_op_case field by field."""

    from_scores: int  # 0: kq path (ggml_kvsmooth), 1: q path (ggml_kvsmooth_ext)
    n_kv: int
    n_tps: int  # tokens per stream
    n_head: int
    n_head_kv: int
    n_stream: int
    d_k: int
    d_v: int
    n_smooth: int
    n_slot: int
    queue_cap: int
    queue: int  # M
    mode: int
    v_trans: int
    k_type: int
    v_type: int
    mask_kind: int  # 0 none, 1 f32, 2 f16 (values handed over as f32 either way)
    has_sinks: int
    lambda_ref: float
    window: float
    eps: float
    scale: float
    max_bias: float
    logit_softcap: float


# ---------------------------------------------------------------------------------------
# cache storage


def row_bytes(ggml_type: int, n: int) -> int:
    if ggml_type == GGML_TYPE_F32:
        return 4 * n
    if ggml_type in (GGML_TYPE_F16, GGML_TYPE_BF16):
        return 2 * n
    if ggml_type == GGML_TYPE_Q8_0:
        if n % QK8_0 != 0:
            raise ValueError(f"q8_0 rows need a multiple of {QK8_0} elements, got {n}")
        return n // QK8_0 * Q8_0_BLOCK_BYTES
    raise ValueError(f"unsupported cache type {ggml_type}")


def fp32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """ggml_compute_fp32_to_bf16: round to nearest even, NaN forced quiet."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    is_nan = (u & 0x7FFFFFFF) > 0x7F800000
    rounded = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
    quiet = (u >> 16) | 64
    return np.where(is_nan, quiet, rounded).astype(np.uint16)


def bf16_bits_to_fp32(b: np.ndarray) -> np.ndarray:
    return (np.asarray(b, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    """Like quantize_row_q8_0_ref: d = amax/127 (f32, stored f16), q = roundf(x * (1/d))."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return gguf_quants.quantize(x, GGMLQuantizationType.Q8_0)


def encode_rows(x: np.ndarray, ggml_type: int) -> np.ndarray:
    """f32 [..., n] -> uint8 [..., row_bytes(type, n)]: how the cache stores each row."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if ggml_type == GGML_TYPE_F32:
        out = x.view(np.uint8)
    elif ggml_type == GGML_TYPE_F16:
        out = x.astype(np.float16).view(np.uint8)
    elif ggml_type == GGML_TYPE_BF16:
        out = fp32_to_bf16_bits(x).view(np.uint8)
    elif ggml_type == GGML_TYPE_Q8_0:
        out = quantize_q8_0(x)
    else:
        raise ValueError(f"unsupported cache type {ggml_type}")
    return out.reshape(*x.shape[:-1], row_bytes(ggml_type, x.shape[-1])).copy()


def decode_rows(b: np.ndarray, ggml_type: int, n: int) -> np.ndarray:
    """uint8 [..., row_bytes(type, n)] -> f32 [..., n]."""
    b = np.ascontiguousarray(b, dtype=np.uint8)
    lead = b.shape[:-1]
    if b.shape[-1] != row_bytes(ggml_type, n):
        raise ValueError(f"row of {b.shape[-1]} bytes is not {n} elements of type {ggml_type}")
    if ggml_type == GGML_TYPE_F32:
        out = b.view(np.float32)
    elif ggml_type == GGML_TYPE_F16:
        out = b.view(np.float16).astype(np.float32)
    elif ggml_type == GGML_TYPE_BF16:
        out = bf16_bits_to_fp32(b.view(np.uint16))
    elif ggml_type == GGML_TYPE_Q8_0:
        blocks = b.reshape(-1, Q8_0_BLOCK_BYTES)
        d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
        q = blocks[:, 2:].copy().view(np.int8).astype(np.float32)
        out = q * d
    else:
        raise ValueError(f"unsupported cache type {ggml_type}")
    return out.reshape(*lead, n).astype(np.float32)


def q8_0_scales(b: np.ndarray, n: int) -> np.ndarray:
    """The f32 block scales d of q8_0 rows: uint8 [..., row_bytes] -> f32 [..., n // 32]."""
    blocks = np.ascontiguousarray(b, dtype=np.uint8).reshape(-1, Q8_0_BLOCK_BYTES)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    return d.reshape(*b.shape[:-1], n // QK8_0)


def ulp(x: np.ndarray, ggml_type: int) -> np.ndarray:
    """Spacing of the type's representable values at |x| (f16/bf16/f32)."""
    a = np.abs(np.asarray(x, dtype=np.float64))
    if ggml_type == GGML_TYPE_F32:
        return np.spacing(a.astype(np.float32)).astype(np.float64)
    if ggml_type == GGML_TYPE_F16:
        return np.spacing(np.minimum(a, 65504.0).astype(np.float16)).astype(np.float64)
    if ggml_type == GGML_TYPE_BF16:
        # 8 significant bits; subnormals share the smallest normal exponent (2^-126)
        e = np.floor(np.log2(np.maximum(a, 2.0**-126)))
        return np.exp2(e - 7)
    raise ValueError(f"no ulp for type {ggml_type}")


# ---------------------------------------------------------------------------------------
# attention probabilities and entropy


def entropy(p: np.ndarray, eps: float) -> np.ndarray:
    """H = −Σ_j p_j ln(p_j + eps) over the last axis (p = 0 contributes 0)."""
    p = np.asarray(p, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0.0, p * np.log(p + eps), 0.0)
    return -np.sum(terms, axis=-1)


def alibi_slopes(n_head: int, max_bias: float) -> np.ndarray:
    """Per-head ALiBi slope, as ggml_soft_max / ggml_flash_attn_ext derive it from max_bias."""
    if max_bias <= 0.0:
        return np.ones(n_head, dtype=np.float32)
    n_head_log2 = 1 << int(np.floor(np.log2(n_head)))
    m0 = np.float32(2.0) ** np.float32(-max_bias / n_head_log2)
    m1 = np.float32(2.0) ** np.float32(-(max_bias / 2.0) / n_head_log2)
    h = np.arange(n_head)
    slopes = np.where(
        h < n_head_log2,
        m0 ** (h + 1).astype(np.float32),
        m1 ** (2 * (h - n_head_log2) + 1).astype(np.float32),
    )
    return slopes.astype(np.float32)


def scores_to_probs(
    qk: np.ndarray,
    scale: float,
    max_bias: float = 0.0,
    logit_softcap: float = 0.0,
    mask: np.ndarray | None = None,
    sinks: np.ndarray | None = None,
) -> np.ndarray:
    """Attention probabilities [n_head, n_kv] from raw dot products q_h·k_c [n_head, n_kv].

    The same chain as ggml_flash_attn_ext: with a soft-cap, scale is divided by it and
    s = softcap·tanh(scale·qk); then s += slope_h·mask_c (mask −inf: probability 0); the
    sink logit (raw, per head) enters the softmax denominator only.
    """
    qk = np.asarray(qk, dtype=np.float64)
    n_head = qk.shape[0]
    scale = float(np.float32(scale))
    if logit_softcap != 0.0:
        scale = float(np.float32(scale) / np.float32(logit_softcap))
        s = logit_softcap * np.tanh(qk * scale)
    else:
        s = qk * scale
    if mask is not None:
        slopes = alibi_slopes(n_head, max_bias).astype(np.float64)[:, None]
        m = np.asarray(mask, dtype=np.float64)[None, :]
        with np.errstate(invalid="ignore"):
            s = s + np.where(np.isneginf(m), -np.inf, slopes * m)
    s_max = np.max(s, axis=-1, keepdims=True)
    if sinks is not None:
        s_max = np.maximum(s_max, np.asarray(sinks, dtype=np.float64)[:, None])
    e = np.exp(s - s_max)
    denom = np.sum(e, axis=-1, keepdims=True)
    if sinks is not None:
        denom = denom + np.exp(np.asarray(sinks, dtype=np.float64)[:, None] - s_max)
    return e / denom


# ---------------------------------------------------------------------------------------
# FIFO, λ, blend


def fifo_rank_push(fifo: list[float], z: float, queue: int) -> tuple[int, list[float]]:
    """Push z (a full queue drops its oldest value first), then k = #{the other values in
    the queue strictly smaller than z} (SPEC §1 step 3; paper eq. 13: k/M ≤ (M−1)/M)."""
    new = list(fifo) + [z]
    if len(new) > queue:
        new = new[len(new) - queue :]
    k = sum(1 for v in new[:-1] if v < z)
    return k, new


def smoothing_lambda(k: int, queue: int, mode: int, lambda_ref: float, window: float) -> np.float32:
    """fixed: λref; adaptive/keys: clamp(k / M, λref − w, λref + w), all in f32."""
    lref = np.float32(lambda_ref)
    if mode == MODE_FIXED:
        return lref
    lam_hat = np.float32(k) / np.float32(queue)
    lo = lref - np.float32(window)
    hi = lref + np.float32(window)
    return np.float32(min(max(lam_hat, lo), hi))


def blend(cur: np.ndarray, prev: np.ndarray, lam: float) -> np.ndarray:
    """(1 − λ)·cur + λ·prev, evaluated in float64 and returned as f32 (before the cache rounding)."""
    lam64 = float(lam)
    out = (1.0 - lam64) * np.asarray(cur, dtype=np.float64) + lam64 * np.asarray(prev, dtype=np.float64)
    return out.astype(np.float32)


# ---------------------------------------------------------------------------------------
# the whole op


@dataclass
class OpResult:
    k: np.ndarray  # uint8, cache layout
    v: np.ndarray  # uint8 (or elements, v_trans), cache layout
    state: np.ndarray  # f32 [n_slot, 1 + queue_cap]
    result: np.ndarray  # f32 [n_smooth, 4]: z, λ, k, applied
    z: np.ndarray  # f64 [n_smooth]
    k_blend_f32: dict[tuple[int, int], np.ndarray]  # (stream, cell) -> blended K row before rounding
    v_blend_f32: dict[tuple[int, int], np.ndarray]  # (stream, cell) -> blended V row before rounding


def decode_k(case: OpCase, k: np.ndarray) -> np.ndarray:
    """K cache bytes -> f32 [n_stream, n_kv, n_head_kv, d_k]."""
    flat = decode_rows(k, case.k_type, case.n_head_kv * case.d_k)
    return flat.reshape(case.n_stream, case.n_kv, case.n_head_kv, case.d_k)


def column_entropies(
    case: OpCase,
    kq_or_q: np.ndarray,
    mask: np.ndarray | None,
    sinks: np.ndarray | None,
    k: np.ndarray,
    ids: np.ndarray,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """z per ids column (and the α [n_head, n_kv] it came from), from the cache as given.

    Every column's entropy describes the attention that was computed before the op ran, so
    all of them use the K cache as it was handed in, not as earlier columns blended it.
    """
    z = np.zeros(case.n_smooth, dtype=np.float64)
    alphas: list[np.ndarray] = []
    k_f32 = decode_k(case, k) if case.from_scores else None
    group = case.n_head // case.n_head_kv
    for j in range(case.n_smooth):
        i, s = int(ids[j, 0]), int(ids[j, 1])
        if case.from_scores:
            q = np.asarray(kq_or_q, dtype=np.float64)[s * case.n_tps + i]  # [n_head, d_k]
            keys = k_f32[s].astype(np.float64)  # [n_kv, n_head_kv, d_k]
            kv_head = np.arange(case.n_head) // group
            qk = np.einsum("hd,chd->hc", q, keys[:, kv_head, :])
            m = None
            if mask is not None and case.mask_kind:
                m = np.asarray(mask, dtype=np.float32)[s, 0, i]
                if case.mask_kind == 2:
                    m = m.astype(np.float16).astype(np.float32)
            alpha = scores_to_probs(
                qk, case.scale, case.max_bias, case.logit_softcap, m, sinks if case.has_sinks else None
            )
        else:
            alpha = np.asarray(kq_or_q, dtype=np.float64)[s, :, i, :]
        alphas.append(alpha)
        z[j] = float(np.mean(entropy(alpha, case.eps)))
    return z, alphas


def reference(
    case: OpCase,
    kq_or_q: np.ndarray,
    mask: np.ndarray | None,
    sinks: np.ndarray | None,
    k: np.ndarray,
    v: np.ndarray,
    ids: np.ndarray,
    state: np.ndarray,
) -> OpResult:
    """What the op must leave in k, v, state and result (design.md §1, "Semantics per column")."""
    ids = np.asarray(ids, dtype=np.int32).reshape(case.n_smooth, 5)
    for t, d in ((case.k_type, case.d_k), (case.v_type, case.d_v)):
        if t == GGML_TYPE_Q8_0 and d % QK8_0 != 0:
            raise ValueError(f"q8_0 head rows need a multiple of {QK8_0} elements, got {d}")
    z, _ = column_entropies(case, kq_or_q, mask, sinks, k, ids)

    n_k = case.n_head_kv * case.d_k
    n_v = case.n_head_kv * case.d_v
    k_out = np.array(k, dtype=np.uint8, copy=True)
    v_out = np.array(v, copy=True)
    state_out = np.array(state, dtype=np.float32, copy=True)
    result = np.zeros((case.n_smooth, 4), dtype=np.float32)
    k_blend: dict[tuple[int, int], np.ndarray] = {}
    v_blend: dict[tuple[int, int], np.ndarray] = {}

    for j in range(case.n_smooth):
        s, cell, prev, slot = (int(x) for x in ids[j, 1:5])
        count = int(state_out[slot, 0])
        fifo = [float(x) for x in state_out[slot, 1 : 1 + count]]
        zj = float(np.float32(z[j]))
        rank, fifo = fifo_rank_push(fifo, zj, case.queue)
        state_out[slot, 0] = len(fifo)
        state_out[slot, 1 : 1 + len(fifo)] = fifo
        lam = smoothing_lambda(rank, case.queue, case.mode, case.lambda_ref, case.window)
        result[j] = (z[j], lam, rank, 1.0 if prev >= 0 else 0.0)
        if prev < 0:
            continue
        # K: each KV head's row is independent, and q8_0 blocks never straddle heads
        cur_k = decode_rows(k_out[s, cell], case.k_type, n_k)
        prev_k = decode_rows(k_out[s, prev], case.k_type, n_k)
        kb = blend(cur_k, prev_k, lam)
        k_blend[(s, cell)] = kb
        k_out[s, cell] = encode_rows(kb, case.k_type)
        if case.mode == MODE_KEYS:
            continue
        if case.v_trans:
            cur_v = decode_v_trans(v_out[s, :, cell], case)
            prev_v = decode_v_trans(v_out[s, :, prev], case)
            vb = blend(cur_v, prev_v, lam)
            v_blend[(s, cell)] = vb
            v_out[s, :, cell] = encode_v_trans_elems(vb, case)
        else:
            cur_v = decode_rows(v_out[s, cell], case.v_type, n_v)
            prev_v = decode_rows(v_out[s, prev], case.v_type, n_v)
            vb = blend(cur_v, prev_v, lam)
            v_blend[(s, cell)] = vb
            v_out[s, cell] = encode_rows(vb, case.v_type)
    return OpResult(k_out, v_out, state_out, result, z, k_blend, v_blend)


# V stored transposed: [n_stream, n_head_kv*d_v, n_kv] elements of v_type (never q8_0)

_ELEM_DTYPES = {GGML_TYPE_F32: np.float32, GGML_TYPE_F16: np.float16, GGML_TYPE_BF16: np.uint16}


def v_trans_dtype(v_type: int) -> type:
    if v_type not in _ELEM_DTYPES:
        raise ValueError(f"transposed V cannot be of type {v_type}")
    return _ELEM_DTYPES[v_type]


def decode_v_trans(v: np.ndarray, case: OpCase) -> np.ndarray:
    if case.v_type == GGML_TYPE_BF16:
        return bf16_bits_to_fp32(v)
    return np.asarray(v).astype(np.float32)


def encode_v_trans_elems(x: np.ndarray, case: OpCase) -> np.ndarray:
    if case.v_type == GGML_TYPE_BF16:
        return fp32_to_bf16_bits(x)
    return np.asarray(x, dtype=np.float32).astype(v_trans_dtype(case.v_type))
