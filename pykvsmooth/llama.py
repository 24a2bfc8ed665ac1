"""``pykvsmooth.Llama``: llama_cpp.Llama with KVSmooth.

Which tokens are smoothed (SPEC §2): the C side smooths the tokens whose output is
requested while KVSmooth is enabled.  llama-cpp-python requests output for the last token
of every ``n_batch`` chunk (and for every token with ``logits_all``), so this class
decides instead: the last token of each ``eval()`` call is the generation step, every
other token is a prompt token and is evaluated with smoothing paused
(``llama_kvsmooth_pause``: no graph change).  Two places need more than that:

- prefix reuse: cells that hold smoothed K/V (an earlier answer, an earlier final prompt
  token) are never reused as prompt cells; ``generate`` forgets them first, so a second
  completion equals one on a fresh object;
- chat handlers (``Llava15ChatHandler``) evaluate the prompt chunk by chunk with ``eval``
  and mtmd and then sample at once; during ``create_chat_completion`` those evals are
  unsmoothed and ``generate`` evaluates the final prompt token again, smoothed.
"""

from __future__ import annotations

import base64
import contextlib
import inspect
import warnings
from dataclasses import dataclass
from typing import Any, Generator, List, Optional, Sequence

import llama_cpp
from llama_cpp._ctypes_extensions import byref

from . import _capi
from .config import KVSmoothConfig, KVSmoothValue


class KVSmoothError(RuntimeError):
    """KVSmooth was refused: by llama.cpp for this model or context (its reason, from
    ``llama_kvsmooth_last_error``), or for a combination this class cannot run exactly
    (``draft_model``)."""


@dataclass(frozen=True)
class ImageAnswer:
    """The answer of ``Llama.describe_image``."""

    text: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class TraceRecord:
    """One smoothed token in one layer, from the last decode (KVSmoothConfig.trace)."""

    seq_id: int
    pos: int
    layer: int
    z: float
    lambda_: float
    rank: int
    applied: bool


_GENERATE = inspect.signature(llama_cpp.Llama.generate)

_DRAFT_MODEL_REFUSED = (
    "KVSmooth does not support draft_model (speculative decoding): removing a rejected draft "
    "token empties the entropy queues, so the result would differ from decoding one token at a "
    "time (SPEC §2). Use draft_model=None with KVSmooth, or kvsmooth=None with a draft model."
)

_ERROR_NAMES = {
    _capi.LLAMA_KVSMOOTH_ERR_INVALID_PARAM: "invalid parameter",
    _capi.LLAMA_KVSMOOTH_ERR_UNSUPPORTED: "not supported for this model or context",
    _capi.LLAMA_KVSMOOTH_ERR_ALLOC: "could not allocate its state",
}


