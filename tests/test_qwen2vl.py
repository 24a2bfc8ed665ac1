"""KVSmooth on Qwen2-VL (arch qwen2vl: M-RoPE, Q/K/V biases) and Qwen3-VL (qwen3vl: IMROPE,
Q/K norms, DeepStack) against the NumPy reference.

The tiny random model of scripts/make_tiny_qwen2vl.py (6 layers, 4 query heads over 2 KV
heads, head size 64, rope sections [8, 12, 12, 0]) runs through libllama's C API, teacher-
forced (tests/families_native.py), and is compared with tests/reference_families.py, which
never calls llama.cpp: logits at every generation step and the KVSmooth trace (position,
layer, entropy, rank, λ).

The workloads are mtmd-shaped prompts: text, then an image chunk of 8 x 6 embeddings passed
through llama_batch.embd with four positions each (section-major in llama_batch.pos, as
mtmd_helper_decode_image_chunk passes them): (p0, p0 + row, p0 + col, 0), all cells at the one
sequential position p0, and the next token at p0 + max(8, 6) = p0 + 8. In "image-last" the
final prompt token (position 18) comes right after the image (cells at 10): its previous cell
(SPEC §1 step 4: the greatest sequential position below it) is 8 positions down and shared by
48 cells, of which the image's last one (decoded last) is meant.
test_previous_cell_after_the_image_jump shows the other readings (position - 1, i.e. no blend;
the image's first cell) are told apart by far more than the tolerance. llama-mtmd-cli captions
a picture with the fixture's ChatML template and smooths only the final prompt token and the
generated ones. The Qwen3-VL pair runs the same image workload with DeepStack embeddings (2 x
n_embd), and captions in llama-mtmd-cli with its qwen3vl_merger mmproj.
"""

from __future__ import annotations

import dataclasses

import json
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
from conftest import TinyFamily

import families_native as fn
from families_native import Chunk, Params, embd_chunk, max_diff, text_chunk
from reference_families import ReferenceFamily
from test_cli import chunk_ranges, run as run_cli

N_GEN = 24
# f32 weights and cache against the float64 reference: measured 2-4e-5 (as for LLaMA)
LOGIT_ATOL = 1e-3
# Flash attention casts the f32 K/V cache to f16 (see test_llama_kvsmooth.FA_ATOL): measured on
# these workloads 0.020-0.023 with KVSmooth off and on (logits of std ~3). 0.1 leaves a margin
# of ~4x and is far below what smoothing moves (> 1, checked).
FA_ATOL = 0.1
IMAGE_NX, IMAGE_NY = 8, 6


@pytest.fixture(scope="module")
def model(tiny_qwen2vl: TinyFamily) -> Iterator[fn.Model]:
    with fn.load_model(tiny_qwen2vl.text) as m:
        yield m


@pytest.fixture(scope="module")
def ref(tiny_qwen2vl: TinyFamily) -> ReferenceFamily:
    return ReferenceFamily(tiny_qwen2vl.text)


def _tokens(ref: ReferenceFamily, n: int, seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(3, ref.n_vocab, n)]


@pytest.fixture(scope="module")
def workloads(ref: ReferenceFamily) -> dict[str, list[Chunk]]:
    img = np.random.default_rng(7).standard_normal((IMAGE_NX * IMAGE_NY, ref.n_embd)).astype(np.float32)
    after = 10 + max(IMAGE_NX, IMAGE_NY)
    return {
        # 40 text tokens: all four sections equal
        "text": [text_chunk(_tokens(ref, 40, 1), 0)],
        # 10 text tokens, the image at 10 (positions 10..17 taken), the final token at 18
        "image-last": [text_chunk(_tokens(ref, 10, 1), 0),
                       embd_chunk(img, ref.image_positions(10, IMAGE_NX, IMAGE_NY)),
                       text_chunk(_tokens(ref, 1, 3), after)],
        # ... and 6 more text tokens after the image
        "image-mid": [text_chunk(_tokens(ref, 10, 1), 0),
                      embd_chunk(img, ref.image_positions(10, IMAGE_NX, IMAGE_NY)),
                      text_chunk(_tokens(ref, 6, 3), after)],
    }


@pytest.fixture(scope="module")
def gen(ref: ReferenceFamily) -> list[int]:
    return _tokens(ref, N_GEN, 2)


