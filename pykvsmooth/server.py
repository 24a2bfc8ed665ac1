"""``python -m pykvsmooth.server``: llama-cpp-python's OpenAI-compatible server with KVSmooth.

    python -m pykvsmooth.server --model llava-v1.5-7b.Q4_K_M.gguf \\
        --clip_model_path mmproj-model-f16.gguf --chat_format llava-1-5 --kvsmooth 0.9

Every option of ``python -m llama_cpp.server`` is accepted, plus the KVSmooth options of
the other tools (``--kvsmooth``, ``--kvsmooth-window``, ``--kvsmooth-queue``,
``--kvsmooth-layers``, ``--kvsmooth-mode``); the default is off. Requests to
``/v1/chat/completions`` and ``/v1/completions`` may carry a ``kvsmooth`` field for that
request only; the server's setting is restored afterwards:

- ``false`` or ``0``: off;
- a number in (0, 1]: λref, the other fields as the server has them;
- ``true``: the server's setting, or the defaults when the server's is off;
- an object of KVSmoothConfig fields (``lambda_ref``, ``window``, ``queue``,
  ``layer_start``, ``layer_end``, ``mode``, ``eps``): those fields over the server's setting;
- ``null`` or absent: the server's setting.

A bad value is answered with 400 and a message naming the field. Needs the ``server``
extra (uvicorn, fastapi, pydantic-settings, sse-starlette, starlette-context).
"""

from __future__ import annotations

import argparse
import contextvars
import dataclasses
import json
import os
import sys
from typing import Any, Awaitable, Callable, Iterator, List, MutableMapping, Optional, Tuple

import pykvsmooth  # noqa: F401  (before llama_cpp: the patched libraries)
import llama_cpp

try:
    import uvicorn
    from fastapi import HTTPException
    import llama_cpp.server.app as _app
    import llama_cpp.server.model as _model
    from llama_cpp.server.cli import add_args_from_model, parse_model_from_args
    from llama_cpp.server.settings import ModelSettings, ServerSettings, Settings
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(f"pykvsmooth.server needs the server extra: pip install 'pykvsmooth[server]' ({e})") from e

from .caption import add_kvsmooth_arguments, kvsmooth_from_args
from .config import KVSmoothConfig
from .llama import KVSmoothError, Llama

# the paths whose requests may carry "kvsmooth"
REQUEST_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/engines/copilot-codex/completions")
REQUEST_FIELDS = ("lambda_ref", "window", "queue", "layer_start", "layer_end", "mode", "eps")

_UNSET = object()
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


class ServerLlama(Llama):
    """The proxy's model: applies the current request's setting for the length of the call
    (for a stream, until it ends), then puts the server's back."""

    server_kvsmooth: Optional[KVSmoothConfig] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._in_request = False
        super().__init__(*args, kvsmooth=self.server_kvsmooth, **kwargs)

    def create_chat_completion(self, *args: Any, **kwargs: Any) -> Any:
        return self._with_request_setting(super().create_chat_completion, args, kwargs)

    def create_completion(self, *args: Any, **kwargs: Any) -> Any:
        return self._with_request_setting(super().create_completion, args, kwargs)

    def _with_request_setting(self, call: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        wanted = _request_kvsmooth.get()
        if wanted is _UNSET or self._in_request:  # no field, or the chat handler's own completion
            return call(*args, **kwargs)
        try:
            self.kvsmooth = wanted
        except KVSmoothError as e:
            raise HTTPException(status_code=400, detail=f"kvsmooth: {e}") from None
        self._in_request = True
        try:
            result = call(*args, **kwargs)
        except BaseException:
            self._restore()
            raise
        if isinstance(result, Iterator):  # a stream: generation happens while it is read
            return self._restore_after(result)
        self._restore()
        return result

    def _restore_after(self, chunks: Iterator[Any]) -> Iterator[Any]:
        try:
            yield from chunks
        finally:
            self._restore()

    def _restore(self) -> None:
        self._in_request = False
        self.kvsmooth = self.server_kvsmooth


class _LlamaCppNamespace:
    """Stands for the llama_cpp module inside llama_cpp.server's model.py and app.py:
    model.py builds ``llama_cpp.Llama(...)``, which must be a ServerLlama; app.py streams
    through ``llama_cpp.Llama.create_chat_completion(llama, ...)``, which must reach the
    object's own method (the base class's would bypass KVSmooth's token selection)."""

    class Llama:
        from_pretrained = ServerLlama.from_pretrained

        def __new__(cls, *args: Any, **kwargs: Any) -> ServerLlama:  # type: ignore[misc]
            return ServerLlama(*args, **kwargs)

        @staticmethod
        def create_chat_completion(llama: llama_cpp.Llama, *args: Any, **kwargs: Any) -> Any:
            return llama.create_chat_completion(*args, **kwargs)

        @staticmethod
        def create_completion(llama: llama_cpp.Llama, *args: Any, **kwargs: Any) -> Any:
            return llama.create_completion(*args, **kwargs)

        @staticmethod
        def __call__(llama: llama_cpp.Llama, *args: Any, **kwargs: Any) -> Any:
            return llama(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(llama_cpp, name)


def _error(message: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": "invalid_request_error",
                                 "param": "kvsmooth", "code": None}}).encode()


