"""The Python front ends with the other families (issue 12, item 5): `kvsmooth-caption` and
`Llama.describe_image` caption a tiny Qwen2-VL, Gemma 3 and LFM2-VL pair with the chat handler
`--chat-format auto` picks (llama-cpp-python's generic MTMDChatHandler, which reads the GGUF's
own chat template), and SPEC §2 holds through that handler: the smoothed positions are exactly
the final prompt token and the generated tokens fed back, and a second completion on the same
object equals the first (no smoothed cell is reused as a prompt cell).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Sequence

import pytest

import make_tiny_lfm2
import make_tiny_llava

from conftest import TinyFamily

N_PREDICT = 12
PROMPT = "Describe the image."


@pytest.fixture(scope="module")
def tiny_lfm2(tmp_path_factory: pytest.TempPathFactory) -> TinyFamily:
    d = tmp_path_factory.mktemp("tiny-lfm2-vl")
    text, mmproj = make_tiny_lfm2.write_pair(d)
    make_tiny_llava.write_test_image(d / "picture.png", size=(64, 48), seed=0)
    return TinyFamily(d, text, mmproj, d / "picture.png")


FAMILIES = ["tiny_qwen2vl", "tiny_gemma3", "tiny_lfm2"]


@dataclass
class Step:
    n_past: int          # cells before this eval
    tokens: List[int]
    smoothed: List[int]  # positions in this eval's trace (one per smoothed layer)


def traced_llama(pair: TinyFamily) -> Any:
    """pykvsmooth.Llama with the handler `auto` picks and KVSmooth tracing, recording every
    eval and the positions its decode smoothed."""
    from pykvsmooth import KVSmoothConfig, Llama
    from pykvsmooth.handlers import choose_chat_format, make_chat_handler

    chat_format = choose_chat_format(pair.text, pair.mmproj)
    assert chat_format != "llava-1-5"  # these are not LLaVA projectors: the generic handler

    class Traced(Llama):
        steps: List[Step]

        def eval(self, tokens: Sequence[int]) -> None:
            n_past = self.n_tokens
            super().eval(tokens)
            self.steps.append(Step(n_past, list(tokens), [r.pos for r in self.kvsmooth_trace()]))

    llm = Traced(model_path=str(pair.text), chat_handler=make_chat_handler(chat_format, pair.mmproj),
                 n_ctx=1024, n_batch=512, n_threads=1, verbose=False,
                 kvsmooth=KVSmoothConfig(lambda_ref=0.9, trace=True))
    llm.steps = []
    return llm


@pytest.mark.parametrize("family", FAMILIES)
def test_describe_image_smooths_final_prompt_token_and_generated(family: str,
                                                                 request: pytest.FixtureRequest) -> None:
    pair: TinyFamily = request.getfixturevalue(family)
    # LFM2's short-conv layers are a recurrent memory: it can drop the final prompt token (to
    # evaluate it again as the first generation step) because pykvsmooth.Llama gives hybrid
    # models one recurrent-state snapshot (n_rs_seq); no warning for any family
    recurrent = False
    llm = traced_llama(pair)
    try:
        png = pair.png.read_bytes()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first = llm.describe_image(png, PROMPT, max_tokens=N_PREDICT)
        assert any("final prompt token" in str(w.message) for w in caught) == recurrent
        steps = llm.steps
        n_prompt = first.prompt_tokens
        smoothed = sorted({p for s in steps for p in s.smoothed})
        # generated tokens fed back: every single-token eval after the prompt, in order
        fed_back = [s.n_past for s in steps if s.n_past >= n_prompt and len(s.tokens) == 1]
        assert first.completion_tokens >= 1
        final = [] if recurrent else [n_prompt - 1]
        assert smoothed == final + fed_back, (n_prompt, smoothed, fed_back)
        assert len(fed_back) in (first.completion_tokens - 1, first.completion_tokens)
        # every smoothed position in one decode of its own, nothing smoothed inside the prompt
        for s in steps:
            assert all(p >= n_prompt - 1 for p in s.smoothed)

        # a second completion on the warm object equals the first (SPEC §2)
        llm.steps = []
        second = llm.describe_image(png, PROMPT, max_tokens=N_PREDICT)
        assert second == first
        assert sorted({p for s in llm.steps for p in s.smoothed}) == smoothed
    finally:
        llm.close()


def _caption(pair: TinyFamily, out: Path, *extra: str) -> list[dict[str, Any]]:
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "pykvsmooth.caption", "-m", str(pair.text), "--mmproj", str(pair.mmproj),
           str(pair.png), "--out", str(out), "--prompt", PROMPT, "--max-tokens", str(N_PREDICT),
           "--threads", "1", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(line) for line in out.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("family", FAMILIES)
def test_kvsmooth_caption_captions_with_the_generic_handler(family: str, request: pytest.FixtureRequest,
                                                            tmp_path: Path) -> None:
    """`kvsmooth-caption` with no chat format named: the same caption as describe_image above
    (same handler, same settings), and the baseline run is a different, unsmoothed one."""
    pair: TinyFamily = request.getfixturevalue(family)
    [rec] = _caption(pair, tmp_path / "on.jsonl", "--kvsmooth", "0.9")
    assert rec.get("error") in (None, ""), rec
    llm = traced_llama(pair)
    try:
        want = llm.describe_image(pair.png.read_bytes(), PROMPT, max_tokens=N_PREDICT)
    finally:
        llm.close()
    assert rec["caption"] == want.text


def test_server_picks_the_generic_handler_when_none_is_named(tiny_gemma3: TinyFamily, tmp_path: Path) -> None:
    """`python -m pykvsmooth.server` with an mmproj and no --chat_format: the handler `auto`
    picks, and the same answer as describe_image with the same settings."""
    import base64
    import socket
    import time
    import urllib.error
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    log = tmp_path / "server.log"
    cmd = [sys.executable, "-m", "pykvsmooth.server", "--model", str(tiny_gemma3.text),
           "--clip_model_path", str(tiny_gemma3.mmproj), "--n_ctx", "1024", "--n_threads", "1",
           "--verbose", "False", "--port", str(port), "--kvsmooth", "0.9"]
    env = {k: v for k, v in os.environ.items() if k not in ("HOST", "PORT", "API_KEY")}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(url + "/v1/models", timeout=5):
                    break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
        uri = "data:image/png;base64," + base64.b64encode(tiny_gemma3.png.read_bytes()).decode()
        body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                                          {"type": "text", "text": PROMPT}]}],
                "max_tokens": N_PREDICT, "temperature": 0.0, "top_k": 1, "repeat_penalty": 1.0}
        req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            answer = json.loads(r.read())["choices"][0]["message"]["content"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    llm = traced_llama(tiny_gemma3)
    try:
        want = llm.describe_image(tiny_gemma3.png.read_bytes(), PROMPT, max_tokens=N_PREDICT)
    finally:
        llm.close()
    assert (answer or "").strip() == want.text


def test_hybrid_without_snapshot_warns_and_still_captions(tiny_lfm2: TinyFamily) -> None:
    """KVSmooth switched on after construction on a hybrid model: no snapshot was made, so the
    final prompt token cannot be evaluated again; it stays unsmoothed, with a warning, and the
    generated tokens are smoothed (no llama_decode failure)."""
    from pykvsmooth import KVSmoothConfig, Llama
    from pykvsmooth.handlers import make_chat_handler

    llm = Llama(model_path=str(tiny_lfm2.text), chat_handler=make_chat_handler("mtmd", tiny_lfm2.mmproj),
                n_ctx=1024, n_threads=1, verbose=False)
    try:
        llm.kvsmooth = KVSmoothConfig(lambda_ref=0.9)
        with pytest.warns(RuntimeWarning, match="final prompt token"):
            answer = llm.describe_image(tiny_lfm2.png.read_bytes(), PROMPT, max_tokens=N_PREDICT)
        assert answer.completion_tokens >= 1
    finally:
        llm.close()
