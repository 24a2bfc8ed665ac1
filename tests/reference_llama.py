"""Independent NumPy reference of a LLaMA-architecture GGUF model, with KVSmooth.

Reads the weights back with `gguf.GGUFReader` and never calls llama.cpp, so it can check
the native implementation from the outside. The forward follows llama.cpp's LLM_ARCH_LLAMA
graph: token embedding, RMSNorm, RoPE of type NORM (adjacent pairs x[2i], x[2i+1]),
grouped-query attention over a KV cache, SwiGLU FFN, output norm and head. Activations are
float64; the cache holds float32 arrays whose values are rounded to the emulated cache type
(f32, f16, bf16 or q8_0) exactly as they are when written into a llama.cpp cache.

KVSmooth (SPEC §1-2): for each smoothed token t and each layer l in [layer_start, layer_end):
the layer's attention is computed with t's raw K/V in the cache; then
z = mean over query heads of -Σ α ln(α + ε), the FIFO S(l) is updated, λ chosen, and
K[t] ← (1-λ) K[t] + λ K[t-1] (and V unless mode is "keys"), blended in f32 and rounded once
into the cache type. Within one `eval` call (one ubatch), every token's attention of a layer
is computed before that layer's smoothed tokens are blended, in position order.

    ref = ReferenceLlama("tiny-llava-text.gguf")
    state = ref.new_sequence(kvsmooth=dict(lambda_ref=0.9, window=0.2))
    logits = ref.eval(state, prompt_tokens)   # smooths the final token of the call
    logits = ref.eval(state, [next_token])
    state.trace                               # [TraceEntry(pos, layer, z, lam, k, blended)]
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType

CACHE_TYPES = ("f32", "f16", "bf16", "q8_0")
MODES = ("adaptive", "fixed", "keys")
QK8_0 = 32


@dataclasses.dataclass(frozen=True)
class KVSmoothParams:
    lambda_ref: float = 0.9
    window: float = 0.2
    queue: int = 15
    layer_start: int = 3
    layer_end: int | None = None  # exclusive; None: n_layer - 1
    eps: float = 1e-10
    mode: str = "adaptive"

    def validated(self, n_layer: int) -> "KVSmoothParams":
        end = n_layer - 1 if self.layer_end is None else self.layer_end
        if not 0 <= self.layer_start <= end <= n_layer:
            raise ValueError(f"bad layer range [{self.layer_start}, {end}) for {n_layer} layers")
        if self.queue < 1:
            raise ValueError("queue must be >= 1")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        return dataclasses.replace(self, layer_end=end)


@dataclasses.dataclass(frozen=True)
class TraceEntry:
    pos: int
    layer: int
    z: float       # mean attention entropy over the query heads
    lam: float     # λ used
    k: int         # values in the FIFO (after pushing z, z excluded) strictly smaller than z
    blended: bool  # a previous cell existed and the rows were blended


@dataclasses.dataclass
class SequenceState:
    """One sequence: its KV cache (position = cell), FIFOs and trace."""

    k: list[np.ndarray]  # per layer, float32 [n_pos, n_head_kv, head_dim], post-RoPE
    v: list[np.ndarray]
    kvsmooth: KVSmoothParams | None
    queues: list[list[float]]
    trace: list[TraceEntry] = dataclasses.field(default_factory=list)

    @property
    def n_past(self) -> int:
        return self.k[0].shape[0]

    def reset_queues(self) -> None:
        for q in self.queues:
            q.clear()

    def truncate(self, n_keep: int) -> None:
        """Remove the cells at positions >= n_keep; like seq_rm, this empties the FIFOs."""
        self.k = [a[:n_keep].copy() for a in self.k]
        self.v = [a[:n_keep].copy() for a in self.v]
        self.reset_queues()


def round_to_cache(x: np.ndarray, cache_type: str) -> np.ndarray:
    """Round f32 rows (last axis = one KV head, a multiple of 32 for q8_0) as a cache stores them."""
    x = np.asarray(x, dtype=np.float32)
    if cache_type == "f32":
        return x.copy()
    if cache_type == "f16":
        return x.astype(np.float16).astype(np.float32)
    if cache_type == "bf16":
        u = x.view(np.uint32).astype(np.uint64)
        r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16  # round to nearest even (ggml)
        return r.astype(np.uint32).view(np.float32)
    if cache_type == "q8_0":
        if x.shape[-1] % QK8_0:
            raise ValueError("q8_0 rows must be a multiple of 32")
        b = x.reshape(*x.shape[:-1], -1, QK8_0)
        amax = np.max(np.abs(b), axis=-1, keepdims=True)
        d = amax / np.float32(127)
        with np.errstate(divide="ignore"):
            inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
        t = b * inv
        q = np.sign(t) * np.floor(np.abs(t) + np.float32(0.5))  # roundf: half away from zero
        d16 = d.astype(np.float16).astype(np.float32)
        return (q * d16).astype(np.float32).reshape(x.shape)
    raise ValueError(f"cache type must be one of {CACHE_TYPES}")


def hadamard(n: int) -> np.ndarray:
    """Orthonormal Sylvester Walsh-Hadamard matrix, as llama.cpp's ggml_gen_hadamard (H·H = I)."""
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


