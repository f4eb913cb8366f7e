"""A local generation server: OpenAI's completions API, and a playground page that shows self-attention live.

    pip install -e ".[serve]"                                   # starlette and uvicorn
    python serve.py --out_dir=out/shakespeare_char_cpu           # then open http://127.0.0.1:8000
    python serve.py --init_from=gpt2 --port=8001 --device=cuda
    curl -N http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"prompt": "ROMEO:", "max_tokens": 50, "temperature": 0.8, "stream": true}'

Endpoints: POST /v1/completions (OpenAI's completions format; `stream` sends server-sent events), GET /v1/models,
POST /v1/attention (one token's attention weights over the earlier tokens, every layer and head: attention.py's
maps), GET /health (sequences decoding and waiting), GET / (the playground).

Scheduling: one worker thread owns the model. Every prompt of a request gets its own model.generate_stream (its own
KV cache, one row per completion `n`), and the worker advances all of them one token per round, in turn. Rows of
different requests are not batched together: the KV cache has one position for all its rows, so prompts of
different lengths cannot share a step, and a row batched with others rounds differently from the same row alone
(another matmul shape), so greedy tokens could change at near-ties. This way every completion is exactly what
sample.py gives for its prompt, settings and seed, however many clients there are; the price is that throughput
does not grow with clients (docs/benchmarks.md). When `max_sequences` rows are decoding, prompts wait in a queue
of `max_waiting`; beyond that a request is answered 503 at once. A client that disconnects frees its rows at once.
"""

from __future__ import annotations

import errors

errors.install(__name__)  # before the other imports: a Ctrl-C while torch loads is one line too

import asyncio
import contextlib
import json
import os
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from attention import attention_maps
from checkpoint import load_model
from config import DTYPES, format_config, parse_config, resolve_device, resolve_dtype
from engine import Job, Metrics, Scheduler
from model import GPT
from sample import Continuation, decode
from tokens import Tokenizer

try:  # the `serve` extra: main() says what to install when it is missing
    import uvicorn
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
    from starlette.routing import Route
except ImportError:
    uvicorn = None

SERVE_EXTRA_MISSING = "serve.py needs starlette and uvicorn: pip install -e '.[serve]'"

