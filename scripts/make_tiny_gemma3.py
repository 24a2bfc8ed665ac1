#!/usr/bin/env python3
"""Write a tiny random-weight Gemma-3-shaped model pair for tests.

    python scripts/make_tiny_gemma3.py OUTDIR [--seed N] [--weights f32|f16]

writes OUTDIR/tiny-gemma3-text.gguf (general.architecture "gemma3": interleaved sliding-window
attention (iSWA) with a window of 8 tokens, RMS-normed Q and K, pre- and post-norms around
attention and FFN, GELU FFN, input embeddings scaled by sqrt(n_embd), tied output; the
SentencePiece-style vocabulary of make_tiny_llava.py plus Gemma's turn and image control
tokens, and a Gemma-3-like chat template) and OUTDIR/tiny-gemma3-mmproj.gguf (a SigLIP vision
tower with the "gemma3" projector: average pooling of the patch grid, soft-embedding RMSNorm
and mm.input_projection, as tools/mtmd/clip.cpp loads it). Seeded NumPy weights: the same seed
gives byte-identical files.

As convert_hf_to_gguf.py does for Gemma 3, the norm weights are stored as llama.cpp applies
them (x / rms(x) * w; the converter adds Gemma3RMSNorm's 1 to the checkpoint's weights).
Sliding-window pattern 2 (real Gemma 3: 6, five local layers to one global): layers 0, 2, 4
slide, 1, 3, 5 are global, so every range of two or more layers holds both kinds, the
default KVSmooth range [3, 5) included. RoPE NEOX with base 1e6 on global and 1e4 on
sliding layers, as Gemma 3.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import gguf
import numpy as np

import make_tiny_llava as llava

TEXT_FILE = "tiny-gemma3-text.gguf"
MMPROJ_FILE = "tiny-gemma3-mmproj.gguf"
ARCH = "gemma3"

CONTROL_TOKENS = ("<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>",
                  "<image_soft_token>")

# Gemma 3's template, shortened: BOS, a system message folded into the first user turn,
# "model" for the assistant, an image part rendered as <start_of_image>. llama.cpp detects it
# as "gemma" (it contains <start_of_turn>) where Jinja is off (llama-mtmd-cli).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}"
    "{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] | trim }}"
    "{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' or item['type'] == 'image_url' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


@dataclasses.dataclass(frozen=True)
class TextConfig:
    n_vocab: int
    n_embd: int = 256
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int = 64
    n_layer: int = 6
    n_ff: int = 512
    n_ctx: int = 4096
    sliding_window: int = 8
    swa_pattern: int = 2
    rope_freq_base: float = 1e6
    rope_freq_base_swa: float = 1e4
    final_logit_softcapping: float = 0.0  # 0: none (Gemma 3's checkpoints have none; Gemma 2 had 30)
    rms_eps: float = 1e-6
    weights: str = "f32"

    def is_swa(self, il: int) -> bool:
        """llama_hparams::set_swa_pattern(n_pattern), dense last: il % n < n - 1 slides."""
        n = self.swa_pattern
        return n == 0 or il % n < n - 1


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    text_n_embd: int
    image_size: int = 32
    patch_size: int = 4        # 8x8 patches, average-pooled 2x2: 16 image tokens
    scale_factor: int = 2
    n_embd: int = 64
    n_head: int = 2
    n_ff: int = 128
    n_layer: int = 2
    eps: float = 1e-6
    weights: str = "f32"


def vocab() -> tuple[list[str], list[float], list[int]]:
    return llava.build_vocab(CONTROL_TOKENS)


def write_text_model(path: str | Path, seed: int = 0, weights: str = "f32", **dims) -> TextConfig:
    """Write the Gemma 3 text model; `dims` overrides TextConfig fields."""
    tokens, scores, types = vocab()
    cfg = TextConfig(n_vocab=len(tokens), weights=weights, **dims)
    if cfg.n_head % cfg.n_head_kv or cfg.sliding_window < 2:
        raise ValueError("n_head must divide by n_head_kv, and the window must be >= 2")
    rng = np.random.default_rng(seed)
    hd, E, H, Hkv = cfg.head_dim, cfg.n_embd, cfg.n_head, cfg.n_head_kv

    def normal(shape: tuple[int, ...], std: float) -> np.ndarray:
        return rng.standard_normal(shape) * std

    w = gguf.GGUFWriter(str(path), ARCH)
    w.add_name("tiny-gemma3-text")
    w.add_context_length(cfg.n_ctx)
    w.add_embedding_length(E)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.n_ff)
    w.add_head_count(H)
    w.add_head_count_kv(Hkv)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_freq_base(cfg.rope_freq_base)
    w.add_float32(f"{ARCH}.rope.freq_base_swa", cfg.rope_freq_base_swa)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    if cfg.final_logit_softcapping:
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    w.add_sliding_window(cfg.sliding_window)
    w.add_uint32(f"{ARCH}.attention.sliding_window_pattern", cfg.swa_pattern)
    w.add_vocab_size(cfg.n_vocab)
    w.add_file_type(llava._file_type(weights))
    llava.add_tokenizer(w, tokens, scores, types, chat_template=CHAT_TEMPLATE,
                        eos=tokens.index("<end_of_turn>"), add_bos=True)

    def mat(name: str, shape: tuple[int, int], std: float) -> None:
        w.add_tensor(name, llava._as_weight(normal(shape, std), weights))

    def vec(name: str, n: int, mean: float, std: float) -> None:
        w.add_tensor(name, (mean + normal((n,), std)).astype(np.float32))

    # Tied embeddings: token_embd is also the output head. Its std 3/sqrt(E) gives output logits
    # of std ~3 from the unit-RMS final norm, and input embeddings of RMS 3 after the sqrt(E)
    # scale. Q and K are RMS-normed per head: their norm weights (~1.6) set the attention logits'
    # std to ~2.5 (attention far from uniform, entropies vary). The post-norms set the RMS of
    # what each block adds to the residual stream.
    mat("token_embd.weight", (cfg.n_vocab, E), 3.0 / np.sqrt(E))
    for il in range(cfg.n_layer):
        p = f"blk.{il}."
        vec(p + "attn_norm.weight", E, 1.0, 0.1)
        mat(p + "attn_q.weight", (H * hd, E), 1.0 / np.sqrt(E))
        mat(p + "attn_k.weight", (Hkv * hd, E), 1.0 / np.sqrt(E))
        mat(p + "attn_v.weight", (Hkv * hd, E), 1.0 / np.sqrt(E))
        vec(p + "attn_q_norm.weight", hd, 1.6, 0.2)
        vec(p + "attn_k_norm.weight", hd, 1.6, 0.2)
        mat(p + "attn_output.weight", (E, H * hd), 1.0 / np.sqrt(H * hd))
        vec(p + "post_attention_norm.weight", E, 1.0, 0.1)
        vec(p + "ffn_norm.weight", E, 1.0, 0.1)
        mat(p + "ffn_gate.weight", (cfg.n_ff, E), 1.0 / np.sqrt(E))
        mat(p + "ffn_up.weight", (cfg.n_ff, E), 1.0 / np.sqrt(E))
        mat(p + "ffn_down.weight", (E, cfg.n_ff), 1.0 / np.sqrt(cfg.n_ff))
        vec(p + "post_ffw_norm.weight", E, 1.0, 0.1)
    vec("output_norm.weight", E, 1.0, 0.1)

    llava._finish(w)
    return cfg


def write_mmproj(path: str | Path, seed: int = 0, text_n_embd: int = 256, weights: str = "f32",
                 **dims) -> VisionConfig:
    """Write the SigLIP vision tower + "gemma3" projector."""
    cfg = VisionConfig(text_n_embd=text_n_embd, weights=weights, **dims)
    side = cfg.image_size // cfg.patch_size
    if (cfg.image_size % cfg.patch_size or side % cfg.scale_factor or cfg.n_embd % cfg.n_head
            or cfg.n_ff == cfg.n_embd):
        raise ValueError("bad vision dimensions")
    rng = np.random.default_rng(seed + 0x5EED)
    E, T, P = cfg.n_embd, cfg.text_n_embd, cfg.patch_size

    def normal(shape: tuple[int, ...], std: float) -> np.ndarray:
        return rng.standard_normal(shape) * std

    w = gguf.GGUFWriter(str(path), "clip")
    w.add_name("tiny-gemma3-mmproj")
    w.add_file_type(llava._file_type(weights))
    w.add_bool("clip.has_vision_encoder", True)
    w.add_bool("clip.has_text_encoder", False)
    w.add_string("clip.projector_type", "gemma3")
    w.add_bool("clip.use_gelu", True)
    w.add_uint32("clip.vision.image_size", cfg.image_size)
    w.add_uint32("clip.vision.patch_size", P)
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

    mat("v.patch_embd.weight", (E, 3, P, P), 1.0 / np.sqrt(3 * P * P))
    vec("v.patch_embd.bias", E, 0.0, 0.02)
    mat("v.position_embd.weight", (side * side, E), 0.5)
    llava.add_vit_blocks(mat, vec, E, cfg.n_ff, cfg.n_layer)
    vec("v.post_ln.weight", E, 1.0, 0.1)
    vec("v.post_ln.bias", E, 0.0, 0.1)
    # pooled tokens -> RMSNorm(soft_emb_norm) -> input_projection (ne [T, E]: NumPy (E, T))
    vec("mm.soft_emb_norm.weight", E, 1.0, 0.1)
    mat("mm.input_projection.weight", (E, T), 3.0 / np.sqrt(E))

    llava._finish(w)
    return cfg


def write_pair(outdir: str | Path, seed: int = 0, weights: str = "f32") -> tuple[Path, Path]:
    return llava.write_model_pair(outdir, TEXT_FILE, MMPROJ_FILE, write_text_model, write_mmproj, seed, weights)


def main(argv: list[str] | None = None) -> int:
    return llava.pair_main(__doc__, write_pair, argv)


if __name__ == "__main__":
    sys.exit(main())
