"""A local generation server: OpenAI's completions API, and a playground page that shows self-attention live.

    pip install -e ".[serve]"                                   # starlette and uvicorn
    python serve.py --out_dir=out/shakespeare_char_cpu           # then open http://127.0.0.1:8000
    python serve.py --init_from=gpt2 --port=8001 --device=cuda
    curl -N http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"prompt": "ROMEO:", "max_tokens": 50, "temperature": 0.8, "stream": true}'

Endpoints: POST /v1/completions (OpenAI's completions format; `stream` sends server-sent events), GET /v1/models,
POST /v1/attention (one token's attention weights over the earlier tokens, every layer and head: attention.py's
maps), GET /tokenizer_info, POST /tokenize and POST /detokenize (vLLM's, for lm-eval: docs/eval.md), GET /health
(sequences decoding and waiting), GET /metrics (Prometheus), GET / (the playground, playground.html beside this file).

Scheduling (engine.py): one worker thread owns the model and decodes the rows of every request in one batch, a
token per step; a request joins after its prefill and leaves the step it ends. When `max_sequences` rows are
decoding, prompts wait in a queue of `max_waiting`; beyond that a request is answered 503 at once. A client that
disconnects frees its rows at once.

No web page can use the server: it answers only a Host header naming an address it listens on (DNS rebinding),
reads only JSON bodies sent as application/json (a form or text/plain POST needs no CORS preflight), and sends no
CORS headers unless --allow_origins names origins. It has no authentication.
"""

from __future__ import annotations

import errors

errors.install(__name__)  # before the other imports: a Ctrl-C while torch loads is one line too

import asyncio
import contextlib
import ipaddress
import json
import logging
import math
import os
import re
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from attention import attention_maps
from checkpoint import load_for_inference
from config import DTYPES, bounded, format_config, parse_config, resolve_device, resolve_dtype, set_threads
from engine import Job, Scheduler
from model import GPT
from quantize import check_quantize
from sample import Continuation, decode
from tokens import Tokenizer

try:  # the `serve` extra: main() says what to install when it is missing
    import uvicorn
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.middleware.cors import CORSMiddleware
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
    from starlette.routing import Route
except ImportError:
    uvicorn = None

SERVE_EXTRA_MISSING = "serve.py needs starlette and uvicorn: pip install -e '.[serve]'"
PLAYGROUND = Path(__file__).with_name("playground.html")  # read at start-up: edit it and restart
ACCESS_LOG = logging.getLogger("serve")  # one line per request; main() shows them on stderr
MAX_BODY = 1 << 20  # bytes; a prompt of a full GPT-2 context is a few kB
MAX_STOP_CHARS = 1000  # characters of a stop string (OpenAI's count limit is 4): bounds the matcher's tables