@pytest.fixture(scope="module")
def reference(ref: ReferenceFamily, workloads, gen) -> Callable[[Params | None, str], fn.RefRun]:
    cache: dict[tuple, fn.RefRun] = {}

    def get(params: Params | None, workload: str) -> fn.RefRun:
        key = (params, workload)
        if key not in cache:
            cache[key] = fn.run_reference(ref, params, workloads[workload], gen)
        return cache[key]

    return get


# ---------------------------------------------------------------------------------------
# the fixture and the reference alone


def test_fixture_round_trips(tiny_qwen2vl: TinyFamily, ref: ReferenceFamily) -> None:
    from gguf import GGUFReader
    from reference_llama import gguf_value

    assert (ref.arch, ref.n_layer, ref.n_head, ref.n_head_kv, ref.head_dim) == ("qwen2vl", 6, 4, 2, 64)
    assert ref.sections == [8, 12, 12, 0]
    assert "blk.0.attn_q.bias" in ref.w and "blk.5.attn_v.bias" in ref.w
    t = GGUFReader(str(tiny_qwen2vl.text))
    assert "<|im_start|>assistant" in gguf_value(t.fields["tokenizer.chat_template"])
    tokens = gguf_value(t.fields["tokenizer.ggml.tokens"])
    assert gguf_value(t.fields["tokenizer.ggml.eos_token_id"]) == tokens.index("<|im_end|>")
    m = GGUFReader(str(tiny_qwen2vl.mmproj))
    assert gguf_value(m.fields["clip.projector_type"]) == "qwen2vl_merger"
    names = {x.name for x in m.tensors}
    assert {"v.patch_embd.weight", "v.patch_embd.weight.1", "v.post_ln.weight", "mm.0.weight", "mm.2.weight"} <= names


def test_reference_mrope_sections(ref: ReferenceFamily) -> None:
    """Pair i turns by the position of its section only: moving the row position moves pairs
    8..19 and nothing else; with all four positions equal it is NEOX RoPE."""
    x = np.random.default_rng(0).standard_normal((1, 2, ref.head_dim))
    base = ref._rope(x, np.array([[5], [5], [5], [5]]), 0)
    moved = ref._rope(x, np.array([[5], [9], [5], [5]]), 0)
    changed = np.nonzero(np.any(np.abs(moved - base) > 1e-12, axis=(0, 1)))[0]
    half = ref.head_dim // 2
    assert set(changed) == set(range(8, 20)) | set(range(8 + half, 20 + half))
    inv = 10000.0 ** (-np.arange(0, ref.head_dim, 2) / ref.head_dim)
    c, s = np.cos(5 * inv), np.sin(5 * inv)
    neox = np.concatenate([x[..., :half] * c - x[..., half:] * s, x[..., :half] * s + x[..., half:] * c], -1)
    assert np.allclose(base, neox)


def test_reference_image_positions_and_mask(ref: ReferenceFamily) -> None:
    pos = ref.image_positions(10, 3, 2)
    assert pos.tolist() == [[10] * 6, [10, 10, 10, 11, 11, 11], [10, 11, 12, 10, 11, 12], [0] * 6]
    st = ref.new_sequence()
    ref.eval(st, [5, 6], smooth_last=False)
    ref.eval_embd(st, np.zeros((6, ref.n_embd)), pos=pos)
    mask = ref._mask(st, pos, False)  # image tokens over (2 text + 6 image) cells
    assert mask[:, :2].all()                                    # earlier text: visible
    assert (mask[:, 2:] == np.tril(np.ones((6, 6), bool))).all()  # raster order within the image
    assert st.next_pos == 11 and ref.previous_cell(st, 7) == 1    # the image's cells follow text pos 1
    ref.eval(st, [7], pos=[13])
    assert ref.previous_cell(st, 8) == 7                        # pos 13 -> pos 10, the last image cell


# ---------------------------------------------------------------------------------------
# against llama.cpp


@pytest.mark.parametrize("flash_attn", [False, True], ids=["fa-off", "fa-on"])
@pytest.mark.parametrize("workload", ["text", "image-mid"])
def test_kvsmooth_off_matches_reference(model, workloads, gen, reference, workload: str, flash_attn: bool) -> None:
    with fn.context(model, None, flash_attn=flash_attn) as ctx:
        got = fn.run_native(ctx, model.n_vocab, workloads[workload], gen)
    d = max_diff(got.logits, reference(None, workload).logits)
    print(workload, "KVSmooth off, max |dlogit| =", d)
    assert d <= (FA_ATOL / 2 if flash_attn else LOGIT_ATOL)
    assert all(not t for t in got.trace)


