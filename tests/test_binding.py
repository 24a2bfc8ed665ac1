"""``pykvsmooth.Llama`` against the NumPy reference and against plain ``llama_cpp.Llama``.

The model is the tiny random LLaVA pair of scripts/make_tiny_llava.py (6 layers, so the
default smoothed layers are 3 and 4). The numeric tests use f32 KV caches, where the native
model and the reference agree to about 1e-5 while KVSmooth on and off differ by about 1:
a token smoothed that should not be (or the reverse) shows at once. Generation is greedy.
"""

from __future__ import annotations

import base64
import warnings
from pathlib import Path
from typing import Any, List

import numpy as np
import pytest

import pykvsmooth  # before llama_cpp: it points llama_cpp at the patched libraries
from pykvsmooth import KVSmoothConfig, KVSmoothError, Llama
import llama_cpp
from llama_cpp.llama_chat_format import Llava15ChatHandler

from conftest import TinyLlava
from reference_llama import ReferenceLlama

REPO = Path(__file__).resolve().parent.parent
GGML_TYPE_F32 = 0
GGML_TYPE_Q4_0 = 2
ATOL = 2e-3  # native f32 vs float64 reference; KVSmooth on vs off differs by ~1
ATOL_FA = 2e-2  # the CPU flash-attention kernel accumulates in f16
TEETH = 0.1  # smoothing must move the reference's logits by more than this
PROMPT = "USER: describe the image in detail\nASSISTANT:"


Fixture = TinyLlava


@pytest.fixture(scope="module")
def fx(tiny_llava: TinyLlava) -> Fixture:
    return tiny_llava


@pytest.fixture(scope="module")
def ref(fx: Fixture) -> ReferenceLlama:
    return ReferenceLlama(fx.text, cache_type="f32")


def make(fx: Fixture, cls: type = Llama, **kwargs: Any) -> llama_cpp.Llama:
    settings: dict[str, Any] = dict(n_ctx=512, n_threads=2, verbose=False, seed=0)
    settings.update(kwargs)
    return cls(str(fx.text), **settings)


def last_logits(llm: llama_cpp.Llama) -> np.ndarray:
    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy()


def tokens(seed: int, n: int, n_vocab: int) -> List[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(3, n_vocab, n)]


def complete(llm: llama_cpp.Llama, prompt: Any, n: int = 24) -> str:
    out = llm.create_completion(prompt, max_tokens=n, temperature=0.0, seed=0)
    return out["choices"][0]["text"]


def image_messages(png: Path, text: str = "Please describe the image in detail.") -> list:
    uri = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                         {"type": "text", "text": text}]}]


# --- numerics: teacher forcing through eval() --------------------------------------------


REF_CASES = {
    # id: (Llama settings, KVSmooth setting)
    "logits_all-chunked": (dict(logits_all=True, n_batch=8), 0.9),
    "last-logits-chunked": (dict(logits_all=False, n_batch=8), 0.9),
    "last-logits-one-batch": (dict(logits_all=False, n_batch=512), 0.9),
    "ubatch-smaller": (dict(logits_all=True, n_batch=32, n_ubatch=8), 0.9),
    "flash-attn": (dict(logits_all=True, n_batch=8, flash_attn=True), 0.9),
    "fixed-all-layers": (dict(n_batch=16), KVSmoothConfig(lambda_ref=0.6, mode="fixed", layer_start=0, layer_end=6)),
    "keys-small-queue": (dict(n_batch=16), KVSmoothConfig(lambda_ref=0.5, window=0.4, queue=4, mode="keys",
                                                         layer_start=1, layer_end=5)),
    # stock ggml ops instead of the KVSmooth op (SPEC 4.2)
    "composed-logits_all-chunked": (dict(logits_all=True, n_batch=8), KVSmoothConfig(impl="composed")),
    "composed-flash-attn": (dict(logits_all=True, n_batch=8, flash_attn=True), KVSmoothConfig(impl="composed")),
}


