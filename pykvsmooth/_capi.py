"""ctypes declarations of the C functions the patch series adds to ``llama.h``.

One C declaration, one ctypes declaration, with the C prototype above it, as in
``llama_cpp/llama_cpp.py``; loaded from the same ``libllama`` that llama_cpp uses.
"""

from __future__ import annotations

import ctypes

import llama_cpp.llama_cpp as _llama

_lib: ctypes.CDLL = _llama._lib

llama_context_p = _llama.llama_context_p_ctypes
llama_seq_id = ctypes.c_int32
llama_pos = ctypes.c_int32

# enum llama_kvsmooth_mode
LLAMA_KVSMOOTH_MODE_ADAPTIVE = 0
LLAMA_KVSMOOTH_MODE_FIXED = 1
LLAMA_KVSMOOTH_MODE_KEYS = 2

# return values of llama_kvsmooth_set
LLAMA_KVSMOOTH_ERR_INVALID_PARAM = -1
LLAMA_KVSMOOTH_ERR_UNSUPPORTED = -2
LLAMA_KVSMOOTH_ERR_ALLOC = -3


# struct llama_kvsmooth_params {
#     float   lambda_ref;
#     float   window;
#     int32_t queue;
#     int32_t layer_start;
#     int32_t layer_end;
#     float   eps;
#     enum llama_kvsmooth_mode mode;
#     bool    trace;
# };
class llama_kvsmooth_params(ctypes.Structure):
    _fields_ = [
        ("lambda_ref", ctypes.c_float),
        ("window", ctypes.c_float),
        ("queue", ctypes.c_int32),
        ("layer_start", ctypes.c_int32),
        ("layer_end", ctypes.c_int32),
        ("eps", ctypes.c_float),
        ("mode", ctypes.c_int),
        ("trace", ctypes.c_bool),
    ]


# struct llama_kvsmooth_trace_record {
#     llama_seq_id seq_id;
#     llama_pos    pos;
#     int32_t      layer;
#     float        z;
#     float        lambda;
#     int32_t      rank;
#     bool         applied;
# };
class llama_kvsmooth_trace_record(ctypes.Structure):
    _fields_ = [
        ("seq_id", llama_seq_id),
        ("pos", llama_pos),
        ("layer", ctypes.c_int32),
        ("z", ctypes.c_float),
        ("lambda_", ctypes.c_float),
        ("rank", ctypes.c_int32),
        ("applied", ctypes.c_bool),
    ]


def _declare(name: str, argtypes: list, restype) -> None:  # type: ignore[type-arg]
    fn = getattr(_lib, name)
    fn.argtypes = argtypes
    fn.restype = restype


# LLAMA_API struct llama_kvsmooth_params llama_kvsmooth_default_params(void);
_declare("llama_kvsmooth_default_params", [], llama_kvsmooth_params)
# LLAMA_API int32_t llama_kvsmooth_set(struct llama_context * ctx, const struct llama_kvsmooth_params * params);
_declare("llama_kvsmooth_set", [llama_context_p, ctypes.POINTER(llama_kvsmooth_params)], ctypes.c_int32)
# LLAMA_API void llama_kvsmooth_disable(struct llama_context * ctx);
_declare("llama_kvsmooth_disable", [llama_context_p], None)
# LLAMA_API bool llama_kvsmooth_enabled(const struct llama_context * ctx);
_declare("llama_kvsmooth_enabled", [llama_context_p], ctypes.c_bool)
# LLAMA_API bool llama_kvsmooth_get_params(const struct llama_context * ctx, struct llama_kvsmooth_params * out);
_declare("llama_kvsmooth_get_params", [llama_context_p, ctypes.POINTER(llama_kvsmooth_params)], ctypes.c_bool)
# LLAMA_API void llama_kvsmooth_reset(struct llama_context * ctx, llama_seq_id seq_id);
_declare("llama_kvsmooth_reset", [llama_context_p, llama_seq_id], None)
# LLAMA_API int32_t llama_kvsmooth_trace_n(const struct llama_context * ctx);
_declare("llama_kvsmooth_trace_n", [llama_context_p], ctypes.c_int32)
# LLAMA_API bool llama_kvsmooth_trace_get(const struct llama_context * ctx, int32_t i, struct llama_kvsmooth_trace_record * out);
_declare("llama_kvsmooth_trace_get",
         [llama_context_p, ctypes.c_int32, ctypes.POINTER(llama_kvsmooth_trace_record)], ctypes.c_bool)
# LLAMA_API const char * llama_kvsmooth_build_info(void);
_declare("llama_kvsmooth_build_info", [], ctypes.c_char_p)

llama_kvsmooth_default_params = _lib.llama_kvsmooth_default_params
llama_kvsmooth_set = _lib.llama_kvsmooth_set
llama_kvsmooth_disable = _lib.llama_kvsmooth_disable
llama_kvsmooth_enabled = _lib.llama_kvsmooth_enabled
llama_kvsmooth_get_params = _lib.llama_kvsmooth_get_params
llama_kvsmooth_reset = _lib.llama_kvsmooth_reset
llama_kvsmooth_trace_n = _lib.llama_kvsmooth_trace_n
llama_kvsmooth_trace_get = _lib.llama_kvsmooth_trace_get
llama_kvsmooth_build_info = _lib.llama_kvsmooth_build_info


def build_info() -> str:
    """The patch series' identification string, e.g. ``"pykvsmooth 0.1.0 (llama.cpp 0c1e570)"``."""
    return llama_kvsmooth_build_info().decode()
