"""What a request may make `llama-server` read (issue 18), over loopback with the tiny
LLaVA fixture: by default nothing but the request's own data (a data: URI, raw base64); a
file:// URL only inside --allowed-local-media; an http:// URL only from --allowed-media-hosts,
each redirect checked, served here by a counting test server whose hit counts show what was
fetched; bytes, pixels (from the header: decompression bombs), images per request, body
size and max_tokens bounded; a corrupt or truncated image is a 400 naming the problem and
the server keeps serving. The flags and defaults are those of `python -m pykvsmooth.server`
(pykvsmooth/media.py), checked against its constants. Every request has a timeout."""

from __future__ import annotations

import base64
import http.client
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest
from conftest import TinyLlava
from media_samples import CountingServer, bomb_png, jpeg_of, noise_png, serving, silent_listener, tiff_of
from test_llama_server import (REQUEST_TIMEOUT_S, Server, clean_env, picture_uri, program, server_args,
                               started)

API_KEY = "sk-test-media"
MAX_IMAGE_BYTES = 64 * 1024  # the fixture's picture passes, a 300x300 noise PNG (270 KB) does not
MAX_IMAGES = 2
MAX_TOKENS_LIMIT = 6
MAX_REQUEST_BYTES = 1024 * 1024
MAX_TOKENS = 4


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("llama-server-media")


@pytest.fixture(scope="module")
def media_dir(tmp: Path, tiny_llava: TinyLlava) -> Path:
    allowed = tmp / "allowed"
    allowed.mkdir()
    (allowed / "picture.png").write_bytes(tiny_llava.png.read_bytes())
    (allowed / "big.png").write_bytes(noise_png(300, 300))
    (tmp / "secret.png").write_bytes(tiny_llava.png.read_bytes())
    (allowed / "escape.png").symlink_to(tmp / "secret.png")
    return allowed


@pytest.fixture(scope="module")
def web(tiny_llava: TinyLlava) -> Iterator[CountingServer]:
    yield from serving({"/picture.png": tiny_llava.png.read_bytes(), "/big.png": noise_png(300, 300)},
                       {"/elsewhere": "http://localhost:{port}/picture.png", "/here": "/picture.png"})


@pytest.fixture(scope="module")
def default_server(tiny_llava: TinyLlava, tmp: Path) -> Iterator[Server]:
    """No media flags at all: upstream's defaults as this series leaves them."""
    yield from started(tiny_llava, tmp, parallel=1)


@pytest.fixture(scope="module")
def open_server(tiny_llava: TinyLlava, tmp: Path, media_dir: Path) -> Iterator[Server]:
    yield from started(tiny_llava, tmp, "--api-key", API_KEY, "--allowed-local-media", str(media_dir),
                       "--allowed-media-hosts", "127.0.0.1", "--max-image-bytes", str(MAX_IMAGE_BYTES),
                       "--max-images", str(MAX_IMAGES), "--max-tokens-limit", str(MAX_TOKENS_LIMIT),
                       "--max-request-bytes", str(MAX_REQUEST_BYTES), "--media-read-timeout", "2",
                       parallel=1)


def image_messages(url: str, n: int = 1) -> List[Dict[str, Any]]:
    part = {"type": "image_url", "image_url": {"url": url}}
    return [{"role": "user", "content": [part] * n + [{"type": "text", "text": "Describe the image."}]}]


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def post(s: Server, path: str, body: Dict[str, Any], api_key: Optional[str] = None) -> Tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=REQUEST_TIMEOUT_S)
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    try:
        conn.request("POST", path, body=json.dumps(body), headers=headers)
        r = conn.getresponse()
        raw = r.read()
        return r.status, json.loads(raw) if raw.strip().startswith(b"{") else raw.decode(errors="replace")
    finally:
        conn.close()


def chat_body(url: str, n: int = 1, **extra: Any) -> Dict[str, Any]:
    return {"messages": image_messages(url, n), "max_tokens": MAX_TOKENS, "temperature": 0, "seed": 1,
            "top_k": 1, **extra}