# as test_llama_kvsmooth.SETTINGS: the paper's λref/window on [3, 5), and λ = k/M unclipped on all layers
GRID = [pytest.param(Params(mode=m, layer_start=s, layer_end=e, lambda_ref=lr, window=w),
                     id=f"{m}-layers{s}-{e}-lref{lr}-w{w}")
        for m in ("adaptive", "fixed", "keys") for s, e, lr, w in [(3, 5, 0.9, 0.2), (0, 6, 0.5, 0.5)]]


@pytest.mark.parametrize("impl", ["auto", "composed"])
@pytest.mark.parametrize("params", GRID)
def test_matches_reference_with_image(model, workloads, gen, reference, params: Params, impl: str) -> None:
    want = reference(params, "image-mid")
    params = dataclasses.replace(params, impl=impl)
    assert max_diff(want.logits, reference(None, "image-mid").logits) > 100 * LOGIT_ATOL
    with fn.context(model, params) as ctx:
        got = fn.run_native(ctx, model.n_vocab, workloads["image-mid"], gen)
    print(params, "max |dlogit| =", max_diff(got.logits, want.logits))
    assert max_diff(got.logits, want.logits) <= LOGIT_ATOL
    fn.check_trace(got, want, params)


def test_matches_reference_text_only(model, workloads, gen, reference) -> None:
    params = GRID[0].values[0]
    want = reference(params, "text")
    with fn.context(model, params) as ctx:
        got = fn.run_native(ctx, model.n_vocab, workloads["text"], gen)
    assert max_diff(got.logits, want.logits) <= LOGIT_ATOL
    fn.check_trace(got, want, params)


@pytest.mark.parametrize("mode", ["adaptive", "fixed", "keys"])
def test_previous_cell_after_the_image_jump(model, ref: ReferenceFamily, workloads, gen, reference, mode: str) -> None:
    """The final prompt token (position 18) follows the image (48 cells at position 10): it is
    blended with the image's last cell. The first step's λ is λref - w = 0.7 (an empty queue
    ranks 0), so the choice shows in every later step's logits."""
    params = Params(mode=mode, layer_start=0, layer_end=6)
    want = reference(params, "image-last")
    with fn.context(model, params) as ctx:
        got = fn.run_native(ctx, model.n_vocab, workloads["image-last"], gen)
    print(mode, "max |dlogit| =", max_diff(got.logits, want.logits))
    assert max_diff(got.logits, want.logits) <= LOGIT_ATOL
    fn.check_trace(got, want, params)
    assert [r.pos for r in got.trace[0]] == [10 + max(IMAGE_NX, IMAGE_NY)] * 6 and all(r.applied for r in got.trace[0])

    # the other readings of "previous cell" give other logits, by far more than LOGIT_ATOL
    rule = ReferenceFamily.previous_cell
    first_step = lambda st, cell: int(st.pos[cell]) == 10 + max(IMAGE_NX, IMAGE_NY)  # noqa: E731
    alternatives = {
        "position - 1 (none: no blend)": lambda self, st, cell: None if first_step(st, cell) else rule(self, st, cell),
        "the image's first cell": lambda self, st, cell: 10 if first_step(st, cell) else rule(self, st, cell),
    }
    for name, alt in alternatives.items():
        try:
            ReferenceFamily.previous_cell = alt  # type: ignore[method-assign]
            other = fn.run_reference(ref, params, workloads["image-last"], gen)
        finally:
            ReferenceFamily.previous_cell = rule  # type: ignore[method-assign]
        assert max_diff(got.logits, other.logits) > 50 * LOGIT_ATOL, name


def test_image_chunk_in_several_decodes(model, workloads, gen, reference) -> None:
    """The prompt chunks split into decodes of at most 16 entries (an image in three, as mtmd
    splits by n_batch): only the final prompt token is smoothed, the result is the same."""
    params = GRID[1].values[0]
    want = reference(params, "image-mid")
    with fn.context(model, params, n_batch=16, n_ubatch=16) as ctx:
        got = fn.run_native(ctx, model.n_vocab, workloads["image-mid"], gen, max_chunk=16)
    assert max_diff(got.logits, want.logits) <= LOGIT_ATOL
    fn.check_trace(got, want, params)


