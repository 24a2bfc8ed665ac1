"""``python -m pykvsmooth.server``: llama-cpp-python's OpenAI-compatible server with KVSmooth.

    python -m pykvsmooth.server --model llava-v1.5-7b.Q4_K_M.gguf \\
        --clip_model_path mmproj-model-f16.gguf --chat_format llava-1-5 --kvsmooth 0.9

A plug-in of ``llama_cpp.server``: its routes, request models, locks and settings, with
this module's ``LlamaProxy`` (models are ``pykvsmooth.Llama``; chat handlers read images
through a ``MediaPolicy``) and one ASGI middleware in front. Every option of ``python -m
llama_cpp.server`` is accepted (``--api_key`` also as ``--api-key``, and so on), plus the
KVSmooth options of the other tools (``--kvsmooth``, ``--kvsmooth-window``,
``--kvsmooth-queue``, ``--kvsmooth-layers``, ``--kvsmooth-mode``; default off) and the
request limits (``--allowed-local-media``, ``--allowed-media-hosts``, ``--max-image-bytes``,
``--max-image-pixels``, ``--max-images``, ``--max-request-bytes``, ``--max-tokens-limit``;
see pykvsmooth.media). It listens on 127.0.0.1 unless ``--host`` says otherwise.

Requests to ``/v1/chat/completions`` and ``/v1/completions`` may carry a ``kvsmooth``
field for that request only:

- ``false`` or ``0``: off;
- a number in (0, 1]: λref, the other fields as the server has them;
- ``true``: the server's setting, or the defaults when the server's is off;
- an object of KVSmoothConfig fields (``lambda_ref``, ``window``, ``queue``,
  ``layer_start``, ``layer_end``, ``mode``, ``eps``): those fields over the server's setting;
- ``null`` or absent: the server's setting.

Each request's setting is applied when it takes the model (under llama_cpp.server's model
lock), whatever the requests before it did, streamed or interrupted. A bad value, image or
limit is answered with 400 (413 for a body over the limit) and an OpenAI-style error that
names the field; in a stream that has started, the error is the stream's last event.
Needs the ``server`` extra (uvicorn, fastapi, pydantic-settings, sse-starlette,
starlette-context).
"""

from __future__ import annotations

import argparse
import contextvars
import dataclasses
import hmac
import ipaddress
import json
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Dict, Iterator, List, MutableMapping, Optional, Tuple, Union

import pykvsmooth  # noqa: F401  (before llama_cpp: the patched libraries)
import llama_cpp


try:
    import anyio
    import uvicorn
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.middleware import Middleware
    from fastapi.middleware.cors import CORSMiddleware
    from fastapi.responses import JSONResponse
    from pydantic import Field
    from starlette_context.middleware import RawContextMiddleware
    from starlette_context.plugins.request_id import RequestIdPlugin

    import llama_cpp.llama_chat_format as llama_chat_format
    import llama_cpp.llama_speculative as llama_speculative
    import llama_cpp.llama_tokenizer as llama_tokenizer
    import llama_cpp.server.app as _app
    from llama_cpp.llama_cache import BaseLlamaCache, LlamaDiskCache, LlamaRAMCache
    from llama_cpp.server.cli import add_args_from_model, parse_model_from_args
    from llama_cpp.server.model import LlamaProxy
    from llama_cpp.server.settings import ModelSettings, ServerSettings
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(f"pykvsmooth.server needs the server extra: pip install 'pykvsmooth[server]' ({e})") from e

from . import handlers, hub
from .caption import add_kvsmooth_arguments, kvsmooth_from_args
from .config import KVSmoothConfig
from .llama import KVSmoothError, Llama
from .media import (DEFAULT_CONNECT_TIMEOUT_S, DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS,
                    DEFAULT_MAX_IMAGES, DEFAULT_READ_TIMEOUT_S, FLAG_CONNECT_TIMEOUT, FLAG_LOCAL_MEDIA,
                    FLAG_MAX_IMAGE_BYTES, FLAG_MAX_IMAGE_PIXELS, FLAG_MAX_IMAGES, FLAG_MEDIA_HOSTS,
                    FLAG_READ_TIMEOUT, MediaError, MediaPolicy)

