"""Independent NumPy references of the Qwen2-VL / Qwen3-VL (M-RoPE) and Gemma 3 (iSWA) text models, with KVSmooth.

Like tests/reference_llama.py (whose KVSmooth parameters, trace records and cache rounding it
reuses), this reads the weights back with `gguf.GGUFReader` and never calls llama.cpp. What it
adds to the LLaMA reference is the per-cell bookkeeping the two families need: every cell has
a sequential position (M-RoPE section 0) and, for M-RoPE, the 2-D position (row, column) that
llama.cpp keeps beside it; positions may jump (an image takes max(rows, columns) sequential
positions and all its cells share the first), so "the previous cell" is not "position - 1".

Qwen2-VL ("qwen2vl", src/models/qwen2vl.cpp): RMSNorm, Q/K/V with biases, M-RoPE
(ggml_rope_multi, GGML_ROPE_TYPE_MROPE: NEOX pairs (x[i], x[i + d/2]); pair i rotates by the
position of section s(i % Σsections) with frequency base^(-2i/d)), attention scaled by
1/sqrt(d), SwiGLU. Text tokens have positions (p, p, p, 0) (llm_graph_input_pos::set_input: the
4th section is 0, not p; Qwen2-VL's sections [.., .., .., 0] never read it); an image of nx ×
ny embeddings placed at p0 has, as mtmd-helper's set_position_mrope_2d writes them, (p0, p0 +
row, p0 + col, 0) for embedding i = row · nx + col, and the next token is at p0 + max(nx, ny).
Causal mask (llama_kv_cache::set_input_kq_mask with a 2-D ubatch): a cell at sequential
position p is visible to a token at p1 if p < p1, or if p == p1 and the cell's (row, col) is
not after the token's in raster order.

Qwen3-VL ("qwen3vl", src/models/qwen3vl.cpp): as Qwen2-VL but Q and K RMS-normed per head
instead of biases, the sections interleaved (GGML_ROPE_TYPE_IMROPE: pair i takes section
i % 3 while i < 3 · that section's size), and DeepStack: input embeddings of n_embd ·
(1 + n_deepstack), slice j + 1 added to the output of layer j (token inputs: zeros).

Gemma 3 ("gemma3", src/models/gemma3.cpp): token embeddings scaled by sqrt(n_embd) (input
embeddings are not), RMSNorm with the stored weight (the GGUF holds 1 + w), Q and K RMS-normed
per head, RoPE NEOX with a base per layer kind, Q scaled by 1/sqrt(head_dim) before Q·K, post-
attention and post-FFN norms, GELU FFN (tanh form; by default through the CPU backend's f16
table, see gelu_fp16_table), tied output head, optional final logit soft-capping. An image
chunk may be decoded non-causally (eval_embd(causal=False)), as mtmd does for Gemma 3. Sliding
layers (llama_hparams::set_swa_pattern) mask the cells with p1 - p >= n_swa
(LLAMA_SWA_TYPE_STANDARD): the window holds the token and its n_swa - 1 predecessors. How large
llama.cpp's SWA cache is (swa_full) changes which cells hold the window, not what the window
holds: the reference keeps every cell.

KVSmooth (SPEC §1, §4.1) as in reference_llama: for each smoothed token, in each smoothed layer
(sliding or global alike), z over the probabilities that layer's mask admits, FIFO, rank, λ, and
the blend with the previous cell: the cell of the sequence's greatest sequential position
below the token's; where several cells share that position (an image's), the one decoded last.

    ref = ReferenceFamily("tiny-qwen2vl-text.gguf")
    st = ref.new_sequence(kvsmooth=dict(lambda_ref=0.9))
    ref.eval(st, text_tokens, smooth_last=False)               # positions 0..n-1
    ref.eval_embd(st, image_embd, pos=ref.image_positions(st.next_pos, nx, ny))
    logits = ref.eval(st, more_tokens)                         # from st.next_pos on
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader

from reference_llama import CACHE_TYPES, KVSmoothParams, TraceEntry, _field, _rms_norm, round_to_cache

ARCHS = ("qwen2vl", "qwen3vl", "gemma3")


@dataclasses.dataclass
class FamilyState:
    """One sequence: its cells in decode order (positions and K/V per layer), FIFOs and trace."""

    pos: np.ndarray      # int64 [n_cells]: sequential position (M-RoPE section 0)
    row: np.ndarray      # int64 [n_cells]: M-RoPE section 1 (llama_kv_cell_ext::y)
    col: np.ndarray      # int64 [n_cells]: M-RoPE section 2 (llama_kv_cell_ext::x)
    k: list[np.ndarray]  # per layer, float32 [n_cells, n_head_kv, head_dim], post-RoPE
    v: list[np.ndarray]
    kvsmooth: KVSmoothParams | None
    queues: list[list[float]]
    trace: list[TraceEntry] = dataclasses.field(default_factory=list)

    @property
    def n_cells(self) -> int:
        return int(self.pos.shape[0])

    @property
    def next_pos(self) -> int:
        """The position after the greatest one held (0 for an empty sequence)."""
        return int(self.pos.max()) + 1 if self.n_cells else 0

    def reset_queues(self) -> None:
        for q in self.queues:
            q.clear()


def _load_weights(r: GGUFReader) -> dict[str, np.ndarray]:
    w: dict[str, np.ndarray] = {}
    for t in r.tensors:
        if t.tensor_type not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            raise ValueError(f"{t.name}: only f32/f16 weights are supported")
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # NumPy order
        w[t.name] = np.asarray(t.data, dtype=np.float64).reshape(shape)
    return w


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """ggml_gelu_f32: 0.5 x (1 + tanh(sqrt(2/π) x (1 + 0.044715 x²)))."""
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * x * (1.0 + 0.044715 * x * x)))


def gelu_fp16_table(x: np.ndarray) -> np.ndarray:
    """The CPU backend's GELU (ggml-cpu/vec.h with GGML_GELU_FP16, also in ggml_vec_geglu_f32):
    x rounded to f16, looked up in a table of f16-rounded GELU values; 0 below -10, x above 10."""
    x16 = x.astype(np.float16).astype(np.float64)
    y = gelu_tanh(x16).astype(np.float32).astype(np.float16).astype(np.float64)
    return np.where(x <= -10.0, 0.0, np.where(x >= 10.0, x, y))


class ReferenceFamily:
    def __init__(self, path: str | Path, cache_type: str = "f32", gelu: str = "fp16-table") -> None:
        """`gelu` (Gemma 3): "exact" (tanh form in float64) or "fp16-table", the CPU backend's
        f16 lookup table (what the logits are compared with; exact GELU would differ from it
        by up to ~5e-4 per activation)."""
        if cache_type not in CACHE_TYPES:
            raise ValueError(f"cache type must be one of {CACHE_TYPES}")
        if gelu not in ("exact", "fp16-table"):
            raise ValueError("gelu must be 'exact' or 'fp16-table'")
        self.cache_type = cache_type
        self._gelu = gelu_tanh if gelu == "exact" else gelu_fp16_table
        r = GGUFReader(str(path))
        arch = _field(r, "general.architecture")
        if arch not in ARCHS:
            raise ValueError(f"expected one of {ARCHS}, got {arch!r}")
        self.arch = arch
        a = arch
        self.n_embd = int(_field(r, f"{a}.embedding_length"))
        self.n_layer = int(_field(r, f"{a}.block_count"))
        self.n_head = int(_field(r, f"{a}.attention.head_count"))
        self.n_head_kv = int(_field(r, f"{a}.attention.head_count_kv", self.n_head))
        self.head_dim = int(_field(r, f"{a}.attention.key_length", self.n_embd // self.n_head))
        if int(_field(r, f"{a}.attention.value_length", self.head_dim)) != self.head_dim:
            raise ValueError("K and V head sizes must be equal")
        self.n_rot = int(_field(r, f"{a}.rope.dimension_count", self.head_dim))
        if self.n_rot != self.head_dim:
            raise ValueError("partial RoPE is not modelled")
        self.rope_base = float(_field(r, f"{a}.rope.freq_base", 10000.0))
        self.rms_eps = float(_field(r, f"{a}.attention.layer_norm_rms_epsilon"))
        self.tokens: list[str] = list(_field(r, "tokenizer.ggml.tokens"))
        self.w = _load_weights(r)
        self.n_vocab = self.w["token_embd.weight"].shape[0]
        self.mrope = arch in ("qwen2vl", "qwen3vl")
        self.n_deepstack = int(_field(r, f"{a}.n_deepstack_layers", 0)) if arch == "qwen3vl" else 0
        self.n_embd_inp = self.n_embd * (1 + self.n_deepstack)
        if self.mrope:
            self.sections = [int(s) for s in _field(r, f"{a}.rope.dimension_sections")][:4]
            if sum(self.sections) != self.head_dim // 2:
                raise ValueError(f"rope sections {self.sections} do not cover head_dim / 2 pairs")
            self.n_swa = 0
            self.is_swa = [False] * self.n_layer
            self.rope_base_layer = [self.rope_base] * self.n_layer
            self.f_attention_scale = 1.0
            self.kq_scale = 1.0 / np.sqrt(self.head_dim)
            self.softcap = 0.0
        else:
            self.sections = []
            self.n_swa = int(_field(r, f"{a}.attention.sliding_window", 0))
            pattern = int(_field(r, f"{a}.attention.sliding_window_pattern", 6))  # gemma3.cpp: 6
            # llama_hparams::set_swa_pattern(n, dense_first=false); no window: no sliding layer
            self.is_swa = [self.n_swa > 0 and (pattern == 0 or il % pattern < pattern - 1)
                           for il in range(self.n_layer)]
            base_swa = float(_field(r, f"{a}.rope.freq_base_swa", 10000.0))
            self.rope_base_layer = [base_swa if s else self.rope_base for s in self.is_swa]
            # gemma3.cpp: 1/sqrt(head_dim) on Q (the 27B's 1/sqrt(n_embd/n_head) is not modelled)
            if self.n_layer == 62:
                raise ValueError("the 27B's query scaling is not modelled")
            self.f_attention_scale = 1.0 / np.sqrt(self.head_dim)
            self.kq_scale = 1.0
            self.softcap = float(_field(r, f"{a}.final_logit_softcapping", 0.0) or 0.0)
        self.output = self.w.get("output.weight", self.w["token_embd.weight"])
        # NEOX frequencies per layer: θ_i = base^(-2i/d), i < d/2
        d = self.head_dim
        self._inv_freq = [b ** (-np.arange(0, d, 2, dtype=np.float64) / d) for b in self.rope_base_layer]
        if self.mrope:
            # which M-RoPE section (0..3) rotates pair i (ggml_mrope_cache_init): in blocks
            # (MROPE, qwen2vl) or interleaved t, h, w, t, h, w, ... (IMROPE, qwen3vl)
            s0, s1, s2, _ = self.sections
            sect = np.arange(d // 2) % sum(self.sections)
            if arch == "qwen3vl":
                self._section = np.where((sect % 3 == 1) & (sect < 3 * s1), 1,
                                np.where((sect % 3 == 2) & (sect < 3 * s2), 2,
                                np.where((sect % 3 == 0) & (sect < 3 * s0), 0, 3)))
            else:
                self._section = np.where(sect < s0, 0, np.where(sect < s0 + s1, 1, np.where(sect < s0 + s1 + s2, 2, 3)))

    # ---- sequences and positions -----------------------------------------------------

    def new_sequence(self, kvsmooth: KVSmoothParams | Mapping[str, Any] | None = None) -> FamilyState:
        params = None
        if kvsmooth is not None:
            if isinstance(kvsmooth, Mapping):
                kvsmooth = KVSmoothParams(**kvsmooth)
            params = kvsmooth.validated(self.n_layer)
        empty = lambda: np.zeros((0, self.n_head_kv, self.head_dim), np.float32)  # noqa: E731
        z = np.zeros(0, np.int64)
        return FamilyState(pos=z, row=z.copy(), col=z.copy(), k=[empty() for _ in range(self.n_layer)],
                           v=[empty() for _ in range(self.n_layer)], kvsmooth=params,
                           queues=[[] for _ in range(self.n_layer)])

    @staticmethod
    def image_positions(pos0: int, nx: int, ny: int) -> np.ndarray:
        """int64 [4, nx·ny]: the M-RoPE positions mtmd gives an image of nx × ny embeddings at
        pos0 (mtmd_image_tokens_get_decoder_pos + set_position_mrope_2d): (pos0, pos0 + row,
        pos0 + col, 0). The image takes max(nx, ny) sequential positions."""
        if nx < 1 or ny < 1:
            raise ValueError("an image has at least one row and one column")
        i = np.arange(nx * ny)
        return np.stack([np.full_like(i, pos0), pos0 + i // nx, pos0 + i % nx, np.zeros_like(i)]).astype(np.int64)

    def _positions(self, state: FamilyState, n: int, pos: np.ndarray | Sequence[int] | None,
                   tokens: bool) -> np.ndarray:
        if pos is None:
            pos = np.arange(state.next_pos, state.next_pos + n)
        p = np.asarray(pos, dtype=np.int64)
        if p.ndim == 1:
            if self.mrope and not tokens:
                raise ValueError("M-RoPE input embeddings need [4, n] positions")
            # a token batch has one position per token: llm_graph_input_pos::set_input makes it
            # (p, p, p, 0) for M-RoPE (the 4th section is 0, not p)
            p = np.stack([p, p, p, np.zeros_like(p) if self.mrope else p])
        if p.shape != (4, n):
            raise ValueError(f"positions must be [n] or [4, n] for {n} tokens, got {p.shape}")
        if not self.mrope and not np.all(p == p[0]):
            raise ValueError(f"{self.arch} has one position per token")
        if state.n_cells and p[0].min() <= state.pos.max() and not (self.mrope and p[0].min() == state.pos.max()):
            raise ValueError("positions must go forward")
        return p

    # ---- forward ---------------------------------------------------------------------

    def eval(self, state: FamilyState, tokens: Sequence[int], pos: Sequence[int] | None = None,
             smooth_last: bool = True, smooth: Sequence[bool] | None = None) -> np.ndarray:
        """Append `tokens` as one ubatch (at `pos`, default: from state.next_pos on); return
        float64 logits [n_tokens, n_vocab]. With KVSmooth on, the final token is smoothed when
        `smooth_last`; `smooth` marks the smoothed tokens explicitly instead."""
        toks = np.asarray(tokens, dtype=np.int64)
        if toks.ndim != 1 or len(toks) == 0 or toks.min() < 0 or toks.max() >= self.n_vocab:
            raise ValueError("tokens must be a non-empty list of valid ids")
        x = self.w["token_embd.weight"][toks]
        if self.n_deepstack:
            x = np.concatenate([x, np.zeros((len(toks), self.n_embd * self.n_deepstack))], axis=1)
        if self.arch == "gemma3":
            # ggml_scale by sqrtf(n_embd), in f32, of token inputs only
            x = x * float(np.float32(np.sqrt(np.float32(self.n_embd))))
        return self._forward(state, x, self._positions(state, len(toks), pos, True), smooth_last, smooth)

    def eval_embd(self, state: FamilyState, embd: np.ndarray, pos: np.ndarray | Sequence[int] | None = None,
                  smooth_last: bool = False, smooth: Sequence[bool] | None = None, causal: bool = True) -> np.ndarray:
        """Like `eval` for input embeddings [n, n_embd_inp] (e.g. an image's) at `pos`: [n] or,
        for M-RoPE, [4, n] (see image_positions). n_embd_inp is n_embd, or for Qwen3-VL
        n_embd · (1 + n_deepstack): slice j + 1 is added to the output of layer j. `causal`
        False: the chunk's tokens see each other both ways (llama_set_causal_attn(ctx, false),
        as mtmd decodes a Gemma 3 image; LLAMA_NON_CAUSAL_TYPE_ALL: the window still bounds the
        past in sliding layers)."""
        x = np.asarray(embd, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.n_embd_inp or x.shape[0] == 0:
            raise ValueError(f"embeddings must be [n_tokens, {self.n_embd_inp}]")
        return self._forward(state, x, self._positions(state, x.shape[0], pos, False), smooth_last, smooth, causal)

    def _forward(self, state: FamilyState, x: np.ndarray, pos: np.ndarray, smooth_last: bool,
                 smooth: Sequence[bool] | None, causal: bool = True) -> np.ndarray:
        n = x.shape[0]
        if smooth is None:
            smooth = [smooth_last and i == n - 1 for i in range(n)]
        elif len(smooth) != n:
            raise ValueError("smooth must have one flag per token")
        smoothed = [i for i in range(n) if smooth[i]] if state.kvsmooth is not None else []
        smoothed.sort(key=lambda i: int(pos[0, i]))
        first_new = state.n_cells
        state.pos = np.concatenate([state.pos, pos[0]])
        state.row = np.concatenate([state.row, pos[1]])
        state.col = np.concatenate([state.col, pos[2]])
        masks = {swa: self._mask(state, pos, swa, causal) for swa in set(self.is_swa)}
        E = self.n_embd
        x, deepstack = x[:, :E], x[:, E:]
        for il in range(self.n_layer):
            x = x + self._attention(state, il, x, pos, first_new, masks[self.is_swa[il]], smoothed)
            x = x + self._ffn(il, x)
            if il < self.n_deepstack:
                x = x + deepstack[:, il * E:(il + 1) * E]
        x = _rms_norm(x, self.w["output_norm.weight"], self.rms_eps)
        logits = x @ self.output.T
        if self.softcap:
            logits = np.tanh(logits / self.softcap) * self.softcap
        return logits

    def _mask(self, state: FamilyState, pos: np.ndarray, swa: bool, causal: bool = True) -> np.ndarray:
        """bool [n_tokens, n_cells]: which cells each new token's attention admits."""
        p0, p1 = state.pos[None, :], pos[0][:, None]
        visible = p0 <= p1 if causal else np.ones((p1.shape[0], p0.shape[1]), bool)
        if self.mrope and causal:
            # same sequential position: raster order of (row, col), as llama_kv_cell_ext::is_2d_gt
            later_2d = (state.row[None, :] > pos[1][:, None]) | (
                (state.row[None, :] == pos[1][:, None]) & (state.col[None, :] > pos[2][:, None]))
            visible &= ~((p0 == p1) & later_2d)
        if swa:
            visible &= (p1 - p0) < self.n_swa
        return visible

    def _rope(self, x: np.ndarray, pos: np.ndarray, il: int) -> np.ndarray:
        """NEOX-order rotation of x [n, heads, d]; M-RoPE picks each pair's position section."""
        inv = self._inv_freq[il]
        if self.mrope:
            p = pos[self._section, :].T.astype(np.float64)  # [n, d/2]
        else:
            p = pos[0][:, None].astype(np.float64)
        ang = p * inv[None, :]
        c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        h = x.shape[-1] // 2
        x0, x1 = x[..., :h], x[..., h:]
        return np.concatenate([x0 * c - x1 * s, x0 * s + x1 * c], axis=-1)

    def _attention(self, state: FamilyState, il: int, x: np.ndarray, pos: np.ndarray, first_new: int,
                   mask: np.ndarray, smoothed: list[int]) -> np.ndarray:
        p = f"blk.{il}."
        w = self.w
        n, hd, H, Hkv = x.shape[0], self.head_dim, self.n_head, self.n_head_kv
        h = _rms_norm(x, w[p + "attn_norm.weight"], self.rms_eps)
        q = h @ w[p + "attn_q.weight"].T
        k = h @ w[p + "attn_k.weight"].T
        v = h @ w[p + "attn_v.weight"].T
        if p + "attn_q.bias" in w:
            q, k, v = q + w[p + "attn_q.bias"], k + w[p + "attn_k.bias"], v + w[p + "attn_v.bias"]
        q, k, v = q.reshape(n, H, hd), k.reshape(n, Hkv, hd), v.reshape(n, Hkv, hd)
        if p + "attn_q_norm.weight" in w:
            q = _rms_norm(q, w[p + "attn_q_norm.weight"], self.rms_eps)
            k = _rms_norm(k, w[p + "attn_k_norm.weight"], self.rms_eps)
        q, k = self._rope(q, pos, il), self._rope(k, pos, il)
        q = q * self.f_attention_scale

        # Step 1: raw K/V go into the cache; attention reads them back from it.
        state.k[il] = np.concatenate([state.k[il], round_to_cache(k, self.cache_type)])
        state.v[il] = np.concatenate([state.v[il], round_to_cache(v, self.cache_type)])
        kc, vc = state.k[il].astype(np.float64), state.v[il].astype(np.float64)

        grp = H // Hkv
        kh = np.repeat(kc.transpose(1, 0, 2), grp, axis=0)  # [H, n_cells, hd]; head h -> kv h//grp
        vh = np.repeat(vc.transpose(1, 0, 2), grp, axis=0)
        scores = np.einsum("nhd,hcd->hnc", q, kh) * self.kq_scale  # [H, n, n_cells]
        scores = np.where(mask[None], scores, -np.inf)
        scores -= scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(axis=-1, keepdims=True)
        out = np.einsum("hnc,hcd->nhd", probs, vh).reshape(n, H * hd) @ w[p + "attn_output.weight"].T
        if p + "post_attention_norm.weight" in w:
            out = _rms_norm(out, w[p + "post_attention_norm.weight"], self.rms_eps)

        prm = state.kvsmooth
        if prm is not None and prm.layer_end is not None and prm.layer_start <= il < prm.layer_end:
            for i in smoothed:  # in position order
                self._smooth(state, il, first_new + i, probs[:, i, :])
        return out

    def previous_cell(self, state: FamilyState, cell: int) -> int | None:
        """The cell of the greatest sequential position below `cell`'s; of several (an image's),
        the one decoded last. None if the sequence holds no earlier position."""
        below = np.nonzero(state.pos < state.pos[cell])[0]
        if len(below) == 0:
            return None
        best = state.pos[below].max()
        return int(below[state.pos[below] == best].max())

    def _smooth(self, state: FamilyState, il: int, cell: int, alpha: np.ndarray) -> None:
        prm = state.kvsmooth
        assert prm is not None
        z = float(np.mean(-np.sum(alpha * np.log(alpha + prm.eps), axis=-1)))
        fifo = state.queues[il]
        fifo.append(z)
        if len(fifo) > prm.queue:
            del fifo[0]
        k = sum(1 for s in fifo[:-1] if s < z)
        if prm.mode == "fixed":
            lam = prm.lambda_ref
        else:
            lam = min(max(k / prm.queue, prm.lambda_ref - prm.window), prm.lambda_ref + prm.window)
        prev = self.previous_cell(state, cell)
        if prev is not None:
            l32 = np.float32(lam)
            one = np.float32(1) - l32
            kc, vc = state.k[il], state.v[il]
            kc[cell] = round_to_cache(one * kc[cell] + l32 * kc[prev], self.cache_type)
            if prm.mode != "keys":
                vc[cell] = round_to_cache(one * vc[cell] + l32 * vc[prev], self.cache_type)
        state.trace.append(TraceEntry(int(state.pos[cell]), il, z, float(lam), k, prev is not None))

    def _ffn(self, il: int, x: np.ndarray) -> np.ndarray:
        p = f"blk.{il}."
        w = self.w
        h = _rms_norm(x, w[p + "ffn_norm.weight"], self.rms_eps)
        g = h @ w[p + "ffn_gate.weight"].T
        u = h @ w[p + "ffn_up.weight"].T
        if self.arch == "gemma3":
            out = (self._gelu(g) * u) @ w[p + "ffn_down.weight"].T
            return _rms_norm(out, w[p + "post_ffw_norm.weight"], self.rms_eps)
        return (g / (1.0 + np.exp(-g)) * u) @ w[p + "ffn_down.weight"].T
