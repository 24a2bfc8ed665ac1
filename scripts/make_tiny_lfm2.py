#!/usr/bin/env python3
"""Write a tiny random-weight LFM2-VL-shaped model pair for tests.

    python scripts/make_tiny_lfm2.py OUTDIR [--seed N] [--weights f32|f16]

writes OUTDIR/tiny-lfm2-text.gguf (general.architecture "lfm2": a hybrid stack of
short-convolution layers and grouped-query attention layers, which llama.cpp serves with
`llama_memory_hybrid`: a recurrent cache for the conv states, a KV cache for the attention
layers) and OUTDIR/tiny-lfm2-mmproj.gguf (a SigLIP-style vision tower with LFM2-VL's
projector: pixel unshuffle by 2, LayerNorm, Linear-GELU-Linear; projector type "lfm2" in
tools/mtmd/clip.cpp). Nothing is downloaded; the same seed gives byte-identical files.

What llama.cpp reads (src/models/lfm2.cpp, src/llama-model.cpp):
- `lfm2.attention.head_count_kv` is a per-layer array; 0 marks a short-conv layer
  (`is_recr(il)`), as convert_hf_to_gguf.py writes it from the HF `layer_types`.
- `lfm2.shortconv.l_cache` is the conv kernel length L; a conv layer keeps the last L - 1
  inputs of its conv as its recurrent state.
- an attention layer: RMSNorm (`attn_norm`, the "operator norm"), Q/K/V, per-head RMSNorm
  of Q and K (`attn_q_norm`, `attn_k_norm`), RoPE of type NEOX, attention, `attn_output`.
- a conv layer: RMSNorm (`attn_norm`), `shortconv.in_proj` into B, C, x (n_embd each),
  B·x through a causal depthwise conv (`shortconv.conv`, ne [L, n_embd]), times C,
  `shortconv.out_proj`.
- every layer: a SwiGLU FFN with `ffn_norm`; the output norm is stored as
  `token_embd_norm.weight` (llama.cpp's LLM_TENSOR_OUTPUT_NORM_LFM2); the output head is the
  token embedding (tied, as in the released LFM2 models).

The tokenizer is the SentencePiece-style vocabulary of make_tiny_llava.py plus LFM2-VL's
special tokens (<|startoftext|> as BOS, <|im_start|>, <|im_end|> as EOS, <|image_start|>,
<|image_end|>, <|img_thumbnail|>, the tile markers); the chat template is LFM2-VL's
ChatML-style one.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import gguf

import make_tiny_llava as llava

TEXT_FILE = "tiny-lfm2-text.gguf"
MMPROJ_FILE = "tiny-lfm2-mmproj.gguf"

# Which decoder layers are short-conv ("conv") and which attention ("attn"). With 6 layers
# the default KVSmooth range [3, 5) holds one of each, [2, 4) only conv layers, and [0, 6)
# the three attention layers 1, 4 and 5.
LAYER_TYPES = ("conv", "attn", "conv", "conv", "attn", "attn")

# LFM2-VL's template (HF chat_template.jinja, without the tool-calling part): ChatML turns,
# BOS first, image items rendered as "<image>".
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- set ns = namespace(system_prompt='', content='') -%}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set ns.system_prompt = messages[0]['content'] -%}"
    "{%- set messages = messages[1:] -%}"
    "{%- endif -%}"
    "{%- if ns.system_prompt -%}"
    "{{- '<|im_start|>system\\n' + ns.system_prompt + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- set content = message['content'] -%}"
    "{%- if content is not string -%}"
    "{%- set ns.content = '' -%}"
    "{%- for item in content -%}"
    "{%- if item['type'] == 'image' -%}{%- set ns.content = ns.content + '<image>' -%}"
    "{%- elif item['type'] == 'text' -%}{%- set ns.content = ns.content + item['text'] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set content = ns.content -%}"
    "{%- endif -%}"
    "{{- content + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

BOS = "<|startoftext|>"
EOS = "<|im_end|>"
# mtmd's LFM2 image framing (tools/mtmd/mtmd.cpp): <|image_start|> (image) <|image_end|>, and
# for a tiled image <|img_row_R_col_C|> before each tile and <|img_thumbnail|> before the
# overview; LFM2-VL tiles into at most 10 tiles.
SPECIAL = [BOS, "<|im_start|>", EOS, "<|image_start|>", "<|image_end|>", "<|img_thumbnail|>", "<image>"] + [
    f"<|img_row_{r}_col_{c}|>" for r in range(1, 11) for c in range(1, 11)]


@dataclasses.dataclass(frozen=True)
class TextConfig:
    n_vocab: int
    layer_types: tuple[str, ...] = LAYER_TYPES
    n_embd: int = 256
    n_head: int = 4
    n_head_kv: int = 2  # of the attention layers
    n_ff: int = 512
    l_cache: int = 3
    n_ctx: int = 2048
    rope_freq_base: float = 1000000.0
    rms_eps: float = 1e-5
    weights: str = "f32"

    @property
    def n_layer(self) -> int:
        return len(self.layer_types)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def attn_layers(self) -> list[int]:
        return [il for il, t in enumerate(self.layer_types) if t == "attn"]

    @property
    def conv_layers(self) -> list[int]:
        return [il for il, t in enumerate(self.layer_types) if t == "conv"]


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    text_n_embd: int
    image_size: int = 64   # the learned position grid (8 x 8 patches), resized to each image
    patch_size: int = 8
    n_embd: int = 64
    n_head: int = 2
    n_ff: int = 128
    n_layer: int = 2
    scale_factor: int = 2  # pixel unshuffle: 2 x 2 patches -> one text token
    n_proj: int = 128      # hidden width of the projector MLP
    eps: float = 1e-6
    weights: str = "f32"

    @property
    def n_pos(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def build_vocab() -> tuple[list[str], list[float], list[int]]:
    tokens, scores, types = llava.build_vocab()
    tokens = tokens + SPECIAL
    scores = scores + [0.0] * len(SPECIAL)
    types = types + [llava.TOKEN_CONTROL] * len(SPECIAL)
    return tokens, scores, types


def add_tokenizer(w: gguf.GGUFWriter, tokens: list[str], scores: list[float], types: list[int]) -> None:
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(tokens.index(BOS))
    w.add_eos_token_id(tokens.index(EOS))
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)


def write_text_model(path: str | Path, seed: int = 0, weights: str = "f32", **dims) -> TextConfig:
    """Write the LFM2 text model; `dims` overrides TextConfig fields (layer_types, n_embd, ...)."""
    tokens, scores, types = build_vocab()
    cfg = TextConfig(n_vocab=len(tokens), weights=weights, **dims)
    if cfg.n_embd % cfg.n_head or cfg.n_head % cfg.n_head_kv:
        raise ValueError("n_embd must divide by n_head and n_head by n_head_kv")
    if set(cfg.layer_types) - {"conv", "attn"} or not cfg.layer_types:
        raise ValueError(f"layer_types must be a non-empty sequence of 'conv'/'attn', not {cfg.layer_types}")
    if cfg.l_cache < 2:
        raise ValueError("l_cache must be >= 2")
    rng = np.random.default_rng(seed)
    hd, E = cfg.head_dim, cfg.n_embd

    def normal(shape: tuple[int, ...], std: float) -> np.ndarray:
        return rng.standard_normal(shape) * std

    w = gguf.GGUFWriter(str(path), "lfm2")
    w.add_name("tiny-lfm2-text")
    w.add_context_length(cfg.n_ctx)
    w.add_embedding_length(E)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.n_ff)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv([cfg.n_head_kv if t == "attn" else 0 for t in cfg.layer_types])
    w.add_rope_freq_base(cfg.rope_freq_base)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    w.add_shortconv_l_cache(cfg.l_cache)
    w.add_vocab_size(cfg.n_vocab)
    w.add_file_type(llava._file_type(weights))
    add_tokenizer(w, tokens, scores, types)

    def mat(name: str, shape: tuple[int, ...], std: float) -> None:
        w.add_tensor(name, llava._as_weight(normal(shape, std), weights))

    def norm(name: str, n: int, mean: float = 1.0) -> None:
        w.add_tensor(name, (mean * (1.0 + normal((n,), 0.1))).astype(np.float32))

    # Arrays are (out, in) in NumPy order = ggml ne [in, out]. The output head is the token
    # embedding: std 3/sqrt(E) gives logits of std ~3 from the RMS-normed last hidden state.
    mat("token_embd.weight", (cfg.n_vocab, E), 3.0 / np.sqrt(E))
    for il, kind in enumerate(cfg.layer_types):
        p = f"blk.{il}."
        norm(p + "attn_norm.weight", E)
        if kind == "attn":
            mat(p + "attn_q.weight", (cfg.n_head * hd, E), 1.0 / np.sqrt(E))
            mat(p + "attn_k.weight", (cfg.n_head_kv * hd, E), 1.0 / np.sqrt(E))
            mat(p + "attn_v.weight", (cfg.n_head_kv * hd, E), 1.0 / np.sqrt(E))
            # Q and K leave their per-head RMSNorm with RMS ~1.6: attention logits of std ~2.5,
            # far from uniform, so the entropies (and KVSmooth's ranks) vary
            norm(p + "attn_q_norm.weight", hd, mean=1.6)
            norm(p + "attn_k_norm.weight", hd, mean=1.6)
            mat(p + "attn_output.weight", (E, cfg.n_head * hd), 0.7 / np.sqrt(cfg.n_head * hd))
        else:
            mat(p + "shortconv.in_proj.weight", (3 * E, E), 1.0 / np.sqrt(E))
            mat(p + "shortconv.conv.weight", (E, cfg.l_cache), 1.0 / np.sqrt(cfg.l_cache))
            mat(p + "shortconv.out_proj.weight", (E, E), 0.7 / np.sqrt(E))
        norm(p + "ffn_norm.weight", E)
        mat(p + "ffn_gate.weight", (cfg.n_ff, E), 1.0 / np.sqrt(E))
        mat(p + "ffn_up.weight", (cfg.n_ff, E), 1.0 / np.sqrt(E))
        mat(p + "ffn_down.weight", (E, cfg.n_ff), 0.7 / np.sqrt(cfg.n_ff))
    norm("token_embd_norm.weight", E)

    llava._finish(w)
    return cfg


def write_mmproj(path: str | Path, seed: int = 0, text_n_embd: int = 256, weights: str = "f32",
                 **dims) -> VisionConfig:
    """Write the vision tower + LFM2-VL projector (clip.projector_type "lfm2")."""
    cfg = VisionConfig(text_n_embd=text_n_embd, weights=weights, **dims)
    side = cfg.image_size // cfg.patch_size
    if cfg.image_size % cfg.patch_size or cfg.n_embd % cfg.n_head or cfg.scale_factor < 2 or side * side != cfg.n_pos:
        raise ValueError("bad vision dimensions")
    rng = np.random.default_rng(seed + 0x1F42)
    E, T, P = cfg.n_embd, cfg.text_n_embd, cfg.n_proj
    E4 = E * cfg.scale_factor**2

    def normal(shape: tuple[int, ...], std: float) -> np.ndarray:
        return rng.standard_normal(shape) * std

    w = gguf.GGUFWriter(str(path), "clip")
    w.add_name("tiny-lfm2-mmproj")
    w.add_file_type(llava._file_type(weights))
    w.add_bool("clip.has_vision_encoder", True)
    w.add_bool("clip.has_text_encoder", False)
    w.add_string("clip.projector_type", "lfm2")
    w.add_bool("clip.use_gelu", True)
    w.add_uint32("clip.vision.image_size", cfg.image_size)
    w.add_uint32("clip.vision.patch_size", cfg.patch_size)
    w.add_uint32("clip.vision.embedding_length", E)
    w.add_uint32("clip.vision.feed_forward_length", cfg.n_ff)
    w.add_uint32("clip.vision.projection_dim", T)
    w.add_uint32("clip.vision.attention.head_count", cfg.n_head)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", cfg.eps)
    w.add_uint32("clip.vision.block_count", cfg.n_layer)
    w.add_uint32("clip.vision.projector.scale_factor", cfg.scale_factor)
    w.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    w.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])

    def mat(name: str, shape: tuple[int, ...], std: float) -> None:
        w.add_tensor(name, llava._as_weight(normal(shape, std), weights))

    def vec(name: str, n: int, mean: float, std: float) -> None:
        w.add_tensor(name, (mean + normal((n,), std)).astype(np.float32))

    mat("v.patch_embd.weight", (E, 3, cfg.patch_size, cfg.patch_size), 1.0 / np.sqrt(3 * cfg.patch_size**2))
    vec("v.patch_embd.bias", E, 0.0, 0.02)
    mat("v.position_embd.weight", (cfg.n_pos, E), 0.5)
    for il in range(cfg.n_layer):
        p = f"v.blk.{il}."
        vec(p + "ln1.weight", E, 1.0, 0.1)
        vec(p + "ln1.bias", E, 0.0, 0.1)
        for t in ("attn_q", "attn_k", "attn_v", "attn_out"):
            mat(p + t + ".weight", (E, E), 1.0 / np.sqrt(E))
            vec(p + t + ".bias", E, 0.0, 0.02)
        vec(p + "ln2.weight", E, 1.0, 0.1)
        vec(p + "ln2.bias", E, 0.0, 0.1)
        mat(p + "ffn_up.weight", (cfg.n_ff, E), 1.0 / np.sqrt(E))
        vec(p + "ffn_up.bias", cfg.n_ff, 0.0, 0.02)
        mat(p + "ffn_down.weight", (E, cfg.n_ff), 1.0 / np.sqrt(cfg.n_ff))
        vec(p + "ffn_down.bias", E, 0.0, 0.02)
    vec("v.post_ln.weight", E, 1.0, 0.1)
    vec("v.post_ln.bias", E, 0.0, 0.1)
    vec("mm.input_norm.weight", E4, 1.0, 0.1)
    vec("mm.input_norm.bias", E4, 0.0, 0.1)
    mat("mm.1.weight", (P, E4), 1.0 / np.sqrt(E4))
    vec("mm.1.bias", P, 0.0, 0.02)
    # image embeddings of RMS ~0.2, like the text model's token embeddings
    mat("mm.2.weight", (T, P), 0.25 / np.sqrt(P))
    vec("mm.2.bias", T, 0.0, 0.02)

    llava._finish(w)
    return cfg


def write_pair(outdir: str | Path, seed: int = 0, weights: str = "f32") -> tuple[Path, Path]:
    return llava.write_model_pair(outdir, TEXT_FILE, MMPROJ_FILE, write_text_model, write_mmproj, seed, weights)


def main(argv: list[str] | None = None) -> int:
    return llava.pair_main(__doc__, write_pair, argv)


if __name__ == "__main__":
    sys.exit(main())
