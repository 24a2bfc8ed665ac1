"""``python -m pykvsmooth.server`` over loopback with the tiny LLaVA fixture, through the
official ``openai`` client: chat requests with an image, with and without the per-request
``kvsmooth`` field, streamed, interrupted and concurrent; what a request may make the
server read (issue 18: data: URIs only by default, file: inside --allowed-local-media,
http(s) from --allowed-media-hosts, bounded images and requests), --api-key, the loopback
default. Needs the ``server`` extra and ``openai``; a missing dependency fails the tests
(``make test`` installs them). Every request has a timeout; the servers are this test's
subprocesses on 127.0.0.1."""

from __future__ import annotations

import base64
import functools
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
from server_process import ServerProcess, start_listening
from media_samples import CountingServer, bomb_png, jpeg_of, noise_png, serving, tiff_of

import pykvsmooth  # noqa: F401  (before llama_cpp, which the tests import here and there)

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 180
REQUEST_TIMEOUT_S = 180
MAX_TOKENS = 24
N_CTX = 1024
API_KEY = "test-key-0123"
OPEN_MAX_IMAGE_BYTES = 100_000
OPEN_MAX_IMAGES = 2
OPEN_MAX_REQUEST_BYTES = 1_000_000
MODEL = "tiny-llava"  # any name: llama_cpp.server serves its one model for every name


def test_server_dependencies_are_installed() -> None:
    for module in ("uvicorn", "fastapi", "pydantic_settings", "sse_starlette", "starlette_context", "openai"):
        __import__(module)


# --- servers ------------------------------------------------------------------------------------


Server = ServerProcess


LISTENING = re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+)")


def start_server(d: Path, *extra: str, host: Optional[str] = "127.0.0.1") -> Server:
    """The server on a port the system picks (--port 0: no race with another process for a
    port chosen here), read from uvicorn's log, once it answers."""
    cmd = [sys.executable, "-m", "pykvsmooth.server", "--model", str(d / "tiny-llava-text.gguf"),
           "--clip_model_path", str(d / "tiny-llava-mmproj.gguf"), "--chat_format", "llava-1-5",
           "--n_ctx", str(N_CTX), "--n_threads", "2", "--verbose", "False", "--port", "0", *extra]
    if host is not None:
        cmd += ["--host", host]
    log = Path(tempfile.mkstemp(prefix="server-", suffix=".log", dir=d)[1])
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for name in ("HOST", "PORT", "API_KEY"):  # llama_cpp.server's settings read these
        env.pop(name, None)

    def answers(url: str) -> bool:
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=5):
                return True
        except urllib.error.HTTPError:  # an answer (401 with --api-key): it is up
            return True
        except OSError:
            return False

    return start_listening(cmd, log, env, LISTENING, answers, START_TIMEOUT_S, cwd=d)


@pytest.fixture(scope="module")
def fixture_dir(tiny_llava: TinyLlava) -> Path:
    return tiny_llava.dir


@pytest.fixture(scope="module")
def server(fixture_dir: Path) -> Iterator[Server]:
    """The default configuration, with --kvsmooth 0.9."""
    s = start_server(fixture_dir, "--kvsmooth", "0.9")
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory: pytest.TempPathFactory, fixture_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("media")
    allowed = root / "allowed"
    allowed.mkdir()
    (allowed / "picture.png").write_bytes((fixture_dir / "picture.png").read_bytes())
    (allowed / "big.png").write_bytes(noise_png(300, 300))
    (root / "secret.png").write_bytes((fixture_dir / "picture.png").read_bytes())
    (allowed / "escape.png").symlink_to(root / "secret.png")
    return allowed


@pytest.fixture(scope="module")
def web(fixture_dir: Path) -> Iterator[CountingServer]:
    yield from serving({"/picture.png": (fixture_dir / "picture.png").read_bytes(), "/big.png": noise_png(300, 300)},
                       {"/elsewhere": "http://localhost:{port}/picture.png", "/here": "/picture.png"})


