"""`llama-server --kvsmooth` (issue 15) over loopback with the tiny LLaVA fixture.

The official ``openai`` client sends image + text chat requests (streaming and not) with
and without the per-request ``kvsmooth`` field; four concurrent requests with four settings
on a ``--parallel 4`` server each equal the same request alone on a fresh server; a warm
slot (the same request again, and a second turn whose prompt holds the first answer) equals
a fresh server; a stream cut by the client leaves no setting behind; bad values are refused
with 400 naming the field. Greedy decoding (temperature 0, fixed seed), a few tokens, one
thread per server. The program is taken from PYKVSMOOTH_BIN_DIR, else pykvsmooth/bin, else
PATH; a missing program fails the tests (a broken install). Servers are this test's
subprocesses on 127.0.0.1; every request has a timeout.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest
from conftest import TinyLlava
from server_process import ServerProcess, program, start_listening

START_TIMEOUT_S = 120
REQUEST_TIMEOUT_S = 120
MAX_TOKENS = 24
N_PARALLEL = 4
PROMPT = "Please describe the image in detail."
ABSENT = object()

# four settings whose greedy answers differ on the fixture (checked below)
SETTINGS: List[Any] = [
    False,
    0.9,
    {"lambda_ref": 1.0, "mode": "fixed"},
    {"lambda_ref": 0.3, "mode": "keys"},
]


def clean_env() -> Dict[str, str]:
    # a LLAMA_ARG_* variable in the caller's environment would change every server
    return {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_ARG_")}


Server = ServerProcess


def server_args(fx: TinyLlava, *extra: str, model_only: bool = False, ctx: int = 1024,
                parallel: int = N_PARALLEL) -> List[str]:
    model = ["-m", str(fx.text)] + ([] if model_only else ["--mmproj", str(fx.mmproj)])
    return [*model, "-c", str(ctx * parallel), "--parallel", str(parallel),
            "-t", "1", "-tb", "1", "--no-warmup", "--seed", "1", *extra]


LISTENING = re.compile(r"listening on http://127\.0\.0\.1:(\d+)")


def start(fx: TinyLlava, tmp: Path, *extra: str, env: Optional[Dict[str, str]] = None, **kw: Any) -> Server:
    return launch(server_args(fx, *extra, **kw), tmp, env)


def launch(args: List[str], tmp: Path, env: Optional[Dict[str, str]] = None) -> Server:
    """llama-server ARGS on 127.0.0.1 and a port the system picks, once /health answers 200."""
    def healthy(url: str) -> bool:
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    log = Path(tempfile.mkstemp(prefix="llama-server-", suffix=".log", dir=tmp)[1])
    return start_listening([program("llama-server"), *args, "--host", "127.0.0.1", "--port", "0"], log,
                           env or clean_env(), LISTENING, healthy, START_TIMEOUT_S)


def started(fx: TinyLlava, tmp: Path, *extra: str, **kw: Any) -> Iterator[Server]:
    s = start(fx, tmp, *extra, **kw)
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("llama-server")


@pytest.fixture(scope="module")
def off_server(tiny_llava: TinyLlava, tmp: Path) -> Iterator[Server]:
    """Started without --kvsmooth: requests turn it on for their slot."""
    yield from started(tiny_llava, tmp)


@pytest.fixture(scope="module")
def on_server(tiny_llava: TinyLlava, tmp: Path) -> Iterator[Server]:
    yield from started(tiny_llava, tmp, "--kvsmooth", "0.9")


def picture_uri(fx: TinyLlava) -> str:
    return "data:image/png;base64," + base64.b64encode(fx.png.read_bytes()).decode()


def messages(fx: TinyLlava, text: str = PROMPT) -> List[Dict[str, Any]]:
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": picture_uri(fx)}},
        {"type": "text", "text": text}]}]


def client(s: Server) -> Any:
    import openai

    return openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=REQUEST_TIMEOUT_S)


def body_extra(kvsmooth: Any, id_slot: Optional[int]) -> Dict[str, Any]:
    extra: Dict[str, Any] = {"top_k": 1, "repeat_penalty": 1.0}
    if kvsmooth is not ABSENT:
        extra["kvsmooth"] = kvsmooth
    if id_slot is not None:
        extra["id_slot"] = id_slot
    return extra


def chat(s: Server, msgs: List[Dict[str, Any]], kvsmooth: Any = ABSENT, *, stream: bool = False,
         id_slot: Optional[int] = None, max_tokens: int = MAX_TOKENS) -> str:
    args: Dict[str, Any] = dict(model="tiny", messages=msgs, max_tokens=max_tokens, temperature=0, seed=1,
                                extra_body=body_extra(kvsmooth, id_slot))
    if not stream:
        r = client(s).chat.completions.create(**args)
        text = r.choices[0].message.content
        assert isinstance(text, str)
        return text
    parts = []
    for chunk in client(s).chat.completions.create(stream=True, **args):
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    return "".join(parts)


def post(s: Server, path: str, body: Any) -> Tuple[int, Any]:
    req = urllib.request.Request(s.url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(s: Server, path: str) -> Any:
    with urllib.request.urlopen(s.url + path, timeout=REQUEST_TIMEOUT_S) as r:
        return json.loads(r.read())


def alone(fx: TinyLlava, tmp: Path, msgs: List[Dict[str, Any]], kvsmooth: Any, *extra: str) -> str:
    """The answer of a fresh server to one request."""
    s = start(fx, tmp, *extra)
    try:
        return chat(s, msgs, kvsmooth)
    finally:
        s.stop()


@pytest.fixture(scope="module")
def fresh(tiny_llava: TinyLlava, tmp: Path) -> List[str]:
    """SETTINGS[i]'s answer on a fresh server without --kvsmooth, one server each."""
    return [alone(tiny_llava, tmp, messages(tiny_llava), v) for v in SETTINGS]


