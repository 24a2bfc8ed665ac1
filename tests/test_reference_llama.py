"""Unit tests of the tiny-model writer and the NumPy reference (no native build needed)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from reference_llama import KVSmoothParams, ReferenceLlama, gguf_value, round_to_cache, trace_by_layer

ROOT = Path(__file__).resolve().parents[1]


import make_tiny_llava as maker  # noqa: E402  (scripts/ is on sys.path: conftest.py)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    maker.write_pair(out, seed=0)
    return out


@pytest.fixture(scope="module")
def ref(model_dir: Path) -> ReferenceLlama:
    return ReferenceLlama(model_dir / maker.TEXT_FILE)


def _prompt(ref: ReferenceLlama, n: int = 24, seed: int = 1) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(3, ref.n_vocab, n)]


def test_text_gguf_round_trips(model_dir: Path, ref: ReferenceLlama) -> None:
    cfg = maker.TextConfig(n_vocab=len(maker.build_vocab()[0]))
    assert (ref.n_embd, ref.n_layer, ref.n_head, ref.n_head_kv, ref.head_dim) == (
        cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.n_head_kv, cfg.head_dim)
    assert ref.n_vocab == len(ref.tokens) == cfg.n_vocab
    assert ref.tokens[:3] == ["<unk>", "<s>", "</s>"]
    assert ref.tokens[3 + 0x41] == "<0x41>"
    assert ref.w["blk.0.attn_k.weight"].shape == (cfg.n_head_kv * cfg.head_dim, cfg.n_embd)
    r = GGUFReader(str(model_dir / maker.TEXT_FILE))
    assert gguf_value(r.fields["tokenizer.ggml.model"]) == "llama"
    assert "ASSISTANT:" in gguf_value(r.fields["tokenizer.chat_template"])


def test_mmproj_has_the_keys_clip_needs(model_dir: Path, ref: ReferenceLlama) -> None:
    r = GGUFReader(str(model_dir / maker.MMPROJ_FILE))
    assert gguf_value(r.fields["clip.projector_type"]) == "mlp"
    assert gguf_value(r.fields["clip.has_vision_encoder"]) is True
    for key in ("embedding_length", "feed_forward_length", "block_count", "projection_dim",
                "attention.head_count", "attention.layer_norm_epsilon", "image_size", "patch_size"):
        assert f"clip.vision.{key}" in r.fields
    shapes = {t.name: tuple(int(n) for n in t.shape) for t in r.tensors}  # ggml ne order
    assert shapes["mm.2.weight"][1] == ref.n_embd  # clip_n_mmproj_embd == text n_embd
    assert "v.patch_embd.weight" in shapes and "v.position_embd.weight" in shapes


def test_writer_is_deterministic(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a.gguf", tmp_path / "b.gguf", tmp_path / "c.gguf"
    kw = dict(n_embd=64, n_head=2, n_head_kv=1, n_layer=2, n_ff=96)
    maker.write_text_model(a, seed=3, **kw)
    maker.write_text_model(b, seed=3, **kw)
    maker.write_text_model(c, seed=4, **kw)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()


def test_f16_weights_load(tmp_path: Path) -> None:
    p = tmp_path / "h.gguf"
    maker.write_text_model(p, seed=0, weights="f16", n_embd=64, n_head=2, n_head_kv=1, n_layer=2, n_ff=96)
    r = ReferenceLlama(p)
    assert np.isfinite(r.eval(r.new_sequence(), [1, 5, 9])).all()


def test_prompt_in_one_call_equals_token_by_token(ref: ReferenceLlama) -> None:
    prompt = _prompt(ref)
    a = ref.eval(ref.new_sequence(), prompt)
    s = ref.new_sequence()
    b = np.concatenate([ref.eval(s, [t]) for t in prompt])
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-9)


def test_greedy_decoding_does_not_collapse(ref: ReferenceLlama) -> None:
    out = ref.generate(ref.new_sequence(), _prompt(ref), 40)
    assert len(set(out)) > 15


def test_attention_is_not_uniform(ref: ReferenceLlama) -> None:
    s = ref.new_sequence(dict(layer_start=0, layer_end=ref.n_layer))
    ref.generate(s, _prompt(ref, 40), 20)
    for e in s.trace:
        assert 0.0 <= e.z <= math.log(e.pos + 1) + 1e-9
    zs = np.array([e.z for e in s.trace])
    assert zs.std() > 0.1 and zs.max() < 0.9 * math.log(60)


def test_smoothing_step_uses_raw_kv_then_blends(ref: ReferenceLlama) -> None:
    prompt = _prompt(ref)
    p = len(prompt) - 1
    plain = ref.new_sequence()
    base = ref.eval(plain, prompt)
    for mode in ("adaptive", "keys"):
        s = ref.new_sequence(dict(mode=mode))
        # The step's own outputs use the raw K/V: logits are unchanged.
        np.testing.assert_array_equal(ref.eval(s, prompt), base)
        lam = {e.layer: e.lam for e in s.trace}
        assert sorted(lam) == list(range(3, ref.n_layer - 1))
        for il in range(ref.n_layer):
            np.testing.assert_array_equal(s.k[il][:p], plain.k[il][:p])
            if il not in lam:
                np.testing.assert_array_equal(s.k[il], plain.k[il])
                np.testing.assert_array_equal(s.v[il], plain.v[il])
                continue
            l32 = np.float32(lam[il])
            k_exp = (np.float32(1) - l32) * plain.k[il][p] + l32 * plain.k[il][p - 1]
            np.testing.assert_array_equal(s.k[il][p], k_exp)
            if mode == "keys":
                np.testing.assert_array_equal(s.v[il][p], plain.v[il][p])
            else:
                v_exp = (np.float32(1) - l32) * plain.v[il][p] + l32 * plain.v[il][p - 1]
                np.testing.assert_array_equal(s.v[il][p], v_exp)


def test_smoothing_changes_the_generation(ref: ReferenceLlama) -> None:
    prompt = _prompt(ref)
    off = ref.new_sequence()
    on = ref.new_sequence(dict())
    ref.eval(off, prompt)
    ref.eval(on, prompt)
    assert not np.allclose(ref.eval(off, [7]), ref.eval(on, [7]))


def test_adaptive_lambda_is_rank_over_capacity_clipped(ref: ReferenceLlama) -> None:
    prm = KVSmoothParams(lambda_ref=0.5, window=0.3, queue=5, layer_start=0, layer_end=ref.n_layer)
    s = ref.new_sequence(prm)
    ref.generate(s, _prompt(ref), 30)
    by_layer = trace_by_layer(s.trace)
    assert sorted(by_layer) == list(range(ref.n_layer))
    for il, entries in by_layer.items():
        zs: list[float] = []
        for e in entries:
            zs = (zs + [e.z])[-prm.queue:]
            assert e.k == sum(1 for z in zs[:-1] if z < e.z)
            assert 0 <= e.k <= prm.queue - 1
            assert e.lam == pytest.approx(min(max(e.k / prm.queue, 0.2), 0.8))
            assert 0.2 - 1e-12 <= e.lam <= 0.8 + 1e-12
        assert len(s.queues[il]) == prm.queue
    lams = {e.lam for e in s.trace}
    assert len(lams) > 2  # the clip and the rank are both exercised


def test_default_lambda_stays_in_window(ref: ReferenceLlama) -> None:
    s = ref.new_sequence(dict())
    ref.generate(s, _prompt(ref), 30)
    assert s.trace and all(0.7 - 1e-12 <= e.lam <= 1.0 + 1e-12 for e in s.trace)


def test_fixed_mode_uses_lambda_ref(ref: ReferenceLlama) -> None:
    s = ref.new_sequence(dict(mode="fixed", lambda_ref=0.6))
    ref.generate(s, _prompt(ref), 10)
    assert len(s.trace) == 10 * (ref.n_layer - 4)
    assert all(e.lam == 0.6 for e in s.trace)


def test_only_the_final_prompt_token_is_smoothed_however_chunked(ref: ReferenceLlama) -> None:
    prompt = _prompt(ref)
    a = ref.new_sequence(dict())
    la = ref.eval(a, prompt)
    b = ref.new_sequence(dict())
    ref.eval(b, prompt[:10], smooth_last=False)
    lb = ref.eval(b, prompt[10:])
    np.testing.assert_allclose(la[10:], lb, rtol=0, atol=1e-9)
    assert [e.pos for e in a.trace] == [e.pos for e in b.trace] == [len(prompt) - 1] * 2
    for il in range(ref.n_layer):
        np.testing.assert_allclose(a.k[il], b.k[il], rtol=0, atol=1e-6)


def test_first_token_is_not_blended_but_queued(ref: ReferenceLlama) -> None:
    s = ref.new_sequence(dict())
    plain = ref.new_sequence()
    ref.eval(s, [1])
    ref.eval(plain, [1])
    assert all(not e.blended and e.pos == 0 and abs(e.z) < 1e-9 for e in s.trace)
    assert all(len(s.queues[il]) == 1 for il in (3, 4))
    for il in range(ref.n_layer):
        np.testing.assert_array_equal(s.k[il], plain.k[il])


def test_truncate_empties_queues(ref: ReferenceLlama) -> None:
    s = ref.new_sequence(dict())
    ref.generate(s, _prompt(ref), 5)
    s.truncate(10)
    assert s.n_past == 10 and all(not q for q in s.queues)


@pytest.mark.parametrize("bad", [dict(queue=0), dict(mode="both"), dict(layer_start=5, layer_end=3),
                                 dict(layer_end=99)])
def test_bad_params_are_refused(ref: ReferenceLlama, bad: dict) -> None:
    with pytest.raises(ValueError):
        ref.new_sequence(bad)


@pytest.mark.parametrize("cache_type,tol", [("f32", 0.0), ("f16", 1e-3), ("bf16", 8e-3), ("q8_0", 8e-3)])
def test_cache_rounding(cache_type: str, tol: float) -> None:
    x = np.random.default_rng(0).standard_normal((3, 2, 64)).astype(np.float32)
    y = round_to_cache(x, cache_type)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert np.max(np.abs(y - x)) <= tol * np.max(np.abs(x))
    np.testing.assert_array_equal(round_to_cache(y, cache_type), y)  # values representable


def test_quantized_cache_reference_stays_close(model_dir: Path, ref: ReferenceLlama) -> None:
    q = ReferenceLlama(model_dir / maker.TEXT_FILE, cache_type="q8_0")
    prompt = _prompt(ref)
    a = ref.eval(ref.new_sequence(), prompt)
    b = q.eval(q.new_sequence(), prompt)
    assert 0 < np.max(np.abs(a - b)) < 0.1 * np.max(np.abs(a))


def test_test_image_writer(tmp_path: Path) -> None:
    pytest.importorskip("PIL")
    from PIL import Image

    for name in ("a.png", "b.jpg"):
        maker.write_test_image(tmp_path / name, (40, 30), seed=2)
        with Image.open(tmp_path / name) as im:
            assert im.size == (40, 30) and im.mode == "RGB"


def test_attention_rotation_changes_only_the_stored_basis(model_dir: Path, ref: ReferenceLlama) -> None:
    from reference_llama import hadamard

    rot = ReferenceLlama(model_dir / maker.TEXT_FILE, attn_rot=True)
    assert rot.attn_rot and not ref.attn_rot
    prompt = _prompt(ref)
    a, b = ref.new_sequence(dict()), rot.new_sequence(dict())
    np.testing.assert_allclose(ref.eval(a, prompt), rot.eval(b, prompt), rtol=0, atol=1e-4)
    h = hadamard(64)
    for il in range(ref.n_layer):
        np.testing.assert_allclose(b.k[il] @ h, a.k[il], rtol=0, atol=1e-5)  # H·H = I
        np.testing.assert_allclose(b.v[il] @ h, a.v[il], rtol=0, atol=1e-5)
    for x, y in zip(a.trace, b.trace):  # entropies are rotation invariant
        assert (x.pos, x.layer, x.k) == (y.pos, y.layer, y.k) and x.z == pytest.approx(y.z, abs=1e-6)


def test_rotation_default_follows_llama_cpp(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = model_dir / maker.TEXT_FILE
    assert ReferenceLlama(path, cache_type="q8_0").attn_rot
    assert not ReferenceLlama(path, cache_type="f16").attn_rot
    monkeypatch.setenv("LLAMA_ATTN_ROT_DISABLE", "1")
    assert not ReferenceLlama(path, cache_type="q8_0").attn_rot
