"""The OpenAI-compatible HTTP front (FastAPI): /v1/chat/completions, /v1/completions, /v1/models, /health,
/metrics. Requests are validated here (OpenAI-style error bodies), rendered with the V4 chat format
(common/chat.py) and handed to the engine; replies stream as server-sent events or come back whole.

Penalties and `logit_bias` are applied as vLLM applies them (tools/serve/penalties.py). Extensions beside the
OpenAI fields (as vLLM names them): `top_k`, `stop_token_ids`, `ignore_eos`, `repetition_penalty`, `min_tokens`,
`chat_template_kwargs: {"thinking": true}` (V4 thinking mode; also `enable_thinking`), `reasoning_effort`
("max" adds the official max-effort preamble in thinking mode), and `token_ids` in every choice.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from common.chat import (
    ChatFormatError,
    StreamSplitter,
    encode_messages,
    encode_text,
    parse_completion,
)
from common.generate import SEED_END

from .engine import Engine, EngineUnavailable, Event, Options, QueueFull, RequestTooLarge

MAX_TOP_LOGPROBS = 20


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 etype: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.etype = status, message, param, code, etype

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.etype, "param": self.param, "code": self.code}}


@dataclass
class ServeConfig:
    served_model_name: str
    max_model_len: int
    vocab_size: int
    bos_token_id: int | None
    api_key: str | None = None


# ---- request validation ----------------------------------------------------------------------------------

def _num(body: dict, key: str, default: Any, lo: float | None = None, hi: float | None = None,
         integer: bool = False, lo_open: bool = False) -> Any:
    v = body.get(key, default)
    if v is None:
        return default
    if (isinstance(v, bool) or not isinstance(v, int if integer else (int, float))
            or isinstance(v, float) and not math.isfinite(v)):  # json.loads reads NaN / Infinity
        raise ApiError(400, f"'{key}' must be {'an integer' if integer else 'a number'}, got {v!r}", key)
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise ApiError(400, f"'{key}' must be {'>' if lo_open else '>='} {lo}, got {v}", key)
    if hi is not None and v > hi:
        raise ApiError(400, f"'{key}' must be <= {hi}, got {v}", key)
    return v


def _options(body: dict, cfg: ServeConfig, prompt_len: int, default_max: int | None, logprobs: int | None) -> Options:
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    room = cfg.max_model_len - prompt_len
    max_tokens = _num(body, key, None, 1, integer=True)
    if max_tokens is None:
        max_tokens = room if default_max is None else min(default_max, room)
    elif max_tokens > room:
        raise ApiError(400, f"This model's maximum context length is {cfg.max_model_len} tokens; the prompt has "
                            f"{prompt_len} tokens and {key} asks for {max_tokens} more", key,
                       "context_length_exceeded")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "'stop' must be a non-empty string or a list of non-empty strings", "stop")
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in stop_ids):
        raise ApiError(400, "'stop_token_ids' must be a list of integers", "stop_token_ids")
    if _num(body, "n", 1, 1, 1, integer=True) != 1:
        raise ApiError(400, "only n=1 is supported", "n")
    top_k = _num(body, "top_k", 0, -1, integer=True)
    temperature = float(_num(body, "temperature", 1.0, 0, 2))
    top_p = float(_num(body, "top_p", 1.0, 0, 1, lo_open=True))
    seed = _num(body, "seed", None, 0, SEED_END - 1, integer=True)
    # the penalties' and min_tokens' ranges are Options' checks (one place): here only their JSON types
    presence = float(_num(body, "presence_penalty", 0.0))
    frequency = float(_num(body, "frequency_penalty", 0.0))
    repetition = float(_num(body, "repetition_penalty", 1.0))
    min_tokens = _num(body, "min_tokens", 0, integer=True)
    try:
        return Options(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=max(top_k, 0),
                       seed=seed, stop_on_eos=not body.get("ignore_eos", False), stop=stop, stop_token_ids=stop_ids,
                       logprobs=logprobs, presence_penalty=presence, frequency_penalty=frequency,
                       repetition_penalty=repetition, logit_bias=_logit_bias(body, cfg), min_tokens=min_tokens)
    except ValueError as e:  # a check SamplingParams gains that the lines above miss: still a 400, never a 500
        field, _, rest = str(e).partition(" ")  # "top_k must be ..."; the other fields keep their request names
        param = key if field == "max_new_tokens" else field
        raise ApiError(400, f"'{param}' {rest}", param) from None


def _logit_bias(body: dict, cfg: ServeConfig) -> dict[int, float]:
    """OpenAI's {"token id": bias} (JSON keys are strings) -> {id: bias}, ids in the vocabulary (the biases' range
    is Options' check)."""
    raw = body.get("logit_bias")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ApiError(400, "'logit_bias' must be an object mapping token ids to biases", "logit_bias")
    out = {}
    for k, v in raw.items():
        tok = int(k) if isinstance(k, str) and k.strip().lstrip("-").isdigit() else None
        if tok is None or not 0 <= tok < cfg.vocab_size:
            raise ApiError(400, f"'logit_bias' key {k!r} is not a token id in [0, {cfg.vocab_size})", "logit_bias")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ApiError(400, f"'logit_bias' value for token {tok} must be a number, got {v!r}", "logit_bias")
        out[tok] = float(v)
    return out


