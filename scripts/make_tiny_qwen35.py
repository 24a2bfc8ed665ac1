#!/usr/bin/env python3
"""Write a tiny random-weight Qwen3.5-shaped text model for tests.

    python scripts/make_tiny_qwen35.py OUTDIR [--seed N] [--weights f32|f16]

writes OUTDIR/tiny-qwen35-text.gguf (general.architecture "qwen35": gated delta-net
linear-attention layers and full attention layers, served by llama.cpp with
`llama_memory_hybrid`). No vision tower is written. Nothing is downloaded; the same seed gives
byte-identical files.

What llama.cpp reads (src/models/qwen35.cpp, src/models/delta-net-base.cpp):
- layer il is full attention when (il + 1) % `qwen35.full_attention_interval` == 0, else a
  gated delta-net ("linear attention") layer: with 6 layers and interval 2, layers 1, 3 and 5
  are attention layers, 0, 2 and 4 delta-net layers.
- attention layer: RMSNorm (`attn_norm`); `attn_q` gives per head the query and an output
  gate side by side ([q | gate], head size each); per-head RMSNorm of Q and K; RoPE through
  ggml_rope_multi of type IMROPE (`rope.dimension_sections`; a text token has the same
  position in every section, so it is NEOX RoPE on the first `rope.dimension_count` dims of
  each head); attention; times sigmoid(gate); `attn_output`.
- delta-net layer: RMSNorm; `attn_qkv` → a causal depthwise conv (`ssm_conv1d`, kernel
  `ssm.conv_kernel`) → SiLU → q, k (ssm.group_count heads of ssm.state_size), v
  (ssm.time_step_rank heads); L2 norm of q and k; β = sigmoid(`ssm_beta`·h), decay
  g = softplus(`ssm_alpha`·h + `ssm_dt.bias`) · `ssm_a`; per head the state S ← e^g S,
  S ← S + β (v − S k) kᵀ, o = S q / sqrt(d_k); RMSNorm of o (`ssm_norm`) times SiLU(z) with
  z = `attn_gate`·h; `ssm_out`.
- every layer: residual, `post_attention_norm`, SwiGLU FFN, residual; `output_norm`; the
  output head is the token embedding (tied, as in the small released Qwen3.5 models).

Tokenizer: make_tiny_llava.py's SentencePiece-style vocabulary plus the ChatML tokens; the chat
template is ChatML, as Qwen's.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import gguf

import make_tiny_llava as llava

TEXT_FILE = "tiny-qwen35-text.gguf"

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]


@dataclasses.dataclass(frozen=True)
class TextConfig:
    n_vocab: int
    n_layer: int = 6
    full_attention_interval: int = 2
    n_embd: int = 256
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int = 64
    n_rot: int = 32                       # partial RoPE, as Qwen3.5 (a quarter of the head there)
    rope_sections: tuple[int, int, int, int] = (6, 5, 5, 0)  # sum = n_rot / 2
    n_ff: int = 512
    ssm_conv_kernel: int = 4
    ssm_state_size: int = 32              # head size of the delta-net q, k and v
    ssm_group_count: int = 4              # q/k heads
    ssm_time_step_rank: int = 4           # v heads
    n_ctx: int = 2048
    rope_freq_base: float = 10000000.0
    rms_eps: float = 1e-6
    weights: str = "f32"

    @property
    def attn_layers(self) -> list[int]:
        return [il for il in range(self.n_layer) if (il + 1) % self.full_attention_interval == 0]

    @property
    def linear_layers(self) -> list[int]:
        return [il for il in range(self.n_layer) if (il + 1) % self.full_attention_interval != 0]

    @property
    def ssm_inner_size(self) -> int:
        return self.ssm_state_size * self.ssm_time_step_rank


def build_vocab() -> tuple[list[str], list[float], list[int]]:
    tokens, scores, types = llava.build_vocab()
    return tokens + SPECIAL, scores + [0.0] * len(SPECIAL), types + [llava.TOKEN_CONTROL] * len(SPECIAL)


def write_text_model(path: str | Path, seed: int = 0, weights: str = "f32", **dims) -> TextConfig:
    tokens, scores, types = build_vocab()
    cfg = TextConfig(n_vocab=len(tokens), weights=weights, **dims)
    if cfg.n_head % cfg.n_head_kv or cfg.n_rot > cfg.head_dim or sum(cfg.rope_sections) * 2 != cfg.n_rot:
        raise ValueError("bad attention dimensions (n_head / n_head_kv, n_rot <= head_dim, sections sum to n_rot/2)")
    if cfg.ssm_time_step_rank != cfg.ssm_group_count:
        raise ValueError("the fixture keeps as many delta-net v heads as q/k heads (no head repetition)")
    rng = np.random.default_rng(seed)
    E, hd, H, Hkv = cfg.n_embd, cfg.head_dim, cfg.n_head, cfg.n_head_kv
    dk, Hk, Hv = cfg.ssm_state_size, cfg.ssm_group_count, cfg.ssm_time_step_rank
    key_dim, value_dim = dk * Hk, dk * Hv
    conv_dim = 2 * key_dim + value_dim

    def normal(shape: tuple[int, ...], std: float) -> np.ndarray:
        return rng.standard_normal(shape) * std

    w = gguf.GGUFWriter(str(path), "qwen35")
    w.add_name("tiny-qwen35-text")
    w.add_context_length(cfg.n_ctx)
    w.add_embedding_length(E)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.n_ff)
    w.add_head_count(H)
    w.add_head_count_kv(Hkv)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_dimension_count(cfg.n_rot)
    w.add_rope_dimension_sections(list(cfg.rope_sections))
    w.add_rope_freq_base(cfg.rope_freq_base)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    w.add_full_attention_interval(cfg.full_attention_interval)
    w.add_ssm_conv_kernel(cfg.ssm_conv_kernel)
    w.add_ssm_inner_size(cfg.ssm_inner_size)
    w.add_ssm_state_size(dk)
    w.add_ssm_time_step_rank(Hv)
    w.add_ssm_group_count(Hk)
    w.add_vocab_size(cfg.n_vocab)
    w.add_file_type(llava._file_type(weights))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    def mat(name: str, shape: tuple[int, ...], std: float) -> None:
        w.add_tensor(name, llava._as_weight(normal(shape, std), weights))

    def vec(name: str, n: int, mean: float, std: float) -> None:
        w.add_tensor(name, (mean + normal((n,), std)).astype(np.float32))

    mat("token_embd.weight", (cfg.n_vocab, E), 3.0 / np.sqrt(E))  # tied head: logits of std ~3
    for il in range(cfg.n_layer):
        p = f"blk.{il}."
        vec(p + "attn_norm.weight", E, 1.0, 0.1)
        vec(p + "post_attention_norm.weight", E, 1.0, 0.1)
        if il in cfg.attn_layers:
            mat(p + "attn_q.weight", (2 * H * hd, E), 1.0 / np.sqrt(E))
            mat(p + "attn_k.weight", (Hkv * hd, E), 1.0 / np.sqrt(E))
            mat(p + "attn_v.weight", (Hkv * hd, E), 1.0 / np.sqrt(E))
            vec(p + "attn_q_norm.weight", hd, 1.6, 0.16)  # attention logits of std ~2.5
            vec(p + "attn_k_norm.weight", hd, 1.6, 0.16)
            mat(p + "attn_output.weight", (E, H * hd), 1.4 / np.sqrt(H * hd))
        else:
            mat(p + "attn_qkv.weight", (conv_dim, E), 1.0 / np.sqrt(E))
            mat(p + "attn_gate.weight", (value_dim, E), 1.0 / np.sqrt(E))
            mat(p + "ssm_conv1d.weight", (conv_dim, cfg.ssm_conv_kernel), 1.0 / np.sqrt(cfg.ssm_conv_kernel))
            vec(p + "ssm_dt.bias", Hv, 0.0, 0.5)
            w.add_tensor(p + "ssm_a", (-np.exp(normal((Hv,), 0.5))).astype(np.float32))  # -exp(A_log)
            mat(p + "ssm_beta.weight", (Hv, E), 1.0 / np.sqrt(E))
            mat(p + "ssm_alpha.weight", (Hv, E), 1.0 / np.sqrt(E))
            vec(p + "ssm_norm.weight", dk, 1.0, 0.1)
            mat(p + "ssm_out.weight", (E, value_dim), 0.7 / np.sqrt(value_dim))
        mat(p + "ffn_gate.weight", (cfg.n_ff, E), 1.0 / np.sqrt(E))
        mat(p + "ffn_up.weight", (cfg.n_ff, E), 1.0 / np.sqrt(E))
        mat(p + "ffn_down.weight", (E, cfg.n_ff), 0.7 / np.sqrt(cfg.n_ff))
    vec("output_norm.weight", E, 1.0, 0.1)

    llava._finish(w)
    return cfg


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("outdir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weights", choices=("f32", "f16"), default="f32")
    args = ap.parse_args(argv)
    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    write_text_model(out / TEXT_FILE, args.seed, args.weights)
    print(out / TEXT_FILE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
