"""pykvsmooth.media: what an image reference may make a server read (data: URIs; file:
inside one folder; http(s) from listed hosts, redirects included; bounded bytes, pixels,
time), without a model. Loopback only; every network wait is bounded by a timeout."""

from __future__ import annotations

import base64
import os
import time
from pathlib import Path
from typing import Iterator

import pytest
from media_samples import (CountingServer, bomb_png, jpeg_of, noise_png, png_header_only, serving,
                           silent_listener, tiff_of)

from pykvsmooth.media import (DEFAULT_MAX_IMAGE_PIXELS, MediaError, MediaPolicy, check_image,
                              parse_host)


@pytest.fixture(scope="module")
def png(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    from PIL import Image

    path = tmp_path_factory.mktemp("png") / "p.png"
    Image.new("RGB", (40, 30), (200, 30, 10)).save(path)
    return path.read_bytes()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


# --- data: ---------------------------------------------------------------------------------------


def test_data_uri_is_read_by_default(png: bytes) -> None:
    image = MediaPolicy().load(data_uri(png))
    assert (image.data, image.format, image.width, image.height) == (png, "PNG", 40, 30)
    assert MediaPolicy().load(image.data_uri()).data == png
    # the declared type does not matter, the bytes do; whitespace in base64 is allowed
    b64 = base64.b64encode(png).decode()
    assert MediaPolicy().load("data:image/jpeg;base64," + b64[:10] + "\n " + b64[10:]).format == "PNG"


@pytest.mark.parametrize("uri, message", [
    ("data:image/png;base64", "has no ','"),
    ("data:image/png;base64,@@@@", "not valid base64"),
    ("data:image/png;base64,iVBORw0KGgo", "not valid base64"),
    ("data:image/png;base64," + base64.b64encode(b"hello, world").decode(), "is not a JPEG, PNG, BMP or GIF image"),
    ("data:text/plain,hello", "is not a JPEG, PNG, BMP or GIF image"),
])
def test_bad_data_uri(uri: str, message: str) -> None:
    with pytest.raises(MediaError, match=message.replace("(", r"\(")):
        MediaPolicy().load(uri)


def test_image_bytes_limit(png: bytes) -> None:
    MediaPolicy(max_image_bytes=len(png)).load(data_uri(png))
    with pytest.raises(MediaError, match=rf"more than this server's limit of {len(png) - 1} \(--max-image-bytes\)"):
        MediaPolicy(max_image_bytes=len(png) - 1).load(data_uri(png))
    big = noise_png(600, 600)  # ~1 MB: refused from the base64 length, before decoding
    with pytest.raises(MediaError, match="about"):
        MediaPolicy(max_image_bytes=100_000).load(data_uri(big))


def test_other_schemes_are_refused() -> None:
    for url in ("ftp://127.0.0.1/x.png", "/etc/hostname", "x.png", "javascript:1"):
        with pytest.raises(MediaError, match="only data: URIs are accepted"):
            MediaPolicy().load(url)
    with pytest.raises(MediaError, match="must be a string"):
        MediaPolicy().load({"url": "data:,"})  # type: ignore[arg-type]


# --- the image itself ----------------------------------------------------------------------------


def test_truncated_and_corrupt_images(png: bytes) -> None:
    jpeg = jpeg_of(noise_png(64, 64))
    assert check_image(jpeg, DEFAULT_MAX_IMAGE_PIXELS).format == "JPEG"
    with pytest.raises(MediaError, match="the JPEG image is corrupt or truncated .*truncated"):
        check_image(jpeg[: len(jpeg) // 2], DEFAULT_MAX_IMAGE_PIXELS)
    noisy = noise_png(64, 64)
    with pytest.raises(MediaError, match=r"the PNG image is corrupt or truncated \(image file is truncated\)"):
        check_image(noisy[: len(noisy) // 2], DEFAULT_MAX_IMAGE_PIXELS)
    middle = len(noisy) // 2
    broken = noisy[:middle] + bytes([noisy[middle] ^ 0xFF]) + noisy[middle + 1:]  # inside the IDAT data
    with pytest.raises(MediaError, match="the PNG image is corrupt or truncated"):
        check_image(broken, DEFAULT_MAX_IMAGE_PIXELS)


def test_formats_libmtmd_cannot_read_are_refused(png: bytes) -> None:
    with pytest.raises(MediaError, match="is not a JPEG, PNG, BMP or GIF image"):
        check_image(tiff_of(png), DEFAULT_MAX_IMAGE_PIXELS)
    # an EPS header: Pillow would run Ghostscript on it; here no plugin but the four looks
    with pytest.raises(MediaError, match="is not a JPEG, PNG, BMP or GIF image"):
        check_image(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", DEFAULT_MAX_IMAGE_PIXELS)


def test_decompression_bomb_is_refused_from_its_header() -> None:
    bomb = bomb_png()  # 10 KB, 9000 x 9000
    assert len(bomb) < 50_000
    start = time.monotonic()
    with pytest.raises(MediaError, match=r"the PNG image is 9000x9000 = 81000000 pixels, more than this "
                                         rf"server's limit of {DEFAULT_MAX_IMAGE_PIXELS} \(--max-image-pixels\)"):
        MediaPolicy().load(data_uri(bomb))
    assert time.monotonic() - start < 5  # nothing was decoded
    # beyond Pillow's own limit (2 x 89 Mpx) Pillow refuses at the header: still our message
    with pytest.raises(MediaError, match=r"too many pixels .*--max-image-pixels"):
        check_image(png_header_only(30000, 30000), 10**12)
    with pytest.raises(MediaError, match=r"is 40x30 = 1200 pixels, more than this server's limit of 1199"):
        check_image(png_header_only(40, 30), 1199)


# --- file: ---------------------------------------------------------------------------------------


@pytest.fixture()
def media_dir(tmp_path: Path, png: bytes) -> Path:
    allowed = tmp_path / "allowed"
    (allowed / "sub").mkdir(parents=True)
    (allowed / "sub" / "p.png").write_bytes(png)
    (tmp_path / "secret.png").write_bytes(png)
    (allowed / "escape.png").symlink_to(tmp_path / "secret.png")
    (allowed / "inside.png").symlink_to(allowed / "sub" / "p.png")
    os.mkfifo(allowed / "fifo.png")
    return allowed


def test_local_files_need_a_folder(media_dir: Path) -> None:
    url = (media_dir / "sub" / "p.png").as_uri()
    with pytest.raises(MediaError, match="reads no local files; .*--allowed-local-media DIR"):
        MediaPolicy().load(url)


def test_local_files_inside_the_folder(media_dir: Path, png: bytes) -> None:
    policy = MediaPolicy(local_dir=media_dir)
    assert policy.load((media_dir / "sub" / "p.png").as_uri()).data == png
    assert policy.load((media_dir / "inside.png").as_uri()).data == png  # a symlink that stays inside
    assert policy.load("file://localhost" + str(media_dir / "sub" / "p.png")).data == png
    # relative to a folder given as a relative path
    cwd = os.getcwd()
    os.chdir(media_dir.parent)
    try:
        assert MediaPolicy(local_dir=Path("allowed")).load((media_dir / "sub" / "p.png").as_uri()).data == png
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("name, message", [
    ("escape.png", "is not inside"),  # a symlink out of the folder
    ("sub/../../secret.png", "is not inside"),
    ("../secret.png", "is not inside"),
    ("sub", "not a regular file"),
    ("fifo.png", "not a regular file"),  # no hang on open
    ("missing.png", "cannot open the file"),
])
def test_local_files_outside_or_odd(media_dir: Path, name: str, message: str) -> None:
    with pytest.raises(MediaError, match=message):
        MediaPolicy(local_dir=media_dir).load("file://" + str(media_dir) + "/" + name)


def test_odd_file_urls(media_dir: Path) -> None:
    policy = MediaPolicy(local_dir=media_dir)
    with pytest.raises(MediaError, match="needs an absolute path"):
        policy.load("file:sub/p.png")
    with pytest.raises(MediaError, match="names no host"):
        policy.load("file://example.com" + str(media_dir / "sub" / "p.png"))
    with pytest.raises(MediaError, match="is not inside"):
        policy.load("file:///etc/hostname")
    big = media_dir / "big.png"
    big.write_bytes(noise_png(300, 300))
    with pytest.raises(MediaError, match=r"the file is \d+ bytes, more than .*--max-image-bytes"):
        MediaPolicy(local_dir=media_dir, max_image_bytes=100_000).load(big.as_uri())


# --- http(s): ------------------------------------------------------------------------------------


@pytest.fixture()
def web(png: bytes) -> Iterator[CountingServer]:
    yield from serving(
        {"/p.png": png, "/big.png": noise_png(300, 300), "/text": b"not an image"},
        {"/out": "http://localhost:{port}/p.png", "/in": "/p.png", "/loop": "/loop",
         "/ftp": "ftp://127.0.0.1/p.png"})


def test_urls_need_a_host_list(web: CountingServer) -> None:
    with pytest.raises(MediaError, match="fetches no URLs; .*--allowed-media-hosts HOST"):
        MediaPolicy().load(web.url("/p.png"))
    with pytest.raises(MediaError, match=r"host 127.0.0.1:\d+ is not in --allowed-media-hosts \(example.com\)"):
        MediaPolicy(hosts=("example.com",)).load(web.url("/p.png"))
    with pytest.raises(MediaError, match="is not in --allowed-media-hosts"):
        MediaPolicy(hosts=("127.0.0.1:1",)).load(web.url("/p.png"))  # another port
    assert web.count("/p.png") == 0


def test_allowed_host(web: CountingServer, png: bytes) -> None:
    assert MediaPolicy(hosts=("127.0.0.1",)).load(web.url("/p.png")).data == png
    assert MediaPolicy(hosts=(f"127.0.0.1:{web.port}",)).load(web.url("/p.png")).data == png
    assert MediaPolicy(hosts=("LOCALHOST",)).load(web.url("/p.png", host="localhost")).data == png
    assert web.count("/p.png") == 3


def test_redirects_are_checked(web: CountingServer, png: bytes) -> None:
    policy = MediaPolicy(hosts=("127.0.0.1",))
    with pytest.raises(MediaError, match=r"localhost:\d+/p.png' \(redirected from .*/out'\): host localhost"):
        policy.load(web.url("/out"))
    assert web.count("/out") == 1 and web.count("/p.png") == 0
    assert policy.load(web.url("/in")).data == png
    assert web.count("/p.png") == 1
    with pytest.raises(MediaError, match="more than 5 redirects"):
        policy.load(web.url("/loop"))
    assert web.count("/loop") == 6
    with pytest.raises(MediaError, match="only http and https are fetched"):
        policy.load(web.url("/ftp"))


def test_fetch_limits_and_errors(web: CountingServer) -> None:
    policy = MediaPolicy(hosts=("127.0.0.1",), max_image_bytes=100_000)
    with pytest.raises(MediaError, match=r"is \d+ bytes, more than this server's limit of 100000"):
        policy.load(web.url("/big.png"))
    with pytest.raises(MediaError, match="answered HTTP 404"):
        policy.load(web.url("/missing.png"))
    with pytest.raises(MediaError, match="is not a JPEG, PNG, BMP or GIF image"):
        policy.load(web.url("/text"))
    with pytest.raises(MediaError, match="cannot fetch it"):
        MediaPolicy(hosts=("127.0.0.1",)).load("http://127.0.0.1:1/p.png")  # nothing listens


def test_a_host_that_never_answers_times_out() -> None:
    sock, port = silent_listener()
    try:
        policy = MediaPolicy(hosts=("127.0.0.1",), connect_timeout=2, read_timeout=0.5)
        start = time.monotonic()
        with pytest.raises(MediaError, match=r"timed out .*--media-read-timeout"):
            policy.load(f"http://127.0.0.1:{port}/p.png")
        assert time.monotonic() - start < 10
    finally:
        sock.close()  # type: ignore[attr-defined]


# --- configuration -------------------------------------------------------------------------------


def test_host_entries() -> None:
    assert parse_host("Example.COM") == ("example.com", None)
    assert parse_host("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_host("[::1]:80") == ("::1", 80)
    for bad in ("http://example.com", "example.com/x", "user@example.com", "example.com:http", ""):
        with pytest.raises(ValueError, match="--allowed-media-hosts"):
            parse_host(bad)


def test_policy_values_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--max-images must be an integer >= 1"):
        MediaPolicy(max_images=0)
    with pytest.raises(ValueError, match="--max-image-pixels must be an integer >= 1"):
        MediaPolicy(max_image_pixels=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="--media-read-timeout must be a number of seconds > 0"):
        MediaPolicy(read_timeout=0)
    with pytest.raises(ValueError, match="--allowed-local-media: .* is not a folder"):
        MediaPolicy(local_dir=tmp_path / "missing")
    with pytest.raises(ValueError, match="--allowed-media-hosts entries"):
        MediaPolicy(hosts=("http://x",))
    with pytest.raises(MediaError, match=r"the request has 3 images, more than this server's limit of 2 "
                                         r"\(--max-images\)"):
        MediaPolicy(max_images=2).check_count(3)
    MediaPolicy(max_images=2).check_count(2)