@pytest.fixture(scope="module")
def open_server(fixture_dir: Path, media_dir: Path) -> Iterator[Server]:
    """KVSmooth off (the default), an API key, local media in media_dir, 127.0.0.1 as a
    media host, small limits, and no --host (the default bind address)."""
    s = start_server(fixture_dir, "--api-key", API_KEY, "--allowed-local-media", str(media_dir),
                     "--allowed-media-hosts", "127.0.0.1", "--max-image-bytes", str(OPEN_MAX_IMAGE_BYTES),
                     "--max-images", str(OPEN_MAX_IMAGES), "--max-tokens-limit", str(MAX_TOKENS),
                     "--max-request-bytes", str(OPEN_MAX_REQUEST_BYTES), host=None)
    try:
        yield s
    finally:
        s.stop()


# --- requests -----------------------------------------------------------------------------------


def client(s: Server, api_key: str = "unused") -> Any:
    import openai

    return openai.OpenAI(base_url=s.url + "/v1", api_key=api_key, max_retries=0, timeout=REQUEST_TIMEOUT_S)


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def picture_uri(d: Path) -> str:
    return data_uri((d / "picture.png").read_bytes())


def messages(url: str, text: str = "Please describe the image in detail.") -> List[Dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


SAMPLING: Dict[str, Any] = {"temperature": 0, "seed": 0}
EXTRA_SAMPLING: Dict[str, Any] = {"repeat_penalty": 1.0}  # not in the openai client's signature


def chat(s: Server, url: str, kvsmooth: Any = "absent", stream: bool = False, api_key: str = "unused",
         max_tokens: Optional[int] = MAX_TOKENS, **extra: Any) -> str:
    body = dict(EXTRA_SAMPLING)
    if kvsmooth != "absent":
        body["kvsmooth"] = kvsmooth
    kwargs = dict(SAMPLING, **extra)
    if max_tokens is not None:
        kwargs["max_tokens"] = max_tokens
    out = client(s, api_key).chat.completions.create(model=MODEL, messages=messages(url), stream=stream,
                                                     extra_body=body, **kwargs)
    if stream:
        return "".join(c.choices[0].delta.content or "" for c in out if c.choices)
    return str(out.choices[0].message.content)


def refused(s: Server, url: str = "", *, status: int = 400, stream: bool = False, api_key: str = "unused",
            **kwargs: Any) -> str:
    """The message of the error a chat request gets (asserting its status)."""
    import openai

    body = dict(EXTRA_SAMPLING, **kwargs.pop("extra_body", {}))
    kwargs.setdefault("messages", messages(url))
    kwargs.setdefault("max_tokens", MAX_TOKENS)
    with pytest.raises(openai.APIError) as info:
        out = client(s, api_key).chat.completions.create(model=MODEL, stream=stream, extra_body=body, **kwargs)
        if stream:
            for _ in out:
                pass
    error = info.value
    if stream and not isinstance(error, openai.APIStatusError):
        return str(error.message)  # the stream's error event
    assert isinstance(error, openai.APIStatusError) and error.status_code == status, error
    body_json = error.body if isinstance(error.body, dict) else {}
    return str(body_json.get("message", error.message))


def post(s: Server, path: str, body: Any, headers: Optional[Dict[str, str]] = None) -> Tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(s.url + path, data=data, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as r:
            return r.status, json.loads(r.read().decode())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read().decode())


@functools.lru_cache(maxsize=None)
def _expected(d: Path, kvsmooth_json: str) -> str:
    from pykvsmooth import Llama
    from llama_cpp.llama_chat_format import Llava15ChatHandler

    llm = Llama(str(d / "tiny-llava-text.gguf"), n_ctx=N_CTX, n_threads=2, verbose=False,
                kvsmooth=json.loads(kvsmooth_json),
                chat_handler=Llava15ChatHandler(clip_model_path=str(d / "tiny-llava-mmproj.gguf"), verbose=False))
    out = llm.create_chat_completion(messages=messages(picture_uri(d)), max_tokens=MAX_TOKENS, **SAMPLING,
                                     **EXTRA_SAMPLING)
    llm.close()
    return str(out["choices"][0]["message"]["content"])


def expected(d: Path, kvsmooth: Any) -> str:
    """The same chat through pykvsmooth.Llama in this process."""
    return _expected(d, json.dumps(kvsmooth, sort_keys=True))


@functools.lru_cache(maxsize=None)
def eos(d: Path) -> int:
    import gguf

    field = gguf.GGUFReader(d / "tiny-llava-text.gguf").fields["tokenizer.ggml.eos_token_id"]
    return int(field.parts[field.data[0]][0])


# --- per-request kvsmooth --------------------------------------------------------------------


def test_chat_with_image_and_request_field(server: Server, fixture_dir: Path) -> None:
    d, uri = fixture_dir, picture_uri(fixture_dir)
    default = chat(server, uri)
    assert default == chat(server, uri)  # deterministic
    assert default == expected(d, 0.9)  # the server's --kvsmooth 0.9

    off = chat(server, uri, kvsmooth=0)
    assert off != default
    assert off == expected(d, None)
    assert chat(server, uri, kvsmooth=False) == off
    assert chat(server, uri) == default  # the per-request setting did not stick

    assert chat(server, uri, kvsmooth=0.9) == default
    assert chat(server, uri, kvsmooth={"lambda_ref": 0.9, "window": 0.2}) == default
    assert chat(server, uri, kvsmooth=None) == default
    fixed = chat(server, uri, kvsmooth={"lambda_ref": 0.5, "mode": "fixed"})
    assert fixed == expected(d, {"lambda_ref": 0.5, "mode": "fixed"})


def test_streamed_chat_with_request_field(server: Server, fixture_dir: Path) -> None:
    # llama_cpp.server streams through llama_cpp.Llama.create_chat_completion(llama, …):
    # the same text as without a stream, through the model's own method
    uri = picture_uri(fixture_dir)
    assert chat(server, uri, stream=True) == expected(fixture_dir, 0.9)
    assert chat(server, uri, kvsmooth=0, stream=True) == expected(fixture_dir, None)
    fixed = {"lambda_ref": 0.5, "mode": "fixed"}
    assert chat(server, uri, kvsmooth=fixed, stream=True) == expected(fixture_dir, fixed)
    assert chat(server, uri) == expected(fixture_dir, 0.9)


def test_interrupted_stream_does_not_leak_its_setting(server: Server, fixture_dir: Path) -> None:
    """Issue 13, bug 1: a stream the client leaves must not leave its setting behind."""
    uri = picture_uri(fixture_dir)
    disconnects = server.log_text().count("Disconnected from client")
    stream = client(server).chat.completions.create(
        model=MODEL, messages=messages(uri), stream=True, max_tokens=N_CTX - 300, **SAMPLING,
        logit_bias={str(eos(fixture_dir)): -100}, extra_body=dict(EXTRA_SAMPLING, kvsmooth=0))
    first = next(iter(stream))
    assert first.choices
    stream.close()  # the client leaves after one chunk of several hundred
    # the next requests (which wait for the model) get their own settings
    assert chat(server, uri) == expected(fixture_dir, 0.9)
    fixed = {"lambda_ref": 0.5, "mode": "fixed"}
    assert chat(server, uri, kvsmooth=fixed) == expected(fixture_dir, fixed)
    assert chat(server, uri, kvsmooth=0) == expected(fixture_dir, None)
    # and the stream was cut short (not run to its end) before they ran
    assert server.log_text().count("Disconnected from client") == disconnects + 1


def test_concurrent_clients_each_get_their_own_setting(server: Server, fixture_dir: Path) -> None:
    uri = picture_uri(fixture_dir)
    settings: List[Any] = ["absent", 0, {"lambda_ref": 1.0, "mode": "fixed"}, {"lambda_ref": 0.2, "mode": "fixed"}]
    alone = {json.dumps(s): chat(server, uri, kvsmooth=s) for s in settings}
    assert len(set(alone.values())) >= 3  # the settings give different answers

    def run(i: int) -> List[Tuple[str, bool, str]]:
        setting = settings[i % len(settings)]
        results = []
        for j in range(3):
            stream = (i + j) % 2 == 1
            results.append((json.dumps(setting), stream, chat(server, uri, kvsmooth=setting, stream=stream)))
        return results

    with ThreadPoolExecutor(len(settings) * 2) as pool:
        runs = [r for rs in pool.map(run, range(len(settings) * 2)) for r in rs]
    assert len(runs) == 24
    for key, stream, text in runs:
        if stream:
            # llama_cpp.server (interrupt_requests) may end a stream early for a waiting request
            assert alone[key].startswith(text), (key, text, alone[key])
        else:
            assert text == alone[key], key
    assert chat(server, uri) == alone[json.dumps("absent")]


def test_completion_with_request_field(server: Server) -> None:
    def complete(**extra: Any) -> str:
        out = client(server).completions.create(model=MODEL, prompt="USER: describe the image\nASSISTANT:",
                                                max_tokens=MAX_TOKENS, temperature=0, extra_body=extra)
        return str(out.choices[0].text)

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
def test_bad_request_field_is_400(server: Server, fixture_dir: Path, value: Any, message: str) -> None:
    for path, body in (("/v1/chat/completions", {"messages": messages(picture_uri(fixture_dir)), "kvsmooth": value}),
                       ("/v1/completions", {"prompt": "hello", "max_tokens": 4, "kvsmooth": value})):
        status, out = post(server, path, body)
        assert status == 400, out
        assert out["error"]["param"] == "kvsmooth"
        assert message in out["error"]["message"], out


def test_setting_refused_by_llama_cpp(server: Server, fixture_dir: Path) -> None:
    uri = picture_uri(fixture_dir)
    message = refused(server, uri, extra_body={"kvsmooth": {"layer_end": 40}})
    assert "kvsmooth: KVSmooth invalid parameter" in message and "layer range" in message
    # in a stream, where the response has started: the stream's error event
    message = refused(server, uri, stream=True, extra_body={"kvsmooth": {"layer_end": 40}})
    assert "layer range" in message
    assert chat(server, uri) == expected(fixture_dir, 0.9)  # the server still works


# --- what a request may make the server read ---------------------------------------------------


def test_default_server_reads_no_file_and_fetches_nothing(server: Server, fixture_dir: Path,
                                                           web: CountingServer) -> None:
    picture = fixture_dir / "picture.png"
    message = refused(server, picture.as_uri())
    assert "reads no local files" in message and "--allowed-local-media DIR" in message
    assert "reads no local files" in refused(server, "file:///etc/hostname")
    hits = web.count("/picture.png")
    message = refused(server, web.url("/picture.png"))
    assert "fetches no URLs" in message and "--allowed-media-hosts HOST" in message
    assert web.count("/picture.png") == hits == 0
    # in a stream too, before the response starts
    assert "fetches no URLs" in refused(server, web.url("/picture.png"), stream=True)
    assert web.count("/picture.png") == 0
    # pykvsmooth.Llama used directly keeps llama-cpp-python's local files
    from llama_cpp.llama_chat_format import Llava15ChatHandler

    handler = Llava15ChatHandler(clip_model_path=str(fixture_dir / "tiny-llava-mmproj.gguf"), verbose=False)
    assert handler.load_image(picture.as_uri()) == picture.read_bytes()


def test_file_url_inside_allowed_folder(open_server: Server, media_dir: Path, fixture_dir: Path) -> None:
    text = chat(open_server, (media_dir / "picture.png").as_uri(), api_key=API_KEY)
    assert text == chat(open_server, picture_uri(fixture_dir), api_key=API_KEY) == expected(fixture_dir, None)
    for url in ((media_dir / "escape.png").as_uri(), f"file://{media_dir}/../secret.png", "file:///etc/hostname"):
        message = refused(open_server, url, api_key=API_KEY)
        assert f"is not inside {media_dir} (--allowed-local-media)" in message, message
    assert "cannot open the file" in refused(open_server, (media_dir / "missing.png").as_uri(), api_key=API_KEY)


def test_http_image_from_allowed_host(open_server: Server, web: CountingServer, fixture_dir: Path) -> None:
    before = web.count("/picture.png")
    text = chat(open_server, web.url("/picture.png"), api_key=API_KEY)
    assert web.count("/picture.png") == before + 1
    assert text == expected(fixture_dir, None)
    # a redirect on the allowed host is followed
    assert chat(open_server, web.url("/here"), api_key=API_KEY) == text
    assert web.count("/here") == 1 and web.count("/picture.png") == before + 2


def test_redirect_to_a_host_not_allowed(open_server: Server, web: CountingServer) -> None:
    before = web.count("/picture.png")
    message = refused(open_server, web.url("/elsewhere"), api_key=API_KEY)
    assert "redirected from" in message and "host localhost" in message and "--allowed-media-hosts" in message
    assert web.count("/elsewhere") == 1
    assert web.count("/picture.png") == before  # localhost:PORT/picture.png was not asked for


def test_oversize_image(open_server: Server, media_dir: Path, web: CountingServer) -> None:
    big = (media_dir / "big.png").read_bytes()
    assert len(big) > OPEN_MAX_IMAGE_BYTES
    limit = f"more than this server's limit of {OPEN_MAX_IMAGE_BYTES} (--max-image-bytes)"
    for url in (data_uri(big), (media_dir / "big.png").as_uri(), web.url("/big.png")):
        assert limit in refused(open_server, url, api_key=API_KEY), url


def test_png_decompression_bomb(server: Server) -> None:
    bomb = bomb_png()  # 10 KB that decode to 9000 x 9000 pixels
    start = time.monotonic()
    message = refused(server, data_uri(bomb))
    assert "9000x9000 = 81000000 pixels, more than this server's limit" in message
    assert "(--max-image-pixels)" in message
    assert time.monotonic() - start < 60


def test_truncated_jpeg(server: Server, fixture_dir: Path) -> None:
    jpeg = jpeg_of((fixture_dir / "picture.png").read_bytes())
    assert chat(server, data_uri(jpeg, "image/jpeg"), max_tokens=4)  # the whole JPEG is fine
    message = refused(server, data_uri(jpeg[: len(jpeg) // 2], "image/jpeg"))
    assert "the JPEG image is corrupt or truncated (image file is truncated" in message


def test_corrupt_and_unsupported_images(server: Server, fixture_dir: Path) -> None:
    png = (fixture_dir / "picture.png").read_bytes()
    for data in (b"hello", tiff_of(png), os.urandom(2000)):
        assert "is not a JPEG, PNG, BMP or GIF image" in refused(server, data_uri(data))
    assert "not valid base64" in refused(server, "data:image/png;base64,@@@")
    assert "needs a URL" in refused(server, messages=[{"role": "user", "content": [{"type": "image_url"}]}])


def test_twenty_bad_requests_then_a_good_one(server: Server, fixture_dir: Path) -> None:
    uri = picture_uri(fixture_dir)
    png = (fixture_dir / "picture.png").read_bytes()
    long_text = [{"role": "user", "content": "the image " * N_CTX}]
    bad: List[Tuple[Dict[str, Any], str]] = [
        ({"messages": messages("file:///etc/hostname")}, "reads no local files"),
        ({"messages": messages("http://127.0.0.1:9/x.png")}, "fetches no URLs"),
        ({"messages": messages(data_uri(os.urandom(500)))}, "is not a JPEG"),
        ({"messages": messages(data_uri(jpeg_of(png)[:300], "image/jpeg"))}, "truncated"),
        ({"messages": messages(data_uri(bomb_png()))}, "pixels"),
        ({"messages": messages(uri), "extra_body": {"kvsmooth": 1.5}}, "lambda_ref"),
        ({"messages": messages(uri), "extra_body": {"kvsmooth": {"layer_end": 40}}}, "layer range"),
        ({"messages": messages(uri), "extra_body": {"kvsmooth": {"layer_end": 40}}, "stream": True}, "layer range"),
        ({"messages": long_text}, "exceeds"),
        ({"messages": long_text, "stream": True}, "exceeds"),
    ]
    for i in range(20):
        kwargs, message = bad[i % len(bad)]
        kwargs = dict(kwargs)
        assert message in refused(server, **kwargs), kwargs
    # a completion longer than the context: llama_cpp.server's 400, or the stream's error event
    import openai

    long_prompt = {"model": MODEL, "prompt": "the image " * N_CTX, "max_tokens": 4}
    with pytest.raises(openai.BadRequestError, match="maximum context length is 1024 tokens"):
        client(server).completions.create(**long_prompt)
    with pytest.raises(openai.APIError, match=r"Requested tokens \(\d+\) exceed context window of 1024"):
        for _ in client(server).completions.create(stream=True, **long_prompt):
            pass
    assert chat(server, uri) == expected(fixture_dir, 0.9)
    assert chat(server, uri, stream=True) == expected(fixture_dir, 0.9)
    assert server.proc.poll() is None


# --- limits, the API key, the bind address ---------------------------------------------------------


def test_request_limits(open_server: Server, fixture_dir: Path) -> None:
    uri = picture_uri(fixture_dir)
    three = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}}] * 3}]
    message = refused(open_server, messages=three, api_key=API_KEY)
    assert f"the request has 3 images, more than this server's limit of {OPEN_MAX_IMAGES} (--max-images)" in message
    message = refused(open_server, uri, api_key=API_KEY, max_tokens=MAX_TOKENS + 1)
    assert f"max_tokens is {MAX_TOKENS + 1}, more than this server's limit of {MAX_TOKENS}" in message
    # without max_tokens (llama-cpp-python: until the context is full) the limit applies
    out = client(open_server, API_KEY).chat.completions.create(
        model=MODEL, messages=messages(uri), logit_bias={str(eos(fixture_dir)): -100}, **SAMPLING)
    assert out.usage.completion_tokens == MAX_TOKENS and out.choices[0].finish_reason == "length"
    # a body announced larger than the limit is refused before it is read
    conn = http.client.HTTPConnection("127.0.0.1", int(open_server.url.rsplit(":", 1)[1]), timeout=REQUEST_TIMEOUT_S)
    try:
        conn.putrequest("POST", "/v1/chat/completions")
        for name, value in (("Authorization", f"Bearer {API_KEY}"), ("Content-Type", "application/json"),
                            ("Content-Length", str(OPEN_MAX_REQUEST_BYTES + 1))):
            conn.putheader(name, value)
        conn.endheaders()
        response = conn.getresponse()
        assert response.status == 413
        assert "(--max-request-bytes)" in json.loads(response.read())["error"]["message"]
    finally:
        conn.close()