def answer(s: Server, url: str, api_key: Optional[str] = None, **extra: Any) -> str:
    status, body = post(s, "/v1/chat/completions", chat_body(url, **extra), api_key)
    assert status == 200, body
    text = body["choices"][0]["message"]["content"]
    assert isinstance(text, str) and text
    return text


def refused(s: Server, url: str, api_key: Optional[str] = None, **extra: Any) -> str:
    status, body = post(s, "/v1/chat/completions", chat_body(url, **extra), api_key)
    assert status == 400, body
    assert body["error"]["type"] == "invalid_request_error", body
    return str(body["error"]["message"])


# --- the default configuration -----------------------------------------------------------------


def test_flags_and_defaults_are_the_python_servers() -> None:
    from pykvsmooth import media

    text = subprocess.run([program("llama-server"), "--help"], capture_output=True, text=True, timeout=60,
                          env=clean_env()).stdout
    text = " ".join(text.split())  # the help wraps its lines
    for flag, default in ((media.FLAG_MAX_IMAGE_BYTES, media.DEFAULT_MAX_IMAGE_BYTES),
                          (media.FLAG_MAX_IMAGE_PIXELS, media.DEFAULT_MAX_IMAGE_PIXELS),
                          (media.FLAG_MAX_IMAGES, media.DEFAULT_MAX_IMAGES),
                          (media.FLAG_CONNECT_TIMEOUT, f"{media.DEFAULT_CONNECT_TIMEOUT_S:g}"),
                          (media.FLAG_READ_TIMEOUT, f"{media.DEFAULT_READ_TIMEOUT_S:g}")):
        at = text.find(flag + " ")
        assert at >= 0 and f"(default: {default})" in text[at:at + 400], flag
    from pykvsmooth.server import (DEFAULT_MAX_REQUEST_BYTES, DEFAULT_MAX_TOKENS_LIMIT, FLAG_MAX_REQUEST_BYTES,
                                   FLAG_MAX_TOKENS_LIMIT)

    for flag, default in ((FLAG_MAX_REQUEST_BYTES, DEFAULT_MAX_REQUEST_BYTES),
                          (FLAG_MAX_TOKENS_LIMIT, DEFAULT_MAX_TOKENS_LIMIT)):
        at = text.find(flag + " ")
        assert at >= 0 and f"(default: {default})" in text[at:at + 400], flag
    for flag in (media.FLAG_LOCAL_MEDIA, media.FLAG_MEDIA_HOSTS):
        assert flag in text
    at = text.find("--host ")
    assert "(default: 127.0.0.1)" in text[at:at + 300]  # the default bind address is loopback


def test_default_server_reads_no_file_and_fetches_nothing(default_server: Server, tiny_llava: TinyLlava,
                                                           web: CountingServer) -> None:
    message = refused(default_server, tiny_llava.png.as_uri())
    assert "reads no local files" in message and "--allowed-local-media DIR" in message, message
    assert "reads no local files" in refused(default_server, "file:///etc/hostname")
    message = refused(default_server, web.url("/picture.png"))
    assert "fetches no URLs" in message and "--allowed-media-hosts HOST" in message, message
    assert "fetches no URLs" in refused(default_server, web.url("/picture.png"), stream=True)
    assert web.count("/picture.png") == 0  # no connection was opened
    assert "only data: URIs are accepted" in refused(default_server, "ftp://127.0.0.1/picture.png")
    # the request's own data is read
    assert answer(default_server, picture_uri(tiny_llava))
    raw = base64.b64encode(tiny_llava.png.read_bytes()).decode()
    assert answer(default_server, raw) == answer(default_server, picture_uri(tiny_llava))


# --- what flags allow ---------------------------------------------------------------------------


def test_file_url_inside_allowed_folder(open_server: Server, media_dir: Path, tiny_llava: TinyLlava) -> None:
    expected = answer(open_server, picture_uri(tiny_llava), API_KEY)
    assert answer(open_server, (media_dir / "picture.png").as_uri(), API_KEY) == expected
    assert answer(open_server, "file://picture.png", API_KEY) == expected  # upstream's relative form
    for url in ((media_dir / "escape.png").as_uri(), f"file://{media_dir}/../secret.png", "file:///etc/hostname",
                "file://../secret.png"):
        message = refused(open_server, url, API_KEY)
        assert f"is not inside {media_dir}" in message and "--allowed-local-media" in message, (url, message)
    assert "cannot open the file" in refused(open_server, (media_dir / "missing.png").as_uri(), API_KEY)
    assert "not a regular file" in refused(open_server, media_dir.as_uri(), API_KEY)