class Llama(llama_cpp.Llama):
    """``llama_cpp.Llama`` (0.3.36) plus ``kvsmooth``: None/0/False (off), a float λref,
    a mapping of KVSmoothConfig fields, or a KVSmoothConfig."""

    def __init__(self, *args: Any, kvsmooth: KVSmoothValue = None, **kwargs: Any) -> None:
        config = KVSmoothConfig.coerce(kvsmooth)  # bad values fail before the model loads
        if config is not None and kwargs.get("draft_model") is not None:
            raise KVSmoothError(_DRAFT_MODEL_REFUSED)
        self._kvsmooth: Optional[KVSmoothConfig] = None
        # lowest position whose cell may hold smoothed K/V, None if no cell does
        self._first_smoothed: Optional[int] = None
        # n_tokens after the last eval(), -1 if none since create_chat_completion started:
        # tells whether the chat handler evaluated the prompt, and whether it ended in text
        self._eval_end = -1
        self._chat_prompt = False
        super().__init__(*args, **kwargs)
        if config is not None:
            self._allow_one_token_rollback()
        self.kvsmooth = config

    def _allow_one_token_rollback(self) -> None:
        """Hybrid models (LFM2, Qwen3.5): a chat handler evaluates the final prompt token
        unsmoothed, and generate() evaluates it again as the first generation step; the
        recurrent layers can drop that one token only with a state snapshot per sequence
        (llama.cpp's n_rs_seq), so the context is made again with one."""
        if not _capi.llama_model_is_hybrid(self.model) or self.context_params.n_rs_seq > 0:
            return
        self.context_params.n_rs_seq = 1
        self._ctx.close()  # type: ignore[no-untyped-call]
        self._ctx = self._stack.enter_context(contextlib.closing(
            llama_cpp._internals.LlamaContext(model=self._model, params=self.context_params, verbose=self.verbose)))

    # --- configuration ---------------------------------------------------------------

    @property
    def kvsmooth(self) -> Optional[KVSmoothConfig]:
        return self._kvsmooth

    @kvsmooth.setter
    def kvsmooth(self, value: KVSmoothValue) -> None:
        config = KVSmoothConfig.coerce(value)
        if config is not None:
            self._refuse_draft_model()
        if config is None:
            _capi.llama_kvsmooth_disable(self.ctx)
        else:
            self._enable(config)
        if config != self._kvsmooth:
            # the last logits came from a final token evaluated under the old setting: the
            # next completion must evaluate it again, even when the whole prompt is cached
            self._requires_eval = True
        self._kvsmooth = config

    def _refuse_draft_model(self) -> None:
        if getattr(self, "draft_model", None) is not None:
            raise KVSmoothError(_DRAFT_MODEL_REFUSED)

    def _enable(self, config: KVSmoothConfig) -> None:
        params = config.to_c()
        rc = _capi.llama_kvsmooth_set(self.ctx, byref(params))
        if rc != 0:
            name = _ERROR_NAMES.get(rc, f"error {rc}")
            raise KVSmoothError(f"KVSmooth {name}: {_capi.last_error(self.ctx) or name}")

    def kvsmooth_trace(self) -> List[TraceRecord]:
        """The records of the last decode (needs ``KVSmoothConfig(trace=True)``)."""
        ctx = self.ctx
        out = _capi.llama_kvsmooth_trace_record()
        records = []
        for i in range(_capi.llama_kvsmooth_trace_n(ctx)):
            if _capi.llama_kvsmooth_trace_get(ctx, i, byref(out)):
                records.append(TraceRecord(out.seq_id, out.pos, out.layer, out.z, out.lambda_,
                                           out.rank, out.applied))
        return records

    def describe_image(self, image: bytes, prompt: str, *, mime: str = "image/png", max_tokens: int = 512,
                       temperature: float = 0.0, seed: Optional[int] = None) -> ImageAnswer:
        """One user turn of an image and a prompt through the chat handler (LLaVA); greedy
        at temperature 0 (llama.cpp's greedy sampler), no repetition penalty."""
        uri = f"data:{mime};base64," + base64.b64encode(image).decode("ascii")
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                                 {"type": "text", "text": prompt}]}]
        out = self.create_chat_completion(
            messages=messages, max_tokens=max_tokens, temperature=temperature,
            top_k=1 if temperature == 0 else 40, repeat_penalty=1.0, seed=seed)
        usage = out["usage"]
        return ImageAnswer((out["choices"][0]["message"]["content"] or "").strip(),
                           int(usage["prompt_tokens"]), int(usage["completion_tokens"]))

    # --- evaluation ------------------------------------------------------------------

    def eval(self, tokens: Sequence[int]) -> None:
        tokens = list(tokens)
        if self._kvsmooth is not None:
            self._refuse_draft_model()  # draft_model may be assigned after construction
        if self._first_smoothed is not None and self._first_smoothed >= self.n_tokens:
            self._first_smoothed = None  # those cells are being overwritten
        if self._kvsmooth is None or not tokens:
            super().eval(tokens)
        else:
            prompt = tokens if self._chat_prompt else tokens[:-1]
            if prompt:
                self._eval_paused(prompt)
            if not self._chat_prompt:
                # the generation step: the only token of this call with smoothing on
                pos = self.n_tokens
                super().eval(tokens[-1:])
                self._first_smoothed = pos if self._first_smoothed is None else min(self._first_smoothed, pos)
        self._eval_end = self.n_tokens

    def _eval_paused(self, tokens: List[int]) -> None:
        """Evaluate prompt tokens unsmoothed, whatever outputs llama-cpp-python requests; the
        queues start over, as for any new prompt (SPEC §2). Pausing changes no graph."""
        _capi.llama_kvsmooth_pause(self.ctx, True)
        try:
            super().eval(tokens)
        finally:
            _capi.llama_kvsmooth_pause(self.ctx, False)

    def generate(  # the same parameters as llama_cpp.Llama.generate, passed on as they are
        self, tokens: Sequence[int], *args: Any, **kwargs: Any
    ) -> Generator[int, Optional[Sequence[int]], None]:
        if self._kvsmooth is not None:
            self._refuse_draft_model()
        if self._first_smoothed is not None and self._first_smoothed < self.n_tokens:
            # cells from here on hold smoothed K/V: not prompt cells for any new prompt
            reset = _GENERATE.bind(self, tokens, *args, **kwargs).arguments.get("reset", True)
            if not reset:
                # generate(reset=False) continues after the cached tokens: the smoothed ones
                # become prompt tokens and are evaluated again, unsmoothed, before the new ones
                tokens = [*self._input_ids[self._first_smoothed:].tolist(), *tokens]
            self.n_tokens = self._first_smoothed
            self._first_smoothed = None
            # the current logits belong to a removed token: sample only after a new decode
            self._requires_eval = True
        if self._chat_prompt:
            self._chat_prompt = False
            # handlers that only format text (chat_format) evaluate nothing themselves: the
            # prompt then goes through eval() below like any completion's
            if self._kvsmooth is not None and self.n_tokens > 0 and self._eval_end >= 0:
                if self._eval_end == self.n_tokens:
                    # evaluate the final prompt token again, as the generation step
                    if self._ctx.kv_cache_seq_rm(-1, self.n_tokens - 1, -1):
                        self.n_tokens -= 1
                    else:
                        # a recurrent memory (hybrid models) cannot forget one token
                        warnings.warn("KVSmooth: this model's recurrent layers cannot evaluate the final "
                                      "prompt token again, so it is not smoothed (the generated tokens "
                                      "are); llama-mtmd-cli smooths it", RuntimeWarning, stacklevel=2)
                else:
                    warnings.warn("KVSmooth: the prompt ends with an image, its final position "
                                  "is not smoothed", RuntimeWarning, stacklevel=2)
        return super().generate(tokens, *args, **kwargs)

    def create_chat_completion(self, *args: Any, **kwargs: Any) -> Any:
        self._chat_prompt = self._kvsmooth is not None
        self._eval_end = -1
        try:
            return super().create_chat_completion(*args, **kwargs)
        except BaseException:
            self._chat_prompt = False
            raise

    def reset(self) -> None:
        super().reset()  # type: ignore[no-untyped-call]  # unannotated in llama-cpp-python
        self._first_smoothed = None  # n_tokens is 0: no cell is a prompt cell any more

    def close(self) -> None:
        if hasattr(self, "_stack"):  # not when __init__ failed before llama_cpp.Llama's ran
            super().close()

    # --- saved states (llama_cpp.LlamaCache, save_state/load_state) ------------------

    def save_state(self) -> llama_cpp.LlamaState:
        state = super().save_state()
        state.kvsmooth_first_smoothed = self._first_smoothed  # type: ignore[attr-defined]
        return state

    def load_state(self, state: llama_cpp.LlamaState) -> None:
        super().load_state(state)
        # the restored cells hold smoothed K/V from this position on (a state saved by
        # plain llama_cpp.Llama holds none)
        self._first_smoothed = getattr(state, "kvsmooth_first_smoothed", None)
