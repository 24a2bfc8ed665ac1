"""Independent NumPy reference of an LFM2 (hybrid short-conv + attention) GGUF model, with KVSmooth.

Reads the weights with `gguf.GGUFReader` and never calls llama.cpp. The forward follows
llama.cpp's LLM_ARCH_LFM2 graph (src/models/lfm2.cpp): token embedding; per layer an RMSNorm
("operator norm") then either a short-conv block or an attention block, a residual, a SwiGLU
FFN with its RMSNorm, a residual; the output RMSNorm (`token_embd_norm`) and the tied output
head (the token embedding).

- short-conv layer (`lfm2.attention.head_count_kv[il] == 0`): B, C, x = in_proj(h) (n_embd
  each); y = C ⊙ conv(B ⊙ x), a causal depthwise conv of kernel length L
  (`lfm2.shortconv.l_cache`) over the sequence, whose state is the last L - 1 values of B ⊙ x
  (zeros for a new sequence); out_proj(y). No KV cell, never smoothed (SPEC §4.1).
- attention layer: ReferenceLlama's attention, unchanged — the KV cache rounded to the cache
  type, grouped-query attention, and KVSmooth (entropy, FIFO, λ, blend with the previous
  cell, SPEC §1-2) for the layers in range — with LFM2's two differences: a per-head RMSNorm
  of Q and K after their projections (`attn_q_norm`, `attn_k_norm`) and RoPE of type NEOX
  (x[i] rotates with x[i + d/2]).

The attention is ReferenceLlama._attention itself, not a copy. It computes `h @ W.T` for Q
and K; here W is a `ProjectThenHeadNorm`, whose product with h is the projection followed by
the per-head RMSNorm, so the QK norm happens exactly where llama.cpp applies it (before RoPE)
without a second attention implementation. `_rope` is overridden for NEOX.

    ref = ReferenceLFM2("tiny-lfm2-text.gguf")
    state = ref.new_sequence(kvsmooth=dict(lambda_ref=0.9, layer_start=0, layer_end=6))
    logits = ref.eval(state, prompt_tokens)   # smooths the final token of the call
    state.trace                               # only attention layers appear
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader

from reference_llama import KVSmoothParams, ReferenceLlama, SequenceState, _field, _rms_norm

# The hybrid references model exactly rounded caches; q8_0's Hadamard rotation is not modelled.
HYBRID_CACHE_TYPES = ("f32", "f16", "bf16")


class ProjectThenHeadNorm:
    """A projection matrix W [n_heads·d, n_embd] followed by a per-head RMSNorm with weight
    `norm_w` [d]: `h @ P.T` is rms_norm(h @ W.T, per head of d values) · norm_w.

    ReferenceLlama._attention multiplies `h @ self.w[name].T`; NumPy hands the product to
    `__rmatmul__` because `__array_ufunc__` is None."""

    __array_ufunc__ = None

    def __init__(self, w: np.ndarray, norm_w: np.ndarray, head_dim: int, eps: float) -> None:
        if w.shape[0] % head_dim or norm_w.shape != (head_dim,):
            raise ValueError("projection rows must be whole heads and the norm one head wide")
        self.w, self.norm_w, self.head_dim, self.eps = w, norm_w, head_dim, eps

    @property
    def T(self) -> "ProjectThenHeadNorm":
        return self

    def __rmatmul__(self, h: np.ndarray) -> np.ndarray:
        y = h @ self.w.T
        heads = y.reshape(*y.shape[:-1], -1, self.head_dim)
        return _rms_norm(heads, self.norm_w, self.eps).reshape(y.shape)


@dataclasses.dataclass
class HybridState(SequenceState):
    """A sequence of a hybrid model: the attention layers' KV cells (SequenceState's k/v; the
    conv layers' entries stay empty) and each conv layer's rolling state."""

    conv: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)  # il -> [L - 1, n_embd] f32
    pos_layer: int = 0  # an attention layer: its cache length is the sequence's length

    @property
    def n_past(self) -> int:
        return self.k[self.pos_layer].shape[0]

    def truncate(self, n_keep: int) -> None:
        """Only a full removal: a recurrent state cannot go back to an earlier position."""
        if n_keep != 0:
            raise ValueError("a hybrid sequence can only be removed whole (n_keep = 0)")
        super().truncate(0)
        for il in self.conv:
            self.conv[il] = np.zeros_like(self.conv[il])


class ReferenceLFM2(ReferenceLlama):
    def __init__(self, path: str | Path, cache_type: str = "f32", round_q: bool = False) -> None:
        if cache_type not in HYBRID_CACHE_TYPES:
            raise ValueError(f"cache type must be one of {HYBRID_CACHE_TYPES}")
        self.cache_type = cache_type
        self.round_q = round_q
        r = GGUFReader(str(path))
        arch = _field(r, "general.architecture")
        if arch != "lfm2":
            raise ValueError(f"expected an lfm2 GGUF, got {arch!r}")
        self.n_embd = int(_field(r, "lfm2.embedding_length"))
        self.n_layer = int(_field(r, "lfm2.block_count"))
        self.n_head = int(_field(r, "lfm2.attention.head_count"))
        kv = _field(r, "lfm2.attention.head_count_kv")
        kv = [int(n) for n in kv] if isinstance(kv, list) else [int(kv)] * self.n_layer
        if len(kv) != self.n_layer:
            raise ValueError("head_count_kv must have one entry per layer")
        self.attn_layers = [il for il in range(self.n_layer) if kv[il] > 0]
        self.conv_layers = [il for il in range(self.n_layer) if kv[il] == 0]
        if not self.attn_layers or len({kv[il] for il in self.attn_layers}) != 1:
            raise ValueError("expected attention layers with one common KV head count")
        self.n_head_kv = kv[self.attn_layers[0]]
        self.head_dim = self.n_embd // self.n_head
        self.n_rot = self.head_dim
        self.rope_base = float(_field(r, "lfm2.rope.freq_base", 10000.0))
        self.rms_eps = float(_field(r, "lfm2.attention.layer_norm_rms_epsilon"))
        self.l_cache = int(_field(r, "lfm2.shortconv.l_cache"))
        self.tokens: list[str] = list(_field(r, "tokenizer.ggml.tokens"))
        self.w: dict[str, Any] = {}
        for t in r.tensors:
            if t.tensor_type not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
                raise ValueError(f"{t.name}: only f32/f16 weights are supported")
            shape = tuple(int(n) for n in reversed(t.shape.tolist()))
            self.w[t.name] = np.asarray(t.data, dtype=np.float64).reshape(shape)
        self.w.setdefault("output.weight", self.w["token_embd.weight"])  # tied head
        self.w["output_norm.weight"] = self.w["token_embd_norm.weight"]   # LLM_TENSOR_OUTPUT_NORM_LFM2
        for il in self.attn_layers:
            p = f"blk.{il}."
            for proj in ("q", "k"):
                self.w[p + f"attn_{proj}.weight"] = ProjectThenHeadNorm(
                    self.w[p + f"attn_{proj}.weight"], self.w[p + f"attn_{proj}_norm.weight"],
                    self.head_dim, self.rms_eps)
        self.n_vocab = self.w["token_embd.weight"].shape[0]
        self.attn_rot = False
        self._k_rot = self._v_rot = None
        self._inv_freq = self.rope_base ** (-np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim)

    def new_sequence(self, kvsmooth: KVSmoothParams | Mapping[str, Any] | None = None) -> HybridState:
        base = super().new_sequence(kvsmooth)
        return HybridState(k=base.k, v=base.v, kvsmooth=base.kvsmooth, queues=base.queues,
                           conv={il: np.zeros((self.l_cache - 1, self.n_embd), np.float32) for il in self.conv_layers},
                           pos_layer=self.attn_layers[0])

    def smoothed_layers(self, params: KVSmoothParams) -> list[int]:
        """The layers KVSmooth acts on: the attention layers in [layer_start, layer_end)."""
        p = params.validated(self.n_layer)
        assert p.layer_end is not None
        return [il for il in self.attn_layers if p.layer_start <= il < p.layer_end]

    # ---- the layer stack -------------------------------------------------------------

    def _attention(self, state: SequenceState, il: int, x: np.ndarray, pos: np.ndarray,
                   smoothed: list[int]) -> np.ndarray:
        """The sequence-mixing block of layer il: short conv or (smoothed) attention."""
        if il in self.conv_layers:
            assert isinstance(state, HybridState)
            return self._shortconv(state, il, x)
        return super()._attention(state, il, x, pos, smoothed)

    def _rope(self, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """RoPE of type NEOX: pairs (x[i], x[i + d/2]), θ_i = pos · base^(-2i/d)."""
        ang = pos[:, None].astype(np.float64) * self._inv_freq[None, :]
        c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        half = self.head_dim // 2
        x0, x1 = x[..., :half], x[..., half:]
        return np.concatenate([x0 * c - x1 * s, x0 * s + x1 * c], axis=-1)

    def _shortconv(self, state: HybridState, il: int, x: np.ndarray) -> np.ndarray:
        p = f"blk.{il}."
        E = self.n_embd
        h = _rms_norm(x, self.w[p + "attn_norm.weight"], self.rms_eps)
        bcx = h @ self.w[p + "shortconv.in_proj.weight"].T          # [n, 3E]
        b, c, xx = bcx[:, :E], bcx[:, E:2 * E], bcx[:, 2 * E:]
        seq = np.concatenate([state.conv[il].astype(np.float64), b * xx])  # [L - 1 + n, E]
        kernel = self.w[p + "shortconv.conv.weight"]                # [E, L]
        n, L = x.shape[0], self.l_cache
        conv = np.stack([np.sum(seq[t:t + L] * kernel.T, axis=0) for t in range(n)])
        state.conv[il] = seq[-(L - 1):].astype(np.float32)           # the state is stored in f32
        return (c * conv) @ self.w[p + "shortconv.out_proj.weight"].T