def _check_ids(ids: list, cfg: ServeConfig, param: str) -> list[int]:
    if not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise ApiError(400, f"'{param}' must be a non-empty string or list of token ids", param)
    bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
    if bad:
        raise ApiError(400, f"token id {bad[0]} is outside the vocabulary [0, {cfg.vocab_size})", param)
    return ids


def _check_len(n: int, cfg: ServeConfig, param: str) -> None:
    if n >= cfg.max_model_len:
        raise ApiError(400, f"This model's maximum context length is {cfg.max_model_len} tokens; the prompt has "
                            f"{n} tokens (the reply needs at least one more)", param, "context_length_exceeded")


# OpenAI parameters this server cannot honour, with the value that asks for nothing: any other value is a 400
# naming the parameter, never silently ignored (an echo or a JSON mode the client thinks is on would not be)
_NEUTRAL: dict[str, Any] = {"best_of": 1, "echo": False, "suffix": ""}


def _reject_unsupported(body: dict) -> None:
    for key, neutral in _NEUTRAL.items():
        v = body.get(key)
        if v is not None and v != neutral:
            raise ApiError(400, f"'{key}' is not supported by this server (got {v!r}; leave it out or send "
                                f"{neutral!r})", key)
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type", "text") != "text"):
        raise ApiError(400, "only response_format {'type': 'text'} is supported (no constrained decoding)",
                       "response_format")
    choice = body.get("tool_choice")
    if choice is not None and choice != "auto":
        raise ApiError(400, "only tool_choice 'auto' is supported: the model decides whether to call a tool",
                       "tool_choice")


def _thinking(body: dict) -> bool:
    kw = body.get("chat_template_kwargs") or {}
    if not isinstance(kw, dict):
        raise ApiError(400, "'chat_template_kwargs' must be an object", "chat_template_kwargs")
    v = kw.get("thinking", kw.get("enable_thinking", body.get("thinking", False)))
    if isinstance(v, dict):  # DeepSeek API style {"type": "enabled"}
        v = v.get("type") == "enabled"
    return bool(v)


# ---- response pieces ---------------------------------------------------------------------------------------

def _usage(ev: Event) -> dict:
    return {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
            "total_tokens": ev.prompt_tokens + ev.completion_tokens}


def _tok_str(tokenizer: Any, t: int) -> str:
    return tokenizer.decode([t], skip_special_tokens=False) if tokenizer is not None else str(t)


def _chat_logprobs(tokenizer: Any, evs: list[Event]) -> dict:
    content = []
    for ev in evs:
        for r in ev.logprobs:
            s = _tok_str(tokenizer, r.token)
            content.append({"token": s, "logprob": r.logprob, "bytes": list(s.encode()),
                            "top_logprobs": [{"token": (ts := _tok_str(tokenizer, t)), "logprob": lp,
                                              "bytes": list(ts.encode())} for t, lp in r.top]})
    return {"content": content}


def _completion_logprobs(tokenizer: Any, evs: list[Event], offset0: int) -> dict:
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    off = offset0
    for ev in evs:
        for r in ev.logprobs:
            s = _tok_str(tokenizer, r.token)
            out["tokens"].append(s)
            out["token_logprobs"].append(r.logprob)
            out["top_logprobs"].append({_tok_str(tokenizer, t): lp for t, lp in r.top})
            out["text_offset"].append(off)
            off += len(s)
    return out


def _tool_calls(calls: list[dict]) -> list[dict]:
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": c["name"], "arguments": c["arguments"]}} for c in calls]


def _coalesce(ev: Event, q: asyncio.Queue) -> Event:
    """Merge the events already waiting behind `ev` into one (a slow client gets fewer, larger chunks)."""
    while ev.finish_reason is None and ev.error is None and not q.empty():
        nxt = q.get_nowait()
        if nxt.error is not None:
            return nxt
        ev = Event(ev.token_ids + nxt.token_ids, ev.text + nxt.text, ev.logprobs + nxt.logprobs, nxt.finish_reason,
                   nxt.prompt_tokens, nxt.completion_tokens)
    return ev


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# ---- the app -----------------------------------------------------------------------------------------------