# With FA the entropies drift by up to ~0.01 (test_llama_kvsmooth explains it): the adaptive
# cases use M = 256 so that a rank flip moves λ by 1/256 only.
FA_GRID = [
    pytest.param(Params(mode="fixed", layer_start=0, layer_end=6), id="fixed-layers0-6"),
    pytest.param(Params(mode="adaptive", queue=256, lambda_ref=0.3, window=0.3, layer_start=0, layer_end=6),
                 id="adaptive-layers0-6-M256"),
]


@pytest.mark.parametrize("impl", ["auto", "composed"])
@pytest.mark.parametrize("workload", ["image-last", "image-mid"])
@pytest.mark.parametrize("params", FA_GRID)
def test_flash_attn_matches_reference(model, workloads, gen, reference, params: Params, workload: str,
                                      impl: str) -> None:
    want = reference(params, workload)
    params = dataclasses.replace(params, impl=impl)
    # smoothing moves the logits well beyond FA_ATOL (the least: adaptive M = 256 on image-last,
    # 0.68 with λ = k/256 ≤ 0.1 over 24 steps: 30x the measured FA error)
    assert max_diff(want.logits, reference(None, workload).logits) > 5 * FA_ATOL
    with fn.context(model, params, flash_attn=True) as ctx:
        got = fn.run_native(ctx, model.n_vocab, workloads[workload], gen)
    print(params, workload, "FA max |dlogit| =", max_diff(got.logits, want.logits))
    assert max_diff(got.logits, want.logits) <= FA_ATOL
    fn.check_trace(got, want, params, z_atol=0.05, exact_lambda=False)
    if params.mode != "fixed":
        flat = [r for step in got.trace for r in step]
        assert all(abs(r.rank - e.k) <= 3 for r, e in zip(flat, want.trace))


# ---------------------------------------------------------------------------------------
# llama-mtmd-cli

N_PREDICT = 16


def _caption(fx: TinyFamily, trace: Path | None, *extra: str):
    args = ["-m", str(fx.text), "--mmproj", str(fx.mmproj), "--image", str(fx.png),
            "-p", "Describe the image.", "-n", str(N_PREDICT), "--temp", "0", "--seed", "1",
            "-t", "1", "-c", "1024", "--no-warmup", *extra]
    if trace is not None:
        args += ["--kvsmooth", "0.9", "--kvsmooth-trace", str(trace)]
    r = run_cli("llama-mtmd-cli", args)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.parametrize("family", ["tiny_qwen2vl", "tiny_qwen3vl"])
def test_mtmd_cli_smooths_final_prompt_token_and_generated(request: pytest.FixtureRequest, family: str,
                                                           tmp_path: Path) -> None:
    """Smoothed positions are exactly the final prompt token (the "\\n" after "<|im_start|>
    assistant" of the ChatML template) and each generated token's, in the default layers
    [3, 5); none in the image, whose 8 x 6 embeddings take 8 positions. (--no-warmup: the
    Qwen-VL warmup encodes a 2116-token image.)"""
    fx: TinyFamily = request.getfixturevalue(family)
    trace = tmp_path / "trace.jsonl"
    r = _caption(fx, trace)
    records = [json.loads(line) for line in trace.read_text(encoding="utf-8").splitlines() if line.strip()]
    text, media = chunk_ranges(r.stderr)
    assert len(media) == 1 and len(media[0]) == max(IMAGE_NX, IMAGE_NY), r.stderr[-2000:]
    last_prompt = text[-1].stop - 1
    assert last_prompt > media[0].stop
    assert records and records[0]["pos"] == last_prompt and records[0]["token"] == "\n"
    positions = sorted({rec["pos"] for rec in records})
    assert positions == list(range(last_prompt, last_prompt + len(positions)))
    assert len(positions) == N_PREDICT + 1 or (1 < len(positions) <= N_PREDICT + 1 and "<|im_end|>" not in r.stdout)
    by_pos: dict[int, list[int]] = {}
    for rec in records:
        by_pos.setdefault(rec["pos"], []).append(rec["layer"])
        assert rec["applied"] is True and 0.7 - 1e-6 <= rec["lambda"] <= 1.1 + 1e-6
    assert all(sorted(v) == [3, 4] for v in by_pos.values())
    # the generated tokens' texts are what the CLI printed
    answer = "".join(rec["token"] for rec in records if rec["layer"] == 3 and rec["pos"] > last_prompt)
    if "\ufffd" not in answer:
        assert answer.strip() in r.stdout

    assert not any(rec["pos"] in media[0] for rec in records)
    if family == "tiny_qwen2vl":
        # (the tiny Qwen3-VL's greedy answer is a short loop that smoothing leaves as it is; the
        # teacher-forced tests above show what smoothing does to its logits)
        off = _caption(fx, None)
        assert off.stdout != r.stdout, "KVSmooth 0.9 did not change the greedy answer"