def test_http_image_from_allowed_host(open_server: Server, web: CountingServer, tiny_llava: TinyLlava) -> None:
    expected = answer(open_server, picture_uri(tiny_llava), API_KEY)
    before = web.count("/picture.png")
    assert answer(open_server, web.url("/picture.png"), API_KEY) == expected
    assert web.count("/picture.png") == before + 1
    # a redirect within the allowed host is followed, once
    assert answer(open_server, web.url("/here"), API_KEY) == expected
    assert web.count("/here") == 1 and web.count("/picture.png") == before + 2
    assert "answered HTTP 404" in refused(open_server, web.url("/missing.png"), API_KEY)


def test_redirect_to_a_host_not_allowed(open_server: Server, web: CountingServer) -> None:
    before = web.count("/picture.png")
    message = refused(open_server, web.url("/elsewhere"), API_KEY)
    assert "redirected from" in message and "host localhost" in message and "--allowed-media-hosts" in message
    assert web.count("/elsewhere") == 1
    assert web.count("/picture.png") == before  # localhost:PORT/picture.png was not asked for
    message = refused(open_server, web.url("/picture.png", host="localhost"), API_KEY)
    assert "is not in --allowed-media-hosts (127.0.0.1)" in message


def test_a_host_that_never_answers_times_out(open_server: Server) -> None:
    sock, port = silent_listener()
    try:
        start = time.monotonic()
        message = refused(open_server, f"http://127.0.0.1:{port}/x.png", API_KEY)
        assert "cannot fetch it" in message and "--media-read-timeout" in message, message
        assert time.monotonic() - start < 30
    finally:
        sock.close()  # type: ignore[attr-defined]


def test_oversize_image(open_server: Server, media_dir: Path, web: CountingServer) -> None:
    big = (media_dir / "big.png").read_bytes()
    assert len(big) > MAX_IMAGE_BYTES
    limit = f"more than this server's limit of {MAX_IMAGE_BYTES} (--max-image-bytes)"
    for url in (data_uri(big), (media_dir / "big.png").as_uri(), web.url("/big.png")):
        assert limit in refused(open_server, url, API_KEY), url