@dataclass
class ServeConfig:
    out_dir: str = "out"  # training output folder to serve (its `checkpoint` link), or a checkpoint folder
    init_from: str | None = None  # gpt2, gpt2-medium, gpt2-large, gpt2-xl or a Hugging Face GPT-2 folder; none: out_dir
    checkpoint: str = "latest"  # which checkpoint of out_dir: latest or best
    host: str = "127.0.0.1"  # address to listen on; 0.0.0.0 opens the server to the network (it has no authentication)
    port: int = 8000  # TCP port
    device: str = "auto"  # cpu, cuda, cuda:1, mps; auto: cuda when available, else cpu
    dtype: str = "auto"  # float32, bfloat16 or float16 (the weights are cast); auto: bfloat16 on CUDA, else float32
    model_name: str | None = None  # the model id /v1/models lists and responses carry; none: the checkpoint's name
    max_tokens: int = 2048  # the largest max_tokens a request may ask for
    max_sequences: int = 16  # rows decoded together (a request with n=4 takes 4): the KV cache has this many rows
    prefill_chunk: int = 128  # prompt tokens prefilled between two decode steps: how long a long prompt pauses others
    max_waiting: int = 64  # prompts waiting for rows; when the queue is full, new requests get 503 at once
    max_attention_tokens: int = 512  # longest context /v1/attention maps: its memory is n_layer x n_head x T² floats

    def __post_init__(self) -> None:
        if self.checkpoint not in ("latest", "best"):
            raise ValueError(f"checkpoint must be latest or best, got {self.checkpoint!r}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be auto, {', '.join(DTYPES)}; got {self.dtype!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be between 0 and 65535, got {self.port}")
        for name in ("max_tokens", "max_sequences", "prefill_chunk", "max_waiting", "max_attention_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


# ---------------------------------------------------------------------------------------------------------- requests


class ApiError(Exception):
    """A request the server refuses: HTTP status and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Completion:
    """A checked POST /v1/completions request."""
    prompts: list[list[int]]  # token ids of each prompt
    prompt_texts: list[str]  # each prompt as text (for echo)
    max_tokens: int
    temperature: float
    top_p: float | None
    n: int
    seed: int  # drawn at random when the request gives none
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    echo: bool
    return_token_ids: bool
    logprobs: int | None  # alternatives per token to return with the chosen token's log-probability; None: none


# OpenAI's completions fields that this server cannot honour, with the values that mean "off".
_UNSUPPORTED = {"suffix": (None, ""), "best_of": (None, 1), "presence_penalty": (None, 0),
                "frequency_penalty": (None, 0), "logit_bias": (None, {})}
MAX_LOGPROBS = 20  # alternatives per token, as vLLM's default limit (OpenAI's is 5)
_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed",
           "echo", "user", "return_token_ids", "logprobs"} | set(_UNSUPPORTED)  # return_token_ids: vLLM's extension


def _typed(body: dict, key: str, kinds: tuple[type, ...], default: Any, what: str) -> Any:
    """body[key] when it is one of kinds (JSON true is not a number here), default when absent or null."""
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) != (bool in kinds) or not isinstance(value, kinds):
        raise ApiError(400, f"{key} must be {what}, got {json.dumps(value)[:40]}", key)
    return value


def parse_completion(body: Any, model: GPT, tokenizer: Tokenizer, cfg: ServeConfig) -> Completion:
    """Check a completions request against OpenAI's format and this model; ApiError (400) naming the field if not."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    for key in body:
        if key not in _FIELDS:
            raise ApiError(400, f"Unrecognized request argument supplied: {key}", key)
    for key, off in _UNSUPPORTED.items():
        if key in body and body[key] not in off:
            raise ApiError(400, f"{key} is not supported by this server: leave it out", key)
    _typed(body, "model", (str,), None, "a string")
    _typed(body, "user", (str,), None, "a string")
    max_tokens = _typed(body, "max_tokens", (int,), 16, "an integer")  # 16: OpenAI's default
    if not 0 <= max_tokens <= cfg.max_tokens:
        raise ApiError(400, f"max_tokens must be between 0 and {cfg.max_tokens} (this server's limit), got "
                            f"{max_tokens}", "max_tokens")
    temperature = float(_typed(body, "temperature", (int, float), 1.0, "a number"))
    if not 0 <= temperature <= 2:
        raise ApiError(400, f"temperature must be between 0 and 2 (0 is greedy), got {temperature}", "temperature")
    top_p = float(_typed(body, "top_p", (int, float), 1.0, "a number"))
    if not 0 < top_p <= 1:
        raise ApiError(400, f"top_p must be in (0, 1], got {top_p}; for greedy decoding set temperature=0", "top_p")
    n = _typed(body, "n", (int,), 1, "an integer")
    seed = _typed(body, "seed", (int,), None, "an integer")
    if seed is not None and not 0 <= seed < 2**63:
        raise ApiError(400, f"seed must be between 0 and 2**63 - 1, got {seed}", "seed")
    stream = _typed(body, "stream", (bool,), False, "true or false")
    echo = _typed(body, "echo", (bool,), False, "true or false")
    return_token_ids = _typed(body, "return_token_ids", (bool,), False, "true or false")
    options = _typed(body, "stream_options", (dict,), {}, "an object")
    if set(options) - {"include_usage"} or not isinstance(options.get("include_usage", False), bool):
        raise ApiError(400, "stream_options takes only include_usage: true or false", "stream_options")

    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "stop must be a non-empty string or a list of up to 4 of them", "stop")

    logprobs = _typed(body, "logprobs", (int,), None, "an integer")
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise ApiError(400, f"logprobs must be between 0 and {MAX_LOGPROBS}, got {logprobs}", "logprobs")
    if logprobs is not None and echo:
        raise ApiError(400, "logprobs with echo would need the prompt's log-probabilities, which this server does "
                            "not compute: leave out echo", "logprobs")

    prompts, texts = _parse_prompts(body.get("prompt"), model, tokenizer)
    if n < 1 or n * len(prompts) > cfg.max_sequences:
        raise ApiError(400, f"n x the number of prompts must be between 1 and {cfg.max_sequences} (the server's "
                            f"max_sequences), got {n} x {len(prompts)}", "n")
    return Completion(prompts, texts, max_tokens, temperature, top_p if top_p < 1 else None, n,
                      seed if seed is not None else int.from_bytes(os.urandom(8)) >> 1, tuple(stop), stream,
                      options.get("include_usage", False), echo, return_token_ids, logprobs)