# --- the program ------------------------------------------------------------------------------


def test_help_lists_the_flags() -> None:
    r = subprocess.run([program("llama-server"), "--help"], capture_output=True, text=True, timeout=60,
                       env=clean_env())
    assert r.returncode == 0, r.stderr[-2000:]
    for flag in ("--kvsmooth ", "--kvsmooth-window", "--kvsmooth-queue", "--kvsmooth-layers", "--kvsmooth-mode",
                 "LLAMA_ARG_KVSMOOTH", "LLAMA_ARG_KVSMOOTH_MODE"):
        assert flag in r.stdout, f"{flag} missing from llama-server --help"


def test_console_script_runs_the_installed_program() -> None:
    # `llama-server` on PATH is this entry point (pyproject.toml [project.scripts])
    code = ("import sys; sys.argv = ['llama-server', '--help']\n"
            "from pykvsmooth._programs import llama_server; llama_server()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=clean_env())
    assert r.returncode == 0, r.stderr[-2000:]
    assert "--kvsmooth-window" in r.stdout


def test_props_report_the_servers_setting(off_server: Server, on_server: Server) -> None:
    assert get(off_server, "/props")["kvsmooth"]["enabled"] is False
    kv = get(on_server, "/props")["kvsmooth"]
    assert kv["enabled"] is True and kv["lambda_ref"] == pytest.approx(0.9) and kv["mode"] == "adaptive"
    assert kv["window"] == 0.2 and kv["queue"] == 15 and kv["lambda_ref"] == 0.9


def test_built_without_its_web_page(off_server: Server) -> None:
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(off_server.url + "/", timeout=REQUEST_TIMEOUT_S)
    assert info.value.code == 404


def test_environment_variables(tiny_llava: TinyLlava, tmp: Path) -> None:
    env = clean_env() | {"LLAMA_ARG_KVSMOOTH": "0.7", "LLAMA_ARG_KVSMOOTH_MODE": "fixed"}
    s = start(tiny_llava, tmp, env=env)
    try:
        kv = get(s, "/props")["kvsmooth"]
        assert kv["enabled"] is True and kv["lambda_ref"] == pytest.approx(0.7) and kv["mode"] == "fixed"
    finally:
        s.stop()


# --- per-request settings -----------------------------------------------------------------------


def test_settings_give_different_answers(fresh: List[str]) -> None:
    assert all(a.strip() for a in fresh), fresh
    assert len(set(fresh)) == len(fresh), f"two settings gave the same greedy answer: {fresh}"


def test_chat_with_image_and_request_field(off_server: Server, on_server: Server, tiny_llava: TinyLlava,
                                           fresh: List[str]) -> None:
    msgs = messages(tiny_llava)
    off, on = fresh[0], fresh[1]
    assert chat(off_server, msgs) == off
    assert chat(off_server, msgs, 0.9) == on
    assert chat(off_server, msgs, 0) == off
    assert chat(off_server, msgs, True) == on            # the flags' defaults: 0.9 adaptive
    assert chat(off_server, msgs, None) == off           # null: the server's setting
    # a --kvsmooth 0.9 server: its setting by default, off on request
    assert chat(on_server, msgs) == on
    assert chat(on_server, msgs, True) == on
    assert chat(on_server, msgs, False) == off
    assert chat(on_server, msgs, {"mode": "fixed", "lambda_ref": 1.0}) == fresh[2]


def test_streamed_chat(off_server: Server, on_server: Server, tiny_llava: TinyLlava, fresh: List[str]) -> None:
    msgs = messages(tiny_llava)
    assert chat(off_server, msgs, 0.9, stream=True) == fresh[1]
    assert chat(off_server, msgs, stream=True) == fresh[0]
    assert chat(on_server, msgs, False, stream=True) == fresh[0]
    assert chat(on_server, msgs, stream=True) == fresh[1]


def test_four_concurrent_requests_each_as_alone(off_server: Server, tiny_llava: TinyLlava,
                                                fresh: List[str]) -> None:
    msgs = messages(tiny_llava)
    start_of_log = len(off_server.log_text())
    with ThreadPoolExecutor(N_PARALLEL) as pool:
        for _ in range(2):
            answers = list(pool.map(lambda v: chat(off_server, msgs, v), SETTINGS))
            assert answers == fresh
    # the slots were busy at the same time, so their tokens shared batches
    busy: set = set()
    most = 0
    for line in off_server.log_text()[start_of_log:].splitlines():
        m = re.search(r"(launch_slot_|release): id +(\d+) ", line)
        if m:
            (busy.add if m.group(1) == "launch_slot_" else busy.discard)(m.group(2))
            most = max(most, len(busy))
    assert most >= 2, "the four requests never overlapped"


def test_completion_endpoints(off_server: Server, on_server: Server) -> None:
    def complete(s: Server, path: str, **extra: Any) -> str:
        body = {"prompt": "USER: Tell me a story. ASSISTANT:", "temperature": 0, "seed": 1, "top_k": 1, **extra}
        body["n_predict" if path == "/completion" else "max_tokens"] = MAX_TOKENS
        status, r = post(s, path, body)
        assert status == 200, r
        return r["content"] if path == "/completion" else r["choices"][0]["text"]

    for path in ("/completion", "/v1/completions"):
        off = complete(off_server, path)
        on = complete(on_server, path)
        assert on != off
        assert complete(off_server, path, kvsmooth=0.9) == on
        assert complete(on_server, path, kvsmooth=False) == off
        assert complete(off_server, path) == off


# --- SPEC §2: warm slots ------------------------------------------------------------------------


def test_warm_slot_gives_a_fresh_servers_answer(off_server: Server, tiny_llava: TinyLlava, tmp: Path,
                                                fresh: List[str]) -> None:
    msgs = messages(tiny_llava)
    # the same request again on the same slot: its cache holds the prompt and the smoothed answer
    for _ in range(2):
        assert chat(off_server, msgs, 0.9, id_slot=1) == fresh[1]
    # a second turn: its prompt holds the first answer, which the slot's cache holds smoothed
    turn2 = msgs + [{"role": "assistant", "content": fresh[1]},
                    {"role": "user", "content": "What colours are in it?"}]
    expected = alone(tiny_llava, tmp, turn2, 0.9)
    assert chat(off_server, turn2, 0.9, id_slot=1) == expected
    assert chat(off_server, turn2, 0.9, id_slot=1) == expected
    # and with KVSmooth off on the slot that held smoothed cells
    assert chat(off_server, msgs, False, id_slot=1) == fresh[0]


def test_cut_stream_leaves_no_setting_behind(off_server: Server, tiny_llava: TinyLlava, fresh: List[str]) -> None:
    body = {"model": "tiny", "messages": messages(tiny_llava), "max_tokens": 400, "temperature": 0, "seed": 1,
            "stream": True, "kvsmooth": {"lambda_ref": 0.9, "mode": "keys"}, "id_slot": 2, "top_k": 1}
    conn = http.client.HTTPConnection("127.0.0.1", off_server.port, timeout=REQUEST_TIMEOUT_S)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200
    got = 0
    while got < 3:
        line = r.readline()
        assert line, "the stream ended early"
        got += line.startswith(b"data: ")
    conn.close()  # the client goes away mid-answer
    # the next request on that slot, without the field, gets the server's setting: off
    assert chat(off_server, messages(tiny_llava), id_slot=2) == fresh[0]
    assert chat(off_server, messages(tiny_llava), False, id_slot=2) == fresh[0]


def test_prompt_cache_gives_fresh_answers(tiny_llava: TinyLlava, tmp: Path) -> None:
    # one slot: each new prompt moves the slot's cache into the host prompt cache (--cache-ram),
    # from which the first prompt's tokens come back
    def complete(s: Server, prompt: str) -> str:
        body = {"prompt": prompt, "n_predict": MAX_TOKENS, "temperature": 0, "seed": 1, "kvsmooth": 0.9}
        status, r = post(s, "/completion", body)
        assert status == 200, r
        return str(r["content"])

    first, second = "USER: Tell me a story about a cat. ASSISTANT:", "USER: What is a dog? ASSISTANT:"
    fresh_server = start(tiny_llava, tmp, model_only=True, parallel=1)
    try:
        expected = complete(fresh_server, first)
    finally:
        fresh_server.stop()
    s = start(tiny_llava, tmp, model_only=True, parallel=1)
    try:
        assert complete(s, first) == expected
        complete(s, second)
        assert complete(s, first) == expected
        # the third request came back from the prompt cache but for the final prompt token
        deadline = time.monotonic() + 10  # the log is written by a thread of its own
        while True:
            evaluated = re.findall(r"prompt eval time = .*?/ *(\d+) tokens", s.log_text())
            if len(evaluated) >= 3 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert len(evaluated) == 3 and evaluated[-1] == "1", evaluated
    finally:
        s.stop()


def test_context_shift_with_kvsmooth(tiny_llava: TinyLlava, tmp: Path) -> None:
    # text only (a multimodal server has no context shift); 300 tokens in a 128-token context
    s = start(tiny_llava, tmp, "--context-shift", "--kvsmooth", "0.9", model_only=True, ctx=128, parallel=1)
    try:
        body = {"prompt": "USER: Tell me a story. ASSISTANT:", "n_predict": 300, "temperature": 0, "seed": 1}
        answers = []
        for _ in range(2):
            status, r = post(s, "/completion", body)
            assert status == 200, r
            assert r["tokens_predicted"] == 300, r
            answers.append(r["content"])
        assert "context shift" in s.log_text()
        assert answers[0] == answers[1]  # the second on a warm slot
    finally:
        s.stop()


# --- bad values ---------------------------------------------------------------------------------

BAD = [
    (1.5, "[0, 1]"),
    (-0.1, "[0, 1]"),
    ("0.9", "must be false, 0, a number"),
    ([0.9], "must be false, 0, a number"),
    ({"lambda_ref": 2}, "lambda_ref"),
    ({"window": -1}, "window"),
    ({"mode": "bogus"}, "mode"),
    ({"queue": 4}, "per server"),
    ({"layer_start": 1}, "per server"),
    ({"temperature": 1}, "unknown field"),
]


@pytest.mark.parametrize("value,needle", BAD, ids=[json.dumps(v) for v, _ in BAD])
def test_bad_value_is_400(off_server: Server, tiny_llava: TinyLlava, value: Any, needle: str) -> None:
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        chat(off_server, messages(tiny_llava), value)
    assert "kvsmooth" in str(info.value) and needle in str(info.value), str(info.value)
    for path in ("/completion", "/v1/completions"):
        status, r = post(off_server, path, {"prompt": "Hello", "max_tokens": 2, "kvsmooth": value})
        assert status == 400, r
        assert "kvsmooth" in r["error"]["message"] and r["error"]["type"] == "invalid_request_error", r


def test_bad_values_disturb_nothing(off_server: Server, tiny_llava: TinyLlava, fresh: List[str]) -> None:
    for value, _ in BAD:
        assert post(off_server, "/completion", {"prompt": "Hi", "n_predict": 1, "kvsmooth": value})[0] == 400
    assert chat(off_server, messages(tiny_llava), 0.9) == fresh[1]
    assert chat(off_server, messages(tiny_llava)) == fresh[0]


def test_bad_flags_stop_the_server(tiny_llava: TinyLlava) -> None:
    for extra, needle in ((["--kvsmooth", "1.5"], "--kvsmooth"),
                          (["--kvsmooth", "0.9", "--kvsmooth-mode", "bogus"], "--kvsmooth-mode"),
                          (["--kvsmooth", "0.9", "--kvsmooth-layers", "3-99"], "--kvsmooth")):
        r = subprocess.run([program("llama-server"), *server_args(tiny_llava, *extra), "--port", "0"],
                           capture_output=True, text=True, timeout=120, env=clean_env())
        assert r.returncode != 0 and needle in r.stderr + r.stdout, (extra, r.stderr[-2000:])


def test_speculative_decoding_is_refused(tiny_llava: TinyLlava, tmp: Path) -> None:
    # n-gram speculation needs no draft model; verifying its drafts decodes several tokens of a slot at once
    args = ["-m", str(tiny_llava.text), "--spec-type", "ngram-simple", "-c", "1024", "-t", "1", "--no-warmup"]
    r = subprocess.run([program("llama-server"), *args, "--kvsmooth", "0.9", "--port", "0"],
                       capture_output=True, text=True, timeout=120, env=clean_env())
    assert r.returncode != 0 and "speculative decoding" in r.stderr + r.stdout, r.stderr[-2000:]
    # without --kvsmooth the server runs; a request that asks for KVSmooth is refused
    s = launch(args, tmp)
    try:
        status, body = post(s, "/completion", {"prompt": "Hello", "n_predict": 2, "kvsmooth": 0.9})
        assert status == 400 and "speculative decoding" in body["error"]["message"], body
        status, body = post(s, "/completion", {"prompt": "Hello", "n_predict": 2})
        assert status == 200, body
    finally:
        s.stop()


# --- llama-mtmd-cli chat mode -------------------------------------------------------------------


def test_mtmd_cli_chat_mode_refuses_kvsmooth(tiny_llava: TinyLlava) -> None:
    r = subprocess.run([program("llama-mtmd-cli"), "-m", str(tiny_llava.text), "--mmproj", str(tiny_llava.mmproj),
                        "--kvsmooth", "0.9", "-t", "1"], capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL, env=clean_env())
    assert r.returncode == 1 and "single-turn" in r.stderr, r.stderr[-2000:]
