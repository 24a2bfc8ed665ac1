#!/usr/bin/env python3
"""What KVSmooth costs, measured side by side with it off, in one process.

    python scripts/bench.py                      # CPU: 1B shape full matrix, 7B headline
    python scripts/bench.py --quick --out DIR    # a tiny shape, every code path, seconds
    python scripts/bench.py --unpatched-lib /path/to/pristine/build/bin   # + KVSmooth off vs unpatched
    python scripts/bench.py --gpu                # the same with every layer on the GPU
    python scripts/bench.py --from-json docs/benchmarks.json --notes NOTES.md   # rewrite the report

Models are random-weight GGUFs of real shapes (LLaMA-2-7B / LLaVA-1.5-7B text: 32 layers,
4096 wide, Q4_0 with a Q6_K output head as llama-quantize makes it; a TinyLlama-1.1B shape
with grouped-query attention), written once and cached in $PYKVSMOOTH_CACHE_DIR or
~/.cache/pykvsmooth/bench. A decode step reads the same bytes and does the same arithmetic
whatever the weights are, so the cost per token is that of the real model.

Each measurement runs in a worker process (one libllama per process): one model load,
one context per (flash attention, KV cache type), and KVSmooth toggled on that context
between repetitions in a rotating order (off, adaptive, fixed; adaptive, fixed, off; ...),
so that drift of the machine falls on every mode alike. Decode at context N: the cache is
filled to N once, then each repetition runs one untimed step (the graph of the new mode
is built) and D timed single-token steps with output, and llama_memory_seq_rm takes the
timed tokens out again so every repetition starts at N.

Writes OUT/benchmarks.md (the table), OUT/benchmarks.json (every raw figure) and
OUT/benchmarks-decode.png (decode time per token vs context, when matplotlib is there).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

SCRIPT_DIR = Path(__file__).resolve().parent
REPO = SCRIPT_DIR.parent

MODES = ("off", "adaptive", "fixed")
# also measurable (--modes): adaptive KVSmooth computed from stock ggml ops (impl composed)
EXTRA_MODES = ("composed",)
GENERATOR_VERSION = 1  # bump when the model files change

# ggml types (ggml.h) and their storage: (elements per block, bytes per block)
GGML_F32, GGML_F16, GGML_Q4_0, GGML_Q8_0, GGML_Q6_K = 0, 1, 2, 8, 14
TYPE_BLOCK = {GGML_F32: (1, 4), GGML_F16: (1, 2), GGML_Q4_0: (32, 18), GGML_Q8_0: (32, 34), GGML_Q6_K: (256, 210)}
CACHE_TYPES = {"f16": GGML_F16, "q8_0": GGML_Q8_0}

# KVSmooth defaults (llama.h): smoothed layers [3, n_layer - 1), queue M = 15
LAYER_START = 3
QUEUE = 15


# ----------------------------------------------------------------------------------------
# model shapes and the random-weight GGUF writer
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    label: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int = 4096

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_embd_kv(self) -> int:
        return self.head_dim * self.n_head_kv

    @property
    def smoothed_layers(self) -> int:
        return (self.n_layer - 1) - LAYER_START

    def tensors(self) -> list[tuple[str, tuple[int, ...], int]]:
        """(name, ggml ne, ggml type) in file order; Q4_0 weights, Q6_K output, f32 norms."""
        E, F, KV = self.n_embd, self.n_ff, self.n_embd_kv
        out: list[tuple[str, tuple[int, ...], int]] = [("token_embd.weight", (E, self.n_vocab), GGML_Q4_0)]
        for il in range(self.n_layer):
            p = f"blk.{il}."
            out += [
                (p + "attn_norm.weight", (E,), GGML_F32),
                (p + "attn_q.weight", (E, E), GGML_Q4_0),
                (p + "attn_k.weight", (E, KV), GGML_Q4_0),
                (p + "attn_v.weight", (E, KV), GGML_Q4_0),
                (p + "attn_output.weight", (E, E), GGML_Q4_0),
                (p + "ffn_norm.weight", (E,), GGML_F32),
                (p + "ffn_gate.weight", (E, F), GGML_Q4_0),
                (p + "ffn_up.weight", (E, F), GGML_Q4_0),
                (p + "ffn_down.weight", (F, E), GGML_Q4_0),
            ]
        out += [("output_norm.weight", (E,), GGML_F32), ("output.weight", (E, self.n_vocab), GGML_Q6_K)]
        return out

    def file_name(self) -> str:
        key = json.dumps([dataclasses.asdict(self), GENERATOR_VERSION], sort_keys=True)
        return f"bench-{self.name}-{hashlib.sha256(key.encode()).hexdigest()[:10]}.gguf"


SHAPES = {
    "7b": Shape("7b", "LLaMA-2-7B / LLaVA-1.5-7B text (32 layers, 4096 wide, 32 heads), Q4_0",
                n_layer=32, n_embd=4096, n_head=32, n_head_kv=32, n_ff=11008, n_vocab=32000),
    "1b": Shape("1b", "TinyLlama-1.1B (22 layers, 2048 wide, 32 heads, 4 KV heads), Q4_0",
                n_layer=22, n_embd=2048, n_head=32, n_head_kv=4, n_ff=5632, n_vocab=32000),
    # small enough for `make test`; 6 layers so that the default range [3, 5) smooths 2
    "quick": Shape("quick", "quick test shape (6 layers, 256 wide, 4 heads, 2 KV heads), Q4_0",
                   n_layer=6, n_embd=256, n_head=4, n_head_kv=2, n_ff=512, n_vocab=512, n_ctx_train=512),
}


def tensor_nbytes(ne: tuple[int, ...], ggml_type: int) -> int:
    blk, size = TYPE_BLOCK[ggml_type]
    assert ne[0] % blk == 0, (ne, ggml_type)
    return int(np.prod(ne)) // blk * size


def _random_tensor(rng: np.random.Generator, ne: tuple[int, ...], ggml_type: int, std: float) -> np.ndarray:
    """Bytes of a tensor whose dequantized values have about the given standard deviation."""
    n_in = ne[0]
    rows = int(np.prod(ne[1:])) if len(ne) > 1 else 1
    if ggml_type == GGML_F32:
        return (1.0 + 0.1 * rng.standard_normal(ne[::-1])).astype(np.float32)
    blk, size = TYPE_BLOCK[ggml_type]
    n_blocks = rows * (n_in // blk)
    data = np.frombuffer(rng.bytes(n_blocks * size), dtype=np.uint8).reshape(n_blocks, size).copy()
    if ggml_type == GGML_Q4_0:
        # d (f16) first, then 16 bytes of nibbles: values (q - 8)*d, q uniform: std 4.6*d
        data[:, 0:2] = np.full(n_blocks, std / 4.61, dtype=np.float16).view(np.uint8).reshape(n_blocks, 2)
    elif ggml_type == GGML_Q6_K:
        # ql[128], qh[64], int8 scales[16], d (f16): values d*scale*(q - 32), q uniform in 0..63
        data[:, 192:208] = rng.integers(4, 13, size=(n_blocks, 16), dtype=np.uint8)
        data[:, 208:210] = np.full(n_blocks, std / (18.5 * 8.0), dtype=np.float16).view(np.uint8).reshape(n_blocks, 2)
    else:
        raise ValueError(f"no generator for ggml type {ggml_type}")
    return data.reshape(rows, (n_in // blk) * size)


def write_model(shape: Shape, path: Path, seed: int = 0) -> None:
    """Stream a random-weight GGUF of the shape to path (one tensor in memory at a time)."""
    import gguf

    sys.path.insert(0, str(SCRIPT_DIR))
    from make_tiny_llava import add_tokenizer, build_vocab

    tokens, scores, types = build_vocab()
    for i in range(len(tokens), shape.n_vocab):  # filler pieces up to the real vocabulary size
        tokens.append(f"<bench_{i}>")
        scores.append(-float(i))
        types.append(int(gguf.TokenType.NORMAL))
    tokens, scores, types = tokens[: shape.n_vocab], scores[: shape.n_vocab], types[: shape.n_vocab]

    tmp = path.with_suffix(".tmp")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(f"pykvsmooth-bench-{shape.name}")
    w.add_context_length(shape.n_ctx_train)
    w.add_embedding_length(shape.n_embd)
    w.add_block_count(shape.n_layer)
    w.add_feed_forward_length(shape.n_ff)
    w.add_head_count(shape.n_head)
    w.add_head_count_kv(shape.n_head_kv)
    w.add_rope_dimension_count(shape.head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(shape.n_vocab)
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q4_0))
    add_tokenizer(w, tokens, scores, types)

    specs = shape.tensors()
    for name, ne, t in specs:
        nbytes = tensor_nbytes(ne, t)
        if t == GGML_F32:
            w.add_tensor_info(name, ne[::-1], np.dtype(np.float32), nbytes)
        else:
            byte_shape = (*ne[1:][::-1], nbytes // int(np.prod(ne[1:])))
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=gguf.GGMLQuantizationType(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for name, ne, t in specs:
        std = 1.0 / np.sqrt(ne[0])
        if name == "token_embd.weight":
            std = 1.0
        elif name.endswith(("attn_q.weight", "attn_k.weight")):
            std *= 1.6  # attention logits of std ~2.5: far from uniform, entropies vary
        elif name == "output.weight":
            std *= 3.0
        w.write_tensor_data(_random_tensor(rng, ne, t, std))
    w.close()
    tmp.replace(path)


def cache_dir() -> Path:
    env = os.environ.get("PYKVSMOOTH_CACHE_DIR")
    base = Path(env) if env else Path.home() / ".cache" / "pykvsmooth"
    return base / "bench"


def ensure_model(shape: Shape, log: Any = print) -> Path:
    path = cache_dir() / shape.file_name()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        size = sum(tensor_nbytes(ne, t) for _, ne, t in shape.tensors())
        log(f"writing {path} ({size / 2**30:.2f} GiB of random weights, once)")
        t0 = time.time()
        write_model(shape, path)
        log(f"  done in {time.time() - t0:.0f} s")
    return path


# ----------------------------------------------------------------------------------------
# bytes a decode step moves, and what the op adds (analytic, per token)
# ----------------------------------------------------------------------------------------

def cache_row_bytes(n: int, ggml_type: int) -> float:
    blk, size = TYPE_BLOCK[ggml_type]
    return n / blk * size


def step_bytes(shape: Shape, n_kv: int, fa: bool, type_k: int, type_v: int, gpu: bool = False) -> dict[str, float]:
    """Bytes one single-token decode step reads (weights, KV cache, scores) and the op adds."""
    weights = sum(tensor_nbytes(ne, t) for name, ne, t in shape.tensors() if name != "token_embd.weight")
    weights += tensor_nbytes((shape.n_embd, 1), GGML_Q4_0)  # one embedding row
    k_layer = n_kv * cache_row_bytes(shape.n_embd_kv, type_k)
    v_layer = n_kv * cache_row_bytes(shape.n_embd_kv, type_v)
    kv = shape.n_layer * (k_layer + v_layer)
    probs_layer = shape.n_head * n_kv * 4.0
    # flash attention off: kq written, soft_max reads and writes it, kqv reads it
    scores = 0.0 if fa else shape.n_layer * 4 * probs_layer
    if fa and gpu:
        op = shape.smoothed_layers * k_layer  # the op recomputes the scores from the K cache
    elif fa:
        op = shape.smoothed_layers * shape.n_head * 4.0  # the CPU kernel's row entropies (patch 0013)
    else:
        op = shape.smoothed_layers * probs_layer  # the probabilities are read once more
    # the blend: two rows read, one written, for K and V
    row = cache_row_bytes(shape.n_embd_kv, type_k) + cache_row_bytes(shape.n_embd_kv, type_v)
    op += shape.smoothed_layers * 3 * row
    return {"weights": float(weights), "kv": float(kv), "scores": float(scores),
            "step": float(weights + kv + scores), "op": float(op)}


def state_bytes(shape: Shape, n_seq: int = 1) -> int:
    return shape.smoothed_layers * (1 + QUEUE) * n_seq * 4


# ----------------------------------------------------------------------------------------
# worker: runs in its own process, one libllama
# ----------------------------------------------------------------------------------------

class Worker:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.shape = SHAPES[spec["shape"]]
        if spec.get("lib_dir"):
            os.environ["PYKVSMOOTH_LIB_DIR"] = spec["lib_dir"]
        import pykvsmooth  # noqa: F401  (points llama_cpp at the libraries; before llama_cpp)
        import llama_cpp.llama_cpp as L

        self.L = L
        self.lib_dir = str(pykvsmooth.lib_dir())
        self.patched = hasattr(L._lib, "llama_kvsmooth_set")
        self.capi: Any = None
        if self.patched:
            from pykvsmooth import _capi

            self.capi = _capi
        self.log_text: list[str] = []
        self._log_cb = L.llama_log_callback(self._on_log)
        L.llama_log_set(self._log_cb, ctypes.c_void_p(0))
        L.llama_backend_init()
        self.n_threads = int(spec["threads"])
        self.rng = np.random.default_rng(1234)

    def _on_log(self, level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        s = text.decode(errors="replace")
        self.log_text.append(s)
        if self.spec.get("verbose"):
            sys.stderr.write(s)

    # -- helpers ---------------------------------------------------------------------------

    def device(self) -> str:
        """The compute devices, as ggml names them."""
        ggml = ctypes.CDLL(str(Path(self.lib_dir) / "libggml.so"))
        ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
        ggml.ggml_backend_dev_get.restype = ctypes.c_void_p
        ggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
        ggml.ggml_backend_dev_description.restype = ctypes.c_char_p
        ggml.ggml_backend_dev_description.argtypes = [ctypes.c_void_p]
        ggml.ggml_backend_dev_type.restype = ctypes.c_int
        ggml.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
        names = []
        for i in range(ggml.ggml_backend_dev_count()):
            dev = ggml.ggml_backend_dev_get(i)
            kind = {0: "CPU", 1: "GPU", 2: "iGPU", 3: "ACCEL"}.get(ggml.ggml_backend_dev_type(dev), "?")
            names.append(f"{kind}: {ggml.ggml_backend_dev_description(dev).decode()}")
        return "; ".join(names)

    def cpu_extra_bufts(self) -> dict[str, int]:
        """The CPU backend's extra weight buffer types by name (e.g. AMX, CPU_REPACK)."""
        ggml = ctypes.CDLL(str(Path(self.lib_dir) / "libggml.so"))
        ggml.ggml_backend_dev_by_type.restype = ctypes.c_void_p
        ggml.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
        ggml.ggml_backend_dev_backend_reg.restype = ctypes.c_void_p
        ggml.ggml_backend_dev_backend_reg.argtypes = [ctypes.c_void_p]
        ggml.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
        ggml.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        ggml.ggml_backend_buft_name.restype = ctypes.c_char_p
        ggml.ggml_backend_buft_name.argtypes = [ctypes.c_void_p]
        dev = ggml.ggml_backend_dev_by_type(0)  # GGML_BACKEND_DEVICE_TYPE_CPU
        fn_addr = ggml.ggml_backend_reg_get_proc_address(ggml.ggml_backend_dev_backend_reg(dev),
                                                         b"ggml_backend_dev_get_extra_bufts")
        if not fn_addr:
            return {}
        fn = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(fn_addr)
        arr = fn(dev)
        out: dict[str, int] = {}
        i = 0
        while arr and arr[i]:
            out[ggml.ggml_backend_buft_name(arr[i]).decode()] = arr[i]
            i += 1
        return out

    def load_model(self, path: str) -> Any:
        L = self.L
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = 999 if self.spec.get("gpu") else 0
        self.weights_note = "ggml defaults"
        bufts = {} if self.spec.get("gpu") else self.cpu_extra_bufts()
        if "AMX" in bufts:
            # ggml's AMX matmul crashes on this CPU (llama.cpp issue #20824) and gives wrong Q4_0
            # results (PR #16315): keep the weights out of it, and put the layers' Q4_0 matrices in
            # the repacked layout that every other AVX2/AVX-512 machine uses.
            mp.use_extra_bufts = False
            if "CPU_REPACK" in bufts:
                self._overrides = (BuftOverride * 2)(
                    BuftOverride(rb"blk\.\d+\.(attn_(q|k|v|output)|ffn_(gate|up|down))\.weight", bufts["CPU_REPACK"]),
                    BuftOverride(None, None))
                mp.tensor_buft_overrides = ctypes.cast(self._overrides, ctypes.c_void_p)
                self.weights_note = "AMX off (ggml's AMX matmul segfaults here); layer matrices in CPU_REPACK"
            else:
                self.weights_note = "AMX off (ggml's AMX matmul segfaults here); no repacking"
        model = L.llama_model_load_from_file(path.encode(), mp)
        if not model:
            raise RuntimeError(f"could not load {path}")
        return model

    def new_context(self, model: Any, fa: bool, cache: str, n_ctx: int, cb_eval: Any = None) -> Any:
        L = self.L
        cp = L.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = 2048
        cp.n_ubatch = 512
        cp.n_seq_max = 1
        cp.n_threads = cp.n_threads_batch = self.n_threads
        cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_ENABLED if fa else L.LLAMA_FLASH_ATTN_TYPE_DISABLED
        t_k, t_v = cache_types(cache, fa)
        cp.type_k, cp.type_v = t_k, t_v
        cp.no_perf = True
        if cb_eval is not None:
            cp.cb_eval = cb_eval
            cp.cb_eval_user_data = None
        ctx = L.llama_init_from_model(model, cp)
        if not ctx:
            raise RuntimeError(f"could not create a context (flash attention {fa}, cache {cache})")
        return ctx

    def set_mode(self, ctx: Any, mode: str) -> None:
        if mode == "off":
            if self.patched:
                self.capi.llama_kvsmooth_disable(ctx)
            return
        if not self.patched:
            raise RuntimeError("this libllama has no KVSmooth")
        p = self.capi.llama_kvsmooth_default_params()
        capi = self.capi
        p.mode = {"adaptive": capi.LLAMA_KVSMOOTH_MODE_ADAPTIVE, "fixed": capi.LLAMA_KVSMOOTH_MODE_FIXED,
                  "composed": capi.LLAMA_KVSMOOTH_MODE_ADAPTIVE}[mode]
        if mode == "composed":
            p.impl = capi.LLAMA_KVSMOOTH_IMPL_COMPOSED
        rc = self.capi.llama_kvsmooth_set(ctx, ctypes.byref(p))
        if rc != 0:
            raise RuntimeError(f"llama_kvsmooth_set({mode}) failed: {rc}")

    def tokens(self, n: int) -> list[int]:
        return [int(t) for t in self.rng.integers(3, self.shape.n_vocab, size=n)]

    def decode(self, ctx: Any, batch: Any, tokens: list[int], pos0: int, output_last: bool = True) -> None:
        L = self.L
        for start in range(0, len(tokens), 2048):
            chunk = tokens[start:start + 2048]
            for i, t in enumerate(chunk):
                batch.token[i] = t
                batch.pos[i] = pos0 + start + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 0
            last = start + len(chunk) == len(tokens)
            if output_last and last:
                batch.logits[len(chunk) - 1] = 1
            batch.n_tokens = len(chunk)
            rc = L.llama_decode(ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode failed: {rc}")
        L.llama_synchronize(ctx)

    def compute_buffer_mib(self, since: int) -> float | None:
        """Sum of the compute buffer sizes of the last graph reservation logged after `since`."""
        text = "".join(self.log_text[since:])
        sizes: dict[str, float] = {}
        for line in text.splitlines():
            if "compute buffer size =" in line:
                backend = line.split(":")[1].split("compute")[0].strip()
                sizes[backend] = float(line.split("=")[1].split("MiB")[0])
        return sum(sizes.values()) if sizes else None

    # -- measurements ----------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        L, spec, shape = self.L, self.spec, self.shape
        modes = [m for m in spec["modes"] if self.patched or m == "off"]
        res: dict[str, Any] = {
            "shape": shape.name, "lib_dir": self.lib_dir, "patched": self.patched,
            "build_info": self.capi.build_info() if self.patched else "unpatched llama.cpp",
            "system_info": L.llama_print_system_info().decode(), "device": self.device(),
            "threads": self.n_threads, "modes": modes, "configs": [], "decode_tokens": spec["decode_tokens"],
        }
        model = self.load_model(spec["model"])
        res["model_bytes"] = int(L.llama_model_size(model))
        res["weights_note"] = self.weights_note
        max_ctx = max(spec["contexts"] + [spec["prompt"]])
        n_ctx = (max_ctx + spec["decode_tokens"] + 2 + 255) // 256 * 256
        batch = L.llama_batch_init(2048, 0, 1)
        for cfg in spec["configs"]:
            fa, cache = bool(cfg["fa"]), str(cfg["cache"])
            t_k, t_v = cache_types(cache, fa)
            log_mark = len(self.log_text)
            ctx = self.new_context(model, fa, cache, n_ctx)
            out: dict[str, Any] = {"fa": fa, "cache": cache, "type_k": TYPE_NAMES[t_k], "type_v": TYPE_NAMES[t_v],
                                   "n_ctx": n_ctx, "pp": {}, "decode": {}, "bytes": {}}
            out["compute_buffer_mib_off"] = self.compute_buffer_mib(log_mark)
            mem = L.llama_get_memory(ctx)
            reps = int(spec["reps"])

            def order(rep: int) -> list[str]:
                k = rep % len(modes)
                return modes[k:] + modes[:k]

            # prompt processing: a fresh prompt, output for the last token only
            if spec["prompt"] > 0:
                prompt = self.tokens(spec["prompt"])
                self.set_mode(ctx, "off")
                self.decode(ctx, batch, prompt, 0)  # warm-up
                pp: dict[str, list[float]] = {m: [] for m in modes}
                for rep in range(int(spec.get("pp_reps", reps))):
                    for m in order(rep):
                        L.llama_memory_clear(mem, True)
                        self.set_mode(ctx, m)
                        t0 = time.perf_counter()
                        self.decode(ctx, batch, prompt, 0)
                        pp[m].append(len(prompt) / (time.perf_counter() - t0))
                out["pp"] = pp

            # decode at each context length: fill once, then interleaved repetitions
            L.llama_memory_clear(mem, True)
            self.set_mode(ctx, "off")
            filled = 0
            D = int(spec["decode_tokens"])
            mem_info: dict[str, Any] = {}
            logits_sha = None
            for N in sorted(spec["contexts"]):
                self.decode(ctx, batch, self.tokens(N - filled), filled)
                filled = N
                steps = self.tokens(D + 1)
                dec: dict[str, list[float]] = {m: [] for m in modes}
                for rep in range(reps):
                    for m in order(rep):
                        mark = len(self.log_text)
                        rss0 = current_rss()
                        self.set_mode(ctx, m)
                        self.decode(ctx, batch, steps[:1], N)  # untimed: builds this mode's graph
                        if N == min(spec["contexts"]) and rep == 0 and m == "off":
                            logits = L.llama_get_logits_ith(ctx, -1)
                            arr = np.ctypeslib.as_array(logits, shape=(shape.n_vocab,)).copy()
                            logits_sha = hashlib.sha256(arr.tobytes()).hexdigest()[:16]
                        t0 = time.perf_counter()
                        for i in range(D):
                            self.decode(ctx, batch, steps[1 + i:2 + i], N + 1 + i)
                        dt = time.perf_counter() - t0
                        dec[m].append(1000.0 * dt / D)
                        if rep == 0 and m != "off" and m not in mem_info:
                            mem_info[m] = {"rss_delta_bytes": current_rss() - rss0,
                                           "compute_buffer_mib": self.compute_buffer_mib(mark),
                                           "state_kib_logged": logged_state_kib(self.log_text[mark:])}
                        L.llama_memory_seq_rm(mem, 0, N, -1)
                out["decode"][str(N)] = dec
                out["bytes"][str(N)] = step_bytes(shape, N, fa, t_k, t_v, bool(self.spec.get("gpu")))
            out["memory"] = mem_info
            out["logits_sha_off"] = logits_sha
            self.set_mode(ctx, "off")
            L.llama_free(ctx)
            res["configs"].append(out)
            print(f"  [{shape.name}] {'patched' if self.patched else 'unpatched'} fa={fa} cache={cache} done",
                  file=sys.stderr, flush=True)

        if spec.get("profile") and self.patched:
            res["profile"] = [self.profile(model, pcfg, n_ctx) for pcfg in spec["profile"]]
        L.llama_batch_free(batch)
        L.llama_model_free(model)
        res["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return res

    def profile(self, model: Any, pcfg: dict[str, Any], n_ctx: int) -> dict[str, Any]:
        """ggml per-op timing: the scheduler's eval callback asks for every node, so each node is
        computed on its own and the time between callbacks is that node's (plus a small, equal
        overhead per node). Times are summed per op over D steps, for each mode."""
        L = self.L
        ggml_base = ctypes.CDLL(str(Path(self.lib_dir) / "libggml-base.so"))
        ggml_base.ggml_op_desc.restype = ctypes.c_char_p
        ggml_base.ggml_op_desc.argtypes = [ctypes.c_void_p]
        acc: dict[str, float] = {}
        state = {"t": 0.0, "on": False}

        def cb(t: int, ask: bool, _ud: Any) -> bool:
            if ask:
                return True
            now = time.perf_counter()
            if state["on"]:
                op = ggml_base.ggml_op_desc(t).decode()
                acc[op] = acc.get(op, 0.0) + (now - state["t"])
            state["t"] = now
            return True

        cb_c = L.ggml_backend_sched_eval_callback(cb)
        fa, cache, N = bool(pcfg["fa"]), str(pcfg["cache"]), int(pcfg["context"])
        ctx = self.new_context(model, fa, cache, n_ctx, cb_eval=cb_c)
        batch = L.llama_batch_init(2048, 0, 1)
        mem = L.llama_get_memory(ctx)
        self.decode(ctx, batch, self.tokens(N), 0)
        D = int(pcfg["steps"])
        steps = self.tokens(D + 1)
        result: dict[str, Any] = {"fa": fa, "cache": cache, "context": N, "steps": D, "ops_ms": {}}
        for m in [m for m in ("off", "adaptive") if m in self.spec["modes"]]:
            self.set_mode(ctx, m)
            self.decode(ctx, batch, steps[:1], N)
            acc.clear()
            for i in range(D):
                state["t"], state["on"] = time.perf_counter(), True
                self.decode(ctx, batch, steps[1 + i:2 + i], N + 1 + i)
                state["on"] = False
            result["ops_ms"][m] = {k: 1000.0 * v / D for k, v in sorted(acc.items(), key=lambda kv: -kv[1])}
            L.llama_memory_seq_rm(mem, 0, N, -1)
        self.set_mode(ctx, "off")
        L.llama_batch_free(batch)
        L.llama_free(ctx)
        return result


class BuftOverride(ctypes.Structure):
    """struct llama_model_tensor_buft_override { const char * pattern; ggml_backend_buffer_type_t buft; }"""
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


TYPE_NAMES = {GGML_F16: "f16", GGML_Q8_0: "q8_0", GGML_F32: "f32"}


def cache_types(cache: str, fa: bool) -> tuple[int, int]:
    """(type_k, type_v): llama.cpp quantizes the V cache only with flash attention."""
    t = CACHE_TYPES[cache]
    return t, (t if fa else GGML_F16)


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def logged_state_kib(lines: list[str]) -> float | None:
    for s in "".join(lines).splitlines():
        if "lambda_ref =" in s and "result rows =" in s:  # the queues and the op's result rows
            return float(s.split("result rows =")[1].split("KiB")[0])
    return None


def worker_main(spec_path: str, result_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    res = Worker(spec).run()
    Path(result_path).write_text(json.dumps(res))
    return 0


# ----------------------------------------------------------------------------------------
# orchestration
# ----------------------------------------------------------------------------------------

def run_worker(spec: dict[str, Any], tmp: Path, tag: str) -> dict[str, Any]:
    spec_path, result_path = tmp / f"{tag}.spec.json", tmp / f"{tag}.result.json"
    spec_path.write_text(json.dumps(spec))
    t0 = time.time()
    print(f"[{tag}] {spec['shape']}, lib {spec.get('lib_dir') or 'pykvsmooth'}", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path), str(result_path)],
                   check=True, cwd=str(tmp))
    res: dict[str, Any] = json.loads(result_path.read_text())
    res["wall_s"] = time.time() - t0
    res["tag"] = tag
    print(f"[{tag}] {res['wall_s']:.0f} s", file=sys.stderr, flush=True)
    return res


def plans(args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    """(tag, worker spec) for the patched in-process runs."""
    all_cfgs = [{"fa": fa, "cache": c} for fa in (False, True) for c in ("f16", "q8_0")]
    common = {"threads": args.threads, "gpu": args.gpu, "verbose": args.verbose, "pp_reps": args.pp_reps}
    if args.quick:
        spec = {**common, "pp_reps": 2, "shape": "quick", "configs": all_cfgs, "modes": list(MODES + EXTRA_MODES),
                "contexts": [16, 40], "prompt": 24, "reps": 2, "decode_tokens": 2,
                "profile": [{"fa": False, "cache": "f16", "context": 40, "steps": 2},
                            {"fa": True, "cache": "f16", "context": 40, "steps": 2}]}
        return [("quick", spec)]
    out = []
    for name in args.shapes:
        full = name != "7b" or args.gpu or args.full_7b
        if full:
            spec = {**common, "shape": name, "configs": all_cfgs, "modes": list(args.modes),
                    "contexts": args.contexts, "prompt": args.prompt, "reps": args.reps,
                    "decode_tokens": args.decode_tokens,
                    "profile": [{"fa": fa, "cache": "f16", "context": 1000, "steps": 4} for fa in (False, True)]}
        else:  # the headline only: flash attention off and on, f16 cache, 1,000 tokens, off vs adaptive
            spec = {**common, "shape": name, "configs": [{"fa": False, "cache": "f16"}, {"fa": True, "cache": "f16"}],
                    "modes": ["off", "adaptive"], "contexts": [1000], "prompt": args.prompt_7b,
                    "reps": args.reps_7b, "decode_tokens": args.decode_tokens_7b,
                    "profile": [{"fa": False, "cache": "f16", "context": 1000, "steps": 2}]}
        out.append((name, spec))
    return out


def unpatched_plans(args: argparse.Namespace, patched_lib: str) -> list[tuple[str, dict[str, Any]]]:
    """Alternating processes, KVSmooth off: the unpatched library, then ours, `rounds` times
    (on the smallest shape asked for: each process loads the model and fills its cache)."""
    out = []
    smallest = min(args.shapes, key=lambda s: SHAPES[s].n_layer * SHAPES[s].n_embd)
    for name in (["quick"] if args.quick else [smallest]):
        base = {"threads": args.threads, "gpu": args.gpu, "verbose": args.verbose, "shape": name, "modes": ["off"],
                "pp_reps": 2 if args.quick else args.pp_reps,
                "configs": [{"fa": False, "cache": "f16"}, {"fa": True, "cache": "f16"}]}
        if args.quick:
            base.update(contexts=[40], prompt=24, reps=2, decode_tokens=2)
        elif name == "7b" and not (args.gpu or args.full_7b):
            base.update(contexts=[1000], prompt=0, reps=args.reps_7b, decode_tokens=args.decode_tokens_7b,
                        configs=[{"fa": False, "cache": "f16"}])
        else:
            base.update(contexts=[1000], prompt=args.prompt, reps=args.reps, decode_tokens=args.decode_tokens)
        for r in range(args.unpatched_rounds):
            out.append((f"{name}-unpatched-{r}", {**base, "lib_dir": args.unpatched_lib}))
            out.append((f"{name}-patched-off-{r}", {**base, "lib_dir": patched_lib}))
    return out


# ----------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------

def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def fmt_stat(xs: list[float], digits: int = 1) -> str:
    if not xs:
        return "—"
    return f"{med(xs):.{digits}f} [{min(xs):.{digits}f}–{max(xs):.{digits}f}]"


def fmt_ratio(on: list[float], off: list[float]) -> str:
    if not on or not off:
        return "—"
    return f"{med(on) / med(off):.3f}"


def spread(xs: list[float]) -> float:
    """Half the min–max range, relative to the median."""
    return (max(xs) - min(xs)) / 2 / med(xs) if xs else float("nan")


def fmt_bytes(n: float) -> str:
    for unit, k in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= k:
            return f"{n / k:.2f} {unit}"
    return f"{n:.0f} B"


def machine_info(gpu: bool, results: list[dict[str, Any]]) -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        commit += " (with uncommitted changes)" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    patched = [r for r in results if r["patched"]]
    return {"cpu": f"{cpu}, {os.cpu_count()} logical CPUs", "commit": commit,
            "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            "build": patched[0]["build_info"] if patched else "?",
            "device": results[0]["device"] if results else "?",
            "system_info": results[0]["system_info"] if results else "?",
            "threads": str(results[0]["threads"]) if results else "?",
            "python": platform.python_version(), "gpu": "yes" if gpu else "no"}


def _verdict(d: float, limit: float, noise: float) -> str:
    if d <= limit:
        return "met"
    if d - noise <= limit:
        return "not resolved: within the noise of this machine"
    return "**missed**"


def _ctx_key(c: dict[str, Any]) -> str:
    return "1000" if "1000" in c["decode"] else max(c["decode"], key=int)


def targets(results: list[dict[str, Any]], cross: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) per SPEC §5 target and shape, largest shape first."""
    rows: list[tuple[str, str, str]] = []
    main = sorted((r for r in results if r["patched"]), key=lambda r: -r["model_bytes"])
    for r in main:
        # SPEC §5: +1.5 % at most with flash attention off and on, at every context length (a GPU: +2 %)
        limit = 0.02 if r.get("gpu") else 0.015
        for c in r["configs"]:
            for N, dec in sorted(c["decode"].items(), key=lambda kv: int(kv[0])):
                if "adaptive" not in dec:
                    continue
                off, on = dec["off"], dec["adaptive"]
                d = med(on) / med(off) - 1
                noise = max(spread(off), spread(on))
                where = f"{r['shape']}, K/V {c['type_k']}/{c['type_v']}, {N} context"
                name = (f"decode +{100 * limit:.1f}% at most, flash attention {'on' if c['fa'] else 'off'} ({where})")
                rows.append((name, f"{100 * d:+.1f}% (noise ±{100 * noise:.1f}%)", _verdict(d, limit, noise)))
    for r in main:
        for c in r["configs"]:
            if c["pp"] and "adaptive" in c["pp"]:
                off, on = c["pp"]["off"], c["pp"]["adaptive"]
                d = med(on) / med(off) - 1
                noise = max(spread(off), spread(on), 0.01)
                fa = "on" if c["fa"] else "off"
                rows.append((f"prompt processing unchanged ({r['shape']}, flash attention {fa}, "
                             f"K/V {c['type_k']}/{c['type_v']})",
                             f"{100 * d:+.1f}% tokens/s (noise ±{100 * noise:.1f}%)",
                             "met (within noise)" if abs(d) <= noise else "**missed**"))
    for r in main:
        for fa in (False, True):
            worst, what = -1.0, ""
            for c in (c for c in r["configs"] if c["fa"] == fa):
                for m in c.get("memory", {}).values():
                    state = (m.get("state_kib_logged") or 0.0) * 1024
                    grow = 0.0
                    if m.get("compute_buffer_mib") is not None and c.get("compute_buffer_mib_off") is not None:
                        grow = max(0.0, (m["compute_buffer_mib"] - c["compute_buffer_mib_off"]) * 2**20)
                    if state + grow > worst:
                        worst, what = state + grow, f"state {fmt_bytes(state)} + compute buffer {fmt_bytes(grow)}"
            if worst >= 0:
                rows.append((f"extra memory under 1 MiB per context ({r['shape']}, "
                             f"flash attention {'on' if fa else 'off'})",
                             f"{fmt_bytes(worst)} ({what})", "met" if worst < 2**20 else "**missed**"))
    for name in sorted({x["shape"] for x in cross}):
        un = [x for x in cross if x["shape"] == name and not x["tag"].startswith(f"{name}-patched")]
        pa = [x for x in cross if x["shape"] == name and x["tag"].startswith(f"{name}-patched")]
        if not un or not pa:
            continue
        label = "KVSmooth off: same speed and outputs as unpatched llama.cpp"
        if any(x["patched"] for x in un):
            label += " (the 'unpatched' library given is a patched build)"
        for i, c0 in enumerate(un[0]["configs"]):
            N = _ctx_key(c0)
            a = [v for x in un for v in x["configs"][i]["decode"][N]["off"]]
            b = [v for x in pa for v in x["configs"][i]["decode"][N]["off"]]
            d = med(b) / med(a) - 1
            noise = max(spread(a), spread(b), 0.01)
            same = len({x["configs"][i].get("logits_sha_off") for x in un + pa}) == 1
            pp = ""
            if c0["pp"]:
                pa_pp = [v for x in pa for v in x["configs"][i]["pp"]["off"]]
                un_pp = [v for x in un for v in x["configs"][i]["pp"]["off"]]
                pp = f"; prompt {100 * (med(pa_pp) / med(un_pp) - 1):+.1f}% tokens/s"
            rows.append((f"{label} ({name}, flash attention {'on' if c0['fa'] else 'off'}, {N} context)",
                         f"{100 * d:+.1f}% decode time{pp} (cross-process noise ±{100 * noise:.1f}%); "
                         f"logits {'identical' if same else 'DIFFER'}",
                         ("met" if abs(d) <= noise else "**missed**") + ("" if same else ", **outputs differ**")))
    return rows


def write_report(out: Path, args: argparse.Namespace, results: list[dict[str, Any]],
                 cross: list[dict[str, Any]], info: dict[str, str] | None = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    if info is None:
        info = {**machine_info(args.gpu, results + cross),
                "load_end": " ".join(f"{x:.2f}" for x in os.getloadavg())}
    raw = {"machine": info, "args": {k: v for k, v in vars(args).items() if k != "worker"},
           "results": results, "unpatched": cross}
    (out / "benchmarks.json").write_text(json.dumps(raw, indent=1, default=str))
    plot = write_plot(out / "benchmarks-decode.png", results)

    L: list[str] = []
    L.append("# KVSmooth benchmarks\n")
    quick = " --quick (a smoke run: the figures mean nothing)" if args.quick else ""
    L.append(f"Written by `scripts/bench.py`{quick}; raw figures in `benchmarks.json`.\n")
    L.append("| | |\n|---|---|")
    for k in ("date", "commit", "build", "cpu", "device", "threads", "system_info"):
        L.append(f"| {k} | {info[k]} |")
    L.append(f"| load average (1, 5, 15 min) at start / end | {args.load_start} / {info.get('load_end', '?')} |")
    L.append("")
    L.append("Random-weight GGUFs of real shapes (the cost of a token does not depend on the weights). "
             "Every figure is the median over the repetitions, with [min–max]; modes were interleaved in a "
             "rotating order on one context per configuration. Decode: ms per token, D single-token steps "
             "with output per repetition at the given context length. Prompt: tokens/s for a fresh prompt "
             "with output for its last token only (KVSmooth smooths only tokens with output). "
             "With flash attention off llama.cpp cannot quantize the V cache, so \"q8_0\" there means K q8_0, V f16.\n")

    tgt = targets(results, cross)
    if tgt:
        L.append("## Targets (SPEC §5)\n")
        L.append("| target | measured | verdict |\n|---|---|---|")
        L += [f"| {a} | {b} | {c} |" for a, b, c in tgt]
        L.append("")

    for r in results:
        shape = SHAPES[r["shape"]]
        modes = r["modes"]
        L.append(f"## {shape.label}\n")
        c0 = r["configs"][0]
        n_dec = len(next(iter(c0["decode"].values()))["off"])
        n_pp = len(c0["pp"]["off"]) if c0["pp"] else 0
        L.append(f"Model {fmt_bytes(r['model_bytes'])} ({r.get('weights_note', '')}); smoothed layers "
                 f"{LAYER_START}–{shape.n_layer - 2} ({shape.smoothed_layers} of {shape.n_layer}); "
                 f"{n_dec} decode repetitions of {r.get('decode_tokens', '?')} timed steps, {n_pp} prompt repetitions, "
                 f"per mode; {r['threads']} threads; worker wall time {r['wall_s']:.0f} s; "
                 f"peak RSS of the worker process {fmt_bytes(r['peak_rss_bytes'])}.\n")
        head = "| flash attn | cache K/V | figure | " + " | ".join(modes) + " | " + \
            " | ".join(f"{m}/off" for m in modes if m != "off") + " |"
        L.append(head)
        L.append("|" + "---|" * (3 + len(modes) + len(modes) - 1))
        for c in r["configs"]:
            fa = "on" if c["fa"] else "off"
            kv = f"{c['type_k']}/{c['type_v']}"
            if c["pp"]:
                L.append(f"| {fa} | {kv} | prompt {args.prompt if r['shape'] != 'quick' else 24} tok, tok/s | "
                         + " | ".join(fmt_stat(c["pp"][m]) for m in modes) + " | "
                         + " | ".join(fmt_ratio(c["pp"][m], c["pp"]["off"]) for m in modes if m != "off") + " |")
            for N, dec in c["decode"].items():
                L.append(f"| {fa} | {kv} | decode @{N}, ms/tok | " + " | ".join(fmt_stat(dec[m], 2) for m in modes)
                         + " | " + " | ".join(fmt_ratio(dec[m], dec["off"]) for m in modes if m != "off") + " |")
        L.append("")
        L.append("Bytes per decode step (analytic): weights read + KV cache read (+ the f32 scores written and "
                 "read three times with flash attention off) vs what the op adds (flash attention off: the "
                 "probabilities of the smoothed layers read once more; on: their K cache read once more; "
                 "plus the blended rows).\n")
        L.append("| flash attn | cache K/V | context | step moves | op adds | op / step "
                 "| measured adaptive/off − 1 |")
        L.append("|---|---|---|---|---|---|---|")
        for c in r["configs"]:
            for N, b in c["bytes"].items():
                dec = c["decode"][N]
                meas = f"{100 * (med(dec['adaptive']) / med(dec['off']) - 1):+.1f}%" if "adaptive" in dec else "—"
                L.append(f"| {'on' if c['fa'] else 'off'} | {c['type_k']}/{c['type_v']} | {N} | "
                         f"{fmt_bytes(b['step'])} | "
                         f"{fmt_bytes(b['op'])} | {100 * b['op'] / b['step']:.2f}% | {meas} |")
        L.append("")
        mem_rows = [(c, m, v) for c in r["configs"] for m, v in c.get("memory", {}).items()]
        if mem_rows:
            L.append(f"Memory: state estimate {state_bytes(shape)} B per sequence "
                     f"({shape.smoothed_layers} layers × (1 + {QUEUE}) × 4 B).\n")
            L.append("| flash attn | cache K/V | mode | state (logged) | compute buffer off → on "
                     "| RSS change on first on-step |")
            L.append("|---|---|---|---|---|---|")
            for c, m, v in mem_rows:
                cb_off, cb_on = c.get("compute_buffer_mib_off"), v.get("compute_buffer_mib")
                cbs = "not re-reserved"
                if cb_off is not None and cb_on is not None:
                    cbs = f"{cb_off:.2f} → {cb_on:.2f} MiB"
                st = f"{v['state_kib_logged']:.1f} KiB" if v.get("state_kib_logged") is not None else "?"
                L.append(f"| {'on' if c['fa'] else 'off'} | {c['type_k']}/{c['type_v']} | {m} | {st} | {cbs} | "
                         f"{fmt_bytes(max(0, v['rss_delta_bytes']))} |")
            L.append("")
        for p in r.get("profile", []):
            L.append(f"Per-op time (ggml eval callback, every node computed on its own, {p['steps']} steps; "
                     f"flash attention {'on' if p['fa'] else 'off'}, {p['cache']}, context {p['context']}), "
                     "ms per token:\n")
            ops = list(dict.fromkeys([*p["ops_ms"].get("adaptive", {}), *p["ops_ms"].get("off", {})]))[:8]
            ops += [op for op in ("KVSMOOTH", "SOFT_MAX", "FLASH_ATTN_EXT") if op not in ops and
                    any(op in v for v in p["ops_ms"].values())]
            L.append("| op | " + " | ".join(p["ops_ms"]) + " |")
            L.append("|---|" + "---|" * len(p["ops_ms"]))
            for op in ops:
                L.append(f"| {op} | " + " | ".join(f"{p['ops_ms'][m].get(op, 0.0):.3f}" for m in p["ops_ms"]) + " |")
            L.append("| total | " + " | ".join(f"{sum(v.values()):.3f}" for v in p["ops_ms"].values()) + " |")
            L.append("")

    if cross:
        L.append("## KVSmooth off vs unpatched llama.cpp\n")
        L.append("Separate processes, alternated (unpatched, patched, unpatched, …), KVSmooth off, same parameters. "
                 "Cross-process comparisons are noisier than the in-process on/off ratios above "
                 "(memory placement, CPU frequency and other load differ between processes).\n")
        L.append("| process | library | flash attn | prompt tok/s | decode ms/tok | logits (sha256, first 16) |")
        L.append("|---|---|---|---|---|---|")
        for x in cross:
            for c in x["configs"]:
                N = next(iter(c["decode"]))
                L.append(f"| {x['tag']} | {x['build_info']} | {'on' if c['fa'] else 'off'} | "
                         f"{fmt_stat(c['pp'].get('off', []))} | @{N}: {fmt_stat(c['decode'][N]['off'], 2)} | "
                         f"`{c.get('logits_sha_off')}` |")
        L.append("")

    if plot:
        L.append(f"![decode time per token vs context]({plot.name})\n")
    if args.notes and Path(args.notes).exists():
        L.append(Path(args.notes).read_text())
    path = out / "benchmarks.md"
    path.write_text("\n".join(L) + "\n")
    return path


def write_plot(path: Path, results: list[dict[str, Any]]) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("warning: matplotlib is not installed: no plot (the table is written)", file=sys.stderr)
        return None
    panels = [(r, c) for r in results for c in r["configs"] if len(c["decode"]) > 1 or r["shape"] == "7b"]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2), squeeze=False)
    colors = plt.get_cmap("tab10").colors
    for ax, r in zip(axes[0], results):
        for ci, c in enumerate(r["configs"]):  # one colour per configuration, one line style per mode
            Ns = sorted(c["decode"], key=int)
            for m, style, marker in (("off", "-", "o"), ("adaptive", "--", "^"), ("fixed", ":", "s")):
                if m not in c["decode"][Ns[0]]:
                    continue
                y = [med(c["decode"][N][m]) for N in Ns]
                lo = [min(c["decode"][N][m]) for N in Ns]
                hi = [max(c["decode"][N][m]) for N in Ns]
                label = f"FA {'on' if c['fa'] else 'off'} {c['type_k']}/{c['type_v']} {m}"
                x = [int(N) for N in Ns]
                ax.plot(x, y, style, marker=marker, color=colors[ci % len(colors)], label=label)
                ax.fill_between(x, lo, hi, color=colors[ci % len(colors)], alpha=0.12)
        ax.set_title(f"{r['shape']}: decode time per token")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("ms / token (median, min–max band)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--worker"]:
        return worker_main(argv[1], argv[2])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shape, a few tokens: proves it works, in tests")
    ap.add_argument("--out", type=Path, default=REPO / "docs", help="folder for benchmarks.md/.json/-decode.png")
    ap.add_argument("--shapes", default="1b,7b", help="comma-separated: 1b, 7b (default 1b,7b)")
    ap.add_argument("--contexts", default="128,1000,2000", help="decode context lengths")
    ap.add_argument("--prompt", type=int, default=600, help="prompt length (LLaVA: 576 image tokens + text)")
    ap.add_argument("--reps", type=int, default=5, help="decode repetitions per mode")
    ap.add_argument("--pp-reps", type=int, default=5, help="prompt repetitions per mode")
    ap.add_argument("--decode-tokens", type=int, default=16, help="timed decode steps per repetition")
    ap.add_argument("--reps-7b", type=int, default=5)
    ap.add_argument("--decode-tokens-7b", type=int, default=4)
    ap.add_argument("--prompt-7b", type=int, default=0, help="7B headline prompt length (0: no prompt figure)")
    ap.add_argument("--full-7b", action="store_true", help="the full matrix on the 7B shape too (default with --gpu)")
    ap.add_argument("--modes", default=",".join(MODES),
                    help=f"modes of the full matrix, off first (default {','.join(MODES)}; "
                         f"also: {','.join(EXTRA_MODES)})")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--gpu", action="store_true", help="every layer on the GPU (a CUDA/Metal build)")
    ap.add_argument("--unpatched-lib", help="folder with an unpatched libllama: KVSmooth-off comparison")
    ap.add_argument("--unpatched-rounds", type=int, default=2)
    ap.add_argument("--notes", help="a markdown file appended to the report (the analysis)")
    ap.add_argument("--verbose", action="store_true", help="show llama.cpp's log")
    ap.add_argument("--from-json", type=Path, help="rewrite the report from a benchmarks.json (no measuring)")
    args = ap.parse_args(argv)
    if args.from_json:
        raw = json.loads(args.from_json.read_text())
        notes, out = args.notes, args.out
        args = argparse.Namespace(**{**raw["args"], "notes": notes, "out": out})
        print(write_report(Path(out), args, raw["results"], raw["unpatched"], raw["machine"]))
        return 0
    args.shapes = [s for s in args.shapes.split(",") if s]
    args.contexts = [int(x) for x in args.contexts.split(",")]
    args.modes = [m for m in args.modes.split(",") if m]
    if args.modes[:1] != ["off"] or any(m not in MODES + EXTRA_MODES for m in args.modes):
        ap.error(f"--modes: off first, then any of {', '.join(MODES[1:] + EXTRA_MODES)}; got {args.modes}")
    args.load_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    for s in args.shapes:
        if s not in SHAPES or s == "quick":
            ap.error(f"unknown shape {s!r}")

    import pykvsmooth  # the patched library folder (no llama_cpp import here)

    patched_lib = str(pykvsmooth.lib_dir())
    if args.gpu:
        probe = subprocess.run([sys.executable, "-c", "import pykvsmooth, llama_cpp.llama_cpp as L; "
                                "print(int(L.llama_supports_gpu_offload()))"], capture_output=True, text=True)
        if probe.stdout.strip() != "1":
            print("error: --gpu: this pykvsmooth build has no GPU backend (build with `make install GPU=cuda`)",
                  file=sys.stderr)
            return 2
    results: list[dict[str, Any]] = []
    cross: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="pykvsmooth-bench-") as td:
        tmp = Path(td)
        for tag, spec in plans(args):
            spec["model"] = str(ensure_model(SHAPES[spec["shape"]], lambda s: print(s, file=sys.stderr)))
            spec["lib_dir"] = patched_lib
            results.append(run_worker(spec, tmp, tag))
        if args.unpatched_lib:
            for tag, spec in unpatched_plans(args, patched_lib):
                spec["model"] = str(ensure_model(SHAPES[spec["shape"]]))
                cross.append(run_worker(spec, tmp, tag))
    path = write_report(args.out, args, results, cross)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
