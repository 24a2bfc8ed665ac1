"""pykvsmooth: KVSmooth hallucination mitigation inside llama.cpp.

``make install`` installs the patched llama.cpp libraries where llama-cpp-python loads them
(``llama_cpp/lib``), so ``pykvsmooth`` and ``llama_cpp`` may be imported in either order
(``_libs``).  The names below that need llama_cpp (and numpy) are loaded on first use, so
the console programs start without them.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._libs import LibraryConflictError, configure_llama_cpp, lib_dir

configure_llama_cpp()

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "build_info": "._capi",
    "KVSmoothConfig": ".config",
    "Llama": ".llama",
    "KVSmoothError": ".llama",
    "TraceRecord": ".llama",
}

__all__ = ["LibraryConflictError", "lib_dir", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pykvsmooth' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
