"""Console entry points for the native programs installed in ``pykvsmooth/bin``.

The programs live next to the package's libraries (found through their RPATH), so the
entry points only replace the Python process with the program, keeping its arguments,
standard streams and exit status.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

from ._libs import PACKAGE_BIN_DIR


def _exec(program: str) -> NoReturn:
    path = PACKAGE_BIN_DIR / program
    if not path.exists():
        sys.stderr.write(f"{program}: {path} is missing; reinstall pykvsmooth (`make install`)\n")
        raise SystemExit(127)
    os.execv(path, [program, *sys.argv[1:]])


def llama_mtmd_cli() -> NoReturn:
    _exec("llama-mtmd-cli")


def llama_llava_cli() -> NoReturn:
    _exec("llama-llava-cli")


def llama_server() -> NoReturn:
    _exec("llama-server")


def test_backend_ops() -> NoReturn:
    """llama.cpp's op checker, with KVSmooth's case (``test-backend-ops -o KVSMOOTH -b DEVICE``)."""
    _exec("test-backend-ops")