def test_api_key(open_server: Server, fixture_dir: Path) -> None:
    import openai

    uri = picture_uri(fixture_dir)
    for key in ("unused", API_KEY + "x"):
        with pytest.raises(openai.AuthenticationError, match="Invalid API key"):
            chat(open_server, uri, api_key=key)
    status, _ = post(open_server, "/v1/chat/completions", {"messages": messages("file:///etc/hostname")})
    assert status == 401  # before anything in the request is looked at
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(open_server.url + "/v1/models", timeout=REQUEST_TIMEOUT_S)
    assert info.value.code == 401
    assert chat(open_server, uri, api_key=API_KEY) == expected(fixture_dir, None)
    assert [m.id for m in client(open_server, API_KEY).models.list()]


def test_server_off_by_default(open_server: Server, fixture_dir: Path) -> None:
    uri = picture_uri(fixture_dir)
    off = chat(open_server, uri, api_key=API_KEY)
    assert off == expected(fixture_dir, None)
    assert chat(open_server, uri, kvsmooth=True, api_key=API_KEY) == expected(fixture_dir, 0.9)
    assert chat(open_server, uri, api_key=API_KEY) == off


def test_command_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from pykvsmooth.media import DEFAULT_MAX_IMAGE_BYTES, MediaPolicy
    from pykvsmooth.server import DEFAULT_HOST, RequestLimits, parse_args

    for name in ("HOST", "PORT", "API_KEY"):
        monkeypatch.delenv(name, raising=False)
    config = parse_args(["--model", "m.gguf"])
    assert config.server.host == DEFAULT_HOST == "127.0.0.1"
    assert config.server.api_key is None
    assert config.media == MediaPolicy() and config.media.max_image_bytes == DEFAULT_MAX_IMAGE_BYTES
    assert config.limits == RequestLimits() and config.kvsmooth is None
    config = parse_args(["--model", "m.gguf", "--api-key", "k1", "--allowed-media-hosts", "a.example, b:8080",
                         "--allowed-local-media", str(tmp_path), "--max-images", "3", "--kvsmooth", "0.5",
                         "--n-ctx", "512", "--max-tokens-limit", "99"])
    assert config.server.api_key == "k1" and config.models[0].n_ctx == 512
    assert config.media.hosts == ("a.example", "b:8080") and config.media.local_dir == tmp_path.resolve()
    assert config.media.max_images == 3 and config.limits.max_tokens == 99
    assert config.kvsmooth is not None and config.kvsmooth.lambda_ref == 0.5
    assert parse_args(["--model", "m.gguf", "--api_key", "k2"]).server.api_key == "k2"