CHAT_PATH = "/v1/chat/completions"
# the paths whose requests may carry "kvsmooth" and a max_tokens
REQUEST_PATHS = (CHAT_PATH, "/v1/completions", "/v1/engines/copilot-codex/completions")
REQUEST_FIELDS = ("lambda_ref", "window", "queue", "layer_start", "layer_end", "mode", "eps")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_MAX_REQUEST_BYTES = 50 * 1024 * 1024  # as OpenAI's API: a few images as data: URIs
DEFAULT_MAX_TOKENS_LIMIT = 4096
FLAG_MAX_REQUEST_BYTES = "--max-request-bytes"
FLAG_MAX_TOKENS_LIMIT = "--max-tokens-limit"
# images read and decoded at once, over all requests (each up to --max-image-pixels of RGB)
MEDIA_WORKERS = 4


@dataclass(frozen=True)
class RequestLimits:
    """Bounds on a request's body and on what it may ask the model for."""

    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_tokens: int = DEFAULT_MAX_TOKENS_LIMIT

    def __post_init__(self) -> None:
        for name, flag in (("max_request_bytes", FLAG_MAX_REQUEST_BYTES), ("max_tokens", FLAG_MAX_TOKENS_LIMIT)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{flag} must be an integer >= 1, got {value!r}")


# --- the per-request setting -----------------------------------------------------------------

_UNSET: Any = object()
# the current request's KVSmooth setting (a KVSmoothConfig or None), _UNSET when it has none
_request_kvsmooth: contextvars.ContextVar[Any] = contextvars.ContextVar("kvsmooth", default=_UNSET)


def resolve_request_value(value: Any, server: Optional[KVSmoothConfig]) -> Any:
    """The configuration a request's ``kvsmooth`` field asks for (None: off; _UNSET: the
    server's). ValueError/TypeError name the problem."""
    base = server or KVSmoothConfig()
    if value is None:
        return _UNSET
    if value is False:
        return None
    if value is True:
        return base
    if isinstance(value, (int, float)):
        if value == 0:
            return None
        return dataclasses.replace(base, lambda_ref=value)
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(REQUEST_FIELDS))
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(REQUEST_FIELDS)}")
        return dataclasses.replace(base, **value)
    raise TypeError(f"must be a number in [0, 1], a boolean, null or an object, got {json.dumps(value)}")


# --- errors ------------------------------------------------------------------------------------


def error_body(message: str, *, param: Optional[str] = None, code: Optional[str] = None,
               kind: str = "invalid_request_error") -> Dict[str, Any]:
    """An OpenAI-style error object (the ``openai`` client reads ``error.message``)."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class RequestRefused(HTTPException):
    """A request this server refuses, with the OpenAI-style body it is answered with.
    An HTTPException, so that llama_cpp.server's route wrapper passes it on instead of
    answering 500."""

    def __init__(self, message: str, *, status: int = 400, param: Optional[str] = None,
                 code: Optional[str] = None) -> None:
        super().__init__(status_code=status, detail=message)
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> Dict[str, Any]:
        return error_body(self.message, param=self.param, code=self.code)


def _refusal(error: Exception) -> Optional[RequestRefused]:
    """The client's mistake in an error from inside llama-cpp-python, as a refusal."""
    if isinstance(error, MediaError):
        return RequestRefused(str(error), param="messages")
    if isinstance(error, ValueError) and str(error).startswith("Prompt exceeds n_ctx"):  # the chat handlers'
        return RequestRefused(f"{error}: the messages are longer than the model's context (--n_ctx)",
                              param="messages", code="context_length_exceeded")
    return None


def _stream_error(error: BaseException) -> Dict[str, Any]:
    if isinstance(error, Exception) and not isinstance(error, RequestRefused):
        if isinstance(error, ValueError) and "exceed context window" in str(error):
            # llama_cpp.server answers this one with 400 outside a stream
            error = RequestRefused(str(error), param="messages", code="context_length_exceeded")
        else:
            error = _refusal(error) or error
    if isinstance(error, RequestRefused):
        return error.body()
    print(f"Exception: {error}", file=sys.stderr)  # as llama_cpp.server does for its 500s
    traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
    return error_body(str(error), kind="internal_server_error")