@pytest.mark.parametrize("case", list(REF_CASES))
def test_eval_matches_reference(fx: Fixture, ref: ReferenceLlama, case: str) -> None:
    """eval(prompt) then eval([t]) for fixed tokens: the last token of each call is smoothed,
    nothing else, however the prompt is chunked; logits and per-layer λ equal the reference's."""
    settings, kvsmooth = REF_CASES[case]
    config = KVSmoothConfig.coerce(kvsmooth)
    assert config is not None
    config = KVSmoothConfig(**{**config.as_dict(), "trace": True})
    llm = make(fx, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, kvsmooth=config, **settings)
    logits_all = settings.get("logits_all", False)
    atol = ATOL_FA if settings.get("flash_attn") else ATOL

    fields = ("lambda_ref", "window", "queue", "mode")
    params = {f: getattr(config, f) for f in fields}
    params["layer_start"] = 3 if config.layer_start is None else config.layer_start
    params["layer_end"] = config.layer_end
    state = ref.new_sequence(kvsmooth=params)
    plain = ref.new_sequence()

    prompt = [1] + tokens(1, 40, ref.n_vocab)
    forced = tokens(2, 8, ref.n_vocab)
    calls = [prompt] + [[t] for t in forced]
    moved = 0.0
    for i, call in enumerate(calls):
        want = ref.eval(state, call)
        want_plain = ref.eval(plain, call)
        llm.eval(call)
        got = last_logits(llm)
        label = f"{case}, call {i}"
        np.testing.assert_allclose(got, want[-1], atol=atol, rtol=0, err_msg=label)
        moved = max(moved, float(np.abs(want[-1] - want_plain[-1]).max()))
        if logits_all:
            pos = llm.n_tokens - len(call)
            np.testing.assert_allclose(llm.scores[pos:llm.n_tokens], want, atol=atol, rtol=0, err_msg=label)

        # the native trace of the last decode: exactly this call's final position, per layer
        pos = llm.n_tokens - 1
        got_trace = {r.layer: r for r in llm.kvsmooth_trace()}
        want_trace = {e.layer: e for e in state.trace if e.pos == pos}
        assert sorted(got_trace) == sorted(want_trace) == list(range(params["layer_start"],
                                                                       state.kvsmooth.layer_end)), label
        for layer, e in want_trace.items():
            r = got_trace[layer]
            assert (r.pos, r.applied) == (pos, e.blended), label
            assert r.lambda_ == pytest.approx(e.lam, abs=1e-6), label
            if config.mode != "fixed":
                assert r.z == pytest.approx(e.z, rel=50 * atol), label
                assert r.rank == e.k, label
    # the test has teeth: smoothing moved the logits far more than the tolerance
    assert moved > max(TEETH, 5 * atol)


def test_generate_matches_reference_greedy(fx: Fixture, ref: ReferenceLlama) -> None:
    llm = make(fx, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, n_batch=8, kvsmooth=0.9)
    prompt = [1] + tokens(3, 30, ref.n_vocab)
    want = ref.generate(ref.new_sequence(kvsmooth=dict(lambda_ref=0.9)), prompt, 16)
    got = []
    for t in llm.generate(prompt, temp=0.0, repeat_penalty=1.0):
        got.append(t)
        if len(got) == 16:
            break
    assert got == want
    assert want != ref.generate(ref.new_sequence(), prompt, 16)


# --- prefix reuse -----------------------------------------------------------------------


@pytest.mark.parametrize("logits_all", [False, True])
def test_prefix_reuse_matches_fresh_object(fx: Fixture, logits_all: bool) -> None:
    """A completion on a used object equals one on a fresh object: same prompt again, a
    prompt sharing a prefix, and a prompt extending the previous prompt and answer."""
    llm = make(fx, n_batch=8, logits_all=logits_all, kvsmooth=0.9)

    def fresh(prompt: str) -> str:
        return complete(make(fx, n_batch=8, logits_all=logits_all, kvsmooth=0.9), prompt)

    first = complete(llm, PROMPT)
    assert complete(llm, PROMPT) == first == fresh(PROMPT)
    other = PROMPT.replace("detail", "the picture")
    assert complete(llm, other) == fresh(other)
    extended = other + complete(llm, other) + "\nUSER: what color is the car\nASSISTANT:"
    assert complete(llm, extended) == fresh(extended)
    assert complete(llm, PROMPT) == first