def create_app(engine: Engine, tokenizer: Any, cfg: ServeConfig) -> Any:
    app = FastAPI(title="dsv4 serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine

    def error(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> JSONResponse:
        return error(e)

    async def read_body(request: Request) -> dict:
        if cfg.api_key is not None:
            auth = request.headers.get("authorization", "")
            if auth != f"Bearer {cfg.api_key}":
                raise ApiError(401, "Incorrect API key provided", None, "invalid_api_key")
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})", None, "invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model != cfg.served_model_name:
            raise ApiError(400, f"The model {model!r} does not exist; this server serves "
                                f"{cfg.served_model_name!r}", "model", "model_not_found")
        _reject_unsupported(body)
        return body

    def submit(prompt: list[int], opts: Options) -> Any:
        try:
            return engine.submit(prompt, opts, asyncio.get_running_loop())
        except RequestTooLarge as e:
            raise ApiError(400, str(e), "max_tokens", "context_length_exceeded") from None
        except QueueFull as e:
            engine.metrics.rejected += 1
            raise ApiError(429, f"server busy: {e}", None, "too_many_requests", "rate_limit_error") from None
        except EngineUnavailable as e:
            raise ApiError(503, f"server unavailable: {e}", None, "unavailable", "server_error") from None

    async def next_event(request: Request, handle: Any, poll: bool) -> Event:
        while True:
            try:
                ev = await asyncio.wait_for(handle.queue.get(), 0.5 if poll else None)
                return ev if poll else _coalesce(ev, handle.queue)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    engine.cancel(handle.id)
                    raise asyncio.CancelledError from None

    async def collect(request: Request, handle: Any) -> list[Event]:
        evs = []
        try:
            while True:
                ev = await next_event(request, handle, poll=True)
                if ev.error:
                    raise ApiError(503, ev.error, None, "engine_error", "server_error")
                evs.append(ev)
                if ev.finish_reason is not None:
                    return evs
        except BaseException:
            engine.cancel(handle.id)
            raise

    def stream(request: Request, handle: Any, chunks: Any) -> StreamingResponse:
        async def body() -> AsyncIterator[str]:
            finished = False
            try:
                async for piece in chunks(lambda: next_event(request, handle, poll=False)):
                    yield piece
                finished = True
                yield "data: [DONE]\n\n"
            finally:
                if not finished:  # the client went away (or the stream failed): free the sequence now
                    engine.cancel(handle.id)
        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/health")
    async def health() -> Any:
        if engine.healthy:
            return {"status": "ok"}
        return JSONResponse({"status": "unhealthy", "detail": engine.failed or "not running"}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Any:
        engine.metrics.set_gauges(**engine.stats())
        return PlainTextResponse(engine.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request) -> Any:
        if cfg.api_key is not None and request.headers.get("authorization", "") != f"Bearer {cfg.api_key}":
            raise ApiError(401, "Incorrect API key provided", None, "invalid_api_key")
        return {"object": "list", "data": [{"id": cfg.served_model_name, "object": "model", "created": 0,
                                             "owned_by": "dsv4-ascend", "max_model_len": cfg.max_model_len}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await read_body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            if tokenizer is None:
                raise ApiError(400, "this model has no tokenizer; send the prompt as token ids", "prompt")
            if not prompt:
                raise ApiError(400, "'prompt' must not be empty", "prompt")
            ids = encode_text(tokenizer, prompt)
            if cfg.bos_token_id is not None and (not ids or ids[0] != cfg.bos_token_id):
                ids = [cfg.bos_token_id] + ids  # as `dsv4 generate --prompt` does
        elif isinstance(prompt, list):
            ids = _check_ids(prompt, cfg, "prompt")
        else:
            raise ApiError(400, "'prompt' must be a string, a list of token ids, or a batch of one", "prompt")
        _check_len(len(ids), cfg, "prompt")
        lp = body.get("logprobs")
        lp = None if lp is None or lp is False else _num(body, "logprobs", 0, 0, MAX_TOP_LOGPROBS, integer=True)
        opts = _options(body, cfg, len(ids), 16, lp)
        handle = submit(ids, opts)
        rid, created, name = f"cmpl-{uuid.uuid4().hex}", int(time.time()), cfg.served_model_name
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        if not body.get("stream"):
            evs = await collect(request, handle)
            text = "".join(e.text for e in evs)
            return {"id": rid, "object": "text_completion", "created": created, "model": name,
                    "choices": [{"index": 0, "text": text, "finish_reason": evs[-1].finish_reason,
                                 "logprobs": _completion_logprobs(tokenizer, evs, 0) if lp is not None else None,
                                 "token_ids": [t for e in evs for t in e.token_ids]}],
                    "usage": _usage(evs[-1])}

        async def chunks(get) -> AsyncIterator[str]:
            offset = 0
            while True:
                ev = await get()
                if ev.error:
                    yield _sse(ApiError(503, ev.error, None, "engine_error", "server_error").body())
                    return
                yield _sse({"id": rid, "object": "text_completion", "created": created, "model": name,
                            "choices": [{"index": 0, "text": ev.text, "finish_reason": ev.finish_reason,
                                         "logprobs": _completion_logprobs(tokenizer, [ev], offset)
                                         if lp is not None else None, "token_ids": ev.token_ids}]})
                offset += len(ev.text)
                if ev.finish_reason is not None:
                    if include_usage:
                        yield _sse({"id": rid, "object": "text_completion", "created": created, "model": name,
                                    "choices": [], "usage": _usage(ev)})
                    return
        return stream(request, handle, chunks)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = await read_body(request)
        if tokenizer is None:
            raise ApiError(400, "this model has no tokenizer; use /v1/completions with token ids", "model")
        thinking = _thinking(body)
        effort = body.get("reasoning_effort")
        try:
            text = encode_messages(body.get("messages"), thinking=thinking, tools=body.get("tools") or None,
                                   reasoning_effort=effort)
        except ChatFormatError as e:
            raise ApiError(400, str(e), "messages") from None
        ids = encode_text(tokenizer, text)
        _check_len(len(ids), cfg, "messages")
        lp = None
        if body.get("logprobs"):
            lp = _num(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS, integer=True)
        elif body.get("top_logprobs") is not None:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        opts = _options(body, cfg, len(ids), None, lp)
        handle = submit(ids, opts)
        rid, created, name = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), cfg.served_model_name
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        if not body.get("stream"):
            evs = await collect(request, handle)
            reply = parse_completion("".join(e.text for e in evs), thinking)
            finish = evs[-1].finish_reason
            msg: dict[str, Any] = {"role": "assistant", "content": reply.content}
            if thinking:
                msg["reasoning_content"] = reply.reasoning_content
            if reply.tool_calls:
                msg["tool_calls"] = _tool_calls(reply.tool_calls)
                finish = "tool_calls" if finish == "stop" else finish
            return {"id": rid, "object": "chat.completion", "created": created, "model": name,
                    "choices": [{"index": 0, "message": msg, "finish_reason": finish,
                                 "logprobs": _chat_logprobs(tokenizer, evs) if lp is not None else None,
                                 "token_ids": [t for e in evs for t in e.token_ids]}],
                    "usage": _usage(evs[-1])}

        def chunk(delta: dict, finish: str | None = None, ev: Event | None = None) -> str:
            choice = {"index": 0, "delta": delta, "finish_reason": finish,
                      "logprobs": _chat_logprobs(tokenizer, [ev]) if lp is not None and ev is not None else None}
            if ev is not None:
                choice["token_ids"] = ev.token_ids
            return _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                         "choices": [choice]})

        async def chunks(get) -> AsyncIterator[str]:
            split = StreamSplitter(thinking)
            yield chunk({"role": "assistant", "content": ""})
            while True:
                ev = await get()
                if ev.error:
                    yield _sse(ApiError(503, ev.error, None, "engine_error", "server_error").body())
                    return
                r, c = split.feed(ev.text)
                delta: dict[str, Any] = {}
                finish = ev.finish_reason
                if finish is not None:
                    r2, c2, calls = split.finish()
                    r, c = r + r2, c + c2
                    if calls:
                        delta["tool_calls"] = [dict(index=i, **tc) for i, tc in enumerate(_tool_calls(calls))]
                        finish = "tool_calls" if finish == "stop" else finish
                if r:
                    delta["reasoning_content"] = r
                if c or not delta:
                    delta["content"] = c
                yield chunk(delta, finish, ev)
                if finish is not None:
                    if include_usage:
                        yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                                    "model": name, "choices": [], "usage": _usage(ev)})
                    return
        return stream(request, handle, chunks)

    @app.exception_handler(404)
    async def _not_found(_: Request, __: Any) -> JSONResponse:
        return error(ApiError(404, "no such endpoint", None, "not_found"))

    @app.exception_handler(405)
    async def _bad_method(_: Request, __: Any) -> JSONResponse:
        return error(ApiError(405, "method not allowed", None, "method_not_allowed"))

    return app