@dataclass
class ServeConfig:
    out_dir: str = "out"  # training output folder to serve (its `checkpoint` link), or a checkpoint folder
    init_from: str | None = None  # gpt2, gpt2-medium, gpt2-large, gpt2-xl or a Hugging Face GPT-2 folder; none: out_dir
    checkpoint: str = "latest"  # which checkpoint of out_dir: latest or best
    host: str = "127.0.0.1"  # address to listen on; 0.0.0.0 opens the server to the network (it has no authentication)
    port: int = bounded(8000, 0, 65535)  # TCP port
    allow_origins: str | None = None  # web origins whose pages may call the API (CORS), comma-separated; none: no page
    device: str = "auto"  # cpu, cuda, cuda:1, mps; auto: cuda when available, else cpu
    dtype: str = "auto"  # float32, bfloat16 or float16 (the weights are cast); auto: bfloat16 on CUDA, else float32
    threads: int | None = None  # torch CPU threads; none: $OMP_NUM_THREADS, else the idle cores; 0: one per core
    quantize: str = "none"  # none, or int8: weights stored as int8, one scale per output channel (CPU; quantize.py)
    model_name: str | None = None  # the model id /v1/models lists and responses carry; none: the checkpoint's name
    max_tokens: int = 2048  # the largest max_tokens a request may ask for
    max_sequences: int = 16  # rows decoded together (a request with n=4 takes 4): the KV cache has this many rows
    prefill_chunk: int = 128  # prompt tokens prefilled between two decode steps: how long a long prompt pauses others
    max_waiting: int = 64  # prompts waiting for rows; when the queue is full, new requests get 503 at once
    max_attention_tokens: int = 512  # longest context /v1/attention maps: its memory is n_layer x n_head x T² floats
    drain_seconds: float = 5.0  # after Ctrl-C, how long requests in flight may finish before they are ended

    def __post_init__(self) -> None:
        if self.checkpoint not in ("latest", "best"):
            raise ValueError(f"checkpoint must be latest or best, got {self.checkpoint!r}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be auto, {', '.join(DTYPES)}; got {self.dtype!r}")
        check_quantize(self.quantize)
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be between 0 and 65535, got {self.port}")
        for name in ("max_tokens", "max_sequences", "prefill_chunk", "max_waiting", "max_attention_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.drain_seconds < math.inf:
            raise ValueError(f"drain_seconds must be 0 or more, got {self.drain_seconds}")
        if self.allow_origins is not None and not all(o.strip() for o in self.allow_origins.split(",")):
            raise ValueError(f"allow_origins must be origins separated by commas, e.g. http://localhost:3000, got "
                             f"{self.allow_origins!r}")
        for origin in self.origins:  # a browser sends exactly scheme://host[:port]: anything else never matches
            if origin != "*" and not _ORIGIN.fullmatch(origin):
                fixed = origin.rstrip("/").lower()
                hint = f": did you mean {fixed}?" if _ORIGIN.fullmatch(fixed) else ", e.g. http://localhost:3000"
                raise ValueError(f"allow_origins: {origin!r} is not an origin, which is scheme://host[:port] in lower "
                                 f"case with no path and no trailing slash{hint}")

    @property
    def origins(self) -> list[str]:
        """--allow_origins as a list ("*": every page, warned about at start)."""
        return [o.strip() for o in self.allow_origins.split(",")] if self.allow_origins else []


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
    top_k: int | None
    top_p: float | None
    n: int
    seed: int  # drawn at random when the request gives none
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    echo: bool
    return_token_ids: bool
    logprobs: int | None  # alternatives per token to return with the chosen token's log-probability; None: none
    dropped: int = 0  # prompt tokens before the last block_size of each prompt, which the model does not see


# OpenAI's completions fields that this server cannot honour, with the values that mean "off".
_UNSUPPORTED = {"suffix": (None, ""), "best_of": (None, 1), "presence_penalty": (None, 0),
                "frequency_penalty": (None, 0), "logit_bias": (None, {})}
_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://(\[[0-9a-f:.]+\]|[a-z0-9.-]+)(:[0-9]{1,5})?")  # a browser's Origin header
MAX_LOGPROBS = 20  # alternatives per token, as vLLM's default limit (OpenAI's is 5)
_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed",
           "echo", "user", "logprobs", "return_token_ids", "top_k"} | set(_UNSUPPORTED)  # the last two: vLLM's


def _typed(body: dict, key: str, kinds: tuple[type, ...], default: Any, what: str) -> Any:
    """body[key] when it is one of kinds (JSON true is not a number here), default when absent or null."""
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) != (bool in kinds) or not isinstance(value, kinds):
        raise ApiError(400, f"{key} must be {what}, got {json.dumps(value)[:40]}", key)
    return value


def _number(body: dict, key: str, default: float) -> float:
    """body[key] as a float: a JSON number (an integer of 400 digits overflows a float: out of range too)."""
    value = _typed(body, key, (int, float), default, "a number")
    try:
        return float(value)
    except OverflowError:
        raise ApiError(400, f"{key} is out of range, got an integer of {len(str(abs(value)))} digits", key) from None


