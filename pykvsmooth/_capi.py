"""ctypes declarations of the C functions the patch series adds to ``llama.h``.

One C function, one declaration, with the C prototype above it, as in
``llama_cpp/llama_cpp.py``; loaded from the same ``libllama`` that llama_cpp uses.
"""

from __future__ import annotations

import ctypes

import llama_cpp.llama_cpp as _llama

_lib: ctypes.CDLL = _llama._lib


# LLAMA_API const char * llama_kvsmooth_build_info(void);
_lib.llama_kvsmooth_build_info.argtypes = []
_lib.llama_kvsmooth_build_info.restype = ctypes.c_char_p


def build_info() -> str:
    """The patch series' identification string, e.g. ``"pykvsmooth 0.1.0 (llama.cpp 0c1e570)"``."""
    return _lib.llama_kvsmooth_build_info().decode()