# ---------------------------------------------------------------------------------------
# Qwen3-VL: interleaved M-RoPE sections, Q/K norms, a DeepStack layer


@pytest.fixture(scope="module")
def tiny_qwen3vl(tmp_path_factory: pytest.TempPathFactory) -> TinyFamily:
    import make_tiny_llava
    import make_tiny_qwen2vl

    d = tmp_path_factory.mktemp("tiny-qwen3vl")
    text, mmproj = make_tiny_qwen2vl.write_qwen3vl_pair(d)
    make_tiny_llava.write_test_image(d / "picture.png", size=(64, 48), seed=0)
    return TinyFamily(d, text, mmproj, d / "picture.png")


@pytest.fixture(scope="module")
def qwen3vl(tiny_qwen3vl: TinyFamily) -> Iterator[tuple[fn.Model, ReferenceFamily, dict]]:
    path = tiny_qwen3vl.text
    r = ReferenceFamily(path)
    assert (r.arch, r.sections, r.n_deepstack, r.n_embd_inp) == ("qwen3vl", [12, 10, 10, 0], 1, 2 * r.n_embd)
    img = np.random.default_rng(7).standard_normal((IMAGE_NX * IMAGE_NY, r.n_embd_inp)).astype(np.float32)
    wl = [text_chunk(_tokens(r, 10, 1), 0), embd_chunk(img, r.image_positions(10, IMAGE_NX, IMAGE_NY)),
          text_chunk(_tokens(r, 1, 3), 10 + max(IMAGE_NX, IMAGE_NY))]
    with fn.load_model(path) as m:
        yield m, r, {"image-last": wl}


def test_qwen3vl_reference_sections(qwen3vl) -> None:
    """IMROPE: pairs cycle t, h, w while each section lasts; the last pair (31) is section 3,
    which is 0 for text tokens (llm_graph_input_pos), so it is not NEOX RoPE even for text."""
    _, r, _ = qwen3vl
    assert r._section.tolist() == [0, 1, 2] * 10 + [0, 3]
    x = np.random.default_rng(0).standard_normal((1, 1, r.head_dim))
    st = r.new_sequence()
    assert r._positions(st, 1, [5], True)[:, 0].tolist() == [5, 5, 5, 0]
    assert not np.allclose(r._rope(x, np.array([[5], [5], [5], [0]]), 0), r._rope(x, np.array([[5]] * 4), 0))


@pytest.mark.parametrize("params,flash_attn", [
    pytest.param(None, False, id="off-fa-off"), pytest.param(None, True, id="off-fa-on"),
    pytest.param(GRID[0].values[0], False, id="adaptive-layers3-5-fa-off"),
    pytest.param(Params(mode="keys", layer_start=0, layer_end=6), False, id="keys-layers0-6-fa-off"),
    pytest.param(Params(mode="fixed", layer_start=0, layer_end=6), True, id="fixed-layers0-6-fa-on"),
    pytest.param(Params(mode="adaptive"), True, id="adaptive-M256-fa-on")])
def test_qwen3vl_matches_reference(qwen3vl, gen, params: Params | None, flash_attn: bool) -> None:
    """Measured: FA off 0.8-1.3e-5, FA on 0.016-0.022."""
    m, r, wls = qwen3vl
    if flash_attn and params is not None and params.mode == "adaptive":
        params = FA_GRID[1].values[0]
    want = fn.run_reference(r, params, wls["image-last"], gen)
    with fn.context(m, params, flash_attn=flash_attn) as ctx:
        got = fn.run_native(ctx, m.n_vocab, wls["image-last"], gen)
    print(params, "FA", flash_attn, "max |dlogit| =", max_diff(got.logits, want.logits))
    assert max_diff(got.logits, want.logits) <= (FA_ATOL if flash_attn else LOGIT_ATOL)
    if params is not None:
        fn.check_trace(got, want, params, z_atol=0.05 if flash_attn else 1e-4, exact_lambda=not flash_attn)
