"""Independent NumPy references of hybrid GGUF models (attention layers mixed with recurrent
ones, llama.cpp's `llama_memory_hybrid`), with KVSmooth on the attention layers.

Weights come from `gguf.GGUFReader`; llama.cpp is never called. Both forwards follow
llama.cpp's graphs, layer by layer: token embedding; per layer an RMSNorm, then the layer's
sequence-mixing block (attention, or the recurrent block), a residual, an RMSNorm, a SwiGLU
FFN, a residual; the output RMSNorm and the tied output head (the token embedding).

- ReferenceLFM2 (arch "lfm2", src/models/lfm2.cpp): a layer with
  `lfm2.attention.head_count_kv[il] == 0` is a short-conv layer: B, C, x = in_proj(h);
  y = C ⊙ conv(B ⊙ x), a causal depthwise conv of kernel length L (`shortconv.l_cache`)
  whose state is the last L - 1 values of B ⊙ x; out_proj(y). Attention layers: per-head
  RMSNorm of Q and K after their projections, NEOX RoPE.
- ReferenceQwen35 (arch "qwen35", src/models/qwen35.cpp, delta-net-base.cpp): layer il is
  full attention when (il + 1) % full_attention_interval == 0, else a gated delta-net layer
  (causal conv + SiLU over the q/k/v projection, L2-normed q and k, per head the state
  S ← e^g S + β (v − e^g S k) kᵀ and o = S q / sqrt(d), gated RMSNorm, out projection).
  Attention layers: `attn_q` yields [q | gate] per head, QK norm, RoPE on the first n_rot dims
  (IMROPE, which for text positions is NEOX), attention output ⊙ sigmoid(gate). Text only.

Recurrent layers have no KV cell and are never smoothed (SPEC §4.1). The attention of an
attention layer — the cache rounded to the cache type, GQA, softmax, and KVSmooth (entropy,
FIFO, λ, blend with the previous cell, SPEC §1-2) — is ReferenceLlama._attention itself, not a
copy. It computes `h @ W.T` for Q and K and `out @ Wo.T` for the output; here those W are
small operator objects (`ProjectThenHeadNorm`, `GatedQuery`, `GatedOutput`) whose product is
the projection plus the family's extra step (QK norm, output gate), so each happens exactly
where llama.cpp applies it without a second attention implementation. `_rope` is overridden.

    ref = ReferenceLFM2("tiny-lfm2-text.gguf")        # or ReferenceQwen35(...)
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
    recurrent layers' entries stay empty) and each recurrent layer's state arrays."""

    recurrent: dict[int, list[np.ndarray]] = dataclasses.field(default_factory=dict)  # il -> f32 arrays
    pos_layer: int = 0  # an attention layer: its cache length is the sequence's length

    @property
    def n_past(self) -> int:
        return self.k[self.pos_layer].shape[0]

    def truncate(self, n_keep: int) -> None:
        """Only a full removal: a recurrent state cannot go back to an earlier position."""
        if n_keep != 0:
            raise ValueError("a hybrid sequence can only be removed whole (n_keep = 0)")
        super().truncate(0)
        for arrays in self.recurrent.values():
            for a in arrays:
                a[...] = 0


