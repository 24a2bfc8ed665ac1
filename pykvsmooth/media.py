"""What an image reference in a server request may make the server read.

A request's ``image_url`` is a ``data:`` URI by default; nothing else is read or fetched:

- ``file:`` URLs only with a folder (``--allowed-local-media DIR``): the path is resolved
  (symlinks, ``..``) and must stay inside it, and must be a regular file;
- ``http(s):`` URLs only with a host list (``--allowed-media-hosts HOST[:PORT],…``): every
  redirect is checked against the list, with connect and read timeouts and a byte limit;
- every image is bounded in bytes and in pixels (the pixels are read from the header
  before anything is decoded: decompression bombs), then decoded once with Pillow, so that
  a corrupt or truncated image is refused with its problem named.

Refusals raise ``MediaError`` (a ValueError) whose message says what to send instead or
which flag allows it. ``pykvsmooth.server`` applies a ``MediaPolicy`` to every request and
in its chat handlers' ``load_image``; ``pykvsmooth.Llama`` used directly keeps
llama-cpp-python's own loading (any URL, local files). The flag names and defaults here
are meant to be the same in every server of this project.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import os
import socket
import ssl
import stat
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple, Union
from urllib.parse import unquote_to_bytes, urljoin, urlsplit
from urllib.request import url2pathname

# --- flags and defaults (one place) -------------------------------------------------------

FLAG_LOCAL_MEDIA = "--allowed-local-media"
FLAG_MEDIA_HOSTS = "--allowed-media-hosts"
FLAG_MAX_IMAGE_BYTES = "--max-image-bytes"
FLAG_MAX_IMAGE_PIXELS = "--max-image-pixels"
FLAG_MAX_IMAGES = "--max-images"
FLAG_CONNECT_TIMEOUT = "--media-connect-timeout"
FLAG_READ_TIMEOUT = "--media-read-timeout"

DEFAULT_MAX_IMAGE_BYTES = 20 * 1024 * 1024  # as OpenAI's API
DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192  # 67 Mpx: a 48 Mpx phone photo passes, 200 MB of RGB at most
DEFAULT_MAX_IMAGES = 8  # per request; LLaVA-1.5 takes 576 positions per image
DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_READ_TIMEOUT_S = 30.0  # for the whole response, after connecting
MAX_REDIRECTS = 5

# what Pillow may open here and libmtmd (stb_image) decodes; other Pillow plugins (EPS,
# which runs Ghostscript, TIFF, …) never see request bytes
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "GIF")

_SHOWN_URL_CHARS = 80


class MediaError(ValueError):
    """An image reference or image this server refuses; the message says why and what to do."""


@dataclass(frozen=True)
class Image:
    """Image bytes that passed the policy, with what their header says."""

    data: bytes
    format: str
    width: int
    height: int

    def data_uri(self) -> str:
        return f"data:image/{self.format.lower()};base64," + base64.b64encode(self.data).decode("ascii")


def _shown(url: str) -> str:
    return url if len(url) <= _SHOWN_URL_CHARS else url[:_SHOWN_URL_CHARS] + "…"


def parse_host(entry: str) -> Tuple[str, Optional[int]]:
    """``HOST`` or ``HOST:PORT`` (``[v6]:PORT``) of --allowed-media-hosts, lower-cased."""
    text = entry.strip()
    if not text or any(c in text for c in "/@?#") or "://" in text:
        raise ValueError(f"{FLAG_MEDIA_HOSTS} entries are HOST or HOST:PORT, got {entry!r}")
    parts = urlsplit("//" + text)
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{FLAG_MEDIA_HOSTS}: bad port in {entry!r}") from None
    if not parts.hostname:
        raise ValueError(f"{FLAG_MEDIA_HOSTS} entries are HOST or HOST:PORT, got {entry!r}")
    return parts.hostname.lower(), port


@dataclass(frozen=True)
class MediaPolicy:
    """What a request's images may make the server read (see the module's docstring).
    The defaults read nothing but ``data:`` URIs."""

    local_dir: Optional[Path] = None
    hosts: Tuple[str, ...] = ()
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_images: int = DEFAULT_MAX_IMAGES
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S
    read_timeout: float = DEFAULT_READ_TIMEOUT_S

    def __post_init__(self) -> None:
        for name, flag in (("max_image_bytes", FLAG_MAX_IMAGE_BYTES), ("max_image_pixels", FLAG_MAX_IMAGE_PIXELS),
                           ("max_images", FLAG_MAX_IMAGES)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{flag} must be an integer >= 1, got {value!r}")
        for name, flag in (("connect_timeout", FLAG_CONNECT_TIMEOUT), ("read_timeout", FLAG_READ_TIMEOUT)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{flag} must be a number of seconds > 0, got {value!r}")
        if self.local_dir is not None:
            root = Path(self.local_dir)
            if not root.is_dir():
                raise ValueError(f"{FLAG_LOCAL_MEDIA}: {str(root)!r} is not a folder")
            object.__setattr__(self, "local_dir", root.resolve())
        object.__setattr__(self, "hosts", tuple(self.hosts))
        for entry in self.hosts:
            parse_host(entry)

    # --- the one entry point ----------------------------------------------------------

    def load(self, url: str) -> Image:
        """The image an ``image_url`` refers to, if this policy allows reading it and it
        is a sound image within the limits; MediaError otherwise."""
        if not isinstance(url, str):
            raise MediaError(f"image_url must be a string URL, got {type(url).__name__}")
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            data = self._data_uri(url)
        elif scheme == "file":
            data = self._local_file(url)
        elif scheme in ("http", "https"):
            data = self._fetch(url)
        else:
            raise MediaError(f"image_url {_shown(url)!r}: only data: URIs are accepted "
                             f"(data:image/png;base64,…); file: needs {FLAG_LOCAL_MEDIA}, "
                             f"http(s): needs {FLAG_MEDIA_HOSTS}")
        return check_image(data, self.max_image_pixels)

    def check_count(self, n_images: int) -> None:
        if n_images > self.max_images:
            raise MediaError(f"the request has {n_images} images, more than this server's limit of "
                             f"{self.max_images} ({FLAG_MAX_IMAGES})")

    # --- data: ------------------------------------------------------------------------

    def _too_large(self, what: str, size: Union[int, str]) -> MediaError:
        return MediaError(f"{what} is {size} bytes, more than this server's limit of "
                          f"{self.max_image_bytes} ({FLAG_MAX_IMAGE_BYTES})")

    def _data_uri(self, url: str) -> bytes:
        header, comma, payload = url[len("data:"):].partition(",")
        if not comma:
            raise MediaError("the data: URI has no ',' before its data (data:image/png;base64,…)")
        if "base64" in (p.strip().lower() for p in header.split(";")[1:]):
            compact = "".join(payload.split())
            if len(compact) // 4 * 3 > self.max_image_bytes + 3:
                raise self._too_large("the data: URI's image", f"about {len(compact) // 4 * 3}")
            try:
                data = base64.b64decode(compact, validate=True)
            except (binascii.Error, ValueError) as e:
                raise MediaError(f"the data: URI is not valid base64 ({e})") from None
        else:
            data = unquote_to_bytes(payload)
        if len(data) > self.max_image_bytes:
            raise self._too_large("the data: URI's image", len(data))
        return data

    # --- file: ------------------------------------------------------------------------

    def _local_file(self, url: str) -> bytes:
        root = self.local_dir
        if root is None:
            raise MediaError(f"image_url {_shown(url)!r}: this server reads no local files; send the image "
                             f"as a data: URI (base64), or start the server with {FLAG_LOCAL_MEDIA} DIR "
                             "to allow files inside DIR")
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise MediaError(f"image_url {_shown(url)!r}: a file: URL names no host (file:///path)")
        path = Path(url2pathname(parts.path))
        if not path.is_absolute():
            raise MediaError(f"image_url {_shown(url)!r}: a file: URL needs an absolute path (file:///path)")
        real = Path(os.path.realpath(path))  # symlinks and .. resolved
        if real != root and root not in real.parents:
            raise MediaError(f"image_url {_shown(url)!r}: the file is not inside {root} ({FLAG_LOCAL_MEDIA})")
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(real, flags)
        except OSError as e:
            raise MediaError(f"image_url {_shown(url)!r}: cannot open the file ({e.strerror})") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise MediaError(f"image_url {_shown(url)!r}: not a regular file")
            if st.st_size > self.max_image_bytes:
                raise self._too_large("the file", st.st_size)
        except BaseException:
            os.close(fd)
            raise
        with os.fdopen(fd, "rb") as f:
            data = f.read(self.max_image_bytes + 1)
        if len(data) > self.max_image_bytes:
            raise self._too_large("the file", f"more than {self.max_image_bytes}")
        return data

    # --- http(s): ---------------------------------------------------------------------

    def _host_allowed(self, host: str, port: int) -> bool:
        for entry in self.hosts:
            allowed_host, allowed_port = parse_host(entry)
            if allowed_host == host and (allowed_port is None or allowed_port == port):
                return True
        return False

    def _fetch(self, url: str) -> bytes:
        if not self.hosts:
            raise MediaError(f"image_url {_shown(url)!r}: this server fetches no URLs; send the image as a "
                             f"data: URI (base64), or start the server with {FLAG_MEDIA_HOSTS} HOST,… "
                             "to allow fetching from those hosts")
        original = url
        for _hop in range(MAX_REDIRECTS + 1):
            parts = urlsplit(url)
            scheme = parts.scheme.lower()
            try:
                port = parts.port or (443 if scheme == "https" else 80)
            except ValueError:
                raise MediaError(f"image_url {_shown(url)!r}: bad port") from None
            host = (parts.hostname or "").lower()
            where = "" if url == original else f" (redirected from {_shown(original)!r})"
            if scheme not in ("http", "https"):
                raise MediaError(f"image_url {_shown(url)!r}{where}: only http and https are fetched")
            if not self._host_allowed(host, port):
                raise MediaError(f"image_url {_shown(url)!r}{where}: host {host}:{port} is not in "
                                 f"{FLAG_MEDIA_HOSTS} ({','.join(self.hosts)})")
            status, location, data = self._get(url)
            if location is None:
                if status != 200:
                    raise MediaError(f"image_url {_shown(url)!r}{where}: the server answered HTTP {status}")
                return data
            url = urljoin(url, location)
        raise MediaError(f"image_url {_shown(original)!r}: more than {MAX_REDIRECTS} redirects")

    def _get(self, url: str) -> Tuple[int, Optional[str], bytes]:
        """(status, redirect location or None, body) of one GET, within the limits."""
        split = urlsplit(url)
        host = split.hostname or ""
        port = split.port or (443 if split.scheme.lower() == "https" else 80)
        target = (split.path or "/") + (f"?{split.query}" if split.query else "")
        conn: http.client.HTTPConnection
        if split.scheme.lower() == "https":
            conn = http.client.HTTPSConnection(host, port, timeout=self.connect_timeout,
                                               context=ssl.create_default_context())
        else:
            conn = http.client.HTTPConnection(host, port, timeout=self.connect_timeout)
        deadline = time.monotonic() + self.connect_timeout + self.read_timeout
        try:
            conn.connect()
            assert conn.sock is not None
            conn.sock.settimeout(self.read_timeout)
            conn.request("GET", target, headers={"Accept": "image/*", "User-Agent": "pykvsmooth-server"})
            resp = conn.getresponse()
            if resp.status in (301, 302, 303, 307, 308):
                location = resp.getheader("Location")
                if not location:
                    raise MediaError(f"image_url {_shown(url)!r}: HTTP {resp.status} without a Location")
                return resp.status, location, b""
            if resp.status != 200:
                return resp.status, None, b""
            length = resp.getheader("Content-Length")
            if length is not None and length.isdigit() and int(length) > self.max_image_bytes:
                raise self._too_large(f"image_url {_shown(url)!r}", int(length))
            chunks = []
            size = 0
            while True:
                if time.monotonic() > deadline:
                    raise MediaError(f"image_url {_shown(url)!r}: not received within {self.read_timeout:g} s "
                                     f"({FLAG_READ_TIMEOUT})")
                chunk = resp.read(64 * 1024)
                if not chunk:
                    break
                size += len(chunk)
                if size > self.max_image_bytes:
                    raise self._too_large(f"image_url {_shown(url)!r}", f"more than {self.max_image_bytes}")
                chunks.append(chunk)
            return resp.status, None, b"".join(chunks)
        except socket.timeout:
            raise MediaError(f"image_url {_shown(url)!r}: timed out (connect {self.connect_timeout:g} s, "
                             f"read {self.read_timeout:g} s: {FLAG_CONNECT_TIMEOUT}, {FLAG_READ_TIMEOUT})") from None
        except (OSError, http.client.HTTPException) as e:
            raise MediaError(f"image_url {_shown(url)!r}: cannot fetch it ({e})") from None
        finally:
            conn.close()


def check_image(data: bytes, max_pixels: int) -> Image:
    """``data`` as an Image if it is a whole JPEG, PNG, BMP or GIF of at most ``max_pixels``
    pixels (from the header, before decoding); MediaError naming the problem otherwise."""
    from PIL import Image as PILImage
    from PIL import UnidentifiedImageError

    fmt = "image"
    try:
        with PILImage.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:
            fmt = str(im.format)
            width, height = im.size
            if width * height > max_pixels:
                raise MediaError(f"the {fmt} image is {width}x{height} = {width * height} pixels, more than this "
                                 f"server's limit of {max_pixels} ({FLAG_MAX_IMAGE_PIXELS})")
            im.load()  # the whole image: truncated or corrupt data fails here
    except MediaError:
        raise
    except PILImage.DecompressionBombError as e:  # Pillow's own limit, from the header too
        raise MediaError(f"the image has too many pixels ({e}); this server's limit is {max_pixels} "
                         f"({FLAG_MAX_IMAGE_PIXELS})") from None
    except UnidentifiedImageError:
        raise MediaError(f"the data is not a {', '.join(IMAGE_FORMATS[:-1])} or {IMAGE_FORMATS[-1]} image "
                         f"({len(data)} bytes)") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as e:
        raise MediaError(f"the {fmt} image is corrupt or truncated ({e})") from None
    return Image(data, fmt, width, height)

