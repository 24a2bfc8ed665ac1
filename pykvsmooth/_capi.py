"""ctypes declarations of the C functions the patch series adds to ``llama.h``.

One C declaration, one typed Python stub, with the C prototype quoted above it, as in
``llama_cpp/llama_cpp.py``; bound to the same ``libllama`` that llama_cpp loaded.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING, Any, Callable, List, Optional, TypeVar

import llama_cpp.llama_cpp as _llama
from llama_cpp._ctypes_extensions import ctypes_function_for_shared_library
from llama_cpp.llama_cpp import llama_context_p, llama_context_p_ctypes, llama_model_p, llama_model_p_ctypes

if TYPE_CHECKING:
    from llama_cpp._ctypes_extensions import CtypesPointerOrRef

_lib: ctypes.CDLL = _llama._lib

if not hasattr(_lib, "llama_kvsmooth_build_info"):
    raise ImportError(
        f"pykvsmooth: llama_cpp loaded {_llama._base_path}, which is not the KVSmooth build of "
        "llama.cpp (no llama_kvsmooth_build_info). Reinstall pykvsmooth with `make install` in "
        "its source tree; it installs llama-cpp-python on the patched libraries."
    )

_F = TypeVar("_F", bound=Callable[..., Any])
# llama_cpp's decorator, with the signature its untyped factory leaves out
ctypes_function: Callable[[str, List[Any], Any], Callable[[_F], _F]] = (
    ctypes_function_for_shared_library(_lib)
)

llama_seq_id = ctypes.c_int32
llama_pos = ctypes.c_int32

# enum llama_kvsmooth_mode
LLAMA_KVSMOOTH_MODE_ADAPTIVE = 0
LLAMA_KVSMOOTH_MODE_FIXED = 1
LLAMA_KVSMOOTH_MODE_KEYS = 2

# enum llama_kvsmooth_impl
LLAMA_KVSMOOTH_IMPL_AUTO = 0
LLAMA_KVSMOOTH_IMPL_FUSED = 1
LLAMA_KVSMOOTH_IMPL_COMPOSED = 2

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
#     enum llama_kvsmooth_impl impl;
# };
class llama_kvsmooth_params(ctypes.Structure):
    if TYPE_CHECKING:
        lambda_ref: float
        window: float
        queue: int
        layer_start: int
        layer_end: int
        eps: float
        mode: int
        trace: bool
        impl: int

    _fields_ = [
        ("lambda_ref", ctypes.c_float),
        ("window", ctypes.c_float),
        ("queue", ctypes.c_int32),
        ("layer_start", ctypes.c_int32),
        ("layer_end", ctypes.c_int32),
        ("eps", ctypes.c_float),
        ("mode", ctypes.c_int),
        ("trace", ctypes.c_bool),
        ("impl", ctypes.c_int),
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
    if TYPE_CHECKING:
        seq_id: int
        pos: int
        layer: int
        z: float
        lambda_: float
        rank: int
        applied: bool

    _fields_ = [
        ("seq_id", llama_seq_id),
        ("pos", llama_pos),
        ("layer", ctypes.c_int32),
        ("z", ctypes.c_float),
        ("lambda_", ctypes.c_float),
        ("rank", ctypes.c_int32),
        ("applied", ctypes.c_bool),
    ]


# LLAMA_API struct llama_kvsmooth_params llama_kvsmooth_default_params(void);
@ctypes_function("llama_kvsmooth_default_params", [], llama_kvsmooth_params)
def llama_kvsmooth_default_params() -> llama_kvsmooth_params:
    """λref 0.9, window 0.2, queue 15, layers -1/-1 (the model's [3, n_layer − 1)), adaptive."""
    ...


# LLAMA_API int32_t llama_kvsmooth_set(
#         struct llama_context * ctx, const struct llama_kvsmooth_params * params);
@ctypes_function(
    "llama_kvsmooth_set",
    [llama_context_p_ctypes, ctypes.POINTER(llama_kvsmooth_params)],
    ctypes.c_int32,
)
def llama_kvsmooth_set(
    ctx: llama_context_p, params: CtypesPointerOrRef[llama_kvsmooth_params], /
) -> int:
    """Enable or reconfigure KVSmooth: 0, or LLAMA_KVSMOOTH_ERR_* (the previous setting stays)."""
    ...


# LLAMA_API void llama_kvsmooth_disable(struct llama_context * ctx);
@ctypes_function("llama_kvsmooth_disable", [llama_context_p_ctypes], None)
def llama_kvsmooth_disable(ctx: llama_context_p, /) -> None:
    """Back to the unpatched graph."""
    ...


# LLAMA_API bool llama_kvsmooth_enabled(const struct llama_context * ctx);
@ctypes_function("llama_kvsmooth_enabled", [llama_context_p_ctypes], ctypes.c_bool)
def llama_kvsmooth_enabled(ctx: llama_context_p, /) -> bool: ...


# LLAMA_API bool llama_kvsmooth_get_params(
#         const struct llama_context * ctx, struct llama_kvsmooth_params * out);
@ctypes_function(
    "llama_kvsmooth_get_params",
    [llama_context_p_ctypes, ctypes.POINTER(llama_kvsmooth_params)],
    ctypes.c_bool,
)
def llama_kvsmooth_get_params(
    ctx: llama_context_p, out: CtypesPointerOrRef[llama_kvsmooth_params], /
) -> bool:
    """The active parameters (layer range resolved); False when KVSmooth is off."""
    ...


# LLAMA_API void llama_kvsmooth_reset(struct llama_context * ctx, llama_seq_id seq_id);
@ctypes_function("llama_kvsmooth_reset", [llama_context_p_ctypes, llama_seq_id], None)
def llama_kvsmooth_reset(ctx: llama_context_p, seq_id: int, /) -> None:
    """Empty the entropy queues of seq_id (-1: of every sequence)."""
    ...


# // while paused, no token of a llama_decode is smoothed, as if none had requested output (the queues
# // of its sequences are emptied, as for a new prompt). Changes no graph and reserves nothing
# LLAMA_API void llama_kvsmooth_pause (struct llama_context * ctx, bool paused);
@ctypes_function("llama_kvsmooth_pause", [llama_context_p_ctypes, ctypes.c_bool], None)
def llama_kvsmooth_pause(ctx: llama_context_p, paused: bool, /) -> None: ...


# LLAMA_API bool llama_kvsmooth_paused(const struct llama_context * ctx);
@ctypes_function("llama_kvsmooth_paused", [llama_context_p_ctypes], ctypes.c_bool)
def llama_kvsmooth_paused(ctx: llama_context_p, /) -> bool: ...


# // the reason the last llama_kvsmooth_set on ctx failed ("" after a success), the text it also logs
# LLAMA_API const char * llama_kvsmooth_last_error(const struct llama_context * ctx);
@ctypes_function("llama_kvsmooth_last_error", [llama_context_p_ctypes], ctypes.c_char_p)
def llama_kvsmooth_last_error(ctx: llama_context_p, /) -> Optional[bytes]: ...


# struct llama_kvsmooth_seq_params {
#     bool  enabled;
#     float lambda_ref;
#     float window;
#     enum llama_kvsmooth_mode mode;
# };
class llama_kvsmooth_seq_params(ctypes.Structure):
    if TYPE_CHECKING:
        enabled: bool
        lambda_ref: float
        window: float
        mode: int

    _fields_ = [
        ("enabled", ctypes.c_bool),
        ("lambda_ref", ctypes.c_float),
        ("window", ctypes.c_float),
        ("mode", ctypes.c_int),
    ]


# LLAMA_API int32_t llama_kvsmooth_set_seq(
#         struct llama_context * ctx, llama_seq_id seq_id, const struct llama_kvsmooth_seq_params * params);
@ctypes_function(
    "llama_kvsmooth_set_seq",
    [llama_context_p_ctypes, llama_seq_id, ctypes.POINTER(llama_kvsmooth_seq_params)],
    ctypes.c_int32,
)
def llama_kvsmooth_set_seq(
    ctx: llama_context_p, seq_id: int, params: Optional[CtypesPointerOrRef[llama_kvsmooth_seq_params]], /
) -> int:
    """seq_id's own lambda_ref/window/mode (enabled false: not smoothed); NULL: the context's."""
    ...


# LLAMA_API bool llama_kvsmooth_get_seq(
#         const struct llama_context * ctx, llama_seq_id seq_id, struct llama_kvsmooth_seq_params * out);
@ctypes_function(
    "llama_kvsmooth_get_seq",
    [llama_context_p_ctypes, llama_seq_id, ctypes.POINTER(llama_kvsmooth_seq_params)],
    ctypes.c_bool,
)
def llama_kvsmooth_get_seq(
    ctx: llama_context_p, seq_id: int, out: CtypesPointerOrRef[llama_kvsmooth_seq_params], /
) -> bool: ...


# llama.h's, not bound by llama-cpp-python 0.3.36:
# LLAMA_API bool llama_model_is_hybrid(const struct llama_model * model);
@ctypes_function("llama_model_is_hybrid", [llama_model_p_ctypes], ctypes.c_bool)
def llama_model_is_hybrid(model: llama_model_p, /) -> bool: ...


# LLAMA_API int32_t llama_kvsmooth_trace_n(const struct llama_context * ctx);
@ctypes_function("llama_kvsmooth_trace_n", [llama_context_p_ctypes], ctypes.c_int32)
def llama_kvsmooth_trace_n(ctx: llama_context_p, /) -> int: ...


# LLAMA_API bool llama_kvsmooth_trace_get(
#         const struct llama_context * ctx, int32_t i, struct llama_kvsmooth_trace_record * out);
@ctypes_function(
    "llama_kvsmooth_trace_get",
    [llama_context_p_ctypes, ctypes.c_int32, ctypes.POINTER(llama_kvsmooth_trace_record)],
    ctypes.c_bool,
)
def llama_kvsmooth_trace_get(
    ctx: llama_context_p, i: int, out: CtypesPointerOrRef[llama_kvsmooth_trace_record], /
) -> bool: ...


# LLAMA_API const char * llama_kvsmooth_build_info(void);
@ctypes_function("llama_kvsmooth_build_info", [], ctypes.c_char_p)
def llama_kvsmooth_build_info() -> bytes: ...


def build_info() -> str:
    """The patch series' identification string, e.g. ``"pykvsmooth 0.1.0 (llama.cpp 0c1e570)"``."""
    return llama_kvsmooth_build_info().decode()


def last_error(ctx: llama_context_p) -> str:
    """Why the last llama_kvsmooth_set on ctx failed ("" after a success)."""
    text = llama_kvsmooth_last_error(ctx)
    return "" if text is None else text.decode("utf-8", "replace").strip()
