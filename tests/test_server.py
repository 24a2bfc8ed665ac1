"""``python -m pykvsmooth.server`` over loopback with the tiny LLaVA fixture: chat requests
with an image, with and without the per-request ``kvsmooth`` field, streamed and not, and
text completions. Needs the ``server`` extra; a missing dependency fails the tests (``make
test`` installs it)."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Dict, Iterator, Tuple

import pytest
from conftest import TinyLlava

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 180
MAX_TOKENS = 24


def test_server_dependencies_are_installed() -> None:
    for module in ("uvicorn", "fastapi", "pydantic_settings", "sse_starlette", "starlette_context"):
        __import__(module)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def fixture_dir(tiny_llava: TinyLlava) -> Path:
    return tiny_llava.dir


def start_server(d: Path, *extra: str) -> Tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "pykvsmooth.server", "--model", str(d / "tiny-llava-text.gguf"),
           "--clip_model_path", str(d / "tiny-llava-mmproj.gguf"), "--chat_format", "llava-1-5",
           "--n_ctx", "1024", "--n_threads", "2", "--verbose", "False",
           "--host", "127.0.0.1", "--port", str(port), *extra]
    log = open(d / f"server-{port}.log", "w")
    proc = subprocess.Popen(cmd, cwd=d, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{(d / f'server-{port}.log').read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=5) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("server did not start")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def server(fixture_dir: Path) -> Iterator[str]:
    proc, url = start_server(fixture_dir, "--kvsmooth", "0.9")
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def post(url: str, path: str, body: Dict[str, Any]) -> Tuple[int, Any]:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            raw = r.read().decode()
            status = r.status
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read().decode())
    if body.get("stream"):
        events = [line[len("data: "):] for line in raw.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]", raw[-500:]
        return status, [json.loads(e) for e in events[:-1]]
    return status, json.loads(raw)


def chat_body(d: Path, kvsmooth: Any = "absent", stream: bool = False) -> Dict[str, Any]:
    uri = "data:image/png;base64," + base64.b64encode((d / "picture.png").read_bytes()).decode()
    body: Dict[str, Any] = {
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": uri}},
            {"type": "text", "text": "Please describe the image in detail."}]}],
        "max_tokens": MAX_TOKENS, "temperature": 0, "seed": 0, "repeat_penalty": 1.0, "stream": stream,
    }
    if kvsmooth != "absent":
        body["kvsmooth"] = kvsmooth
    return body


def chat(url: str, d: Path, kvsmooth: Any = "absent", stream: bool = False) -> str:
    status, out = post(url, "/v1/chat/completions", chat_body(d, kvsmooth, stream))
    assert status == 200, out
    if stream:
        return "".join(c["choices"][0]["delta"].get("content") or "" for c in out)
    return out["choices"][0]["message"]["content"]


def expected(d: Path, kvsmooth: Any) -> str:
    """The same chat through pykvsmooth.Llama in this process."""
    from pykvsmooth import Llama
    from llama_cpp.llama_chat_format import Llava15ChatHandler

    llm = Llama(str(d / "tiny-llava-text.gguf"), n_ctx=1024, n_threads=2, verbose=False, kvsmooth=kvsmooth,
                chat_handler=Llava15ChatHandler(clip_model_path=str(d / "tiny-llava-mmproj.gguf"), verbose=False))
    body = chat_body(d)
    out = llm.create_chat_completion(messages=body["messages"], max_tokens=MAX_TOKENS, temperature=0, seed=0,
                                    repeat_penalty=1.0)
    llm.close()
    return out["choices"][0]["message"]["content"]


def test_chat_with_image_and_request_field(server: str, fixture_dir: Path) -> None:
    d = fixture_dir
    default = chat(server, d)
    assert default == chat(server, d)  # deterministic
    assert default == expected(d, 0.9)  # the server's --kvsmooth 0.9

    off = chat(server, d, kvsmooth=0)
    assert off != default
    assert off == expected(d, None)
    assert chat(server, d, kvsmooth=False) == off
    assert chat(server, d) == default  # the per-request setting did not stick

    assert chat(server, d, kvsmooth=0.9) == default
    assert chat(server, d, kvsmooth={"lambda_ref": 0.9, "window": 0.2}) == default
    assert chat(server, d, kvsmooth=None) == default
    fixed = chat(server, d, kvsmooth={"lambda_ref": 0.5, "mode": "fixed"})
    assert fixed == expected(d, {"lambda_ref": 0.5, "mode": "fixed"})

    # streamed: the same text, through the object's own create_chat_completion
    assert chat(server, d, stream=True) == default
    assert chat(server, d, kvsmooth=0, stream=True) == off
    assert chat(server, d) == default


def test_completion_with_request_field(server: str) -> None:
    def complete(**extra: Any) -> str:
        status, out = post(server, "/v1/completions", {"prompt": "USER: describe the image\nASSISTANT:",
                                                       "max_tokens": MAX_TOKENS, "temperature": 0, **extra})
        assert status == 200, out
        return out["choices"][0]["text"]

    on = complete()
    assert on == complete(kvsmooth=0.9) != complete(kvsmooth=0)
    assert complete() == on


@pytest.mark.parametrize("value, message", [
    (1.5, "lambda_ref must be in [0, 1]"),
    ("0.9", "must be a number in [0, 1], a boolean, null or an object"),
    ({"lamda_ref": 0.9}, "unknown field(s) lamda_ref"),
    ({"queue": 0}, "queue must be an integer in [1, 256]"),
    ({"mode": "value"}, "mode must be one of adaptive, fixed, keys"),
    ({"trace": True}, "unknown field(s) trace"),
])
def test_bad_request_field_is_400(server: str, fixture_dir: Path, value: Any, message: str) -> None:
    for path, body in (("/v1/chat/completions", chat_body(fixture_dir, value)),
                       ("/v1/completions", {"prompt": "hello", "max_tokens": 4, "kvsmooth": value})):
        status, out = post(server, path, body)
        assert status == 400, out
        assert out["error"]["param"] == "kvsmooth"
        assert message in out["error"]["message"], out


def test_setting_refused_by_llama_cpp_is_400(server: str, fixture_dir: Path) -> None:
    status, out = post(server, "/v1/chat/completions", chat_body(fixture_dir, {"layer_end": 40}))
    assert status == 400, out
    assert "layer range" in json.dumps(out)
    assert chat(server, fixture_dir) == chat(server, fixture_dir, kvsmooth=0.9)  # the server still works


def test_server_off_by_default_and_bad_option(fixture_dir: Path) -> None:
    proc, url = start_server(fixture_dir)
    try:
        off = chat(url, fixture_dir)
        assert off == expected(fixture_dir, None)
        assert chat(url, fixture_dir, kvsmooth=True) == expected(fixture_dir, 0.9)
        assert chat(url, fixture_dir) == off
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    bad = subprocess.run([sys.executable, "-m", "pykvsmooth.server", "--model", "x.gguf", "--kvsmooth", "2"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "lambda_ref must be in [0, 1]" in bad.stderr