def test_chat_continuation_matches_fresh_object(fx: Fixture) -> None:
    """Text chat through the GGUF's template: the second turn's prompt extends the first
    turn and its answer; the reused object must answer as a fresh one does."""
    llm = make(fx, kvsmooth=0.9)
    turn = [{"role": "user", "content": "describe the picture"}]

    def chat(model: llama_cpp.Llama, messages: list) -> str:
        out = model.create_chat_completion(messages=messages, max_tokens=20, temperature=0.0, seed=0)
        return out["choices"][0]["message"]["content"]

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "prompt ends with an image" for a text handler
        complete(llm, "hello there", 4)
        first = chat(llm, turn)
        second_turn = turn + [{"role": "assistant", "content": first},
                              {"role": "user", "content": "what color is the dog"}]
        second = chat(llm, second_turn)
    assert first == chat(make(fx, kvsmooth=0.9), turn)
    assert second == chat(make(fx, kvsmooth=0.9), second_turn)
    assert first != chat(make(fx), turn)


def test_saved_state_keeps_track_of_smoothed_cells(fx: Fixture) -> None:
    llm = make(fx, kvsmooth=0.9)
    first = complete(llm, PROMPT)
    saved = llm.save_state()
    llm.kvsmooth = None
    complete(llm, "the dog")  # no smoothed cells left after this one
    llm.kvsmooth = 0.9
    llm.load_state(saved)  # ... but the restored ones are
    extended = PROMPT + first + "\nUSER: and the dog\nASSISTANT:"
    assert complete(llm, extended) == complete(make(fx, kvsmooth=0.9), extended)


# --- configuration at runtime, and KVSmooth off -------------------------------------------


def test_setter_switches_at_runtime(fx: Fixture) -> None:
    llm = make(fx, n_batch=8)
    assert llm.kvsmooth is None
    off = complete(llm, PROMPT)

    llm.kvsmooth = 0.9
    assert llm.kvsmooth == KVSmoothConfig(lambda_ref=0.9)
    assert pykvsmooth._capi.llama_kvsmooth_enabled(llm.ctx)
    on = complete(llm, PROMPT)
    assert on != off
    assert on == complete(make(fx, n_batch=8, kvsmooth=0.9), PROMPT)

    for value in (None, 0, 0.0, False):
        llm.kvsmooth = value
        assert llm.kvsmooth is None
        assert not pykvsmooth._capi.llama_kvsmooth_enabled(llm.ctx)
        assert complete(llm, PROMPT) == off  # the smoothed answer's cells are not reused

    llm.kvsmooth = {"lambda_ref": 0.5, "mode": "fixed"}
    assert llm.kvsmooth == KVSmoothConfig(lambda_ref=0.5, mode="fixed")
    fixed = complete(llm, PROMPT)
    assert fixed == complete(make(fx, n_batch=8, kvsmooth=KVSmoothConfig(lambda_ref=0.5, mode="fixed")), PROMPT)
    llm.kvsmooth = True
    assert llm.kvsmooth == KVSmoothConfig()
    assert complete(llm, PROMPT) == on


@pytest.mark.parametrize("off", [None, 0, False])
def test_off_is_bit_identical_to_llama_cpp(fx: Fixture, off: Any) -> None:
    prompt = [1] + tokens(5, 20, 400) + [7]
    ours = make(fx, logits_all=True, n_batch=8, kvsmooth=off)
    theirs = make(fx, llama_cpp.Llama, logits_all=True, n_batch=8)
    ours.eval(prompt)
    theirs.eval(prompt)
    assert np.array_equal(ours.scores[:ours.n_tokens], theirs.scores[:theirs.n_tokens])
    assert complete(ours, PROMPT) == complete(theirs, PROMPT)
    assert complete(ours, PROMPT) == complete(theirs, PROMPT)