def _parse_prompts(prompt: Any, model: GPT, tokenizer: Tokenizer) -> tuple[list[list[int]], list[str]]:
    """OpenAI's prompt forms: a string, a list of strings, a list of token ids, or a list of such lists."""
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt)):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt or not all(
            isinstance(p, str) or (isinstance(p, list) and all(type(t) is int for t in p)) for p in prompt):
        raise ApiError(400, "prompt must be a string, a list of strings, a list of token ids, or a list of lists of "
                            "token ids", "prompt")
    block_size, vocab_size = model.config.block_size, model.config.vocab_size
    ids_list, texts = [], []
    for p in prompt:
        if isinstance(p, str):
            if p == "" and tokenizer.eot_token is None:
                raise ApiError(400, "the prompt is empty, and this char model has no end-of-text token to start "
                                    "from: send some text", "prompt")
            try:
                ids = tokenizer.encode(p) if p else [tokenizer.eot_token]  # "": start of a document, as OpenAI's
            except ValueError as e:
                raise ApiError(400, f"the prompt cannot be encoded: {e}", "prompt") from None
        else:
            if not p or not all(0 <= t < vocab_size for t in p):
                raise ApiError(400, f"token ids must be between 0 and {vocab_size - 1}, at least one", "prompt")
            ids = p
        if len(ids) > block_size:
            raise ApiError(400, f"This model's maximum context length is {block_size} tokens, however the prompt "
                                f"has {len(ids)} tokens: shorten it", "prompt", "context_length_exceeded")
        ids_list.append(ids)
        texts.append(p if isinstance(p, str) else decode(tokenizer, ids))
    return ids_list, texts


# ---------------------------------------------------------------------------------------------------------- decoding


# ---------------------------------------------------------------------------------------------------------- HTTP


def _error(e: ApiError) -> JSONResponse:
    headers = {"Retry-After": "1"} if e.status == 503 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


MAX_BODY = 1 << 20  # bytes; a prompt of a full GPT-2 context is a few kB


async def _read_json(request: Request) -> Any:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise ApiError(413, f"the request body is larger than {MAX_BODY} bytes")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None