# --- the model: pykvsmooth.Llama, one request at a time ------------------------------------------


class ServerLlama(Llama):
    """The proxy's model. ``begin_request`` (the proxy calls it whenever a request takes
    the model) applies that request's setting; nothing is undone afterwards, so a stream
    that ends early leaves nothing behind. Errors of a top-level call become
    RequestRefused, or a stream's last event once the response has started."""

    def __init__(self, *args: Any, kvsmooth: Any = None, **kwargs: Any) -> None:
        self.server_kvsmooth: Optional[KVSmoothConfig] = KVSmoothConfig.coerce(kvsmooth)
        self._request_error: Optional[RequestRefused] = None
        self._open_stream: Optional[Iterator[Any]] = None
        self._depth = 0  # > 0 inside a top-level create_chat_completion/create_completion
        super().__init__(*args, kvsmooth=self.server_kvsmooth, **kwargs)

    @property
    def in_call(self) -> bool:
        return self._depth > 0

    def begin_request(self, setting: Any) -> None:
        """Start a request (under the model lock): close what an interrupted stream left
        open, then apply ``setting`` (_UNSET: the server's)."""
        stream, self._open_stream = self._open_stream, None
        if stream is not None:
            close = getattr(stream, "close", None)
            if close is not None:
                close()  # here, not in the garbage collector during another request
        wanted = self.server_kvsmooth if setting is _UNSET else setting
        self._request_error = None
        if wanted != self.kvsmooth:
            try:
                self.kvsmooth = wanted
            except KVSmoothError as e:
                self._request_error = RequestRefused(f"kvsmooth: {e}", param="kvsmooth")

    def create_chat_completion(self, *args: Any, **kwargs: Any) -> Any:
        return self._top_level(super().create_chat_completion, args, kwargs)

    def create_completion(self, *args: Any, **kwargs: Any) -> Any:
        if self.in_call:  # the chat handler's own completion
            return super().create_completion(*args, **kwargs)
        return self._top_level(super().create_completion, args, kwargs)

    def _top_level(self, call: Callable[..., Any], args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        stream = bool(kwargs.get("stream", False))
        error: Optional[BaseException] = self._request_error
        result: Any = None
        if error is None:
            self._depth += 1
            try:
                result = call(*args, **kwargs)
            except Exception as e:
                refusal = _refusal(e)
                if not stream:
                    if refusal is None:
                        raise
                    raise refusal from None
                error = refusal or e
            finally:
                self._depth -= 1
        elif not stream:
            raise error
        if not stream:
            return result
        chunks = self._error_stream(error) if error is not None else self._guarded(result)
        self._open_stream = chunks
        return chunks

    @staticmethod
    def _error_stream(error: BaseException) -> Iterator[Any]:
        yield _stream_error(error)

    @staticmethod
    def _guarded(chunks: Iterator[Any]) -> Iterator[Any]:
        try:
            yield from chunks
        except Exception as e:  # the response has started: the error is the last event
            yield _stream_error(e)


class _ChatHandler:
    """The model's chat handler: the given one, or the chat format's, as llama_cpp.Llama
    picks it (with chat_template_kwargs, as llama_cpp.server adds them), reached through
    the model's own create_chat_completion also where llama_cpp.server streams through
    ``llama_cpp.Llama.create_chat_completion(llama, …)``."""

    def __init__(self, inner: Optional[Callable[..., Any]], template_kwargs: Optional[Dict[str, Any]] = None) -> None:
        self.inner = inner
        self.template_kwargs = dict(template_kwargs or {})

    def __call__(self, *, llama: llama_cpp.Llama, **kwargs: Any) -> Any:
        if isinstance(llama, ServerLlama) and not llama.in_call:
            return llama.create_chat_completion(**kwargs)
        handler = self.inner
        if handler is None:
            fmt: Any = llama.chat_format
            handler = llama._chat_handlers.get(fmt) or llama_chat_format.get_chat_completion_handler(fmt)
        return handler(llama=llama, **{**self.template_kwargs, **kwargs})


_POLICED: Dict[type, type] = {}


def policed_handler_class(base: type) -> type:
    """``base`` (a llama_cpp chat handler class) whose ``load_image`` applies the
    instance's ``media_policy`` instead of reading any URL, and whose image decoding
    failures are MediaError."""
    cls = _POLICED.get(base)
    parent: Any = base
    if cls is None:
        def load_image(self: Any, image_url: str) -> bytes:
            policy: MediaPolicy = self.media_policy
            return policy.load(image_url).data

        def create_bitmap(self: Any, image_bytes: bytes) -> Any:
            try:
                return parent._create_bitmap_from_bytes(self, image_bytes)
            except ValueError as e:
                raise MediaError(f"libmtmd cannot use the image ({e})") from None

        members: Dict[str, Any] = {"media_policy": MediaPolicy(), "load_image": load_image}
        if hasattr(base, "_create_bitmap_from_bytes"):
            members["_create_bitmap_from_bytes"] = create_bitmap
        cls = _POLICED[base] = type(f"Policed{base.__name__}", (base,), members)
    return cls


class KVSmoothLlamaProxy(LlamaProxy):
    """llama_cpp.server's model proxy with ServerLlama models. The routes call it once per
    request, holding the model lock: that is where a request's setting is applied."""

    def __init__(self, models: List[ModelSettings], kvsmooth: Optional[KVSmoothConfig] = None,
                 media: Optional[MediaPolicy] = None) -> None:
        self.kvsmooth = kvsmooth
        self.media = media or MediaPolicy()
        super().__init__(models)

    def __call__(self, model: Optional[str] = None) -> llama_cpp.Llama:
        llama = super().__call__(model)
        if isinstance(llama, ServerLlama):
            llama.begin_request(_request_kvsmooth.get())
        return llama

    def load_llama_from_model_settings(self, settings: ModelSettings) -> llama_cpp.Llama:  # type: ignore[override]
        """llama_cpp.server.model.LlamaProxy.load_llama_from_model_settings (0.3.36) with a
        ServerLlama and policed chat handlers."""
        chat_handler = self._chat_handler(settings)
        kwargs: Dict[str, Any] = {}
        if settings.hf_model_repo_id is not None:
            create: Callable[..., ServerLlama] = ServerLlama.from_pretrained  # type: ignore[assignment]
            kwargs.update(repo_id=settings.hf_model_repo_id, filename=settings.model)
        else:
            create = ServerLlama
            kwargs["model_path"] = settings.model
        tokenizer = None
        if settings.hf_pretrained_model_name_or_path is not None:
            tokenizer = llama_tokenizer.LlamaHFTokenizer.from_pretrained(settings.hf_pretrained_model_name_or_path)
        draft_model = None
        if settings.draft_model is not None:
            draft_model = llama_speculative.LlamaPromptLookupDecoding(
                num_pred_tokens=settings.draft_model_num_pred_tokens)
        model = create(
            **kwargs,
            kvsmooth=self.kvsmooth,
            n_gpu_layers=settings.n_gpu_layers, split_mode=settings.split_mode, main_gpu=settings.main_gpu,
            tensor_split=settings.tensor_split, vocab_only=settings.vocab_only, use_mmap=settings.use_mmap,
            use_mlock=settings.use_mlock, kv_overrides=_kv_overrides(settings.kv_overrides),
            rpc_servers=settings.rpc_servers,
            seed=settings.seed, n_ctx=settings.n_ctx, n_batch=settings.n_batch, n_ubatch=settings.n_ubatch,
            n_threads=settings.n_threads, n_threads_batch=settings.n_threads_batch,
            rope_scaling_type=settings.rope_scaling_type, rope_freq_base=settings.rope_freq_base,
            rope_freq_scale=settings.rope_freq_scale, yarn_ext_factor=settings.yarn_ext_factor,
            yarn_attn_factor=settings.yarn_attn_factor, yarn_beta_fast=settings.yarn_beta_fast,
            yarn_beta_slow=settings.yarn_beta_slow, yarn_orig_ctx=settings.yarn_orig_ctx,
            mul_mat_q=settings.mul_mat_q, logits_all=settings.logits_all, embedding=settings.embedding,
            offload_kqv=settings.offload_kqv, flash_attn=settings.flash_attn,
            last_n_tokens_size=settings.last_n_tokens_size,
            lora_base=settings.lora_base, lora_path=settings.lora_path, numa=settings.numa,
            chat_format=settings.chat_format, chat_handler=chat_handler, draft_model=draft_model,
            type_k=settings.type_k, type_v=settings.type_v, tokenizer=tokenizer, verbose=settings.verbose,
        )
        model.chat_handler = _ChatHandler(model.chat_handler, settings.chat_template_kwargs)
        if settings.cache:
            if settings.cache_type == "disk":
                cache: BaseLlamaCache = LlamaDiskCache(capacity_bytes=settings.cache_size)
            else:
                cache = LlamaRAMCache(capacity_bytes=settings.cache_size)
            model.set_cache(cache)
        return model

    def _chat_handler(self, settings: ModelSettings) -> Any:
        fmt = settings.chat_format
        if settings.clip_model_path is not None and fmt in (None, handlers.AUTO):
            # no format named: the one the GGUFs call for, as kvsmooth-caption picks it
            fmt = handlers.choose_chat_format(settings.model, settings.clip_model_path)
        if fmt in handlers.CHAT_HANDLERS:
            if settings.clip_model_path is None:
                raise ValueError(f"--chat_format {fmt} needs --clip_model_path (the mmproj GGUF)")
            cls: Any = policed_handler_class(handlers.chat_handler_class(fmt))
            if settings.hf_model_repo_id is not None:
                handler = cls.from_pretrained(repo_id=settings.hf_model_repo_id, filename=settings.clip_model_path,
                                              verbose=settings.verbose)
            else:
                handler = cls(clip_model_path=settings.clip_model_path, verbose=settings.verbose)
            handler.media_policy = self.media
            return handler
        if fmt == "hf-autotokenizer":
            if settings.hf_pretrained_model_name_or_path is None:
                raise ValueError("--chat_format hf-autotokenizer needs --hf_pretrained_model_name_or_path")
            return llama_chat_format.hf_autotokenizer_to_chat_completion_handler(
                settings.hf_pretrained_model_name_or_path)
        if fmt == "hf-tokenizer-config":
            if settings.hf_tokenizer_config_path is None:
                raise ValueError("--chat_format hf-tokenizer-config needs --hf_tokenizer_config_path")
            with open(settings.hf_tokenizer_config_path) as f:
                return llama_chat_format.hf_tokenizer_config_to_chat_completion_handler(json.load(f))
        return None  # a text chat format: llama_cpp.Llama picks its handler


def _kv_overrides(items: Optional[List[str]]) -> Optional[Dict[str, Union[bool, int, float, str]]]:
    """--kv_overrides KEY=TYPE:VALUE … as llama_cpp.server reads them."""
    if items is None:
        return None
    out: Dict[str, Union[bool, int, float, str]] = {}
    for item in items:
        key, _, value = item.partition("=")
        if ":" not in value:
            continue
        kind, _, text = value.partition(":")
        if kind == "bool":
            out[key] = text.lower() in ("true", "1")
        elif kind == "int":
            out[key] = int(text)
        elif kind == "float":
            out[key] = float(text)
        elif kind == "str":
            out[key] = text
        else:
            raise ValueError(f"--kv_overrides {item}: unknown value type {kind!r} (bool, int, float, str)")
    return out


# --- the request middleware ----------------------------------------------------------------------

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Dict[str, Any]]]
Send = Callable[[Dict[str, Any]], Awaitable[None]]