def _rotate(x: np.ndarray, h: np.ndarray | None) -> np.ndarray:
    if h is None:
        return x
    n = h.shape[0]
    return (x.reshape(*x.shape[:-1], -1, n) @ h).reshape(x.shape)


def gguf_value(field: Any) -> Any:
    """The value of a GGUFReader field (ReaderField.contents() where the gguf package has it)."""
    if hasattr(field, "contents"):
        return field.contents()
    vals = [field.parts[i] for i in field.data]
    if field.types[-1] == GGUFValueType.STRING:
        vals = [bytes(v).decode("utf-8") for v in vals]
    else:
        vals = [v.tolist()[0] for v in vals]
    return vals if field.types[0] == GGUFValueType.ARRAY else vals[0]


def _field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        if default is None:
            raise KeyError(key)
        return default
    return gguf_value(f)


def _rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


class ReferenceLlama:
    def __init__(self, path: str | Path, cache_type: str = "f32", attn_rot: bool | None = None,
                 round_q: bool = False) -> None:
        """`attn_rot`: rotate Q/K/V with a Hadamard matrix before the cache, as llama.cpp does
        for quantized caches (None: llama.cpp's rule: q8_0 cache, head size a multiple of 64,
        LLAMA_ATTN_ROT_DISABLE unset). The cache then holds rotated rows, like the native one.
        `round_q`: round Q to the cache type before Q·K, as the CPU backend does when it
        converts Q to the vec_dot type of an f16/bf16/q8_0 K (the largest error term of a
        q8_0 cache). Off by default: the reference stays an exact-arithmetic model."""
        if cache_type not in CACHE_TYPES:
            raise ValueError(f"cache type must be one of {CACHE_TYPES}")
        self.cache_type = cache_type
        self.round_q = round_q
        r = GGUFReader(str(path))
        arch = _field(r, "general.architecture")
        if arch != "llama":
            raise ValueError(f"expected a llama GGUF, got {arch!r}")
        self.n_embd = int(_field(r, "llama.embedding_length"))
        self.n_layer = int(_field(r, "llama.block_count"))
        self.n_head = int(_field(r, "llama.attention.head_count"))
        self.n_head_kv = int(_field(r, "llama.attention.head_count_kv", self.n_head))
        self.head_dim = self.n_embd // self.n_head
        self.n_rot = int(_field(r, "llama.rope.dimension_count", self.head_dim))
        self.rope_base = float(_field(r, "llama.rope.freq_base", 10000.0))
        self.rms_eps = float(_field(r, "llama.attention.layer_norm_rms_epsilon"))
        self.tokens: list[str] = list(_field(r, "tokenizer.ggml.tokens"))
        if self.n_rot != self.head_dim:
            raise ValueError("partial RoPE is not modelled")
        self.w: dict[str, np.ndarray] = {}
        for t in r.tensors:
            if t.tensor_type not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
                raise ValueError(f"{t.name}: only f32/f16 weights are supported")
            shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # NumPy order
            self.w[t.name] = np.asarray(t.data, dtype=np.float64).reshape(shape)
        if "output.weight" not in self.w:
            self.w["output.weight"] = self.w["token_embd.weight"]
        self.n_vocab = self.w["token_embd.weight"].shape[0]
        if attn_rot is None:
            attn_rot = (cache_type == "q8_0" and self.head_dim % 64 == 0
                        and not int(os.environ.get("LLAMA_ATTN_ROT_DISABLE", "0") or 0))
        self.attn_rot = attn_rot
        self._k_rot = self._v_rot = None
        if attn_rot:
            if self.head_dim % 64:
                raise ValueError("attention rotation needs a head size that is a multiple of 64")
            n_k = 64
            while self.head_dim % (2 * n_k) == 0:  # K: the largest power of two dividing d
                n_k *= 2
            self._k_rot, self._v_rot = hadamard(n_k), hadamard(64)  # V: always 64
        # RoPE NORM frequencies: θ_i = pos · base^(-2i/d), rotating (x[2i], x[2i+1]).
        self._inv_freq = self.rope_base ** (-np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim)

    # ---- sequences -------------------------------------------------------------------

    def new_sequence(self, kvsmooth: KVSmoothParams | Mapping[str, Any] | None = None) -> SequenceState:
        params = None
        if kvsmooth is not None:
            if isinstance(kvsmooth, Mapping):
                kvsmooth = KVSmoothParams(**kvsmooth)
            params = kvsmooth.validated(self.n_layer)
        empty = lambda: np.zeros((0, self.n_head_kv, self.head_dim), np.float32)  # noqa: E731
        return SequenceState(
            k=[empty() for _ in range(self.n_layer)],
            v=[empty() for _ in range(self.n_layer)],
            kvsmooth=params,
            queues=[[] for _ in range(self.n_layer)],
        )

    # ---- forward ---------------------------------------------------------------------

    def eval(self, state: SequenceState, tokens: Sequence[int], smooth_last: bool = True,
             smooth: Sequence[bool] | None = None) -> np.ndarray:
        """Append `tokens` as one ubatch; return float64 logits [n_tokens, n_vocab].

        With KVSmooth on, the final token of the call is smoothed (a generation step) when
        `smooth_last`; `smooth` instead marks the smoothed tokens explicitly.
        """
        toks = np.asarray(tokens, dtype=np.int64)
        if toks.ndim != 1 or len(toks) == 0 or toks.min() < 0 or toks.max() >= self.n_vocab:
            raise ValueError("tokens must be a non-empty list of valid ids")
        return self.eval_embd(state, self.w["token_embd.weight"][toks], smooth_last, smooth)

    def eval_embd(self, state: SequenceState, embd: np.ndarray, smooth_last: bool = False,
                  smooth: Sequence[bool] | None = None) -> np.ndarray:
        """Like `eval` for input embeddings [n_tokens, n_embd] (e.g. image embeddings)."""
        x = np.asarray(embd, dtype=np.float64)
        n = x.shape[0]
        if x.ndim != 2 or x.shape[1] != self.n_embd or n == 0:
            raise ValueError("embeddings must be [n_tokens, n_embd]")
        if smooth is None:
            smooth = [smooth_last and i == n - 1 for i in range(n)]
        elif len(smooth) != n:
            raise ValueError("smooth must have one flag per token")
        smoothed = [i for i in range(n) if smooth[i]] if state.kvsmooth is not None else []
        pos0 = state.n_past
        pos = np.arange(pos0, pos0 + n)
        for il in range(self.n_layer):
            x = x + self._attention(state, il, x, pos, smoothed)
            x = x + self._ffn(il, x)
        x = _rms_norm(x, self.w["output_norm.weight"], self.rms_eps)
        return x @ self.w["output.weight"].T

    def generate(self, state: SequenceState, prompt: Sequence[int], n_predict: int) -> list[int]:
        """Greedy decoding: every evaluated call smooths its final token (SPEC §2)."""
        out: list[int] = []
        logits = self.eval(state, prompt)
        for i in range(n_predict):
            out.append(int(np.argmax(logits[-1])))
            if i + 1 < n_predict:
                logits = self.eval(state, out[-1:])
        return out

    def _rope(self, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        ang = pos[:, None].astype(np.float64) * self._inv_freq[None, :]  # [n, d/2]
        c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = x0 * c - x1 * s
        out[..., 1::2] = x0 * s + x1 * c
        return out

    def _attention(self, state: SequenceState, il: int, x: np.ndarray, pos: np.ndarray,
                   smoothed: list[int]) -> np.ndarray:
        p = f"blk.{il}."
        n, hd, H, Hkv = x.shape[0], self.head_dim, self.n_head, self.n_head_kv
        h = _rms_norm(x, self.w[p + "attn_norm.weight"], self.rms_eps)
        q = self._rope((h @ self.w[p + "attn_q.weight"].T).reshape(n, H, hd), pos)
        k = self._rope((h @ self.w[p + "attn_k.weight"].T).reshape(n, Hkv, hd), pos)
        v = (h @ self.w[p + "attn_v.weight"].T).reshape(n, Hkv, hd)
        q, k, v = _rotate(q, self._k_rot), _rotate(k, self._k_rot), _rotate(v, self._v_rot)
        if self.round_q:
            q = round_to_cache(q, self.cache_type).astype(np.float64)

        # Step 1: raw K/V go into the cache; attention reads them back from it.
        state.k[il] = np.concatenate([state.k[il], round_to_cache(k, self.cache_type)])
        state.v[il] = np.concatenate([state.v[il], round_to_cache(v, self.cache_type)])
        kc = state.k[il].astype(np.float64)  # [n_kv, Hkv, hd]
        vc = state.v[il].astype(np.float64)
        n_kv = kc.shape[0]

        grp = H // Hkv
        kh = np.repeat(kc.transpose(1, 0, 2), grp, axis=0)  # [H, n_kv, hd]; head h -> kv h//grp
        vh = np.repeat(vc.transpose(1, 0, 2), grp, axis=0)
        scores = np.einsum("nhd,hcd->hnc", q, kh) / np.sqrt(hd)  # [H, n, n_kv]
        causal = np.arange(n_kv)[None, :] > pos[:, None]  # cell c is visible iff c <= pos
        scores = np.where(causal[None], -np.inf, scores)
        scores -= scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(axis=-1, keepdims=True)
        out = _rotate(np.einsum("hnc,hcd->nhd", probs, vh), self._v_rot).reshape(n, H * hd)
        out = out @ self.w[p + "attn_output.weight"].T

        prm = state.kvsmooth
        if prm is not None and prm.layer_end is not None and prm.layer_start <= il < prm.layer_end:
            for i in smoothed:  # in position order
                self._smooth(state, il, int(pos[i]), probs[:, i, :])
        return out

    def _smooth(self, state: SequenceState, il: int, pos: int, alpha: np.ndarray) -> None:
        prm = state.kvsmooth
        assert prm is not None
        # Step 2: mean row entropy over the query heads (α = 0 cells contribute 0).
        z = float(np.mean(-np.sum(alpha * np.log(alpha + prm.eps), axis=-1)))
        # Step 3: push z (the oldest value leaves a full FIFO first), then rank z among the
        # other values held: k in [0, M-1] as in the paper's eq. 13; λ̂ = k / M, clipped.
        fifo = state.queues[il]
        fifo.append(z)
        if len(fifo) > prm.queue:
            del fifo[0]
        k = sum(1 for s in fifo[:-1] if s < z)
        if prm.mode == "fixed":
            lam = prm.lambda_ref
        else:
            lam = min(max(k / prm.queue, prm.lambda_ref - prm.window), prm.lambda_ref + prm.window)
        # Step 4: blend with the previous position's cell, in f32, rounded once.
        blended = pos > 0
        if blended:
            l32 = np.float32(lam)
            one = np.float32(1) - l32
            kc, vc = state.k[il], state.v[il]
            kc[pos] = round_to_cache(one * kc[pos] + l32 * kc[pos - 1], self.cache_type)
            if prm.mode != "keys":
                vc[pos] = round_to_cache(one * vc[pos] + l32 * vc[pos - 1], self.cache_type)
        state.trace.append(TraceEntry(pos, il, z, float(lam), k, blended))

    def _ffn(self, il: int, x: np.ndarray) -> np.ndarray:
        p = f"blk.{il}."
        h = _rms_norm(x, self.w[p + "ffn_norm.weight"], self.rms_eps)
        g = h @ self.w[p + "ffn_gate.weight"].T
        u = h @ self.w[p + "ffn_up.weight"].T
        return (g / (1.0 + np.exp(-g)) * u) @ self.w[p + "ffn_down.weight"].T


def trace_by_layer(trace: Iterable[TraceEntry]) -> dict[int, list[TraceEntry]]:
    out: dict[int, list[TraceEntry]] = {}
    for e in trace:
        out.setdefault(e.layer, []).append(e)
    return out