def create_app(model: GPT, tokenizer: Tokenizer, cfg: ServeConfig, name: str) -> Starlette:
    """The ASGI app serving `model`; its decode worker starts now and stops with the app's lifespan."""
    scheduler = Scheduler(model, cfg.max_sequences, cfg.max_waiting, cfg.prefill_chunk)
    created = int(time.time())
    stop_token = tokenizer.eot_token  # generation ends at end-of-text, as OpenAI's does

    async def completions(request: Request) -> Response | Callable:
        try:
            r = parse_completion(await _read_json(request), model, tokenizer, cfg)
        except ApiError as e:
            return _error(e)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        jobs = [Job(r, i, events, loop, texts=[Continuation(tokenizer, stop_token, r.stop) for _ in range(r.n)],
                    generated=[0] * r.n, sent=[0] * r.n, sent_ids=[0] * r.n) for i in range(len(r.prompts))]
        if not scheduler.submit(jobs):
            return _error(ApiError(503, "the server is busy: its queue is full; try again later", None, "overloaded",
                                   "server_error"))
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": name}
        choices = len(r.prompts) * r.n

        def usage() -> dict:
            prompt = sum(len(p) for p in r.prompts)
            completion = sum(sum(j.generated) for j in jobs)
            return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

        def choice(index: int, text: str, ids: list[int], reason: str | None, first: bool,
                   logprobs: list[tuple] | None) -> dict:
            if first and r.echo:
                text = r.prompt_texts[index // r.n] + text
            if logprobs is not None:  # OpenAI's completions format; text_offset counts from the completion's start
                tokens, chosen, top, offsets = zip(*logprobs) if logprobs else ((), (), (), ())
                logprobs = {"tokens": list(tokens), "token_logprobs": list(chosen), "top_logprobs": list(top),
                            "text_offset": list(offsets)}
            c = {"text": text, "index": index, "logprobs": logprobs, "finish_reason": reason}
            if r.return_token_ids:
                c["token_ids"] = ids
                if first:
                    c["prompt_token_ids"] = r.prompts[index // r.n]
            return c

        async def events_until_done(wait: float) -> AsyncIterator[tuple | None]:
            """The jobs' events until every choice has finished, and a None every `wait` seconds."""
            ended, tick = 0, time.monotonic() + wait
            while ended < choices:
                if time.monotonic() >= tick:
                    tick = time.monotonic() + wait
                    yield None
                try:
                    event = await asyncio.wait_for(events.get(), max(0.0, tick - time.monotonic()))
                except TimeoutError:
                    continue
                if event[0] == "error":
                    raise ApiError(500, event[1], kind="server_error")
                ended += event[3] is not None
                yield event

        if not r.stream:
            texts, ids, reasons = [""] * choices, [[] for _ in range(choices)], [None] * choices
            logprobs = [[] if r.logprobs is not None else None for _ in range(choices)]
            try:
                async for event in events_until_done(0.5):
                    if event is None:
                        if await request.is_disconnected():
                            return Response(status_code=499)  # nobody reads it; the jobs are cancelled below
                        continue
                    i, delta, new_ids, reasons[i], new_logprobs = event
                    texts[i] += delta
                    ids[i] += new_ids
                    if new_logprobs:
                        logprobs[i] += new_logprobs
            except ApiError as e:
                return _error(e)
            finally:
                scheduler.cancel(jobs)  # a no-op for jobs that have ended
            return JSONResponse({**head, "choices": [choice(i, texts[i], ids[i], reasons[i], True, logprobs[i])
                                                     for i in range(choices)], "usage": usage()})

        async def stream() -> AsyncIterator[str]:
            started = set()
            try:
                async for event in events_until_done(1.0):
                    if event is None:
                        yield ": waiting\n\n"  # an SSE comment: lets a closed connection show itself while queued
                        continue
                    i, delta, new_ids, reason, new_logprobs = event
                    chunk = {**head, "choices": [choice(i, delta, new_ids, reason, i not in started, new_logprobs)]}
                    started.add(i)
                    if r.include_usage:
                        chunk["usage"] = None
                    yield f"data: {json.dumps(chunk)}\n\n"
            except ApiError as e:
                yield f"data: {json.dumps(e.body())}\n\n"
                return
            if r.include_usage:
                yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage()})}\n\n"
            yield "data: [DONE]\n\n"

        response = StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        async def send_events(scope: dict, receive: Callable, send: Callable) -> None:
            try:
                await response(scope, receive, send)
            finally:  # however the stream ends: finished, client gone, server stopping
                scheduler.cancel(jobs)
        return send_events  # an ASGI app: Starlette awaits it as it would a Response

    async def attention(request: Request) -> Response:
        try:
            body = await _read_json(request)
            ids, position, start = _parse_attention(body, model, tokenizer, cfg)
            idx = torch.tensor(ids[start:position + 1], dtype=torch.long, device=scheduler.device)
            future = scheduler.call(lambda: attention_maps(model, idx)[:, 0, :, -1].float().cpu())  # (L, H, T)
            if future is None:
                raise ApiError(503, "the server is busy: try again later", None, "overloaded", "server_error")
            weights = await asyncio.wrap_future(future)
        except ApiError as e:
            return _error(e)
        return JSONResponse({"token_ids": ids, "tokens": [decode(tokenizer, [i]) for i in ids], "position": position,
                             "start": start, "n_layer": weights.size(0), "n_head": weights.size(1),
                             "weights": weights.double().mul(1e4).round().div(1e4).tolist()})

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                                         "owned_by": "smallgpt",
                                                         "context_length": model.config.block_size}]})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", **scheduler.load()})

    async def page(request: Request) -> Response:
        return HTMLResponse(PLAYGROUND)

    async def metrics(request: Request) -> Response:
        if scheduler.metrics is None:
            return _error(ApiError(501, "GET /metrics needs prometheus_client: pip install -e '.[serve]'",
                                   kind="server_error"))
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        return Response(generate_latest(scheduler.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def http_error(request: Request, e: HTTPException) -> Response:
        return _error(ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}"))

    async def server_error(request: Request, e: Exception) -> Response:
        return _error(ApiError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error"))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        scheduler.stop()

    app = Starlette(routes=[Route("/", page), Route("/v1/models", models), Route("/health", health),
                            Route("/metrics", metrics), Route("/v1/completions", completions, methods=["POST"]),
                            Route("/v1/attention", attention, methods=["POST"])],
                    exception_handlers={HTTPException: http_error, Exception: server_error}, lifespan=lifespan,
                    middleware=[Middleware(_CountStatuses, metrics=scheduler.metrics)])
    app.state.scheduler = scheduler
    return app


class _CountStatuses:
    """ASGI middleware: counts every answer by its HTTP status for GET /metrics."""

    def __init__(self, app: Callable, metrics: Metrics | None) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        async def counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(str(message["status"])).inc()
            await send(message)
        await self.app(scope, receive, counted if self.metrics is not None and scope["type"] == "http" else send)


def _parse_attention(body: Any, model: GPT, tokenizer: Tokenizer, cfg: ServeConfig) -> tuple[list[int], int, int]:
    """(token ids, query position, first position of its context) of a /v1/attention request."""
    if not isinstance(body, dict) or set(body) - {"prompt", "token_ids", "position", "model"} or \
            ("prompt" in body) == ("token_ids" in body):
        raise ApiError(400, "send {\"prompt\": TEXT} or {\"token_ids\": [ids]}, and optionally \"position\": the "
                            "query token (default: the last)")
    if "prompt" in body:
        if not isinstance(body["prompt"], str):
            raise ApiError(400, "prompt must be a string", "prompt")
        ids = _parse_prompts(body["prompt"], model, tokenizer)[0][0] if body["prompt"] else []
    else:
        ids = body["token_ids"]
        if not isinstance(ids, list) or not all(type(t) is int and 0 <= t < model.config.vocab_size for t in ids):
            raise ApiError(400, f"token_ids must be a list of ids between 0 and {model.config.vocab_size - 1}",
                           "token_ids")
    if not ids:
        raise ApiError(400, "there are no tokens to map", "prompt" if "prompt" in body else "token_ids")
    position = _typed(body, "position", (int,), len(ids) - 1, "an integer")
    if not 0 <= position < len(ids):
        raise ApiError(400, f"position must be between 0 and {len(ids) - 1}, got {position}", "position")
    start = max(0, position + 1 - model.config.block_size)  # the window the model saw when it wrote that token
    if position + 1 - start > cfg.max_attention_tokens:
        raise ApiError(400, f"the attention of a token with {position + 1 - start} tokens of context is more than "
                            f"this server maps (max_attention_tokens={cfg.max_attention_tokens})", "position")
    return ids, position, start


# ---------------------------------------------------------------------------------------------------------- page

PLAYGROUND = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>smallgpt playground</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px system-ui,sans-serif;margin:0;display:grid;grid-template-columns:330px 1fr;height:100vh;color:#222}
aside{padding:10px 14px;border-right:1px solid #ddd;overflow:auto;background:#fafafa}
main{padding:14px 18px;overflow:auto}
h1{font-size:17px;margin:4px 0} h2{font-size:14px;margin:16px 0 4px}
#model{color:#666;font-size:12px}
textarea{width:100%;box-sizing:border-box;height:110px;font:13px monospace}
.row{display:flex;gap:8px;flex-wrap:wrap;margin:6px 0} .row label{font-size:12px;color:#555}
input[type=number]{width:70px} #stop{width:90px}
#status{color:#666;font-size:12px;min-height:1.2em}
#text{font:15px/1.9 monospace;white-space:pre-wrap;word-break:break-word}
#text .prompt{color:#777} .tok{cursor:pointer;border-radius:2px;box-shadow:inset 0 -1px #ccc}
.tok.gen{box-shadow:inset 0 -2px #8ab4f8} .tok.query{outline:2px solid #d33;outline-offset:1px}
.tok:hover{box-shadow:inset 0 -2px #d33}
#info{font-size:12px;min-height:2.4em} #grid{display:grid;gap:2px 3px;align-items:center;font-size:10px;color:#777}
#grid canvas{width:100%;height:12px;cursor:pointer;image-rendering:pixelated;border:1px solid #e4e4e4;
  box-sizing:border-box}
#grid canvas.sel{border-color:#d33}
</style></head><body>
<aside>
<h1>smallgpt playground</h1><div id="model"></div>
<h2>Prompt</h2>
<textarea id="prompt" spellcheck="false">The meaning of life is</textarea>
<div class="row">
<label>max tokens<br><input id="max_tokens" type="number" value="48" min="0"></label>
<label>temperature<br><input id="temperature" type="number" value="0.8" step="0.1" min="0" max="2"></label>
<label>top p<br><input id="top_p" type="number" value="0.95" step="0.05" min="0.01" max="1"></label>
</div><div class="row">
<label>seed<br><input id="seed" type="number" placeholder="random"></label>
<label>stop (\n: newline)<br><input id="stop" placeholder="none"></label>
</div>
<div class="row"><button id="go">Generate</button><button id="halt" disabled>Stop</button></div>
<div id="status"></div>
<h2>Attention</h2>
<div class="row">
<label>layer<br><select id="layer"></select></label>
<label>head<br><select id="head"></select></label>
</div>
<div id="info">Click a token of the text to see where it looks.</div>
<div id="grid" title="each strip: the chosen token's weights over its context, earliest left; click one to show it">
</div>
</aside>
<main><div id="text"></div></main>
<script>
"use strict";
const $ = id => document.getElementById(id);
let ids = [], nPrompt = 0, labels = [], att = null, query = -1, controller = null;

function status(msg) { $('status').textContent = msg; }

async function post(path, body, signal) {
  const resp = await fetch(path, {method: 'POST', headers: {'Content-Type': 'application/json'},
                                  body: JSON.stringify(body), signal});
  if (!resp.ok) {
    const e = await resp.json().catch(() => null);
    throw new Error(e ? e.error.message : resp.statusText);
  }
  return resp;
}

function request() {
  const body = {prompt: $('prompt').value, max_tokens: +$('max_tokens').value, temperature: +$('temperature').value,
                top_p: +$('top_p').value, stream: true, return_token_ids: true};
  if ($('seed').value !== '') body.seed = +$('seed').value;
  if ($('stop').value !== '') body.stop = $('stop').value.replace(/\\n/g, '\n');
  return body;
}

async function generate() {
  if (controller) controller.abort();
  controller = new AbortController();
  ids = []; nPrompt = 0; labels = []; att = null; query = -1;
  $('grid').innerHTML = ''; $('info').textContent = '';
  const prompt = document.createElement('span'), out = document.createElement('span');
  prompt.className = 'prompt'; prompt.textContent = $('prompt').value;
  $('text').replaceChildren(prompt, out);
  $('go').disabled = true; $('halt').disabled = false;
  const t0 = performance.now(); let tFirst = null, n = 0;
  try {
    const resp = await post('/v1/completions', request(), controller.signal);
    const reader = resp.body.getReader(), decoder = new TextDecoder();
    let buffer = '', done = false;
    status('generating…');
    while (!done) {
      const part = await reader.read();
      if (part.done) break;
      buffer += decoder.decode(part.value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf('\n\n')) >= 0) {
        const event = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
        if (!event.startsWith('data: ')) continue;  // ": waiting" comments while queued
        const data = event.slice(6);
        if (data === '[DONE]') { done = true; break; }
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        const c = chunk.choices[0];
        if (c.prompt_token_ids) { ids = c.prompt_token_ids.slice(); nPrompt = ids.length; }
        ids.push(...c.token_ids); n += c.token_ids.length;
        if (c.token_ids.length && tFirst === null) tFirst = performance.now();
        out.textContent += c.text;
      }
      const s = (performance.now() - t0) / 1000;
      const first = tFirst ? `, first after ${((tFirst - t0) / 1000).toFixed(2)} s` : '';
      status(`${n} tokens in ${s.toFixed(1)} s${first}`);
    }
  } catch (e) {
    if (e.name !== 'AbortError') { status('error: ' + e.message); finish(); return; }
    status(status_text() + ' (stopped)');
  }
  finish();
  if (ids.length) await showTokens();
}

function status_text() { return $('status').textContent; }
function finish() { $('go').disabled = false; $('halt').disabled = true; controller = null; }

async function showTokens() {
  // The tokens' own texts come with the attention of the first token (a one-token forward); then the last token.
  try {
    const first = await (await post('/v1/attention', {token_ids: ids, position: 0})).json();
    labels = first.tokens;
  } catch (e) { $('info').textContent = 'attention: ' + e.message; return; }
  const spans = labels.map((label, i) => {
    const s = document.createElement('span');
    s.className = i < nPrompt ? 'tok' : 'tok gen'; s.dataset.i = i;
    s.textContent = label.replace(/\n/g, '\u21b5\n');
    return s;
  });
  $('text').replaceChildren(...spans);
  await select(ids.length - 1);
}

async function select(i) {
  query = i;
  try {
    att = await (await post('/v1/attention', {token_ids: ids, position: i})).json();
  } catch (e) { att = null; $('info').textContent = 'attention: ' + e.message; paint(); return; }
  const layer = $('layer'), head = $('head');
  if (layer.options.length !== att.n_layer || head.options.length !== att.n_head + 1) {
    layer.replaceChildren(...[...Array(att.n_layer).keys()].map(l => new Option(l, l)));
    head.replaceChildren(new Option('mean', -1), ...[...Array(att.n_head).keys()].map(h => new Option(h, h)));
  }
  drawGrid(); paint();
}

function weightsOf(l, h) {  // (T,) weights of the query over its context, for one head or the mean of the heads
  const rows = att.weights[l];
  if (h >= 0) return rows[h];
  return rows[0].map((_, k) => rows.reduce((sum, r) => sum + r[k], 0) / rows.length);
}

function paint() {
  const spans = $('text').querySelectorAll('.tok');
  spans.forEach(s => { s.classList.remove('query'); s.style.background = ''; delete s.dataset.w; s.title = ''; });
  if (query >= 0 && spans[query]) spans[query].classList.add('query');
  if (!att) return;
  const l = +$('layer').value, h = +$('head').value, w = weightsOf(l, h), top = Math.max(...w);
  w.forEach((v, k) => {
    const s = spans[att.start + k];
    s.dataset.w = v.toFixed(4); s.title = `weight ${v.toFixed(4)}`;
    s.style.background = `rgba(255, 120, 0, ${(0.85 * v / top).toFixed(3)})`;
  });
  const best = w.map((v, k) => [v, att.start + k]).sort((a, b) => b[0] - a[0]).slice(0, 3);
  const name = k => JSON.stringify(labels[k]);
  $('info').textContent = `token ${query} ${name(query)}, layer ${l}, ` + (h < 0 ? 'mean of heads' : `head ${h}`) +
    ': attends most to ' + best.map(([v, k]) => `${name(k)}[${k}] ${v.toFixed(2)}`).join(', ');
  $('grid').querySelectorAll('canvas').forEach(
    c => c.classList.toggle('sel', +c.dataset.l === l && +c.dataset.h === h));
}

function drawGrid() {  // every layer (rows) and head (columns): the query's weights over its context, darker = more
  const grid = $('grid'), T = att.weights[0][0].length;
  grid.style.gridTemplateColumns = `1.5em repeat(${att.n_head}, 1fr)`;
  const cells = [document.createElement('span')];
  for (let h = 0; h < att.n_head; h++) {
    const label = document.createElement('span'); label.textContent = 'head ' + h; cells.push(label);
  }
  for (let l = 0; l < att.n_layer; l++) {
    const label = document.createElement('span'); label.textContent = 'L' + l; cells.push(label);
    for (let h = 0; h < att.n_head; h++) {
      const c = document.createElement('canvas'), w = att.weights[l][h], top = Math.max(...w);
      c.width = T; c.height = 1; c.dataset.l = l; c.dataset.h = h; c.title = `layer ${l} head ${h}`;
      const ctx = c.getContext('2d');
      w.forEach((v, k) => { ctx.fillStyle = `rgba(255, 120, 0, ${v / top})`; ctx.fillRect(k, 0, 1, 1); });
      c.onclick = () => { $('layer').value = l; $('head').value = h; paint(); };
      cells.push(c);
    }
  }
  grid.replaceChildren(...cells);
}

$('text').addEventListener('click', e => { if (e.target.classList.contains('tok')) select(+e.target.dataset.i); });
$('layer').onchange = $('head').onchange = paint;
$('go').onclick = generate;
$('halt').onclick = () => controller && controller.abort();
fetch('/v1/models').then(r => r.json()).then(j => {
  $('model').textContent = `${j.data[0].id}, context ${j.data[0].context_length} tokens`;
});
</script>
</body></html>
"""


# ---------------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(ServeConfig, argv, description=__doc__)
    if uvicorn is None:
        raise SystemExit(SERVE_EXTRA_MISSING)
    print(format_config(cfg), file=sys.stderr)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    source = cfg.out_dir if cfg.init_from in (None, "resume") else cfg.init_from
    try:
        model, tokenizer, _ = load_model(source, cfg.checkpoint, device="cpu")
    except ValueError as e:
        raise SystemExit(str(e)) from None
    model = model.to(device=device, dtype=dtype)  # cast, not autocast: see sample.py
    name = cfg.model_name or Path(str(source).rstrip("/")).name or str(source)
    try:
        sock = socket.create_server((cfg.host, cfg.port), family=socket.AF_INET6 if ":" in cfg.host else socket.AF_INET)
    except OSError as e:
        raise SystemExit(f"cannot listen on {cfg.host}:{cfg.port} ({e.strerror or e}): pass another --port or "
                         f"--host") from None
    app = create_app(model, tokenizer, cfg, name)
    print(f"serving {name} ({model.num_params() / 1e6:.1f}M parameters, {device}, {str(dtype).removeprefix('torch.')}) "
          f"on http://{cfg.host}:{sock.getsockname()[1]}", file=sys.stderr)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