def test_request_limits(open_server: Server, tiny_llava: TinyLlava) -> None:
    uri = picture_uri(tiny_llava)
    message = refused(open_server, uri, API_KEY, n=MAX_IMAGES + 1)
    assert f"has {MAX_IMAGES + 1} media files, more than this server's limit of {MAX_IMAGES} (--max-images)" in message
    message = refused(open_server, uri, API_KEY, max_tokens=MAX_TOKENS_LIMIT + 1)
    assert f"is {MAX_TOKENS_LIMIT + 1}, more than this server's limit of {MAX_TOKENS_LIMIT}" in message
    # without max_tokens (upstream: until the context is full) the limit applies
    body = chat_body(uri, ignore_eos=True)
    del body["max_tokens"]
    status, out = post(open_server, "/v1/chat/completions", body, API_KEY)
    assert status == 200, out
    assert out["usage"]["completion_tokens"] == MAX_TOKENS_LIMIT and out["choices"][0]["finish_reason"] == "length"
    status, out = post(open_server, "/completion", {"prompt": "Hello", "n_predict": -1, "ignore_eos": True}, API_KEY)
    assert status == 200 and out["tokens_predicted"] == MAX_TOKENS_LIMIT, out
    # a larger body is refused once the limit is read (cpp-httplib), with 413
    big = json.dumps({"prompt": "x" * MAX_REQUEST_BYTES, "n_predict": 1}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", open_server.port, timeout=REQUEST_TIMEOUT_S)
    try:
        conn.putrequest("POST", "/completion")
        for name, value in (("Authorization", f"Bearer {API_KEY}"), ("Content-Type", "application/json"),
                            ("Content-Length", str(len(big)))):
            conn.putheader(name, value)
        conn.endheaders()
        try:
            conn.send(big)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer and close before the rest is sent
        assert conn.getresponse().status == 413
    finally:
        conn.close()
    assert answer(open_server, uri, API_KEY)


def test_api_key(open_server: Server, tiny_llava: TinyLlava) -> None:
    for key in (None, API_KEY + "x"):
        status, _ = post(open_server, "/v1/chat/completions", chat_body("file:///etc/hostname"), key)
        assert status == 401
    assert answer(open_server, picture_uri(tiny_llava), API_KEY)


# --- images -------------------------------------------------------------------------------------


def test_png_decompression_bomb(default_server: Server) -> None:
    bomb = bomb_png()  # a few KB that decode to 9000 x 9000 pixels
    start = time.monotonic()
    message = refused(default_server, data_uri(bomb))
    assert "9000x9000 = 81000000 pixels, more than this server's limit" in message and "(--max-image-pixels)" in message
    status, body = post(default_server, "/completion",
                        {"prompt": {"prompt_string": "<__media__> Describe.",
                                    "multimodal_data": [base64.b64encode(bomb).decode()]}, "n_predict": 2})
    assert status == 400 and "(--max-image-pixels)" in body["error"]["message"], body
    assert time.monotonic() - start < 60


def test_truncated_jpeg(default_server: Server, tiny_llava: TinyLlava) -> None:
    jpeg = jpeg_of(tiny_llava.png.read_bytes())
    assert answer(default_server, data_uri(jpeg, "image/jpeg"))  # the whole JPEG is fine
    message = refused(default_server, data_uri(jpeg[: len(jpeg) // 2], "image/jpeg"))
    assert "the JPEG image is corrupt or truncated (it ends before its end-of-image marker)" in message
    png = tiny_llava.png.read_bytes()
    assert "the PNG image is corrupt or truncated" in refused(default_server, data_uri(png[:-20]))


def test_corrupt_and_unsupported_images(default_server: Server, tiny_llava: TinyLlava) -> None:
    png = tiny_llava.png.read_bytes()
    for data in (b"hello", tiff_of(png), os.urandom(2000)):
        assert "is not a JPEG, PNG, BMP or GIF image" in refused(default_server, data_uri(data))
    assert "not valid base64" in refused(default_server, "data:image/png;base64,@@@")
    assert "must be base64 encoded" in refused(default_server, "data:image/png,abc")
    # a PNG whose structure is whole but whose pixel data is not: stb_image's failure is a 400
    broken = bytearray(png)
    idat = broken.find(b"IDAT")
    broken[idat + 4:idat + 40] = os.urandom(36)
    message = refused(default_server, data_uri(bytes(broken)))
    assert "Failed to load image" in message, message


def test_twenty_bad_requests_then_a_good_one(default_server: Server, tiny_llava: TinyLlava) -> None:
    uri = picture_uri(tiny_llava)
    expected = answer(default_server, uri)
    png = tiny_llava.png.read_bytes()
    bad = [
        ("file:///etc/hostname", "reads no local files"),
        ("http://127.0.0.1:9/x.png", "fetches no URLs"),
        (data_uri(os.urandom(500)), "is not a JPEG"),
        (data_uri(jpeg_of(png)[:300], "image/jpeg"), "truncated"),
        (data_uri(bomb_png()), "pixels"),
    ]
    for i in range(20):
        url, needle = bad[i % len(bad)]
        assert needle in refused(default_server, url, stream=bool(i % 2)), url[:40]
    assert answer(default_server, uri) == expected
    assert default_server.proc.poll() is None


def test_bad_host_list_stops_the_server(tiny_llava: TinyLlava) -> None:
    for value in ("http://example.com", "host:99999", "::1"):
        r = subprocess.run([program("llama-server"), *server_args(tiny_llava, parallel=1),
                            "--allowed-media-hosts", value, "--port", "0"],
                           capture_output=True, text=True, timeout=120, env=clean_env())
        assert r.returncode != 0 and "--allowed-media-hosts" in r.stderr + r.stdout, (value, r.stderr[-2000:])