# --- validation and errors ------------------------------------------------------------------


@pytest.mark.parametrize("fields, message", [
    (dict(lambda_ref=1.5), r"lambda_ref must be in \[0, 1\], got 1.5"),
    (dict(lambda_ref=-0.1), r"lambda_ref must be in \[0, 1\]"),
    (dict(lambda_ref=float("nan")), r"lambda_ref must be a number"),
    (dict(lambda_ref="0.9"), r"lambda_ref must be a number, got '0.9'"),
    (dict(window=-0.2), r"window must be >= 0"),
    (dict(queue=0), r"queue must be an integer in \[1, 256\], got 0"),
    (dict(queue=2.5), r"queue must be an integer"),
    (dict(queue=True), r"queue must be an integer"),
    (dict(layer_start=-1), r"layer_start must be None or an integer >= 0"),
    (dict(layer_start=4, layer_end=4), r"layer range \[4, 4\) is empty"),
    (dict(mode="value"), r"mode must be one of adaptive, fixed, keys, got 'value'"),
    (dict(eps=1.0), r"eps must be in \[0, 1\)"),
    (dict(impl="gpu"), r"impl must be one of auto, fused, composed, got 'gpu'"),
])
def test_config_validation_names_the_field(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KVSmoothConfig(**fields)


def test_bad_kvsmooth_values_fail_before_the_model_loads(fx: Fixture) -> None:
    with pytest.raises(ValueError, match="lambda_ref must be in"):
        Llama("/nonexistent.gguf", kvsmooth=2.0)
    with pytest.raises(ValueError, match="unknown KVSmooth field.*lamda_ref"):
        Llama("/nonexistent.gguf", kvsmooth={"lamda_ref": 0.9})
    with pytest.raises(TypeError, match="kvsmooth must be"):
        Llama("/nonexistent.gguf", kvsmooth="0.9")


def test_c_errors_become_exceptions(fx: Fixture) -> None:
    with pytest.raises(KVSmoothError, match="KV cache type K = q4_0.*allowed types are f32, f16, bf16, q8_0"):
        make(fx, type_k=GGML_TYPE_Q4_0, kvsmooth=0.9)

    llm = make(fx, kvsmooth=0.7)
    # the fixture has 6 layers: Python cannot know that, llama.cpp refuses
    with pytest.raises(KVSmoothError, match=r"layer range.*n_layer = 6"):
        llm.kvsmooth = KVSmoothConfig(layer_start=2, layer_end=40)
    # a refused setting leaves the previous one in force, on both sides
    assert llm.kvsmooth == KVSmoothConfig(lambda_ref=0.7)
    assert pykvsmooth._capi.llama_kvsmooth_enabled(llm.ctx)
    assert complete(llm, PROMPT) == complete(make(fx, kvsmooth=0.7), PROMPT)


# --- chat completion with an image (Llava15ChatHandler, mtmd) ------------------------------


def make_llava(fx: Fixture, kvsmooth: Any) -> Llama:
    handler = Llava15ChatHandler(clip_model_path=str(fx.mmproj), verbose=False)
    return make(fx, chat_handler=handler, n_ctx=1024, n_batch=64, kvsmooth=kvsmooth)


def chat_image(llm: llama_cpp.Llama, fx: Fixture, **kwargs: Any) -> dict:
    return llm.create_chat_completion(messages=image_messages(fx.png), max_tokens=24, temperature=0.0,
                                      seed=0, **kwargs)


def test_chat_with_image(fx: Fixture) -> None:
    on = make_llava(fx, 0.9)
    first = chat_image(on, fx)
    text = first["choices"][0]["message"]["content"]
    assert text == chat_image(on, fx)["choices"][0]["message"]["content"]  # reused object
    assert text == chat_image(make_llava(fx, 0.9), fx)["choices"][0]["message"]["content"]
    assert text != chat_image(make_llava(fx, None), fx)["choices"][0]["message"]["content"]

    # the prompt: system text, image embeddings, question; KVSmooth smooths exactly its final
    # token at the first step, then each generated token (the trace holds the last decode)
    traced = make_llava(fx, KVSmoothConfig(trace=True))
    steps: List[List[pykvsmooth.TraceRecord]] = []

    def record(input_ids: np.ndarray, logits: np.ndarray) -> np.ndarray:
        steps.append(traced.kvsmooth_trace())
        return logits

    out = chat_image(traced, fx, logits_processor=llama_cpp.LogitsProcessorList([record]))
    assert out["choices"][0]["message"]["content"] == text
    n_prompt = out["usage"]["prompt_tokens"]
    assert n_prompt > 49  # the fixture's image alone is 49 embeddings
    assert len(steps) == out["usage"]["completion_tokens"]
    for i, records in enumerate(steps):
        assert {(r.pos, r.layer) for r in records} == {(n_prompt - 1 + i, 3), (n_prompt - 1 + i, 4)}, i


# --- the Python layer's own bookkeeping (issue 13) -----------------------------------------


def first_tokens(llm: llama_cpp.Llama, prompt: List[int], n: int, **kwargs: Any) -> List[int]:
    """The first n greedy tokens of llm.generate(prompt); the n-th is not fed back."""
    out: List[int] = []
    for t in llm.generate(prompt, temp=0.0, repeat_penalty=1.0, **kwargs):
        out.append(t)
        if len(out) == n:
            break
    return out


def test_draft_model_is_refused_not_a_crash(fx: Fixture) -> None:
    """Speculative decoding removes rejected draft tokens, which empties the entropy queues:
    not what decoding one token at a time gives (SPEC §2), so KVSmooth refuses it (before,
    the split decode lacked the drafts' logits and GGML_ASSERT aborted the process)."""
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    with pytest.raises(KVSmoothError, match="does not support draft_model"):
        make(fx, draft_model=LlamaPromptLookupDecoding(num_pred_tokens=2), kvsmooth=0.9)
    drafted = make(fx, draft_model=LlamaPromptLookupDecoding(num_pred_tokens=2))
    with pytest.raises(KVSmoothError, match="does not support draft_model"):
        drafted.kvsmooth = 0.9
    assert drafted.kvsmooth is None and not pykvsmooth._capi.llama_kvsmooth_enabled(drafted.ctx)
    assert complete(drafted, PROMPT, 8) == complete(make(fx, llama_cpp.Llama), PROMPT, 8)

    llm = make(fx, kvsmooth=0.9)
    llm.draft_model = LlamaPromptLookupDecoding(num_pred_tokens=2)
    with pytest.raises(KVSmoothError, match="Use draft_model=None with KVSmooth"):
        complete(llm, PROMPT, 8)


def test_generate_without_reset_continues_after_the_answer(fx: Fixture) -> None:
    """generate(tokens, reset=False) appends to what is cached, the previous answer included;
    its smoothed cells are evaluated again as prompt tokens, so the result is a fresh
    object's on the whole token sequence."""
    prompt = [1] + tokens(11, 30, 400)
    extra = tokens(12, 7, 400)
    llm = make(fx, n_batch=8, kvsmooth=0.9)
    answer = first_tokens(llm, prompt, 6)  # the first five are fed back
    assert llm.n_tokens == len(prompt) + 5
    more = first_tokens(llm, extra, 4, reset=False)
    whole = prompt + answer[:5] + extra
    assert llm.n_tokens == len(whole) + 3
    assert llm._input_ids.tolist()[:len(whole)] == whole
    assert more == first_tokens(make(fx, n_batch=8, kvsmooth=0.9), whole, 4)


def test_prompt_cut_before_smoothed_cells_is_evaluated_again(fx: Fixture) -> None:
    """A prompt equal to the previous prompt minus its (smoothed) final token: the cells are
    cut there, and the next token must come from a new decode, not the previous logits."""
    prompt = [1] + tokens(13, 25, 400)
    llm = make(fx, kvsmooth=0.9)
    first_tokens(llm, prompt, 8)
    shorter = prompt[:-1]
    got = first_tokens(llm, shorter, 1)
    fresh = make(fx, kvsmooth=0.9)
    assert got == first_tokens(fresh, shorter, 1)
    np.testing.assert_allclose(last_logits(llm), last_logits(fresh), atol=ATOL, rtol=0)


def test_switching_on_over_a_cached_prompt_smooths_its_final_token(fx: Fixture) -> None:
    """The same prompt again, after KVSmooth was switched on (or changed): the cached prompt
    cells are prompt cells either way, but the final token is a generation step and must be
    evaluated again under the new setting; the tokens after it attend to its smoothed cell."""
    prompt = [1] + tokens(14, 25, 400)
    llm = make(fx)
    first_tokens(llm, prompt, 1)  # caches exactly the prompt, its final token unsmoothed
    off = make(fx)
    first_tokens(off, prompt, 4)
    for setting in (0.9, KVSmoothConfig(lambda_ref=0.5, mode="fixed")):
        llm.kvsmooth = setting
        got = first_tokens(llm, prompt, 4)
        fresh = make(fx, kvsmooth=setting)
        assert got == first_tokens(fresh, prompt, 4)
        np.testing.assert_allclose(last_logits(llm), last_logits(fresh), atol=ATOL, rtol=0)
        assert np.abs(last_logits(fresh) - last_logits(off)).max() > TEETH
        first_tokens(llm, prompt, 1)  # the prompt alone cached again, for the next setting


def test_reset_forgets_smoothed_cells(fx: Fixture) -> None:
    llm = make(fx, kvsmooth=0.9)
    complete(llm, PROMPT, 4)
    assert llm.save_state().kvsmooth_first_smoothed is not None  # type: ignore[attr-defined]
    llm.reset()
    assert llm.save_state().kvsmooth_first_smoothed is None  # type: ignore[attr-defined]


def test_prompts_do_not_reconfigure_kvsmooth(fx: Fixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Prompt tokens are evaluated with smoothing paused (llama_kvsmooth_pause), not by
    disabling and enabling it: that rebuilt the graph and re-reserved the scheduler twice
    per prompt."""
    calls: List[str] = []
    for name in ("llama_kvsmooth_set", "llama_kvsmooth_disable"):
        real = getattr(pykvsmooth._capi, name)
        monkeypatch.setattr(pykvsmooth._capi, name,
                            lambda *a, _real=real, _name=name: (calls.append(_name), _real(*a))[1])
    llm = make(fx, n_batch=8, kvsmooth=0.9)
    assert calls == ["llama_kvsmooth_set"]
    text = complete(llm, PROMPT, 8)
    complete(llm, PROMPT.replace("detail", "the picture"), 8)
    assert calls == ["llama_kvsmooth_set"]
    assert not pykvsmooth._capi.llama_kvsmooth_paused(llm.ctx)
    assert text == complete(make(fx, n_batch=8, kvsmooth=0.9), PROMPT, 8)


def test_errors_come_from_llama_cpp_without_replacing_the_log_callback(fx: Fixture) -> None:
    """The refusal's reason comes from llama_kvsmooth_last_error; the application's log
    callback stays installed and sees llama.cpp's error line too."""
    import llama_cpp._logger

    seen: List[str] = []

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, user_data: Any) -> None:
        seen.append(text.decode("utf-8", "replace"))

    llm = make(fx, kvsmooth=0.9)
    llama_cpp.llama_log_set(callback, None)
    try:
        with pytest.raises(KVSmoothError, match=r"invalid parameter: .*layer range.*n_layer = 6"):
            llm.kvsmooth = KVSmoothConfig(layer_start=2, layer_end=40)
        assert any("n_layer = 6" in line for line in seen)
        llm.kvsmooth = 0.5
        seen.clear()
        with pytest.raises(KVSmoothError, match="layer range"):
            llm.kvsmooth = KVSmoothConfig(layer_start=7)
        assert any("layer" in line for line in seen)  # still ours after a success
    finally:
        llama_cpp.llama_log_set(llama_cpp._logger.llama_log_callback, None)
    assert llm.kvsmooth == KVSmoothConfig(lambda_ref=0.5)
