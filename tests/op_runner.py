"""ctypes access to libkvsmooth-op-runner.so, which builds one KVSmooth op graph and runs it.

The library is found through $PYKVSMOOTH_OP_RUNNER (full path), else in pykvsmooth/lib/
next to the installed package, located without importing pykvsmooth. A missing library is
an error (RunnerNotFound), never a reason to skip: the op tests exist to run the kernels.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from kvsmooth_oracle import OpCase

LIBRARY_NAME = "libkvsmooth-op-runner.so"
ENV_VAR = "PYKVSMOOTH_OP_RUNNER"

RC_OK = 0
RC_BAD_ARGUMENTS = 1
RC_NO_BACKEND = 2
RC_NOT_SUPPORTED = 3
RC_NAMES = {RC_OK: "ok", RC_BAD_ARGUMENTS: "bad arguments", RC_NO_BACKEND: "backend not found",
            RC_NOT_SUPPORTED: "op not supported on backend"}  # fmt: skip


# every case: the op, and the same computation from stock ggml ops
IMPLS = ("fused", "composed")
# scores-path cases only (V not transposed, mask none or f16): flash attention's entropy side
# output feeding the op, as llama.cpp runs it with flash attention on the CPU
FLASH = "flash"
ENTRIES = {"fused": "kvsmooth_op_run", "composed": "kvsmooth_op_run_composed", FLASH: "kvsmooth_op_run_flash"}


class RunnerNotFound(RuntimeError):
    pass


class KvsmoothOpCase(ctypes.Structure):
    """struct kvsmooth_op_case (same field order as OpCase)."""

    _fields_ = [
        (f.name, ctypes.c_float if f.type in ("float", float) else ctypes.c_int32) for f in fields(OpCase)
    ]


def find_library() -> Path:
    env = os.environ.get(ENV_VAR)
    if env:
        path = Path(env)
        if not path.is_file():
            raise RunnerNotFound(f"{ENV_VAR}={env} does not name a file")
        return path
    spec = importlib.util.find_spec("pykvsmooth")
    if spec is None or not spec.submodule_search_locations:
        raise RunnerNotFound(
            f"{LIBRARY_NAME} not found: set {ENV_VAR} to its full path, or install pykvsmooth "
            "with its native libraries (pykvsmooth/lib/)"
        )
    tried = [Path(loc) / "lib" / LIBRARY_NAME for loc in spec.submodule_search_locations]
    for path in tried:
        if path.is_file():
            return path
    raise RunnerNotFound(
        f"{LIBRARY_NAME} not found in {', '.join(map(str, tried))}: build the native libraries "
        f"or set {ENV_VAR} to the library's full path"
    )


_lib: ctypes.CDLL | None = None


def load_library() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        lib = ctypes.CDLL(str(find_library()))
        for fn in (getattr(lib, name) for name in ENTRIES.values()):
            fn.restype = ctypes.c_int
            fn.argtypes = ARGTYPES
        _lib = lib
    return _lib


ARGTYPES = [
    ctypes.c_char_p,
    ctypes.POINTER(KvsmoothOpCase),
    ctypes.c_void_p,  # kq_or_q
    ctypes.c_void_p,  # mask
    ctypes.c_void_p,  # sinks
    ctypes.c_void_p,  # k
    ctypes.c_void_p,  # v
    ctypes.c_void_p,  # ids
    ctypes.c_void_p,  # state
    ctypes.c_void_p,  # result
]


@dataclass
class RunOutput:
    rc: int
    k: np.ndarray
    v: np.ndarray
    state: np.ndarray
    result: np.ndarray


def _ptr(a: np.ndarray | None) -> int | None:
    return None if a is None else a.ctypes.data


def run_case(
    backend: str,
    case: OpCase,
    kq_or_q: np.ndarray,
    mask: np.ndarray | None,
    sinks: np.ndarray | None,
    k: np.ndarray,
    v: np.ndarray,
    ids: np.ndarray,
    state: np.ndarray,
    impl: str = "fused",
) -> RunOutput:
    """Run the op once (impl "fused": GGML_OP_KVSMOOTH; "composed": the same computation from
    stock ggml ops; "flash": flash attention's entropies into the op); inputs are not modified,
    the outputs are fresh arrays."""
    if impl not in ENTRIES:
        raise ValueError(f"impl must be one of {', '.join(ENTRIES)}, got {impl!r}")
    lib = load_library()
    c = KvsmoothOpCase(**{f.name: getattr(case, f.name) for f in fields(OpCase)})
    kq_or_q = np.ascontiguousarray(kq_or_q, dtype=np.float32)
    mask = None if mask is None else np.ascontiguousarray(mask, dtype=np.float32)
    sinks = None if sinks is None else np.ascontiguousarray(sinks, dtype=np.float32)
    k_out = np.array(k, copy=True, order="C")
    v_out = np.array(v, copy=True, order="C")
    ids = np.ascontiguousarray(ids, dtype=np.int32)
    state_out = np.array(state, dtype=np.float32, copy=True, order="C")
    # NaN marks entries the op never wrote
    result = np.full((case.n_smooth, 4), np.nan, dtype=np.float32)
    entry = getattr(lib, ENTRIES[impl])
    rc = entry(
        backend.encode(),
        ctypes.byref(c),
        _ptr(kq_or_q),
        _ptr(mask),
        _ptr(sinks),
        _ptr(k_out),
        _ptr(v_out),
        _ptr(ids),
        _ptr(state_out),
        _ptr(result),
    )
    return RunOutput(int(rc), k_out, v_out, state_out, result)
