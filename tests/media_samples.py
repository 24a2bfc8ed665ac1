"""Samples for the media tests: images good and bad, and a counting HTTP server on
127.0.0.1 that serves the files it is given, redirects where told, and counts every
request per path."""

from __future__ import annotations

import io
import struct
import threading
import zlib
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, Iterator, Optional, Tuple


class CountingServer:
    """``files``: path -> body; ``redirects``: path -> Location. Other paths get 404."""

    def __init__(self, files: Dict[str, bytes], redirects: Optional[Dict[str, str]] = None) -> None:
        self.files = dict(files)
        self.redirects = dict(redirects or {})
        self.hits: Counter[str] = Counter()
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                with outer._lock:
                    outer.hits[self.path] += 1
                if self.path in outer.redirects:
                    self.send_response(302)
                    self.send_header("Location", outer.redirects[self.path].format(port=outer.port))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif self.path in outer.files:
                    body = outer.files[self.path]
                    self.send_response(200)
                    self.send_header("Content-Type", "application/octet-stream")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                else:
                    self.send_error(404)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def count(self, path: str) -> int:
        with self._lock:
            return self.hits[path]

    def __enter__(self) -> "CountingServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)


def serving(files: Dict[str, bytes], redirects: Optional[Dict[str, str]] = None) -> Iterator[CountingServer]:
    """For a pytest fixture: ``yield from serving({...})``."""
    with CountingServer(files, redirects) as server:
        yield server


def silent_listener() -> Tuple[object, int]:
    """A socket on 127.0.0.1 that accepts connections and never answers (timeouts)."""
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    return sock, int(sock.getsockname()[1])


# --- images ------------------------------------------------------------------------------------


def jpeg_of(png: bytes) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").save(out, "JPEG", quality=90)
    return out.getvalue()


def noise_png(width: int, height: int, seed: int = 0) -> bytes:
    """A valid PNG that does not compress: about 3 bytes per pixel."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def bomb_png(width: int = 9000, height: int = 9000) -> bytes:
    """A real decompression bomb: a 1-bit all-black PNG, a few KB that decode to
    width*height pixels (81 Mpx, 243 MB as the RGB that libmtmd would make of it)."""
    from PIL import Image

    out = io.BytesIO()
    Image.new("1", (width, height)).save(out, "PNG", optimize=True)
    return out.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature, an IHDR for width x height RGB and an empty IEND: the header of an
    image far too large, with no pixel data at all."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def tiff_of(png: bytes) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.open(io.BytesIO(png)).save(out, "TIFF")
    return out.getvalue()
