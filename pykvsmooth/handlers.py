"""Which llama-cpp-python chat handler reads a model's images and renders its prompt.

``--chat-format auto`` (the default of kvsmooth-caption) looks at the GGUF files before
anything is loaded:

- a LLaVA-1.5-style projector (``clip.projector_type`` ``mlp``, the LLaVA-1.5/1.6 MLP) gets
  ``Llava15ChatHandler``, the prompt format KVSmooth's LLaVA numbers were measured with;
- any other model with a chat template in its GGUF (``tokenizer.chat_template``) gets
  llama-cpp-python 0.3.36's generic ``MTMDChatHandler`` ("mtmd"), which renders the model's
  own template and lets libmtmd place the image, as llama.cpp's tools do;
- anything else is refused with the list of formats to name.

The named formats are llama_cpp.server's names for its handlers, plus ``mtmd``.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, BinaryIO, Dict, Iterable, List, Optional

AUTO = "auto"
GENERIC = "mtmd"
# --chat-format -> llama_cpp.llama_chat_format class, under llama_cpp.server's names of its
# multimodal handlers (llama_cpp/server/model.py); the captioner, the eval and the server share it
CHAT_HANDLERS: Dict[str, str] = {
    "llava-1-5": "Llava15ChatHandler",
    "obsidian": "ObsidianChatHandler",
    "llava-1-6": "Llava16ChatHandler",
    GENERIC: "MTMDChatHandler",
    "gemma4": "Gemma4ChatHandler",
    "moondream": "MoondreamChatHandler",
    "nanollava": "NanoLlavaChatHandler",
    "llama-3-vision-alpha": "Llama3VisionAlphaChatHandler",
    "minicpm-v-2.6": "MiniCPMv26ChatHandler",
    "qwen2.5-vl": "Qwen25VLChatHandler",
}
CHAT_FORMATS = (AUTO, *sorted(CHAT_HANDLERS))
LLAVA_PROJECTORS = ("mlp",)

# --- GGUF metadata (only the key/value header is read) -------------------------------------

_GGUF_MAGIC = b"GGUF"
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def gguf_metadata(path: "str | Path", keys: Iterable[str]) -> Dict[str, Any]:
    """The values of ``keys`` (scalars and strings; arrays are skipped) in a GGUF file's
    header. Missing keys are absent. ValueError for a file that is not GGUF v2/v3."""
    wanted = set(keys)
    found: Dict[str, Any] = {}
    try:
        with open(path, "rb") as f:
            if f.read(4) != _GGUF_MAGIC:
                raise ValueError(f"{path}: not a GGUF file")
            version, _n_tensors, n_kv = struct.unpack("<IQQ", _read(f, 20, path))
            if version < 2:
                raise ValueError(f"{path}: GGUF version {version} is too old (convert it again with llama.cpp)")
            for _ in range(n_kv):
                key = _string(f, path)
                (kind,) = struct.unpack("<I", _read(f, 4, path))
                if key in wanted and kind != _ARRAY:
                    found[key] = _value(f, kind, path)
                    if len(found) == len(wanted):
                        break
                else:
                    _skip(f, kind, path)
    except OSError as e:
        raise ValueError(f"{path}: cannot read: {e}") from None
    return found


def _read(f: BinaryIO, n: int, path: "str | Path") -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise ValueError(f"{path}: truncated GGUF header")
    return data


def _string(f: BinaryIO, path: "str | Path") -> str:
    (n,) = struct.unpack("<Q", _read(f, 8, path))
    return _read(f, n, path).decode("utf-8", "replace")


def _value(f: BinaryIO, kind: int, path: "str | Path") -> Any:
    if kind == _STRING:
        return _string(f, path)
    fmt = _SCALARS.get(kind)
    if fmt is None:
        raise ValueError(f"{path}: unknown GGUF value type {kind}")
    return struct.unpack(fmt, _read(f, struct.calcsize(fmt), path))[0]


def _skip(f: BinaryIO, kind: int, path: "str | Path") -> None:
    if kind == _ARRAY:
        item, n = struct.unpack("<IQ", _read(f, 12, path))
        if item in _SCALARS:
            f.seek(n * struct.calcsize(_SCALARS[item]), 1)
        else:
            for _ in range(n):
                _skip(f, item, path)
    elif kind == _STRING:
        (n,) = struct.unpack("<Q", _read(f, 8, path))
        f.seek(n, 1)
    else:
        _value(f, kind, path)


# --- choosing and building a handler ---------------------------------------------------------


def choose_chat_format(model: "str | Path", mmproj: "str | Path") -> str:
    """The chat format ``auto`` stands for with these files (see the module's docstring)."""
    projector = gguf_metadata(mmproj, ("clip.projector_type",)).get("clip.projector_type")
    if projector in LLAVA_PROJECTORS:
        return "llava-1-5"
    if gguf_metadata(model, ("tokenizer.chat_template",)).get("tokenizer.chat_template"):
        return GENERIC
    raise ValueError(f"{model} has no chat template and {mmproj} is not a LLaVA projector "
                     f"(clip.projector_type {projector!r}): name the prompt format with --chat-format "
                     f"({', '.join(sorted(CHAT_HANDLERS))})")


def chat_handler_class(chat_format: str) -> type:
    """The llama_cpp chat handler class of a named format (not ``auto``)."""
    from llama_cpp import llama_chat_format

    if chat_format == GENERIC:
        return _generic_handler_class()
    try:
        cls: type = getattr(llama_chat_format, CHAT_HANDLERS[chat_format])
    except KeyError:
        raise ValueError(f"unknown chat format {chat_format!r}; one of {', '.join(CHAT_FORMATS)}") from None
    return cls


def make_chat_handler(chat_format: str, mmproj: "str | Path", verbose: bool = False) -> Any:
    """A llama_cpp chat handler for a named format (not ``auto``)."""
    return chat_handler_class(chat_format)(clip_model_path=str(mmproj), verbose=verbose)


_GENERIC_CLASS: Optional[type] = None


def _generic_handler_class() -> type:
    """``MTMDChatHandler`` that hands the template a message with images as one string, as
    llama.cpp does (common/chat.cpp, ``to_json_oaicompat``: the parts joined by newlines,
    none next to a media marker). llama-cpp-python 0.3.36 passes the list of parts, which
    templates that expect text (LLaVA's, Vicuna's) print as a Python list."""
    global _GENERIC_CLASS
    if _GENERIC_CLASS is None:
        from llama_cpp.llama_chat_format import MTMDChatHandler

        class KVSmoothMTMDChatHandler(MTMDChatHandler):
            def _get_template_messages(self, messages: List[Any], media_marker: str) -> List[Any]:
                return [_join_parts(dict(m), media_marker) for m in messages]

        _GENERIC_CLASS = KVSmoothMTMDChatHandler
    return _GENERIC_CLASS


def _join_parts(message: Dict[str, Any], marker: str) -> Dict[str, Any]:
    content = message.get("content")
    if not isinstance(content, list) or not any(isinstance(p, dict) and p.get("type") == "image_url"
                                                for p in content):
        return message
    text = ""
    last_was_marker = False
    for part in content:
        if not isinstance(part, dict):
            continue
        if part.get("type") == "image_url":
            text += marker
            last_was_marker = True
        elif part.get("type") == "text":
            if text and not last_was_marker:
                text += "\n"
            text += str(part.get("text", ""))
            last_was_marker = False
    message["content"] = text
    return message