@pytest.mark.parametrize("args, message", [
    (["--kvsmooth", "2"], "lambda_ref must be in [0, 1]"),
    (["--allowed-media-hosts", "http://x"], "--allowed-media-hosts entries are HOST or HOST:PORT"),
    (["--allowed-local-media", "/nonexistent/dir"], "--allowed-local-media: '/nonexistent/dir' is not a folder"),
    (["--max-images", "0"], "--max-images must be an integer >= 1"),
    (["--max-request-bytes", "0"], "--max-request-bytes must be an integer >= 1"),
])
def test_bad_option(args: List[str], message: str) -> None:
    bad = subprocess.run([sys.executable, "-m", "pykvsmooth.server", "--model", "x.gguf", *args],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and message in bad.stderr, bad.stderr


def test_body_limit_counts_the_bytes_received() -> None:
    """Without a Content-Length (chunked), the bytes are counted as they arrive."""
    import asyncio

    from pykvsmooth.media import MediaPolicy
    from pykvsmooth.server import RequestLimits, RequestPolicyMiddleware

    reached: List[Dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        reached.append(await receive())

    middleware = RequestPolicyMiddleware(app, api_key=None, kvsmooth=None, media=MediaPolicy(),
                                         limits=RequestLimits(max_request_bytes=10))

    async def post_chunks(chunks: List[bytes]) -> List[Dict[str, Any]]:
        sent: List[Dict[str, Any]] = []
        incoming = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]

        async def receive() -> Dict[str, Any]:
            return incoming.pop(0)

        async def send(message: Dict[str, Any]) -> None:
            sent.append(message)

        await middleware({"type": "http", "method": "POST", "path": "/v1/embeddings", "headers": []}, receive, send)
        return sent

    sent = asyncio.run(post_chunks([b"12345", b"678901"]))
    assert sent[0]["status"] == 413 and b"--max-request-bytes" in sent[1]["body"] and not reached
    assert asyncio.run(post_chunks([b"12345", b"67890"])) == [] and reached[0]["body"] == b"1234567890"


def test_listening_on_a_network_without_a_key_warns(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "pykvsmooth.server", "--model", str(tmp_path / "missing.gguf"),
                          "--host", "0.0.0.0"], capture_output=True, text=True, timeout=120)
    assert "warning: listening on 0.0.0.0 without --api-key" in run.stderr
    assert run.returncode == 1 and "pykvsmooth.server: error: Model path does not exist" in run.stderr, run.stderr
    run = subprocess.run([sys.executable, "-m", "pykvsmooth.server", "--model", str(tmp_path / "missing.gguf"),
                          "--host", "0.0.0.0", "--api-key", "k"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "warning" not in run.stderr, run.stderr