def parse_completion(body: Any, model: GPT, tokenizer: Tokenizer, cfg: ServeConfig) -> Completion:
    """Check a completions request against OpenAI's format and this model; ApiError (400) naming the field if not."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    for key in body:
        if key not in _FIELDS:
            raise ApiError(400, f"Unrecognized request argument supplied: {key}", key)
    for key, off in _UNSUPPORTED.items():  # true == 1 and false == 0 in Python: a bool is never "off"
        if key in body and (isinstance(body[key], bool) or body[key] not in off):
            raise ApiError(400, f"{key} is not supported by this server: leave it out", key)
    _typed(body, "model", (str,), None, "a string")
    _typed(body, "user", (str,), None, "a string")
    max_tokens = _typed(body, "max_tokens", (int,), 16, "an integer")  # 16: OpenAI's default
    if not 0 <= max_tokens <= cfg.max_tokens:
        raise ApiError(400, f"max_tokens must be between 0 and {cfg.max_tokens} (this server's limit), got "
                            f"{max_tokens}", "max_tokens")
    temperature = _number(body, "temperature", 1.0)
    if not 0 <= temperature <= 2:
        raise ApiError(400, f"temperature must be between 0 and 2 (0 is greedy), got {temperature}", "temperature")
    top_p = _number(body, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise ApiError(400, f"top_p must be in (0, 1], got {top_p}; for greedy decoding set temperature=0", "top_p")
    top_k = _typed(body, "top_k", (int,), None, "an integer")
    if top_k is not None and top_k < 1 and top_k not in (0, -1):
        raise ApiError(400, f"top_k must be 1 or more (0 or -1: no limit, as in llama.cpp and vLLM), got {top_k}",
                       "top_k")
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
    if any(len(s) > MAX_STOP_CHARS for s in stop):
        raise ApiError(400, f"a stop string may have up to {MAX_STOP_CHARS} characters, got "
                            f"{max(len(s) for s in stop)}", "stop")

    logprobs = _typed(body, "logprobs", (int,), None, "an integer")
    most = min(MAX_LOGPROBS, model.config.vocab_size)  # a char model may have fewer tokens than that
    if logprobs is not None and not 0 <= logprobs <= most:
        why = f" (this model's vocabulary has {most} tokens)" if most < MAX_LOGPROBS else ""
        raise ApiError(400, f"logprobs must be between 0 and {most}{why}, got {logprobs}", "logprobs")

    prompts, texts = _parse_prompts(body.get("prompt"), model, tokenizer)
    block_size = model.config.block_size
    if logprobs is not None and echo and max(len(p) for p in prompts) > block_size:
        raise ApiError(400, f"a prompt of {max(len(p) for p in prompts)} tokens is longer than this model's context "
                            f"(block_size {block_size}), so echo cannot score all its tokens: send at most "
                            f"{block_size} (lm_eval: max_length={block_size + 1} in --model_args)", "prompt")
    if n < 1 or n * len(prompts) > cfg.max_sequences:
        raise ApiError(400, f"n x the number of prompts must be between 1 and {cfg.max_sequences} (the server's "
                            f"max_sequences), got {n} x {len(prompts)}", "n")
    dropped = 0 if model.config.rolling else sum(max(0, len(p) - block_size) for p in prompts)
    return Completion(prompts, texts, max_tokens, temperature, top_k if top_k not in (None, 0, -1) else None,
                      top_p if top_p < 1 else None, n,
                      seed if seed is not None else int.from_bytes(os.urandom(8)) >> 1, tuple(stop), stream,
                      options.get("include_usage", False), echo, return_token_ids, logprobs, dropped)


def _parse_prompts(prompt: Any, model: GPT, tokenizer: Tokenizer) -> tuple[list[list[int]], list[str]]:
    """OpenAI's prompt forms: a string, a list of strings, a list of token ids, or a list of such lists. A prompt
    longer than block_size is kept whole: the model sees its last block_size tokens, as in sample.py."""
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt)):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt or not all(
            isinstance(p, str) or (isinstance(p, list) and all(type(t) is int for t in p)) for p in prompt):
        raise ApiError(400, "prompt must be a string, a list of strings, a list of token ids, or a list of lists of "
                            "token ids", "prompt")
    vocab_size = model.config.vocab_size
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
        ids_list.append(ids)
        texts.append(p if isinstance(p, str) else decode(tokenizer, ids))
    return ids_list, texts


# ---------------------------------------------------------------------------------------------------------- HTTP


@dataclass(eq=False)
class Served:
    """What the handlers share, as request.app.state.served: the model, its settings, the requests in flight."""
    model: GPT
    tokenizer: Tokenizer
    cfg: ServeConfig
    name: str  # the model id of /v1/models and of every response
    scheduler: Scheduler
    page: str  # the playground, read at start-up
    created: int  # when the server started, for /v1/models
    replies: set[Reply] = field(default_factory=set)  # completions being answered
    in_flight: int = 0  # requests being answered
    answered: int = 0  # requests answered since the start

    def end_all(self, message: str) -> None:
        """End every completion still being answered (the drain's deadline has passed)."""
        for reply in list(self.replies):  # a flag, not only an event: a slow reader's queue may hold hours of tokens
            reply.ending = message
            reply.events.put_nowait(("shutdown", message))  # wakes a reply waiting for its next event


async def completions(request: Request) -> Response | Callable:
    served: Served = request.app.state.served
    try:
        r = parse_completion(await _read_json(request), served.model, served.tokenizer, served.cfg)
    except ApiError as e:
        return _error(e)
    reply = Reply(r, served)
    if not served.scheduler.submit(reply.jobs):
        return _error(ApiError(503, "the server is busy: its queue is full; try again later", None, "overloaded",
                               "server_error"))
    request.state.reply = reply  # for the access line
    served.replies.add(reply)
    return reply if r.stream else await reply.answer(request)


class Reply:
    """One completions request being answered: its jobs' events become OpenAI's response, or, called as an ASGI app,
    its stream of server-sent events."""

    def __init__(self, r: Completion, served: Served) -> None:
        self.r, self.served = r, served
        self.events: asyncio.Queue = asyncio.Queue()
        loop, stop_token = asyncio.get_running_loop(), served.tokenizer.eot_token  # end-of-text ends, as OpenAI's
        self.jobs = [Job(r, i, self.events, loop, generated=[0] * r.n, sent=[0] * r.n, sent_ids=[0] * r.n,
                         texts=[Continuation(served.tokenizer, stop_token, r.stop) for _ in range(r.n)])
                     for i in range(len(r.prompts))]
        self.head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                     "model": served.name}
        self.choices = len(r.prompts) * r.n
        self.ending: str | None = None  # set by Served.end_all: the server is stopping

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.r.prompts)
        completion = sum(sum(j.generated) for j in self.jobs)
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        if self.r.dropped:  # the prompt was longer than the context: the model saw its last block_size tokens
            usage["prompt_tokens_dropped"] = self.r.dropped
        return usage

    def choice(self, index: int, text: str, ids: list[int], reason: str | None, first: bool,
               logprobs: list[tuple] | None) -> dict:
        r = self.r
        if first and r.echo:
            text = r.prompt_texts[index // r.n] + text
        if logprobs is not None and r.echo:  # the prompt's tokens first; text_offset counts from the prompt's start
            shift = len(r.prompt_texts[index // r.n])
            logprobs = (self.jobs[index // r.n].prompt_logprobs if first else []) + [
                (*entry[:3], entry[3] + shift) for entry in logprobs]
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

    async def events_until_done(self, wait: float) -> AsyncIterator[tuple | None]:
        """The jobs' events until every choice has finished, and a None every `wait` seconds."""
        ended, tick = 0, time.monotonic() + wait
        while ended < self.choices:
            if self.ending is not None:
                raise ApiError(503, self.ending, None, "shutting_down", "server_error")
            if time.monotonic() >= tick:
                tick = time.monotonic() + wait
                yield None
            try:
                event = await asyncio.wait_for(self.events.get(), max(0.0, tick - time.monotonic()))
            except TimeoutError:
                continue
            if event[0] == "error":
                raise ApiError(500, event[1], kind="server_error")
            if event[0] == "shutdown":
                raise ApiError(503, event[1], None, "shutting_down", "server_error")
            ended += event[3] is not None
            yield event

    def close(self) -> None:
        self.served.scheduler.cancel(self.jobs)  # a no-op for jobs that have ended
        self.served.replies.discard(self)

    async def answer(self, request: Request) -> Response:
        """The whole response at once."""
        texts, ids, reasons = [""] * self.choices, [[] for _ in range(self.choices)], [None] * self.choices
        logprobs = [[] if self.r.logprobs is not None else None for _ in range(self.choices)]
        try:
            async for event in self.events_until_done(0.5):
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
            self.close()
        return JSONResponse({**self.head, "choices": [self.choice(i, texts[i], ids[i], reasons[i], True, logprobs[i])
                                                      for i in range(self.choices)], "usage": self.usage()})

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        response = StreamingResponse(self.stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            await response(scope, receive, send)
        finally:  # however the stream ends: finished, client gone, server stopping
            self.close()

    async def stream(self) -> AsyncIterator[str]:
        started = set()
        try:
            async for event in self.events_until_done(1.0):
                if event is None:
                    yield ": waiting\n\n"  # an SSE comment: lets a closed connection show itself while queued
                    continue
                i, delta, new_ids, reason, new_logprobs = event
                chunk = {**self.head, "choices": [self.choice(i, delta, new_ids, reason, i not in started,
                                                              new_logprobs)]}
                started.add(i)
                if self.r.include_usage:
                    chunk["usage"] = None
                yield f"data: {json.dumps(chunk)}\n\n"
        except ApiError as e:
            yield f"data: {json.dumps(e.body())}\n\n"
            return
        if self.r.include_usage:
            yield f"data: {json.dumps({**self.head, 'choices': [], 'usage': self.usage()})}\n\n"
        yield "data: [DONE]\n\n"


async def chat_completions(request: Request) -> Response:
    served: Served = request.app.state.served
    return _error(ApiError(404, f"{served.name} is a base model, not a chat model, so /v1/chat/completions is not "
                                f"served: send the text to continue to POST /v1/completions", "model"))


async def attention(request: Request) -> Response:
    served: Served = request.app.state.served
    try:
        body = await _read_json(request)
        ids, position, start = _parse_attention(body, served.model, served.tokenizer, served.cfg)
        idx = torch.tensor(ids[start:position + 1], dtype=torch.long, device=served.scheduler.device)
        future = served.scheduler.call(lambda: attention_maps(served.model, idx)[:, 0, :, -1].float().cpu())  # (L,H,T)
        if future is None:
            raise ApiError(503, "the server is busy: try again later", None, "overloaded", "server_error")
        weights = await asyncio.wrap_future(future)
    except ApiError as e:
        return _error(e)
    return JSONResponse({"token_ids": ids, "tokens": [decode(served.tokenizer, [i]) for i in ids],
                         "position": position, "start": start, "n_layer": weights.size(0),
                         "n_head": weights.size(1), "weights": weights.double().mul(1e4).round().div(1e4).tolist()})


async def models(request: Request) -> Response:
    served: Served = request.app.state.served
    return JSONResponse({"object": "list", "data": [{"id": served.name, "object": "model", "created": served.created,
                                                     "owned_by": "smallgpt",
                                                     "context_length": served.model.config.block_size}]})


async def tokenizer_info(request: Request) -> Response:
    """vLLM's shape, which lm-eval's tokenizer_backend=remote reads: its prefix token is bos_token's (else
    eos_token's) id. A char model has no end-of-text: bos_token is what stands in for it (Tokenizer.prefix_token)."""
    served: Served = request.app.state.served
    tokenizer, eot = served.tokenizer, served.tokenizer.eot_token
    prefix = decode(tokenizer, [tokenizer.prefix_token])
    return JSONResponse({"tokenizer_class": "smallgpt-" + tokenizer.kind, "vocab_size": tokenizer.vocab_size,
                         "model_max_length": served.model.config.block_size, "bos_token": prefix,
                         "bos_token_id": tokenizer.prefix_token, "eos_token": None if eot is None else prefix,
                         "eos_token_id": eot, "pad_token": None})


async def tokenize(request: Request) -> Response:
    """{"prompt": TEXT} -> {"tokens": ids, "count": n, "max_model_len": block_size}; "<|endoftext|>" in TEXT is the
    end-of-text token, as vLLM's and Hugging Face's tokenizers read it (POST /v1/completions reads it as text)."""
    served: Served = request.app.state.served
    try:
        body = await _read_json(request)
        if not isinstance(body, dict) or set(body) - {"prompt", "add_special_tokens", "model"} or \
                not isinstance(body.get("prompt"), str):
            raise ApiError(400, "send {\"prompt\": TEXT} (and optionally \"add_special_tokens\", which adds none "
                                "here: this model has no start token)", "prompt")
        _typed(body, "add_special_tokens", (bool,), False, "true or false")
        try:
            ids = served.tokenizer.encode(body["prompt"], special=True)
        except ValueError as e:
            raise ApiError(400, f"the prompt cannot be encoded: {e}", "prompt") from None
    except ApiError as e:
        return _error(e)
    return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": served.model.config.block_size})


async def detokenize(request: Request) -> Response:
    """{"tokens": ids} -> {"prompt": TEXT}."""
    served: Served = request.app.state.served
    vocab_size = served.model.config.vocab_size
    try:
        body = await _read_json(request)
        ids = body.get("tokens") if isinstance(body, dict) and not set(body) - {"tokens", "model"} else None
        if not isinstance(ids, list) or not all(type(t) is int and 0 <= t < vocab_size for t in ids):
            raise ApiError(400, f"send {{\"tokens\": [ids]}}, ids between 0 and {vocab_size - 1}", "tokens")
    except ApiError as e:
        return _error(e)
    return JSONResponse({"prompt": decode(served.tokenizer, ids)})


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok", **request.app.state.served.scheduler.load()})


async def page(request: Request) -> Response:
    return HTMLResponse(request.app.state.served.page)


async def metrics(request: Request) -> Response:
    instruments = request.app.state.served.scheduler.metrics
    if instruments is None:
        return _error(ApiError(501, "GET /metrics needs prometheus_client: pip install -e '.[serve]'",
                               kind="server_error"))
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    return Response(generate_latest(instruments.registry), media_type=CONTENT_TYPE_LATEST)


async def http_error(request: Request, e: HTTPException) -> Response:
    return _error(ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}"))


async def server_error(request: Request, e: Exception) -> Response:
    return _error(ApiError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error"))


def _error(e: ApiError) -> JSONResponse:
    headers = {"Retry-After": "1"} if e.status == 503 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


async def _read_json(request: Request) -> Any:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":  # a form or text/plain POST is one a web page may send without asking
        raise ApiError(415, f"send the body as JSON with Content-Type: application/json (got {kind or 'none'})")
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
    except ValueError as e:  # an integer of more than sys.get_int_max_str_digits() digits
        raise ApiError(400, f"the request body holds a number too long to read ({str(e).split(';')[0]})") from None
    except RecursionError:
        raise ApiError(400, "the request body nests arrays or objects too deeply") from None


class Guard:
    """The ASGI layer before the routes: refuses a Host header that names no address of this server (a web page
    reaching it by DNS rebinding), counts the requests in flight (and, for /metrics, the answers by status), and
    writes one access line per request."""

    def __init__(self, app: Callable, served: Served) -> None:
        self.app, self.served = app, served

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 0

        async def send_noting_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.served.in_flight += 1
        try:
            refused = _check_host(scope, self.served.cfg.host)
            await (_error(refused) if refused else self.app)(scope, receive, send_noting_status)
        finally:
            self.served.in_flight -= 1
            self.served.answered += 1
            if status and (instruments := self.served.scheduler.metrics) is not None:
                instruments.requests.labels(str(status)).inc()
            usage = reply.usage() if (reply := scope.get("state", {}).get("reply")) else None
            tokens = f" {usage['prompt_tokens']} + {usage['completion_tokens']} tokens," if usage else ""
            client = scope["client"][0] if scope.get("client") else "-"
            ACCESS_LOG.info("%s %s %s %s%s %.2f s", client, scope["method"], scope["path"], status or "-", tokens,
                            time.perf_counter() - start)


def _check_host(scope: dict, listening: str) -> ApiError | None:
    """None when the Host header names this server: localhost, a loopback address, --host, or the address the
    connection came in on, with this server's port or none."""
    host = dict(scope["headers"]).get(b"host", b"").decode("latin-1").lower()
    if host.startswith("["):  # [::1]:8000
        name, _, port = host[1:].partition("]")
        port = port.removeprefix(":")
    else:
        name, _, port = host.partition(":") if host.count(":") == 1 else (host, "", "")
    address, listening_port = scope.get("server") or (None, None)
    names = {"localhost", "127.0.0.1", "::1", listening.strip("[]").lower(), address}
    if name in names and (not port or listening_port is None or port == str(listening_port)):
        return None
    address = f"[{address}]" if ":" in (address or "") else address or "localhost"
    return ApiError(421 if host else 400, f"the Host header {host!r} names no address of this server: ask for "
                                          f"http://{address}:{listening_port}/ (a guard against web pages of other "
                                          f"sites)")


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name
        return False


@contextlib.asynccontextmanager
async def _lifespan(app: Starlette) -> AsyncIterator[None]:
    yield
    app.state.served.scheduler.stop()


ROUTES = [("/", page, ["GET"]), ("/v1/models", models, ["GET"]), ("/health", health, ["GET"]),
          ("/metrics", metrics, ["GET"]), ("/v1/completions", completions, ["POST"]),
          ("/v1/chat/completions", chat_completions, ["POST"]), ("/v1/attention", attention, ["POST"]),
          ("/tokenizer_info", tokenizer_info, ["GET"]), ("/tokenize", tokenize, ["POST"]),
          ("/detokenize", detokenize, ["POST"])]


def create_app(model: GPT, tokenizer: Tokenizer, cfg: ServeConfig, name: str) -> Starlette:
    """The ASGI app serving `model`; its decode worker starts now and stops with the app's lifespan."""
    page_text = read_playground()
    scheduler = Scheduler(model, cfg.max_sequences, cfg.max_waiting, cfg.prefill_chunk)
    served = Served(model, tokenizer, cfg, name, scheduler, page_text, int(time.time()))
    middleware = [Middleware(Guard, served=served)]
    if cfg.origins:  # CORS for the pages of these origins only; none: browsers keep every other page out
        middleware.append(Middleware(CORSMiddleware, allow_origins=cfg.origins, allow_methods=["GET", "POST"],
                                     allow_headers=["Content-Type", "Authorization"]))
    app = Starlette(routes=[Route(path, handler, methods=methods) for path, handler, methods in ROUTES],
                    middleware=middleware, exception_handlers={HTTPException: http_error, Exception: server_error},
                    lifespan=_lifespan)
    app.state.served, app.state.scheduler = served, served.scheduler
    return app


def read_playground() -> str:
    try:
        return PLAYGROUND.read_text(encoding="utf-8")
    except OSError as e:
        raise SystemExit(f"{PLAYGROUND}: {e.strerror}: serve.py serves the playground page from beside it, in "
                         f"the clone it runs from: restore it there (git checkout playground.html)") from None


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


# ---------------------------------------------------------------------------------------------------------- main


class Server(uvicorn.Server if uvicorn is not None else object):
    """uvicorn's server with this script's signals: the first Ctrl-C (or SIGTERM) stops taking requests and gives
    those in flight drain_seconds to finish, the second stops at once. A signal the parent process ignores (a
    script's background job ignores Ctrl-C) stays ignored."""

    def __init__(self, config: uvicorn.Config, served: Served) -> None:
        super().__init__(config)
        self.served, self.signal = served, 0

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():  # signals reach only the main thread
            yield
            return
        caught = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not signal.SIG_IGN]
        previous = {s: signal.signal(s, self.handle_exit) for s in caught}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def handle_exit(self, sig: int, frame: Any) -> None:
        # os.write: a signal handler may interrupt a print to stderr, and a second print there would raise
        if self.should_exit:  # the second signal: no drain, no tracebacks of the tasks it would cancel
            os.write(2, b"stopped now\n")
            os._exit(128 + sig)
        self.signal, self.should_exit = sig, True
        if n := self.served.in_flight:
            os.write(2, f"draining {n} request{'s' * (n != 1)} (Ctrl-C again to stop now)\n".encode())

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        deadline = asyncio.get_running_loop().call_later(self.served.cfg.drain_seconds, self.served.end_all,
                                                         "the server is shutting down: send the request again later")
        try:
            await super().shutdown(sockets)
        finally:
            deadline.cancel()


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(ServeConfig, argv, description=__doc__)
    if uvicorn is None:
        raise SystemExit(SERVE_EXTRA_MISSING)
    print(format_config(cfg), file=sys.stderr)
    set_threads(cfg.threads)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    model, tokenizer, _, source = load_for_inference(cfg.out_dir, cfg.init_from, cfg.checkpoint, device,
                                                     dtype, cfg.quantize)  # cast, not autocast: see sample.py
    tokenizer.encode("")  # a BPE's files load now: offline, one line here rather than a failed first request
    name = cfg.model_name or Path(str(source).rstrip("/")).name or str(source)
    try:
        sock = socket.create_server((cfg.host, cfg.port), family=socket.AF_INET6 if ":" in cfg.host else socket.AF_INET)
    except OSError as e:
        raise SystemExit(f"cannot listen on {cfg.host}:{cfg.port} ({e.strerror or e}): pass another --port or "
                         f"--host") from None
    app = create_app(model, tokenizer, cfg, name)
    ACCESS_LOG.addHandler(logging.StreamHandler(sys.stderr))
    ACCESS_LOG.setLevel(logging.INFO)
    if not _is_loopback(cfg.host):
        print(f"warning: --host={cfg.host} is not a loopback address: anyone who can reach this machine can use the "
              f"server, which has no authentication", file=sys.stderr)
    if "*" in cfg.origins:
        print("warning: --allow_origins=* lets every web page its visitors open call this server and read its "
              "answers; name the origins that need it instead (e.g. http://localhost:3000)", file=sys.stderr)
    print(f"serving {name} ({model.num_params() / 1e6:.1f}M parameters, {device}, {str(dtype).removeprefix('torch.')}"
          f"{', int8 weights' * (cfg.quantize == 'int8')}) "
          f"on http://{cfg.host}:{sock.getsockname()[1]}", file=sys.stderr)
    # A backstop after our own deadline (Server.shutdown): uvicorn then cancels what is still running.
    server = Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=cfg.drain_seconds + 5),
                    app.state.served)
    server.run(sockets=[sock])
    print(f"stopped after {app.state.served.answered} requests", file=sys.stderr)
    return 128 + server.signal if server.signal else 0


if __name__ == "__main__":
    sys.exit(main())
