"""Where the patched llama.cpp libraries are, and making sure llama_cpp loads them.

``make install`` puts the one native build into ``site-packages/llama_cpp/lib``, the folder
llama-cpp-python 0.3.36 loads ``libllama`` and ``libmtmd`` from when ``LLAMA_CPP_LIB_PATH``
and ``MTMD_CPP_LIB`` are unset: ``import llama_cpp`` and ``import pykvsmooth`` work in either
order and nothing needs to be set.  Two other layouts point llama_cpp elsewhere through
those two variables, which llama_cpp reads when it is first imported:

- ``$PYKVSMOOTH_LIB_DIR`` (e.g. ``scripts/bench.py`` comparing against an unpatched build);
- a source checkout whose ``pykvsmooth/lib`` holds a build (development, ``PYTHONPATH``).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Optional

PACKAGE_DIR = Path(__file__).resolve().parent
PACKAGE_LIB_DIR = PACKAGE_DIR / "lib"  # the op runner; the whole build in a source checkout
PACKAGE_BIN_DIR = PACKAGE_DIR / "bin"  # llama-mtmd-cli, llama-llava-cli

LIB_DIR_ENV = "PYKVSMOOTH_LIB_DIR"


class LibraryConflictError(ImportError):
    """llama_cpp was imported before pykvsmooth, with other native libraries."""


def shared_library(name: str) -> str:
    """The file name of library ``name`` on this platform (as llama_cpp looks for it)."""
    if sys.platform == "darwin":
        return f"lib{name}.dylib"
    if sys.platform == "win32":
        return f"{name}.dll"
    return f"lib{name}.so"


def llama_cpp_lib_dir() -> Optional[Path]:
    """llama_cpp's own library folder (``llama_cpp/lib``), found without importing it."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))).resolve() / "lib"


def lib_dir() -> Path:
    """The folder holding the patched libllama, libggml* and libmtmd."""
    override = os.environ.get(LIB_DIR_ENV)
    if override:
        return Path(override).resolve()
    if (PACKAGE_LIB_DIR / shared_library("llama")).exists():
        return PACKAGE_LIB_DIR.resolve()
    installed = llama_cpp_lib_dir()
    if installed is None:
        raise ImportError("pykvsmooth: llama_cpp (llama-cpp-python 0.3.36) is not installed; "
                          "run `make install` in the pykvsmooth source tree")
    return installed


def configure_llama_cpp() -> Path:
    """Make llama_cpp load our libraries; refuse if it already loaded others."""
    libs = lib_dir()
    if not (libs / shared_library("llama")).exists():
        raise ImportError(
            f"pykvsmooth: {libs / shared_library('llama')} is missing; the patched llama.cpp "
            "was not built. Run `make install` in the pykvsmooth source tree."
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
        return libs
    # llama_cpp's default when they are unset; set, they must not point elsewhere
    os.environ["LLAMA_CPP_LIB_PATH"] = str(libs)
    os.environ["MTMD_CPP_LIB"] = str(libs)
    return libs
