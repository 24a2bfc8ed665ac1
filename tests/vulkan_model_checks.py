"""The LLaMA fixture with its weights and KV cache on Vulkan0, against the NumPy reference.

Not collected by `make test` (the name is not test_*.py): tests/test_vulkan.py runs this file
with pytest in a subprocess with GGML_VK_VISIBLE_DEVICES=0, so that llama.cpp offloads every
layer (n_gpu_layers = all) to the Vulkan device and KVSmooth's `auto` takes the composed path
there (Vulkan has no KVSmooth kernel).

Vulkan's own arithmetic differs from the CPU's: KVSmooth off, its logits are 5e-3 (f32
arithmetic, GGML_VK_DISABLE_F16=1) to 2e-2 (lavapipe's default, which like GPUs rounds
matrix-product inputs to f16) from the float64 reference. The smoothed run is held to a few
times that distance (with flash attention, to the CPU tests' FA_ATOL as well), while
smoothing moves the logits much further; its decisions (which positions and layers, blended
or not) must be the reference's, its λ within 3/M of it. With f16 arithmetic, adaptive λ
that follows every rank (λref = w = 0.5) amplifies the rounding (rank flips: 0.4 measured),
so test_vulkan.py runs that mode with f32 arithmetic and the others both ways (-k).
"""

from __future__ import annotations

import ctypes

import pytest

import pykvsmooth  # noqa: F401  (the patched libraries, before llama_cpp)
from pykvsmooth import _capi
from test_llama_kvsmooth import (FA_ATOL, LOGIT_ATOL, Params, context, log, max_diff, model,  # noqa: F401
                                 ref, reference, run_native, tiny_text_gguf, workload)

PARAMS = [
    pytest.param(Params(mode="adaptive", layer_start=0, layer_end=6, lambda_ref=0.5, window=0.5), id="adaptive-all"),
    pytest.param(Params(mode="keys", queue=4), id="keys-M4"),
    pytest.param(Params(mode="fixed"), id="fixed"),
]


@pytest.mark.parametrize("flash_attn", [False, True], ids=["fa-off", "fa-on"])
@pytest.mark.parametrize("params", PARAMS)
def test_on_vulkan_matches_reference(model, workload, reference, params: Params, flash_attn: bool) -> None:
    prompt, gen = workload
    with context(model, None, flash_attn=flash_attn) as ctx:
        off = run_native(ctx, model.n_vocab, prompt, gen, chunk=16)
    e_off = max_diff(off.logits, reference(None).logits)
    # flash attention: the CPU tests' bound, which covers ranks that the kernel's rounding flips
    bound = max(4 * e_off, FA_ATOL if flash_attn else LOGIT_ATOL)
    want = reference(params)
    moved = max_diff(want.logits, reference(None).logits)
    with context(model, params, flash_attn=flash_attn) as ctx:
        got_params = _capi.llama_kvsmooth_params()
        assert _capi.llama_kvsmooth_get_params(ctx, ctypes.byref(got_params))
        assert got_params.impl == _capi.LLAMA_KVSMOOTH_IMPL_COMPOSED, "the cache is not on a device without the op"
        got = run_native(ctx, model.n_vocab, prompt, gen, chunk=16)
    d = max_diff(got.logits, want.logits)
    print(f"{params} fa={flash_attn}: off vs reference {e_off:.3g}, on vs reference {d:.3g}, "
          f"smoothing moves {moved:.3g}")
    assert moved > 3 * bound, "the workload cannot tell smoothing from Vulkan's rounding"
    assert d <= bound
    flat = [r for step in got.trace for r in step]
    assert [(r.pos, r.layer, r.applied) for r in flat] == [(e.pos, e.layer, e.blended) for e in want.trace]
    assert all(abs(r.lam - e.lam) <= 3 / params.queue + 1e-6 for r, e in zip(flat, want.trace))
