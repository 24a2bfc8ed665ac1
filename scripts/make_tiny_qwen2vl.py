#!/usr/bin/env python3
"""Write a tiny random-weight Qwen2-VL-shaped model pair for tests.

    python scripts/make_tiny_qwen2vl.py OUTDIR [--seed N] [--weights f32|f16] [--qwen3vl]

writes OUTDIR/tiny-qwen2vl-text.gguf (general.architecture "qwen2vl": M-RoPE with four rope
sections, Q/K/V biases, SwiGLU; the SentencePiece-style vocabulary of make_tiny_llava.py plus
Qwen's ChatML and vision control tokens, and a Qwen2-VL-like chat template) and
OUTDIR/tiny-qwen2vl-mmproj.gguf (a Qwen2-VL vision tower with the "qwen2vl_merger" projector:
two patch-embedding convolutions for the two temporal frames, 2-D M-RoPE blocks, LayerNorm
"ln_q" as v.post_ln, and a 2x2 merge into mm.0 -> GELU -> mm.2, as tools/mtmd/clip.cpp
loads it). Seeded NumPy weights: the same seed gives byte-identical files.

Head size 64 with rope sections [8, 12, 12, 0] (32 rotated pairs: time, height, width; the
real 7B model has head size 128 and [16, 24, 24, 0]). Weights are written in llama.cpp's
convention: M-RoPE rotates the pairs (x[i], x[i + 32]) (NEOX order), no permutation.

`--qwen3vl` (write_qwen3vl_text_model) also writes OUTDIR/tiny-qwen3vl-text.gguf: arch
"qwen3vl", Qwen3's RMS-normed Q and K without biases, interleaved M-RoPE (IMROPE) with sections
[12, 10, 10, 0] (real: [24, 20, 20, 0]) and one DeepStack layer (input embeddings of
2 x n_embd: the second half is added to layer 0's output), and OUTDIR/tiny-qwen3vl-mmproj.gguf
("qwen3vl_merger": patch bias, learned position embeddings, fused QKV, a DeepStack merger on
vision layer 0 whose output is the embeddings' second half).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import gguf
import numpy as np

import make_tiny_llava as llava

TEXT_FILE = "tiny-qwen2vl-text.gguf"
MMPROJ_FILE = "tiny-qwen2vl-mmproj.gguf"
QWEN3VL_TEXT_FILE = "tiny-qwen3vl-text.gguf"
QWEN3VL_MMPROJ_FILE = "tiny-qwen3vl-mmproj.gguf"
ARCH = "qwen2vl"

# ChatML plus the vision markers mtmd puts around an image (<|vision_start|> ... <|vision_end|>)
CONTROL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>")

# Qwen2-VL-7B-Instruct's template, shortened to what a single image or text content needs: the
# default system prompt, ChatML turns, and an image part rendered as its vision markers.
# llama.cpp detects it as "chatml" (it contains <|im_start|>) where Jinja is off (llama-mtmd-cli).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclasses.dataclass(frozen=True)
class TextConfig:
    n_vocab: int
    n_embd: int = 256
    n_head: int = 4
    n_head_kv: int = 2
    n_layer: int = 6
    n_ff: int = 512
    n_ctx: int = 4096
    rope_freq_base: float = 10000.0
    rope_sections: tuple[int, int, int, int] = (8, 12, 12, 0)
    rms_eps: float = 1e-6
    weights: str = "f32"

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    text_n_embd: int
    image_size: int = 56       # only a nominal size: the dynamic-resolution preprocessor resizes
    patch_size: int = 4        # to multiples of patch_size * 2 (the 2x2 merge)
    n_embd: int = 64
    n_head: int = 2            # head size 32: four 2-D rope sections of 8
    n_ff: int = 128
    n_layer: int = 2
    eps: float = 1e-6
    weights: str = "f32"


def vocab() -> tuple[list[str], list[float], list[int]]:
    return llava.build_vocab(CONTROL_TOKENS)


def write_text_model(path: str | Path, seed: int = 0, weights: str = "f32", **dims) -> TextConfig:
    """Write the Qwen2-VL text model; `dims` overrides TextConfig fields."""
    return _write_text(path, ARCH, seed, weights, 0, **dims)


def write_qwen3vl_text_model(path: str | Path, seed: int = 0, weights: str = "f32", n_deepstack: int = 1,
                             **dims) -> TextConfig:
    """Write the Qwen3-VL text model (Q/K norms, no biases, IMROPE, `n_deepstack` DeepStack layers)."""
    dims.setdefault("rope_sections", (12, 10, 10, 0))
    return _write_text(path, "qwen3vl", seed, weights, n_deepstack, **dims)


def _write_text(path: str | Path, arch: str, seed: int, weights: str, n_deepstack: int, **dims) -> TextConfig:
    tokens, scores, types = vocab()
    cfg = TextConfig(n_vocab=len(tokens), weights=weights, **dims)
    if cfg.n_embd % cfg.n_head or cfg.n_head % cfg.n_head_kv:
        raise ValueError("n_embd must divide by n_head and n_head by n_head_kv")
    if 2 * sum(cfg.rope_sections) != cfg.head_dim:
        raise ValueError(f"rope sections {cfg.rope_sections} must cover head_dim / 2 = {cfg.head_dim // 2} pairs")
    rng = np.random.default_rng(seed)
    hd, E = cfg.head_dim, cfg.n_embd

    def normal(shape: tuple[int, ...], std: float) -> np.ndarray:
        return rng.standard_normal(shape) * std

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}-text")
    w.add_context_length(cfg.n_ctx)
    w.add_embedding_length(E)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.n_ff)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_head_kv)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(cfg.rope_freq_base)
    w.add_rope_dimension_sections(list(cfg.rope_sections))
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    if arch == "qwen3vl":
        w.add_uint32(f"{arch}.n_deepstack_layers", n_deepstack)
    w.add_vocab_size(cfg.n_vocab)
    w.add_file_type(llava._file_type(weights))
    llava.add_tokenizer(w, tokens, scores, types, chat_template=CHAT_TEMPLATE,
                        eos=tokens.index("<|im_end|>"), add_bos=False)

    def mat(name: str, shape: tuple[int, int], std: float) -> None:
        w.add_tensor(name, llava._as_weight(normal(shape, std), weights))

    def vec(name: str, n: int, mean: float, std: float) -> None:
        w.add_tensor(name, (mean + normal((n,), std)).astype(np.float32))

    # scales as in make_tiny_llava.py (attention logits of std ~2-3, output logits of std ~3);
    # the Q/K biases are large enough to matter (they shift every head's scores)
    mat("token_embd.weight", (cfg.n_vocab, E), 1.0)
    qk_std = 1.6 / np.sqrt(E)
    for il in range(cfg.n_layer):
        p = f"blk.{il}."
        vec(p + "attn_norm.weight", E, 1.0, 0.1)
        if arch == "qwen2vl":
            mat(p + "attn_q.weight", (cfg.n_head * hd, E), qk_std)
            vec(p + "attn_q.bias", cfg.n_head * hd, 0.0, 0.3)
            mat(p + "attn_k.weight", (cfg.n_head_kv * hd, E), qk_std)
            vec(p + "attn_k.bias", cfg.n_head_kv * hd, 0.0, 0.3)
            mat(p + "attn_v.weight", (cfg.n_head_kv * hd, E), 1.0 / np.sqrt(E))
            vec(p + "attn_v.bias", cfg.n_head_kv * hd, 0.0, 0.1)
        else:
            # Qwen3: Q and K RMS-normed per head; norm weights ~1.6 give attention logits of std ~2.5
            mat(p + "attn_q.weight", (cfg.n_head * hd, E), 1.0 / np.sqrt(E))
            mat(p + "attn_k.weight", (cfg.n_head_kv * hd, E), 1.0 / np.sqrt(E))
            mat(p + "attn_v.weight", (cfg.n_head_kv * hd, E), 1.0 / np.sqrt(E))
            vec(p + "attn_q_norm.weight", hd, 1.6, 0.2)
            vec(p + "attn_k_norm.weight", hd, 1.6, 0.2)
        mat(p + "attn_output.weight", (E, cfg.n_head * hd), 0.7 / np.sqrt(cfg.n_head * hd))
        vec(p + "ffn_norm.weight", E, 1.0, 0.1)
        mat(p + "ffn_gate.weight", (cfg.n_ff, E), 1.0 / np.sqrt(E))
        mat(p + "ffn_up.weight", (cfg.n_ff, E), 1.0 / np.sqrt(E))
        mat(p + "ffn_down.weight", (E, cfg.n_ff), 0.7 / np.sqrt(cfg.n_ff))
    vec("output_norm.weight", E, 1.0, 0.1)
    mat("output.weight", (cfg.n_vocab, E), 3.0 / np.sqrt(E))

    llava._finish(w)
    return cfg


def write_mmproj(path: str | Path, seed: int = 0, text_n_embd: int = 256, weights: str = "f32",
                 **dims) -> VisionConfig:
    """Write the Qwen2-VL vision tower + "qwen2vl_merger" projector."""
    cfg = VisionConfig(text_n_embd=text_n_embd, weights=weights, **dims)
    if cfg.n_embd % cfg.n_head or (cfg.n_embd // cfg.n_head) % 8 or cfg.n_ff == cfg.n_embd:
        # the vision M-RoPE splits a head into four sections of rotated pairs; n_ff == n_embd
        # would make clip.cpp take ffn_up/ffn_down for legacy swapped names
        raise ValueError("bad vision dimensions")
    rng = np.random.default_rng(seed + 0x5EED)
    E, T, P = cfg.n_embd, cfg.text_n_embd, cfg.patch_size

    def normal(shape: tuple[int, ...], std: float) -> np.ndarray:
        return rng.standard_normal(shape) * std

    w = gguf.GGUFWriter(str(path), "clip")
    w.add_name("tiny-qwen2vl-mmproj")
    w.add_file_type(llava._file_type(weights))
    w.add_bool("clip.has_vision_encoder", True)
    w.add_bool("clip.has_text_encoder", False)
    w.add_string("clip.projector_type", "qwen2vl_merger")
    w.add_uint32("clip.vision.image_size", cfg.image_size)
    w.add_uint32("clip.vision.patch_size", P)
    w.add_uint32("clip.vision.embedding_length", E)
    w.add_uint32("clip.vision.feed_forward_length", cfg.n_ff)
    w.add_uint32("clip.vision.projection_dim", T)
    w.add_uint32("clip.vision.attention.head_count", cfg.n_head)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", cfg.eps)
    w.add_uint32("clip.vision.block_count", cfg.n_layer)
    w.add_array("clip.vision.image_mean", [0.48145466, 0.4578275, 0.40821073])
    w.add_array("clip.vision.image_std", [0.26862954, 0.26130258, 0.27577711])

    def mat(name: str, shape: tuple[int, ...], std: float) -> None:
        w.add_tensor(name, llava._as_weight(normal(shape, std), weights))

    def vec(name: str, n: int, mean: float, std: float) -> None:
        w.add_tensor(name, (mean + normal((n,), std)).astype(np.float32))

    # the Conv3D patch embedding (temporal patch 2) split into one Conv2D per frame, no bias;
    # kernel ne [KW, KH, C, E] = NumPy (E, C, KH, KW)
    k_std = 1.0 / np.sqrt(2 * 3 * P * P)
    mat("v.patch_embd.weight", (E, 3, P, P), k_std)
    mat("v.patch_embd.weight.1", (E, 3, P, P), k_std)
    llava.add_vit_blocks(mat, vec, E, cfg.n_ff, cfg.n_layer)
    # merger: ln_q, then the 2x2 neighbourhood (4E) through mm.0 -> GELU -> mm.2
    vec("v.post_ln.weight", E, 1.0, 0.1)
    vec("v.post_ln.bias", E, 0.0, 0.1)
    mat("mm.0.weight", (4 * E, 4 * E), 1.0 / np.sqrt(4 * E))
    vec("mm.0.bias", 4 * E, 0.0, 0.02)
    mat("mm.2.weight", (T, 4 * E), 1.5 / np.sqrt(4 * E))
    vec("mm.2.bias", T, 0.0, 0.02)

    llava._finish(w)
    return cfg


def write_qwen3vl_mmproj(path: str | Path, seed: int = 0, text_n_embd: int = 256, weights: str = "f32",
                         n_side: int = 8, **dims) -> VisionConfig:
    """Write the Qwen3-VL vision tower + "qwen3vl_merger" projector with one DeepStack merger
    (on vision layer 0); `n_side`: the learned position embeddings' grid (resized by clip.cpp)."""
    cfg = VisionConfig(text_n_embd=text_n_embd, weights=weights, **dims)
    if cfg.n_embd % cfg.n_head or (cfg.n_embd // cfg.n_head) % 8 or cfg.n_ff == cfg.n_embd:
        raise ValueError("bad vision dimensions")
    rng = np.random.default_rng(seed + 0x3EED)
    E, T, P = cfg.n_embd, cfg.text_n_embd, cfg.patch_size

    def normal(shape: tuple[int, ...], std: float) -> np.ndarray:
        return rng.standard_normal(shape) * std

    w = gguf.GGUFWriter(str(path), "clip")
    w.add_name("tiny-qwen3vl-mmproj")
    w.add_file_type(llava._file_type(weights))
    w.add_bool("clip.has_vision_encoder", True)
    w.add_bool("clip.has_text_encoder", False)
    w.add_string("clip.projector_type", "qwen3vl_merger")
    w.add_bool("clip.use_gelu", True)
    w.add_uint32("clip.vision.image_size", cfg.image_size)
    w.add_uint32("clip.vision.patch_size", P)
    w.add_uint32("clip.vision.embedding_length", E)
    w.add_uint32("clip.vision.feed_forward_length", cfg.n_ff)
    w.add_uint32("clip.vision.projection_dim", T)
    w.add_uint32("clip.vision.attention.head_count", cfg.n_head)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", cfg.eps)
    w.add_uint32("clip.vision.block_count", cfg.n_layer)
    w.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    w.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])

    def mat(name: str, shape: tuple[int, ...], std: float) -> None:
        w.add_tensor(name, llava._as_weight(normal(shape, std), weights))

    def vec(name: str, n: int, mean: float, std: float) -> None:
        w.add_tensor(name, (mean + normal((n,), std)).astype(np.float32))

    k_std = 1.0 / np.sqrt(2 * 3 * P * P)
    mat("v.patch_embd.weight", (E, 3, P, P), k_std)
    mat("v.patch_embd.weight.1", (E, 3, P, P), k_std)
    vec("v.patch_embd.bias", E, 0.0, 0.02)
    mat("v.position_embd.weight", (n_side * n_side, E), 0.5)
    for il in range(cfg.n_layer):
        p = f"v.blk.{il}."
        vec(p + "ln1.weight", E, 1.0, 0.1)
        vec(p + "ln1.bias", E, 0.0, 0.1)
        mat(p + "attn_qkv.weight", (3 * E, E), 1.0 / np.sqrt(E))
        vec(p + "attn_qkv.bias", 3 * E, 0.0, 0.02)
        mat(p + "attn_out.weight", (E, E), 1.0 / np.sqrt(E))
        vec(p + "attn_out.bias", E, 0.0, 0.02)
        vec(p + "ln2.weight", E, 1.0, 0.1)
        vec(p + "ln2.bias", E, 0.0, 0.1)
        mat(p + "ffn_up.weight", (cfg.n_ff, E), 1.0 / np.sqrt(E))
        vec(p + "ffn_up.bias", cfg.n_ff, 0.0, 0.02)
        mat(p + "ffn_down.weight", (E, cfg.n_ff), 1.0 / np.sqrt(cfg.n_ff))
        vec(p + "ffn_down.bias", E, 0.0, 0.02)
    # the DeepStack merger of layer 0: 2x2 neighbourhood (4E) -> LayerNorm -> fc1 -> GELU -> fc2
    vec("v.deepstack.0.norm.weight", 4 * E, 1.0, 0.1)
    vec("v.deepstack.0.norm.bias", 4 * E, 0.0, 0.1)
    mat("v.deepstack.0.fc1.weight", (4 * E, 4 * E), 1.0 / np.sqrt(4 * E))
    vec("v.deepstack.0.fc1.bias", 4 * E, 0.0, 0.02)
    mat("v.deepstack.0.fc2.weight", (T, 4 * E), 1.5 / np.sqrt(4 * E))
    vec("v.deepstack.0.fc2.bias", T, 0.0, 0.02)
    vec("v.post_ln.weight", E, 1.0, 0.1)
    vec("v.post_ln.bias", E, 0.0, 0.1)
    mat("mm.0.weight", (4 * E, 4 * E), 1.0 / np.sqrt(4 * E))
    vec("mm.0.bias", 4 * E, 0.0, 0.02)
    mat("mm.2.weight", (T, 4 * E), 1.5 / np.sqrt(4 * E))
    vec("mm.2.bias", T, 0.0, 0.02)

    llava._finish(w)
    return cfg


def write_qwen3vl_pair(outdir: str | Path, seed: int = 0, weights: str = "f32") -> tuple[Path, Path]:
    return llava.write_model_pair(outdir, QWEN3VL_TEXT_FILE, QWEN3VL_MMPROJ_FILE, write_qwen3vl_text_model,
                                  write_qwen3vl_mmproj, seed, weights, n_deepstack=1)


def write_pair(outdir: str | Path, seed: int = 0, weights: str = "f32") -> tuple[Path, Path]:
    return llava.write_model_pair(outdir, TEXT_FILE, MMPROJ_FILE, write_text_model, write_mmproj, seed, weights)


def main(argv: list[str] | None = None) -> int:
    ap = llava.pair_arguments(__doc__)
    ap.add_argument("--qwen3vl", action="store_true", help="also write the Qwen3-VL pair")
    args = ap.parse_args(argv)
    for p in write_pair(args.outdir, args.seed, args.weights):
        print(p)
    if args.qwen3vl:
        for p in write_qwen3vl_pair(args.outdir, args.seed, args.weights):
            print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
