"""KVSmooth settings for Python callers: validated on construction (SPEC §1 ranges).

The defaults are llama.cpp's (``llama_kvsmooth_default_params()``), read once here; every
Python tool takes them from this module (``DEFAULTS``, ``DEFAULT_*``) instead of writing
the numbers again.
"""

from __future__ import annotations

import math
import struct
from dataclasses import asdict, dataclass
from typing import Any, Dict, Mapping, Optional, Union

from . import _capi

MODES = {
    "adaptive": _capi.LLAMA_KVSMOOTH_MODE_ADAPTIVE,
    "fixed": _capi.LLAMA_KVSMOOTH_MODE_FIXED,
    "keys": _capi.LLAMA_KVSMOOTH_MODE_KEYS,
}
# how the smoothing is computed (SPEC §4.2): auto = the KVSmooth op where the device has it,
# else stock ggml ops; fused = the op only; composed = stock ops only (every backend, slower)
IMPLS = {
    "auto": _capi.LLAMA_KVSMOOTH_IMPL_AUTO,
    "fused": _capi.LLAMA_KVSMOOTH_IMPL_FUSED,
    "composed": _capi.LLAMA_KVSMOOTH_IMPL_COMPOSED,
}
MAX_QUEUE = 256  # LLAMA_KVSMOOTH_MAX_QUEUE (llama.h)


def _c_float(value: float) -> float:
    """A C float as the shortest decimal that names it (0.9f: 0.9, not 0.8999999761581421)."""
    exact = struct.pack("f", value)
    for digits in range(1, 10):
        shortest = float(f"{value:.{digits}g}")
        if struct.pack("f", shortest) == exact:
            return shortest
    return value


_C_DEFAULTS = _capi.llama_kvsmooth_default_params()
DEFAULT_LAMBDA_REF: float = _c_float(_C_DEFAULTS.lambda_ref)
DEFAULT_WINDOW: float = _c_float(_C_DEFAULTS.window)
DEFAULT_QUEUE: int = int(_C_DEFAULTS.queue)
DEFAULT_EPS: float = _c_float(_C_DEFAULTS.eps)
DEFAULT_MODE: str = {v: k for k, v in MODES.items()}[int(_C_DEFAULTS.mode)]
DEFAULT_IMPL: str = {v: k for k, v in IMPLS.items()}[int(_C_DEFAULTS.impl)]
# the default layer range is the loaded model's [3, n_layer - 1) (SPEC §1), chosen in C
DEFAULT_LAYERS_TEXT = "3-(n_layer - 1)"


@dataclass(frozen=True)
class KVSmoothConfig:
    """KVSmooth parameters; ``None`` layers mean SPEC §1's defaults for the loaded model
    ([3, n_layer − 1))."""

    lambda_ref: float = DEFAULT_LAMBDA_REF
    window: float = DEFAULT_WINDOW
    queue: int = DEFAULT_QUEUE
    layer_start: Optional[int] = None
    layer_end: Optional[int] = None
    mode: str = DEFAULT_MODE
    eps: float = DEFAULT_EPS
    trace: bool = False
    impl: str = DEFAULT_IMPL

    def __post_init__(self) -> None:
        def number(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                raise ValueError(f"KVSmoothConfig.{name} must be a number, got {value!r}")
            return float(value)

        if not 0.0 <= number("lambda_ref") <= 1.0:
            raise ValueError(f"KVSmoothConfig.lambda_ref must be in [0, 1], got {self.lambda_ref!r}")
        if not number("window") >= 0.0:
            raise ValueError(f"KVSmoothConfig.window must be >= 0, got {self.window!r}")
        if not 0.0 <= number("eps") < 1.0:
            raise ValueError(f"KVSmoothConfig.eps must be in [0, 1), got {self.eps!r}")
        if isinstance(self.queue, bool) or not isinstance(self.queue, int) or not 1 <= self.queue <= MAX_QUEUE:
            raise ValueError(f"KVSmoothConfig.queue must be an integer in [1, {MAX_QUEUE}], got {self.queue!r}")
        for name in ("layer_start", "layer_end"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"KVSmoothConfig.{name} must be None or an integer >= 0, got {value!r}")
        if self.layer_start is not None and self.layer_end is not None and self.layer_end <= self.layer_start:
            raise ValueError(
                f"KVSmoothConfig layer range [{self.layer_start}, {self.layer_end}) is empty: "
                "layer_end must be greater than layer_start"
            )
        if self.mode not in MODES:
            raise ValueError(f"KVSmoothConfig.mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.impl not in IMPLS:
            raise ValueError(f"KVSmoothConfig.impl must be one of {', '.join(IMPLS)}, got {self.impl!r}")

    @classmethod
    def coerce(cls, value: "KVSmoothValue") -> Optional["KVSmoothConfig"]:
        """None, 0 or False: off; a number: λref with the other defaults; a mapping: fields."""
        if value is None or value is False:
            return None
        if isinstance(value, KVSmoothConfig):
            return value
        if value is True:
            return cls()
        if isinstance(value, (int, float)):
            return None if value == 0 else cls(lambda_ref=float(value))
        if isinstance(value, Mapping):
            unknown = set(value) - set(cls.__dataclass_fields__)
            if unknown:
                raise ValueError(f"unknown KVSmooth field(s) {', '.join(sorted(unknown))}; "
                                 f"allowed: {', '.join(cls.__dataclass_fields__)}")
            return cls(**value)
        raise TypeError(f"kvsmooth must be None, a number in [0, 1], a mapping or a KVSmoothConfig, "
                        f"got {type(value).__name__}")

    def to_c(self) -> _capi.llama_kvsmooth_params:
        params = _capi.llama_kvsmooth_default_params()
        params.lambda_ref = self.lambda_ref
        params.window = self.window
        params.queue = self.queue
        params.layer_start = -1 if self.layer_start is None else self.layer_start
        params.layer_end = -1 if self.layer_end is None else self.layer_end
        params.eps = self.eps
        params.mode = MODES[self.mode]
        params.trace = self.trace
        params.impl = IMPLS[self.impl]
        return params

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


DEFAULTS = KVSmoothConfig()

KVSmoothValue = Union[None, bool, int, float, Mapping[str, Any], KVSmoothConfig]