def image_parts(messages: Any) -> List[Dict[str, Any]]:
    """The content parts of ``messages`` whose images llama-cpp-python's chat handlers load
    (their ``get_image_urls``: user messages, parts of type image_url)."""
    parts: List[Dict[str, Any]] = []
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, dict) and message.get("role") == "user" and isinstance(message.get("content"), list):
                parts.extend(p for p in message["content"] if isinstance(p, dict) and p.get("type") == "image_url")
    return parts


class RequestPolicyMiddleware:
    """In front of llama_cpp.server's routes, before any of them runs: the API key (for
    POSTs), the body size, and for completion requests the ``kvsmooth`` field (taken out:
    llama_cpp's request models do not know it), ``max_tokens`` and every image, which is
    read under the media policy and handed on as a checked data: URI."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], *, api_key: Optional[str],
                 kvsmooth: Optional[KVSmoothConfig], media: MediaPolicy, limits: RequestLimits) -> None:
        self.app = app
        self.api_key = api_key
        self.kvsmooth = kvsmooth
        self.media = media
        self.limits = limits
        self._workers: Optional[anyio.CapacityLimiter] = None  # made in the event loop

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        try:
            self._authorize(scope)
            body = await self._read_body(scope, receive)
            if body is None:
                return  # the client left
            setting: Any = _UNSET
            if scope.get("path") in REQUEST_PATHS:
                body, setting = await self._prepare(body, chat=scope.get("path") == CHAT_PATH)
        except RequestRefused as e:
            await _send_json(send, e.status_code, e.body())
            return
        scope = dict(scope)
        scope["headers"] = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        scope["headers"].append((b"content-length", str(len(body)).encode()))
        sent = False

        async def replay() -> Dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        token = _request_kvsmooth.set(setting)
        try:
            await self.app(scope, replay, send)
        finally:
            _request_kvsmooth.reset(token)

    def _authorize(self, scope: Scope) -> None:
        if self.api_key is None:
            return
        headers = dict((k.lower(), v) for k, v in scope["headers"])
        scheme, _, credentials = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(credentials.strip().encode(), self.api_key.encode()):
            raise RequestRefused("Invalid API key: send it as the header 'Authorization: Bearer KEY' "
                                 "(the openai client's api_key)", status=401, code="invalid_api_key")

    async def _read_body(self, scope: Scope, receive: Receive) -> Optional[bytes]:
        limit = self.limits.max_request_bytes
        too_large = RequestRefused(f"the request body is larger than this server's limit of {limit} bytes "
                                   f"({FLAG_MAX_REQUEST_BYTES})", status=413, code="request_too_large")
        for key, value in scope["headers"]:
            if key.lower() == b"content-length" and value.strip().isdigit() and int(value) > limit:
                raise too_large
        chunks: List[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _prepare(self, body: bytes, chat: bool) -> Tuple[bytes, Any]:
        try:
            data = json.loads(body)
        except ValueError:
            return body, _UNSET  # not JSON: the app answers it
        if not isinstance(data, dict):
            return body, _UNSET
        setting: Any = _UNSET
        if "kvsmooth" in data:
            try:
                setting = resolve_request_value(data.pop("kvsmooth"), self.kvsmooth)
            except (ValueError, TypeError) as e:
                raise RequestRefused(f"kvsmooth: {e}", param="kvsmooth") from None
        self._cap_max_tokens(data, chat)
        if chat:
            await self._load_images(data.get("messages"))
        return json.dumps(data).encode(), setting

    def _cap_max_tokens(self, data: Dict[str, Any], chat: bool) -> None:
        cap = self.limits.max_tokens
        if chat and data.get("max_tokens") is None and data.get("max_completion_tokens") is not None:
            data["max_tokens"] = data["max_completion_tokens"]  # the openai client's newer name
        if "max_tokens" not in data and not chat:
            return  # llama_cpp.server's default for completions (16)
        value = data.get("max_tokens")
        if value is None or (isinstance(value, int) and not isinstance(value, bool) and value <= 0):
            data["max_tokens"] = cap  # "as many as fit": at most the cap
        elif isinstance(value, int) and not isinstance(value, bool) and value > cap:
            raise RequestRefused(f"max_tokens is {value}, more than this server's limit of {cap} "
                                 f"({FLAG_MAX_TOKENS_LIMIT})", param="max_tokens")

    async def _load_images(self, messages: Any) -> None:
        parts = image_parts(messages)
        try:
            self.media.check_count(len(parts))
            for part in parts:
                ref = part.get("image_url")
                url = ref.get("url") if isinstance(ref, dict) else ref
                if not isinstance(url, str):
                    raise MediaError("an image_url part needs a URL: {\"type\": \"image_url\", "
                                     "\"image_url\": {\"url\": \"data:image/png;base64,…\"}}")
                if self._workers is None:
                    self._workers = anyio.CapacityLimiter(MEDIA_WORKERS)
                image = await anyio.to_thread.run_sync(self.media.load, url, limiter=self._workers)
                if not url.startswith("data:"):
                    uri = image.data_uri()
                    if isinstance(ref, dict):
                        ref["url"] = uri
                    else:
                        part["image_url"] = uri
        except MediaError as e:
            raise RequestRefused(str(e), param="messages") from None


async def _send_json(send: Send, status: int, payload: Dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _refused_response(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestRefused)
    return JSONResponse(exc.body(), status_code=exc.status_code)


# --- the app -------------------------------------------------------------------------------------


def create_app(server_settings: ServerSettings, model_settings: List[ModelSettings],
               kvsmooth: Optional[KVSmoothConfig] = None, media: Optional[MediaPolicy] = None,
               limits: Optional[RequestLimits] = None) -> FastAPI:
    """llama_cpp.server.app.create_app (0.3.36) with a KVSmoothLlamaProxy and the request
    middleware. llama_cpp.server keeps one app per process in its module (settings, proxy,
    locks); this fills the same places: set_server_settings, the proxy that its
    set_llama_proxy would create, set_ping_message_factory. ``media`` and ``limits``
    default to MediaPolicy() and RequestLimits()."""
    media = media or MediaPolicy()
    limits = limits or RequestLimits()
    proxy = KVSmoothLlamaProxy(model_settings, kvsmooth=kvsmooth, media=media)
    _app.set_server_settings(server_settings)
    _app._llama_proxy = proxy  # set_llama_proxy builds a plain LlamaProxy: the one slot it fills
    if server_settings.disable_ping_events:
        _app.set_ping_message_factory(lambda: b"")
    app = FastAPI(middleware=[Middleware(RawContextMiddleware, plugins=(RequestIdPlugin(),))],
                  title="pykvsmooth (llama.cpp Python API with KVSmooth)", version=llama_cpp.__version__,
                  root_path=server_settings.root_path)
    # inside CORS (added last, outermost), so that refusals carry its headers too
    app.add_middleware(RequestPolicyMiddleware, api_key=server_settings.api_key,
                       kvsmooth=kvsmooth, media=media, limits=limits)
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_credentials=True, allow_methods=["*"],
                       allow_headers=["*"])
    app.include_router(_app.router)
    app.add_exception_handler(RequestRefused, _refused_response)
    return app


# --- command line: the one place where arguments become settings ---------------------------------


class KVSmoothServerSettings(ServerSettings):
    """llama_cpp.server's ServerSettings, listening on loopback unless told otherwise."""

    host: str = Field(default=DEFAULT_HOST, description="Listen address (loopback; see the README before "
                                                        "listening on a network)")