class _HybridReference(ReferenceLlama):
    """What the hybrid references share: the GGUF's weights, attention layers with a per-head
    QK norm and NEOX RoPE on the first n_rot dims of a head, ReferenceLlama's attention and
    KVSmooth for them, and a recurrent block (`_recurrent`) for every other layer."""

    arch = ""

    def _load(self, path: str | Path, cache_type: str, round_q: bool) -> GGUFReader:
        if cache_type not in HYBRID_CACHE_TYPES:
            raise ValueError(f"cache type must be one of {HYBRID_CACHE_TYPES}")
        self.cache_type = cache_type
        self.round_q = round_q
        r = GGUFReader(str(path))
        arch = _field(r, "general.architecture")
        if arch != self.arch:
            raise ValueError(f"expected a {self.arch} GGUF, got {arch!r}")
        a = self.arch
        self.n_embd = int(_field(r, f"{a}.embedding_length"))
        self.n_layer = int(_field(r, f"{a}.block_count"))
        self.n_head = int(_field(r, f"{a}.attention.head_count"))
        self.head_dim = int(_field(r, f"{a}.attention.key_length", self.n_embd // self.n_head))
        self.n_rot = int(_field(r, f"{a}.rope.dimension_count", self.head_dim))
        self.rope_base = float(_field(r, f"{a}.rope.freq_base", 10000.0))
        self.rms_eps = float(_field(r, f"{a}.attention.layer_norm_rms_epsilon"))
        self.tokens: list[str] = list(_field(r, "tokenizer.ggml.tokens"))
        self.w: dict[str, Any] = {}
        for t in r.tensors:
            if t.tensor_type not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
                raise ValueError(f"{t.name}: only f32/f16 weights are supported")
            shape = tuple(int(n) for n in reversed(t.shape.tolist()))
            self.w[t.name] = np.asarray(t.data, dtype=np.float64).reshape(shape)
        self.w.setdefault("output.weight", self.w["token_embd.weight"])  # tied head
        self.n_vocab = self.w["token_embd.weight"].shape[0]
        self.attn_rot = False
        self._k_rot = self._v_rot = None
        if self.n_rot % 2 or self.n_rot > self.head_dim:
            raise ValueError("n_rot must be even and at most the head size")
        self._inv_freq = self.rope_base ** (-np.arange(0, self.n_rot, 2, dtype=np.float64) / self.n_rot)
        return r

    def _set_layers(self, attn_layers: list[int]) -> None:
        self.attn_layers = attn_layers
        self.recurrent_layers = [il for il in range(self.n_layer) if il not in attn_layers]
        if not attn_layers:
            raise ValueError("the model has no attention layer")

    def _recurrent_state(self, il: int) -> list[np.ndarray]:
        raise NotImplementedError

    def _recurrent(self, state: HybridState, il: int, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def new_sequence(self, kvsmooth: KVSmoothParams | Mapping[str, Any] | None = None) -> HybridState:
        base = super().new_sequence(kvsmooth)
        return HybridState(k=base.k, v=base.v, kvsmooth=base.kvsmooth, queues=base.queues,
                           recurrent={il: self._recurrent_state(il) for il in self.recurrent_layers},
                           pos_layer=self.attn_layers[0])

    def smoothed_layers(self, params: KVSmoothParams) -> list[int]:
        """The layers KVSmooth acts on: the attention layers in [layer_start, layer_end)."""
        p = params.validated(self.n_layer)
        assert p.layer_end is not None
        return [il for il in self.attn_layers if p.layer_start <= il < p.layer_end]

    def _attention(self, state: SequenceState, il: int, x: np.ndarray, pos: np.ndarray,
                   smoothed: list[int]) -> np.ndarray:
        """The sequence-mixing block of layer il: recurrent, or (smoothed) attention."""
        if il in self.recurrent_layers:
            assert isinstance(state, HybridState)
            return self._recurrent(state, il, x)
        return super()._attention(state, il, x, pos, smoothed)

    def _rope(self, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """RoPE of type NEOX on the first n_rot dims of each head: pairs (x[i], x[i + n_rot/2]),
        θ_i = pos · base^(-2i/n_rot); the other dims pass through."""
        ang = pos[:, None].astype(np.float64) * self._inv_freq[None, :]
        c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        half = self.n_rot // 2
        x0, x1 = x[..., :half], x[..., half:self.n_rot]
        return np.concatenate([x0 * c - x1 * s, x0 * s + x1 * c, x[..., self.n_rot:]], axis=-1)


def _causal_conv(state: np.ndarray, u: np.ndarray, kernel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Depthwise causal conv of u [n, C] with kernel [C, L] after the state [L - 1, C] (ggml_ssm_conv
    over the concatenation); returns the output [n, C] and the new state (the last L - 1 rows), f32."""
    seq = np.concatenate([state.astype(np.float64), u])
    L = kernel.shape[1]
    out = np.stack([np.sum(seq[t:t + L] * kernel.T, axis=0) for t in range(u.shape[0])])
    return out, seq[-(L - 1):].astype(np.float32)


class ReferenceLFM2(_HybridReference):
    arch = "lfm2"

    def __init__(self, path: str | Path, cache_type: str = "f32", round_q: bool = False) -> None:
        r = self._load(path, cache_type, round_q)
        kv = _field(r, "lfm2.attention.head_count_kv")
        kv = [int(n) for n in kv] if isinstance(kv, list) else [int(kv)] * self.n_layer
        if len(kv) != self.n_layer:
            raise ValueError("head_count_kv must have one entry per layer")
        self._set_layers([il for il in range(self.n_layer) if kv[il] > 0])  # 0: a short-conv layer
        if len({kv[il] for il in self.attn_layers}) != 1:
            raise ValueError("expected one KV head count for all attention layers")
        self.n_head_kv = kv[self.attn_layers[0]]
        self.conv_layers = self.recurrent_layers
        self.l_cache = int(_field(r, "lfm2.shortconv.l_cache"))
        self.w["output_norm.weight"] = self.w["token_embd_norm.weight"]  # LLM_TENSOR_OUTPUT_NORM_LFM2
        for il in self.attn_layers:
            p = f"blk.{il}."
            for proj in ("q", "k"):
                self.w[p + f"attn_{proj}.weight"] = ProjectThenHeadNorm(
                    self.w[p + f"attn_{proj}.weight"], self.w[p + f"attn_{proj}_norm.weight"],
                    self.head_dim, self.rms_eps)

    def _recurrent_state(self, il: int) -> list[np.ndarray]:
        return [np.zeros((self.l_cache - 1, self.n_embd), np.float32)]

    def _recurrent(self, state: HybridState, il: int, x: np.ndarray) -> np.ndarray:
        """The short-conv block: B, C, x = in_proj(h); C ⊙ conv(B ⊙ x); out_proj."""
        p = f"blk.{il}."
        E = self.n_embd
        h = _rms_norm(x, self.w[p + "attn_norm.weight"], self.rms_eps)
        bcx = h @ self.w[p + "shortconv.in_proj.weight"].T          # [n, 3E]
        b, c, xx = bcx[:, :E], bcx[:, E:2 * E], bcx[:, 2 * E:]
        conv, state.recurrent[il][0] = _causal_conv(state.recurrent[il][0], b * xx, self.w[p + "shortconv.conv.weight"])
        return (c * conv) @ self.w[p + "shortconv.out_proj.weight"].T


class _OutputGate:
    """Qwen3.5's attention output gate: `attn_q` yields per head [q | gate]; the attention output
    is multiplied by sigmoid(gate) before `attn_output`. The query projection keeps the gate of
    the call here for the output projection of the same call (ReferenceLlama._attention computes
    Q first and the output last, within one call)."""

    gate: np.ndarray | None = None


class GatedQuery(ProjectThenHeadNorm):
    """`h @ P.T`: the per-head normed query of `attn_q` ([n_head · 2d] rows, [q | gate] per
    head); the gate half goes to `sink`."""

    def __init__(self, w: np.ndarray, norm_w: np.ndarray, head_dim: int, eps: float, sink: _OutputGate) -> None:
        super().__init__(w, norm_w, head_dim, eps)
        self.sink = sink

    def __rmatmul__(self, h: np.ndarray) -> np.ndarray:
        y = (h @ self.w.T).reshape(h.shape[0], -1, 2 * self.head_dim)
        self.sink.gate = y[..., self.head_dim:].reshape(h.shape[0], -1)
        return _rms_norm(y[..., :self.head_dim], self.norm_w, self.eps).reshape(h.shape[0], -1)


class GatedOutput:
    """`a @ P.T` = (a ⊙ sigmoid(gate)) @ Wo.T, with the gate that GatedQuery left in `source`."""

    __array_ufunc__ = None

    def __init__(self, w: np.ndarray, source: _OutputGate) -> None:
        self.w, self.source = w, source

    @property
    def T(self) -> "GatedOutput":
        return self

    def __rmatmul__(self, a: np.ndarray) -> np.ndarray:
        gate = self.source.gate
        if gate is None or gate.shape != a.shape:
            raise RuntimeError("the output gate of this call is missing")
        self.source.gate = None
        return (a / (1.0 + np.exp(-gate))) @ self.w.T


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


class ReferenceQwen35(_HybridReference):
    """Qwen3.5 (arch "qwen35"), text tokens only: RoPE is llama.cpp's IMROPE, which for a text
    token (the same position in every section) is NEOX RoPE on the first n_rot dims; image
    positions (M-RoPE's 2-D grid) are not modelled."""

    arch = "qwen35"

    def __init__(self, path: str | Path, cache_type: str = "f32", round_q: bool = False) -> None:
        r = self._load(path, cache_type, round_q)
        self.n_head_kv = int(_field(r, "qwen35.attention.head_count_kv"))
        interval = int(_field(r, "qwen35.full_attention_interval", 4))
        self._set_layers([il for il in range(self.n_layer) if (il + 1) % interval == 0])
        self.d_conv = int(_field(r, "qwen35.ssm.conv_kernel"))
        self.d_state = int(_field(r, "qwen35.ssm.state_size"))
        self.n_k_heads = int(_field(r, "qwen35.ssm.group_count"))
        self.n_v_heads = int(_field(r, "qwen35.ssm.time_step_rank"))
        if int(_field(r, "qwen35.ssm.inner_size")) != self.d_state * self.n_v_heads:
            raise ValueError("ssm.inner_size must be state_size · time_step_rank")
        if self.n_k_heads != self.n_v_heads:
            raise ValueError("delta-net q/k head repetition (group_count < time_step_rank) is not modelled")
        for il in range(self.n_layer):
            p = f"blk.{il}."
            self.w[p + "ffn_norm.weight"] = self.w[p + "post_attention_norm.weight"]
        for il in self.attn_layers:
            p = f"blk.{il}."
            gate = _OutputGate()
            self.w[p + "attn_q.weight"] = GatedQuery(self.w[p + "attn_q.weight"], self.w[p + "attn_q_norm.weight"],
                                                     self.head_dim, self.rms_eps, gate)
            self.w[p + "attn_k.weight"] = ProjectThenHeadNorm(self.w[p + "attn_k.weight"],
                                                              self.w[p + "attn_k_norm.weight"],
                                                              self.head_dim, self.rms_eps)
            self.w[p + "attn_output.weight"] = GatedOutput(self.w[p + "attn_output.weight"], gate)

    def _recurrent_state(self, il: int) -> list[np.ndarray]:
        conv_dim = (2 * self.n_k_heads + self.n_v_heads) * self.d_state
        d = self.d_state
        return [np.zeros((self.d_conv - 1, conv_dim), np.float32), np.zeros((self.n_v_heads, d, d), np.float32)]

    def _recurrent(self, state: HybridState, il: int, x: np.ndarray) -> np.ndarray:
        """The gated delta-net block (src/models/qwen35.cpp build_layer_attn_linear and
        delta-net-base.cpp's autoregressive form, one token at a time)."""
        p = f"blk.{il}."
        n, d, Hk, Hv = x.shape[0], self.d_state, self.n_k_heads, self.n_v_heads
        h = _rms_norm(x, self.w[p + "attn_norm.weight"], self.rms_eps)
        qkv = h @ self.w[p + "attn_qkv.weight"].T
        z = (h @ self.w[p + "attn_gate.weight"].T).reshape(n, Hv, d)
        beta = 1.0 / (1.0 + np.exp(-(h @ self.w[p + "ssm_beta.weight"].T)))          # [n, Hv]
        alpha = h @ self.w[p + "ssm_alpha.weight"].T + self.w[p + "ssm_dt.bias"]
        g = np.logaddexp(0.0, alpha) * self.w[p + "ssm_a"]                            # softplus · (-exp(A_log))
        conv_state, s = state.recurrent[il]
        conv, state.recurrent[il][0] = _causal_conv(conv_state, qkv, self.w[p + "ssm_conv1d.weight"])
        conv = _silu(conv)
        q = conv[:, :Hk * d].reshape(n, Hk, d)
        k = conv[:, Hk * d:2 * Hk * d].reshape(n, Hk, d)
        v = conv[:, 2 * Hk * d:].reshape(n, Hv, d)
        # L2 norm as build_gdn_l2_norm: x / sqrt(Σx² + eps)
        q = q / np.sqrt(np.sum(q * q, axis=-1, keepdims=True) + self.rms_eps)
        k = k / np.sqrt(np.sum(k * k, axis=-1, keepdims=True) + self.rms_eps)
        q = q / np.sqrt(d)
        S = s.astype(np.float64)                                                      # [Hv, d_v, d_k]
        o = np.empty((n, Hv, d))
        for t in range(n):
            S = S * np.exp(g[t])[:, None, None]
            err = v[t] - np.einsum("hij,hj->hi", S, k[t])
            S = S + beta[t][:, None, None] * err[:, :, None] * k[t][:, None, :]
            o[t] = np.einsum("hij,hj->hi", S, q[t])
        state.recurrent[il][1] = S.astype(np.float32)
        y = _rms_norm(o, self.w[p + "ssm_norm.weight"], self.rms_eps) * _silu(z)
        return y.reshape(n, Hv * d) @ self.w[p + "ssm_out.weight"].T