class KVSmoothRequestMiddleware:
    """Takes ``kvsmooth`` out of completion requests (llama_cpp's request models do not know
    it), validates it, and makes it the setting of this request."""

    def __init__(self, app: Callable[..., Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: MutableMapping[str, Any], receive: Callable[[], Awaitable[dict]],
                       send: Callable[[dict], Awaitable[None]]) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in REQUEST_PATHS:
            await self.app(scope, receive, send)
            return
        chunks: List[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, receive, send)  # the client left: let the app see it
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        setting: Any = _UNSET
        try:
            data = json.loads(body)
        except ValueError:
            data = None  # not JSON: the app answers it
        if isinstance(data, dict) and "kvsmooth" in data:
            try:
                setting = resolve_request_value(data.pop("kvsmooth"), ServerLlama.server_kvsmooth)
            except (ValueError, TypeError) as e:
                await _send_json(send, 400, _error(f"kvsmooth: {e}"))
                return
            body = json.dumps(data).encode()
            scope = dict(scope)
            scope["headers"] = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
            scope["headers"].append((b"content-length", str(len(body)).encode()))

        sent = False

        async def replay() -> dict:
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


async def _send_json(send: Callable[[dict], Awaitable[None]], status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def create_app(server_settings: ServerSettings, model_settings: List[ModelSettings],
               kvsmooth: Optional[KVSmoothConfig]) -> Any:
    """llama_cpp.server.app.create_app with ServerLlama models and the request middleware."""
    ServerLlama.server_kvsmooth = kvsmooth
    namespace = _LlamaCppNamespace()
    _model.llama_cpp = namespace  # type: ignore[assignment]
    _app.llama_cpp = namespace  # type: ignore[assignment]
    app = _app.create_app(server_settings=server_settings, model_settings=model_settings)
    app.add_middleware(KVSmoothRequestMiddleware)
    return app


def parse_args(argv: Optional[List[str]]) -> Tuple[argparse.Namespace, ServerSettings, List[ModelSettings]]:
    parser = argparse.ArgumentParser(
        prog="python -m pykvsmooth.server",
        description="llama-cpp-python's OpenAI-compatible server with KVSmooth (arXiv 2602.04268)")
    add_args_from_model(parser, Settings)
    add_kvsmooth_arguments(parser, default=None)
    args = parser.parse_args(argv)
    try:
        kvsmooth_from_args(args)
        server_settings = parse_model_from_args(ServerSettings, args)
        model_settings = [parse_model_from_args(ModelSettings, args)]
    except ValueError as e:
        parser.error(str(e))
    return args, server_settings, model_settings


def main(argv: Optional[List[str]] = None) -> int:
    args, server_settings, model_settings = parse_args(argv)
    kvsmooth = kvsmooth_from_args(args)
    try:
        app = create_app(server_settings, model_settings, kvsmooth)
    except (KVSmoothError, ValueError) as e:
        print(f"pykvsmooth.server: error: {e}", file=sys.stderr)
        return 1
    uvicorn.run(app, host=os.getenv("HOST", server_settings.host), port=int(os.getenv("PORT", server_settings.port)),
                ssl_keyfile=server_settings.ssl_keyfile, ssl_certfile=server_settings.ssl_certfile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