class _CommandLineSettings(KVSmoothServerSettings, ModelSettings):
    pass


@dataclass(frozen=True)
class ServerConfig:
    """Everything the command line says."""

    server: KVSmoothServerSettings
    models: List[ModelSettings]
    kvsmooth: Optional[KVSmoothConfig]
    media: MediaPolicy
    limits: RequestLimits


class _BothSpellings:
    """Lets llama_cpp.server's argument builder give each ``--snake_case`` option its
    ``--kebab-case`` spelling too (``--api_key`` and ``--api-key``, as llama.cpp spells it)."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser

    def add_argument(self, *names: str, **kwargs: Any) -> argparse.Action:
        more = [n.replace("_", "-") for n in names if n.startswith("--") and "_" in n]
        return self.parser.add_argument(*names, *more, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pykvsmooth.server",
        description="llama-cpp-python's OpenAI-compatible server with KVSmooth (arXiv 2602.04268)")
    add_args_from_model(_BothSpellings(parser), _CommandLineSettings)  # type: ignore[arg-type]
    add_kvsmooth_arguments(parser, default=None)
    group = parser.add_argument_group("what a request may make the server do")
    group.add_argument(FLAG_LOCAL_MEDIA, metavar="DIR", type=Path, default=None,
                       help="read file: image URLs inside DIR (default: no local files)")
    group.add_argument(FLAG_MEDIA_HOSTS, metavar="HOST[:PORT],...", default="",
                       help="fetch http(s): image URLs from these hosts only, redirects included "
                            "(default: fetch nothing)")
    group.add_argument(FLAG_CONNECT_TIMEOUT, metavar="S", type=float, default=DEFAULT_CONNECT_TIMEOUT_S,
                       help=f"seconds to connect to a media host (default: {DEFAULT_CONNECT_TIMEOUT_S:g})")
    group.add_argument(FLAG_READ_TIMEOUT, metavar="S", type=float, default=DEFAULT_READ_TIMEOUT_S,
                       help=f"seconds for a media host's whole answer (default: {DEFAULT_READ_TIMEOUT_S:g})")
    group.add_argument(FLAG_MAX_IMAGE_BYTES, metavar="N", type=int, default=DEFAULT_MAX_IMAGE_BYTES,
                       help=f"bytes per image (default: {DEFAULT_MAX_IMAGE_BYTES})")
    group.add_argument(FLAG_MAX_IMAGE_PIXELS, metavar="N", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                       help=f"pixels per image, read from its header (default: {DEFAULT_MAX_IMAGE_PIXELS})")
    group.add_argument(FLAG_MAX_IMAGES, metavar="N", type=int, default=DEFAULT_MAX_IMAGES,
                       help=f"images per request (default: {DEFAULT_MAX_IMAGES})")
    group.add_argument(FLAG_MAX_REQUEST_BYTES, metavar="N", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                       help=f"bytes per request body (default: {DEFAULT_MAX_REQUEST_BYTES})")
    group.add_argument(FLAG_MAX_TOKENS_LIMIT, metavar="N", type=int, default=DEFAULT_MAX_TOKENS_LIMIT,
                       help="most tokens a request may generate; requests without max_tokens get this "
                            f"(default: {DEFAULT_MAX_TOKENS_LIMIT})")
    return parser


def parse_args(argv: Optional[List[str]] = None) -> ServerConfig:
    """The server's configuration from the command line (and llama_cpp.server's environment
    variables, e.g. HOST, PORT, API_KEY); exits with a usage error naming a bad option."""
    parser = build_parser()
    hub.add_hub_arguments(parser)  # -hf USER/MODEL[:QUANT], as llama.cpp: sets --model and --clip_model_path
    args = parser.parse_args(argv)
    hub.resolve_args(args, model_dest="model", mmproj_dest="clip_model_path", parser=parser)
    try:
        kvsmooth = kvsmooth_from_args(args)
        server = parse_model_from_args(KVSmoothServerSettings, args)
        models = [parse_model_from_args(ModelSettings, args)]
        hosts = tuple(h.strip() for h in args.allowed_media_hosts.split(",") if h.strip())
        media = MediaPolicy(local_dir=args.allowed_local_media, hosts=hosts,
                            max_image_bytes=args.max_image_bytes, max_image_pixels=args.max_image_pixels,
                            max_images=args.max_images, connect_timeout=args.media_connect_timeout,
                            read_timeout=args.media_read_timeout)
        limits = RequestLimits(max_request_bytes=args.max_request_bytes, max_tokens=args.max_tokens_limit)
    except ValueError as e:
        parser.error(str(e))
    return ServerConfig(server, models, kvsmooth, media, limits)  # type: ignore[arg-type]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: Optional[List[str]] = None) -> int:
    config = parse_args(argv)
    server = config.server
    if not _is_loopback(server.host) and server.api_key is None:
        print(f"pykvsmooth.server: warning: listening on {server.host} without --api-key: anyone who "
              "can reach this port can use the model", file=sys.stderr)
    try:
        app = create_app(server, config.models, config.kvsmooth, config.media, config.limits)
    except (KVSmoothError, ValueError) as e:
        print(f"pykvsmooth.server: error: {e}", file=sys.stderr)
        return 1
    uvicorn.run(app, host=server.host, port=server.port, ssl_keyfile=server.ssl_keyfile,
                ssl_certfile=server.ssl_certfile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
