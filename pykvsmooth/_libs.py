"""Point llama-cpp-python at the patched llama.cpp libraries shipped in this package.

llama-cpp-python 0.3.36 loads ``libllama`` from ``$LLAMA_CPP_LIB_PATH`` and ``libmtmd``
from ``$MTMD_CPP_LIB`` when it is first imported, so these must be set before that.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

PACKAGE_LIB_DIR = Path(__file__).resolve().parent / "lib"
PACKAGE_BIN_DIR = Path(__file__).resolve().parent / "bin"


class LibraryConflictError(ImportError):
    """llama_cpp was imported before pykvsmooth, with other native libraries."""


def lib_dir() -> Path:
    """The folder holding the patched libllama, libggml* and libmtmd."""
    override = os.environ.get("PYKVSMOOTH_LIB_DIR")
    return Path(override).resolve() if override else PACKAGE_LIB_DIR


def _shared_library(name: str) -> str:
    if sys.platform == "darwin":
        return f"lib{name}.dylib"
    if sys.platform == "win32":
        return f"{name}.dll"
    return f"lib{name}.so"


def configure_llama_cpp() -> Path:
    """Make the next ``import llama_cpp`` load our libraries; refuse if it is too late."""
    libs = lib_dir()
    if not (libs / _shared_library("llama")).exists():
        raise ImportError(
            f"pykvsmooth: {libs / _shared_library('llama')} is missing; "
            "the package was not built. Run `make install` in the pykvsmooth source tree."
        )
    loaded = sys.modules.get("llama_cpp.llama_cpp")
    if loaded is not None:
        loaded_from = Path(getattr(loaded, "_base_path", "")).resolve()
        if loaded_from != libs:
            raise LibraryConflictError(
                f"pykvsmooth: llama_cpp was already imported with the libraries in "
                f"{loaded_from}, not the KVSmooth build in {libs}. Import pykvsmooth before "
                "llama_cpp (or start a new Python process), e.g. `import pykvsmooth` as the "
                "first import, or set LLAMA_CPP_LIB_PATH and MTMD_CPP_LIB to "
                f"{libs} before importing llama_cpp."
            )
    os.environ["LLAMA_CPP_LIB_PATH"] = str(libs)
    os.environ["MTMD_CPP_LIB"] = str(libs)
    return libs
