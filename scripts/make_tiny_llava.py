#!/usr/bin/env python3
"""Write a tiny random-weight LLaVA-1.5-shaped model pair for tests.

    python scripts/make_tiny_llava.py OUTDIR [--seed N] [--weights f32|f16]

writes OUTDIR/tiny-llava-text.gguf (general.architecture "llama", SentencePiece-style
vocabulary with byte fallback, so any text tokenizes) and OUTDIR/tiny-llava-mmproj.gguf
(a CLIP vision tower with the LLaVA-1.5 "mlp" projector, as tools/mtmd/clip.cpp loads it).
Nothing is downloaded: the weights come from a seeded NumPy generator, so the same seed
gives byte-identical files.

The text model is written directly in llama.cpp's convention (no Q/K permutation: RoPE
rotates adjacent pairs, LLAMA_ROPE_TYPE_NORM). Head size defaults to 64 so that every
backend's flash attention kernel and q8_0 caches (block size 32) apply.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import gguf

TEXT_FILE = "tiny-llava-text.gguf"
MMPROJ_FILE = "tiny-llava-mmproj.gguf"

# Vicuna v1, as LLaVA-1.5 is prompted ("USER: <image>\n{prompt}\nASSISTANT:"). It renders
# exactly like llama.cpp's built-in "vicuna" template, which llama_chat_apply_template
# detects from this text, so the Jinja and the built-in paths give the same prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}USER: {{ message['content'] }}\n"
    "{% else %}ASSISTANT: {{ message['content'] }}</s>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# Whole-word pieces of the vocabulary (with every "▁" prefix of them, so that the
# SentencePiece bigram merge can reach them). Everything else falls back to characters
# and bytes.
WORDS = (
    "the a an of and in on is are with there this that image picture photo shows "
    "describe detail what color red blue green white black man woman person people "
    "dog cat car table sitting standing street two one small large next to near "
    "front background yes no USER ASSISTANT"
).split()

SPIECE_SPACE = "\u2581"

TOKEN_NORMAL = int(gguf.TokenType.NORMAL)
TOKEN_UNKNOWN = int(gguf.TokenType.UNKNOWN)
TOKEN_CONTROL = int(gguf.TokenType.CONTROL)
TOKEN_BYTE = int(gguf.TokenType.BYTE)


@dataclasses.dataclass(frozen=True)
class TextConfig:
    n_vocab: int
    n_embd: int = 256
    n_head: int = 4
    n_head_kv: int = 2
    n_layer: int = 6
    n_ff: int = 512
    n_ctx: int = 2048
    rope_freq_base: float = 10000.0
    rms_eps: float = 1e-5
    weights: str = "f32"

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    text_n_embd: int
    image_size: int = 56
    patch_size: int = 8
    n_embd: int = 64
    n_head: int = 2
    n_ff: int = 128
    n_layer: int = 3  # the llava graph uses the penultimate layer's output: 2 layers run
    eps: float = 1e-5
    weights: str = "f32"

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def build_vocab(extra_control: Sequence[str] = ()) -> tuple[list[str], list[float], list[int]]:
    """<unk>, <s>, </s>, the 256 byte tokens, printable ASCII and word prefixes; then
    `extra_control` (chat-template and media-marker tokens of other families), as control
    tokens with score 0, so that the text of each is tokenized as that one token."""
    tokens = ["<unk>", "<s>", "</s>"]
    types = [TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [TOKEN_BYTE] * 256
    pieces: list[str] = [SPIECE_SPACE] + [chr(c) for c in range(0x21, 0x7F)]
    for word in WORDS:
        w = SPIECE_SPACE + word
        pieces += [w[:n] for n in range(2, len(w) + 1)]
    seen: set[str] = set()
    for p in pieces:
        if p not in seen:
            seen.add(p)
            tokens.append(p)
            types.append(TOKEN_NORMAL)
    # SentencePiece convention: score = -rank; special and byte tokens score 0.
    scores = [0.0] * 259 + [-float(i) for i in range(len(tokens) - 259)]
    for t in extra_control:
        if t in seen or not t:
            raise ValueError(f"extra control token {t!r} is empty or already in the vocabulary")
        seen.add(t)
        tokens.append(t)
        types.append(TOKEN_CONTROL)
        scores.append(0.0)
    return tokens, scores, types


def _as_weight(a: np.ndarray, weights: str) -> np.ndarray:
    if weights == "f32":
        return a.astype(np.float32)
    if weights == "f16":
        return a.astype(np.float16)
    raise ValueError(f"unsupported weight type {weights!r} (f32 or f16)")


def _file_type(weights: str) -> int:
    return int(gguf.LlamaFileType.ALL_F32 if weights == "f32" else gguf.LlamaFileType.MOSTLY_F16)


def add_tokenizer(w: gguf.GGUFWriter, tokens: list[str], scores: list[float], types: list[int], *,
                  chat_template: str = CHAT_TEMPLATE, eos: int = 2, add_bos: bool = True) -> None:
    """SentencePiece-style ("llama") tokenizer metadata with <unk>=0, <s>=1 and the chat
    template (by default </s>=2 as end of sequence, BOS added, and the LLaVA-1.5 template)."""
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(eos)
    w.add_add_bos_token(add_bos)
    w.add_add_eos_token(False)
    w.add_chat_template(chat_template)


def write_text_model(path: str | Path, seed: int = 0, weights: str = "f32", **dims: int | float) -> TextConfig:
    """Write the LLaMA text model; `dims` overrides TextConfig fields (n_embd, n_layer, ...)."""
    tokens, scores, types = build_vocab()
    cfg = TextConfig(n_vocab=len(tokens), weights=weights, **dims)  # type: ignore[arg-type]
    if cfg.n_embd % cfg.n_head or cfg.n_head % cfg.n_head_kv:
        raise ValueError("n_embd must divide by n_head and n_head by n_head_kv")
    rng = np.random.default_rng(seed)
    hd, E = cfg.head_dim, cfg.n_embd

    def normal(shape: tuple[int, ...], std: float) -> np.ndarray:
        return rng.standard_normal(shape) * std

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llava-text")
    w.add_context_length(cfg.n_ctx)
    w.add_embedding_length(E)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.n_ff)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_head_kv)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(cfg.rope_freq_base)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    w.add_vocab_size(cfg.n_vocab)
    w.add_file_type(_file_type(weights))

    add_tokenizer(w, tokens, scores, types)

    # Arrays are (out, in) in NumPy order = ggml ne [in, out], which is what llama.cpp
    # loads (e.g. attn_q ne [n_embd, n_head*head_dim]). Norm weights stay f32.
    # Scales: unit-RMS residual stream; q/k large enough that attention logits have a
    # standard deviation of about 2-3 (attention far from uniform, entropies vary);
    # the output head gives logits of std ~3 so greedy decoding does not lock onto one token.
    def mat(name: str, shape: tuple[int, int], std: float) -> None:
        w.add_tensor(name, _as_weight(normal(shape, std), weights))

    def norm(name: str, n: int) -> None:
        w.add_tensor(name, (1.0 + normal((n,), 0.1)).astype(np.float32))

    mat("token_embd.weight", (cfg.n_vocab, E), 1.0)
    qk_std = 1.6 / np.sqrt(E)
    for il in range(cfg.n_layer):
        p = f"blk.{il}."
        norm(p + "attn_norm.weight", E)
        mat(p + "attn_q.weight", (cfg.n_head * hd, E), qk_std)
        mat(p + "attn_k.weight", (cfg.n_head_kv * hd, E), qk_std)
        mat(p + "attn_v.weight", (cfg.n_head_kv * hd, E), 1.0 / np.sqrt(E))
        mat(p + "attn_output.weight", (E, cfg.n_head * hd), 0.7 / np.sqrt(cfg.n_head * hd))
        norm(p + "ffn_norm.weight", E)
        mat(p + "ffn_gate.weight", (cfg.n_ff, E), 1.0 / np.sqrt(E))
        mat(p + "ffn_up.weight", (cfg.n_ff, E), 1.0 / np.sqrt(E))
        mat(p + "ffn_down.weight", (E, cfg.n_ff), 0.7 / np.sqrt(cfg.n_ff))
    norm("output_norm.weight", E)
    mat("output.weight", (cfg.n_vocab, E), 3.0 / np.sqrt(E))

    _finish(w)
    return cfg


def write_mmproj(path: str | Path, seed: int = 0, text_n_embd: int = 256, weights: str = "f32",
                 **dims: int | float) -> VisionConfig:
    """Write the CLIP vision tower + LLaVA-1.5 MLP projector (mm.0 -> GELU -> mm.2)."""
    cfg = VisionConfig(text_n_embd=text_n_embd, weights=weights, **dims)  # type: ignore[arg-type]
    if cfg.image_size % cfg.patch_size or cfg.n_embd % cfg.n_head or cfg.n_ff == cfg.n_embd:
        # n_ff == n_embd would make clip.cpp take ffn_up/ffn_down for legacy swapped names
        raise ValueError("bad vision dimensions")
    rng = np.random.default_rng(seed + 0x5EED)
    E, T = cfg.n_embd, cfg.text_n_embd

    def normal(shape: tuple[int, ...], std: float) -> np.ndarray:
        return rng.standard_normal(shape) * std

    w = gguf.GGUFWriter(str(path), "clip")
    w.add_name("tiny-llava-mmproj")
    w.add_file_type(_file_type(weights))
    w.add_bool("clip.has_vision_encoder", True)
    w.add_bool("clip.has_text_encoder", False)
    w.add_bool("clip.has_llava_projector", True)
    w.add_string("clip.projector_type", "mlp")
    w.add_bool("clip.use_gelu", False)  # CLIP ViT-L uses quick_gelu
    w.add_uint32("clip.vision.image_size", cfg.image_size)
    w.add_uint32("clip.vision.patch_size", cfg.patch_size)
    w.add_uint32("clip.vision.embedding_length", E)
    w.add_uint32("clip.vision.feed_forward_length", cfg.n_ff)
    w.add_uint32("clip.vision.projection_dim", T)
    w.add_uint32("clip.vision.attention.head_count", cfg.n_head)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", cfg.eps)
    w.add_uint32("clip.vision.block_count", cfg.n_layer)
    w.add_array("clip.vision.image_mean", [0.48145466, 0.4578275, 0.40821073])
    w.add_array("clip.vision.image_std", [0.26862954, 0.26130258, 0.27577711])

    def mat(name: str, shape: tuple[int, ...], std: float) -> None:
        w.add_tensor(name, _as_weight(normal(shape, std), weights))

    def vec(name: str, n: int, mean: float, std: float) -> None:
        w.add_tensor(name, (mean + normal((n,), std)).astype(np.float32))

    # conv kernel ne [KW, KH, C, E] = NumPy (E, C, KH, KW)
    k_std = 1.0 / np.sqrt(3 * cfg.patch_size**2)
    mat("v.patch_embd.weight", (E, 3, cfg.patch_size, cfg.patch_size), k_std)
    vec("v.class_embd", E, 0.0, 1.0)
    mat("v.position_embd.weight", (cfg.n_patches + 1, E), 0.5)
    vec("v.pre_ln.weight", E, 1.0, 0.1)
    vec("v.pre_ln.bias", E, 0.0, 0.1)
    add_vit_blocks(mat, vec, E, cfg.n_ff, cfg.n_layer)
    # Projector output scaled like the text model's token embeddings (RMS ~1).
    mat("mm.0.weight", (T, E), 1.0 / np.sqrt(E))
    vec("mm.0.bias", T, 0.0, 0.02)
    mat("mm.2.weight", (T, T), 1.5 / np.sqrt(T))
    vec("mm.2.bias", T, 0.0, 0.02)

    _finish(w)
    return cfg


def add_vit_blocks(mat: Callable[[str, tuple[int, ...], float], None],
                   vec: Callable[[str, int, float, float], None], E: int, n_ff: int, n_layer: int) -> None:
    """The pre-norm transformer blocks of a CLIP/SigLIP-style vision tower (v.blk.N.*: LayerNorm
    with bias, biased Q/K/V/out projections, a biased two-layer FFN), as clip.cpp loads them.
    `mat(name, shape, std)` and `vec(name, n, mean, std)` write one random tensor each."""
    for il in range(n_layer):
        p = f"v.blk.{il}."
        vec(p + "ln1.weight", E, 1.0, 0.1)
        vec(p + "ln1.bias", E, 0.0, 0.1)
        for t in ("attn_q", "attn_k", "attn_v", "attn_out"):
            mat(p + t + ".weight", (E, E), 1.0 / np.sqrt(E))
            vec(p + t + ".bias", E, 0.0, 0.02)
        vec(p + "ln2.weight", E, 1.0, 0.1)
        vec(p + "ln2.bias", E, 0.0, 0.1)
        mat(p + "ffn_up.weight", (n_ff, E), 1.0 / np.sqrt(E))
        vec(p + "ffn_up.bias", n_ff, 0.0, 0.02)
        mat(p + "ffn_down.weight", (E, n_ff), 1.0 / np.sqrt(n_ff))
        vec(p + "ffn_down.bias", E, 0.0, 0.02)


def _finish(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_test_image(path: str | Path, size: tuple[int, int] = (64, 48), seed: int = 0) -> None:
    """A small deterministic RGB image (gradient + noise); format from the suffix (.png, .jpg)."""
    from PIL import Image  # only needed by callers that want images

    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / max(w - 1, 1), yy * 255 / max(h - 1, 1), (xx + yy) % 256], -1)
    img = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    Image.fromarray(img, "RGB").save(str(path))


def write_model_pair(outdir: str | Path, text_file: str, mmproj_file: str, write_text: Any, write_projector: Any,
                     seed: int = 0, weights: str = "f32", **text_dims: Any) -> tuple[Path, Path]:
    """A text model and its mmproj in outdir; the projector's input width follows the text
    model's (every family's writer pair goes through here)."""
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    text = write_text(out / text_file, seed=seed, weights=weights, **text_dims)
    write_projector(out / mmproj_file, seed=seed, text_n_embd=text.n_embd, weights=weights)
    return out / text_file, out / mmproj_file


def write_pair(outdir: str | Path, seed: int = 0, weights: str = "f32") -> tuple[Path, Path]:
    return write_model_pair(outdir, TEXT_FILE, MMPROJ_FILE, write_text_model, write_mmproj, seed, weights)


def pair_arguments(doc: str) -> argparse.ArgumentParser:
    """The command line every fixture writer takes: OUTDIR [--seed N] [--weights f32|f16]."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("outdir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weights", choices=("f32", "f16"), default="f32")
    return ap


def pair_main(doc: str, write: Any, argv: list[str] | None = None) -> int:
    args = pair_arguments(doc).parse_args(argv)
    for p in write(args.outdir, args.seed, args.weights):
        print(p)
    return 0


def main(argv: list[str] | None = None) -> int:
    return pair_main(__doc__, write_pair, argv)


if __name__ == "__main__":
    sys.exit(main())
